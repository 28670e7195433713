# Sourced by tests/gpu/check.sh and throughput.sh: the interpreter and import path for the GPU
# checks. The project's venv when there is one; else the machine's python3 (the GPU machine has
# torch and transformers) plus the wheels carried in .whl/ (tests/gpu/fetch_wheels.sh makes it),
# installed into /tmp/site when that interpreter lacks them. Nothing is downloaded.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
needs_wheels() { ! "$python" -c 'import pydantic_settings, structlog, imagehash, json_repair, xgrammar, pyvips, pillow_heif' 2>/dev/null; }
if needs_wheels && ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
