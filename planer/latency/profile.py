"""Profiling: every candidate block exported alone and timed in the target engine at the deployment shape."""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from planer import __version__
from planer.arch import Architecture, BlockSpec
from planer.deployment import AUTO, Deployment
from planer.errors import PlanerError
from planer.export.quantize import INT8_RECIPE
from planer.latency.table import LatencyTable, fixed_label
from planer.runtime import Engine, LatencyStats, describe_engine, load_engine, time_engines
from planer.runtime.feeds import example_feeds


def provenance(arch: Architecture, dep: Deployment, engine_info: dict[str, Any]) -> dict[str, Any]:
    """Everything a block's latency depends on besides the block itself."""
    return {
        **{k: engine_info.get(k) for k in ("engine", "onnxruntime", "providers", "cpu", "opt_level", "allow_spinning")},
        **{k: engine_info[k] for k in ("gpu", "tensorrt", "precision") if k in engine_info},
        "threads": dep.threads, "batch": dep.batch, "tgt_len": dep.tgt_len, "mem_len": dep.mem_len,
        "lowering": dep.lowering, "dtype": "float32", "precisions": list(dep.precisions),
        **({"int8": INT8_RECIPE} if "int8" in dep.precisions else {}),
        "machine": platform.machine(), "planer": __version__,
        **{k: getattr(arch, k) for k in ("d_model", "vocab_size", "norm", "pos", "activation", "bias",
                                         "tie_embeddings")},
    }


def _block_feeds(arch: Architecture, spec: BlockSpec, dep: Deployment, rng: np.random.Generator) -> dict:
    feeds = {"x": rng.standard_normal((dep.batch, dep.tgt_len, arch.d_model), dtype=np.float32)}
    if spec.kind == "attn":
        feeds["mem"] = rng.standard_normal((dep.batch, dep.mem_len, arch.d_model), dtype=np.float32)
    return feeds


def _steady(runs: list[tuple[Engine, dict]], dep: Deployment) -> list[LatencyStats]:
    """Time all runs interleaved, `dep.min_seconds` per run; those whose spread exceeds dep.max_spread again
    (a few tries, interleaved among themselves and the first try's steadiest run), keeping each one's steadiest
    try, rescaled to the first try's load.

    Interleaved, not one after another: on a shared machine the load drifts over a profile's minutes, and
    timed in turn the blocks met different loads (a dense FFN came out slower than a MoE layer of the same
    width in one such table). Interleaved, the drift moves every entry alike. A try again meets another load,
    so the steadiest run is timed with it to scale it back. Unscaled, entries of different tries were compared
    as if timed together: in one deep table the dense FFN came from a try again and its split experts from
    others, and which splits the search trains follows that comparison (planer.search.local.undominated)."""
    def interleaved(some: list[int]) -> list[LatencyStats]:
        return time_engines([runs[i] for i in some], **(dep.timing() | {"min_seconds": dep.min_seconds * len(some)}))

    best = interleaved(list(range(len(runs))))
    anchor = min(range(len(best)), key=lambda i: best[i].spread)
    anchor_ms = best[anchor].p50
    for _ in range(dep.retries):
        noisy = [i for i, s in enumerate(best) if s.spread > dep.max_spread]
        if not noisy:
            break
        some = noisy if anchor in noisy else [*noisy, anchor]
        timed = interleaved(some)
        load = anchor_ms / timed[some.index(anchor)].p50
        for i, stats in zip(noisy, timed):
            best[i] = min(best[i], stats.scaled(load), key=lambda s: s.spread)
    return best


def profile(arch: Architecture, candidates: Iterable[BlockSpec], dep: Deployment, *,
            table: LatencyTable | None = None, show_progress: bool = True) -> LatencyTable:
    """Time each candidate block, the blocks of `arch` itself and the fixed cost of networks shaped like `arch`.

    Entries already in `table` are reused; the table's provenance must match. With lowering `auto` the
    MoE blocks are first timed in every lowering the engine runs (and the network's activation allows);
    the one with the least total time becomes the table's lowering (provenance `lowering`, the totals
    in `lowering_trials`; `Deployment.resolved` reads it back). A given table keeps its choice. Under
    torchrun rank 0 profiles and every rank receives its table.
    """
    from planer import distributed

    if not distributed.is_main():
        return distributed.broadcast(None)

    info = describe_engine(dep.engine, threads=dep.threads)
    # a string stands for the fixed part with its head in that precision
    todo: list[BlockSpec | str] = list(dep.precisions)
    todo += list(dict.fromkeys(c for c in (*arch.blocks, *candidates) if c.kind != "skip"))  # + the baseline's
    entries: dict[str, dict[str, float]] = dict(table.entries) if table else {}
    trials: dict[str, float] = table.provenance.get("lowering_trials", {}) if table else {}
    with tempfile.TemporaryDirectory(prefix="planer-profile-") as tmp:
        if dep.lowering == AUTO:
            if table is not None:
                dep = dep.resolved(table)
            else:
                moe = [s for s in todo if isinstance(s, BlockSpec) and s.kind == "moe"]
                dep, trials, timed = _choose_lowering(arch, moe, dep, Path(tmp), show_progress)
                entries.update(timed)
        prov = provenance(arch, dep, info) | ({"lowering_trials": trials} if trials else {})
        if table is not None:
            table.check(prov)
        todo = [s for s in todo if _label(s) not in entries]
        entries.update(_time_blocks(arch, todo, dep, Path(tmp), "profile", show_progress))
    return distributed.broadcast(LatencyTable(prov, entries, table.scale if table else 1.0))


def _label(spec: BlockSpec | str) -> str:
    return fixed_label(spec) if isinstance(spec, str) else spec.label()


def _time_blocks(arch: Architecture, specs: list[BlockSpec | str], dep: Deployment, tmp: Path, desc: str,
                 show_progress: bool) -> dict[str, dict[str, float]]:
    """Table entries of candidate blocks (a string: the fixed part, its head in that precision), each exported
    alone, timed interleaved."""
    from planer.export import export_block, export_fixed

    if not specs:
        return {}
    rng = np.random.default_rng(0)
    runs = []
    specs = sorted(specs, key=lambda s: isinstance(s, BlockSpec) and s.precision != "fp32")  # int8 reuses fp32
    fp32: dict[BlockSpec, Path] = {}
    for i, spec in enumerate(tqdm(specs, desc=desc, unit="block", disable=not show_progress)):
        path = tmp / f"block{i}.onnx"
        if isinstance(spec, str):
            export_fixed(replace(arch, head_precision=spec), path)
            feeds = {"tokens": rng.integers(0, arch.vocab_size, (dep.batch, dep.tgt_len), dtype=np.int64)}
        else:
            export_block(arch, spec, path, mem_len=dep.mem_len, fp32_twin=fp32.get(spec.in_precision("fp32")),
                         **dep.export_options())
            if spec.precision == "fp32":
                fp32[spec] = path
            feeds = _block_feeds(arch, spec, dep, rng)
        runs.append((load_engine(dep.engine, str(path), threads=dep.threads, shape=dep.shape), feeds))
    return {_label(s): stats.to_dict() for s, stats in zip(specs, _steady(runs, dep))}


def _choose_lowering(arch: Architecture, moe: list[BlockSpec], dep: Deployment, tmp: Path, show_progress: bool
                     ) -> tuple[Deployment, dict[str, float], dict[str, dict[str, float]]]:
    """The lowering in which the engine runs the MoE blocks `moe` fastest in total: the deployment using it,
    each lowering's total p50 ms, and the blocks' entries in the chosen one. Without MoE blocks nothing is
    timed and the engine's plain lowering stands."""
    if not moe:
        return replace(dep, lowering="trt" if dep.engine == "trt" else "ops"), {}, {}
    timed: dict[str, dict[str, dict[str, float]]] = {}
    for lowering in dep.lowerings():
        trial = replace(dep, lowering=lowering)
        try:
            timed[lowering] = _time_blocks(arch, list(moe), trial, tmp, f"profile: MoE as {lowering}",
                                           show_progress)
        except PlanerError:
            if lowering == "ops":  # runs every network: a failure here is not a missing feature
                raise
            continue  # this lowering has no exact form of the network's activation
    totals = {lo: round(sum(e["p50"] for e in t.values()), 4) for lo, t in timed.items()}
    best = min(totals, key=totals.__getitem__)
    return replace(dep, lowering=best), totals, timed[best]


def measure(models: list[tuple[str, Architecture]], dep: Deployment) -> list[LatencyStats]:
    """End-to-end latency of exported LMs (ONNX path, its architecture), timed side by side (interleaved)."""
    runs = [(load_engine(dep.engine, path, threads=dep.threads, shape=dep.shape),
             example_feeds(arch, dep.batch, dep.tgt_len, dep.mem_len))
            for path, arch in models]
    return time_engines(runs, **dep.timing())
