from __future__ import annotations

import bz2
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from planer.arch import Architecture, BlockSpec
from planer.data.corpus import sample_path


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA is not available here)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def run_compiled(code: str) -> str:
    """Run `code` in a fresh Python with Triton compiling (for the GPU), and return what it printed: the kernel
    tests' modules ask for Triton's CPU interpreter when imported, and Triton reads that once, per kernel."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def routed_moe(activation: str, bias: bool, experts: int, top_k: int, tokens: int = 37, skew: bool = False,
               d_model: int = 24):
    """A small MoE layer (width 40) and its input; with `skew`, every token's first choice is expert 0 and its
    second expert 1 (with a real gate), and the other experts get no token."""
    from planer.nn.moe import MoE

    torch.manual_seed(0)
    moe = MoE(d_model, experts, top_k, 40, activation, bias).eval()
    x = torch.randn(tokens, d_model)
    if skew:
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[0] = 0.1
            moe.router.weight[1] = 0.06
        x = x.abs()
    return moe, x


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def small_arch(blocks=None, **kw) -> Architecture:
    """A network small enough to train for a few steps inside a test."""
    if blocks is None:
        blocks = [BlockSpec.attn(2, 16), BlockSpec.ffn(64), BlockSpec.attn(2, 16), BlockSpec.moe(4, 2, 32)]
    base = dict(d_model=32, vocab_size=256, blocks=tuple(blocks), tgt_len=16, mem_len=16)
    base.update(kw)
    return Architecture(**base).validate()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """The first 200 kB of the bundled sample as an enwik8-format file."""
    path = tmp_path_factory.mktemp("data") / "enwik8_head"
    path.write_bytes(bz2.decompress(sample_path().read_bytes())[:200_000])
    return path


@pytest.fixture(scope="session")
def table_file(tmp_path_factory) -> Path:
    """Where the build tests keep their latency table: the first build profiles it, the later ones (the
    processes of the distributed build too) reuse its entries instead of timing every block again."""
    return tmp_path_factory.mktemp("tables") / "latency_table.json"


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory, text_file) -> Path:
    """A micro baseline run directory (two training steps), for the build tests."""
    from planer.data import load_corpus
    from planer.train.presets import TrainConfig
    from planer.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "base"
    arch = small_arch([BlockSpec.attn(4, 16), BlockSpec.ffn(1024), BlockSpec.attn(4, 16), BlockSpec.ffn(1024)],
                      d_model=64, tgt_len=64, mem_len=64)
    cfg = TrainConfig(steps=2, batch=2, eval_every=2, ckpt_every=2, eval_tokens=256)
    train(load_corpus(f"enwik8:{text_file}"), cfg, out, arch=arch, show_progress=False)
    return out
