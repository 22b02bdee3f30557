"""The TensorRT engine: its optimisation profile and deployment rules everywhere; building, running and
parity on a machine with an NVIDIA GPU and TensorRT (skipped elsewhere, with the reason)."""

import importlib.util

import numpy as np
import pytest
import torch

from planer.arch import BlockSpec
from planer.deployment import Deployment
from planer.errors import PlanerError
from planer.export import export_block, export_lm
from planer.nn import LM
from planer.runtime import EngineError
from planer.runtime.feeds import example_feeds
from planer.runtime.trt import profile_shapes
from tests.conftest import small_arch


def test_profile_spans_one_token_and_an_empty_memory_up_to_the_deployment():
    inputs = {"tokens": ["batch", "seq"], "mem0": ["batch", "mem", 64]}
    assert profile_shapes(inputs, (8, 128, 96)) == {
        "tokens": ((1, 1), (8, 128), (8, 128)),
        "mem0": ((1, 0, 64), (8, 96, 64), (8, 96, 64)),
    }
    with pytest.raises(EngineError, match="dynamic axis 'time'"):
        profile_shapes({"x": ["batch", "time", 64]}, (1, 128, 128))


def test_profile_matches_the_exported_graphs_axes(tmp_path):
    import onnx

    arch = small_arch([BlockSpec.attn(2, 16), BlockSpec.moe(4, 1, 32)])
    for path in (export_lm(LM(arch), tmp_path / "lm.onnx", lowering="trt"),
                 export_block(arch, BlockSpec.attn(2, 16), tmp_path / "attn.onnx")):
        graph = onnx.load(str(path)).graph
        inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
        assert set(profile_shapes(inputs, (2, 16, 16))) == set(inputs)


def test_lowering_follows_the_engine():
    assert Deployment(engine="trt").lowering == "trt"
    assert Deployment(engine="ort").lowering == "ops"
    assert Deployment(engine="trt", lowering="ops").lowering == "ops"
    for engine, lowering in (("ort", "trt"), ("trt", "ort-moe")):
        with pytest.raises(PlanerError, match=f"{lowering} MoE lowering does not run in engine {engine}"):
            Deployment(engine=engine, lowering=lowering)


def _has_trt_gpu() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _has_trt_gpu(), reason="needs TensorRT >= 10.10 and an NVIDIA GPU")
@pytest.mark.parametrize("activation, lowering", [("gelu_tanh", "trt"), ("swiglu", "trt"), ("gelu", "ops")])
def test_tensorrt_matches_pytorch(tmp_path, activation, lowering):
    from planer.runtime.trt import TrtEngine

    torch.manual_seed(0)
    arch = small_arch([BlockSpec.attn(2, 16), BlockSpec.moe(4, 1, 32), BlockSpec.attn(2, 16),
                       BlockSpec.moe(6, 2, 24)], activation=activation)
    model = LM(arch).eval()
    path = export_lm(model, tmp_path / "model.onnx", lowering=lowering)
    engine = TrtEngine(path, shape=(8, 128, arch.mem_len), plan=tmp_path / "model.plan")
    assert (tmp_path / "model.plan").is_file()
    for batch, tgt_len, mem_len in ((1, 1, 0), (3, 37, arch.mem_len), (8, 128, arch.mem_len)):
        feeds = example_feeds(arch, batch, tgt_len, mem_len)
        got = engine.run(feeds)
        with torch.no_grad():
            want = model(torch.from_numpy(feeds["tokens"]), [torch.from_numpy(feeds[f"mem{i}"]) for i in range(2)],
                         arch.mem_len)
        assert np.abs(got["logits"] - want.logits.numpy()).max() < 1e-4
    reloaded = TrtEngine(tmp_path / "model.plan")
    assert np.array_equal(reloaded.run(feeds)["logits"], got["logits"])
