#!/usr/bin/env bash
# The data plane through the bucket: N submissions of a ~100M-parameter model at int8, uploaded
# straight into an S3-compatible server that checks signatures (s3s-fs, from
# scripts/test-services), committed to one `tessera hub` process, which reads each back and
# checks it. With WORKERS=0 the hub (on SQLite) sums them on arrival; with WORKERS ≥ 1 the hub
# (on PostgreSQL, --aggregate-shards 4) hands the round to that many `tessera aggregate-worker`
# processes, which range-read every submission's slices from the bucket. Prints the hub's
# resident memory as the submissions arrive (it must not grow with them), its peak, the round's
# timings and each worker job's bytes/s against memcpy measured in the same worker. RULE is the
# run's aggregation: under a robust one (median, centered-clip, …) the hub or the workers read
# the submissions back a piece at a time at close (--aggregate-memory MIB, default 256).
#   benchmarks/data_plane.sh [TESSERA_BINARY] [SUBMISSIONS] [WORKERS] [RULE] [MIB]
#   (Linux; defaults 64, 0, mean, 256)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-target/release/tessera}
N=${2:-64}
W=${3:-0}
RULE=${4:-mean}
MIB=${5:-256}
source scripts/test-services >/dev/null
d=$(mktemp -d)
workers=()
trap 'kill $pid $sampler ${workers[@]} 2>/dev/null || true; stop_test_services; rm -rf "$d"' EXIT
db="sqlite://$d/hub.db"
sharding=()
if [ "$W" -gt 0 ]; then
    psql=$(ls /usr/lib/postgresql/*/bin/psql | tail -1)
    "$psql" "$TESSERA_TEST_POSTGRES" -qc "CREATE DATABASE data_plane"
    db="${TESSERA_TEST_POSTGRES%/*}/data_plane"
    sharding=(--aggregate-shards 4)
fi
# 14 layers of width 768 (12 heads, FFN 2048) and a 66-token vocabulary: 99M parameters.
cat >"$d/model.json" <<JSON
{"model_type": "llama", "vocab_size": 66, "hidden_size": 768, "intermediate_size": 2048,
 "num_hidden_layers": 14, "num_attention_heads": 12, "num_key_value_heads": 12,
 "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}
JSON
"$B" hub -v --model "$d/model.json" --rounds 1 --quorum "$N" --codec int8 --deadline 3600 \
    --aggregation "$RULE" --aggregate-memory "$MIB" --database "$db" --store "$TESSERA_TEST_S3/data-plane-$$" \
    "${sharding[@]}" \
    --listen 127.0.0.1:0 --addr-file "$d/addr" --key "$d/k.pem" >"$d/hub.log" 2>&1 &
pid=$!
for _ in $(seq 600); do [ -s "$d/addr" ] && break; sleep 0.5; done
for w in $(seq "$W"); do
    "$B" aggregate-worker -v --database "$db" --store "$TESSERA_TEST_S3/data-plane-$$" --name "w$w" \
        >"$d/worker$w.log" 2>&1 &
    workers+=($!)
done
url="http://$(cat "$d/addr")"
# Resident memory against submissions accepted so far, twice a second.
(
    while kill -0 $pid 2>/dev/null; do
        n=$(curl -s "$url/metrics" | awk '/^tessera_hub_submissions_total\{outcome="accepted"\}/ {print int($2)}')
        echo "$(date +%s.%N) ${n:-0} $(awk '/^VmRSS/ {print $2}' /proc/$pid/status)"
        sleep 0.5
    done
) >"$d/rss" &
sampler=$!
start=$(date +%s.%N)
"$B" bench swarm --hub "$url" --contributors "$N" --rounds 1 --in-flight 2 | grep -v "^| assignment"
end=$(date +%s.%N)
sleep 1
peak=$(awk '/^VmHWM/ {print $2}' /proc/$pid/status)
python3 - "$d/rss" "$N" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if len(l.split()) == 3 and l.split()[1] != "-"]
n = int(sys.argv[2])
print("| submissions accepted | hub resident memory |")
print("|---:|---:|")
for k in sorted({0, n // 4, n // 2, 3 * n // 4, n}):
    # The most it held while this many were in (and before the next came).
    at = [int(r[2]) for r in rows if int(r[1]) == k] or [int(r[2]) for r in rows if int(r[1]) <= k][-1:]
    if at:
        print(f"| {k} | {max(at) / 1024:.0f} MiB |")
PY
echo "hub peak resident memory $((peak / 1024)) MiB; $N submissions in $(python3 -c "print(f'{$end - $start:.1f}')") s"
sed 's/\x1b\[[0-9;]*m//g' "$d/hub.log" | grep -E "aggregated by workers|robust aggregation|round published" | tail -3 | cut -c1-240 || true
if [ "$W" -gt 0 ]; then
    echo "| worker | jobs | bytes read | seconds | GB/s | memcpy GB/s | peak RSS |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for w in $(seq "$W"); do
        peak_w=$(awk '/^VmHWM/ {print $2}' "/proc/${workers[$((w - 1))]}/status")
        sed 's/\x1b\[[0-9;]*m//g' "$d/worker$w.log" | python3 -c '
import re, sys
jobs = [dict(re.findall(r"(\w+)=([0-9.e+-]+)", l)) for l in sys.stdin if "aggregation job done" in l]
b = sum(float(j["bytes"]) for j in jobs); s = sum(float(j["seconds"]) for j in jobs)
m = max((float(j["memcpy_gb_per_s"]) for j in jobs), default=0)
print(f"| w'"$w"' | {len(jobs)} | {b / 1e9:.2f} GB | {s:.1f} | {b / s / 1e9 if s else 0:.3f} | {m:.1f} | '"$((peak_w / 1024))"' MiB |")'
    done
fi
