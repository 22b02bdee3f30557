"""Every benchmark runs end to end with --smoke, so that none stops working unseen when planer changes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "common")
NEEDS = {"expert_kernel_tiles": "triton", "hf_baseline": "transformers", "kernel_dispatch": "triton",
         "serve_load": "httpx", "trt_dispatch": "tensorrt"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_with_smoke(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    if name == "trt_dispatch" and not torch.cuda.is_available():
        pytest.skip("TensorRT engines need an NVIDIA GPU (CUDA is not available here)")
    # run as documented, from the repository root, so that the script imports benchmarks/common.py
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, f"benchmarks/{name}.py", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # prediction_noise only reads a recorded run; every other benchmark prints what it would record (under its name,
    # or its name and the case it measured, e.g. block_ops-smollm2-b8)
    expected = ("pass 1 alone" if name == "prediction_noise"
                else rf"smoke run of {name}(-[\w.-]+)?, nothing recorded:\n\n")
    found = re.search(expected, done.stdout)
    assert found and done.stdout[found.end():].strip(), done.stdout[-3000:]
