from __future__ import annotations

import bz2
from pathlib import Path

import pytest
import torch

from planer.arch import Architecture, BlockSpec
from planer.data.corpus import sample_path


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
