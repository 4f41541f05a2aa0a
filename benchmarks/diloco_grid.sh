#!/usr/bin/env bash
# DiLoCo experiments: `tessera bench diloco` runs, one JSONL file each under
# benchmarks/results/, for docs/benchmarks.md and benchmarks/plot_diloco.py.
#
#   benchmarks/diloco_grid.sh NAME...       run the named experiments (see `case` below)
#   benchmarks/diloco_grid.sh --list        list them
#
# Every run: nano, 12 sequences of 64 tokens per worker per inner step, inner AdamW with cosine
# schedule, outer Nesterov (lr 0.7, momentum 0.9), evaluation on 200 validation windows.
# `NAME-base` entries are the synchronous data-parallel baseline on the same tokens as NAME's
# DiLoCo runs (M workers' batches averaged every step).
#
# Environment: GRID_DEVICE (cpu; cuda runs bf16 matrix multiplies), GRID_THREADS (2),
# GRID_OUT (benchmarks/results), TESSERA_BIN (target/release/tessera).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
BIN=${TESSERA_BIN:-target/release/tessera}
OUT=${GRID_OUT:-benchmarks/results}
DEVICE=${GRID_DEVICE:-cpu}
THREADS=${GRID_THREADS:-2}
SHAKESPEARE=${SHAKESPEARE:-../shared/data/tinyshakespeare.txt}

run() {
    local name=$1; shift
    echo "== $name: tessera bench diloco $*" >&2
    "$BIN" bench diloco --model nano --device "$DEVICE" --threads "$THREADS" --json-out "$OUT/$name.jsonl" "$@"
}

experiment() {
    case $1 in
    # The target configuration, M=4, H=50, 50 rounds, against its data-parallel baseline.
    emb-m4-h50-f32)   run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 ;;
    emb-m4-base)      run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --baseline-only ;;
    emb-m4-h50-int8)  run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec int8 --broadcast-codec int8 ;;
    emb-m4-h50-int4)  run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec int4 --broadcast-codec int4 ;;
    emb-m4-h50-topk)  run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec topk --topk-chunk 4096 --topk-k 16 --broadcast-codec int8 ;;
    # Top-k with error feedback, Elias–Fano positions and 2-bit values. 120 of every 4096 values
    # keeps whole messages (headers and the small norm tensors included) 103× smaller than f32;
    # 128 (topk128, sparse128) was 98×.
    emb-m4-h50-topk100) run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec topk --topk-chunk 4096 --topk-k 120 --broadcast-codec int8 ;;
    emb-m4-h50-topk128) run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec topk --topk-chunk 4096 --topk-k 128 --broadcast-codec int8 ;;
    # The same bytes, SparseLoCo-style: the error-feedback residual decays (β = 0.95) and stands
    # in for the outer momentum, so the outer step is plain averaging (momentum 0).
    emb-m4-h50-sparse100) run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec topk --topk-chunk 4096 --topk-k 120 --broadcast-codec int8 --feedback-decay 0.95 --outer-lr 1 --outer-momentum 0 ;;
    emb-m4-h50-sparse100-olr1.5) run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec topk --topk-chunk 4096 --topk-k 120 --broadcast-codec int8 --feedback-decay 0.95 --outer-lr 1.5 --outer-momentum 0 ;;
    emb-m4-h50-sparse128) run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec topk --topk-chunk 4096 --topk-k 128 --broadcast-codec int8 --feedback-decay 0.95 --outer-lr 1 --outer-momentum 0 ;;
    emb-m4-base-lr2e-3) run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --baseline-only --baseline-lr 2e-3 ;;
    emb-m4-h50-lr2e-3) run "$1" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 --lr 2e-3 ;;
    shk-m4-h50-f32)   run "$1" --data "$SHAKESPEARE" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 ;;
    shk-m4-base)      run "$1" --data "$SHAKESPEARE" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --baseline-only ;;
    shk-m4-h50-lr2e-3) run "$1" --data "$SHAKESPEARE" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 --lr 2e-3 ;;
    shk-m4-h50-lr4e-3) run "$1" --data "$SHAKESPEARE" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 --lr 4e-3 ;;
    shk-m4-h50-lr2e-3-olr1) run "$1" --data "$SHAKESPEARE" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 --lr 2e-3 --outer-lr 1 ;;
    shk-m4-base-lr2e-3) run "$1" --data "$SHAKESPEARE" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --baseline-only --baseline-lr 2e-3 ;;
    shk-m4-h50-int8)  run "$1" --data "$SHAKESPEARE" --workers 4 --inner-steps 50 --rounds 50 --eval-every 5 --codec int8 --broadcast-codec int8 ;;
    # The rest of the grid: M in {2, 4, 8} by H in {10, 50, 200}. H=10 runs 250 rounds and
    # shares its baseline with H=50 (2,500 steps either way); H=200 runs 50 rounds (10,000 steps).
    emb-m2-h10-f32)   run "$1" --workers 2 --inner-steps 10 --rounds 250 --eval-every 25 --codec f32 ;;
    emb-m2-h50-f32)   run "$1" --workers 2 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 ;;
    emb-m2-base)      run "$1" --workers 2 --inner-steps 50 --rounds 50 --eval-every 5 --baseline-only ;;
    emb-m2-h200-f32)  run "$1" --workers 2 --inner-steps 200 --rounds 50 --eval-every 5 --codec f32 ;;
    emb-m2-h200-base) run "$1" --workers 2 --inner-steps 200 --rounds 50 --eval-every 5 --baseline-only ;;
    emb-m4-h10-f32)   run "$1" --workers 4 --inner-steps 10 --rounds 250 --eval-every 25 --codec f32 ;;
    emb-m4-h200-f32)  run "$1" --workers 4 --inner-steps 200 --rounds 50 --eval-every 5 --codec f32 ;;
    emb-m4-h200-base) run "$1" --workers 4 --inner-steps 200 --rounds 50 --eval-every 5 --baseline-only ;;
    emb-m8-h10-f32)   run "$1" --workers 8 --inner-steps 10 --rounds 250 --eval-every 25 --codec f32 ;;
    emb-m8-h50-f32)   run "$1" --workers 8 --inner-steps 50 --rounds 50 --eval-every 5 --codec f32 ;;
    emb-m8-base)      run "$1" --workers 8 --inner-steps 50 --rounds 50 --eval-every 5 --baseline-only ;;
    emb-m8-h200-f32)  run "$1" --workers 8 --inner-steps 200 --rounds 50 --eval-every 5 --codec f32 ;;
    emb-m8-h200-base) run "$1" --workers 8 --inner-steps 200 --rounds 50 --eval-every 5 --baseline-only ;;
    --list) sed -n 's/^    \([a-z0-9.-]*\))  *run.*/\1/p' "$0" ;;
    *) echo "unknown experiment $1 (--list lists them)" >&2; exit 2 ;;
    esac
}

[ $# -gt 0 ] || { echo "usage: $0 NAME... | --list" >&2; exit 2; }
for e in "$@"; do experiment "$e"; done
