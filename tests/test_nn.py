import pytest
import torch
import torch.nn.functional as F

from planer.arch import BlockSpec
from planer.nn import LM
from planer.nn.attention import Attention, rel_shift
from planer.nn.moe import TRITON_EXPERTS_ENV, MoE, triton_experts_enabled
from tests.conftest import small_arch


def _reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Dense reference: every expert on every token, combined with the same gates."""
    _, gates, ids = moe.route(x)
    every = torch.stack([expert(x) for expert in moe.experts])  # (E, N, d)
    tokens = torch.arange(x.shape[0])
    return sum(gates[:, s, None] * every[ids[:, s], tokens] for s in range(ids.shape[1]))


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_sparse_dispatch_matches_per_token_reference(top_k):
    moe = MoE(d_model=16, experts=6, top_k=top_k, d_inner=24)
    with torch.no_grad():  # feature 0 is large and steers every token away from experts 4 and 5
        moe.router.weight[:4, 0] = 1.0
        moe.router.weight[4:, 0] = -1.0
    x = torch.randn(50, 16)
    x[:, 0] = 10.0
    ids = moe.route(x)[2]
    assert set(ids.unique().tolist()) < set(range(6)), "test needs idle experts"
    torch.testing.assert_close(moe(x), _reference_moe(moe, x), atol=1e-5, rtol=0)


def test_moe_all_tokens_on_one_expert():
    moe = MoE(d_model=8, experts=4, top_k=1, d_inner=16)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0
    x = torch.rand(20, 8) + 0.1  # positive, so expert 2 wins every token
    torch.testing.assert_close(moe(x), _reference_moe(moe, x), atol=1e-5, rtol=0)


def test_moe_experts_see_only_their_tokens():
    moe = MoE(d_model=16, experts=8, top_k=2, d_inner=8)
    seen = {}
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, inp, out, e=e: seen.__setitem__(e, inp[0].shape[0]))
    x = torch.randn(3, 11, 16)
    moe(x)
    ids = moe.route(x.reshape(-1, 16))[2]
    expected = {e: n for e, n in enumerate(torch.bincount(ids.reshape(-1), minlength=8).tolist()) if n}
    assert seen == expected
    assert sum(seen.values()) == 3 * 11 * 2  # k rows per token, not E


def test_balance_loss_is_one_when_uniform_and_grows_when_skewed():
    from planer.nn.routing import balance_loss
    probs = torch.full((8, 4), 0.25)
    assert balance_loss(probs, torch.arange(8).remainder(4)[:, None], 4).item() == pytest.approx(1.0)
    skewed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    assert balance_loss(skewed, torch.zeros(8, 1, dtype=torch.long), 4).item() > 3.5


def test_rel_shift_matches_gather_reference():
    q, k = 5, 9  # keys = mem (4) + query positions (5); column j of the input is distance k-1-j
    x = torch.randn(2, 3, q, k)
    shifted = rel_shift(x)
    m = k - q
    for i in range(q):
        for j in range(m + i + 1):  # the causal part that attention keeps
            distance = m + i - j
            torch.testing.assert_close(shifted[..., i, j], x[..., i, k - 1 - distance])


@pytest.mark.parametrize("kw", [{}, {"pos": "rotary", "norm": "rmsnorm", "activation": "swiglu"}])
def test_memory_makes_segments_equal_one_long_call(kw):
    blocks = [BlockSpec.attn(4, 8, 2 if kw else 0), BlockSpec.ffn(32), BlockSpec.linear(), BlockSpec.attn(4, 8),
              BlockSpec.ffn(32)]
    model = LM(small_arch(blocks, **kw)).eval()
    idx = torch.randint(0, 256, (3, 32))
    with torch.no_grad():
        whole = model(idx, mem_len=32).logits
        first = model(idx[:, :20], mem_len=24)
        second = model(idx[:, 20:], first.mems, mem_len=24)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole, atol=1e-5, rtol=0)
    assert [m.shape for m in second.mems] == [(3, 24, 32)] * 2  # the linear block keeps none
    assert not any(m.requires_grad for m in second.mems)


@pytest.mark.parametrize("spec, kw", [
    (BlockSpec.attn(4, 8), {}),
    (BlockSpec.attn(4, 8, 2), {"pos": "rotary"}),  # grouped-query: each kv head serves two query heads
    (BlockSpec.attn(4, 8), {"pos": "learned", "max_positions": 64, "attn_bias": True}),
])
def test_as_linear_is_attention_over_a_token_alone(spec, kw):
    attn = Attention(small_arch(**kw), spec).eval()
    with torch.no_grad():  # no parameter at an init constant (zero biases would hide a wrong bias)
        for p in attn.parameters():
            p.copy_(torch.randn_like(p))
    h = torch.randn(3, 1, 32)
    weight, bias = attn.as_linear()
    assert weight.shape == (32, 32) and (bias is not None) == kw.get("attn_bias", False)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(h, weight, bias), attn(h, 1), atol=1e-4, rtol=1e-5)


def test_attention_is_causal():
    model = LM(small_arch()).eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_moe_aux_loss_reaches_the_output():
    model = LM(small_arch())
    out = model(torch.randint(0, 256, (2, 16)))
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert model.blocks[3].f.router.weight.grad.abs().sum() > 0


def test_the_triton_expert_kernel_is_opt_in(monkeypatch):
    # it has run only in Triton's CPU interpreter: CUDA training must not take it unless asked
    monkeypatch.delenv(TRITON_EXPERTS_ENV, raising=False)
    assert not triton_experts_enabled()
    for value, enabled in (("0", False), ("", False), ("1", True)):
        monkeypatch.setenv(TRITON_EXPERTS_ENV, value)
        assert triton_experts_enabled() is enabled
