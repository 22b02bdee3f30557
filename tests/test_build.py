"""A fast end-to-end build: micro baseline, a few steps per stage, a real engine measurement."""

import json
import os
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from planer import build as build_module
from planer.arch import BlockSpec
from planer.build import Budget, build, search_alone, sweep
from planer.checkpoint import WEIGHTS_FILE, load_model, save_weights
from planer.data import Segments
from planer.deployment import Deployment, Target
from planer.errors import PlanerError
from planer.files import ARCH_FILE, staging_dir
from planer.latency import LatencyTable
from planer.nn import LM
from planer.search.local import LIBRARY_FILE
from planer.search.search import OUTCOME_FILE, Candidate, SearchConfig, SearchOutcome
from planer.search.supernet import SuperNet
from planer.space import SearchSpace
from planer.train.evaluate import evaluate
from planer.train.trainer import CONFIG_FILE, EVAL_FILE, STATE_FILE, run_corpus, saved_config
from tests.conftest import small_arch
from tests.test_cli import _one_line_error, run

# auto: the MoE lowering is measured while profiling (the baseline's exact gelu leaves `ops` alone to time)
DEP = Deployment(batch=1, tgt_len=64, mem_len=64, threads=1, min_iters=10, min_seconds=0.1, lowering="auto",
                 verdict_seconds=0.3)  # the micro networks time steadily enough in less than the default 2 s
SPACE = SearchSpace(4, (BlockSpec.skip(), BlockSpec.attn(1, 16), BlockSpec.ffn(64), BlockSpec.moe(2, 1, 64)))
# one round: the rounds' calibration is tests/test_search.py's to check; every round costs a graph export here
BUDGET = Budget(SearchConfig(rounds=1, steps=3, batch=2, valid_tokens=512), distill_steps=3, cosine=0.5)


def test_build_directory_is_complete_and_meets_its_target(baseline_run, table_file, tmp_path, monkeypatch):
    out = tmp_path / "build"
    searched_on = []  # the tokens each search (the result's, dense-only's) received
    search = build_module.run_search
    monkeypatch.setattr(build_module, "run_search", lambda baseline, training, *a, **k: (
        searched_on.append(training.tokens), search(baseline, training, *a, **k))[1])
    budget = replace(BUDGET, distill_share=0.5)  # cross-entropy in the recipe: either teacher moves the baseline
    summary = build(baseline_run, out, dep=DEP, target=Target(speedup=1.5), budget=budget, space=SPACE,
                    table_cache=table_file, compare=True, show_progress=False)
    assert table_file.is_file()
    names = {p.name for p in out.iterdir()}
    assert names >= {"arch.json", "model.safetensors", "model.onnx", "latency.json", "accuracy.json",
                     "latency_table.json", "search_log.jsonl", "report.md", "distill", "baseline-continued",
                     "baseline-self-distilled", "pareto.png", "arch.png", "baseline"}
    assert {p.name for p in (out / "baseline").iterdir()} == {"arch.json", "model.onnx"}  # planer bench's reference
    assert not (tmp_path / "build.partial").exists()
    latency = json.loads((out / "latency.json").read_text())
    assert latency["met"] and latency["speedup"] >= 1.5 and summary["speedup"] == latency["speedup"]
    assert latency["result"]["p50"] * 1.5 <= latency["baseline"]["p50"]
    assert latency["parity_max_abs_diff"] < 1e-4
    # confirmed in separate runs: each speedup is the median of the runs' own ratios, each network's figures its
    # median run's (the baseline's, the result's)
    runs = [r["models"] for r in latency["confirmation"]["runs"]]
    twin = {"result-fp32"} if "decomposition" in latency else set()  # the result's fp32 twin, when it has int8
    assert ("int8_simulation_disagreement" in latency) == bool(twin)  # an int8 graph is checked block by block
    assert latency.get("int8_simulation_disagreement", 0) < 0.05
    assert len(runs) == 3 and all(set(run) == {"baseline", "result", *latency["comparisons"], *twin} for run in runs)
    ratios = [r["baseline"]["p50"] / r["result"]["p50"] for r in runs]
    assert latency["speedup"] == pytest.approx(statistics.median(ratios))
    assert {"baseline": latency["baseline"], "result": latency["result"]} in [
        {name: run[name] for name in ("baseline", "result")} for run in runs]
    for name, stats in latency["comparisons"].items():
        own = [r["baseline"]["p50"] / r[name]["p50"] for r in runs]
        assert stats == runs[own.index(statistics.median_low(own))][name]
        assert latency["confirmation"]["speedups"][name] == pytest.approx(statistics.median(own))
    if twin:
        d = latency["decomposition"]
        assert d["architecture"] * d["precision"] == pytest.approx(latency["speedup"])
    assert latency["engine"]["lowering"] == "ops" and set(latency["engine"]["lowering_trials"]) == {"ops"}
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["baseline"]["tokens"] == accuracy["result"]["tokens"] > 0  # the same split, whole
    # fairness: the baseline it is judged against trained on as many tokens as the result, by the runs' own records
    search_and_distill = (BUDGET.search.rounds * BUDGET.search.steps + BUDGET.distill_steps) * BUDGET.search.batch * 64
    for name, run_dir in (("baseline_continued", "baseline-continued"),
                          ("baseline_self_distilled", "baseline-self-distilled"), ("result", "distill")):
        recorded = json.loads((out / run_dir / "eval.json").read_text())["tokens_seen"]
        assert recorded == search_and_distill
        assert accuracy[name]["tokens_trained"] == accuracy["baseline"]["tokens_trained"] + recorded
    # the self-distilled reference trains with the result's own recipe
    assert saved_config(out / "baseline-self-distilled") == saved_config(out / "distill")
    assert saved_config(out / "distill")[0].distill > 0 and saved_config(out / "baseline-continued")[0].distill == 0
    assert saved_config(out / "distill")[0].cosine == BUDGET.cosine > 0  # aligned by the positions it was chosen as
    # and the result is judged against the best of the three baselines
    best = min(("baseline", "baseline_continued", "baseline_self_distilled"), key=lambda n: accuracy[n]["loss"])
    assert accuracy["reference"] == best
    assert accuracy["result_vs_reference"] == pytest.approx(accuracy["result"]["loss"] / accuracy[best]["loss"])
    # the scores are the shipped graphs' run in the engine, and PyTorch's evaluation of each trained run agrees
    # (int8 blocks included: they train as the engine computes them)
    assert accuracy["evaluated_in"] == "ort"
    shipped = load_model(out)
    corpus = run_corpus(baseline_run, None, shipped.arch.vocab_size)
    assert len(searched_on) == 2 and all(np.array_equal(tokens, corpus.train) for tokens in searched_on)
    assert evaluate(shipped, corpus.valid, corpus.unit)["loss"] == pytest.approx(accuracy["result"]["loss"], rel=1e-5)
    for scored in (accuracy["result"], accuracy["baseline_continued"], *accuracy["comparisons"].values()):
        assert scored["pytorch"]["loss"] == pytest.approx(scored["loss"], rel=1e-5)
    assert "test" not in json.loads((out / "distill" / "eval.json").read_text())  # a build judges on valid alone
    # the teacher, auto: the lower loss of the baseline and the continued baseline on training tokens neither run
    # read (by their records), spread over the split, scored again here
    teacher = accuracy["teacher"]
    assert teacher == json.loads((out / "teacher.json").read_text()) and teacher["asked"] == "auto"
    windows = [range(*w) for w in teacher["held_out_windows"]]
    assert len(windows) == build_module.TEACHER_WINDOWS
    assert teacher["held_out_tokens"] == sum(map(len, windows)) == BUDGET.search.trial_tokens
    # the continued baseline trained without them (its held_out.json), and the build takes it to have read the rest
    assert json.loads((out / "baseline-continued" / "held_out.json").read_text()) == {
        "held_out_windows": teacher["held_out_windows"]}
    read = np.zeros(len(corpus.train), bool)
    for run_dir, kept_from in ((baseline_run, []), (out / "baseline-continued", windows)):
        by_run = _positions_read(run_dir, len(corpus.train), kept_from)
        recorded = _recorded(run_dir, corpus)
        assert by_run.any() and (np.array_equal(recorded, by_run) if not kept_from else not (by_run & ~recorded).any())
        read |= by_run
    assert not any(read[w.start:w.stop].any() for w in windows)
    assert windows[-1].start > len(corpus.train) // 2  # spread, not the first stretch alone
    held_out = np.concatenate([corpus.train[w.start:w.stop] for w in windows])
    losses = {name: evaluate(load_model(run_dir).eval(), held_out, corpus.unit)["loss"]
              for name, run_dir in (("baseline", baseline_run), ("continued", out / "baseline-continued"))}
    assert teacher["held_out_loss"] == pytest.approx(losses, rel=1e-5)
    assert teacher["teacher"] == min(losses, key=losses.__getitem__)
    # and the recipe it taught with, as the two runs it taught recorded it
    assert teacher["distill_share"] == budget.share(teacher["teacher"])
    assert all(json.loads((out / r / "config.json").read_text())["train"]["distill"] == teacher["distill_share"]
               for r in ("distill", "baseline-self-distilled"))
    log = (out / "search_log.jsonl").read_text().splitlines()
    assert sum('"confirm"' not in line for line in log) == BUDGET.search.rounds
    report = (out / "report.md").read_text()
    assert "met" in report and "the dense-only search" in report
    assert f"training tokens neither trained on, in {build_module.TEACHER_WINDOWS} stretches" in report
    # --compare: the baseline in its fastest precisions, three alternatives at the result's latency, trained and
    # timed beside it (fastest-precision only where int8 measured faster than fp32 for some baseline block)
    names = ["drop-attention", "narrow", "dense-only"]
    names += ["fastest-precision"] if "fastest-precision" in latency["comparisons"] else []
    assert sorted(latency["comparisons"]) == sorted(accuracy["comparisons"]) == sorted(names)
    assert all((out / "compare" / n / "model.safetensors").is_file() for n in names)
    assert all(a["tokens_trained"] == accuracy["result"]["tokens_trained"] for a in accuracy["comparisons"].values())
    # a self-distilled reference is taken up only from a build that distilled from the same teacher, with the same
    # share of KL
    stages = build_module._Build(baseline_run, baseline_run, tmp_path / "mine.partial", load_model(baseline_run),
                                 None, SPACE, None, DEP, Target(speedup=1.5), budget, False, None)
    for mine in ("baseline", "continued"):
        for share in (0.5, 1.0):
            other = build_module._Teacher(None, {"teacher": mine, "distill_share": share})
            assert stages._same_reference(out / "baseline-self-distilled", other) == \
                (mine == teacher["teacher"] and share == teacher["distill_share"])
    assert stages._same_reference(out / "baseline-continued", None)  # a continued one is the same whatever taught


def _positions_read(run_dir: Path, tokens: int, kept_from: list[range]) -> np.ndarray:
    """Which positions of a training split of `tokens` the run read, as the trainer reads: its streams laid over the
    split without the stretches `kept_from`, one segment (and the next target) per stream and step."""
    recipe = saved_config(run_dir)[0]
    text = np.delete(np.arange(tokens), [i for w in kept_from for i in w])
    seg = Segments(text, recipe.batch, load_model(run_dir).arch.tgt_len)
    streams = text[:len(text) // recipe.batch * recipe.batch].reshape(recipe.batch, -1)
    read = np.zeros(tokens, bool)
    for step in range(recipe.steps):
        start = step % len(seg) * seg.tgt_len
        read[streams[:, start:start + seg.tgt_len + 1].ravel()] = True
    return read


def _recorded(run_dir: Path, corpus) -> np.ndarray:
    """What the build takes the run to have read, from its record."""
    recorded = np.zeros(len(corpus.train), bool)
    for span in build_module.recorded_reads(run_dir, corpus):
        recorded[span.start:span.stop] = True
    return recorded


def test_a_continuation_past_a_pass_leaves_the_teacher_choice_tokens_neither_read(baseline_run, tmp_path):
    """A continued baseline that reads the training split more than once (`tiny` at --budget large) left no
    tokens to compare it with the baseline on, and --teacher auto fell back to the baseline, a far weaker teacher
    there. It now trains without the stretches the choice compares the two on."""
    baseline = load_model(baseline_run).eval()
    corpus = run_corpus(baseline_run, None, baseline.arch.vocab_size)
    budget = Budget(SearchConfig(rounds=1, steps=1, batch=64, trial_tokens=build_module.TEACHER_WINDOWS * 256),
                    distill_steps=49)
    work = tmp_path / "b.partial"
    work.mkdir()
    stages = build_module._Build(baseline_run, baseline_run, work, baseline, corpus, SPACE, None, DEP,
                                 Target(speedup=1.5), budget, False, None)
    continued = stages.reference(build_module.CONTINUED, None, None)
    run_dir = work / build_module.CONTINUED
    per_pass = len(Segments(corpus.train, 64, baseline.arch.tgt_len))
    assert saved_config(run_dir)[0].steps == budget.extra_steps > per_pass  # the whole split, had it read it all
    choice = stages._chosen_teacher(continued)
    windows = [range(*w) for w in choice["held_out_windows"]]
    assert len(windows) == build_module.TEACHER_WINDOWS and sum(map(len, windows)) == budget.search.trial_tokens
    read = _positions_read(run_dir, len(corpus.train), windows) | _positions_read(baseline_run, len(corpus.train), [])
    assert not any(read[w.start:w.stop].any() for w in windows)
    assert read.sum() > 0.9 * len(corpus.train)  # and the rest it read
    losses = {name: evaluate(model, np.concatenate([corpus.train[w.start:w.stop] for w in windows]), corpus.unit)[
        "loss"] for name, model in (("baseline", baseline), ("continued", continued))}
    assert choice["held_out_loss"] == pytest.approx(losses, rel=1e-5)
    # a damaged record is named, with what to do
    (run_dir / "held_out.json").write_text('{"held_out_windows": [[5, 2]]}')
    with pytest.raises(PlanerError, match="held_out.json: not the record planer writes.*delete .* and build again"):
        build_module.recorded_reads(run_dir, corpus)


def test_sweep_shares_table_continued_baseline_and_library(baseline_run, table_file, tmp_path):
    out = tmp_path / "sweep"
    local = replace(BUDGET.searching("local", local_steps=3), teacher="baseline")  # KL and cosine, no cross-entropy
    summaries = sweep(baseline_run, out, [1.2, 1.5], dep=DEP, budget=local, space=SPACE, table_cache=table_file,
                      show_progress=False)
    assert [s["target_speedup"] for s in summaries] == [1.2, 1.5]
    assert {p.name for p in out.iterdir()} >= {"x1.2", "x1.5", "pareto.png", "sweep.md"}
    assert all((out / x / "report.md").is_file() for x in ("x1.2", "x1.5"))
    scores = [json.loads((out / x / "accuracy.json").read_text()) for x in ("x1.2", "x1.5")]
    assert scores[0]["baseline_continued"] == scores[1]["baseline_continued"]  # trained once, reused
    # taught by itself with no cross-entropy, the baseline is its own self-distilled reference: none is trained
    assert all("baseline_self_distilled" not in s and not (out / x / "baseline-self-distilled").exists()
               for s, x in zip(scores, ("x1.2", "x1.5")))
    assert "it is its own self-distilled reference" in (out / "x1.2" / "report.md").read_text()
    assert "self-distilled baseline" not in json.loads((out / "x1.2" / "timings.json").read_text())
    # the local search's library too: it does not depend on the target
    assert os.path.samefile(*(out / x / "search-library" / LIBRARY_FILE for x in ("x1.2", "x1.5")))
    logged = [json.loads(line) for line in (out / "x1.5" / "search_log.jsonl").read_text().splitlines()]
    library = [entry for entry in logged if "library" in entry]  # logged though neither trained nor scored again
    assert len(library) == 1 and library[0]["trained_s"] is None and library[0]["scored_s"] is None
    assert "x1.5" in (out / "sweep.md").read_text()
    # An interrupted sweep reuses its finished builds only when asked for the same way.
    again = tmp_path / "again"
    shutil.copytree(out / "x1.2", tmp_path / "again.partial" / "x1.2")
    longer = Budget(local.search, distill_steps=local.distill_steps + 1)
    with pytest.raises(PlanerError, match="x1.2 was built with another budget"):
        sweep(baseline_run, again, [1.2, 1.5], dep=DEP, budget=longer, space=SPACE, show_progress=False)
    other = shutil.copytree(baseline_run, tmp_path / "other-run")  # its finished target is not another model's
    with pytest.raises(PlanerError, match="interrupted sweep of something else \\(differs in: model\\)"):
        sweep(other, again, [1.2, 1.5], dep=DEP, budget=local, space=SPACE, show_progress=False)


def test_build_infeasible_target_leaves_nothing(baseline_run, table_file, tmp_path):
    space = tmp_path / "space.json"
    SPACE.save(space)
    out = tmp_path / "build"
    _one_line_error(run("build", "--model", baseline_run, "--target-speedup", 1000, "--out", out, "--space", space,
                        "--tgt-len", 64, "--threads", 1, "--table", table_file, "--quiet"),
                    "below the fastest network in the space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.json"]


def test_search_and_distill_alone(baseline_run, table_file, tmp_path):
    out = tmp_path / "search"
    outcome = search_alone(baseline_run, out, dep=DEP, target=Target(speedup=1.5), budget=BUDGET, space=SPACE,
                           table_cache=table_file, show_progress=False)
    assert {p.name for p in out.iterdir()} == {"arch.json", "model.safetensors", "outcome.json", "latency_table.json",
                                               "search_log.jsonl"}
    assert not (tmp_path / "search.partial").exists()
    log = (out / "search_log.jsonl").read_text().splitlines()
    assert sum('"confirm"' not in line for line in log) == BUDGET.search.rounds
    chosen = load_model(out)
    assert chosen.arch == outcome.chosen.arch
    # `planer distill` trains that network on from the baseline's logits
    result = run("distill", "--student", out, "--teacher", baseline_run, "--out", tmp_path / "distilled",
                 "--steps", 2, "--batch", 2, "--quiet")
    assert result.exit_code == 0, result.output
    assert "valid" in result.output and "after 2 steps" in result.output
    distilled = load_model(tmp_path / "distilled")
    assert distilled.arch == chosen.arch
    # the build's recipe: KL alone and the cosine loss, aligned by the positions outcome.json gives
    recipe = json.loads((tmp_path / "distilled" / "config.json").read_text())["train"]
    assert (recipe["distill"], recipe["cosine"]) == (1.0, 1.0)
    # a teacher the network was not derived from is refused
    other = tmp_path / "other"
    other.mkdir()
    narrow = LM(small_arch(d_model=16))
    narrow.arch.save(other / "arch.json")
    save_weights(narrow, other / "model.safetensors")
    _one_line_error(run("distill", "--student", out, "--teacher", other, "--out", tmp_path / "d2"),
                    "was not derived from")


def test_search_alone_infeasible_target_leaves_nothing(baseline_run, table_file, tmp_path):
    space = tmp_path / "space.json"
    SPACE.save(space)
    _one_line_error(run("search", "--model", baseline_run, "--target-latency-ms", 1e-4, "--out", tmp_path / "s",
                        "--space", space, "--tgt-len", 64, "--threads", 1, "--table", table_file, "--quiet"),
                    "below the fastest network in the space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.json"]


@pytest.mark.parametrize("command", ["build", "search"])
@pytest.mark.parametrize("args, fragment", [
    (["--target-speedup", 2, "--target-latency-ms", 3], "exactly one target"),
    ([], "exactly one target"),
])
def test_bad_targets(baseline_run, tmp_path, command, args, fragment):
    _one_line_error(run(command, "--model", baseline_run, "--out", tmp_path / "b", *args), fragment)
    assert list(tmp_path.iterdir()) == []


def test_target_is_checked_when_made():
    with pytest.raises(PlanerError, match="above 0"):
        Target(ms=0.0)
    with pytest.raises(PlanerError, match="above 0"):
        Target(speedup=float("nan"))
    assert Target(speedup=2).ms_for(10.0) == 5.0 and Target(ms=4.0).ms_for(10.0) == 4.0
    assert Target(speedup=2).met(2.0, 99.0) and not Target(speedup=2).met(1.99, 0.1)
    assert Target(ms=4.0).met(1.0, 4.0) and not Target(ms=4.0).met(9.0, 4.1)


def test_build_missing_baseline(tmp_path):
    _one_line_error(run("build", "--model", tmp_path / "nope", "--target-speedup", 2, "--out", tmp_path / "b"),
                    "no such architecture file")


def test_a_failed_stage_keeps_the_build_so_far(baseline_run, tmp_path, monkeypatch):
    import planer.build as build_module

    def failing(*a, **k):  # any stage's error other than an infeasible target, e.g. a graph failing parity
        raise PlanerError("the exported graph computes something else")

    monkeypatch.setattr(build_module, "_profiled", failing)
    with pytest.raises(PlanerError, match="computes something else .*kept in .*build.partial.*run the same command"):
        build(baseline_run, tmp_path / "build", dep=DEP, target=Target(speedup=1.5), budget=BUDGET, space=SPACE,
              show_progress=False)
    assert (tmp_path / "build.partial").is_dir() and not (tmp_path / "build").exists()


def test_interrupted_build_resumes_after_the_search(baseline_run, table_file, tmp_path, monkeypatch):
    import planer.build as build_module

    out = tmp_path / "build"
    args = dict(dep=DEP, target=Target(speedup=1.5), budget=replace(BUDGET, teacher="continued"), space=SPACE,
                table_cache=table_file, show_progress=False)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(baseline_run, out, **args)
    monkeypatch.undo()
    partial = tmp_path / "build.partial"
    assert (partial / "search" / "outcome.json").is_file() and not out.exists()
    log = (partial / "search_log.jsonl").read_text()
    first = json.loads((partial / "timings.json").read_text())  # the stages completed, as they end
    assert set(first) == {"profile", "search"} and first["search"] > 0

    with pytest.raises(PlanerError, match="differs in: target_speedup"):
        build(baseline_run, out, **(args | {"target": Target(speedup=1.2)}))
    # fairness by the runs' records: the baseline run itself (two steps) as the continued baseline trained on
    # fewer tokens than the result will: refused before it is copied, or taught anything
    with pytest.raises(PlanerError, match="fewer than the .* the result trains on"):
        build(baseline_run, out, **(args | {"continued": baseline_run}))
    assert not (partial / "baseline-continued").exists() and not (partial / "distill").exists()

    def no_search(*a, **k):
        raise AssertionError("the finished search ran again")

    monkeypatch.setattr(build_module, "run_search", no_search)
    baseline_graph = partial / "baseline" / "model.onnx"  # damaged (a full disk, a hand): exported again
    baseline_graph.write_bytes(baseline_graph.read_bytes()[:1000])
    summary = build(baseline_run, out, **args)
    assert summary["met"] and (out / "model.onnx").is_file() and not partial.exists()
    assert (out / "search_log.jsonl").read_text() == log
    timings = json.loads((out / "timings.json").read_text())  # the report's wall time counts the earlier runs too
    assert timings["search"] >= first["search"] and "export, verify, time, evaluate" in timings
    # taught by the continued baseline, with half cross-entropy: the data still teaches (Budget.share)
    assert json.loads((out / "accuracy.json").read_text())["teacher"] == \
        {"teacher": "continued", "asked": "continued", "distill_share": 0.5}
    assert json.loads((out / "distill" / "config.json").read_text())["train"]["distill"] == 0.5
    chosen = json.loads((out / "search" / "outcome.json").read_text())
    assert json.loads((out / "arch.json").read_text())["blocks"] == \
        chosen["candidates"][chosen["chosen"]]["arch"]["blocks"]


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_a_resumed_build_makes_again_what_it_finds_damaged(baseline_run, tmp_path, monkeypatch):
    """The build's own files in OUT.partial truncated (a full disk, a hand): the stage that wrote each runs again,
    where every rerun used to stop at it (a traceback, or advice to delete it). Stage by stage, without the rest
    of a build; a user's latency table is refused in one line."""
    baseline = load_model(baseline_run).eval()
    work = tmp_path / "build.partial"
    work.mkdir()
    corpus = run_corpus(baseline_run, None, baseline.arch.vocab_size)
    corpus = replace(corpus, valid=corpus.valid[:1024])  # every run ends by scoring it whole
    budget = Budget(SearchConfig(rounds=1, steps=1, batch=2, valid_tokens=512), distill_steps=1)
    stages = build_module._Build(baseline_run, baseline_run, work, baseline, corpus, SPACE, None, DEP,
                                 Target(speedup=1.5), budget, False, None)
    trained, train = [], build_module.train  # each training run: whether it resumed
    finished = tmp_path / "finished"  # the first run, really trained: a new run after it is a copy of it

    def training(corpus, recipe, out, *, resume, **kwargs):
        trained.append(resume)
        if resume or not finished.exists():
            return train(corpus, recipe, out, resume=resume, **kwargs)
        assert not out.exists() and not staging_dir(out).exists()  # or the real one would refuse to start
        shutil.copytree(finished, out)

    monkeypatch.setattr(build_module, "train", training)
    run = work / "baseline-continued"
    stages.trained(run, baseline, None)
    shutil.copytree(run, finished)
    for name in (WEIGHTS_FILE, ARCH_FILE, EVAL_FILE):  # of a finished run
        _truncated(run / name)
        stages.trained(run, baseline, None)
    os.replace(run, staging_dir(run))  # interrupted after its last checkpoint: resumed, then evaluated
    (staging_dir(run) / EVAL_FILE).unlink()
    interrupted = tmp_path / "interrupted"
    shutil.copytree(staging_dir(run), interrupted)
    stages.trained(run, baseline, None)
    for name in (STATE_FILE, WEIGHTS_FILE, CONFIG_FILE):
        shutil.rmtree(run)
        shutil.copytree(interrupted, staging_dir(run))
        _truncated(staging_dir(run) / name)
        stages.trained(run, baseline, None)
        assert not staging_dir(run).exists()
    assert trained == [False] * 4 + [True] + [True, False] * 3
    assert load_model(run).arch == baseline.arch and json.loads((run / EVAL_FILE).read_text())["valid"]

    chosen = Candidate(0, baseline.arch, 1.0, 1.0, 2.0, 3.0, baseline)
    measured = LatencyTable({"lowering": "ops"}, {"fixed": {"p50": 1.0}})
    searched = []
    monkeypatch.setattr(build_module, "run_search",
                        lambda *a, **k: searched.append(k) or SearchOutcome(chosen, [chosen], measured, 1.0))
    search = work / "search"
    stages.searched(search, SPACE, Target(speedup=1.5), "")
    stages.searched(search, SPACE, Target(speedup=1.5), "")  # whole: read back
    for name in (OUTCOME_FILE, ARCH_FILE, WEIGHTS_FILE, "latency_table.json"):
        _truncated(search / name)
        assert stages.searched(search, SPACE, Target(speedup=1.5), "").chosen.arch == baseline.arch
    assert len(searched) == 5

    known = []
    monkeypatch.setattr(build_module, "profile", lambda *a, table, **k: known.append(table) or table or measured)
    for damage in (None, None, _truncated):  # none yet, then read back, then damaged
        if damage:
            damage(work / "latency_table.json")
        build_module._profiled(baseline, SPACE, DEP, work, None, False)
    assert known[0] is None and known[1] == measured and known[2] is None
    mine = tmp_path / "my_table.json"  # --table-cache: the user's own file
    for text in ('{"format": "planer.latency/1", "entries": {}', '{"format": "planer.latency/1", "entries": []}'):
        mine.write_text(text)
        with pytest.raises(PlanerError, match="my_table.json.*profile again") as refused:
            build_module._profiled(baseline, SPACE, DEP, work, mine, False)
        assert "\n" not in str(refused.value)
    done = tmp_path / "sweep.partial" / "x1.5"  # a build a sweep finished: refused in one line, not a traceback
    done.mkdir(parents=True)
    (done / "latency.json").write_text('{"speedup": 1.')
    with pytest.raises(PlanerError, match="x1.5/latency.json: unreadable.*delete .*x1.5") as refused:
        build_module._summary(done)
    assert "\n" not in str(refused.value)


def test_build_refuses_a_space_this_machine_cannot_train(baseline_run, tmp_path, monkeypatch):
    import planer.build

    monkeypatch.setattr(planer.build, "trainable_params_limit", lambda: 1000)
    with pytest.raises(PlanerError, match="supernet would hold"):
        build(baseline_run, tmp_path / "big", dep=DEP, target=Target(speedup=1.5), budget=BUDGET, space=SPACE,
              show_progress=False)
    assert not (tmp_path / "big.partial").exists()


def test_the_local_search_space_holds_the_splits_asked_for_and_no_others():
    from planer.space import ExpertOptions

    # FFN 128: the supernet's default E x W/E experts (2 x 64, 4 x 32, ...) would split it too
    arch = small_arch([BlockSpec.attn(2, 16), BlockSpec.ffn(128)])
    space = build_module._trainable(None, arch, Deployment(), "local", ExpertOptions(experts=(4,), top_k=(1,),
                                                                                     shared=(0.25,)))
    assert {c.in_precision("fp32").label() for c in space.candidates if c.kind == "moe"} == {"moe4k1x24+s32"}
    default = build_module._trainable(None, arch, Deployment(), "local")
    assert {(c.experts, c.top_k, c.shared) for c in default.candidates if c.kind == "moe"} == {
        (e, k, s) for e in (2, 4, 8) for k in (1, 2) for s in (0, 32) if k < e}


def test_the_supernet_refuses_experts_with_a_shared_part(baseline_run, tmp_path):
    space = SearchSpace(4, SPACE.candidates + (BlockSpec.moe(2, 1, 32, shared=64),))
    with pytest.raises(PlanerError, match=r"moe2k1x32\+s64 is a MoE block with a shared part: only --search local"):
        build(baseline_run, tmp_path / "shared", dep=DEP, target=Target(speedup=1.5), budget=BUDGET, space=space,
              show_progress=False)
    assert not (tmp_path / "shared.partial").exists()
    with pytest.raises(PlanerError, match="shared part"):  # the API below the build refuses it too
        SuperNet(load_model(baseline_run), space)


def test_a_damaged_request_in_a_partial_build_says_to_delete_it(tmp_path):
    """It read as a build of something else, whose remedy (repeat its arguments) could not work."""
    from planer.build import _start_or_resume

    work = tmp_path / "b.partial"
    work.mkdir()
    (work / "build.json").write_text('{"model": "runs/')
    with pytest.raises(PlanerError, match="unreadable or not JSON.*delete .*b.partial and run the command again"):
        _start_or_resume(work, {"model": "runs/tiny"})


def test_a_damaged_record_of_the_baseline_says_to_restore_it_not_to_delete_it(baseline_run, tmp_path):
    """The teacher choice reads what the user's baseline read from its config.json; that run is theirs."""
    run_dir = tmp_path / "base"
    shutil.copytree(baseline_run, run_dir)
    corpus = run_corpus(baseline_run, None, load_model(baseline_run).arch.vocab_size)
    (run_dir / CONFIG_FILE).write_text('{"data": ')
    with pytest.raises(PlanerError, match=f"unreadable or not JSON.*restore it from a copy, or train {run_dir} again"):
        build_module.recorded_reads(run_dir, corpus)
