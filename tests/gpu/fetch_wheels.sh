#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (it has torch and transformers, Python 3.12)
# into .whl/ for tests/gpu/throughput.sh and check.sh. One version of each, no dependencies
# resolved by pip: the list names them all.
set -euo pipefail
cd "$(dirname "$0")/../.."
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
pkgs=(pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types
      structlog watchdog boto3 botocore s3transfer jmespath imagehash PyWavelets json-repair
      minio argon2-cffi argon2-cffi-bindings pycryptodome xgrammar apache-tvm-ffi)
for name in "${pkgs[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl "$name" \
    || python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "$name"
done
ls .whl
