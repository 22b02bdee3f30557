"""A build's verdict: latency confirmed over several runs, and the accuracy comparison refused when unfair."""

import itertools
import json

import pytest

from planer.build import CONTINUED, Budget, _Build, _trained
from planer.deployment import Deployment, Target
from planer.errors import PlanerError
from planer.latency import confirm as confirm_module
from planer.latency.confirm import confirm
from planer.nn import LM
from planer.runtime import LatencyStats
from planer.search.search import SearchConfig
from tests.conftest import small_arch

MODELS = [("baseline.onnx", None), ("result.onnx", None)]


def stats(p50: float, spread: float = 1.05) -> LatencyStats:
    return LatencyStats(p50, p50 * spread, p50 * spread * 1.1, p50, p50 * 0.9, 50)


def scripted(monkeypatch, tries: list[list[LatencyStats]]) -> list[list[LatencyStats]]:
    """measure() answers the scripted tries in turn; returns the list of what it answered."""
    script, answered = iter(tries), []
    monkeypatch.setattr(confirm_module, "measure", lambda models, dep: answered.append(next(script)) or answered[-1])
    return answered


@pytest.mark.parametrize("ratios", list(itertools.permutations([1.9, 2.2, 2.1])))
def test_headline_is_the_median_of_per_run_ratios(monkeypatch, ratios):
    # The baseline drifts between runs, so pooling p50s across runs (median baseline / median result) gives
    # another figure than the median of the runs' own ratios.
    bases = [10.0, 12.0, 8.0]
    scripted(monkeypatch, [[stats(b), stats(b / r)] for b, r in zip(bases, ratios)])
    confirmation = confirm(MODELS, Deployment())
    assert confirmation.ratio(1) == pytest.approx(2.1)
    median = ratios.index(2.1)
    assert confirmation.median_run(1) == confirmation.runs[median]
    assert confirmation.median_run(1)[0].p50 == bases[median]
    saved = confirmation.to_dict(["baseline", "result"])
    assert [run["models"]["baseline"]["p50"] for run in saved["runs"]] == bases  # every run kept
    assert saved["speedups"] == {"result": pytest.approx(2.1)}


def test_a_noisy_run_is_timed_again_and_the_steadier_try_kept(monkeypatch):
    answered = scripted(monkeypatch, [
        [stats(10), stats(5)],
        [stats(10), stats(4, spread=1.5)],  # run 2: noisy
        [stats(10, spread=1.3), stats(5)],  # still noisy, but less: kept
        [stats(10), stats(3, spread=1.4)],  # noisier: dropped; the retries are spent
        [stats(10), stats(5)],
    ])
    confirmation = confirm(MODELS, Deployment(max_spread=1.2, retries=2))
    assert len(answered) == 5 and confirmation.tries == [1, 3, 1]
    assert confirmation.runs == [answered[0], answered[2], answered[4]]
    assert confirmation.ratio(1) == 2.0
    saved = confirmation.to_dict(["baseline", "result"])
    assert [run["tries"] for run in saved["runs"]] == [1, 3, 1]
    assert saved["runs"][1]["models"]["baseline"]["spread"] == 1.3


def test_a_steady_run_is_timed_once(monkeypatch):
    answered = scripted(monkeypatch, [[stats(10), stats(5)]] * 3)
    assert confirm(MODELS, Deployment(), runs=3).tries == [1, 1, 1] and len(answered) == 3


def fake_run(run_dir, tokens: int):
    """A finished training run's record, as _trained reads it."""
    run_dir.mkdir(parents=True)
    (run_dir / "eval.json").write_text(json.dumps({"tokens_seen": tokens, "valid": {"loss": 3.0}}))
    return run_dir


@pytest.mark.parametrize("method", ["gumbel", "local"])
def test_a_reused_reference_trained_on_fewer_tokens_is_refused(tmp_path, monkeypatch, method):
    """Before it is copied, or teaches anything: the result trains on the search's steps (the local search's kept
    blocks' included) and the distillation's, every one a segment on every stream."""
    budget = Budget(SearchConfig(rounds=2, steps=3, batch=2, local_steps=5), distill_steps=4).searching(method)
    work = tmp_path / "build.partial"
    stages = _Build(work, work, work, LM(small_arch()), None, None, None, Deployment(), Target(speedup=2), budget,
                    False, None)
    needed = 2 * 3 + 4  # whichever the method: the local search's 5 steps are taken from them
    assert budget.result_steps == (needed - 5 if method == "local" else needed)
    needed *= 2 * 16  # streams x tgt_len
    monkeypatch.setattr(_Build, "trained", lambda self, out, init, teacher, **k: out)  # what it would load or train
    short = fake_run(tmp_path / "short" / CONTINUED, needed - 1)
    with pytest.raises(PlanerError, match=f"trained on {needed - 1:,} tokens, fewer than the {needed:,} the result"):
        stages.reference(CONTINUED, short, None)
    assert not (work / CONTINUED).exists()
    enough = fake_run(tmp_path / "enough" / CONTINUED, needed)
    assert stages.reference(CONTINUED, enough, None) == work / CONTINUED
    assert json.loads((work / CONTINUED / "eval.json").read_text())["tokens_seen"] == needed


def test_tokens_trained_are_the_runs_records(tmp_path):
    # two runs of one budget that recorded different counts: a count made from the budget's arithmetic would be
    # the same for both
    for recorded in (600, 1234):
        run_dir = fake_run(tmp_path / str(recorded) / "distill", recorded)
        assert _trained(run_dir, 1000)["tokens_trained"] == 1000 + recorded  # the baseline's + the record's
