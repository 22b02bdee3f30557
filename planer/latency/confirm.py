"""A build's latency verdict: the baseline and the networks judged against it, timed side by side in several
separate runs, so that one run on a noisy machine cannot decide whether a target was met."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from planer.arch import Architecture
from planer.deployment import Deployment
from planer.latency.profile import measure
from planer.runtime import LatencyStats
from planer.runtime.timing import steadiest


@dataclass(frozen=True)
class Confirmation:
    """Every confirmation run: `runs[r][i]` is model i's figures in run r (model 0 the baseline), the steadiest
    of that run's `tries[r]` tries.

    A speedup is the median over runs of each run's own ratio, never a ratio of figures pooled across runs:
    within one interleaved run the models met the same load, so only a within-run ratio cancels the machine's
    drift, and the median discards a run thrown by a burst of load either way.
    """

    runs: list[list[LatencyStats]]
    tries: list[int]

    def ratios(self, i: int) -> list[float]:
        """Baseline p50 / model i's p50, run by run."""
        return [run[0].p50 / run[i].p50 for run in self.runs]

    def ratio(self, i: int) -> float:
        """How many times faster than the baseline model i is: the median of the per-run ratios."""
        return statistics.median(self.ratios(i))

    def median_run(self, i: int) -> list[LatencyStats]:
        """The figures of the run whose ratio for model i is the median (of an even count, the lower middle one).

        One run's figures for every model, not per-model medians: a table of them then agrees with the
        headline (baseline p50 / model p50 is the median ratio), and no figure pairs one run's baseline with
        another run's network."""
        ratios = self.ratios(i)
        return self.runs[ratios.index(statistics.median_low(ratios))]

    def p50(self, i: int) -> float:
        """Model i's median p50 over runs: the absolute figure to hold against a latency target in ms."""
        return statistics.median(run[i].p50 for run in self.runs)

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        """Every run, its models' figures under `names` (in model order), and each model's median speedup."""
        return {"runs": [{"tries": tries, "models": {n: s.to_dict() for n, s in zip(names, run, strict=True)}}
                         for run, tries in zip(self.runs, self.tries)],
                "speedups": {n: self.ratio(i) for i, n in enumerate(names) if i}}


def confirm(models: list[tuple[str, Architecture]], dep: Deployment, runs: int = 3) -> Confirmation:
    """Time `models` (ONNX path, architecture; the baseline first) interleaved at `dep`'s settings in `runs`
    separate runs; a run in which some model's spread exceeds dep.max_spread is timed again, at most
    dep.retries times, keeping its steadiest try.

    Several runs, since one is at the mercy of whatever else the machine ran meanwhile (the same network
    measured 1.95x in one build and 2.17x in the next). A noisy run is timed again whole, not its noisy
    model alone (planer.runtime.timing.steadiest)."""
    tried = [steadiest(lambda: measure(models, dep), dep.max_spread, dep.retries) for _ in range(runs)]
    return Confirmation([stats for stats, _ in tried], [tries for _, tries in tried])
