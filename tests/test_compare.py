import pytest
import torch

from planer.arch import BlockSpec
from planer.compare import _narrowed, dense_space, drop_attention
from planer.latency import LatencyTable
from planer.latency.table import FIXED
from planer.nn import LM
from planer.search.supernet import inherit
from planer.space import SearchSpace
from tests.conftest import small_arch

A, F = BlockSpec.attn(4, 16), BlockSpec.ffn(64)
ARCH = small_arch([A, F, A, F, A, F, A, F])
TABLE = LatencyTable({}, {FIXED: {"p50": 1.0}, A.label(): {"p50": 2.0}, F.label(): {"p50": 1.0}})


def test_drop_attention_spreads_the_drops_and_stops_when_it_fits():
    assert drop_attention(ARCH, TABLE, 13.0) == list(ARCH.blocks)  # 1 + 4 * 2 + 4 * 1 fits already
    kept = drop_attention(ARCH, TABLE, 9.0)  # two attention blocks must go
    assert [b.kind for b in kept] == ["skip", "ffn", "attn", "ffn", "skip", "ffn", "attn", "ffn"]
    kept = drop_attention(ARCH, TABLE, 5.0)  # one attention is the minimum; then FFN blocks go
    assert sum(b.kind == "attn" for b in kept) == 1 and sum(b.kind == "ffn" for b in kept) == 2


def test_narrowing_scales_heads_and_width():
    assert _narrowed(A, 0.5) == BlockSpec.attn(2, 16) and _narrowed(F, 0.5) == BlockSpec.ffn(32)
    assert _narrowed(BlockSpec.attn(4, 16, 2), 0.75) == BlockSpec.attn(3, 16, 1)  # kv heads divide heads
    assert _narrowed(A, 0.01) == BlockSpec.attn(1, 16)


@pytest.mark.parametrize("pos", ["relative", "learned"])
def test_inherit_keeps_the_baseline_blocks_it_keeps(pos):
    torch.manual_seed(0)
    baseline = LM(small_arch([A, F, A, F], pos=pos, max_positions=64 if pos == "learned" else 0)).eval()
    same = inherit(baseline, list(baseline.arch.blocks)).eval()
    x = torch.randint(0, 256, (2, 16))
    assert torch.allclose(same(x).logits, baseline(x).logits, atol=1e-6)
    dropped = inherit(baseline, [BlockSpec.skip(), F, A, F])
    assert [b.label() for b in dropped.arch.blocks] == [F.label(), A.label(), F.label()]
    assert torch.equal(dropped.blocks[1].f.q.weight, baseline.blocks[2].f.q.weight)


def test_dense_space_drops_moe_only():
    space = SearchSpace(4, (BlockSpec.skip(), A, F, BlockSpec.moe(4, 1, 64)))
    assert dense_space(space).candidates == (BlockSpec.skip(), A, F)


def test_comparisons_use_the_fastest_precision():
    from planer.compare import fastest_precision
    from planer.deployment import Deployment

    a8, f8 = A.in_precision("int8"), F.in_precision("int8")
    table = LatencyTable({}, {**TABLE.entries, a8.label(): {"p50": 1.5}, f8.label(): {"p50": 1.2}})
    cheap, same = fastest_precision(ARCH, [A, F], table, Deployment(precisions=("fp32", "int8")))
    assert cheap == [a8, F] and same is table  # int8 where it is faster (attention), fp32 where it is not
    # at the same budget, int8 attention blocks let drop-attention keep one more of them
    kept = {blocks: sum(b.kind == "attn" for b in drop_attention(ARCH.with_blocks(blocks), table, 10.5))
            for blocks in ((A, F) * 4, (a8, F) * 4)}
    assert kept == {(A, F) * 4: 2, (a8, F) * 4: 3}


def test_narrow_finds_the_widest_factor_that_fits_in_few_profiles(monkeypatch):
    import planer.compare as compare
    from planer.deployment import Deployment

    factors = [step / 16 for step in range(1, 16)]
    blocks = {_narrowed(b, f) for f in factors for b in (A, F)}
    # latency grows with width (heads x 16 or FFN width, over 32)
    entries = {b.label(): {"p50": (b.heads * 16 if b.kind == "attn" else b.d_inner) / 32} for b in blocks}
    table = LatencyTable({}, {FIXED: {"p50": 1.0}, **entries})
    tried = []
    original = compare.fastest_precision
    monkeypatch.setattr(compare, "fastest_precision", lambda arch, bs, *a, **k: (tried.append(bs),
                                                                                original(arch, bs, *a, **k))[1])
    dep = Deployment(precisions=("fp32",))
    for budget in (1.0 + 4 * (32 + 40) / 32, 1.0 + 4 * (48 + 48) / 32, 100.0, 0.5):
        tried.clear()
        narrowed, _ = compare.narrow(ARCH, table, budget, dep)
        fits = [f for f in factors if table.predict(ARCH.with_blocks([_narrowed(b, f) for b in ARCH.blocks])) <= budget]
        assert narrowed == [_narrowed(b, max(fits, default=1 / 16)) for b in ARCH.blocks]
        assert len(tried) <= 4


def test_each_comparison_is_quoted_from_its_own_runs(monkeypatch, tmp_path):
    """A comparison's speedup is the median of its own runs' ratios, and its latency that run's, not its figures in
    the result's median run (a build quoted dense-only at 2.12x there, where its own runs' median was 2.10x)."""
    from types import SimpleNamespace

    from planer.build import _Build
    from planer.deployment import Deployment, Target
    from planer.latency import confirm as confirm_module
    from planer.report import _comparisons
    from planer.runtime import LatencyStats

    bases = [10.0, 12.0, 8.0]  # the baseline drifts from run to run
    result = [2.0, 2.1, 2.2]  # the result's ratios: its median run is the second
    dense = [2.3, 2.05, 2.15]  # dense-only's: 2.05 in the result's median run, its own median 2.15 in the third
    runs = iter([[LatencyStats.of([b]), LatencyStats.of([b / r]), LatencyStats.of([b / d])]
                 for b, r, d in zip(bases, result, dense)])
    monkeypatch.setattr(confirm_module, "measure", lambda models, dep: next(runs))
    build = SimpleNamespace(dep=Deployment(), table=SimpleNamespace(provenance={}), target=Target(speedup=2.0),
                            work=tmp_path)
    net = SimpleNamespace(arch=ARCH)
    timed = [("baseline", "baseline.onnx", net), ("result", "result.onnx", net), ("dense-only", "dense.onnx", net)]
    latency = _Build.verdict(build, timed, [], {})
    assert latency["speedup"] == pytest.approx(2.1) and latency["result"]["p50"] == pytest.approx(12 / 2.1)
    assert latency["comparisons"]["dense-only"]["p50"] == pytest.approx(8 / 2.15)
    scores = {"loss": 1.0, "bpc": 1.0}
    table = _comparisons(latency, {"result": scores, "comparisons": {"dense-only": scores}}, {"dense-only": ARCH}, ARCH)
    assert f"| result (MoE search) | {12 / 2.1:.3f} | 2.10 |" in table
    assert f"| dense-only | {8 / 2.15:.3f} | 2.15 |" in table
