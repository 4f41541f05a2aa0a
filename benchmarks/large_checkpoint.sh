#!/usr/bin/env bash
# A Llama-7B-sized f32 checkpoint (6.7 billion parameters, a 27 GB object) written a tensor at
# a time into the S3-compatible server that checks signatures (s3s-fs, from
# scripts/test-services), in multipart parts of 64 MiB, never whole in memory, then read back
# streamed and by range and compared (BLAKE3). Needs about 60 GB free on the disk under
# target/ (s3s-fs keeps the parts until it joins them) and prints the times each way.
#   benchmarks/large_checkpoint.sh   (Linux)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
source scripts/test-services >/dev/null
trap 'stop_test_services' EXIT
export TESSERA_TEST_REQUIRE_SERVICES=1 TESSERA_TEST_CHECKPOINT=7b
/usr/bin/time -v cargo test --release -p tessera-hub --test hub large_checkpoints_round_trip_in_parts -- --nocapture 2>&1 | tee target/large_checkpoint.log |
    grep -E "parameters|test result|panicked|Maximum resident|Elapsed"
