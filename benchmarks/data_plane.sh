#!/usr/bin/env bash
# The data plane through the bucket: N submissions of a ~100M-parameter model at int8, uploaded
# straight into an S3-compatible server that checks signatures (s3s-fs, from
# scripts/test-services), committed to one `tessera hub` process, which reads each back, checks
# it and sums it on arrival. Prints the hub's resident memory as the submissions arrive (it must
# not grow with them), its peak, and the round's timings.
#   benchmarks/data_plane.sh [TESSERA_BINARY] [SUBMISSIONS]   (Linux; default 64)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-target/release/tessera}
N=${2:-64}
source scripts/test-services >/dev/null
d=$(mktemp -d)
trap 'kill $pid $sampler 2>/dev/null || true; stop_test_services; rm -rf "$d"' EXIT
# 14 layers of width 768 (12 heads, FFN 2048) and a 66-token vocabulary: 99M parameters.
cat >"$d/model.json" <<JSON
{"model_type": "llama", "vocab_size": 66, "hidden_size": 768, "intermediate_size": 2048,
 "num_hidden_layers": 14, "num_attention_heads": 12, "num_key_value_heads": 12,
 "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}
JSON
"$B" hub --model "$d/model.json" --rounds 1 --quorum "$N" --codec int8 --deadline 3600 \
    --database "sqlite://$d/hub.db" --store "$TESSERA_TEST_S3/data-plane-$$" \
    --listen 127.0.0.1:0 --addr-file "$d/addr" --key "$d/k.pem" >"$d/hub.log" 2>&1 &
pid=$!
for _ in $(seq 600); do [ -s "$d/addr" ] && break; sleep 0.5; done
url="http://$(cat "$d/addr")"
# Resident memory against submissions accepted so far, twice a second.
(
    while kill -0 $pid 2>/dev/null; do
        n=$(curl -s "$url/v1/status" | python3 -c 'import json,sys; h=json.load(sys.stdin)["history"]; print(h[0]["accepted"] if h else 0)' 2>/dev/null || echo -)
        echo "$(date +%s.%N) $n $(awk '/^VmRSS/ {print $2}' /proc/$pid/status)"
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
for k in sorted({0, n // 4, n // 2, 3 * n // 4, n - 1}):
    at = [int(r[2]) for r in rows if int(r[1]) == k]
    if at:
        print(f"| {k} | {max(at) / 1024:.0f} MiB |")
PY
echo "hub peak resident memory $((peak / 1024)) MiB; $N submissions in $(python3 -c "print(f'{$end - $start:.1f}')") s"
grep -E "aggregation|round published" "$d/hub.log" | tail -2 | cut -c1-200 || true
