#!/usr/bin/env bash
# The hub's memory while it serves downloads: its peak resident memory during 8 concurrent whole
# downloads of its `small` checkpoint (86 MiB), against its resident memory before them.
#   benchmarks/hub_serve_memory.sh [TESSERA_BINARY]   (Linux: VmHWM, reset through clear_refs)
set -euo pipefail
B=${1:-target/release/tessera}
d=$(mktemp -d)
"$B" hub --model small --rounds 1 --database "sqlite://$d/hub.db" --store "$d/store" --listen 127.0.0.1:0 \
    --addr-file "$d/addr" --key "$d/k.pem" >"$d/log" 2>&1 &
pid=$!
for _ in $(seq 240); do [ -s "$d/addr" ] && break; sleep 0.5; done
url="http://$(cat "$d/addr")"
ck=$(curl -s "$url/v1/run" | python3 -c 'import json,sys; print(json.load(sys.stdin)["checkpoint"])')
sleep 1
echo 5 > /proc/$pid/clear_refs
before=$(awk '/^VmHWM/ {print $2}' /proc/$pid/status)
for i in $(seq 8); do curl -s -o "$d/c$i" "$url/v1/checkpoints/$ck" & done
wait $(jobs -p | grep -v "^$pid$") 2>/dev/null || true
sleep 1
after=$(awk '/^VmHWM/ {print $2}' /proc/$pid/status)
size=$(stat -c %s "$d/c1")
echo "checkpoint $((size/1024/1024)) MiB; hub resident before $((before/1024)) MiB, peak during 8 downloads $((after/1024)) MiB"
kill $pid; wait $pid 2>/dev/null || true
rm -rf "$d"
