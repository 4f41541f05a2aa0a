#!/usr/bin/env bash
# The arena's scenarios on one CUDA GPU, each its own process, several at once (the nano model
# leaves a GPU mostly idle), each stopped after SECONDS. Results: $ARENA_OUT/NAME.jsonl + .log.
#
#   ARENA_OUT=DIR TESSERA_BIN=… benchmarks/arena_gpu.sh SECONDS [NAME...]
#
# Extra arena flags go in ARENA_FLAGS (e.g. "--rounds 15 --inner-steps 20").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -ge 1 ] || { echo "usage: ARENA_OUT=DIR $0 SECONDS [NAME...]" >&2; exit 2; }
budget=$1; shift
out=${ARENA_OUT:?set ARENA_OUT to the results folder}
bin=${TESSERA_BIN:-target/release/tessera}
mkdir -p "$out"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    names=(honest-plain honest scale-mean noise-mean mixed nan noise sign-flip scale alie ipm zero lazy
           stale replay wrong-data copy copy-noise)
fi
deadline=$(( $(date +%s) + budget ))
one() {
    local left=$(( deadline - $(date +%s) ))
    [ "$left" -gt 20 ] || { echo "$1: not started (no time left)" >&2; return 0; }
    local start=$(date +%s)
    # shellcheck disable=SC2086
    timeout -s INT "$left" "$bin" bench arena --device cuda --threads 1 --scenarios "$1" \
        --json-out "$out/$1.jsonl" ${ARENA_FLAGS:-} >"$out/$1.log" 2>&1
    echo "$1: exit $? after $(( $(date +%s) - start )) s" >&2
}
export -f one; export deadline out bin
printf '%s\n' "${names[@]}" | xargs -P "${ARENA_JOBS:-9}" -I{} bash -c 'one {}'
