"""Run under torchrun by tests/test_distributed.py: a build, data-parallel over gloo.

Each rank writes what its search derived and a digest of the supernet weights it chose, so the test can
check that the processes stayed in step; only rank 0 may write the build directory.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

import planer.build
from planer import distributed
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
    searched = []
    search_stage = planer.build._search_stage

    def observed(*args, **kwargs):  # each rank's own search outcome, which the build keeps in memory only
        searched.append(search_stage(*args, **kwargs))
        return searched[-1]

    planer.build._search_stage = observed
    summary = planer.build.build(run, out / "build", dep=DEP, target_speedup=1.5, budget=BUDGET, space=SPACE,
                                 data=f"enwik8:{text}", show_progress=False)
    outcome, = searched
    record = {"world": distributed.world(), "archs": [[b.label() for b in c.arch.blocks] for c in outcome.candidates],
              "chosen": digest(outcome.chosen.model), "speedup": summary["speedup"]}
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
