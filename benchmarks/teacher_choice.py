"""Which teacher does the held-out text choose? A baseline and its continued baseline (a build's
baseline-continued/) scored on every stretch of the training split that neither training run read (by their
records, as `planer build --teacher auto` reads them), on the split's tail (what auto compared on before), on the
stretches a build now compares on, and on the validation split (which no choice may read; here it only judges).

    python benchmarks/teacher_choice.py runs/tiny builds/tiny-x2-auto/baseline-continued

A choice made on one stretch is made on one kind of text: where the baseline's last training steps read up to
that stretch, it favours the baseline.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from common import given_or_tiny, record, smoke_option

from planer.build import BUDGETS, TEACHER_WINDOWS, recorded_reads
from planer.checkpoint import load_model
from planer.data import unread_windows
from planer.train.evaluate import evaluate
from planer.train.trainer import run_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", type=Path, nargs="?", help="the baseline's run directory")
    p.add_argument("continued", type=Path, nargs="?", help="its continuation (a build's baseline-continued/)")
    p.add_argument("--window", type=int, default=16384, help="tokens per stretch (default: 16384)")
    p.add_argument("--budget", choices=list(BUDGETS), default="medium",
                   help="whose held-out token count the build's stretches add up to (default: medium)")
    smoke_option(p)
    a = p.parse_args()
    baseline = given_or_tiny(p, a.baseline, a.smoke)
    continued = baseline if a.smoke else a.continued
    if continued is None:
        p.error("give the continued baseline's run directory (or --smoke)")
    models = {"baseline": load_model(baseline).eval(), "continued": load_model(continued).eval()}
    corpus = run_corpus(baseline, None, models["baseline"].arch.vocab_size)
    tokens, window = corpus.train, 64 if a.smoke else a.window
    read = recorded_reads(baseline, corpus) + recorded_reads(continued, corpus)
    held_out = BUDGETS[a.budget].search.trial_tokens // (64 if a.smoke else 1)

    def losses(text) -> dict[str, float]:
        return {name: evaluate(m, text, corpus.unit)["loss"] for name, m in models.items()}

    stretches = [(w.start, losses(tokens[w.start:w.stop]))
                 for w in unread_windows(len(tokens), read, window, len(tokens))]
    ratios = [s["continued"] / s["baseline"] for _, s in stretches]
    build_windows = unread_windows(len(tokens), read, held_out // TEACHER_WINDOWS, TEACHER_WINDOWS)
    compared = {"the split's tail (before)": losses(tokens[-held_out:]),
                f"{len(build_windows)} stretches spread over the split (now)":
                    losses(np.concatenate([tokens[w.start:w.stop] for w in build_windows])),
                "validation split, whole (judges only)": losses(corpus.valid)}
    lines = [f"`{baseline}` against `{continued}`; training split of {len(tokens):,} tokens, {len(stretches)} "
             f"stretches of {window:,} that neither run read; PyTorch, loss in nats per token.", "",
             "| scored on | baseline | continued | continued ÷ baseline | lower |", "|---|---|---|---|---|"]
    for name, s in compared.items():
        lines.append(f"| {name} | {s['baseline']:.4f} | {s['continued']:.4f} | {s['continued'] / s['baseline']:.3f} "
                     f"| {min(s, key=s.__getitem__)} |")
    if ratios:
        lines += ["", f"Per unread stretch: the continued baseline lower in {sum(r < 1 for r in ratios)} of "
                  f"{len(ratios)}; ratio geometric mean {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}, "
                  f"range {min(ratios):.3f}-{max(ratios):.3f}.", "",
                  "| stretch start | baseline | continued | ratio |", "|---|---|---|---|"]
        lines += [f"| {start:,} | {s['baseline']:.4f} | {s['continued']:.4f} | {s['continued'] / s['baseline']:.3f} |"
                  for start, s in stretches]
    data = {"baseline": str(baseline), "continued": str(continued), "window": window,
            "stretches": [{"start": start, **s} for start, s in stretches], "compared": compared}
    record("teacher_choice", data, "\n".join(lines), smoke=a.smoke)


if __name__ == "__main__":
    main()
