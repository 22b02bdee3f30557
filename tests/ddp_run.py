"""Run under torchrun by tests/test_distributed.py: a search and a build, data-parallel over gloo.

Each rank writes what it derived and a digest of the weights it ended with, so the test can check
that the processes stayed in step; only rank 0 may write the build directory.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from planer import distributed
from planer.build import build
from planer.checkpoint import load_model
from planer.data import load_corpus
from planer.latency.profile import profile
from planer.search.search import search
from tests.test_build import BUDGET, DEP, SPACE


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    run, text, out = (Path(a) for a in sys.argv[1:4])
    distributed.setup()
    baseline = load_model(run).eval()
    corpus = load_corpus(f"enwik8:{text}")
    table = profile(baseline.arch, SPACE.candidates, DEP, show_progress=False)
    outcome = search(baseline, corpus, SPACE, table, DEP, target_speedup=1.5, cfg=BUDGET.search, show_progress=False)
    summary = build(run, out / "build", dep=DEP, target_speedup=1.5, budget=BUDGET, space=SPACE, show_progress=False)
    record = {"world": distributed.world(), "archs": [[b.label() for b in c.arch.blocks] for c in outcome.candidates],
              "chosen": digest(outcome.chosen.model), "speedup": summary["speedup"]}
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
