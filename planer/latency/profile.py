"""Profiling: every candidate block exported alone and timed in the target engine at the deployment shape."""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from planer import __version__
from planer.arch import Architecture, BlockSpec
from planer.errors import PlanerError
from planer.latency.table import FIXED, LatencyTable
from planer.runtime import Engine, LatencyStats, describe_engine, load_engine, time_engine, time_engines
from planer.runtime.feeds import example_feeds


_LOWERING_ENGINES = {"trt": ("trt",), "ort-moe": ("ort", "ort-cuda")}  # `ops` runs everywhere


@dataclass(frozen=True)
class Deployment:
    """The shape and engine settings a latency figure is valid for."""

    engine: str = "ort"
    batch: int = 1
    tgt_len: int = 128
    mem_len: int = 128
    threads: int = 2
    lowering: str = ""  # "" = the engine's own: `trt` in TensorRT, `ops` elsewhere
    warmup: int = 5
    min_iters: int = 30
    min_seconds: float = 0.5
    max_spread: float = 1.2  # p90/p50 above this means a noisy measurement: time again
    retries: int = 2

    def __post_init__(self) -> None:
        from planer.export.lowering import LOWERINGS

        if not self.lowering:
            object.__setattr__(self, "lowering", "trt" if self.engine == "trt" else "ops")
        if self.lowering not in LOWERINGS:
            raise PlanerError(f"unknown MoE lowering {self.lowering!r}; use one of {', '.join(LOWERINGS)}")
        engines = _LOWERING_ENGINES.get(self.lowering)
        if engines and self.engine not in engines:
            raise PlanerError(f"the {self.lowering} MoE lowering does not run in engine {self.engine} (only in "
                              f"{' or '.join(engines)}); use --lowering ops, or leave --lowering out")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.batch, self.tgt_len, self.mem_len

    def timing(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "min_iters": self.min_iters, "min_seconds": self.min_seconds}


def provenance(arch: Architecture, dep: Deployment, engine_info: dict[str, Any]) -> dict[str, Any]:
    """Everything a block's latency depends on besides the block itself."""
    return {
        **{k: engine_info.get(k) for k in ("engine", "onnxruntime", "providers", "cpu", "opt_level", "allow_spinning")},
        **{k: engine_info[k] for k in ("gpu", "tensorrt", "precision") if k in engine_info},
        "threads": dep.threads, "batch": dep.batch, "tgt_len": dep.tgt_len, "mem_len": dep.mem_len,
        "lowering": dep.lowering, "dtype": "float32", "machine": platform.machine(), "planer": __version__,
        **{k: getattr(arch, k) for k in ("d_model", "vocab_size", "norm", "pos", "activation", "bias",
                                         "tie_embeddings")},
    }


def _block_feeds(arch: Architecture, spec: BlockSpec, dep: Deployment, rng: np.random.Generator) -> dict:
    feeds = {"x": rng.standard_normal((dep.batch, dep.tgt_len, arch.d_model), dtype=np.float32)}
    if spec.kind == "attn":
        feeds["mem"] = rng.standard_normal((dep.batch, dep.mem_len, arch.d_model), dtype=np.float32)
    return feeds


def _steady(engine: Engine, feeds: dict, dep: Deployment) -> LatencyStats:
    """Time until the spread is at most dep.max_spread (a few tries), keeping the steadiest try."""
    best = time_engine(engine, feeds, **dep.timing())
    for _ in range(dep.retries):
        if best.spread <= dep.max_spread:
            break
        again = time_engine(engine, feeds, **dep.timing())
        best = min(best, again, key=lambda s: s.spread)
    return best


def profile(arch: Architecture, candidates: Iterable[BlockSpec], dep: Deployment, *,
            table: LatencyTable | None = None, show_progress: bool = True) -> LatencyTable:
    """Time each candidate block, the blocks of `arch` itself and the fixed cost of networks shaped like `arch`.

    Entries already in `table` are reused; the table's provenance must match. Under torchrun rank 0
    profiles and every rank receives its table.
    """
    from planer import distributed
    from planer.export import export_block, export_fixed

    if not distributed.is_main():
        return distributed.broadcast(None)

    prov = provenance(arch, dep, describe_engine(dep.engine, threads=dep.threads))
    if table is not None:
        table.check(prov)
    todo: list[BlockSpec | None] = [None]  # None stands for the fixed part
    todo += list(dict.fromkeys(c for c in (*arch.blocks, *candidates) if c.kind != "skip"))  # + the baseline's
    entries: dict[str, dict[str, float]] = dict(table.entries) if table else {}
    todo = [s for s in todo if (FIXED if s is None else s.label()) not in entries]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="planer-profile-") as tmp:
        for spec in tqdm(todo, desc="profile", unit="block", disable=not show_progress):
            path = Path(tmp) / "block.onnx"
            if spec is None:
                export_fixed(arch, path)
                feeds = {"tokens": rng.integers(0, arch.vocab_size, (dep.batch, dep.tgt_len), dtype=np.int64)}
            else:
                export_block(arch, spec, path, lowering=dep.lowering, mem_len=dep.mem_len)
                feeds = _block_feeds(arch, spec, dep, rng)
            engine = load_engine(dep.engine, str(path), threads=dep.threads, shape=dep.shape)
            entries[FIXED if spec is None else spec.label()] = _steady(engine, feeds, dep).to_dict()
    return distributed.broadcast(LatencyTable(prov, entries, table.scale if table else 1.0))

def measure(models: list[tuple[str, Architecture]], dep: Deployment) -> list[LatencyStats]:
    """End-to-end latency of exported LMs (ONNX path, its architecture), timed side by side (interleaved)."""
    runs = [(load_engine(dep.engine, path, threads=dep.threads, shape=dep.shape),
             example_feeds(arch, dep.batch, dep.tgt_len, dep.mem_len))
            for path, arch in models]
    return time_engines(runs, **dep.timing())
