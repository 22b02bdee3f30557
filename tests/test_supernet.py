import pytest
import torch

from planer.arch import BlockSpec
from planer.nn import LM
from planer.search.derive import shrink
from planer.search.probe import ProbeLoss
from planer.search.supernet import SuperNet, inherit
from planer.space import SearchSpace
from tests.conftest import small_arch

BASE = [BlockSpec.attn(4, 8), BlockSpec.ffn(64), BlockSpec.attn(4, 8), BlockSpec.ffn(64)]


def _baseline(**kw) -> LM:
    torch.manual_seed(0)
    model = LM(small_arch(BASE, **kw)).eval()
    with torch.no_grad():  # a trained-looking baseline: no parameter left at its init constant
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _baseline_choice(space: SearchSpace, extra=BlockSpec.skip()) -> list[int]:
    """Position 2i holds baseline block i, position 2i+1 holds `extra` (positions map to blocks p // 2)."""
    index = {c: i for i, c in enumerate(space.candidates)}
    return [index[b] for spec in BASE for b in (spec, extra)]


@pytest.mark.parametrize("kw", [{}, {"norm": "rmsnorm", "pos": "rotary", "activation": "swiglu", "bias": False}])
def test_inherited_weights_reproduce_the_baseline(kw):
    baseline = _baseline(**kw)
    space = SearchSpace.default(baseline.arch)
    net = SuperNet(baseline, space).eval()
    choice = _baseline_choice(space)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        want = baseline(idx).logits
        torch.testing.assert_close(net(idx, choice).logits, want, atol=1e-5, rtol=0)
        extracted = net.extract(choice)
        assert extracted.arch.blocks == tuple(BASE)
        torch.testing.assert_close(extracted.eval()(idx).logits, want, atol=1e-5, rtol=0)


def test_upcycled_experts_start_as_the_baseline_ffn():
    """Unperturbed copies with k = 2 renormalised gates sum to the FFN itself."""
    baseline = _baseline()
    space = SearchSpace.default(baseline.arch)
    net = SuperNet(baseline, space, perturb=0.0).eval()
    index = {c: i for i, c in enumerate(space.candidates)}
    choice = _baseline_choice(space)
    for p in (2, 6):  # the FFN positions become MoE with 4 experts of full width
        choice[p] = index[BlockSpec.moe(4, 2, 64)]
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(net(idx, choice).logits, baseline(idx).logits, atol=1e-5, rtol=0)


def test_extracted_network_matches_the_supernet_path():
    baseline = _baseline()
    space = SearchSpace.default(baseline.arch)
    net = SuperNet(baseline, space).eval()
    torch.manual_seed(3)
    for _ in range(5):
        choice = torch.randint(0, len(space.candidates), (space.positions,)).tolist()
        choice[0] = 1  # at least one attention block
        choice[1] = space.candidates.index(BlockSpec.linear())  # and a linear one
        idx = torch.randint(0, 256, (3, 16))
        with torch.no_grad():
            first = net(idx, choice)
            second = net(idx, choice, mems=first.mems)
            model = net.extract(choice).eval()
            kept = [p for p, c in enumerate(choice) if space.candidates[c].kind == "attn"]
            ref_first = model(idx)
            ref_second = model(idx, [first.mems[p] for p in kept])
        torch.testing.assert_close(ref_first.logits, first.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ref_second.logits, second.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"pos": "rotary", "attn_bias": True}])
def test_linear_candidate_starts_as_attention_to_itself_and_extracts(kw):
    """Without attention candidates: the linear candidate computes what its position's baseline attention block
    computes for a token alone, in fp32 and int8 on shared weights, and each extracts as the block it is."""
    baseline = _baseline(**kw)
    space = SearchSpace(2, (BlockSpec.ffn(64), BlockSpec.linear(), BlockSpec.linear("int8")))
    net = SuperNet(baseline, space).eval()
    position = net.positions[1]  # inherits from baseline block 2, an attention block
    token, x = torch.randn(3, 1, 32), torch.randn(3, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(position(1, token, None)[0], baseline.blocks[2](token), atol=1e-5, rtol=0)
        y32, y8 = position(1, x, None)[0], position(2, x, None)[0]
        assert not torch.equal(y32, y8)
        for choice, want in ((1, y32), (2, y8)):
            block = position.extract(choice, baseline.arch).eval()
            assert block.kind == "linear" and torch.equal(block(x), want)


def test_inherit_builds_linear_blocks_from_the_nearest_attention():
    baseline = _baseline(attn_bias=True)
    model = inherit(baseline, [BlockSpec.attn(4, 8), BlockSpec.linear(), BlockSpec.ffn(64), BlockSpec.linear()])
    for block, source in ((model.blocks[1], baseline.blocks[0]), (model.blocks[3], baseline.blocks[2])):
        weight, bias = source.f.as_linear()
        assert torch.equal(block.f.weight, weight) and torch.equal(block.f.bias, bias)
        assert torch.equal(block.norm.weight, source.norm.weight)


@pytest.mark.parametrize("kw", [{}, {"norm": "rmsnorm", "pos": "rotary", "activation": "swiglu", "bias": False}])
def test_probe_loss_reuses_the_shared_front_and_matches_full_passes(kw):
    baseline = _baseline(**kw)
    space = SearchSpace.default(baseline.arch)
    net = SuperNet(baseline, space).eval()
    torch.manual_seed(4)
    probe = [(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))) for _ in range(3)]

    def full(choice):  # independent of ProbeLoss: whole passes through SuperNet.forward
        mems, losses = None, []
        with torch.no_grad():
            for x, y in probe:
                out = net(x, choice, mems=mems)
                mems = out.mems
                losses.append(torch.nn.functional.cross_entropy(out.logits.reshape(-1, 256), y.reshape(-1)))
        return float(sum(losses[1:])) / 2

    loss_of = ProbeLoss(net, probe)
    base = _baseline_choice(space)
    loss_of.rebase(base)
    positions = len(base)
    assert loss_of.positions_run == positions
    for p in (0, 3, positions - 1, 5):
        move = base[:p] + [0 if base[p] else 2] + base[p + 1:]
        before = loss_of.positions_run
        assert loss_of(move) == pytest.approx(full(move), abs=1e-5)
        assert loss_of.positions_run - before == positions - p  # only the positions from the move on ran
        loss_of.rebase(move)  # the next move starts from this network
        base = move
    assert loss_of(base) == pytest.approx(full(base), abs=1e-5)


def test_shrink_rebases_on_every_network_it_moves_to():
    cost = torch.tensor([0.0, 2.0, 1.0, 0.4])
    seen = []
    chosen = shrink([1, 2, 1, 2], cost, 4.0, [False, True, False, False],
                    lambda choice: 5.0 - sum(c > 0 for c in choice), lambda p: [0, 1, 2, 3], rebase=seen.append)
    assert seen[0] == [1, 2, 1, 2] and seen[-1] == chosen and len(seen) >= 2


def test_sampling_trains_the_architecture_logits():
    baseline = _baseline()
    net = SuperNet(baseline, SearchSpace.default(baseline.arch))
    choice, weights = net.sample(tau=1.0)
    assert len(choice) == net.space.positions and torch.all(weights == 1)
    out = net(torch.randint(0, 256, (2, 16)), choice, weights)
    (out.logits.pow(2).mean() + out.aux_loss).backward()
    assert net.alpha.grad is not None and net.alpha.grad.abs().sum() > 0


def test_expected_latency_and_argmax():
    baseline = _baseline()
    space = SearchSpace.default(baseline.arch)
    net = SuperNet(baseline, space)
    block_ms = torch.arange(len(space.candidates), dtype=torch.float32)
    uniform = block_ms.mean() * space.positions
    assert net.expected_latency(block_ms, 1.0).item() == pytest.approx(1.0 + uniform.item(), rel=1e-5)
    with torch.no_grad():
        net.alpha.zero_()
        net.alpha[:, 0] = 5.0  # every position prefers skip ...
        net.alpha[3, 2] = 1.0  # ... position 3 leans most towards attention candidate 2
    choice = net.argmax()  # the memory needs one attention block
    assert choice[3] == 2 and sum(c != 0 for c in choice) == 1
    assert net.derive(choice).blocks == (space.candidates[2],)


def test_shrink_makes_the_cheapest_moves_in_loss_per_millisecond():
    # candidates: 0 skip, 1 attention, 2 big FFN, 3 small FFN; a block's worth is additive here
    cost = torch.tensor([0.0, 2.0, 1.0, 0.4])
    worth = [0.0, 1.0, 0.3, 0.2]  # loss each block removes
    is_attn = [False, True, False, False]
    calls = []

    def loss_of(choice):
        calls.append(choice)
        return 5.0 - sum(worth[c] for c in choice)

    every = lambda p: [0, 1, 2, 3]  # noqa: E731
    # 2 attention + 2 big FFN = 6 ms. To reach 5 ms: big FFN -> small saves 0.6 for 0.1 loss (1/6 per ms), an
    # attention -> skip saves 2 (counted as the 1 still needed) for 1.0. Then the 0.4 still needed: the other
    # big FFN -> small (0.1 / 0.4) beats small -> skip (0.2 / 0.4).
    assert shrink([1, 2, 1, 2], cost, 5.0, is_attn, loss_of, every) == [1, 3, 1, 3]
    # the last attention block is never removed, and a budget below one attention is unreachable
    assert shrink([1, 2], cost, 2.0, is_attn, loss_of, every) == [1, 0]
    assert shrink([1, 2], cost, 1.0, is_attn, loss_of, every) is None
    # min_attn keeps that many attention blocks: 3.5 ms fits one but not two
    assert shrink([1, 2, 1, 2], cost, 4.0, is_attn, loss_of, every, min_attn=2) == [1, 0, 1, 0]
    assert shrink([1, 2, 1, 2], cost, 3.5, is_attn, loss_of, every, min_attn=2) is None
    assert sum(is_attn[c] for c in shrink([1, 2, 1, 2], cost, 3.5, is_attn, loss_of, every)) == 1
    # a cut that overshoots is followed by growing into the room left: 2 attention blocks, budget 2.9; the
    # cheapest cut is an attention -> small FFN (2.4 ms), then a skip becomes a small FFN (2.8 ms)
    assert shrink([1, 1, 0, 0], cost, 2.9, is_attn, loss_of, every) == [3, 1, 3, 0]
    assert calls  # every move was measured


@pytest.mark.parametrize("limit", [0, 24 * 5 - 1])
def test_lazy_shrink_measures_fewer_moves_and_agrees_when_losses_add_up(limit):
    # 24 positions of attention and FFNs whose losses add up: a stale loss change stays exact, so the lazy
    # steps must make the same moves as the exact ones, with far fewer measurements. Just under the 120 moves
    # in all, the steps stay lazy when fewer moves are left in them.
    cost = torch.tensor([0.0, 2.0, 1.0, 0.4, 0.7])
    worth = [0.0, 1.0, 0.3, 0.2, 0.25]
    is_attn = [False, True, False, False, False]
    start = [1, 2] * 12

    def run(limit):
        calls = []

        def loss_of(choice):
            calls.append(1)
            return 50.0 - sum(worth[c] * (1 + 0.01 * p) for p, c in enumerate(choice))

        chosen = shrink(start, cost, 25.0, is_attn, loss_of, lambda p: [0, 1, 2, 3, 4], exact_limit=limit)
        return chosen, len(calls)

    (exact, exact_calls), (lazy, lazy_calls) = run(10_000), run(limit)
    assert lazy == exact and sum(cost[c] for c in exact) <= 25.0
    assert lazy_calls < exact_calls / 3, (lazy_calls, exact_calls)


def test_search_can_start_at_the_baseline():
    baseline = _baseline()
    space = SearchSpace.default(baseline.arch)
    net = SuperNet(baseline, space, baseline_bias=2.0)
    assert net.baseline_choice(baseline.arch) == _baseline_choice(space)
    assert net.derive(net.argmax()) == baseline.arch


@pytest.mark.parametrize("attn_bias", [False, True])
def test_supernet_params_counts_what_the_supernet_holds(attn_bias):
    arch = small_arch(attn_bias=attn_bias)
    for space in (SearchSpace.default(arch), SearchSpace(3, (BlockSpec.skip(), BlockSpec.ffn(16))),
                  SearchSpace(2, (BlockSpec.attn(1, 16), BlockSpec.moe(4, 1, 8), BlockSpec.moe(2, 2, 32))),
                  SearchSpace(2, (BlockSpec.linear(), BlockSpec.linear("int8"), BlockSpec.ffn(16)))):
        net = SuperNet(LM(arch), space)
        held = sum(p.numel() for name, p in net.named_parameters() if name != "alpha")
        assert space.supernet_params(arch) == held


def test_the_default_space_narrows_to_fit_a_parameter_budget():
    from planer.arch import ArchError

    arch = small_arch()
    full = SearchSpace.default(arch)
    assert SearchSpace.default(arch, max_params=full.supernet_params(arch)) == full
    fitted = SearchSpace.default(arch, max_params=full.supernet_params(arch) // 4)
    assert fitted.supernet_params(arch) <= full.supernet_params(arch) // 4
    assert fitted.positions == len(arch.blocks)  # positions go first
    assert max(c.experts for c in fitted.candidates if c.kind == "moe") < 16  # then the largest expert counts
    assert {c.kind for c in fitted.candidates} == {c.kind for c in full.candidates}
    with pytest.raises(ArchError, match="pass a smaller --space"):
        SearchSpace.default(arch, max_params=1000)


def test_a_space_without_moe_keeps_its_dense_alternatives_in_order():
    arch = small_arch()
    full = SearchSpace.default(arch).with_splits(arch)
    dense = full.without_moe()
    assert dense == SearchSpace.default(arch, experts=())  # built without MoE blocks in the first place
    assert dense.positions == full.positions
    assert len(dense.candidates) < len(full.candidates) and all(c.kind != "moe" for c in dense.candidates)
