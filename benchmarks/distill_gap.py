"""Is the result's accuracy gap the training budget or the architecture?

Each student network (given block for block against the baseline, inheriting its weights the way
`--compare`'s drop-attention does) is trained for --steps steps under each recipe (its distillation share,
learning rate and teacher: the baseline, or the baseline continued for as many steps), and the baseline
itself is trained on for as many steps at each --baseline-lrs (the fairness rule).
Reported: whole-split validation of each, the loss over the first continued baseline's, the predicted
latency (with --table), and the periodic validations on the split's first tokens (the learning curves).

    python benchmarks/distill_gap.py runs/tiny --table runs/tiny-table.json --steps 1200,4800 \
        --blocks "attn4x48 ffn768 skip ffn768 skip ffn768 skip ffn384" \
        --blocks "attn2x48 ffn768 skip ffn768 attn2x48 ffn768 skip ffn768"

An imported model names its corpus: `python benchmarks/distill_gap.py runs/smollm2 --data sample ...`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from common import given_or_tiny, record, smoke_option

from planer.arch import BlockSpec
from planer.checkpoint import load_model
from planer.latency import LatencyTable
from planer.search.heads import rank_heads
from planer.search.search import SearchConfig, held_out_probe
from planer.search.supernet import inherit
from planer.train.presets import finetune_config
from planer.train.trainer import METRICS_FILE, run_corpus, train

# name -> (distillation share, learning rate, teacher: the baseline, or the first baseline continued for as many steps)
RECIPES = {"build": (0.5, 1e-3, "baseline"), "build-lr3e-4": (0.5, 3e-4, "baseline"),
           "kd-only": (1.0, 1e-3, "baseline"), "kd-only-lr2e-3": (1.0, 2e-3, "baseline"),
           "build-from-continued": (0.5, 1e-3, "continued"), "ce-only": (0.0, 1e-3, None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?", help="the baseline's run directory (planer train)")
    p.add_argument("--blocks", action="append",
                   help="a student, one label per baseline block (skip drops one); repeat for more students")
    p.add_argument("--steps", default="1200", help="comma-separated step counts")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--baseline-lrs", default="1e-3", help="comma-separated; the baseline is continued at each")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--data", help="the corpus (default: the one the run trained on; an imported run needs one)")
    p.add_argument("--table", help="a latency table (planer profile) to predict each network's latency from")
    p.add_argument("--ranked-heads", action="store_true",
                   help="students inherit each attention block's most important heads, as the search's supernet "
                        "does (planer.search.heads, ranked on the search's probe), not its first")
    smoke_option(p)
    args = p.parse_args()
    if args.smoke:  # one student of the tiny run: its attention cut to one head, its FFN halved
        args.blocks, args.steps, args.batch = args.blocks or ["attn1x16 ffn32"], "2", 2
    if not args.blocks:
        p.error("give at least one student with --blocks (or --smoke)")
    args.run = given_or_tiny(p, args.run, args.smoke)

    baseline = load_model(args.run)
    corpus = run_corpus(args.run, args.data, baseline.arch.vocab_size)
    source = baseline
    if args.ranked_heads:
        probe = held_out_probe(corpus.training_split(), baseline.arch, SearchConfig(batch=args.batch))
        source, orders = rank_heads(baseline, probe)
        print("head orders", orders, flush=True)
    students = {s: [BlockSpec.parse(b) for b in s.split()] for s in args.blocks}
    table = LatencyTable.load(args.table) if args.table else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="distill-gap-") as tmp:
        for steps in [int(s) for s in args.steps.split(",")]:
            runs: list[tuple] = [("baseline-continued", 0.0, float(lr), None) for lr in args.baseline_lrs.split(",")]
            runs += [(r, *RECIPES[r], s) for s in students for r in args.recipes.split(",")]
            teachers = {"baseline": baseline}
            for name, share, lr, teacher, *student in runs:
                cfg = replace(finetune_config(steps, args.batch, 65536, share), lr=lr)
                out = Path(tmp) / str(len(rows))
                init = inherit(source, students[student[0]]) if student else baseline
                final = train(corpus, cfg, out, init=init, teacher=teachers[teacher] if share else None)
                if "continued" not in teachers:  # the first run continues the baseline: loaded once, as a teacher
                    teachers["continued"] = load_model(out).eval()
                curve = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
                rows.append({"steps": steps, "name": name, "student": student[0] if student else "", "distill": share,
                             "teacher": teacher if share else "",
                             "lr": lr, "valid": final["valid"], "seconds": final["train_seconds"],
                             "predicted_ms": table.predict(init.arch) if table else None,
                             "curve": [(c["step"], c["valid"]["loss"]) for c in curve]})
                print(name, steps, final["valid"], flush=True)

    heads = "its most important heads first (`--ranked-heads`)" if args.ranked_heads else "its first heads"
    lines = [f"Students inherit the baseline's weights, each attention block {heads}; batch {args.batch}; "
             "recipe as the build's (warm-up, cosine, "
             "clip 1), with the distillation share and lr shown; the ratio is to the first continued baseline"
             + (f"; latency predicted by {args.table}." if args.table else "."), "",
             "| steps | network | student | predicted ms | distill share | teacher | lr | valid loss (whole split) | "
             "/ continued baseline | periodic valid loss (first 65,536 tokens) | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = next(x for x in rows if x["steps"] == r["steps"] and x["name"] == "baseline-continued")  # the first lr
        curve = " ".join(f"{loss:.3f}" for _, loss in r["curve"])
        ms = f"{r['predicted_ms']:.2f}" if r["predicted_ms"] else ""
        lines.append(f"| {r['steps']} | {r['name']} | {r['student']} | {ms} | {r['distill']} | {r['teacher']} | "
                     f"{r['lr']:g} | {r['valid']['loss']:.4f} | **{r['valid']['loss'] / ref['valid']['loss']:.3f}** | "
                     f"{curve} | {r['seconds']:.0f} |")
    record("distill_gap", {"rows": rows}, "\n".join(lines), smoke=args.smoke)


if __name__ == "__main__":
    main()
