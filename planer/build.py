"""`planer build`: baseline -> profile -> search -> distill -> export -> verify -> build directory.

The build directory is assembled as OUT.partial and renamed when every stage
has finished; an interrupted build resumes there when run again (a stage whose
files there are damaged runs again). It holds:

    build.json                     what was asked for (model, target, deployment, budget, space)
    imported/                      a Hugging Face baseline, imported (planer.hf)
    arch.json, model.safetensors   the result network and its weights
    model.onnx                     the result, exported for the engine (MoE lowered sparsely)
    baseline/                      the baseline exported the same way (arch.json, model.onnx): what
                                   `planer bench` times the result against
    vocab.json                     word-level data only: the words by id, for `planer serve`
    tokenizer/                     an imported model's tokenizer, for `planer serve`
    latency.json                   baseline and result timed side by side in the engine (p50/p90/p99), in
                                   3 confirmation runs: each network's median run's figures, every run under
                                   `confirmation`
    accuracy.json                  baseline and result on the same validation split
    latency_table.json             the engine-measured block latencies (calibrated)
    search_log.jsonl               one line per derived network, per confirming measurement and per trial
    search/                        the search's outcome: the chosen network before distillation, every candidate
    search-library/                the local search's trained alternatives (library.safetensors) and what was
                                   measured of each (library.json: normalised MSE before and after, KL)
    baseline-continued/            the baseline trained on as many more tokens as the result saw
    teacher.json                   what the result is distilled from (the baseline or baseline-continued/) and why
    distill/                       the distillation run (resumable training directory)
    baseline-self-distilled/       the baseline trained as long with the result's recipe (distilled from the teacher),
                                   unless that recipe leaves the baseline where it is (teaches_the_baseline)
    compare/                       with --compare: drop-attention, narrow, dense-only (planer.compare)
    pareto.png, arch.png           latency vs accuracy; the block sequences of baseline and result
    timings.json                   wall seconds per stage (summed over the invocations of a resumed build)
    report.md                      the summary a person reads
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from planer import __version__, distributed
from planer.arch import Architecture, BlockSpec
from planer.checkpoint import WEIGHTS_FILE, load_model
from planer.choices import TEACHERS
from planer.compare import dense_space, fixed_comparisons
from planer.data import Corpus, read_spans, unread_windows
from planer.deployment import Deployment, Target
from planer.errors import PlanerError
from planer.export import export_lm
from planer.export.reference import verify
from planer.files import (ARCH_FILE, REQUEST_FILE, TOKENIZER_DIR, VOCAB_FILE, atomic_write, publish, read_json,
                          staging_dir, writing)
from planer.hf import IMPORT_FILE, import_hf, is_hf_checkpoint, write_run
from planer.latency import LatencyTable
from planer.latency.confirm import confirm
from planer.latency.profile import profile
from planer.nn import LM
from planer.nn.model import in_precision
from planer.report import Point, arch_plot, pareto_plot, report
from planer.runtime import Engine, describe_engine, evaluate_engine, load_engine
from planer.search import run_search
from planer.search.local import LIBRARY_FILE, LIBRARY_RECORD, alternatives
from planer.search.search import OUTCOME_FILE, Candidate, InfeasibleTarget, SearchConfig, SearchOutcome
from planer.space import ExpertOptions, SearchSpace, trainable_params_limit
from planer.train.evaluate import evaluate, headline, scores
from planer.train.presets import ADAPTED_SHARE, COSINE, DISTILL_SHARE, TrainConfig, finetune_config
from planer.train.trainer import (CONFIG_FILE, EVAL_FILE, DamagedCheckpoint, alignment, resumable, run_corpus,
                                  run_source, saved_config, train)

T = TypeVar("T")


@dataclass(frozen=True)
class Budget:
    search: SearchConfig
    distill_steps: int  # beyond the search's steps: see extra_steps
    distill_share: float = DISTILL_SHARE  # of the logits' loss, the rest cross-entropy (see `share`)
    cosine: float = COSINE  # weight of the hidden states' cosine loss in every distillation (TrainConfig.cosine)
    # What the result and the self-distilled reference distil from (planer.choices.TEACHERS): the baseline as given,
    # the continued baseline (the baseline trained on the build's data as long as the result: it adapts an imported
    # model to that data), or auto: the one with the lower loss on training tokens neither read.
    teacher: str = "auto"

    @property
    def extra_steps(self) -> int:
        """Training steps beyond the baseline's, the search's and the distillation's, whichever the method: the
        continued baseline trains this many, and so does the result: from the baseline's weights after the
        supernet search (which only chose it), or as its blocks' local distillation steps and the rest
        (`result_steps`) after the local search."""
        return self.search.rounds * self.search.steps + self.distill_steps

    @property
    def kept_steps(self) -> int:
        """The search's steps whose training the result keeps: the local search's (its blocks are the library's)."""
        return self.search.local_steps if self.search.method == "local" else 0

    @property
    def result_steps(self) -> int:
        return self.extra_steps - self.kept_steps

    def kept_tokens(self, tgt_len: int) -> int:
        """Tokens the kept search steps read (each a segment of `tgt_len` on every stream of the batch)."""
        return self.kept_steps * self.search.batch * tgt_len

    def extra_tokens(self, tgt_len: int) -> int:
        """Tokens the extra steps read, as kept_tokens counts them: what the result trains on at most."""
        return self.extra_steps * self.search.batch * tgt_len

    def share(self, teacher: str) -> float:
        """The KL share of the logits' loss when the result distils from `teacher` ("baseline" or "continued"):
        the budget's, and at most ADAPTED_SHARE from the continued baseline (the data still teaches)."""
        return min(self.distill_share, ADAPTED_SHARE) if teacher == "continued" else self.distill_share

    def recipe(self, steps: int, distill: float, cosine: float = 0.0, aligned: bool = True) -> TrainConfig:
        """The fine-tuning recipe of this budget's batch for `steps` steps (planer.train.presets.finetune_config)."""
        return finetune_config(steps, self.search.batch, self.search.valid_tokens, distill, cosine, aligned)

    @property
    def searched_with(self) -> SearchConfig:
        """The search's configuration, its trials training with this budget's recipe (the result's)."""
        return replace(self.search, trial_distill=self.distill_share, trial_cosine=self.cosine)

    def searching(self, method: str, local_steps: int | None = None) -> Budget:
        """This budget with the search `method` (planer.choices.SEARCH_METHODS) and, for the local search, another
        number of local distillation steps, taken from extra_steps: PlanerError where they leave none."""
        steps = self.search.local_steps if local_steps is None else local_steps
        chosen = replace(self, search=replace(self.search, method=method, local_steps=steps))
        if method == "local" and chosen.result_steps < 1:
            raise PlanerError(f"--local-steps {steps} leaves no training steps of the budget's {self.extra_steps:,} "
                              f"for the network chosen: give at most {self.extra_steps - 1:,}, or a larger --budget")
        return chosen

    def describe(self) -> str:
        s = self.search
        trials = (f", trials of up to {s.trials} networks x {s.trial_steps} steps (they only "
                  "choose the network)" if s.trials else "")
        if s.method == "local":
            return (f"local search: {s.local_steps} local distillation steps of every alternative, up to {s.rounds} "
                    f"rounds of exact selection timed in the engine{trials}, then {self.result_steps} distillation "
                    f"steps of the network chosen, batch {s.batch}")
        return (f"{s.rounds} search rounds x {s.steps} steps{trials}, {self.extra_steps} "
                f"distillation steps from the baseline's weights (as many as the search and "
                f"{self.distill_steps} more), batch {s.batch}")


CONTINUED = "baseline-continued"
SELF_DISTILLED = "baseline-self-distilled"
TEACHER_WINDOWS = 16  # stretches of unread training text --teacher auto compares on (_Build._chosen_teacher)
EVAL_BATCH = 8  # streams the validation split is read as, in the engine as in PyTorch (planer.train.evaluate)
BASELINE = "baseline"
TIMINGS_FILE = "timings.json"
TEACHER_FILE = "teacher.json"
HELD_OUT_FILE = "held_out.json"  # the training split's stretches a continued baseline was kept from (teacher_windows)
SWEEP_FILE = "sweep.json"  # what a sweep was asked for (its builds' build.json name the baseline they read)
BUDGETS = {
    # small is the quickest build that still runs every stage: half the streams per step of the others.
    # Both methods' results (and the baselines continued beside them) train on as many tokens (extra_steps): the
    # local search spends local_steps of them on its alternatives, the network it chooses the rest.
    "small": Budget(SearchConfig(rounds=2, steps=100, batch=4, local_steps=200), 300),
    # The distillation is the longest lever: the deep preset's 2x network distilled 3,600 steps instead of 1,200
    # scored 1.0216x the baseline's loss instead of 1.0434x (`planer distill`). Local distillation helps the
    # selection sooner than the result: deep at 2x, 250 local + 4,350 global steps scored 1.0309x the best
    # reference against 1.0377x for 1,000 + 3,600 (and 1.0344x against 1.0434x at 2,200 steps; RESULTS.md).
    "medium": Budget(SearchConfig(rounds=4, steps=250, trials=4, trial_steps=300, local_steps=250), 3600),
    "large": Budget(SearchConfig(rounds=6, steps=500, trials=4, trial_steps=600, local_steps=3000), 7200),
}


def build(run: str | Path, out: str | Path, *, dep: Deployment, target: Target,
          budget: Budget = BUDGETS["medium"], data: str | None = None,
          space: SearchSpace | None = None, moe: ExpertOptions = ExpertOptions(), table_cache: Path | None = None,
          continued: Path | None = None, compare: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Build a faster sparse network from the baseline run `run`; returns the summary in latency.json.

    `moe` shapes the default space's MoE candidates (refused together with `space`).
    `table_cache` is a latency table file reused for the blocks it already holds (same engine and
    shape only) and updated with the ones profiled now. `continued` is the baseline-continued/ directory
    of an earlier build from the same baseline with the same budget, reused instead of training it again.
    `compare` also trains and measures the simpler alternatives of planer.compare at the result's latency.

    The build is assembled in OUT.partial. A bad request or an infeasible target removes it; any other
    failure or interruption keeps it, and calling build again with the same request continues from the last
    completed stage (the search, each training run from its last checkpoint).
    """
    source, out = Path(run), Path(out)
    _check_request(out, dep)
    with writing(out) if distributed.is_main() else nullcontext():  # one writer of OUT at a time
        work = staging_dir(out)
        fresh = not work.exists()
        main = distributed.is_main()  # under torchrun rank 0 alone measures and writes; all ranks train
        try:
            run, baseline, corpus, space = _baseline(source, work, dep, data, space, budget.search.method, moe)
            request = {"model": str(source.resolve()), "data": corpus.spec, "target_ms": target.ms,
                       "target_speedup": target.speedup, "deployment": asdict(dep), "budget": asdict(budget),
                       "space": space.to_dict(), "compare": compare, "planer": __version__}
            _start_or_resume(work, request)
        except PlanerError:
            if fresh and main:
                shutil.rmtree(work, ignore_errors=True)  # an import made for a request that cannot run
            raise
        try:
            clock = _Clock(work)
            table, dep = _profiled(baseline, space, dep, work, table_cache, show_progress)
            clock.lap("profile")
            stages = _Build(source, run, work, baseline, corpus, space, table, dep, target, budget, show_progress,
                            clock)
            latency, accuracy = stages.finish(continued, compare)
        except InfeasibleTarget:
            if main:
                shutil.rmtree(work, ignore_errors=True)  # a bad request: nothing to resume, nothing left behind
            raise
        except PlanerError as e:  # e.g. a graph that fails parity: the stages before it are worth keeping
            raise PlanerError(f"{e} (the build so far is kept in {work}: run the same command again to continue "
                              "from its last completed stage, or delete it)") from e
        distributed.main_writes(lambda: publish(work, out))
        return latency | {"accuracy": accuracy}


def search_alone(run: str | Path, out: str | Path, *, dep: Deployment, target: Target,
                 budget: Budget = BUDGETS["medium"], data: str | None = None,
                 space: SearchSpace | None = None, moe: ExpertOptions = ExpertOptions(),
                 table_cache: Path | None = None, show_progress: bool = True) -> SearchOutcome:
    """`planer search`: a build's profile and search stages alone. OUT receives the chosen network before
    distillation (arch.json, model.safetensors: what `planer distill` takes), outcome.json (every derived
    candidate), the calibrated latency_table.json and search_log.jsonl; a Hugging Face baseline's import
    goes to OUT/imported. Assembled in OUT.partial and renamed at the end; a failed or interrupted search
    leaves nothing (run it again to start over)."""
    source, out = Path(run), Path(out)
    _check_request(out, dep)
    work = staging_dir(out)
    main = distributed.is_main()

    def start_over() -> None:  # what an interrupted search left goes
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)

    distributed.main_writes(start_over)
    try:
        _, baseline, corpus, space = _baseline(source, work, dep, data, space, budget.search.method, moe)
        table, dep = _profiled(baseline, space, dep, work, table_cache, show_progress)
        outcome = run_search(baseline, corpus.training_split(), space, table, dep, target, cfg=budget.searched_with,
                             log_path=work / "search_log.jsonl", show_progress=show_progress)
        if main:
            outcome.save(work)
    except BaseException:
        if main:
            shutil.rmtree(work, ignore_errors=True)
        raise
    distributed.main_writes(lambda: publish(work, out))
    return outcome


def distill(student: str | Path, teacher: str | Path, out: str | Path, *, steps: int, batch: int = 8,
            data: str | None = None, resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """`planer distill`: train the network in `student` (arch.json + model.safetensors, e.g. `planer search`'s
    output) with distillation from the baseline `teacher` (a run directory), with the recipe a build
    distils with, into the run directory OUT (resumable like any training run). Returns its final
    evaluation."""
    student, teacher = Path(student), Path(teacher)
    init, baseline = load_model(student), load_model(teacher).eval()
    if init.arch.vocab_size != baseline.arch.vocab_size or init.arch.d_model != baseline.arch.d_model:
        raise PlanerError(f"{student} (vocabulary {init.arch.vocab_size}, width {init.arch.d_model}) was not derived "
                          f"from {teacher} (vocabulary {baseline.arch.vocab_size}, width {baseline.arch.d_model}); "
                          "pass the baseline its search started from as the teacher")
    corpus = run_corpus(teacher, data, baseline.arch.vocab_size)
    # `planer search`'s output says which of the baseline's blocks each of the network's stands for
    positions = SearchOutcome.load(student).chosen.positions if (student / OUTCOME_FILE).is_file() else ()
    match = alignment(init.arch, baseline.arch, positions)
    cfg = finetune_config(steps, batch, SearchConfig().valid_tokens, distill=DISTILL_SHARE, cosine=COSINE,
                          aligned=match is not None)
    final = train(corpus, cfg, out, init=init, teacher=baseline, match=match, resume=resume,
                  show_progress=show_progress)
    if (teacher / TOKENIZER_DIR).is_dir() and distributed.is_main():  # an imported model's text needs it
        shutil.copytree(teacher / TOKENIZER_DIR, Path(out) / TOKENIZER_DIR, dirs_exist_ok=True)
    return final


def _parses(path: Path) -> bool:
    """Whether an ONNX file a resumed build finds is whole (one damaged by hand or a full disk is exported
    again)."""
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception:  # absent, truncated, not ONNX: protobuf raises several kinds
        return False
    return True


def _kept(path: Path, load: Callable[[], T]) -> T | None:
    """What `load` reads back of the build's own earlier output at `path` (a stage's directory or file), or None
    where that is damaged (truncated, garbage: the loaders' one-line PlanerError), once removed so that its stage
    runs again: the output is the build's, so a rerun makes it again rather than ask the user to delete it.
    Called by every rank."""
    try:
        return load()
    except PlanerError as e:
        _redo(path, e)
        return None


def _redo(path: Path, why: PlanerError) -> None:
    """Removes the build's own damaged output at `path`, for every rank, so that its stage runs again."""
    distributed.barrier()  # every rank has read it before it goes
    if distributed.is_main():
        print(f"{path} is damaged, so its stage runs again ({why})", file=sys.stderr)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    distributed.barrier()


def _check_request(out: Path, dep: Deployment) -> None:
    if out.exists():
        raise PlanerError(f"{out} already exists; choose another --out or delete it")
    describe_engine(dep.engine, threads=dep.threads)  # an engine missing here fails before any import or training


def _baseline(source: Path, work: Path, dep: Deployment, data: str | None, space: SearchSpace | None,
              method: str, moe: ExpertOptions) -> tuple[Path, LM, Corpus, SearchSpace]:
    """The baseline's run directory (imported into WORK first if need be), the baseline, its corpus and the
    search space this machine can train with the search `method`."""
    run = _imported(source, work, dep)
    _tokens_seen(run)  # a directory that cannot be a baseline is refused before minutes of profiling
    baseline = load_model(run).eval()
    return (run, baseline, run_corpus(run, data, baseline.arch.vocab_size),
            _trainable(space, baseline.arch, dep, method, moe))


def _profiled(baseline: LM, space: SearchSpace, dep: Deployment, work: Path, table_cache: Path | None,
              show_progress: bool) -> tuple[LatencyTable, Deployment]:
    """The latency table (entries of `table_cache` or WORK's table reused) and the deployment with its
    lowering settled (`auto`: the one profiling measured fastest)."""
    own = work / "latency_table.json"
    if table_cache and Path(table_cache).exists():
        known = LatencyTable.load(table_cache)  # the user's file: a damaged one is refused in one line
    else:
        known = _kept(own, lambda: LatencyTable.load(own)) if own.exists() else None
    table = profile(baseline.arch, space.candidates, dep, show_progress=show_progress, table=known)
    if distributed.is_main():
        table.save(work / "latency_table.json")
        if table_cache:
            table.save(table_cache)
    return table, dep.resolved(table)


class _Clock:
    """Wall seconds per stage, kept in WORK/timings.json as each stage ends, so that a resumed build reports the
    stages the earlier invocations completed with the time they took, not the ~0 s of finding them done (the
    work of a stage interrupted before its end is not counted)."""

    def __init__(self, work: Path) -> None:
        self.path = work / TIMINGS_FILE
        self.laps: dict[str, float] = (read_json(self.path, "delete it (it only times the stages) and run the "
                                                 "same command again") if self.path.is_file() else {})
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(self.laps.get(stage, 0.0) + now - self._last, 1)
        self._last = now
        if distributed.is_main():
            atomic_write(self.path, json.dumps(self.laps, indent=2) + "\n")


def _trainable(space: SearchSpace | None, arch: Architecture, dep: Deployment, method: str,
               moe: ExpertOptions = ExpertOptions()) -> SearchSpace:
    """The given space, or the default one with the MoE candidates `moe` asks for (for the local search the
    FFN's splits into experts; for the supernet, narrowed to what this machine's memory can train), with every
    block in each precision the deployment runs (Deployment.searchable). What the search cannot do with it is
    refused here, before any work."""
    limit = trainable_params_limit()
    local = method == "local"
    if space is not None and moe.given():
        raise PlanerError(f"{moe.given()[0]} shapes the default space; with --space, list the MoE blocks in the file")
    moe.check(arch, local)
    if space is None and local:  # the FFN's splits alone: the supernet's default expert counts would come back
        # as splits (E experts of W/E units split W) beside those --experts asked for
        splits = {k: v for k, v in (("experts", moe.experts), ("top_k", moe.top_k), ("shared", moe.shared)) if v}
        space = SearchSpace.default(arch, experts=()).with_splits(arch, **splits)
    elif space is None:
        upcycled = {k: v for k, v in (("experts", moe.experts), ("top_k", moe.top_k)) if v}
        space = SearchSpace.default(arch, max_params=limit, **upcycled)
    space = dep.searchable(space)
    if local:
        alternatives(arch, space)
    else:
        space.check_supernet(arch, limit)
    return space


def _imported(source: Path, work: Path, dep: Deployment) -> Path:
    """The baseline's run directory: `source` itself, or for a Hugging Face checkpoint its import in
    WORK/imported (kept there, so a resumed build does not import again)."""
    if not is_hf_checkpoint(source):
        return source
    imported = work / "imported"
    if imported.is_dir():
        _kept(imported, lambda: load_model(imported))  # one damaged since is imported again

    def import_once() -> None:  # a resumed build finds it there
        if not imported.is_dir():
            work.mkdir(parents=True, exist_ok=True)
            write_run(import_hf(source, tgt_len=dep.tgt_len, mem_len=dep.mem_len), source, imported)

    distributed.main_writes(import_once)
    return imported


def _start_or_resume(work: Path, request: dict[str, Any], file: str = REQUEST_FILE) -> None:
    """Create the staging directory, or check that the interrupted build (or sweep) in it asked for the same
    thing, as its `file` records."""
    if (work / file).exists():
        before = read_json(work / file, f"what it was asked for is lost: delete {work} and run the command again")
        changed = [k for k in request if before.get(k) != json.loads(json.dumps(request[k]))]
        if changed:
            raise PlanerError(f"{work} holds an interrupted {Path(file).stem} of something else (differs in: "
                              f"{', '.join(changed)}); repeat its arguments to resume it, or delete it")
        return
    def start() -> None:
        work.mkdir(parents=True, exist_ok=True)  # it may hold the baseline's import already
        atomic_write(work / file, json.dumps(request, indent=2) + "\n")

    distributed.barrier()  # every rank saw no staging directory before rank 0 makes one
    distributed.main_writes(start)


def _summary(build_dir: Path) -> dict[str, Any]:
    remedy = f"delete {build_dir} and run the same command again (that build is redone)"
    return (read_json(build_dir / "latency.json", remedy)
            | {"accuracy": read_json(build_dir / "accuracy.json", remedy)})


def sweep(run: str | Path, out: str | Path, speedups: list[float], **options: Any) -> list[dict[str, Any]]:
    """One build per target speedup, as OUT/x<S>, sharing the latency table and the continued baseline, plus
    OUT/pareto.png and OUT/sweep.md across them. Options are build()'s. An interrupted sweep continues
    where it stopped when called again: finished builds are kept, the interrupted one resumes."""
    run, out = Path(run), Path(out)
    if out.exists():
        raise PlanerError(f"{out} already exists; choose another --out or delete it")
    work = staging_dir(out)
    # its finished builds are reused by their options, which name the import below, not the model it came from
    _start_or_resume(work, {"model": str(run.resolve())}, SWEEP_FILE)
    run = _imported(run, work, options["dep"])  # once for every target
    options.setdefault("table_cache", None)
    options["table_cache"] = options["table_cache"] or work / "latency_table.json"
    summaries = []
    given = options.pop("continued", None)
    for s in speedups:
        done = work / f"x{s:g}"
        continued = work / f"x{speedups[0]:g}" / CONTINUED if summaries else given
        summaries.append(_finished(done, options) if done.is_dir() else
                         build(run, done, target=Target(speedup=s), continued=continued, **options))

    def finish() -> None:
        _sweep_summary(run, work, summaries)
        publish(work, out)

    distributed.main_writes(finish)
    return summaries


def _linked(source: Path, dest: Path, names: Sequence[str]) -> None:
    """`names` of directory `source` in a new directory `dest`, as hard links where the file system allows (a
    SmolLM2-135M library is 3.4 GB). Files are only ever replaced whole (planer.files.replacing), never written in
    place, so a link never changes the file it was made from."""
    staging = staging_dir(dest)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in names:
        try:
            os.link(source / name, staging / name)
        except OSError:  # another file system
            shutil.copy2(source / name, staging / name)
    publish(staging, dest)


def _finished(done: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The summary of a build an interrupted sweep finished, if it was asked for the same way as now."""
    before = read_json(done / REQUEST_FILE, f"delete {done} and run the sweep again")
    now = {"deployment": asdict(options["dep"]), "budget": asdict(options.get("budget", BUDGETS["medium"])),
           "compare": options.get("compare", False)}
    if options.get("space") is not None:
        now["space"] = options["space"].to_dict()
    changed = [k for k, v in now.items() if before.get(k) != json.loads(json.dumps(v))]
    if changed:
        raise PlanerError(f"{done} was built with another {', '.join(changed)}; repeat the sweep's arguments to "
                          f"continue it, or delete {done.parent}")
    return _summary(done)


def _sweep_summary(run: Path, work: Path, summaries: list[dict[str, Any]]) -> None:
    first = summaries[0]["accuracy"]
    points = [Point("baseline", summaries[0]["baseline"]["p50"], first["baseline"]),
              Point("baseline, continued", summaries[0]["baseline"]["p50"], first["baseline_continued"])]
    # Each build timed its own baseline beside its result: place results by their speedup on the first baseline.
    points += [Point(f"x{s['target_speedup']:g}", summaries[0]["baseline"]["p50"] / s["speedup"],
                     s["accuracy"]["result"], kind="result") for s in summaries]
    pareto_plot(points, work / "pareto.png", title=f"{run.name}: sweep of latency targets")
    rows = "\n".join(f"| x{s['target_speedup']:g} | {s['speedup']:.2f} | {'met' if s['met'] else '**missed**'} | "
                     f"{headline(s['accuracy']['result'])} | {s['accuracy']['result_vs_reference']:.4f} |"
                     for s in summaries)
    atomic_write(work / "sweep.md", f"""# planer sweep of `{run}`

Baseline {headline(first['baseline'])}; continued on as many tokens as each result: {headline(first['baseline_continued'])}.
Each build's latencies were measured beside its own baseline in one interleaved run (see x<S>/latency.json).

| target | measured speedup | met | validation | loss / better of the two baselines |
|---|---|---|---|---|
{rows}

Plot: `pareto.png`; one build directory per target.
""")


REFERENCES = ("baseline_continued", "baseline_self_distilled", "baseline")


def _judged_against(accuracy: dict) -> dict:
    """The baseline the result is judged against: the best of the baseline trained on with cross-entropy, the
    baseline trained with the result's own recipe (distilled from the result's teacher: the all-int8 baseline
    distilled so scored 0.991x the cross-entropy one, so that recipe alone can favour the result) and the baseline
    as it was (training on can leave it worse, and stopping early is a baseline a user could have had)."""
    name = min((n for n in REFERENCES if n in accuracy), key=lambda n: accuracy[n]["loss"])
    return {"reference": name, "result_vs_reference": accuracy["result"]["loss"] / accuracy[name]["loss"]}


def _tokens_seen(run: Path) -> int:
    """Tokens planer trained the baseline on (an imported model's pretraining is not planer's to count)."""
    if (run / IMPORT_FILE).is_file():
        return 0
    if (run / REQUEST_FILE).is_file() and not (run / CONFIG_FILE).is_file():
        named = read_json(run / REQUEST_FILE, "pass the baseline's run directory").get("model", "its baseline")
        raise PlanerError(f"{run} is a build's output, not a baseline's training run; build from the baseline it "
                          f"was built from ({named}), or `planer distill` it further")
    try:
        return int(json.loads((run / CONFIG_FILE).read_text())["tokens_seen"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PlanerError(f"{run}: no {CONFIG_FILE} records how many tokens the baseline was trained on; "
                          "use a run directory written by `planer train`") from None


def _trained(run_dir: Path, base_tokens: int) -> dict:
    """What a build's training run recorded: the tokens its network has trained on (the baseline's plus those
    the run's own record counts, not the budget's arithmetic, which a continued baseline reused from another
    build or a short run would belie) and its final PyTorch evaluation on the whole validation split (kept
    beside the engine's, which it should match: int8 blocks train as the engine computes them)."""
    remedy = f"delete {run_dir} and run the same command again (that stage is redone)"
    record = read_json(run_dir / EVAL_FILE, remedy)
    try:
        return {"tokens_trained": base_tokens + int(record["tokens_seen"]), "pytorch": dict(record["valid"])}
    except (KeyError, TypeError, ValueError):
        raise PlanerError(f"{run_dir / EVAL_FILE}: not the record planer writes; {remedy}") from None


def _finished_run(run_dir: Path) -> LM:
    """A finished training run's network, its record (which the verdict reads) checked too."""
    _trained(run_dir, 0)
    return load_model(run_dir).eval()


def _engine_accuracy(path: str, arch: Architecture, corpus: Corpus, dep: Deployment, show_progress: bool) -> dict:
    """The graph at `path` scored in the deployment's engine on the whole validation split, with the
    Transformer-XL protocol of the PyTorch evaluator (its batch of streams, the architecture's lengths)."""
    engine = load_engine(dep.engine, path, threads=dep.threads, shape=(EVAL_BATCH, arch.tgt_len, arch.mem_len))
    return evaluate_engine(engine, corpus.valid, corpus.unit, d_model=arch.d_model, tgt_len=arch.tgt_len,
                           mem_len=arch.mem_len, batch=EVAL_BATCH, show_progress=show_progress)


def _teacher_record(path: Path) -> dict[str, Any]:
    """A build's teacher.json (see _Build.taught_by)."""
    record = read_json(path, f"delete {path} and run the same command again")
    if record.get("teacher") not in set(TEACHERS) - {"auto"} or not 0 <= record.get("distill_share", 1.0) <= 1:
        raise PlanerError(f"{path}: not the record planer writes; delete it and run the same command again")
    return record


def teacher_of(work: Path, distill_share: float) -> dict[str, Any]:
    """What the build in WORK distilled from (its teacher.json), with the KL share: a build from before teachers
    were recorded distilled from the baseline, and one from before the share was, with its budget's
    `distill_share`."""
    path = work / TEACHER_FILE
    return {"teacher": "baseline", "distill_share": distill_share} | (_teacher_record(path) if path.exists() else {})


def recorded_reads(run: Path, corpus: Corpus) -> list[range]:
    """The positions of `corpus`'s training split that the training run `run` read, by its record (config.json):
    none for an imported model or a run on other data (whatever else it read, planer cannot know); for a run kept
    from some stretches (its held_out.json), every position outside them."""
    if (run / IMPORT_FILE).is_file() or not (run / CONFIG_FILE).is_file():
        return []
    if read_json(run / CONFIG_FILE, f"restore it from a copy, or train {run} again").get("data") != corpus.spec:
        return []
    if (run / HELD_OUT_FILE).is_file():
        kept_from = held_out_windows(run / HELD_OUT_FILE, len(corpus.train))
        bounds = [0, *(i for w in kept_from for i in (w.start, w.stop)), len(corpus.train)]
        return [range(a, b) for a, b in zip(bounds[::2], bounds[1::2]) if b > a]
    recipe = saved_config(run)[0]
    return read_spans(len(corpus.train), recipe.batch, Architecture.load(run / ARCH_FILE).tgt_len, recipe.steps)


def held_out_windows(path: Path, tokens: int) -> list[range]:
    """The stretches a held_out.json records, checked to lie in order within a training split of `tokens`."""
    remedy = f"delete {path.parent} and build again (the continued baseline is trained again)"
    spans = read_json(path, remedy).get("held_out_windows")
    ok = isinstance(spans, list) and all(
        isinstance(w, list) and len(w) == 2 and all(isinstance(i, int) for i in w) for w in spans)
    windows = [range(a, b) for a, b in spans] if ok else []
    if not ok or any(not 0 <= w.start < w.stop <= tokens for w in windows) or any(
            a.stop > b.start for a, b in zip(windows, windows[1:])):
        raise PlanerError(f"{path}: not the record planer writes for this data; {remedy}")
    return windows


def teaches_the_baseline(teacher: str, share: float) -> bool:
    """Whether a recipe of KL share `share` (the rest cross-entropy) taught by `teacher` would move the baseline at
    all. Taught by itself with no cross-entropy, the baseline starts at the recipe's minimum (its logits bitwise
    the teacher's, KL and cosine zero, the gradient rounding alone), so it is its own self-distilled reference.
    Training it only jitters it about where it started, since Adam's steps stay near the learning rate however
    small the gradient (RESULTS.md, the deep preset: +0.024 loss at step 550 of 2,200, 1.3207 against 1.3193 at
    the end, for 15 of the build's 70 minutes)."""
    return teacher != "baseline" or share < 1.0


class _Teacher(NamedTuple):
    """What the result and the self-distilled reference distil from, and teacher.json's record of it."""
    model: LM
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.record["teacher"]

    @property
    def share(self) -> float:
        """The KL share of their logits' loss (Budget.share), the rest cross-entropy."""
        return self.record["distill_share"]


@dataclass
class _Build:
    """A build past profiling: what every later stage reads, settled once (the baseline's run and model, the
    corpus, the space, the latency table, the deployment with its lowering resolved, the target and budget), and
    the stages as methods named for what they leave in WORK. Every rank trains; rank 0 alone measures and writes,
    and what it measured reaches the other ranks by one broadcast at the end."""

    source: Path  # the --model the user named; `run` is its import, for a Hugging Face model
    run: Path
    work: Path
    baseline: LM
    corpus: Corpus
    space: SearchSpace
    table: LatencyTable
    dep: Deployment
    target: Target
    budget: Budget
    show_progress: bool
    clock: _Clock

    def finish(self, continued: Path | None, compare: bool) -> tuple[dict, dict]:
        """Search, continue the baseline, choose the teacher, distil, train the self-distilled reference (where the
        recipe would move the baseline at all), compare,
        then export, time and score: latency.json's and accuracy.json's contents, on every rank. `continued`: an
        earlier build's baseline-continued/ to reuse (see `reference`)."""
        base_tokens = _tokens_seen(self.run)
        base_onnx = self.exported_baseline()
        earlier = continued.parent if continued is not None else None
        outcome = self.searched(self.work / "search", self.space, self.target, base_onnx, earlier)
        self.table = outcome.table
        self.clock.lap("search")
        continued_model = self.reference(CONTINUED, continued, None)
        teacher = self.taught_by(continued_model)
        self.clock.lap("continued baseline")
        result = self.distilled(outcome.chosen, teacher)
        self.clock.lap("distill")
        references = [(CONTINUED, continued_model)]
        if teaches_the_baseline(teacher.name, teacher.share):
            references.append((SELF_DISTILLED, self.reference(SELF_DISTILLED, earlier and earlier / SELF_DISTILLED,
                                                              teacher)))
            self.clock.lap("self-distilled baseline")
        comparisons: list[tuple[str, LM]] = []
        if compare:
            comparisons = self.compared(self.table.predict(result.arch), base_onnx, teacher)
            self.clock.lap("compare")
        if not distributed.is_main():
            return distributed.broadcast(None)
        self.table.save(self.work / "latency_table.json")
        with tempfile.TemporaryDirectory(prefix="planer-build-") as tmp:
            def graph(name: str, model: LM) -> tuple[str, str, LM]:
                return name, str(export_lm(model, Path(tmp) / f"{name}.onnx", **self.dep.export_options())), model

            as_fp32 = in_precision(result, "fp32")
            twin = [graph("result-fp32", as_fp32)] if as_fp32.arch != result.arch else []
            path, checked = self.exported(result, twin)
            timed = [(BASELINE, base_onnx, self.baseline), ("result", str(path), result)]
            timed += [graph(name, m) for name, m in comparisons]
            latency = self.verdict(timed, twin, checked)
            scored = {name: _engine_accuracy(p, m.arch, self.corpus, self.dep, self.show_progress)
                      for name, p, m in timed + [graph(name, model) for name, model in references]}
        accuracy = self.judged(scored, [name for name, _ in comparisons], base_tokens, teacher.record)
        self.figures(outcome, result, comparisons, latency, accuracy)
        return distributed.broadcast((latency, accuracy))

    def exported_baseline(self) -> str:
        """BUILD/baseline/: the baseline exported once for the build, timed beside every candidate and the
        result (and by `planer bench` later). Rank 0's path; other ranks never time."""
        if not distributed.is_main():
            return ""
        out = self.work / BASELINE
        out.mkdir(exist_ok=True)
        self.baseline.arch.save(out / ARCH_FILE)
        path = out / "model.onnx"
        return str(path if _parses(path) else export_lm(self.baseline, path, **self.dep.export_options()))

    def searched(self, out: Path, space: SearchSpace, target: Target, base_onnx: str,
                 reuse: Path | None = None) -> SearchOutcome:
        """The search's outcome in OUT, or the one an earlier, interrupted build saved there. `reuse`: an earlier
        build's directory, whose local search's library this one starts from (the library depends on the baseline,
        the space and the budget, not on the target; the search trains its own where it is not the same)."""
        if (out / OUTCOME_FILE).exists():
            saved = _kept(out, lambda: SearchOutcome.load(out))
            if saved is not None:
                return saved
        log = out.with_name(f"{out.name}_log.jsonl")
        library = out.with_name(f"{out.name}-library")
        distributed.barrier()  # every rank saw no outcome before rank 0 starts a new log
        if distributed.is_main():
            log.unlink(missing_ok=True)  # an interrupted search starts over (its library goes on where it stopped)
            if reuse is not None and (reuse / library.name / LIBRARY_RECORD).is_file() and not library.exists():
                _linked(reuse / library.name, library, (LIBRARY_FILE, LIBRARY_RECORD))
        distributed.barrier()
        outcome = run_search(self.baseline, self.corpus.training_split(), space, self.table, self.dep, target,
                             cfg=self.budget.searched_with, log_path=log, show_progress=self.show_progress,
                             baseline_onnx=base_onnx, library_dir=library)

        def save() -> None:
            staging = staging_dir(out)
            shutil.rmtree(staging, ignore_errors=True)
            outcome.save(staging)
            publish(staging, out)

        distributed.main_writes(save)
        return outcome

    def trained(self, out: Path, init: LM, teacher: _Teacher | None, searched: bool = False,
                positions: Sequence[BlockSpec] = (), kept_from: Sequence[range] = ()) -> LM:
        """`init` trained with the budget's recipe in OUT (distilled from `teacher` with its share of KL, with
        cross-entropy alone where it is None), an interrupted run there continued, or a finished one loaded. A
        `searched` network trains the steps its search did not already train it for (Budget.result_steps).
        `positions`: the blocks it was chosen as, one per position, skips included, which align its hidden states
        with the baseline's for the cosine loss (without them only a network of the baseline's depth is aligned,
        block for block). `kept_from`: stretches of the training split it trains without. A run whose files are
        damaged is trained again."""
        if (out / EVAL_FILE).exists():
            finished = _kept(out, lambda: _finished_run(out))
            if finished is not None:
                return finished
        steps = self.budget.result_steps if searched else self.budget.extra_steps
        match = alignment(init.arch, self.baseline.arch, positions)
        distill = teacher.share if teacher is not None else 0.0
        recipe = self.budget.recipe(steps, distill=distill, cosine=self.budget.cosine, aligned=match is not None)
        if distill and self.budget.cosine and not recipe.cosine:
            print(f"{out.name}: its blocks do not align with the baseline's; distilled without the cosine loss",
                  file=sys.stderr)

        corpus = self.corpus
        if kept_from:
            corpus = replace(corpus, train=np.delete(corpus.train, np.concatenate([np.arange(w.start, w.stop)
                                                                                 for w in kept_from])))

        def run(resume: bool) -> None:
            train(corpus, recipe, out, init=init, teacher=teacher and teacher.model, match=match,
                  resume=resume, show_progress=self.show_progress)

        try:
            run(resumable(out))
        except DamagedCheckpoint as e:
            _redo(run_source(out), e)
            run(False)
        return load_model(out).eval()

    def distilled(self, chosen: Candidate, teacher: _Teacher) -> LM:
        """The chosen network distilled from `teacher` (distill/), its weights and architecture in WORK."""
        result = self.trained(self.work / "distill", chosen.model, teacher, searched=True, positions=chosen.positions)
        if distributed.is_main():
            shutil.copy(self.work / "distill" / ARCH_FILE, self.work / ARCH_FILE)
            shutil.copy(self.work / "distill" / WEIGHTS_FILE, self.work / WEIGHTS_FILE)
        return result

    def reference(self, name: str, reuse: Path | None, teacher: _Teacher | None) -> LM:
        """Fairness: the result has seen the baseline's tokens plus as many as the search and distillation
        steps, so the baselines it is judged against train on as many more tokens: with cross-entropy (`teacher`
        None: baseline-continued/) and with the result's own recipe, distilled from its teacher
        (baseline-self-distilled/). `reuse`: the same reference of an earlier build, copied instead of trained
        where it is the same (a self-distilled one: the same recipe and teacher); refused where it trained on
        fewer tokens than the result will."""
        out = self.work / name
        if reuse is not None and reuse.is_dir() and not out.exists() and self._same_reference(reuse, teacher):
            needed = self.budget.extra_tokens(self.baseline.arch.tgt_len)
            had = _trained(reuse, 0)["tokens_trained"]
            if had < needed:
                raise PlanerError(f"the reference {reuse} trained on {had:,} tokens, fewer than the {needed:,} the "
                                  "result trains on, so the comparison would flatter the result; build again "
                                  "without reusing a reference trained with a smaller budget")
            distributed.main_writes(lambda: shutil.copytree(reuse, out))
        kept_from = self.teacher_windows(out) if teacher is None else []
        model = self.trained(out, self.baseline, teacher, kept_from=kept_from)
        if kept_from:  # the run's own record from now on: later builds take it over (sweeps, --reuse-continued)
            distributed.main_writes(lambda: os.replace(self.work / HELD_OUT_FILE, out / HELD_OUT_FILE))
        return model

    def teacher_windows(self, continued: Path) -> list[range]:
        """The stretches of the training split that --teacher auto compares the baseline and the continued
        baseline on, which the continued baseline (at `continued`) trains without: TEACHER_WINDOWS of
        `trial_tokens / TEACHER_WINDOWS` tokens, spread over the split, that the baseline did not read by its
        record. A continuation can read the whole split (`tiny` at --budget large: 1.1 passes), and the choice
        then had no tokens to compare on and fell back to the baseline, a far weaker teacher there. Chosen
        before it trains and recorded in WORK/held_out.json until it has trained, so a resumed build keeps
        them; none for a continued baseline taken over from another build or an older one, nor where the
        baseline read nearly all the split."""
        record = self.work / HELD_OUT_FILE
        if distributed.is_main() and not record.exists() and run_source(continued) is None:
            windows = self._unread(self.run)
            if len(windows) == TEACHER_WINDOWS:
                atomic_write(record, json.dumps({"held_out_windows": [[w.start, w.stop] for w in windows]}) + "\n")
        distributed.barrier()
        return held_out_windows(record, len(self.corpus.train)) if record.exists() else []

    def _unread(self, *runs: Path) -> list[range]:
        """TEACHER_WINDOWS stretches of the training split, as many tokens in all as the search holds out, spread
        over it, that none of `runs` read by its record; fewer where fewer fit."""
        read = [span for run in runs for span in recorded_reads(run, self.corpus)]
        return unread_windows(len(self.corpus.train), read, self.budget.search.trial_tokens // TEACHER_WINDOWS,
                              TEACHER_WINDOWS)

    def _same_reference(self, reuse: Path, teacher: _Teacher | None) -> bool:
        """Whether an earlier build's reference `reuse` trained as this build's would: any continued baseline
        does; a self-distilled one only with this build's recipe and the same teacher (that build's teacher.json,
        or the baseline, which every build distilled from before it had one)."""
        if teacher is None:
            return True
        recipe = saved_config(reuse)[0]
        if (recipe.distill, recipe.cosine) != (teacher.share, self.budget.cosine):
            return False
        return teacher_of(reuse.parent, self.budget.distill_share)["teacher"] == teacher.name

    def taught_by(self, continued: LM) -> _Teacher:
        """The teacher of the result and of the self-distilled reference, chosen once and recorded in
        teacher.json (a resumed build keeps the one its distillation started with): the one --teacher names,
        or for auto the better of the baseline and the continued baseline on training tokens neither read
        (`_chosen_teacher`); with it, the KL share of their recipe (Budget.share;
        a record from before it was recorded: the budget's, which its build distilled with)."""
        path = self.work / TEACHER_FILE
        record = _kept(path, lambda: teacher_of(self.work, self.budget.distill_share)) if path.exists() else None
        if record is None:
            record = distributed.broadcast(self._chosen_teacher(continued) if distributed.is_main() else None)
            record["distill_share"] = self.budget.share(record["teacher"])
            distributed.main_writes(lambda: atomic_write(path, json.dumps(record, indent=2) + "\n"))
        return _Teacher(continued if record["teacher"] == "continued" else self.baseline, record)

    def _chosen_teacher(self, continued: LM) -> dict[str, Any]:
        """teacher.json's record. auto compares the two on training tokens neither read (by the training runs'
        records: the continued one's, the baseline's where planer trained it on this data), as many as the search
        holds out, in TEACHER_WINDOWS stretches spread over the split: one stretch is one kind of text, and the
        split's tail, which the baseline's last steps read up to, favoured it (`tiny`: 1.4151 against 1.4801 on
        the tail, the continued baseline lower in 40 of 56 unread stretches and on the validation split). The
        continued baseline is kept from them (`teacher_windows`). Where too few such tokens remain, the baseline,
        the method's own teacher."""
        asked = self.budget.teacher
        if asked != "auto":
            return {"teacher": asked, "asked": asked}
        tokens = self.corpus.train
        windows = self._unread(self.run, self.work / CONTINUED)
        if len(windows) < TEACHER_WINDOWS:
            print("the baseline and the continued baseline read nearly all the training split between them, which "
                  "leaves no tokens to compare them on, so the result distils from the baseline (--teacher "
                  "continued chooses the other)", file=sys.stderr)
            return {"teacher": "baseline", "asked": asked, "why": "too few training tokens neither read"}
        held_out = np.concatenate([tokens[w.start:w.stop] for w in windows])
        losses = {name: evaluate(model, held_out, self.corpus.unit, batch=EVAL_BATCH,
                                 progress=f"teacher: {name}" if self.show_progress else None)["loss"]
                  for name, model in (("baseline", self.baseline), ("continued", continued))}
        return {"teacher": min(losses, key=losses.__getitem__), "asked": asked, "held_out_loss": losses,
                "held_out_tokens": len(held_out), "held_out_windows": [[w.start, w.stop] for w in windows]}

    def compared(self, budget_ms: float, base_onnx: str, teacher: _Teacher) -> list[tuple[str, LM]]:
        """The --compare networks in compare/, trained with the result's recipe and teacher (see planer.compare).
        dense-only searches for the build's own target: a target in ms taken from the first search would be read against
        this search's own baseline measurement, and one measured high made it cut to half the result's time."""
        root = self.work / "compare"
        if distributed.is_main():
            root.mkdir(exist_ok=True)
        fixed, self.table = fixed_comparisons(self.baseline, self.table, budget_ms, self.dep, self.show_progress)
        trained = [(c.name, self.trained(root / c.name, c.model, teacher, positions=c.positions)) for c in fixed]
        dense = self.searched(root / "dense-only-search", dense_space(self.space), self.target, base_onnx)
        dense_only = self.trained(root / "dense-only", dense.chosen.model, teacher, searched=True,
                                  positions=dense.chosen.positions)
        return trained + [("dense-only", dense_only)]

    def exported(self, result: LM, twin: list[tuple[str, str, LM]]) -> tuple[Path, dict[str, float]]:
        """model.onnx and what verified it against PyTorch (latency.json's figures), with what serving reads beside
        it (the vocabulary, an imported model's tokenizer). `twin`: the result's exported fp32 twin, when it has
        int8 blocks (planer.export.reference.verify says what it checks)."""
        def loaded(graph: str) -> Engine:
            return load_engine(self.dep.engine, graph, threads=self.dep.threads, shape=self.dep.shape)

        path = export_lm(result, self.work / "model.onnx", **self.dep.export_options())
        checked = verify(result, loaded(str(path)), batch=self.dep.batch, tgt_len=self.dep.tgt_len,
                         mem_len=self.dep.mem_len, twin=loaded(twin[0][1]) if twin else None,
                         data=self.corpus.valid)
        if self.corpus.vocab is not None:
            atomic_write(self.work / VOCAB_FILE, json.dumps(self.corpus.vocab) + "\n")
        if (self.run / TOKENIZER_DIR).is_dir():
            shutil.copytree(self.run / TOKENIZER_DIR, self.work / TOKENIZER_DIR, dirs_exist_ok=True)
        return path, checked

    def verdict(self, timed: list[tuple[str, str, LM]], twin: list[tuple[str, str, LM]], checked: dict) -> dict:
        """latency.json: the baseline, the result and the comparisons (`timed`) in interleaved confirmation
        runs, with the result's fp32 `twin` when it has int8 blocks (what its architecture alone buys). Every
        speedup is the median of that network's own runs' ratios (`confirmation`'s `speedups`), and every figure
        is from the run whose ratio for that network is the median: the baseline's and the result's from the
        result's, each comparison's from its own (not the result's: in that run one build's dense-only measured
        2.12x, its own runs' median being 2.10x)."""
        names = [name for name, _, _ in timed + twin]
        confirmation = confirm([(p, m.arch) for _, p, m in timed + twin], self.dep.verdict())
        base_stats, result_stats = confirmation.median_run(1)[:2]
        speedup = confirmation.ratio(1)
        dep = self.dep
        latency = {
            "engine": self.table.provenance, "deployment": {"batch": dep.batch, "tgt_len": dep.tgt_len,
                                                            "mem_len": dep.mem_len, "threads": dep.threads,
                                                            "precisions": list(dep.precisions)},
            "baseline": base_stats.to_dict(), "result": result_stats.to_dict(), "speedup": speedup,
            "target_ms": self.target.ms_for(base_stats.p50), "target_speedup": self.target.speedup,
            "met": self.target.met(speedup, confirmation.p50(1)), **checked,
            "comparisons": {name: confirmation.median_run(i)[i].to_dict()
                            for i, (name, _, _) in enumerate(timed[2:], start=2)},
            "confirmation": confirmation.to_dict(names),
        }
        if twin:  # both measured: the result's fp32 twin against the baseline, the result against its twin
            architecture = confirmation.ratio(len(timed))
            latency["decomposition"] = {"architecture": architecture, "precision": speedup / architecture}
        atomic_write(self.work / "latency.json", json.dumps(latency, indent=2) + "\n")
        return latency

    def judged(self, scored: dict[str, dict], compared: list[str], base_tokens: int, teacher: dict) -> dict:
        """accuracy.json: each graph's engine score, with the tokens each network trained on, and the reference
        the result is judged against."""
        runs = {CONTINUED: self.work / CONTINUED, SELF_DISTILLED: self.work / SELF_DISTILLED,
                "result": self.work / "distill"}
        runs |= {name: self.work / "compare" / name for name in compared}
        kept = self.budget.kept_tokens(self.baseline.arch.tgt_len)  # what the searched networks' blocks trained on
        searched = {"result", "dense-only"}
        graded = {name: scored[name] | (_trained(runs[name], base_tokens + (kept if name in searched else 0))
                                        if name in runs else {"tokens_trained": base_tokens}) for name in scored}
        accuracy = {"data": self.corpus.name, "split": "valid", "evaluated_in": self.dep.engine,
                    "teacher": teacher, "baseline": graded[BASELINE],
                    "baseline_continued": graded[CONTINUED],
                    **({"baseline_self_distilled": graded[SELF_DISTILLED]} if SELF_DISTILLED in graded else {}),
                    "result": graded["result"], "comparisons": {name: graded[name] for name in compared}}
        accuracy.update(_judged_against(accuracy))
        atomic_write(self.work / "accuracy.json", json.dumps(accuracy, indent=2) + "\n")
        return accuracy

    def figures(self, outcome: SearchOutcome, result: LM, comparisons: list[tuple[str, LM]], latency: dict,
                accuracy: dict) -> None:
        """pareto.png, arch.png, timings.json and report.md."""
        base_ms = latency["baseline"]["p50"]
        points = [Point("baseline", base_ms, accuracy["baseline"]),
                  Point("baseline, continued", base_ms, accuracy["baseline_continued"])]
        if "baseline_self_distilled" in accuracy:
            points.append(Point("baseline, self-distilled", base_ms, accuracy["baseline_self_distilled"]))
        points += [Point(f"{c.describe()} (the search's weights; held-out training loss)",
                         base_ms * c.measured_ms / c.baseline_ms, scores(c.held_out_loss, self.corpus.unit),
                         kind="candidate") for c in outcome.candidates]
        points += [Point(name, latency["comparisons"][name]["p50"], accuracy["comparisons"][name],
                         kind="comparison") for name, _ in comparisons]
        points.append(Point("result", latency["result"]["p50"], accuracy["result"], kind="result"))
        pareto_plot(points, self.work / "pareto.png",
                    title=f"{self.source.name}: latency vs accuracy ({self.dep.engine})")
        archs = [("baseline", self.baseline.arch), ("result", result.arch)] + [(n, m.arch) for n, m in comparisons]
        arch_plot(archs, self.table, self.work / "arch.png")
        self.clock.lap("export, verify, time, evaluate")
        atomic_write(self.work / "report.md", report(self.source, self.baseline.arch, result.arch, latency, accuracy,
                                                     {n: m.arch for n, m in comparisons}, self.budget.describe(),
                                                     self.clock.laps))


