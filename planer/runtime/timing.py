"""The one engine-timing function behind every latency figure planer reports.

Profiling, the search's feedback, `planer bench`, the benchmarks and the CI
gate all call `time_engines`, so a millisecond means the same everywhere.
Several engines passed together are timed interleaved (A B A B ...), so drift
on a shared machine hits them alike and their ratio stays meaningful.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from planer.runtime.engine import Engine


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per call."""

    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    count: int

    @property
    def spread(self) -> float:
        """p90 / p50: near 1 on a quiet machine; above ~1.2 the figure is noisy."""
        return self.p90 / self.p50 if self.p50 > 0 else math.inf

    @staticmethod
    def of(samples_ms: Sequence[float]) -> LatencyStats:
        a = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return LatencyStats(float(p50), float(p90), float(p99), float(a.mean()), float(a.min()), int(a.size))

    def scaled(self, factor: float) -> LatencyStats:
        """The same timings under a load `factor` times as slow (the spread unchanged)."""
        return LatencyStats(self.p50 * factor, self.p90 * factor, self.p99 * factor, self.mean * factor,
                            self.min * factor, self.count)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": round(self.spread, 4)}

    def __str__(self) -> str:
        return (f"p50 {self.p50:.3f} ms, p90 {self.p90:.3f}, p99 {self.p99:.3f} "
                f"(n={self.count}, spread {self.spread:.2f})")


Feeds = Mapping[str, np.ndarray]


def time_engines(runs: Sequence[tuple[Engine, Feeds]], *, warmup: int = 5, min_iters: int = 20,
                 min_seconds: float = 1.0, max_iters: int = 100_000) -> list[LatencyStats]:
    """Time each (engine, feeds) pair, interleaved, until every pair has at least
    `min_iters` samples and the loop has run for `min_seconds`."""
    if not runs:
        raise ValueError("nothing to time")
    for engine, feeds in runs:
        for _ in range(warmup):
            engine.run(feeds)
    samples: list[list[float]] = [[] for _ in runs]
    start = time.perf_counter()
    iters = 0
    while iters < max_iters and (iters < min_iters or time.perf_counter() - start < min_seconds):
        for i, (engine, feeds) in enumerate(runs):
            t0 = time.perf_counter()
            engine.run(feeds)
            samples[i].append((time.perf_counter() - t0) * 1e3)
        iters += 1
    return [LatencyStats.of(s) for s in samples]


def time_engine(engine: Engine, feeds: Feeds, **kwargs: Any) -> LatencyStats:
    """Time one engine alone (see `time_engines`)."""
    return time_engines([(engine, feeds)], **kwargs)[0]


def steadiest(measure: Callable[[], list[LatencyStats]], max_spread: float, retries: int
              ) -> tuple[list[LatencyStats], int]:
    """The steadiest of `measure`'s interleaved runs: run again while the noisiest figure's spread exceeds
    `max_spread`, at most `retries` more times. Returns it and the number of runs it took. A noisy run is run
    again whole, not its noisy model alone: a ratio means something only between figures of one run."""
    best, tries = measure(), 1
    while noise(best) > max_spread and tries <= retries:
        best, tries = min(best, measure(), key=noise), tries + 1
    return best, tries


def noise(stats: Sequence[LatencyStats]) -> float:
    """A run is as noisy as its noisiest figure."""
    return max(s.spread for s in stats)
