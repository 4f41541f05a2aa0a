#!/usr/bin/env bash
# DiLoCo experiments: `tessera bench diloco` runs, one JSONL file each under
# benchmarks/results/, for docs/benchmarks.md and benchmarks/plot_diloco.py.
#
#   benchmarks/diloco_grid.sh NAME...       run the named experiments (see `case` below)
#   benchmarks/diloco_grid.sh --list        list them
#
# Every run: nano, 12 sequences of 64 tokens per worker per inner step, inner AdamW with cosine
# schedule, outer Nesterov (lr 0.7, momentum 0.9), evaluation on 200 validation windows.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
BIN=target/release/tessera
OUT=benchmarks/results
SHAKESPEARE=../shared/data/tinyshakespeare.txt

run() {
    local name=$1; shift
    echo "== $name: tessera bench diloco $*" >&2
    "$BIN" bench diloco --model nano --threads 2 --json-out "$OUT/$name.jsonl" "$@"
}

experiment() {
    case $1 in
    # The target configuration, M=4, H=50, 50 rounds, against its data-parallel baseline.
    emb-m4-h50-f32)   run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 --baseline ;;
    emb-m4-h50-int8)  run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec int8 --broadcast-codec int8 ;;
    emb-m4-h50-int4)  run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec int4 --broadcast-codec int4 ;;
    emb-m4-h50-topk)  run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec topk --topk-chunk 4096 --topk-k 16 --broadcast-codec int8 ;;
    # Top-k at just over 100× smaller than f32: 53 of every 4096 values (4 + 3·53 = 163 bytes).
    emb-m4-h50-topk100) run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec topk --topk-chunk 4096 --topk-k 53 --broadcast-codec int8 ;;
    emb-m4-base-lr2e-3) run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --baseline-only --baseline-lr 2e-3 ;;
    emb-m4-h50-lr2e-3) run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 --lr 2e-3 ;;
    shk-m4-h50-f32)   run "$1" --data "$SHAKESPEARE" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 --baseline ;;
    shk-m4-h50-int8)  run "$1" --data "$SHAKESPEARE" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec int8 --broadcast-codec int8 ;;
    # Other shapes of the grid.
    emb-m2-h50-f32)   run "$1" --workers 2 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 --baseline ;;
    emb-m8-h50-f32)   run "$1" --workers 8 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 --baseline ;;
    emb-m4-h10-f32)   run "$1" --workers 4 --inner-steps 10 --rounds 250 --eval-every 25 --codec f32 ;;
    emb-m4-h200-f32)  run "$1" --workers 4 --inner-steps 200 --rounds 50 --eval-every 5 --codec f32 --baseline ;;
    --list) sed -n 's/^    \([a-z0-9-]*\))  *run.*/\1/p' "$0" ;;
    *) echo "unknown experiment $1 (--list lists them)" >&2; exit 2 ;;
    esac
}

[ $# -gt 0 ] || { echo "usage: $0 NAME... | --list" >&2; exit 2; }
for e in "$@"; do experiment "$e"; done
