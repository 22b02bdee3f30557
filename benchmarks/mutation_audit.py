"""Do the tests catch what they claim? Each mutation puts one deliberate bug into a clean copy of the tree and runs
the tests that guard against it; a mutation the tests pass is an escaped bug (issue 39's audit).

    python benchmarks/mutation_audit.py                 # every mutation, one at a time
    python benchmarks/mutation_audit.py --only ddp-sum  # one (names: --list)

The copy holds the tracked files of this checkout as they are now (uncommitted edits included) and is imported
ahead of the installed package (PYTHONPATH), so the tests, and the subprocesses they start, see the bug. Each
mutation names the tests meant to catch it, not the whole suite: an escape then means those tests are blind to it.
A mutation whose text is no longer in its file is reported as stale (the code moved: update the mutation), never
as caught.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import record, smoke_option

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "tokens-trained-by-formula"  # its tests take seconds


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


# what a build runs on an int8 graph, against the simulation a broken quantizer changes
INT8_CHECK = "tests/test_precision.py::test_int8_graph_is_checked_block_by_block"
SELECTION_CHECK = "tests/test_search.py::test_selection_reads_only_held_out_training_tokens"

MUTATIONS = (
    # Caught by the first audit; kept so that they stay caught.
    Mutation("dense-expert-lowering", "planer/export/lowering.py",
             "outs = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])",
             "offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]\n"
             "        outs = torch.cat([expert(rows)[a:b] for expert, a, b in zip(self.experts, offsets, offsets[1:])])",
             ("tests/test_export.py::test_each_expert_receives_only_the_rows_routed_to_it",)),
    Mutation("validation-for-selection", "planer/data/corpus.py", "self.unit, self.train, self.vocab",
             "self.unit, self.valid, self.vocab", (SELECTION_CHECK,)),
    Mutation("half-trained-reference", "planer/build.py", "if reference < result:", "if reference < result // 2:",
             ("tests/test_verdict.py",)),
    Mutation("median-to-max", "planer/runtime/timing.py", "np.percentile(a, [50, 90, 99])",
             "np.percentile(a, [100, 90, 99])", ("tests/test_latency.py",)),
    Mutation("evaluator-without-memory", "planer/runtime/evaluate.py", "mems[name] = new[:, new.shape[1] - want:]",
             "mems[name] = new[:, :0]", ("tests/test_engine_eval.py",)),
    Mutation("evaluator-off-by-one", "planer/runtime/evaluate.py", "streams[:, start + 1:end + 1]",
             "streams[:, start:end]", ("tests/test_engine_eval.py",)),
    Mutation("ddp-no-averaging", "planer/distributed.py", "    dist.all_reduce(flat)\n", "\n",
             ("tests/test_distributed.py",)),
    # Escaped the first audit, or weak checks it named.
    Mutation("selection-reads-validation-array", "planer/search/search.py",
             "return training.tokens[cut:][-cfg.trial_tokens:]",
             "return np.asarray(training.valid)[-cfg.trial_tokens:]", (SELECTION_CHECK,)),
    Mutation("dense-ort-moe", "planer/export/lowering.py", '{"k": self.top_k,', '{"k": len(moe.experts),',
             ("tests/test_export.py::test_ort_moe_runs_no_expert_on_tokens_not_routed_to_it",)),
    Mutation("tokens-trained-by-formula", "planer/build.py", 'base_tokens + int(record["tokens_seen"])',
             "base_tokens + 600", ("tests/test_verdict.py",)),
    Mutation("spread-p99", "planer/runtime/timing.py", "self.p90 / self.p50", "self.p99 / self.p50",
             ("tests/test_latency.py",)),
    Mutation("ddp-sum", "planer/distributed.py", "    flat /= world()\n", "\n", ("tests/test_distributed.py",)),
    Mutation("int8-weight-scale-x1.5", "planer/nn/quant.py", "amax(dim=1, keepdim=True) / WEIGHT_QMAX",
             "amax(dim=1, keepdim=True) / WEIGHT_QMAX * 1.5", (INT8_CHECK,)),
    Mutation("int8-zero-point-off-by-one", "planer/nn/quant.py",
             "zero = torch.round(-lo / scale).clamp(0, ACTIVATION_QMAX)",
             "zero = torch.round(-lo / scale).clamp(0, ACTIVATION_QMAX) + 1", (INT8_CHECK,)),
    Mutation("int8-full-range", "planer/nn/quant.py", "WEIGHT_QMAX = 64", "WEIGHT_QMAX = 127",
             (INT8_CHECK,)),
)


def tracked_copy(dest: Path) -> None:
    """The tracked files of this checkout, as they are in the working tree, under `dest`."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in names.decode().split("\0"):
        if name and (ROOT / name).is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((ROOT / name).read_bytes())


def run_tests(tree: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(tree), os.environ.get("PYTHONPATH"))))}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=tree,
                          env=env, capture_output=True, text=True)


def audit(tree: Path, m: Mutation) -> tuple[str, str]:
    """(verdict, detail): caught, ESCAPED or stale."""
    path = tree / m.path
    clean = path.read_text()
    if clean.count(m.old) != 1:
        return "stale", f"{m.path} holds the mutated text {clean.count(m.old)} times, not once"
    path.write_text(clean.replace(m.old, m.new))
    try:
        done = run_tests(tree, m.tests)
    finally:
        path.write_text(clean)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    # exit 1: a test failed; any other non-zero status (collection errors, no tests) proves nothing
    return ("caught" if done.returncode == 1 else "ESCAPED" if done.returncode == 0 else "stale"), summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="NAME", help="run this mutation (repeatable)")
    p.add_argument("--list", action="store_true", help="print the mutations and the tests that guard each")
    smoke_option(p)
    a = p.parse_args()
    chosen = [m for m in MUTATIONS if (m.name == SMOKE if a.smoke else not a.only or m.name in a.only)]
    if unknown := set(a.only or ()) - {m.name for m in MUTATIONS}:
        p.error(f"no mutation named {', '.join(sorted(unknown))} (see --list)")
    if a.list:
        for m in chosen:
            print(f"{m.name:34} {m.path}: {' '.join(m.tests)}")
        return
    with tempfile.TemporaryDirectory(prefix="planer-mutation-") as tmp:
        tree = Path(tmp)
        tracked_copy(tree)
        clean = run_tests(tree, tuple(sorted({t for m in chosen for t in m.tests})))
        if clean.returncode != 0:
            sys.exit(f"the guarding tests fail without any mutation, so the audit would prove nothing:\n"
                     f"{clean.stdout[-3000:]}")
        verdicts, lines = [], []
        for m in chosen:
            start = time.monotonic()
            verdict, detail = audit(tree, m)
            verdicts.append(verdict)
            lines.append(f"{verdict:8} {m.name:34} {time.monotonic() - start:4.0f} s  {' '.join(m.tests)}: {detail}")
            print(lines[-1], flush=True)
    lines.append(f"{verdicts.count('caught')} of {len(verdicts)} caught")
    print(lines[-1])
    if a.smoke or not a.only:  # a subset is a check while working, not a result
        record("mutation_audit", {"verdicts": dict(zip((m.name for m in chosen), verdicts))},
               "```\n" + "\n".join(lines) + "\n```", smoke=a.smoke)
    sys.exit(0 if all(v == "caught" for v in verdicts) else 1)


if __name__ == "__main__":
    main()
