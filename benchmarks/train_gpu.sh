#!/usr/bin/env bash
# The trainer on one CUDA GPU: tokens/s and model FLOPs utilisation (bf16 autocast) of `micro`
# and `small`, Tessera next to Python PyTorch on the same GPU, plus Tessera's stage profile.
#   OUT=DIR benchmarks/train_gpu.sh [TESSERA_BINARY]
# Needs the machine's own torch (e.g. 2.11.0+cu130) importable by python3, and a release binary
# built against the same PyTorch version; LD_LIBRARY_PATH is pointed at that torch's libraries.
# Results: DIR/train-gpu-compare.txt (benchmarks/train_pytorch.py), DIR/train-gpu-tessera.txt.
set -uo pipefail
B=${1:-target/release/tessera}
OUT=${OUT:-out}
mkdir -p "$OUT"
LD_LIBRARY_PATH="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total --format=csv >"$OUT/train-gpu-tessera.txt" 2>&1
"$B" bench train --device cuda --models micro,small --batch-size 32 --steps 50 --warmup 10 \
  >>"$OUT/train-gpu-tessera.txt" 2>&1
python3 benchmarks/train_pytorch.py --tessera "$B" --device cuda --models micro,small --batch-size 32 \
  --steps 50 --warmup 10 --rounds 2 >"$OUT/train-gpu-compare.txt" 2>&1
