"""Which heads should a narrower attention block keep: its first ones, or the ones planer ranks first?

For every attention block of a run's model, every subset of --keep heads (key/value groups, with grouped-query
attention) is scored on the validation split's first --tokens tokens with the block's other heads cut off and
every other block intact. Reported per block: the first heads (what narrower candidates inherited before
planer.search.heads), the subset `rank_heads` puts first (ranked on the search's held-out probe, taken from the
training split, so not on the tokens scored here), and the best and worst subsets.

    python benchmarks/head_choice.py runs/tiny --keep 2
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from common import given_or_tiny, record, smoke_option

from planer.checkpoint import load_model
from planer.search.heads import cut_heads, rank_heads
from planer.search.search import SearchConfig, held_out_probe
from planer.train.evaluate import evaluate
from planer.train.trainer import run_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?", help="a run directory (planer train)")
    p.add_argument("--keep", type=int, default=2, help="heads (key/value groups) each subset keeps")
    p.add_argument("--tokens", type=int, default=65536, help="validation tokens each subset is scored on")
    smoke_option(p)
    args = p.parse_args()
    if args.smoke:
        args.keep, args.tokens = 1, 512
    args.run = given_or_tiny(p, args.run, args.smoke)

    model = load_model(args.run).eval()
    corpus = run_corpus(args.run, None, model.arch.vocab_size)

    def loss() -> float:
        return evaluate(model, corpus.valid, corpus.unit, max_tokens=args.tokens)["loss"]

    full = loss()
    _, orders = rank_heads(model, held_out_probe(corpus.training_split(), model.arch, SearchConfig()))
    rows = []
    attns = [b.f for b in model.blocks if b.kind == "attn"]
    for index, (attn, order) in enumerate(zip(attns, orders)):
        scored = {}
        for kept in itertools.combinations(range(attn.kv_heads), args.keep):
            with cut_heads(attn, set(range(attn.kv_heads)) - set(kept)):
                scored[kept] = loss()
        ranked = tuple(sorted(order[:args.keep]))
        best, worst = min(scored, key=scored.get), max(scored, key=scored.get)
        rows.append({"block": index, "order": order, "first": scored[tuple(range(args.keep))],
                     "ranked": (ranked, scored[ranked]), "best": (best, scored[best]), "worst": (worst, scored[worst])})
        print(rows[-1], flush=True)

    lines = [f"`{args.run}`: validation loss on the first {args.tokens:,} tokens with each attention block cut to "
             f"{args.keep} heads (every other block whole); whole model {full:.4f}. Heads numbered as in the "
             "baseline; `rank_heads` ranked them on the search's probe (training split).", "",
             "| attention block | first heads | ranked first (rank_heads) | best subset | worst subset |",
             "|---|---|---|---|---|"]
    for r in rows:
        cell = lambda pair: f"{pair[1]:.4f} {list(pair[0])}"  # noqa: E731
        lines.append(f"| {r['block']} | {r['first']:.4f} | {cell(r['ranked'])} | {cell(r['best'])} | "
                     f"{cell(r['worst'])} |")
    record("head_choice", {"full": full, "keep": args.keep, "tokens": args.tokens, "rows": rows}, "\n".join(lines),
           smoke=args.smoke)


if __name__ == "__main__":
    main()
