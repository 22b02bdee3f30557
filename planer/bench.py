"""`planer bench`: a build's latency as a ratio to a reference model timed in the same run, and the CI
gate that fails when that ratio regresses.

Absolute milliseconds move with the machine (CI runners differ, neighbours
come and go); the ratio to a reference timed interleaved with the build moves
far less, so the gate stores and compares ratios. The reference is by default
the build's own baseline (BUILD/baseline, written by `planer build`).

    planer bench builds/x2 --save latency-reference.json          # once, on a good build
    planer bench builds/x2 --against latency-reference.json       # in CI: non-zero exit on regression
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planer.deployment import Deployment
from planer.errors import PlanerError
from planer.files import REQUEST_FILE, atomic_write, exported_model, file_digest
from planer.runtime import LatencyStats, describe_engine, load_engine, time_engines
from planer.runtime.feeds import example_feeds
from planer.runtime.timing import noise, steadiest

FORMAT = "planer.bench/1"
REFERENCE_DIR = "baseline"
_STORED = ("batch", "tgt_len", "mem_len", "threads")  # what a reference records of its deployment (0 threads: the
# engine's default)


@dataclass(frozen=True)
class Measurement:
    engine: dict[str, Any]  # describe_engine's: name, version, CPU
    deployment: Deployment
    build: LatencyStats
    reference: LatencyStats
    digests: dict[str, str]  # "build", "reference" -> SHA-256 of the model.onnx timed

    @property
    def ratio(self) -> float:
        """Build p50 / reference p50: below 1 the build is faster."""
        return self.build.p50 / self.reference.p50

    def tokens_per_s(self, stats: LatencyStats) -> float:
        return self.deployment.batch * self.deployment.tgt_len / stats.p50 * 1e3

    def stored_deployment(self) -> dict[str, int]:
        return {k: getattr(self.deployment, k) for k in _STORED}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "ratio": self.ratio, "engine": self.engine, "deployment": self.stored_deployment(),
                **{name: stats.to_dict() | {"tokens_per_s": self.tokens_per_s(stats), "sha256": self.digests[name]}
                   for name, stats in (("build", self.build), ("reference", self.reference))}}

    def table(self) -> str:
        d = self.deployment
        rows = [f"{d.batch} x {d.tgt_len} tokens, memory {d.mem_len}, {self.engine['engine']} "
                f"({d.threads or 'default'} threads), timed interleaved",
                f"{'':12}{'p50 ms':>9}{'p90':>9}{'p99':>9}{'spread':>8}{'tokens/s':>11}"]
        for name, s in (("build", self.build), ("reference", self.reference)):
            rows.append(f"{name:12}{s.p50:9.3f}{s.p90:9.3f}{s.p99:9.3f}{s.spread:8.2f}{self.tokens_per_s(s):11.0f}")
        rows.append(f"build / reference (p50): {self.ratio:.3f}")
        return "\n".join(rows)


def default_deployment(build_dir: str | os.PathLike, stored: dict[str, Any] | None = None) -> Deployment:
    """The deployment of a stored reference, else the one the build was made for (build.json), else ONNX Runtime
    at the architecture's segment lengths, batch 1, the engine's default threads; timed 2 s per try."""
    timing = {"min_seconds": 2.0, "min_iters": 50}
    if stored is not None:
        return Deployment(engine=stored["engine"]["engine"], **stored["deployment"], **timing)
    build = Path(build_dir)
    request = build / REQUEST_FILE
    if request.is_file():
        dep = json.loads(request.read_text())["deployment"]
        return Deployment(engine=dep.get("engine", "ort"), **{k: dep[k] for k in _STORED}, **timing)
    arch = exported_model(build, "build")[1]
    return Deployment(tgt_len=arch.tgt_len, mem_len=arch.mem_len, threads=0, **timing)


def measure(build_dir: str | os.PathLike, reference_dir: str | os.PathLike | None = None, *,
            dep: Deployment) -> Measurement:
    """Times BUILD/model.onnx and the reference's model.onnx interleaved, on the same-shaped random inputs, as
    `dep` says (its shape, threads (0: the engine's default) and timing)."""
    build = Path(build_dir)
    reference = build / REFERENCE_DIR if reference_dir is None else Path(reference_dir)
    threads = dep.threads or None
    runs, digests = [], {}
    for directory, what in ((build, "build"), (reference, "reference")):
        path, arch = exported_model(directory, what)
        digests[what] = file_digest(path)
        runs.append((load_engine(dep.engine, str(path), threads=threads, shape=dep.shape),
                     example_feeds(arch, *dep.shape)))
    (build_stats, reference_stats), _ = steadiest(
        lambda: time_engines(runs, min_seconds=dep.min_seconds, min_iters=dep.min_iters), dep.max_spread, dep.retries)
    return Measurement(describe_engine(dep.engine, threads=threads), dep, build_stats, reference_stats, digests)


def save(measurement: Measurement, path: str | os.PathLike) -> None:
    """Write `measurement` as a reference; a noisy one is refused, since every later run would be judged by it."""
    spread = noise([measurement.build, measurement.reference])
    if spread > measurement.deployment.max_spread:
        raise PlanerError(f"not saved: the machine was too noisy to store a reference (p90/p50 {spread:.2f} > "
                          f"{measurement.deployment.max_spread:g} after {measurement.deployment.retries + 1} runs); "
                          "run it again on a quiet machine")
    atomic_write(Path(path), json.dumps(measurement.to_dict(), indent=2) + "\n")


def load_reference(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanerError(f"{path}: no such file; write one with `planer bench BUILD --save {path}`") from None
    except ValueError as e:
        raise PlanerError(f"{path}: not JSON ({e}); write it again with `planer bench BUILD --save`") from None
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise PlanerError(f"{path}: not a planer bench reference ({FORMAT}); write one with `planer bench --save`")
    problem = _damage(stored)
    if problem:
        raise PlanerError(f"{path}: {problem}; write it again with `planer bench BUILD --save {path}`")
    return stored


def _damage(stored: dict[str, Any]) -> str | None:
    """What makes a stored reference unusable (a file edited or damaged), or None. A ratio that does not follow
    from its own p50s would make the gate pass or fail whatever is measured."""
    def positive(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf

    for name in ("build", "reference"):
        if not isinstance(stored.get(name), dict) or not positive(stored[name].get("p50")):
            return f"'{name}' lacks a positive p50"
    if not isinstance(stored.get("engine"), dict) or not isinstance(stored["engine"].get("engine"), str):
        return "'engine' does not name the engine"
    deployment = stored.get("deployment")
    if not isinstance(deployment, dict) or set(deployment) != set(_STORED) or not all(
            isinstance(deployment[k], int) and not isinstance(deployment[k], bool)
            and deployment[k] >= (0 if k in ("mem_len", "threads") else 1) for k in _STORED):
        return f"'deployment' must give {', '.join(_STORED)} as whole numbers (batch and tgt_len at least 1)"
    ratio = stored.get("ratio")
    if not positive(ratio) or not math.isclose(ratio, stored["build"]["p50"] / stored["reference"]["p50"],
                                               rel_tol=1e-6):
        return "its 'ratio' is not its build p50 over its reference p50"
    return None


def gate(now: Measurement, stored: dict[str, Any], max_slowdown: float) -> tuple[bool, str]:
    """Whether the build / reference ratio stayed within max_slowdown x the stored one, and a readable diff."""
    if stored["deployment"] != now.stored_deployment():
        raise PlanerError(f"the reference was measured at {stored['deployment']}, this run at "
                          f"{now.stored_deployment()}; "
                          "measure the same deployment (omit the shape options to use the stored one)")
    before = stored["reference"].get("sha256")
    if before is None:
        raise PlanerError("the stored reference does not say which reference model it was measured on (written by "
                          "an older planer); write it again with `planer bench BUILD --save`")
    if before != now.digests["reference"]:
        # The gate's ratio is only comparable against the same reference: another one would hide (or invent)
        # a change of the build's own latency.
        raise PlanerError(f"the reference model timed now (sha256 {now.digests['reference'][:12]}) is not the one "
                          f"the stored ratio was measured against ({before[:12]}); pass that model with "
                          "--reference, or store a new reference with --save")
    change = now.ratio / stored["ratio"]
    ok = change <= max_slowdown
    rows = [f"{'':20}{'stored':>9}{'now':>9}{'change':>9}",
            f"{'build / reference':20}{stored['ratio']:9.3f}{now.ratio:9.3f}{(change - 1) * 100:+8.1f}%",
            f"{'build p50 ms':20}{stored['build']['p50']:9.3f}{now.build.p50:9.3f}",
            f"{'reference p50 ms':20}{stored['reference']['p50']:9.3f}{now.reference.p50:9.3f}",
            f"limit {(max_slowdown - 1) * 100:+.1f}% (max-slowdown {max_slowdown:g}): "
            + ("pass" if ok else "REGRESSED: the build is slower relative to the reference than when stored")]
    if stored["build"].get("sha256") == now.digests["build"]:
        rows.append("build model: the one stored")
    if stored["engine"].get("cpu") != now.engine.get("cpu"):
        rows.append(f"note: stored on {stored['engine'].get('cpu')}, measured on {now.engine.get('cpu')}")
    return ok, "\n".join(rows)
