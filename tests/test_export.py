"""ONNX export parity: ONNX Runtime against PyTorch eager, fp32, on shapes the exporter never saw."""

import copy
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from planer.arch import BlockSpec
from planer.errors import PlanerError
from planer.export import ExportError, check_weights_present, export_lm
from planer.nn import LM
from planer.nn.model import in_precision
from planer.nn.quant import quantized_linears
from planer.runtime import OrtEngine
from planer.runtime.feeds import example_feeds
from tests.conftest import small_arch

SHAPES = [(b, t) for b in (1, 3, 8) for t in (1, 37, 128)]


def _skewed_model(activation: str = "gelu") -> LM:
    """MoE routing forced by the weights: block 1 sends every token to expert 2; block 3 (with a shared part) never
    uses 4 and 5."""
    arch = small_arch([BlockSpec.attn(2, 16), BlockSpec.moe(4, 1, 32), BlockSpec.attn(2, 16),
                       BlockSpec.moe(6, 2, 24, shared=16)], activation=activation)
    model = LM(arch).eval()
    with torch.no_grad():
        for block, experts in ((model.blocks[1], [2]), (model.blocks[3], [0, 1, 2, 3])):
            block.norm.bias[0] = 50.0  # a large constant feature that the router reads
            block.f.router.weight[:, 0] = -1.0
            block.f.router.weight[experts, 0] = 1.0
    return model


def _variant_model() -> LM:
    """The Llama-style variants: RMSNorm, rotary positions, grouped-query attention, SwiGLU, untied head."""
    arch = small_arch([BlockSpec.attn(4, 8, 2), BlockSpec.ffn(48), BlockSpec.attn(4, 8), BlockSpec.moe(4, 2, 24, shared=8)],
                      norm="rmsnorm", pos="rotary", activation="swiglu", bias=False, tie_embeddings=False)
    return LM(arch).eval()


MODELS = {
    "skewed/ops": (_skewed_model, "ops"),
    "variant/ops": (_variant_model, "ops"),
    "skewed-gelu_tanh/ort-moe": (lambda: _skewed_model("gelu_tanh"), "ort-moe"),
    "skewed-silu/ort-moe": (lambda: _skewed_model("silu"), "ort-moe"),
    "variant/ort-moe": (_variant_model, "ort-moe"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    torch.manual_seed(1)
    make, lowering = MODELS[request.param]
    model = make()
    path = export_lm(model, tmp_path_factory.mktemp("onnx") / "model.onnx", lowering=lowering,
                     min_context=max(t for _, t in SHAPES) + model.arch.mem_len)
    return model, OrtEngine(path, threads=2), path


def _reference(model, feeds):
    mems = [torch.from_numpy(feeds[f"mem{i}"]) for i in range(len(model.arch.attn_positions))]
    with torch.no_grad():
        out = model(torch.from_numpy(feeds["tokens"]), mems)
    return [out.logits.numpy(), *(m.numpy() for m in out.mems)]


@pytest.mark.parametrize("batch, tgt_len", SHAPES)
def test_parity_with_pytorch(exported, batch, tgt_len):
    model, engine, _ = exported
    feeds = example_feeds(model.arch, batch, tgt_len, model.arch.mem_len, seed=batch * 1000 + tgt_len)
    got = engine.run(feeds)
    for name, want in zip(engine.output_names, _reference(model, feeds)):
        assert got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name], want, atol=1e-4, rtol=0, err_msg=name)


def test_forced_routing_really_happens():
    model = _skewed_model()
    seen = {}
    for b in (1, 3):
        for e, expert in enumerate(model.blocks[b].f.experts):
            expert.register_forward_hook(lambda m, i, o, key=(b, e): seen.__setitem__(key, i[0].shape[0]))
    feeds = example_feeds(model.arch, 2, 16, 16)
    _reference(model, feeds)
    assert {e for (b, e) in seen if b == 1} == {2}
    assert {e for (b, e) in seen if b == 3} <= {0, 1, 2, 3}


def test_memory_length_other_than_the_architectures(exported):
    model, engine, _ = exported
    feeds = example_feeds(model.arch, 2, 9, 3)  # memory shorter than mem_len: new memory grows to 12
    got = engine.run(feeds)
    want = _reference(model, feeds)
    assert got["new_mem0"].shape == (2, 12, model.arch.d_model)
    np.testing.assert_allclose(got["logits"], want[0], atol=1e-4, rtol=0)


def test_repeated_runs_are_identical(exported):
    """Guards against nondeterministic kernels (ScatterND add with duplicate indices was one)."""
    model, engine, _ = exported
    feeds = example_feeds(model.arch, 8, 128, model.arch.mem_len, seed=7)
    first = engine.run(feeds)["logits"]
    for _ in range(20):
        np.testing.assert_array_equal(engine.run(feeds)["logits"], first)


def test_graph_holds_every_expert(exported):
    model, _, path = exported
    check_weights_present(path, model)  # every weight matrix, including experts no token reached
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    # `ops`: tokens sorted by expert (TopK), split by the routing counts, written back (ScatterND); `ort-moe`: the
    # fused op, none of those
    assert ops >= {"TopK", "Split", "ScatterND"} and "MoE" not in ops or "MoE" in ops and "ScatterND" not in ops
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.blocks[3].f.experts[-1].up.weight.add_(1.0)  # a matrix the graph does not hold
    with pytest.raises(ExportError, match="lacks 1 weight matrices"):
        check_weights_present(path, pruned)


def test_relative_positions_up_to_the_graphs_context(tmp_path):
    """Transformer-XL attention slices its frozen position keys: parity at the longest context the graph holds
    (the table's every row in use) and with no memory at all; one position more is refused by name."""
    torch.manual_seed(2)
    model = LM(small_arch([BlockSpec.attn(2, 16), BlockSpec.ffn(48), BlockSpec.attn(2, 16)])).eval()
    path = export_lm(model, tmp_path / "m.onnx", min_context=80)  # above the default, 2 x (16 + 16)
    initializers = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert not any(name.endswith("f.r.weight") for name in initializers)  # the projection is folded away
    engine = OrtEngine(path, threads=2)
    assert engine.max_context == 80
    for tgt_len, mem_len in ((80 - model.arch.mem_len, model.arch.mem_len), (3, 0)):
        feeds = example_feeds(model.arch, 2, tgt_len, mem_len, seed=tgt_len)
        got = engine.run(feeds)
        for name, want in zip(engine.output_names, _reference(model, feeds)):
            np.testing.assert_allclose(got[name], want, atol=1e-4, rtol=0, err_msg=name)
    with pytest.raises(PlanerError, match="at most 80; export it again with `planer export --max-context 81`"):
        engine.run(example_feeds(model.arch, 1, 81 - model.arch.mem_len, model.arch.mem_len))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_linear_blocks_parity_with_pytorch(tmp_path, precision):
    """Linear blocks (attention replaced by one biased projection, no memory) between attention and FFN blocks:
    the graph computes what PyTorch does; in int8, what planer.nn.quant simulates, only their projections
    quantized, and far from fp32."""
    linear = BlockSpec.linear(precision)
    arch = small_arch([BlockSpec.attn(2, 16), linear, BlockSpec.ffn(48), linear], attn_bias=True)
    torch.manual_seed(4)
    model = LM(arch).eval()
    with torch.no_grad():  # no bias left at zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = export_lm(model, tmp_path / "m.onnx")
    int8_products = sum(n.op_type == "MatMulInteger" for n in onnx.load(str(path)).graph.node)
    assert int8_products == len(quantized_linears(model)) == (2 if precision == "int8" else 0)
    engine = OrtEngine(path, threads=2)
    assert engine.output_names == ["logits", "new_mem0"]  # one memory: the attention block's
    for batch, tgt_len in ((1, 1), (3, 37)):
        feeds = example_feeds(arch, batch, tgt_len, arch.mem_len, seed=tgt_len)
        got, want = engine.run(feeds), _reference(model, feeds)
        for name, expected in zip(engine.output_names, want):
            np.testing.assert_allclose(got[name], expected, atol=1e-4, rtol=0, err_msg=name)
        if precision == "int8":
            int8_vs_fp32 = np.abs(want[0] - _reference(in_precision(model, "fp32"), feeds)[0]).max()
            assert np.abs(got["logits"] - want[0]).max() < 1e-5 < int8_vs_fp32 / 20


def test_runtime_imports_without_torch():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import planer.metrics, planer.runtime, planer.runtime.evaluate, planer.runtime.feeds, planer.runtime.trt\n"
        "import planer.trt.plugin\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", blocker], check=True)


def test_ort_moe_refuses_exact_gelu(tmp_path):
    with pytest.raises(PlanerError, match="cannot run activation 'gelu' exactly"):
        export_lm(_skewed_model("gelu"), tmp_path / "m.onnx", lowering="ort-moe")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.parametrize("lowering", ["ops", "ort-moe"])
def test_parity_on_onnx_runtime_cuda(tmp_path, lowering):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime-gpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"ONNX Runtime {ort.__version__} here has no CUDA provider (onnxruntime-gpu is not installed)")
    torch.manual_seed(1)
    model = _skewed_model("gelu_tanh")
    engine = OrtEngine(export_lm(model, tmp_path / "m.onnx", lowering=lowering), device="cuda")
    for batch, tgt_len in ((1, 1), (3, 37), (8, 128)):
        feeds = example_feeds(model.arch, batch, tgt_len, model.arch.mem_len, seed=batch)
        got = engine.run(feeds)
        for want, name in zip(_reference(model, feeds), engine.output_names):
            assert np.abs(got[name] - want).max() < 1e-4, (lowering, batch, tgt_len, name)


def _with_idle_experts(activation: str = "gelu") -> tuple[LM, dict[int, int]]:
    """A network with a top-1 and a top-2 MoE block, and for each block an expert its router never picks."""
    arch = small_arch([BlockSpec.attn(2, 16), BlockSpec.moe(4, 1, 32), BlockSpec.attn(2, 16), BlockSpec.moe(4, 2, 24)],
                      activation=activation)
    torch.manual_seed(3)
    model = LM(arch).eval()
    idle = {1: 3, 3: 0}  # block -> an expert its router never picks
    with torch.no_grad():
        for b, e in idle.items():
            model.blocks[b].norm.bias[0] = 50.0  # a large constant feature only the idle expert's logit reads
            model.blocks[b].f.router.weight[:, 0] = 0.0
            model.blocks[b].f.router.weight[e, 0] = -1.0
    return model, idle


def test_each_expert_receives_only_the_rows_routed_to_it(tmp_path):
    """Run the exported graph with each expert's first product's input exposed: its row count must be the number
    of slots the router sent that expert (PyTorch eager, counted with hooks), for k=1 and k=2, with an expert that
    receives nothing. A graph that ran every expert on every token and kept the routed rows has the same outputs
    (parity cannot tell) but not these row counts."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model, idle = _with_idle_experts()
    arch = model.arch
    graph = onnx.load(str(export_lm(model, tmp_path / "model.onnx", lowering="ops")))
    routed = {}
    for b in idle:  # hooks only after the export, which would trace them
        for e, expert in enumerate(model.blocks[b].f.experts):
            routed[(b, e)] = 0
            expert.register_forward_hook(lambda m, i, o, key=(b, e): routed.__setitem__(key, i[0].shape[0]))
    feeds = example_feeds(arch, 2, 16, arch.mem_len, seed=5)
    _reference(model, feeds)
    assert all(routed[(b, e)] == 0 for b, e in idle.items()) and sum(routed.values()) == 32 * (1 + 2)
    weights = {numpy_helper.to_array(t).tobytes(): t.name for t in graph.graph.initializer}
    exposed = {}
    for b in idle:
        for e, expert in enumerate(model.blocks[b].f.experts):
            w = expert.up.weight.detach().numpy()
            names = {weights.get(np.ascontiguousarray(w.T).tobytes()), weights.get(w.tobytes())} - {None}
            nodes = [n for n in graph.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in names]
            assert len(nodes) == 1, f"block {b} expert {e}: {len(nodes)} products by its first weight"
            exposed[(b, e)] = nodes[0].input[0]
            graph.graph.output.append(helper.make_tensor_value_info(nodes[0].input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    rows = {key: got[name].reshape(-1, arch.d_model).shape[0] for key, name in exposed.items()}
    assert rows == routed


def test_ort_moe_runs_no_expert_on_tokens_not_routed_to_it(tmp_path):
    """The fused `com.microsoft::MoE` node on ONNX Runtime's CPU provider computes an expert for the tokens routed
    to it only: experts no token is routed to hold NaN weights, which any computation of them would carry into
    the output even at a gate of 0 (NaN x 0 is NaN), yet the graph's outputs stay finite and equal to PyTorch's,
    which runs each expert on its own rows. A lowering that ran every expert on every token, weighting the
    unrouted ones by a vanishing gate, matches PyTorch as closely on finite weights (parity cannot tell) but not
    here."""
    model, idle = _with_idle_experts("gelu_tanh")  # an activation the fused op computes exactly
    with torch.no_grad():
        for b, e in idle.items():
            model.blocks[b].f.experts[e].up.weight.fill_(float("nan"))
    path = export_lm(model, tmp_path / "model.onnx", lowering="ort-moe")
    assert sum(n.op_type == "MoE" for n in onnx.load(str(path)).graph.node) == len(idle)
    engine = OrtEngine(path, threads=2)
    feeds = example_feeds(model.arch, 2, 16, model.arch.mem_len, seed=5)
    got = engine.run(feeds)
    for want, name in zip(_reference(model, feeds), engine.output_names):
        assert np.isfinite(want).all() and np.isfinite(got[name]).all(), name
        np.testing.assert_allclose(got[name], want, atol=1e-4, rtol=0)
