"""`planer build`: baseline -> profile -> search -> distill -> export -> verify -> build directory.

The build directory is assembled as OUT.partial and renamed when every stage
has finished. It holds:

    arch.json, model.safetensors   the result network and its weights
    model.onnx                     the result, exported for the engine (MoE lowered sparsely)
    latency.json                   baseline and result timed side by side in the engine (p50/p90/p99)
    accuracy.json                  baseline and result on the same validation split
    latency_table.json             the engine-measured block latencies (calibrated)
    search_log.jsonl               one line per search round
    distill/                       the distillation run (resumable training directory)
    report.md                      the summary a person reads
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from planer.arch import Architecture
from planer.checkpoint import ARCH_FILE, WEIGHTS_FILE, atomic_write_text, load_model, publish, staging_dir
from planer.data import Corpus
from planer.errors import PlanerError
from planer.export import export_lm
from planer.export.reference import parity
from planer.latency import LatencyTable
from planer.latency.profile import Deployment, measure, profile
from planer.nn import LM
from planer.runtime import load_engine
from planer.search.search import SearchConfig, search
from planer.space import SearchSpace
from planer.train.evaluate import evaluate, headline
from planer.train.presets import TrainConfig
from planer.train.trainer import run_corpus, train


@dataclass(frozen=True)
class Budget:
    search: SearchConfig
    distill_steps: int


BUDGETS = {
    "small": Budget(SearchConfig(rounds=2, steps=100), 300),
    "medium": Budget(SearchConfig(rounds=4, steps=250), 1200),
    "large": Budget(SearchConfig(rounds=6, steps=500), 3000),
}


def build(run: str | Path, out: str | Path, *, dep: Deployment, target_ms: float | None = None,
          target_speedup: float | None = None, budget: Budget = BUDGETS["medium"], data: str | None = None,
          space: SearchSpace | None = None, table_cache: Path | None = None,
          show_progress: bool = True) -> dict[str, Any]:
    """Build a faster sparse network from the baseline run `run`; returns the summary in latency.json.

    `table_cache` is a latency table file reused for the blocks it already holds (same engine and
    shape only) and updated with the ones profiled now.
    """
    run, out = Path(run), Path(out)
    if out.exists():
        raise PlanerError(f"{out} already exists; choose another --out or delete it")
    if (target_ms is None) == (target_speedup is None):
        raise PlanerError("give exactly one target: --target-latency-ms X or --target-speedup S")
    baseline = load_model(run).eval()
    corpus = run_corpus(run, data, baseline.arch.vocab_size)
    space = space or SearchSpace.default(baseline.arch)
    work = staging_dir(out)
    if work.exists():
        shutil.rmtree(work)  # stage-level resume is not implemented: an interrupted build starts over
    work.mkdir(parents=True)
    try:
        cached = LatencyTable.load(table_cache) if table_cache and Path(table_cache).exists() else None
        table = profile(baseline.arch, space.candidates, dep, table=cached, show_progress=show_progress)
        if table_cache:
            table.save(table_cache)
        latency, accuracy = _stages(baseline, corpus, space, table, work, run, dep, target_ms, target_speedup,
                                    budget, show_progress)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # nothing half-written is left behind
        raise
    publish(work, out)
    return latency | {"accuracy": accuracy}


def _stages(baseline: LM, corpus: Corpus, space: SearchSpace, table: LatencyTable, work: Path, run: Path,
            dep: Deployment, target_ms: float | None, target_speedup: float | None, budget: Budget,
            show_progress: bool) -> tuple[dict, dict]:
    outcome = search(baseline, corpus, space, table, dep, target_ms=target_ms, target_speedup=target_speedup,
                     cfg=budget.search, log_path=work / "search_log.jsonl", show_progress=show_progress)
    chosen, table = outcome.chosen, outcome.table
    table.save(work / "latency_table.json")

    steps = budget.distill_steps
    cfg = TrainConfig(steps=steps, batch=budget.search.batch, lr=1e-3, warmup=min(100, steps // 10), clip=1.0,
                      distill=0.5, eval_every=max(1, steps // 4), ckpt_every=max(1, steps // 4),
                      eval_tokens=budget.search.valid_tokens)
    train(corpus, cfg, work / "distill", init=chosen.model, teacher=baseline, show_progress=show_progress)
    result = load_model(work / "distill").eval()
    shutil.copy(work / "distill" / ARCH_FILE, work / ARCH_FILE)
    shutil.copy(work / "distill" / WEIGHTS_FILE, work / WEIGHTS_FILE)

    path = export_lm(result, work / "model.onnx", lowering=dep.lowering)
    diff = parity(result, load_engine(dep.engine, str(path), threads=dep.threads), batch=dep.batch,
                  tgt_len=dep.tgt_len, mem_len=dep.mem_len)
    with tempfile.TemporaryDirectory(prefix="planer-build-") as tmp:
        base_path = export_lm(baseline, Path(tmp) / "baseline.onnx", lowering=dep.lowering)
        timing = replace(dep, min_seconds=max(dep.min_seconds, 2.0), min_iters=max(dep.min_iters, 50))
        base_stats, result_stats = measure([(str(base_path), baseline.arch), (str(path), result.arch)], timing)
    target = target_ms if target_ms is not None else base_stats.p50 / target_speedup
    speedup = base_stats.p50 / result_stats.p50
    met = (speedup >= target_speedup) if target_speedup is not None else result_stats.p50 <= target_ms
    latency = {
        "engine": table.provenance, "deployment": {"batch": dep.batch, "tgt_len": dep.tgt_len,
                                                   "mem_len": dep.mem_len, "threads": dep.threads},
        "baseline": base_stats.to_dict(), "result": result_stats.to_dict(), "speedup": speedup,
        "target_ms": target, "target_speedup": target_speedup, "met": met, "parity_max_abs_diff": diff,
    }
    atomic_write_text(work / "latency.json", json.dumps(latency, indent=2) + "\n")
    accuracy = {"data": corpus.spec, "split": "valid",
                "baseline": evaluate(baseline, corpus.valid, corpus.unit),
                "result": evaluate(result, corpus.valid, corpus.unit)}
    atomic_write_text(work / "accuracy.json", json.dumps(accuracy, indent=2) + "\n")
    atomic_write_text(work / "report.md", _report(run, baseline.arch, result.arch, latency, accuracy, budget))
    return latency, accuracy


def _report(run: Path, base_arch: Architecture, result_arch: Architecture, latency: dict, accuracy: dict,
            budget: Budget) -> str:
    b, r = latency["baseline"], latency["result"]
    pb, pr = base_arch.param_counts(), result_arch.param_counts()
    verdict = "met" if latency["met"] else "**missed**"
    return f"""# planer build of `{run}`

Target {latency['target_ms']:.3f} ms ({'speedup ' + str(latency['target_speedup']) if latency['target_speedup'] else 'absolute'}): {verdict}.
Measured in {latency['engine'].get('engine')} ({latency['engine'].get('cpu')}, {latency['deployment']['threads']} threads),
batch {latency['deployment']['batch']}, segment {latency['deployment']['tgt_len']}, memory {latency['deployment']['mem_len']};
baseline and result timed interleaved in one run.

| | baseline | result |
|---|---|---|
| latency p50 / p90 / p99 ms | {b['p50']:.3f} / {b['p90']:.3f} / {b['p99']:.3f} | {r['p50']:.3f} / {r['p90']:.3f} / {r['p99']:.3f} |
| speedup | 1.00 | {latency['speedup']:.2f} |
| validation ({accuracy['data']}) | {headline(accuracy['baseline'])} | {headline(accuracy['result'])} |
| parameters total / active | {pb['total'] / 1e6:.2f}M / {pb['active'] / 1e6:.2f}M | {pr['total'] / 1e6:.2f}M / {pr['active'] / 1e6:.2f}M |
| blocks | {' '.join(x.label() for x in base_arch.blocks)} | {' '.join(x.label() for x in result_arch.blocks)} |

Budget: {budget.search.rounds} search rounds x {budget.search.steps} steps, {budget.distill_steps} distillation steps.
ONNX Runtime vs PyTorch on the result: max |difference| {latency['parity_max_abs_diff']:.2e}.
Search rounds: `search_log.jsonl`.
"""
