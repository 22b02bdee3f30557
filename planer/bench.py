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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planer.errors import PlanerError
from planer.files import atomic_write, exported_model, file_digest
from planer.runtime import LatencyStats, describe_engine, load_engine, time_engines
from planer.runtime.feeds import example_feeds

FORMAT = "planer.bench/1"
REFERENCE_DIR = "baseline"
_DEPLOYMENT = ("batch", "tgt_len", "mem_len", "threads")


@dataclass(frozen=True)
class Measurement:
    engine: dict[str, Any]
    deployment: dict[str, int]
    build: LatencyStats
    reference: LatencyStats
    digests: dict[str, str]  # "build", "reference" -> SHA-256 of the model.onnx timed

    @property
    def ratio(self) -> float:
        """Build p50 / reference p50: below 1 the build is faster."""
        return self.build.p50 / self.reference.p50

    def tokens_per_s(self, stats: LatencyStats) -> float:
        return self.deployment["batch"] * self.deployment["tgt_len"] / stats.p50 * 1e3

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "ratio": self.ratio, "engine": self.engine, "deployment": self.deployment,
                **{name: stats.to_dict() | {"tokens_per_s": self.tokens_per_s(stats), "sha256": self.digests[name]}
                   for name, stats in (("build", self.build), ("reference", self.reference))}}

    def table(self) -> str:
        d = self.deployment
        rows = [f"{d['batch']} x {d['tgt_len']} tokens, memory {d['mem_len']}, {self.engine['engine']} "
                f"({d['threads'] or 'default'} threads), timed interleaved",
                f"{'':12}{'p50 ms':>9}{'p90':>9}{'p99':>9}{'spread':>8}{'tokens/s':>11}"]
        for name, s in (("build", self.build), ("reference", self.reference)):
            rows.append(f"{name:12}{s.p50:9.3f}{s.p90:9.3f}{s.p99:9.3f}{s.spread:8.2f}{self.tokens_per_s(s):11.0f}")
        rows.append(f"build / reference (p50): {self.ratio:.3f}")
        return "\n".join(rows)


def default_deployment(build_dir: str | os.PathLike) -> dict[str, int | None]:
    """The deployment the build was made for (build.json), else the architecture's segment lengths at batch 1."""
    build = Path(build_dir)
    request = build / "build.json"
    if request.is_file():
        dep = json.loads(request.read_text())["deployment"]
        return {k: dep[k] for k in _DEPLOYMENT}
    arch = exported_model(build, "build")[1]
    return {"batch": 1, "tgt_len": arch.tgt_len, "mem_len": arch.mem_len, "threads": None}


def measure(build_dir: str | os.PathLike, reference_dir: str | os.PathLike | None = None, *, engine: str = "ort",
            batch: int = 1, tgt_len: int, mem_len: int, threads: int | None = None, min_seconds: float = 2.0,
            min_iters: int = 50) -> Measurement:
    """Times BUILD/model.onnx and the reference's model.onnx interleaved, on the same-shaped random inputs."""
    build = Path(build_dir)
    reference = build / REFERENCE_DIR if reference_dir is None else Path(reference_dir)
    if min(batch, tgt_len) < 1 or mem_len < 0:
        raise PlanerError("batch and tgt-len must be at least 1, mem-len at least 0")
    runs, digests = [], {}
    for directory, what in ((build, "build"), (reference, "reference")):
        path, arch = exported_model(directory, what)
        digests[what] = file_digest(path)
        runs.append((load_engine(engine, str(path), threads=threads, shape=(batch, tgt_len, mem_len)),
                     example_feeds(arch, batch, tgt_len, mem_len)))
    build_stats, reference_stats = time_engines(runs, min_seconds=min_seconds, min_iters=min_iters)
    return Measurement(describe_engine(engine, threads=threads),
                       {"batch": batch, "tgt_len": tgt_len, "mem_len": mem_len, "threads": threads or 0},
                       build_stats, reference_stats, digests)


def save(measurement: Measurement, path: str | os.PathLike) -> None:
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
    return stored


def gate(now: Measurement, stored: dict[str, Any], max_slowdown: float) -> tuple[bool, str]:
    """Whether the build / reference ratio stayed within max_slowdown x the stored one, and a readable diff."""
    if stored["deployment"] != now.deployment:
        raise PlanerError(f"the reference was measured at {stored['deployment']}, this run at {now.deployment}; "
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
