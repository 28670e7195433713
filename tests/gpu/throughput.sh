#!/usr/bin/env bash
# GPU throughput check (tests/gpu/throughput.py): a random-weight model of Qwen2.5-VL-3B's size,
# batched through the real pipeline. Nothing is downloaded. On a machine without the project's
# pure-Python dependencies, carry their wheels in .whl/ (tests/gpu/fetch_wheels.sh makes it):
# they are installed into /tmp/site, beside the machine's own torch and transformers, when the
# interpreter lacks them.
#   tests/gpu/throughput.sh                                   # cuda, batch 1,4,8,16
#   tests/gpu/throughput.sh --device cpu --tiny --batches 1,2 --pairs-per-batch 1
set -euo pipefail
cd "$(dirname "$0")/../.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
needs_wheels() { ! "$python" -c 'import pydantic_settings, structlog, imagehash, json_repair, xgrammar' 2>/dev/null; }
if needs_wheels && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
exec "$python" -m tests.gpu.throughput "$@"
