import json
from dataclasses import replace

import pytest

from planer.arch import BlockSpec
from planer.deployment import Deployment
from planer.latency import LatencyTable, TableError
from planer.latency.profile import profile
from planer.runtime import LatencyStats, time_engine, time_engines
from planer.space import SearchSpace
from tests.conftest import small_arch

DEP = Deployment(batch=1, tgt_len=16, mem_len=16, threads=1, min_iters=5, min_seconds=0.05)


def _stats(ms):
    return LatencyStats.of([ms]).to_dict()


def test_predict_and_calibrate():
    table = LatencyTable({"engine": "ort"}, {"fixed": _stats(1.0), "attn2x16": _stats(2.0), "ffn64": _stats(0.5)})
    arch = small_arch([BlockSpec.attn(2, 16), BlockSpec.skip(), BlockSpec.ffn(64), BlockSpec.ffn(64)])
    assert table.predict(arch) == pytest.approx(4.0)
    calibrated = table.calibrate([(arch, 6.0)])
    assert calibrated.scale == pytest.approx(1.5)
    assert calibrated.predict(arch) == pytest.approx(6.0)
    with pytest.raises(TableError, match="no entry for moe4k1x8"):
        table.predict(arch.with_blocks([BlockSpec.moe(4, 1, 8)]))


def _steady_scripted(monkeypatch, tries: list[list[tuple[float, float]]]) -> tuple[list[LatencyStats], list[str]]:
    """_steady over runs named a, b, ..., the timing answering the scripted (p50, spread) tries in turn; what it
    kept, and which runs each try timed."""
    from planer.latency import profile as profile_module

    script, timed = iter(tries), []

    def time_engines(runs, **options):
        timed.append("".join(name for name, _ in runs))
        return [LatencyStats(p50, p50 * spread, p50 * spread, p50, p50, 100) for p50, spread in next(script)]

    monkeypatch.setattr(profile_module, "time_engines", time_engines)
    runs = [(chr(ord("a") + i), {}) for i in range(len(tries[0]))]
    return profile_module._steady(runs, Deployment(max_spread=1.2, retries=2)), timed


def test_an_entry_timed_again_is_scaled_to_the_first_tries_load(monkeypatch):
    """Entries of one table compare as if timed together: a try again comes back at the first try's load through
    the steadiest run (a) timed beside it, and the steadier of each entry's tries is kept."""
    best, timed = _steady_scripted(monkeypatch, [
        [(1.0, 1.05), (2.0, 1.5), (3.0, 1.1), (4.0, 1.4)],
        [(5.0, 1.1), (7.0, 1.3), (2.0, 1.05)],  # b, d and a at twice the load: b 2.5 kept, d 3.5 still noisy
        [(6.0, 1.05), (1.5, 1.05)],  # d and a at 1.5 times the load
    ])
    assert timed == ["abcd", "bda", "da"]
    assert [s.p50 for s in best] == pytest.approx([1.0, 2.5, 3.0, 4.0])
    assert [round(s.spread, 2) for s in best] == [1.05, 1.1, 1.1, 1.05]


def test_where_every_entry_is_noisy_the_steadiest_is_timed_again_once_and_still_scales(monkeypatch):
    best, timed = _steady_scripted(monkeypatch, [[(1.0, 1.3), (2.0, 1.5)], [(2.0, 1.1), (5.0, 1.1)]])
    assert timed == ["ab", "ab"]
    assert [s.p50 for s in best] == pytest.approx([1.0, 2.5])


def test_provenance_mismatch_is_refused():
    table = LatencyTable({"engine": "ort", "batch": 1}, {})
    table.check({"engine": "ort", "batch": 1})
    with pytest.raises(TableError, match="batch: table 1 vs now 8"):
        table.check({"engine": "ort", "batch": 8})


def test_save_load_round_trip_and_bad_file(tmp_path):
    table = LatencyTable({"engine": "ort"}, {"fixed": _stats(1.0)}, scale=1.2)
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == table
    (tmp_path / "bad.json").write_text(json.dumps({"entries": {}}))
    with pytest.raises(TableError, match="not a planer.latency/1 latency table"):
        LatencyTable.load(tmp_path / "bad.json")


def test_profile_measures_blocks_and_reuses_the_cache():
    arch = small_arch()
    candidates = [BlockSpec.skip(), BlockSpec.attn(2, 16), BlockSpec.ffn(64), BlockSpec.moe(4, 2, 32)]
    table = profile(arch, candidates, DEP, show_progress=False)
    # the fixed part once per precision its head may run in
    assert set(table.entries) == {"fixed", "fixed@int8", "attn2x16", "ffn64", "moe4k2x32"}
    assert all(e["p50"] > 0 and e["count"] >= 5 for e in table.entries.values())
    int8_head = replace(arch, head_precision="int8")
    assert table.predict(int8_head) - table.predict(arch) == pytest.approx(
        table.entries["fixed@int8"]["p50"] - table.entries["fixed"]["p50"])
    assert table.provenance["batch"] == 1 and table.provenance["engine"] == "ort"
    again = profile(arch, candidates, DEP, table=table, show_progress=False)
    assert again.entries == table.entries  # nothing re-timed
    wider = profile(arch, candidates + [BlockSpec.ffn(32)], DEP, table=table, show_progress=False)
    assert set(wider.entries) - set(table.entries) == {"ffn32"}
    with pytest.raises(TableError, match="batch"):
        profile(arch, [BlockSpec.ffn(16)], Deployment(batch=2, tgt_len=16, mem_len=16, threads=1, min_iters=5,
                                                        min_seconds=0.05), table=table, show_progress=False)


def test_auto_lowering_is_the_one_the_engine_runs_fastest():
    assert Deployment(engine="ort").lowerings() == ("ops", "ort-moe")
    assert Deployment(engine="trt").lowerings() == ("ops", "trt")
    assert Deployment(engine="ort-cuda").lowering == "auto" and Deployment(engine="ort").lowering == "ops"
    auto = Deployment(batch=1, tgt_len=16, mem_len=16, threads=1, min_iters=5, min_seconds=0.05, lowering="auto")
    moe = [BlockSpec.moe(4, 1, 32), BlockSpec.moe(2, 2, 64)]
    # gelu_tanh: both lowerings export it exactly, so both are timed
    table = profile(small_arch(activation="gelu_tanh"), [BlockSpec.ffn(64), *moe], auto, show_progress=False)
    trials = table.provenance["lowering_trials"]
    assert set(trials) == {"ops", "ort-moe"} and all(ms > 0 for ms in trials.values())
    chosen = table.provenance["lowering"]
    assert chosen == min(trials, key=trials.get) and auto.resolved(table).lowering == chosen
    # the table's MoE entries are the chosen lowering's timings (the baseline's own MoE block among them)
    labels = {b.label() for b in (*small_arch().blocks, *moe) if b.kind == "moe"}
    assert sum(table.entries[label]["p50"] for label in labels) == pytest.approx(trials[chosen], abs=1e-3)
    again = profile(small_arch(activation="gelu_tanh"), moe, auto, table=table, show_progress=False)
    assert again.entries == table.entries and again.provenance == table.provenance  # the choice is kept
    # exact gelu has no form in the fused op: only `ops` is timed
    exact = profile(small_arch([BlockSpec.attn(2, 16), moe[0]]), [], auto, show_progress=False)
    assert exact.provenance["lowering"] == "ops" and set(exact.provenance["lowering_trials"]) == {"ops"}
    # no MoE block: nothing to choose between
    dense = profile(small_arch([BlockSpec.attn(2, 16), BlockSpec.ffn(64)]), [], auto, show_progress=False)
    assert dense.provenance["lowering"] == "ops" and "lowering_trials" not in dense.provenance


def test_default_space_follows_the_paper():
    arch = small_arch([BlockSpec.attn(4, 8), BlockSpec.ffn(64)] * 2)
    space = SearchSpace.default(arch)
    labels = [c.label() for c in space.candidates]
    assert space.positions == 8
    assert labels[:8] == ["skip", "attn1x8", "attn2x8", "attn4x8", "linear", "ffn16", "ffn32", "ffn64"]
    assert "moe16k2x64" in labels and len(labels) == 8 + 4 * 2 * 3


def test_timing_interleaves_and_reports_spread():
    calls = []

    class Fake:
        name, input_names, output_names = "fake", [], []

        def __init__(self, tag):
            self.tag = tag

        def run(self, feeds):
            calls.append(self.tag)
            return {}

        def provenance(self):
            return {}

    a, b = time_engines([(Fake("a"), {}), (Fake("b"), {})], warmup=1, min_iters=4, min_seconds=0)
    assert calls[2:] == ["a", "b"] * 4 and a.count == b.count == 4
    assert time_engine(Fake("c"), {}, warmup=0, min_iters=3, min_seconds=0).count == 3
    # spread is p90 / p50, percentiles interpolated linearly between the sorted samples 2 2 3 5: p50 at rank 1.5,
    # (2 + 3) / 2 = 2.5; p90 at rank 2.7, 3 + 0.7 * (5 - 3) = 4.4
    assert LatencyStats.of([5, 2, 3, 2]).spread == pytest.approx(4.4 / 2.5)
