"""Which global distillation recipe keeps the most of the baseline's accuracy, the network held fixed.

A build's chosen network, from the weights its search handed to the distillation (BUILD/search/), is trained
with each recipe for the build's distillation steps (or --steps); beside it the baseline is trained with the same
recipe for as many tokens as the build's references (that recipe's self-distilled reference). Both distil from
the build's teacher (its teacher.json: the baseline, or the continued baseline; a build without one distilled
from the baseline). Each result is judged as the build judges its own: validation loss over the best of the baseline,
the build's continued baseline and the recipe's self-distilled baseline. All losses are PyTorch's, whole split.

    python benchmarks/distill_recipe.py builds/deep-x2-local --recipes build,kl-only,kl-cosine

Recipes (distillation share of the logits' loss, the rest cross-entropy; weight of the cosine loss between the
hidden states at the blocks the network kept and the baseline's, Puzzle's global distillation):

    build          the build's own recipe (read from BUILD/build.json)
    kl-only        forward KL alone (Minitron)
    kl-cosine      forward KL plus the cosine loss, no cross-entropy (Puzzle; planer's default)
    ce-kl          half cross-entropy, half KL (planer's default before)
    ce-kl-cosine   half cross-entropy, half KL, plus the cosine loss

Where a recipe and step count are the build's own, its distill/ and baseline-self-distilled/ are read, not
trained again. A recipe with no cross-entropy taught by the baseline has no self-distilled reference to train: the
baseline starts at that recipe's minimum (planer.build.teaches_the_baseline).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

from common import record, smoke_option, smoke_space, tiny_run

from planer.arch import BlockSpec
from planer.build import CONTINUED, SELF_DISTILLED, Budget, build, teacher_of, teaches_the_baseline
from planer.checkpoint import load_model
from planer.search.search import OUTCOME_FILE, SearchConfig
from planer.train.evaluate import evaluate
from planer.train.trainer import EVAL_FILE, alignment, run_corpus, train

# name -> (distillation share, cosine weight); None: the build's own
RECIPES = {"build": None, "kl-only": (1.0, 0.0), "kl-cosine": (1.0, 1.0), "ce-kl": (0.5, 0.0),
           "ce-kl-cosine": (0.5, 1.0)}


def smoke_build() -> Path:
    """A micro local-search build of the smoke run, for the recipes to start from."""
    from planer.deployment import Deployment, Target

    run = tiny_run()
    out = run.parent / "build"
    dep = Deployment(batch=1, tgt_len=16, mem_len=16, threads=1, min_iters=5, min_seconds=0.05, verdict_seconds=0.2)
    budget = Budget(SearchConfig(rounds=1, steps=2, batch=2, valid_tokens=256, trial_tokens=512, local_steps=2,
                                 method="local"), distill_steps=2)
    build(run, out, dep=dep, target=Target(speedup=1.1), budget=budget, space=smoke_space(load_model(run).arch),
          show_progress=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build", type=Path, nargs="?", help="a finished build directory (planer build)")
    p.add_argument("--recipes", default="build,kl-only,kl-cosine", help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--steps", type=int, help="the network's training steps (default: the build's distillation's); "
                                             "the reference trains as many more as the build's did")
    p.add_argument("--keep", type=Path, help="keep the trained runs in this new directory (default: a temporary one)")
    smoke_option(p)
    args = p.parse_args()
    recipes = args.recipes.split(",")
    if unknown := [r for r in recipes if r not in RECIPES]:
        p.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    if args.build is None and not args.smoke:
        p.error("give a finished build directory (or --smoke)")
    work = args.build or smoke_build()
    if not (work / "search" / OUTCOME_FILE).is_file() or not (work / CONTINUED / EVAL_FILE).is_file():
        p.error(f"{work} is not a finished build (no search/{OUTCOME_FILE} or {CONTINUED}/{EVAL_FILE}); "
                "give the directory `planer build --out` made")
    if args.keep is not None and args.keep.exists():
        p.error(f"--keep {args.keep} exists; name a new directory")

    options = json.loads((work / "build.json").read_text())
    b = options["budget"]
    known = {f.name for f in fields(SearchConfig)}  # a build of an earlier planer may lack some, or have others
    budget = Budget(SearchConfig(**{k: v for k, v in b["search"].items() if k in known}), b["distill_steps"],
                    b["distill_share"], b.get("cosine", 0.0))
    steps = args.steps or budget.result_steps
    reference_steps = steps + budget.extra_steps - budget.result_steps
    baseline = load_model(options["model"]).eval()
    taught = teacher_of(work, budget.distill_share)
    taught_by = taught["teacher"]
    own = (taught["distill_share"], budget.cosine)
    teacher = load_model(work / CONTINUED).eval() if taught_by == "continued" else baseline
    corpus = run_corpus(Path(options["model"]), options["data"], baseline.arch.vocab_size)
    chosen = json.loads((work / "search" / OUTCOME_FILE).read_text())
    positions = [BlockSpec.parse(s) for s in chosen["candidates"][chosen["chosen"]].get("positions", ())]
    student = load_model(work / "search")
    match = alignment(student.arch, baseline.arch, positions)

    def trained(out: Path, init, share: float, cosine: float, n: int, aligned: list[int] | None) -> dict:
        cfg = budget.recipe(n, distill=share, cosine=cosine, aligned=aligned is not None)
        return train(corpus, cfg, out, init=init, teacher=teacher, match=aligned, show_progress=not args.smoke)

    rows = []
    base_loss = evaluate(baseline, corpus.valid, corpus.unit, batch=budget.recipe(1, 0.0).eval_batch)["loss"]
    continued = json.loads((work / CONTINUED / EVAL_FILE).read_text())["valid"]["loss"]
    with nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="distill-recipe-") as tmp:
        for name in recipes:
            share, cosine = RECIPES[name] or own
            moves = teaches_the_baseline(taught_by, share)  # or the baseline is its own self-distilled reference
            if (share, cosine) == own and steps == budget.result_steps:
                result = json.loads((work / "distill" / EVAL_FILE).read_text())
                reference = json.loads((work / SELF_DISTILLED / EVAL_FILE).read_text()) if moves else None
                source = "the build's"
            else:
                result = trained(Path(tmp) / name, student, share, cosine, steps, match)
                reference = trained(Path(tmp) / f"{name}-reference", baseline, share, cosine, reference_steps,
                                    list(range(len(baseline.arch.blocks)))) if moves else None
                source = "trained here"
            self_distilled = reference["valid"]["loss"] if reference else None
            best = min(base_loss, continued, *([self_distilled] if reference else []))
            rows.append({"recipe": name, "distill_share": share, "cosine": cosine, "steps": steps,
                         "reference_steps": reference_steps, "loss": result["valid"]["loss"],
                         "self_distilled": self_distilled, "best_reference": best,
                         "ratio": result["valid"]["loss"] / best, "source": source,
                         "train_seconds": result.get("train_seconds")})
            print(name, rows[-1], flush=True)

    source = "continued baseline" if taught_by == "continued" else "baseline"
    lines = [f"`{work}`'s chosen network `{' '.join(b.label() for b in student.arch.blocks)}`, trained {steps} steps "
             f"from its search's weights; references {reference_steps} steps; baseline loss {base_loss:.4f}, "
             f"continued {continued:.4f} (validation, whole split, PyTorch); distilled from the {source}.", "",
             "| recipe | KL share | cosine | network loss | self-distilled reference | best reference | "
             "/ best reference | runs |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['distill_share']:g} | {r['cosine']:g} | {r['loss']:.4f} | "
              f"{'the baseline' if r['self_distilled'] is None else format(r['self_distilled'], '.4f')} | "
              f"{r['best_reference']:.4f} | **{r['ratio']:.4f}** | {r['source']} |"
              for r in rows]
    record("distill_recipe", {"build": str(work), "teacher": taught_by, "steps": steps,
                              "reference_steps": reference_steps, "baseline": base_loss, "continued": continued,
                              "rows": rows},
           "\n".join(lines), smoke=args.smoke)


if __name__ == "__main__":
    main()
