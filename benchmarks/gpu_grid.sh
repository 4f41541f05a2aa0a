#!/usr/bin/env bash
# The DiLoCo grid on one CUDA GPU, every experiment its own process, several at once (the
# nano model leaves a GPU mostly idle, so runs share it well), each stopped after SECONDS.
#
#   GRID_OUT=DIR benchmarks/gpu_grid.sh SECONDS [NAME...]
#
# Default NAMEs: the whole grid in order of priority. Logs go next to the results (NAME.log).
# Environment as for diloco_grid.sh, plus GRID_JOBS (runs at once, default 9).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -ge 1 ] || { echo "usage: GRID_OUT=DIR $0 SECONDS [NAME...]" >&2; exit 2; }
budget=$1; shift
export GRID_DEVICE=${GRID_DEVICE:-cuda} GRID_THREADS=${GRID_THREADS:-1}
out=${GRID_OUT:?set GRID_OUT to the results folder}
mkdir -p "$out"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    names=(emb-m4-h50-f32 emb-m4-base emb-m4-h200-f32 emb-m4-h200-base emb-m8-h50-f32 emb-m8-base
           emb-m4-h10-f32 emb-m2-h50-f32 emb-m2-base emb-m4-h50-int8 emb-m4-h50-int4 emb-m4-h50-topk100
           shk-m4-h50-f32 shk-m4-base shk-m4-h50-int8 emb-m2-h10-f32 emb-m8-h10-f32
           emb-m2-h200-f32 emb-m2-h200-base emb-m8-h200-f32 emb-m8-h200-base)
fi
deadline=$(( $(date +%s) + budget ))
one() {
    local left=$(( deadline - $(date +%s) ))
    [ "$left" -gt 20 ] || { echo "$1: not started (no time left)" >&2; return 0; }
    local start=$(date +%s)
    timeout -s INT "$left" benchmarks/diloco_grid.sh "$1" >"$out/$1.log" 2>&1
    echo "$1: exit $? after $(( $(date +%s) - start )) s" >&2
}
export -f one; export deadline out
printf '%s\n' "${names[@]}" | xargs -P "${GRID_JOBS:-9}" -I{} bash -c 'one {}'
