#!/usr/bin/env bash
# Every GPU check of the project, in one run of at most ten minutes: run it first whenever a GPU
# is lent. Each step has its own time limit and writes its results under $OUT; a step that fails
# or runs out of time is recorded in $OUT/summary.txt and the next one still runs.
#
#   OUT=DIR benchmarks/gpu.sh [TESSERA_BINARY]      (default target/release/tessera)
#
# Needs the machine's own CUDA PyTorch importable by python3 (the binary, built against the same
# PyTorch version on a CPU machine, is pointed at its libraries) and nvidia-smi.
#
#  1. gpu.txt              the GPU, driver and CUDA version; doctor.json (`tessera doctor`)
#  2. train-PRESET.jsonl   `tessera bench train --device cuda`: tokens/s, MFU (of the dense bf16
#                          peak), host RSS, for nano, micro, small (at their context) and phase1,
#                          phase2 (at their phase's micro-batch and sequence);
#                          train-PRESET.gpu-mib the GPU memory peak while it ran (nvidia-smi)
#  3. pytorch-phase1.txt   benchmarks/train_pytorch.py: phase1 at 4 × 2048, Tessera against eager
#                          PyTorch and torch.compile on the same model and batch
#  4. swarm-phase1/        a short phase-1 run (`tessera hub --phase 1`) with two contributors on
#                          this one GPU: hub and contributor logs and reports, GPU memory peak
#  5. serve.txt            scripts/bench_serve.py: serving throughput on the GPU
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
B=$(realpath "${1:-target/release/tessera}")
OUT=$(realpath -m "${OUT:-out}")
mkdir -p "$OUT"
TORCH_LIB="$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
summary="$OUT/summary.txt"
: >"$summary"
began=$(date +%s)

# step NAME SECONDS COMMAND…: runs COMMAND (a program or a function of this script) with a time
# limit, records its exit status and seconds. The limits add up to 570 s.
step() {
    local name=$1 limit=$2
    shift 2
    local t0 rc
    t0=$(date +%s)
    timeout --signal=INT --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@"
    rc=$?
    echo "$name rc=$rc $(($(date +%s) - t0))s" | tee -a "$summary"
}

# gpu_peak FILE COMMAND…: runs COMMAND while sampling the GPU's used memory; the peak (MiB) to FILE.
gpu_peak() {
    local file=$1
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$file.samples" 2>/dev/null &
    local smi=$!
    "$@"
    local rc=$?
    kill "$smi" 2>/dev/null
    wait "$smi" 2>/dev/null
    sort -n "$file.samples" | tail -1 >"$file"
    rm -f "$file.samples"
    return $rc
}

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nvidia-smi | grep -o "CUDA Version: [0-9.]*"
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} >"$OUT/gpu.txt" 2>&1
export B OUT
export -f gpu_peak
step doctor 15 sh -c "'$B' doctor --device cuda --json >'$OUT/doctor.json' 2>&1"

# 2. Throughput and MFU per preset, at the batch and sequence its phase trains at.
for spec in nano:12:64:25 micro:12:256:25 small:12:512:35 phase1:4:2048:60 phase2:2:4096:80; do
    IFS=: read -r model batch seq limit <<<"$spec"
    step "train-$model" "$limit" gpu_peak "$OUT/train-$model.gpu-mib" sh -c \
        "'$B' bench train --device cuda --models $model --batch-size $batch --seq-len $seq --steps 20 --warmup 5 \
         --json >'$OUT/train-$model.jsonl' 2>&1"
done

# 3. Side by side with PyTorch, eager and compiled.
step pytorch-phase1 150 sh -c "python3 benchmarks/train_pytorch.py --tessera '$B' --device cuda --models phase1 \
    --batch-size 4 --seq-len 2048 --steps 20 --warmup 5 --rounds 1 --compile >'$OUT/pytorch-phase1.txt' 2>&1"

# 4. A phase-1 run on real text (this repository's documentation, tokenized with a BPE trained on
#    it): two contributors sharing the GPU, two rounds of H = 20.
swarm() {
    local d="$OUT/swarm-phase1" w
    w=$(mktemp -d)
    mkdir -p "$d"
    # One document per paragraph, so that both splits get some.
    python3 - "$w/docs.jsonl" README.md ARCHITECTURE.md docs/*.md <<'PY'
import json, sys
with open(sys.argv[1], "w", encoding="utf-8") as out:
    for path in sys.argv[2:]:
        for i, p in enumerate(open(path, encoding="utf-8").read().split("\n\n")):
            if p.strip():
                out.write(json.dumps({"id": f"{path}#{i}", "text": p.strip()}) + "\n")
PY
    "$B" tokenizer train --data "$w/docs.jsonl" --vocab 4096 --out "$w/tokenizer.json" >"$d/prepare.log" 2>&1 &&
        "$B" data prepare "$w/docs.jsonl" --tokenizer "$w/tokenizer.json" --out "$w/dataset" --shard-tokens 20000 \
            --validation-per-mille 100 >>"$d/prepare.log" 2>&1 || return 1
    "$B" hub --phase 1 --data "$w/dataset" --inner-steps 20 --rounds 2 --quorum 2 --data-slots 2 --warmup-steps 5 \
        --print-spec | sed 's/^scored = true$/scored = false/' >"$d/run.toml"
    "$B" hub --spec "$d/run.toml" --database "sqlite://$w/hub.db" --store "$w/store" --listen 127.0.0.1:0 \
        --addr-file "$w/addr" --key "$w/hub.pem" >"$d/hub.log" 2>&1 &
    local hub=$!
    for _ in $(seq 240); do [ -s "$w/addr" ] && break; sleep 0.5; done
    local url="http://$(cat "$w/addr")" pids=() rc=0
    for c in a b; do
        "$B" contribute --hub "$url" --device cuda --state-dir "$w/$c" --name "$c" --report "$d/$c.jsonl" \
            >"$d/$c.log" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    kill -INT "$hub" 2>/dev/null
    wait "$hub" 2>/dev/null
    rm -rf "$w"
    return $rc
}
export -f swarm
step swarm-phase1 120 gpu_peak "$OUT/swarm-phase1.gpu-mib" swarm

# 5. Serving.
step serve 60 sh -c "TESSERA_BIN='$B' python3 scripts/bench_serve.py --device cuda --repeats 2 >'$OUT/serve.txt' 2>&1"

echo "total $(($(date +%s) - began))s" | tee -a "$summary"
