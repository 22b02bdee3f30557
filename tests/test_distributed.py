"""Two CPU processes under torchrun (gloo): they must stay in step through training, train what one process
training on the same global batch trains, and only rank 0 may write."""

import json
import os
import subprocess
import sys
from pathlib import Path

from planer.arch import BlockSpec
from planer.data import load_corpus
from planer.train.presets import TrainConfig
from planer.train.trainer import train
from tests.conftest import small_arch

ROOT = Path(__file__).resolve().parent.parent
# A plain training run, 4 streams per step: two per process under torchrun, all four in one process. Without the
# balance loss: it is a statistic of each process's half of the batch (as in Switch and DeepSpeed), so with it two
# processes train a slightly different objective than one (1.5e-4 apart in loss after 8 steps).
PLAIN_ARCH = small_arch([BlockSpec.attn(2, 16), BlockSpec.ffn(64), BlockSpec.attn(2, 16), BlockSpec.moe(4, 2, 32)])
PLAIN_RECIPE = TrainConfig(steps=8, batch=4, lr=3e-3, warmup=2, eval_every=8, ckpt_every=8, eval_tokens=4096,
                           test_split=False, aux_weight=0.0)


def test_two_processes_stay_in_step_and_train_as_one_does(baseline_run, text_file, table_file, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "2", str(ROOT / "tests" / "ddp_run.py"), str(baseline_run),
                           str(text_file), str(tmp_path), str(table_file)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    # the same derived networks, and bit-identical weights after every training run, on both processes
    assert set(ranks[0]["trained"]) >= {"distill", "baseline-continued", "plain"}
    assert ranks[0] == ranks[1]
    build = tmp_path / "build"
    assert (build / "model.onnx").is_file() and (build / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "plain", "rank0.json", "rank1.json"]

    # gradients averaged over the two halves of the batch are the whole batch's: one process agrees
    alone = train(load_corpus(f"enwik8:{text_file}"), PLAIN_RECIPE, tmp_path / "alone", arch=PLAIN_ARCH,
                  show_progress=False)
    assert abs(alone["valid"]["loss"] - ranks[0]["plain_loss"]) < 1e-4, (alone["valid"]["loss"], ranks[0])
