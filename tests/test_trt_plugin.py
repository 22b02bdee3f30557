"""The TensorRT MoE plugin without TensorRT: its Triton kernel (Triton's CPU interpreter) and its ONNX graph
(onnx's reference evaluator, the node computed by the plugin's NumPy reference) against PyTorch eager; its
compiled PTX, shape and type rules as plain functions."""

import json
import os
import re

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton compiles anything: the CPU has no GPU backend
triton = pytest.importorskip("triton")

from planer.arch import BlockSpec  # noqa: E402
from planer.export import export_lm  # noqa: E402
from planer.export.lowering import stacked_experts  # noqa: E402
from planer.nn import LM  # noqa: E402
from planer.nn.moe import MoE, dispatch  # noqa: E402
from planer.runtime.feeds import example_feeds  # noqa: E402
from planer.trt import plugin  # noqa: E402
from tests.conftest import routed_moe, run_compiled, small_arch  # noqa: E402

CASES = [  # activation, bias, experts, top_k, tokens, skew
    ("gelu", True, 4, 1, 37, False),
    ("gelu_tanh", True, 8, 2, 37, False),
    ("relu", False, 4, 2, 1, False),
    ("silu", True, 2, 1, 40, True),
    ("swiglu", False, 4, 2, 37, True),
]


def _kernel(moe: MoE, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The MoE layer as the plugin computes it: the kernel's slots, summed over each token's k; routed in
    fp32, the experts run in `dtype`."""
    _, gates, ids = moe.route(x)
    weights = {name: t.to(dtype) for name, t in stacked_experts(moe).items()}
    unwritten = torch.full((ids.numel(), x.shape[1]), float("nan"), dtype=dtype, device=x.device)
    slots = plugin.run(x.to(dtype), ids, gates.to(dtype), weights, moe.experts[0].activation, unwritten)
    return slots.float().sum(dim=1)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_the_eager_moe(case):
    moe, x = routed_moe(*case)
    with torch.no_grad():
        _, gates, ids = moe.route(x)
        want = dispatch(x, gates, ids, moe.experts)
        got = _kernel(moe, x)
    assert not got.isnan().any(), "some slot was never written"
    assert (got - want).abs().max().item() < 1e-4


def test_kernel_tiles_one_expert_across_many_blocks():
    """All 80 tokens x 2 slots on two experts: each expert's slots span several BLOCK_M tiles; a wide d_model
    spans several column blocks."""
    moe, x = routed_moe("gelu_tanh", True, 4, 2, 80, True, d_model=300)
    assert plugin.Launch(4, 300, 40, "gelu_tanh").grid(160)[2] == 2
    with torch.no_grad():
        _, gates, ids = moe.route(x)
        assert (ids[:, 0] == 0).all()
        assert (_kernel(moe, x) - dispatch(x, gates, ids, moe.experts)).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", CASES[:2] + CASES[-1:], ids=["gelu", "gelu_tanh", "swiglu"])
def test_reference_matches_the_eager_moe(case):
    moe, x = routed_moe(*case)
    with torch.no_grad():
        _, gates, ids = moe.route(x)
        want = dispatch(x, gates, ids, moe.experts)
    w = {k: v.numpy() for k, v in stacked_experts(moe).items()}
    got = plugin.reference(x.numpy(), ids.numpy(), gates.numpy(), *(w[n] for n in plugin.INPUTS[3:]),
                           activation=moe.experts[0].activation).sum(axis=1)
    assert np.abs(got - want.numpy()).max() < 1e-5


class _MoeExperts(OpRun):
    """The plugin node, for onnx's reference evaluator: computed by the plugin's NumPy reference."""

    op_domain = plugin.NAMESPACE

    def _run(self, x, ids, gates, w_up, b_up, w_gate, b_gate, w_down, b_down, activation=None, **_):
        return (plugin.reference(x, ids, gates, w_up, b_up, w_gate, b_gate, w_down, b_down, activation),)


_MoeExperts.__name__ = plugin.NAME


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_trt_lowering_graph_matches_pytorch(tmp_path, activation):
    torch.manual_seed(1)
    arch = small_arch([BlockSpec.attn(2, 16), BlockSpec.moe(4, 1, 32), BlockSpec.attn(2, 16),
                       BlockSpec.moe(6, 2, 24)], activation=activation, bias=activation != "swiglu")
    model = LM(arch).eval()
    path = export_lm(model, tmp_path / "model.onnx", lowering="trt")
    graph = onnx.load(path)
    nodes = [n for n in graph.graph.node if n.op_type == plugin.NAME]
    assert len(nodes) == 2
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[1].attribute}
    assert nodes[1].domain == plugin.NAMESPACE and attrs["plugin_namespace"] == plugin.NAMESPACE.encode()
    assert attrs["aot"] == 1 and attrs["activation"] == activation.encode()
    assert (attrs["experts"], attrs["d_model"], attrs["d_inner"]) == (6, arch.d_model, 24)
    evaluator = ReferenceEvaluator(graph, new_ops=[_MoeExperts])
    for batch, tgt_len, mem_len in ((1, 1, 0), (3, 37, 5)):
        feeds = example_feeds(arch, batch, tgt_len, mem_len)
        got = evaluator.run(None, feeds)
        with torch.no_grad():
            want = model(torch.from_numpy(feeds["tokens"]),
                         [torch.from_numpy(feeds[f"mem{i}"]) for i in range(2)], arch.mem_len)
        assert np.abs(got[0] - want.logits.numpy()).max() < 1e-4
        assert np.abs(got[1] - want.mems[0].numpy()).max() < 1e-5


@pytest.mark.parametrize("activation, dtype", [("gelu_tanh", "fp32"), ("swiglu", "fp16")])
def test_kernel_compiles_to_ptx_tensorrt_can_launch(activation, dtype):
    """PTX for sm_90 without a GPU: exactly (9 inputs, 4 int32 scalars, 1 output) parameters, since TensorRT
    passes no more; shared memory within the 48 KiB a launch gets without opt-in."""
    code = ("import json; from planer.trt import plugin; "
            f"print(json.dumps(plugin.compile_kernel(plugin.Launch(8, 576, 1536, {activation!r}, {dtype!r}), 90)))")
    name, ptx, shared = json.loads(run_compiled(code))
    params = re.search(rf"\.entry {name}\((.*?)\)", ptx, re.S).group(1).split(",")
    kinds = [p.split()[1] for p in params]
    assert kinds == [".u64"] * 9 + [".u32"] * 4 + [".u64"]
    assert shared <= 48 * 1024


def test_unused_scratch_params_are_stripped_and_used_ones_refused():
    ptx = (".entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1,\n\t.param .u64 k_param_2\n)\n{\n"
           "\tld.param.b64 %rd1, [k_param_0];\n}\n")
    stripped = plugin.strip_scratch_params(ptx, "k", declared=1)
    assert "k_param_1" not in stripped and "k_param_0]" in stripped
    with pytest.raises(plugin.PluginError, match="scratch"):
        plugin.strip_scratch_params(ptx.replace("[k_param_0]", "[k_param_2]"), "k", declared=1)


def test_shape_and_type_rules():
    assert plugin.output_shape((37, 64), (37, 2)) == (37, 2, 64)
    launch = plugin.Launch(16, 576, 1536, "swiglu", "fp16")
    assert launch.grid(256) == (16, 16, 3) and launch.block_d == 256
    assert plugin.Launch(4, 64, 128, "relu").grid(1) == (4, 1, 1)
    combo = plugin.type_combination().split(", ")
    assert len(combo) == len(plugin.INPUTS) + 1 and combo[1] == "INT32" and set(combo) == {"INT32", "FP32|FP16"}
    with pytest.raises(plugin.PluginError, match="activation"):
        plugin.Launch(4, 64, 128, "tanh")


@pytest.mark.gpu
def test_kernel_matches_the_eager_moe_on_a_gpu():
    """Compiled for the GPU (not interpreted), in a fresh process, fp32 and fp16."""
    code = (
        "import torch\n"
        "from tests.conftest import routed_moe\n"
        "from tests.test_trt_plugin import CASES, _kernel\n"
        "from planer.nn.moe import dispatch\n"
        "for case in CASES:\n"
        "    moe, x = routed_moe(*case)\n"
        "    moe, x = moe.cuda(), x.cuda()\n"
        "    with torch.no_grad():\n"
        "        _, gates, ids = moe.route(x)\n"
        "        want = dispatch(x, gates, ids, moe.experts)\n"
        "        for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):\n"
        "            got = _kernel(moe, x, dtype)\n"
        "            assert (got - want).abs().max().item() < tol * max(1.0, want.abs().max().item()), (case, dtype)\n"
    )
    run_compiled(code)
