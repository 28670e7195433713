#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (it has torch, transformers, numpy, pillow,
# scipy and scikit-image for Python 3.12) into .whl/ for tests/gpu/throughput.sh and check.sh.
# One version of each, no dependencies resolved by pip: the list names them all.
#   tests/gpu/fetch_wheels.sh                      # Python 3.12 wheels into .whl/
#   PY=3.11 DEST=/tmp/whl tests/gpu/fetch_wheels.sh  # the same set for a local rehearsal
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PY:-3.12}
dest=${DEST:-.whl}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
pkgs=(pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types
      structlog watchdog boto3 botocore s3transfer jmespath imagehash PyWavelets json-repair
      minio argon2-cffi argon2-cffi-bindings pycryptodome xgrammar apache-tvm-ffi
      pyvips-binary cffi pycparser pillow-heif)
for name in "${pkgs[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
        --implementation cp "${platforms[@]}" -d "$dest" "$name" \
    || python3 -m pip download -q --no-deps --only-binary=:all: -d "$dest" "$name"
done
# pyvips 3 is published as an sdist only; its wheel is pure Python (libvips comes from
# pyvips-binary), so it is built here once.
python3 -m pip wheel -q --no-deps -w "$dest" "pyvips>=3.0"
ls "$dest"
