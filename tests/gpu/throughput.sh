#!/usr/bin/env bash
# GPU throughput check (tests/gpu/throughput.py): a random-weight model of Qwen2.5-VL-3B's size,
# batched through the real pipeline. Nothing is downloaded; see env.sh for the carried wheels.
#   tests/gpu/throughput.sh                                   # cuda, batch 1,4,8,16
#   tests/gpu/throughput.sh --device cpu --tiny --batches 1,2 --pairs-per-batch 1
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$python" -m tests.gpu.throughput "$@"
