"""The Triton expert-dispatch kernel against the eager dispatch, run by Triton's interpreter on the CPU."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton compiles anything: the CPU has no GPU backend
triton = pytest.importorskip("triton")

from planer.nn.moe import TRITON_EXPERTS_ENV, MoE, dispatch as eager_dispatch  # noqa: E402
from planer.kernels.dispatch import BLOCK_M, dispatch, tiles  # noqa: E402
from tests.conftest import routed_moe  # noqa: E402


def test_tiles_never_straddle_experts_and_skip_empty_ones():
    counts = torch.tensor([0, 17, 3, 0, 32])
    expert, start, end = tiles(counts)
    assert expert.tolist() == [1, 1, 2, 4, 4]
    assert start.tolist() == [0, BLOCK_M, 17, 20, 20 + BLOCK_M] and end.tolist() == [17, 17, 20, 52, 52]


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
def test_the_moe_block_uses_the_kernel_on_a_gpu(monkeypatch):
    monkeypatch.setenv(TRITON_EXPERTS_ENV, "1")
    torch.manual_seed(0)
    moe = MoE(64, 8, 2, 128, "gelu_tanh").cuda()
    x = torch.randn(200, 64, device="cuda")
    moe(x).square().sum().backward()
    got = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    _, gates, ids = moe.route(x)
    eager_dispatch(x, gates, ids, moe.experts).square().sum().backward()
    for w, g in zip((p.grad for p in moe.parameters()), got):
        assert (w - g).abs().max().item() < 1e-4 * max(1.0, w.abs().max().item())


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
