"""Split experts (planer.search.split): the parts of an FFN add up to it, the partition is a partition, the router
finds the groups, and the gate fix lets copies and splits start as the FFN they came from."""

from __future__ import annotations

import pytest
import torch

from planer.arch import ArchError, BlockSpec
from planer.nn.ffn import FFN
from planer.nn.moe import MoE
from planer.search.split import (check_split, oracle_routes, partition, routed_to, router_loss, split_ffn,
                                 split_spec)


def _ffn(activation: str, bias: bool, width: int = 48, d: int = 16) -> FFN:
    torch.manual_seed(0)
    return FFN(d, width, activation, bias).eval()


@pytest.mark.parametrize("activation, bias, experts, shared", [
    ("gelu", True, 4, 0), ("gelu", True, 4, 16), ("swiglu", False, 8, 0), ("swiglu", False, 2, 8),
    ("relu", True, 1, 0)])
def test_all_experts_active_is_the_parent_ffn(activation, bias, experts, shared):
    ffn = _ffn(activation, bias)
    h = torch.randn(300, 16)
    moe = split_ffn(ffn, h, split_spec(48, experts, experts, shared)).eval()  # k = E: every expert runs
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(moe(x), ffn(x), atol=1e-5, rtol=1e-5)


def test_a_cut_serves_every_top_k_and_is_the_cut_made_afresh():
    """The local search asks for E x k x precision MoEs of one FFN: the k-means and router fit run once per
    (E, shared), and each MoE built from the kept cut is the one built without it."""
    ffn, h = _ffn("gelu", True), torch.randn(300, 16)
    cuts: dict = {}
    for top_k in (1, 2):
        kept = split_ffn(ffn, h, split_spec(48, 4, top_k, 16), cuts=cuts)
        afresh = split_ffn(ffn, h, split_spec(48, 4, top_k, 16))
        for name, value in afresh.state_dict().items():
            torch.testing.assert_close(kept.state_dict()[name], value, atol=0, rtol=0)
    assert list(cuts) == [(4, 16, 0)]


def test_partition_uses_every_unit_once_and_finds_units_that_fire_together():
    torch.manual_seed(0)
    groups = torch.randperm(24).view(4, 6)  # the truth: 4 groups of 6 units, each active on its own tokens
    contrib = torch.rand(400, 24) * 0.01
    token_group = torch.randint(0, 4, (400,))
    for g in range(4):
        rows = torch.nonzero(token_group == g)[:, 0]
        contrib[rows[:, None], groups[g]] += torch.rand(len(rows), 6) + 0.5
    found = partition(contrib, 4)
    assert sorted(found.reshape(-1).tolist()) == list(range(24))
    assert {frozenset(g.tolist()) for g in found} == {frozenset(g.tolist()) for g in groups}


def test_router_learns_which_group_a_token_needs():
    """ReLU units that fire only when one input feature is large, 4 features for 4 groups: the fitted top-1
    router must pick the group of each token's large feature, and the top-1 MoE then nearly is the FFN."""
    d, width = 8, 32
    ffn = FFN(d, width, "relu", True).eval()
    with torch.no_grad():
        ffn.up.weight.zero_()
        for u in range(width):
            ffn.up.weight[u, u % 4] = 1.0 + 0.1 * (u // 4)
        ffn.up.bias.fill_(-1.0)
        ffn.down.weight.normal_()

    def tokens(n: int) -> torch.Tensor:
        x = torch.randn(n, d) * 0.1
        x[torch.arange(n), torch.randint(0, 4, (n,))] = 3.0
        return x

    moe = split_ffn(ffn, tokens(2000), split_spec(width, 4, 1)).eval()
    x = tokens(500)
    with torch.no_grad():
        assert float((moe(x) - ffn(x)).pow(2).mean() / ffn(x).pow(2).mean()) < 1e-3


def test_top1_copies_of_one_ffn_are_that_ffn():
    """Before the fix the gate was the router's probability, ~1/E: an upcycled top-1 block started at FFN/E."""
    ffn = _ffn("gelu", True)
    for top_k in (1, 2):
        moe = MoE(16, 4, top_k, 48, "gelu", True).eval()
        for expert in moe.experts:
            expert.load_state_dict(ffn.state_dict())
            with torch.no_grad():  # a MoE sums its k experts: copies carry 1/k of the output projection each
                expert.down.weight /= top_k
                expert.down.bias /= top_k
        x = torch.randn(3, 5, 16)
        torch.testing.assert_close(moe(x), ffn(x), atol=1e-5, rtol=1e-5)


def test_gates_are_one_but_the_router_still_learns():
    moe = MoE(16, 4, 2, 8)
    x = torch.randn(30, 16)
    _, gates, _ = moe.route(x)
    assert torch.equal(gates.detach(), torch.ones_like(gates))
    moe(x).square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k, shared", [(1, 0), (2, 0), (1, 16)])
def test_the_oracle_picks_the_experts_whose_outputs_make_what_is_wanted(top_k, shared):
    """What is wanted of each token is the sum of k experts drawn at random (and of the shared part): the oracle
    names exactly those, with no error left, and `router_loss` is the router's cross-entropy on that choice (1/k on
    each)."""
    torch.manual_seed(0)
    ffn, h = _ffn("gelu", True), torch.randn(300, 16)
    moe = split_ffn(ffn, h, split_spec(48, 4, top_k, shared)).eval()
    drawn = torch.stack([torch.randperm(4)[:top_k] for _ in range(300)])
    with torch.no_grad():
        want = sum(torch.stack([e(h) for e in moe.experts])[drawn[:, j], torch.arange(300)] for j in range(top_k))
        want = want + (moe.shared(h) if shared else 0)
    ids, error = oracle_routes(moe, h, want)
    assert torch.equal(ids.sort(dim=1).values, drawn.sort(dim=1).values)
    assert float(error.max()) < 1e-8
    target = routed_to(ids, 4)
    assert torch.equal(target.sum(dim=1), torch.ones(300))
    assert torch.equal((target > 0).sum(dim=1), torch.full((300,), top_k))
    h.requires_grad_(True)
    loss = router_loss(moe.router, h, target)
    logits = moe.router(h.detach())
    reference = sum(torch.nn.functional.cross_entropy(logits, ids[:, j]) for j in range(top_k)) / top_k
    torch.testing.assert_close(loss, reference)
    loss.backward()
    assert h.grad is None and moe.router.weight.grad.abs().sum() > 0  # the router learns; its inputs are given


@pytest.mark.parametrize("spec, message", [
    (BlockSpec.moe(5, 1, 9), "do not divide"),
    (BlockSpec.moe(4, 1, 12, shared=48), "leaves no units"),
    (BlockSpec.moe(4, 1, 8), "must equal"),
])
def test_a_block_that_cannot_be_cut_is_refused(spec, message):
    with pytest.raises(ArchError, match=message):
        check_split(spec, 48)
    with pytest.raises(ArchError, match="top-k"):
        split_spec(48, 4, 5)
