"""Two CPU processes under torchrun (gloo): they must stay in step through training, take the step one process
takes on the same global batch, train what it trains, and only rank 0 may write."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector

from planer import distributed
from planer.arch import BlockSpec
from planer.data import Corpus, Segments, load_corpus
from planer.nn import LM
from planer.train.presets import TrainConfig
from planer.train.trainer import _step, train
from tests.conftest import small_arch

ROOT = Path(__file__).resolve().parent.parent
# A plain training run, 4 streams per step: two per process under torchrun, all four in one process. Without the
# balance loss: it is a statistic of each process's half of the batch (as in Switch and DeepSpeed), so with it two
# processes train a slightly different objective than one (1.5e-4 apart in loss after 8 steps).
PLAIN_ARCH = small_arch([BlockSpec.attn(2, 16), BlockSpec.ffn(64), BlockSpec.attn(2, 16), BlockSpec.moe(4, 2, 32)])
PLAIN_RECIPE = TrainConfig(steps=8, batch=4, lr=3e-3, warmup=2, eval_every=8, ckpt_every=8, eval_tokens=4096,
                           test_split=False, aux_weight=0.0)


def sgd_update(corpus: Corpus) -> torch.Tensor:
    """How far one training step (planer.train.trainer._step) moves PLAIN_ARCH's parameters from their start, with
    plain SGD at rate 1 and no clipping, on this process's share of PLAIN_RECIPE's first batch: minus the gradient
    itself. AdamW normalises a gradient's scale away and clipping caps it, so only such a step shows processes that
    summed their gradients instead of averaging them (they move twice as far as one process)."""
    torch.manual_seed(PLAIN_RECIPE.seed)
    model = LM(PLAIN_ARCH)
    distributed.same_start(model)
    before = parameters_to_vector(model.parameters()).detach().clone()
    x, y = Segments(corpus.train, PLAIN_RECIPE.batch, PLAIN_ARCH.tgt_len, distributed.share(PLAIN_RECIPE.batch))[0]
    _step(model, torch.optim.SGD(model.parameters()), x, y, None, None, None, None, 1.0,
          replace(PLAIN_RECIPE, clip=math.inf))
    return parameters_to_vector(model.parameters()).detach() - before


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "plain", "rank0.json", "rank1.json",
                                                          "sgd_update.pt"]

    # gradients averaged over the two halves of the batch are the whole batch's: one process takes the same step
    corpus = load_corpus(f"enwik8:{text_file}")
    together, alone_step = torch.load(tmp_path / "sgd_update.pt"), sgd_update(corpus)
    assert float((together - alone_step).norm() / alone_step.norm()) < 1e-5
    # and trains the same network
    alone = train(corpus, PLAIN_RECIPE, tmp_path / "alone", arch=PLAIN_ARCH, show_progress=False)
    assert abs(alone["valid"]["loss"] - ranks[0]["plain_loss"]) < 1e-4, (alone["valid"]["loss"], ranks[0])
