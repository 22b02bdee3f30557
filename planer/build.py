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
    baseline-continued/            the baseline trained on as many more tokens as the result saw
    pareto.png, arch.png           latency vs accuracy; the block sequences of baseline and result
    report.md                      the summary a person reads
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from planer.checkpoint import ARCH_FILE, WEIGHTS_FILE, atomic_write_text, load_model, publish, staging_dir
from planer.data import Corpus
from planer.errors import PlanerError
from planer.export import export_lm
from planer.export.reference import parity
from planer.latency import LatencyTable
from planer.latency.profile import Deployment, measure, profile
from planer.nn import LM
from planer.report import Point, arch_plot, pareto_plot, report
from planer.runtime import load_engine
from planer.search.search import SearchConfig, search
from planer.space import SearchSpace
from planer.train.evaluate import evaluate, scores
from planer.train.presets import TrainConfig
from planer.train.trainer import CONFIG_FILE, run_corpus, train


@dataclass(frozen=True)
class Budget:
    search: SearchConfig
    distill_steps: int

    def describe(self) -> str:
        return (f"{self.search.rounds} search rounds x {self.search.steps} steps, {self.distill_steps} "
                f"distillation steps, batch {self.search.batch}")


CONTINUED = "baseline-continued"
BUDGETS = {
    "small": Budget(SearchConfig(rounds=2, steps=100), 300),
    "medium": Budget(SearchConfig(rounds=4, steps=250), 1200),
    "large": Budget(SearchConfig(rounds=6, steps=500), 3000),
}


def build(run: str | Path, out: str | Path, *, dep: Deployment, target_ms: float | None = None,
          target_speedup: float | None = None, budget: Budget = BUDGETS["medium"], data: str | None = None,
          space: SearchSpace | None = None, table_cache: Path | None = None, continued: Path | None = None,
          show_progress: bool = True) -> dict[str, Any]:
    """Build a faster sparse network from the baseline run `run`; returns the summary in latency.json.

    `table_cache` is a latency table file reused for the blocks it already holds (same engine and
    shape only) and updated with the ones profiled now. `continued` is the baseline-continued/ directory
    of an earlier build from the same baseline with the same budget, reused instead of training it again.
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
                                    budget, continued, show_progress)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # nothing half-written is left behind
        raise
    publish(work, out)
    return latency | {"accuracy": accuracy}


def _finetune_config(budget: Budget, steps: int, distill: float) -> TrainConfig:
    """The recipe both the distillation and the baseline's continuation follow (same batch, lr, schedule)."""
    return TrainConfig(steps=steps, batch=budget.search.batch, lr=1e-3, warmup=min(100, steps // 10), clip=1.0,
                       distill=distill, eval_every=max(1, steps // 4), ckpt_every=max(1, steps // 4),
                       eval_tokens=budget.search.valid_tokens)


def _tokens_seen(run: Path) -> int:
    try:
        return int(json.loads((run / CONFIG_FILE).read_text())["tokens_seen"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PlanerError(f"{run}: no {CONFIG_FILE} records how many tokens the baseline was trained on; "
                          "use a run directory written by `planer train`") from None


def _stages(baseline: LM, corpus: Corpus, space: SearchSpace, table: LatencyTable, work: Path, run: Path,
            dep: Deployment, target_ms: float | None, target_speedup: float | None, budget: Budget,
            continued: Path | None, show_progress: bool) -> tuple[dict, dict]:
    base_tokens = _tokens_seen(run)
    outcome = search(baseline, corpus, space, table, dep, target_ms=target_ms, target_speedup=target_speedup,
                     cfg=budget.search, log_path=work / "search_log.jsonl", show_progress=show_progress)
    chosen, table = outcome.chosen, outcome.table
    table.save(work / "latency_table.json")

    train(corpus, _finetune_config(budget, budget.distill_steps, distill=0.5), work / "distill", init=chosen.model,
          teacher=baseline, show_progress=show_progress)
    result = load_model(work / "distill").eval()
    shutil.copy(work / "distill" / ARCH_FILE, work / ARCH_FILE)
    shutil.copy(work / "distill" / WEIGHTS_FILE, work / WEIGHTS_FILE)
    # Fairness: the result has seen the baseline's tokens plus the search's and distillation's, so the
    # baseline it is judged against trains on as many more tokens, with the same recipe.
    extra_steps = budget.search.rounds * budget.search.steps + budget.distill_steps
    if continued is None:
        train(corpus, _finetune_config(budget, extra_steps, distill=0.0), work / CONTINUED, init=baseline,
              show_progress=show_progress)
    else:
        shutil.copytree(continued, work / CONTINUED)
    baseline_continued = load_model(work / CONTINUED).eval()
    extra_tokens = extra_steps * budget.search.batch * baseline.arch.tgt_len

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
                "baseline": evaluate(baseline, corpus.valid, corpus.unit) | {"tokens_trained": base_tokens},
                "baseline_continued": evaluate(baseline_continued, corpus.valid, corpus.unit)
                | {"tokens_trained": base_tokens + extra_tokens},
                "result": evaluate(result, corpus.valid, corpus.unit) | {"tokens_trained": base_tokens + extra_tokens}}
    accuracy["result_vs_baseline_continued"] = accuracy["result"]["loss"] / accuracy["baseline_continued"]["loss"]
    atomic_write_text(work / "accuracy.json", json.dumps(accuracy, indent=2) + "\n")
    points = [Point("baseline", base_stats.p50, accuracy["baseline"]),
              Point("baseline, continued", base_stats.p50, accuracy["baseline_continued"])]
    points += [Point(f"search round {c.round}", base_stats.p50 * c.measured_ms / c.baseline_ms,
                     scores(c.valid_loss, corpus.unit), kind="candidate") for c in outcome.candidates]
    points.append(Point("result", result_stats.p50, accuracy["result"], kind="result"))
    pareto_plot(points, work / "pareto.png", title=f"{run.name}: latency vs accuracy ({dep.engine})")
    arch_plot([("baseline", baseline.arch), ("result", result.arch)], table, work / "arch.png")
    atomic_write_text(work / "report.md", report(run, baseline.arch, result.arch, latency, accuracy, budget.describe()))
    return latency, accuracy
