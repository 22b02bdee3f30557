"""The Triton expert-dispatch kernel against the eager dispatch, run by Triton's interpreter on the CPU."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton compiles anything: the CPU has no GPU backend
triton = pytest.importorskip("triton")

from planer.nn.moe import MoE, dispatch as eager_dispatch  # noqa: E402
from planer.kernels.dispatch import BLOCK_M, dispatch, tiles  # noqa: E402
from tests.conftest import routed_moe, run_compiled  # noqa: E402


def test_tiles_never_straddle_experts_and_skip_empty_ones():
    counts = torch.tensor([0, 17, 3, 0, 32])
    plan = tiles(counts, 52)
    assert len(plan.expert) == 4 + 5 - 1  # the bound, not the 5 tiles: the GPU never reports the count back
    real = plan.start < plan.end
    assert real.tolist() == [True] * 5 + [False] * 3
    assert plan.expert[real].tolist() == [1, 1, 2, 4, 4]
    assert plan.start[real].tolist() == [0, BLOCK_M, 17, 20, 20 + BLOCK_M]
    assert plan.end[real].tolist() == [17, 17, 20, 52, 52]
    assert plan.row_start.tolist() == [0, 0, 17, 20, 20] and plan.row_end.tolist() == [0, 17, 20, 20, 52]


@pytest.mark.parametrize("counts", [[0, 0, 5, 0], [16, 16, 16, 16], [1, 1, 1, 1], [63, 0, 0, 1], [0, 0, 0, 0]])
def test_the_tile_bound_holds_for_any_counts(counts):
    plan = tiles(torch.tensor(counts), sum(counts))
    real = plan.start < plan.end
    covered = torch.zeros(sum(counts), dtype=torch.long)
    for e, s, t in zip(plan.expert[real].tolist(), plan.start[real].tolist(), plan.end[real].tolist()):
        assert plan.row_start[e] <= s < t == plan.row_end[e]
        covered[s:min(s + BLOCK_M, t)] += 1
    assert (covered == 1).all()  # every sorted row in exactly one tile


@pytest.mark.parametrize("activation, bias, experts, top_k, skew", [
    ("gelu", True, 4, 1, False),
    ("gelu_tanh", True, 8, 2, False),
    ("relu", False, 4, 2, True),
    ("silu", True, 2, 1, True),
    ("swiglu", False, 4, 2, False),
])
def test_kernel_matches_the_eager_dispatch(activation, bias, experts, top_k, skew):
    moe, x = routed_moe(activation, bias, experts, top_k, skew=skew)
    _, gates, ids = moe.route(x)
    if skew:
        assert (ids[:, 0] == 0).all() and (top_k == 1 or (ids[:, 1] == 1).all() and gates[:, 1].min() > 0.05)
    with torch.no_grad():
        want = eager_dispatch(x, gates, ids, moe.experts)
    got = dispatch(x, gates, ids, moe.experts)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.gpu
def test_the_moe_block_uses_the_kernel_on_a_gpu():
    """Compiled for the GPU, in a fresh process: the block's gradients through the kernel are the eager ones."""
    run_compiled(
        "import os, torch\n"
        "from planer.nn.moe import TRITON_EXPERTS_ENV, MoE, dispatch\n"
        "os.environ[TRITON_EXPERTS_ENV] = '1'\n"
        "torch.manual_seed(0)\n"
        "moe = MoE(64, 8, 2, 128, 'gelu_tanh').cuda()\n"
        "x = torch.randn(200, 64, device='cuda')\n"
        "moe(x).square().sum().backward()\n"
        "got = [p.grad.clone() for p in moe.parameters()]\n"
        "moe.zero_grad()\n"
        "_, gates, ids = moe.route(x)\n"
        "dispatch(x, gates, ids, moe.experts).square().sum().backward()\n"
        "for w, g in zip((p.grad for p in moe.parameters()), got):\n"
        "    assert (w - g).abs().max().item() < 1e-4 * max(1.0, w.abs().max().item())\n"
    )


@pytest.mark.parametrize("activation, bias, top_k", [("gelu_tanh", True, 2), ("swiglu", False, 1),
                                                     ("relu", True, 1)])
def test_gradients_match_the_eager_dispatch(activation, bias, top_k):
    torch.manual_seed(0)
    moe = MoE(24, 4, top_k, 40, activation, bias)
    x = torch.randn(37, 24)

    def grads(dispatch_fn):
        moe.zero_grad()
        xx = x.clone().requires_grad_()
        _, gates, ids = moe.route(xx)
        (dispatch_fn(xx, gates, ids, moe.experts) ** 2).sum().backward()
        return [xx.grad] + [p.grad.clone() for p in moe.parameters()]

    want, got = grads(eager_dispatch), grads(dispatch)
    assert len(want) == len(got) and all(g is not None for g in got)
    for w, g in zip(want, got):
        assert (w - g).abs().max().item() < 1e-4 * max(1.0, w.abs().max().item())
