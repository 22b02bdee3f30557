"""Latency-aware architecture search with the engine in the loop: PLANER's Gumbel supernet (search.py) or
Puzzle's local search (local.py), chosen by SearchConfig.method."""

from __future__ import annotations

from pathlib import Path

from planer.choices import SEARCH_METHODS
from planer.data import TrainingSplit
from planer.deployment import Deployment, Target
from planer.latency import LatencyTable
from planer.nn import LM
from planer.search.search import SearchConfig, SearchOutcome
from planer.space import SearchSpace


def run_search(baseline: LM, training: TrainingSplit, space: SearchSpace, table: LatencyTable, dep: Deployment,
               target: Target, *, cfg: SearchConfig, log_path: Path | None, show_progress: bool = True,
               baseline_onnx: str | None = None, library_dir: Path | None = None) -> SearchOutcome:
    """The search `cfg.method` names, on the training split alone (it has no other split to read: the
    validation split judges only the result). `library_dir` keeps the local search's trained alternatives (a
    rerun of an interrupted build reuses them); the supernet search has none."""
    if cfg.method == "local":
        from planer.search.local import search_local

        return search_local(baseline, training, space, table, dep, target, cfg=cfg, log_path=log_path,
                            show_progress=show_progress, baseline_onnx=baseline_onnx, library_dir=library_dir)
    if cfg.method != "gumbel":
        raise ValueError(f"the search method must be one of {', '.join(SEARCH_METHODS)}, got {cfg.method!r}")
    from planer.search.search import search

    return search(baseline, training, space, table, dep, target, cfg=cfg, log_path=log_path,
                  show_progress=show_progress, baseline_onnx=baseline_onnx)
