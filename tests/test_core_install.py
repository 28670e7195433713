"""The core install has no torch: a fresh virtualenv with ``pip install`` of the project (no
extras) runs the README's main job, and asking it for the VL comparator is a configuration error
that names the extra. pip reuses the wheels of the machine's pip cache / local index."""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_core_install_without_torch_runs_the_main_job(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # A copy of the sources: the build must not leave anything behind in the checkout.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "artifacts", "__pycache__", "*.egg-info"),
    )
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(source)], check=True, env=env, timeout=600
    )
    probe = subprocess.run([str(python), "-c", "import torch"], env=env, capture_output=True)
    assert probe.returncode != 0  # the core install really has no torch

    examples = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", examples)
    pairwatch = str(env_dir / "bin" / "pairwatch")
    watch = subprocess.run(
        [pairwatch, "watch", str(examples), "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert watch.returncode == 0, watch.stderr
    assert sorted(p.parent.name for p in examples.rglob("result.json"))

    images = sorted(p for p in examples.rglob("*.jpg"))[:2]
    vl = subprocess.run(
        [pairwatch, "compare", *map(str, images), "--comparator", "vl", "--model", "/models/x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert vl.returncode == 2
    assert "pip install 'pairwatch[vl]'" in vl.stderr and "torch" in vl.stderr
    assert "Traceback" not in vl.stderr
