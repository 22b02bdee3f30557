"""Two CPU processes under torchrun (gloo): they must stay in step and only rank 0 may write."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_two_processes_agree_and_rank0_writes(baseline_run, text_file, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "2", str(ROOT / "tests" / "ddp_run.py"), str(baseline_run),
                           str(text_file), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0] == ranks[1]  # the same derived networks and bit-identical weights on both processes
    build = tmp_path / "build"
    assert (build / "model.onnx").is_file() and (build / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "rank0.json", "rank1.json"]
