#!/usr/bin/env bash
# GPU device check for the VL comparator: builds the tiny Qwen2-VL, runs it on CUDA and prints
# pairs/second and peak GPU memory for inputs from 1 to 100 megapixels; exits 1 if the peak
# grows with input size. Nothing is downloaded; see env.sh for the carried wheels.
#   tests/gpu/check.sh                      # cuda, 1,4,12,25,50,100 MP, 5 pairs each
#   tests/gpu/check.sh --sizes 1,100 --pairs 20
#   tests/gpu/check.sh --device cpu --sizes 1,4 --pairs 1   # the script itself, no GPU
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$python" -m tests.gpu.check "$@"
