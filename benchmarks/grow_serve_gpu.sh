#!/usr/bin/env bash
# Growth against training from scratch at `micro` scale, and serving throughput, on one CUDA GPU.
#   OUT=DIR benchmarks/grow_serve_gpu.sh [TESSERA_BINARY] [tinyshakespeare.txt]
# Results: DIR/grow-micro-*.{txt,jsonl} (tessera bench grow), DIR/serve-cuda.txt (scripts/bench_serve.py).
set -uo pipefail
B=${1:-target/release/tessera}
D=${2:-../shared/data/tinyshakespeare.txt}
OUT=${OUT:-out}
mkdir -p "$OUT"
common=(--model micro --data "$D" --device cuda --steps 2000 --batch-size 16 --small-share 0.1)
"$B" bench grow "${common[@]}" --budgets 0.65,1.0 --json-out "$OUT/grow-micro-both.jsonl" >"$OUT/grow-micro-both.txt" 2>&1
"$B" bench grow "${common[@]}" --budgets 0.65 --shrink depth --json-out "$OUT/grow-micro-depth.jsonl" >"$OUT/grow-micro-depth.txt" 2>&1
"$B" bench grow "${common[@]}" --budgets 0.65 --new-moments zero --json-out "$OUT/grow-micro-zero.jsonl" >"$OUT/grow-micro-zero.txt" 2>&1
TESSERA_BIN="$B" python3 scripts/bench_serve.py --device cuda >"$OUT/serve-cuda.txt" 2>&1
