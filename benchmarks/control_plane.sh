#!/usr/bin/env bash
# The control plane at scale: C simulated contributors (each its own key, the real request
# sequence, `tiny`'s small messages) against R `tessera hub` processes on one PostgreSQL
# database and one S3-compatible bucket that checks signatures (from scripts/test-services),
# arriving over SPREAD seconds of each round; replica 1 is killed (SIGKILL) once half of round
# 1's submissions are in, and its contributors move to the next replica. Prints the
# benchmark's latencies and counts, and every process's CPU time.
#   benchmarks/control_plane.sh [TESSERA_BINARY] [CONTRIBUTORS] [REPLICAS] [SPREAD]
#   (Linux; defaults: target/release/tessera 10000 3 120)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-target/release/tessera}
C=${2:-10000}
R=${3:-3}
SPREAD=${4:-120}
source scripts/test-services >/dev/null
d=$(mktemp -d)
pids=()
trap 'kill ${pids[@]} 2>/dev/null || true; stop_test_services; rm -rf "$d"' EXIT
psql=$(ls /usr/lib/postgresql/*/bin/psql | tail -1)
db="${TESSERA_TEST_POSTGRES%/*}/control_plane"
"$psql" "$TESSERA_TEST_POSTGRES" -qc "CREATE DATABASE control_plane"
cpu() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
for r in $(seq 0 $((R - 1))); do
    "$B" hub --model tiny --rounds 3 --quorum "$C" --codec int8 --inner-steps 1 --deadline 3600 \
        --database "$db" --store "$TESSERA_TEST_S3/control-plane" --key "$d/hub-key.pem" \
        --listen 127.0.0.1:0 --addr-file "$d/addr$r" >"$d/hub$r.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 600); do [ -s "$d/addr$r" ] && break; sleep 0.5; done
done
urls=()
for r in $(seq 0 $((R - 1))); do urls+=(--hub "http://$(cat "$d/addr$r")"); done
pg_cpu() { local t=0; for p in $(pgrep -x postgres); do t=$(python3 -c "print($t + $(cpu $p))"); done; echo "$t"; }
s3_cpu() { cpu "$(pgrep -x s3s-fs | head -1)"; }
pg0=$(pg_cpu); s30=$(s3_cpu)
"$B" bench swarm "${urls[@]}" --contributors "$C" --rounds 3 --spread "$SPREAD" --database "$db" &
bench=$!
# Replica 1 dies once half of round 1 is in.
url1="http://$(cat "$d/addr1")"
killed_cpu=""
while kill -0 $bench 2>/dev/null; do
    # Its own acceptances: about C/R a round, so half of round 1 is in at 1.5 C/R.
    n=$(curl -s "$url1/metrics" | awk -F' ' '/^tessera_hub_submissions_total\{outcome="accepted"\}/ {print int($2)}')
    if [ "${n:-0}" -ge $((3 * C / (2 * R))) ]; then
        killed_cpu=$(cpu "${pids[1]}")
        kill -9 "${pids[1]}"
        echo "killed replica 1 (SIGKILL) after it accepted $n submissions (half of its round-1 share)"
        break
    fi
    sleep 0.2
done
wait $bench
for r in $(seq 0 $((R - 1))); do
    if [ "$r" = 1 ] && [ -n "$killed_cpu" ]; then
        echo "replica $r: $killed_cpu s CPU until it was killed"
    else
        echo "replica $r: $(cpu "${pids[$r]}") s CPU, peak resident $(awk '/^VmHWM/ {print int($2/1024)}' /proc/${pids[$r]}/status) MiB"
    fi
done
echo "PostgreSQL: $(python3 -c "print(round($(pg_cpu) - $pg0, 1))") s CPU; s3s-fs: $(python3 -c "print(round($(s3_cpu) - $s30, 1))") s CPU"
