"""The latency table: engine-measured milliseconds per block at one deployment shape.

A table is valid only for the engine, machine, software and shape it was
measured with; that is its provenance, compared before any reuse. `predict`
adds the fixed cost (embedding, final norm, head) to the blocks' latencies and
applies the calibration that end-to-end measurements taught (`calibrate`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from planer.arch import Architecture, BlockSpec
from planer.errors import PlanerError
from planer.files import atomic_write

FORMAT = "planer.latency/1"
FIXED = "fixed"


def fixed_label(head_precision: str = "fp32") -> str:
    """The table's label of the fixed part with its output head in `head_precision` (`fixed`, `fixed@int8`)."""
    return FIXED if head_precision == "fp32" else f"{FIXED}@{head_precision}"


class TableError(PlanerError):
    """A latency table that cannot be used for the request."""


@dataclass(frozen=True)
class LatencyTable:
    provenance: dict[str, Any]  # engine, versions, device, threads, dtype, shape, network variant
    entries: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> LatencyStats.to_dict()
    scale: float = 1.0  # end-to-end calibration: measured / sum of parts

    def has(self, label: str) -> bool:
        return label in self.entries

    def block_ms(self, spec: BlockSpec) -> float:
        if spec.kind == "skip":
            return 0.0
        try:
            return self.entries[spec.label()]["p50"]
        except KeyError:
            raise TableError(f"the latency table has no entry for {spec.label()}; profile the search space "
                             "that contains it (`planer profile --space ...`)") from None

    def fixed_ms(self, head_precision: str = "fp32") -> float:
        """The fixed part's p50 (embedding, final norm, the head in `head_precision`), uncalibrated."""
        label = fixed_label(head_precision)
        if label not in self.entries:
            raise TableError(f"the latency table has no {label} entry; profile it again")
        return self.entries[label]["p50"]

    def predict(self, arch: Architecture) -> float:
        """Predicted end-to-end p50 milliseconds of `arch` at the table's shape."""
        return self.scale * (self.fixed_ms(arch.head_precision) + sum(self.block_ms(b) for b in arch.blocks))

    def calibrate(self, measured: Iterable[tuple[Architecture, float]]) -> LatencyTable:
        """A table whose predictions match end-to-end measurements (arch, measured p50 ms) in the median.

        The sum of separately-timed blocks misses what only the whole graph
        shows (fusion across blocks, cache effects, per-run overhead); one
        global factor corrects most of it.
        """
        ratios = [ms / (self.predict(arch) / self.scale) for arch, ms in measured]
        if not ratios:
            return self
        return replace(self, scale=statistics.median(ratios))

    def check(self, provenance: dict[str, Any]) -> None:
        """Refuse to use the table for a different engine, machine, software or shape."""
        diffs = [f"{k}: table {self.provenance.get(k)!r} vs now {v!r}" for k, v in provenance.items()
                 if self.provenance.get(k) != v]
        if diffs:
            raise TableError(f"the latency table was measured elsewhere ({'; '.join(diffs[:3])}); "
                             "profile again for this engine and shape")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "provenance": self.provenance, "scale": self.scale, "entries": self.entries}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @staticmethod
    def load(path: str | os.PathLike) -> LatencyTable:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except OSError as e:
            raise TableError(f"{p}: cannot read the latency table ({e.strerror})") from None
        except ValueError as e:
            raise TableError(f"{p}: not a latency table ({e}); delete it and profile again") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise TableError(f"{p}: not a {FORMAT} latency table; delete it and profile again")
        provenance, entries, scale = d.get("provenance"), d.get("entries"), d.get("scale", 1.0)
        if not (isinstance(provenance, dict) and isinstance(entries, dict) and _finite_non_negative(scale)
                and scale > 0
                and all(isinstance(e, dict) and _finite_non_negative(e.get("p50")) for e in entries.values())):
            raise TableError(f"{p}: damaged (its provenance, entries or scale are not what planer writes); delete "
                             "it and profile again")
        return LatencyTable(provenance, entries, scale)


def _finite_non_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf
