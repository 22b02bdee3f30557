"""Has a baseline trained to its plateau? Continue it exactly as a build of `--budget` continues its baseline
(baseline-continued: cross-entropy, the budget's recipe, as many steps as the build adds) and compare the
validation loss (whole split) before and after.

    python benchmarks/plateau.py runs/deep --budget medium --out builds/deep-plateau

Issue 37's bar for the deep preset: the continuation improves the validation loss by under 1 %. A baseline far
from its plateau flatters every build: its continued reference gains what the build's result also gains from
the same extra tokens, and the comparison then measures training, not compression.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import given_or_tiny, record, smoke_option

from planer.build import BUDGETS
from planer.checkpoint import load_model
from planer.train.trainer import run_corpus, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?", help="the baseline's run directory (planer train)")
    p.add_argument("--budget", choices=list(BUDGETS), default="medium")
    p.add_argument("--out", type=Path, help="run directory to create for the continuation")
    smoke_option(p)
    args = p.parse_args()
    run = given_or_tiny(p, args.run, args.smoke)
    budget = BUDGETS[args.budget]
    steps = budget.extra_steps
    if args.smoke:
        import tempfile

        steps, args.out = 2, Path(tempfile.mkdtemp(prefix="planer-plateau-")) / "continued"
    if args.out is None:
        p.error("give --out (or --smoke)")
    if args.out.exists():
        p.error(f"{args.out} already exists; choose another --out")
    trained = json.loads((run / "eval.json").read_text())
    model = load_model(run)
    corpus = run_corpus(run, None, model.arch.vocab_size)
    final = train(corpus, budget.recipe(steps, distill=0.0), args.out, init=model, show_progress=not args.smoke)
    before, after = trained["valid"]["loss"], final["valid"]["loss"]
    gain = 1 - after / before
    data = {"run": str(run), "budget": args.budget, "steps": steps, "batch": budget.search.batch,
            "train_seconds": trained["train_seconds"], "trained_steps": trained["step"],
            "valid_loss": before, "continued_valid_loss": after, "gain": gain, "out": str(args.out)}
    lines = [f"`{run}` ({trained['step']} steps, {trained['train_seconds'] / 60:.1f} min of training) continued "
             f"{steps} steps x {budget.search.batch} streams as a `--budget {args.budget}` build continues its "
             f"baseline, into `{args.out}`; validation loss, whole split.", "",
             "| trained | continued | gain | plateau (gain < 1 %) |", "|---|---|---|---|",
             f"| {before:.4f} | {after:.4f} | {100 * gain:.2f} % | {'yes' if gain < 0.01 else 'no'} |"]
    record("plateau", data, "\n".join(lines), smoke=args.smoke)


if __name__ == "__main__":
    main()
