"""The engine-side evaluator against the PyTorch one: same protocol, same score, on exported graphs."""

import numpy as np
import pytest
import torch

from planer.arch import BlockSpec
from planer.data import load_corpus
from planer.export import export_lm
from planer.nn import LM
from planer.runtime import EngineError, evaluate_engine, load_engine
from planer.train.evaluate import evaluate
from tests.conftest import small_arch

BATCH, TGT_LEN = 4, 16
# Streams of 647 tokens: 40 full segments, then one of 6 tokens; the last 3 tokens fill no stream.
TOKENS = BATCH * (40 * TGT_LEN + 7) + 3
ATTN, FFN = BlockSpec.attn(2, 16), BlockSpec.ffn(64)
NETWORKS = {
    "relative": small_arch([ATTN, FFN, ATTN, FFN]),
    "moe": small_arch([ATTN, BlockSpec.moe(4, 2, 32), ATTN, FFN]),
    "rotary": small_arch([ATTN, FFN, ATTN, FFN], pos="rotary"),
}


@pytest.fixture(scope="module")
def corpus(text_file):
    return load_corpus(f"enwik8:{text_file}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each network of NETWORKS, randomly initialised and exported once: (model, ONNX Runtime engine)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = LM(NETWORKS[name]).eval()
            with torch.no_grad():  # planer's init (std 0.02) leaves the memory moving the loss by ~1e-5 only
                for p in model.parameters():
                    if p.dim() >= 2:
                        p.normal_(0, 0.2)
            path = export_lm(model, tmp_path_factory.mktemp(name) / "m.onnx")
            cache[name] = model, load_engine("ort", str(path), threads=2)
        return cache[name]

    return get


@pytest.mark.parametrize("name", NETWORKS)
def test_engine_scores_like_pytorch(corpus, exported, name):
    model, engine = exported(name)
    data = corpus.valid[:TOKENS]
    mem_len = model.arch.mem_len
    want = evaluate(model, data, corpus.unit, batch=BATCH, tgt_len=TGT_LEN, mem_len=mem_len)
    got = evaluate_engine(engine, data, corpus.unit, d_model=model.arch.d_model, batch=BATCH, tgt_len=TGT_LEN,
                          mem_len=mem_len)
    assert got.keys() == want.keys() == {"loss", "bpc", "tokens"}
    assert got["tokens"] == want["tokens"] == BATCH * 646
    assert abs(got["loss"] - want["loss"]) < 1e-4
    assert abs(got["bpc"] - want["bpc"]) < 1e-4
    # The memory must matter more than the tolerance, or a broken memory would pass.
    forgetful = evaluate(model, data, corpus.unit, batch=BATCH, tgt_len=TGT_LEN, mem_len=0)
    assert abs(forgetful["loss"] - want["loss"]) > 1e-3


def test_max_tokens_stops_like_pytorch(corpus, exported):
    model, engine = exported("relative")
    data = corpus.valid[:TOKENS]
    kw = dict(batch=BATCH, tgt_len=TGT_LEN, mem_len=model.arch.mem_len, max_tokens=100)
    want = evaluate(model, data, corpus.unit, **kw)
    got = evaluate_engine(engine, data, corpus.unit, d_model=model.arch.d_model, **kw)
    assert got["tokens"] == want["tokens"] == 2 * BATCH * TGT_LEN
    assert abs(got["loss"] - want["loss"]) < 1e-4


def test_memory_shorter_than_exported_and_refused_longer(corpus, exported):
    model, engine = exported("relative")
    data = corpus.valid[:TOKENS]
    want = evaluate(model, data, corpus.unit, batch=BATCH, tgt_len=TGT_LEN, mem_len=5)
    got = evaluate_engine(engine, data, corpus.unit, d_model=model.arch.d_model, batch=BATCH, tgt_len=TGT_LEN,
                          mem_len=5)
    assert abs(got["loss"] - want["loss"]) < 1e-4
    with pytest.raises(EngineError, match="keeps 16 positions of memory where 20 were asked"):
        evaluate_engine(engine, data, corpus.unit, d_model=model.arch.d_model, batch=BATCH, tgt_len=TGT_LEN,
                        mem_len=20)


def test_too_few_tokens_for_the_streams():
    with pytest.raises(ValueError, match="too few for 8 streams"):
        evaluate_engine(None, np.zeros(15, np.int64), "byte", d_model=32, tgt_len=16, mem_len=16)
