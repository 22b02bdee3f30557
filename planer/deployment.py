"""What a user deploys to and asks a build for: the engine, its settings and the shape of a call (Deployment),
and the latency target (Target), each checked once when made.

Everything that carries a deployment (profiling, the search, a build, its verdict, `planer bench`'s stored
reference) takes these types. Torch-free, like the runtime they describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from planer.choices import LOWERINGS
from planer.errors import PlanerError
from planer.latency.table import LatencyTable
from planer.space import SearchSpace

_LOWERING_ENGINES = {"trt": ("trt",), "ort-moe": ("ort", "ort-cuda")}  # `ops` runs everywhere
AUTO = "auto"  # the lowering whose MoE blocks the engine runs fastest, chosen when profiling
# Without a lowering named: TensorRT runs its plugin; ONNX Runtime on a GPU measures `ops` against the fused
# op; on a CPU `ops` beat the fused op at every shape measured (benchmarks/RESULTS.md, dispatch_efficiency).
_DEFAULT_LOWERING = {"trt": "trt", "ort-cuda": AUTO}
# The precisions planer builds blocks in per engine, made with the engine's own tools. Which one is faster is
# measured per block when profiling: int8 need not pay on a CPU without VNNI, and the table says so.
ENGINE_PRECISIONS = {"ort": ("fp32", "int8"), "ort-cuda": ("fp32",), "trt": ("fp32",)}


@dataclass(frozen=True)
class Deployment:
    """The shape and engine settings a latency figure is valid for."""

    engine: str = "ort"
    batch: int = 1
    tgt_len: int = 128
    mem_len: int = 128
    threads: int = 2
    lowering: str = ""  # "" = the engine's own (_DEFAULT_LOWERING, else `ops`); `auto` = measured by profile()
    precisions: tuple[str, ...] = ()  # () = every precision the engine runs (ENGINE_PRECISIONS)
    warmup: int = 5
    min_iters: int = 30
    min_seconds: float = 0.5
    max_spread: float = 1.2  # p90/p50 above this means a noisy measurement: time again
    retries: int = 2
    verdict_seconds: float = 2.0  # at least this long per run for the measurements that decide the target

    def __post_init__(self) -> None:
        if min(self.batch, self.tgt_len) < 1 or min(self.mem_len, self.threads) < 0:
            raise PlanerError(f"batch {self.batch}, tgt-len {self.tgt_len}, mem-len {self.mem_len}, threads "
                              f"{self.threads}: batch and tgt-len must be at least 1, mem-len and threads at least 0")
        if not self.lowering:
            object.__setattr__(self, "lowering", _DEFAULT_LOWERING.get(self.engine, "ops"))
        runs = ENGINE_PRECISIONS.get(self.engine, ("fp32",))
        precisions = tuple(dict.fromkeys(self.precisions or runs))
        refused = [p for p in precisions if p not in runs]
        if refused:
            raise PlanerError(f"engine {self.engine} does not run {refused[0]} blocks; it runs "
                              f"{', '.join(runs)} (--precision {','.join(runs)})")
        if "fp32" not in precisions:
            raise PlanerError("--precision must include fp32: the baseline and the fixed part run in it")
        object.__setattr__(self, "precisions", precisions)
        if self.lowering not in (*LOWERINGS, AUTO):
            raise PlanerError(f"unknown MoE lowering {self.lowering!r}; use one of {', '.join(LOWERINGS)} or {AUTO}")
        engines = _LOWERING_ENGINES.get(self.lowering)
        if engines and self.engine not in engines:
            raise PlanerError(f"the {self.lowering} MoE lowering does not run in engine {self.engine} (only in "
                              f"{' or '.join(engines)}); use --lowering ops, or leave --lowering out")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.batch, self.tgt_len, self.mem_len

    def export_options(self) -> dict[str, Any]:
        """planer.export's options for graphs timed or shipped at this deployment."""
        return {"lowering": self.lowering, "min_context": self.tgt_len + self.mem_len}

    def timing(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "min_iters": self.min_iters, "min_seconds": self.min_seconds}

    def verdict(self) -> Deployment:
        """Timed longer, for the measurements that decide whether a target is met."""
        return replace(self, min_seconds=max(self.min_seconds, self.verdict_seconds),
                       min_iters=max(self.min_iters, 50))

    def lowerings(self) -> tuple[str, ...]:
        """The lowerings this engine runs, for `auto` to choose from."""
        return tuple(lo for lo in LOWERINGS if self.engine in _LOWERING_ENGINES.get(lo, (self.engine,)))

    def searchable(self, space: SearchSpace) -> SearchSpace:
        """`space` with every block in each precision this deployment runs. int8 MoE only in the `ops`
        lowering: the other lowerings fuse the experts into one fp32 op."""
        return space.in_precisions(self.precisions, moe=self.lowering == "ops")

    def resolved(self, table: LatencyTable) -> Deployment:
        """This deployment with `auto` replaced by the lowering `table` was profiled in."""
        return replace(self, lowering=table.provenance["lowering"]) if self.lowering == AUTO else self


@dataclass(frozen=True)
class Target:
    """A latency target: `ms` in the engine, or `speedup` over the baseline timed beside the network. Exactly one."""

    ms: float | None = None
    speedup: float | None = None

    def __post_init__(self) -> None:
        if (self.ms is None) == (self.speedup is None):
            raise PlanerError("give exactly one target: --target-speedup S or --target-latency-ms X")
        option, value = ("--target-latency-ms", self.ms) if self.ms is not None else ("--target-speedup", self.speedup)
        if not (math.isfinite(value) and value > 0):
            raise PlanerError(f"{option} {value:g}: the target must be a finite number above 0")

    def ms_for(self, baseline_ms: float) -> float:
        """The target in milliseconds, for a baseline that measured `baseline_ms`."""
        return self.ms if self.ms is not None else baseline_ms / self.speedup

    def met(self, speedup: float, result_ms: float) -> bool:
        """Whether a result measured at `result_ms`, `speedup` times faster than the baseline beside it, meets it."""
        return speedup >= self.speedup if self.speedup is not None else result_ms <= self.ms

    def label(self) -> str:
        """Its part of a build's default directory name: x2, 4ms."""
        return f"x{self.speedup:g}" if self.speedup is not None else f"{self.ms:g}ms"
