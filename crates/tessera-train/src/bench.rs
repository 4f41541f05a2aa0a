//! `tessera bench train`: training throughput of the real training step (forward, backward,
//! clipping, AdamW) on random tokens, reported as tokens/s and achieved GFLOP/s from the
//! model's FLOP count. `benchmarks/train_pytorch.py` times the same model in Python PyTorch.
