"""Run under torchrun by tests/test_distributed.py: a build, data-parallel over gloo, then one plain training run.

Each rank writes what its search derived and a digest of the weights each of its training runs ended with
(the distillation, the continued baseline, the plain run), so the test can check that the processes stayed in
step through training, not only that they started alike; only rank 0 may write the build directory. The plain
run's loss is compared by the test with one process training on the same global batch, and so is one plain-SGD
step (rank 0 saves how far it moved the parameters).
"""

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

import planer.build
import planer.train.trainer as trainer
from planer import distributed
from planer.build import Budget
from planer.data import load_corpus
from planer.deployment import Target
from tests.test_build import BUDGET, DEP, SPACE
from tests.test_distributed import PLAIN_ARCH, PLAIN_RECIPE, sgd_update


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    run, text, out, table = (Path(a) for a in sys.argv[1:5])
    distributed.setup()
    searched, made, trained = [], [], {}
    search_stage, make_lm, train = planer.build._Build.searched, trainer.LM, trainer.train

    def observed(*args, **kwargs):  # each rank's own search outcome, which the build keeps in memory only
        searched.append(search_stage(*args, **kwargs))
        return searched[-1]

    def made_here(*args, **kwargs):  # the module a training run trains (only rank 0 saves it)
        made.append(make_lm(*args, **kwargs))
        return made[-1]

    def recorded(corpus, cfg, out_dir, **kwargs):
        result = train(corpus, cfg, out_dir, **kwargs)
        trained[Path(out_dir).name] = digest(made[-1])
        return result

    planer.build._Build.searched = observed
    trainer.LM = made_here
    planer.build.train = recorded
    # two rounds: the second derives from what rank 0 measured in the first, which every rank must receive
    budget = Budget(replace(BUDGET.search, rounds=2), BUDGET.distill_steps)
    summary = planer.build.build(run, out / "build", dep=DEP, target=Target(speedup=1.5), budget=budget,
                                 space=SPACE, data=f"enwik8:{text}", table_cache=table, show_progress=False)
    corpus = load_corpus(f"enwik8:{text}")
    plain = recorded(corpus, PLAIN_RECIPE, out / "plain", arch=PLAIN_ARCH, show_progress=False)
    update = sgd_update(corpus)
    distributed.main_writes(lambda: torch.save(update, out / "sgd_update.pt"))
    outcome, = searched
    record = {"world": distributed.world(), "archs": [[b.label() for b in c.arch.blocks] for c in outcome.candidates],
              "chosen": digest(outcome.chosen.model), "speedup": summary["speedup"], "trained": trained,
              "plain_loss": plain["valid"]["loss"]}
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
