"""What each technique of the local search buys: the same build with one technique switched off per row.

    python benchmarks/search_ablation.py runs/tiny --target-speedup 2 --budget medium --out builds/ablation

Each row is a whole `planer build` of the same baseline, target, budget and engine (one latency table, profiled by
the first row; one pair of reference baselines, trained by the first row and reused by the others where their
recipe matches), so the rows differ by the technique alone:

    local          the local search as `planer build --search local` runs it
    init-weights   narrower alternatives keep the FFN units of largest weight norms and the heads in the
                   baseline's order, instead of those measured most important on activations
    sliced         no local distillation: the alternatives keep their inherited weights
    no-pairs       no paired alternatives: an FFN is never trained to make up for the attention dropped before it
    no-splits      no split experts: the space without its MoE blocks (issue 40's build with and without experts)
    nmse-scores    alternatives scored by their local error instead of their replace-one-block KL
    greedy         a greedy walk instead of the exact selection
    kl-only        the result distilled with the KL divergence alone, without the cosine loss between the hidden
                   states at the blocks it kept and the baseline's (Puzzle's global distillation: the default)
    ce-kl          half cross-entropy, half KL, no cosine loss (planer's recipe before the default)
    gumbel         PLANER's supernet search instead of the local one

Every build directory is kept under --out; the table gives each row's confirmed speedup and its validation loss
(engine-measured, whole split) over the best reference of its own build.

--library takes the trained library of an earlier local build of the same baseline and space
(BUILD/search-library/): every local row starts from it, and the search keeps it where it was trained with the
row's settings (the library records them: planer.search.local.LIBRARY_SETTINGS; local, no-pairs, no-splits,
nmse-scores, greedy and the recipe rows), so each of those costs its selection, trials, distillation and export;
the others train their own. Without --library, each local row after the first starts from the library of the
first row that trained one. --continued names references to reuse (an earlier build's baseline-continued/; its
baseline-self-distilled/ is reused too where the recipe matches).

--resume finishes an earlier invocation's --out: a row whose build completed is read from its directory, an
interrupted one continues from its last completed stage, and the table covers every row asked for.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from common import given_or_tiny, record, smoke_option, smoke_space

from planer.arch import Architecture
from planer.build import BUDGETS, CONTINUED, Budget, build
from planer.checkpoint import load_model
from planer.deployment import Deployment, Target
from planer.errors import PlanerError
from planer.files import staging_dir
from planer.space import SearchSpace


class Row(NamedTuple):
    search: dict[str, Any]  # SearchConfig changes
    recipe: dict[str, Any] = {}  # Budget changes: the result's recipe
    splits: bool = True  # whether the space keeps its MoE blocks


ROWS = {
    "local": Row({"method": "local"}),
    "init-weights": Row({"method": "local", "init": "weights"}),
    "sliced": Row({"method": "local", "local_train": False}),
    "no-pairs": Row({"method": "local", "pairs": False}),
    "no-splits": Row({"method": "local"}, splits=False),
    "nmse-scores": Row({"method": "local", "scoring": "nmse"}),
    "greedy": Row({"method": "local", "selection": "greedy"}),
    "kl-only": Row({"method": "local"}, {"cosine": 0.0}),
    "ce-kl": Row({"method": "local"}, {"distill_share": 0.5, "cosine": 0.0}),
    "gumbel": Row({"method": "gumbel"}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?", help="the baseline's run directory (planer train)")
    p.add_argument("--target-speedup", type=float, default=2.0)
    p.add_argument("--budget", choices=list(BUDGETS), default="medium")
    p.add_argument("--distill-steps", type=int,
                   help="the budget's distillation steps beyond the search's (default: the budget's): to finish "
                        "rows begun under another default")
    p.add_argument("--local-steps", type=int,
                   help="the local search's distillation steps of every alternative (default: the budget's): "
                        "another split of the budget's steps between local and global distillation")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--out", type=Path, help="directory to create: one build directory per row")
    p.add_argument("--table", type=Path, help="latency table file to reuse and extend (default: OUT/table.json)")
    p.add_argument("--library", type=Path, help="an earlier local build's search-library/ to start rows from")
    p.add_argument("--continued", type=Path, help="an earlier build's baseline-continued/ to reuse")
    p.add_argument("--resume", action="store_true",
                   help="finish the rows of an earlier invocation's --out instead of refusing it")
    smoke_option(p)
    args = p.parse_args()
    rows = args.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    run = given_or_tiny(p, args.run, args.smoke)
    dep, budget, space = Deployment(), BUDGETS[args.budget], None
    if args.smoke:  # two rows of a micro build, timed briefly
        import tempfile

        from planer.search.search import SearchConfig

        rows = rows if args.rows != ",".join(ROWS) else ["local", "no-splits"]
        dep = Deployment(batch=1, tgt_len=16, mem_len=16, threads=1, min_iters=5, min_seconds=0.05,
                         verdict_seconds=0.2)
        budget = Budget(SearchConfig(rounds=1, steps=2, batch=2, valid_tokens=256, trial_tokens=512, local_steps=2),
                        distill_steps=2)
        space = smoke_space(load_model(run).arch)
        args.out = args.out or Path(tempfile.mkdtemp(prefix="planer-ablation-")) / "ablation"
        args.target_speedup = 1.1
    for option, steps in (("--distill-steps", args.distill_steps), ("--local-steps", args.local_steps)):
        if steps is not None and steps < 1:
            p.error(f"{option} {steps}: give at least 1")
    if args.distill_steps is not None:
        budget = replace(budget, distill_steps=args.distill_steps)
    try:  # every row sets its own method; this one checks the local rows' split
        budget = budget.searching("local", args.local_steps)
    except PlanerError as e:
        p.error(str(e))
    if args.out is None:
        p.error("give --out (or --smoke)")
    if args.out.exists() and not args.resume:
        p.error(f"{args.out} already exists; choose another --out, or give --resume to finish its rows")
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.table or args.out / "table.json"
    results = []
    for i, name in enumerate(rows):
        row = ROWS[name]
        row_budget = replace(budget, search=replace(budget.search, **row.search), **row.recipe)
        out = args.out / name
        if out.exists():  # built by an earlier invocation (--resume)
            summary = json.loads((out / "latency.json").read_text())
        else:
            library = args.library or next(
                (d for d in (args.out / r / "search-library" for r in rows[:i]) if d.exists()), None)
            if library and row_budget.search.method == "local" and not (staging_dir(out) / "search-library").exists():
                # the search reuses it where it was trained with the row's settings (its library.json says which)
                shutil.copytree(library, staging_dir(out) / "search-library")
            row_space = space if row.splits else (space or SearchSpace.default(load_model(run).arch)).without_moe()
            summary = build(run, out, dep=dep, target=Target(speedup=args.target_speedup), budget=row_budget,
                            space=row_space, table_cache=table,
                            continued=args.out / rows[0] / CONTINUED if i else args.continued,
                            show_progress=not args.smoke)
        accuracy = json.loads((out / "accuracy.json").read_text())
        results.append({"row": name, "search": row.search, "splits": row.splits,
                        "distill_share": row_budget.distill_share, "cosine": row_budget.cosine,
                        "speedup": summary["speedup"], "met": summary["met"],
                        "blocks": [b.label() for b in Architecture.load(out / "arch.json").blocks],
                        "loss": accuracy["result"]["loss"], "reference": accuracy["reference"],
                        "reference_loss": accuracy[accuracy["reference"]]["loss"],
                        "vs_reference": accuracy["result_vs_reference"]})
        print(name, results[-1]["speedup"], results[-1]["vs_reference"], flush=True)
    lines = [f"`{run}` at {args.target_speedup:g}x, budget {args.budget} (every result trained "
             f"{budget.extra_steps} steps; the local search's library {budget.search.local_steps} of them), builds in "
             f"`{args.out}`; loss: the "
             "result's validation loss in the engine (whole split) over the best reference of its build.", "",
             "| row | speedup (confirmed) | met | validation loss | reference | / reference |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['speedup']:.2f} | {'yes' if r['met'] else 'no'} | {r['loss']:.4f} | "
              f"{r['reference']} {r['reference_loss']:.4f} | **{r['vs_reference']:.4f}** |" for r in results]
    record("search_ablation", {"rows": results}, "\n".join(lines), smoke=args.smoke)


if __name__ == "__main__":
    main()
