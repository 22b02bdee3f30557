import pytest
import torch

from planer.arch import BlockSpec
from planer.nn import LM
from planer.search.heads import probe_loss, rank_heads
from tests.conftest import small_arch


def _probe(segments=3, batch=2, t=16):
    torch.manual_seed(1)
    x = torch.randint(0, 256, (batch, segments * t + 1))
    return [(x[:, i * t:(i + 1) * t], x[:, i * t + 1:(i + 1) * t + 1]) for i in range(segments)]


@pytest.mark.parametrize("kw", [
    dict(),  # Transformer-XL: relative positions
    dict(pos="rotary", attn_bias=True, blocks=[BlockSpec.attn(6, 8, 2), BlockSpec.ffn(64), BlockSpec.attn(4, 8)]),
])
def test_ranked_heads_compute_the_same_function(kw):
    torch.manual_seed(0)
    model = LM(small_arch(**kw)).eval()
    for p in model.parameters():  # biases start at zero; make every tensor the permutation touches matter
        p.data.add_(torch.randn_like(p) * 0.05)
    ranked, orders = rank_heads(model, _probe())
    units = [b.f.kv_heads for b in model.blocks if b.kind == "attn"]
    assert [sorted(o) for o in orders] == [list(range(u)) for u in units]
    assert any(o != sorted(o) for o in orders)  # something moved, or the test proves nothing
    x = torch.randint(0, 256, (2, 16))
    a, b = model(x), ranked(x)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    c, d = model(x, a.mems), ranked(x, b.mems)
    torch.testing.assert_close(d.logits, c.logits, atol=1e-5, rtol=1e-5)


def test_the_head_whose_removal_costs_more_comes_first():
    torch.manual_seed(0)
    model = LM(small_arch([BlockSpec.attn(2, 16), BlockSpec.ffn(64)])).eval()
    probe = _probe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    for head in range(2):  # the reference: cut one head's output columns by hand
        cut = LM(model.arch).eval()
        cut.load_state_dict(model.state_dict())
        with torch.no_grad():
            cut.blocks[0].f.o.weight[:, head * 16:(head + 1) * 16] = 0
        losses.append(probe_loss(cut, probe))
    assert losses[0] != losses[1]
    _, [order] = rank_heads(model, probe)
    kept = 0 if losses[1] < losses[0] else 1  # removing the other head hurts less
    assert order == [kept, 1 - kept]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model passed in is untouched


@torch.no_grad()
def test_narrower_attention_of_the_default_space_inherits_whole_kv_groups():
    """Each attention candidate of a grouped-query baseline's default space, cut from the baseline block, computes
    what the baseline block computes with the remaining key/value groups cut off (an independent reference:
    cut_heads zeroes their output columns). A count of query heads that splits a group (the old default offered
    4 and 8 heads over 1 kv head here) fails it."""
    from planer.search.heads import cut_heads
    from planer.search.supernet import copy_attention
    from planer.space import SearchSpace

    rotary = dict(norm="rmsnorm", pos="rotary", activation="swiglu", bias=False)
    parent = LM(small_arch([BlockSpec.attn(9, 8, kv_heads=3), BlockSpec.ffn(64)], **rotary)).eval()
    for p in parent.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    src = parent.blocks[0].f
    cuts = [c for c in SearchSpace.default(parent.arch).candidates if c.kind == "attn"]
    assert [(c.heads, c.n_kv_heads) for c in cuts] == [(3, 1), (6, 2), (9, 3)]
    h = torch.randn(2, parent.arch.tgt_len, parent.arch.d_model)
    for c in cuts:
        dst = LM(small_arch([c, BlockSpec.ffn(64)], **rotary)).blocks[0].f
        copy_attention(dst, src)
        with cut_heads(src, range(c.n_kv_heads, src.kv_heads)):
            want = src(h, parent.arch.tgt_len)
        torch.testing.assert_close(dst(h, parent.arch.tgt_len), want, rtol=1e-5, atol=1e-6)
