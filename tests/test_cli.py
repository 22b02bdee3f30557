"""The command line: help, a short real run, and bad input (one line, non-zero exit, nothing written)."""

import importlib.util
import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from planer.arch import Architecture
from planer.cli import main
from tests.conftest import small_arch

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, fragment):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert fragment in lines[0], lines[0]


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    assert "train" in result.output and "eval" in result.output


def test_train_and_eval(tmp_path, text_file):
    out = tmp_path / "tiny"
    result = run("train", "--preset", "tiny", "--data", f"enwik8:{text_file}", "--out", out, "--steps", 3,
                 "--batch", 2, "--eval-every", 3, "--quiet")
    assert result.exit_code == 0, result.output
    assert "bpc" in result.output
    scored = run("eval", out, "--max-tokens", 512, "--json")
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["tokens"] >= 512  # the progress bar goes to stderr
    _one_line_error(run("train", "--preset", "tiny", "--data", f"enwik8:{text_file}", "--out", out),
                    "already exists; pass --resume")


def test_train_sets_depth_and_widths(tmp_path, text_file):
    out = tmp_path / "deep"
    result = run("train", "--preset", "tiny", "--data", f"enwik8:{text_file}", "--out", out, "--steps", 2,
                 "--batch", 2, "--eval-every", 2, "--quiet", "--layers", 3, "--d-model", 32, "--heads", 2,
                 "--d-head", 8, "--d-inner", 64)
    assert result.exit_code == 0, result.output
    arch = Architecture.load(out / "arch.json")
    assert arch == Architecture.transformer_xl(n_layer=3, d_model=32, n_head=2, d_head=8, d_inner=64, vocab_size=256,
                                               tgt_len=128, mem_len=128, name="tiny")
    _one_line_error(run("train", "--out", out, "--resume", "--layers", 4), "drop --layers to resume it")


@pytest.mark.parametrize("args, fragment", [
    (["--preset", "tiny", "--d-model", "33"], "relative positions need an even d_model, got 33"),
    (["--preset", "tiny", "--layers", "0"], "--layers"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    ([], "choose a baseline with --preset"),
    (["--preset", "tiny", "--data", "enwik8:/no/such/file"], "no such file"),
    (["--preset", "tiny", "--data", "csv:x"], "unknown data format"),
    (["--resume"], "nothing to resume"),
])
def test_train_bad_input(tmp_path, args, fragment):
    out = tmp_path / "run"
    _one_line_error(run("train", "--out", out, *args), fragment)
    assert list(tmp_path.iterdir()) == []


def _fake_run(tmp_path, arch_text=None, weights=b""):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "arch.json").write_text(arch_text if arch_text is not None else small_arch().to_json())
    if weights is not None:
        (run_dir / "model.safetensors").write_bytes(weights)
    (run_dir / "config.json").write_text(json.dumps({"data": "sample"}))
    return run_dir


def test_eval_missing_directory(tmp_path):
    _one_line_error(run("eval", tmp_path / "nope"), "no such run directory")


def test_eval_corrupt_weights(tmp_path):
    _one_line_error(run("eval", _fake_run(tmp_path, weights=b"garbage")), "unreadable or corrupt")


def test_eval_missing_weights(tmp_path):
    _one_line_error(run("eval", _fake_run(tmp_path, weights=None)), "no model.safetensors")


def test_eval_invalid_arch(tmp_path):
    bad = json.dumps({"d_model": 32, "vocab_size": 256, "blocks": [{"kind": "moe", "experts": 2, "top_k": 3,
                                                                     "d_inner": 8}]})
    _one_line_error(run("eval", _fake_run(tmp_path, arch_text=bad)), "block 0 (moe): moe top_k must be between")


def test_eval_weights_from_another_run(tmp_path):
    from safetensors.torch import save_file

    from planer.nn import LM
    other = {k: v.contiguous() for k, v in LM(small_arch(d_model=16)).state_dict().items()}
    path = tmp_path / "w.safetensors"
    save_file(other, str(path))
    _one_line_error(run("eval", _fake_run(tmp_path, weights=path.read_bytes())), "does not match")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("runs") / "micro"
    from planer.data import load_corpus
    from planer.train.presets import TrainConfig
    from planer.train.trainer import train
    cfg = TrainConfig(steps=2, batch=2, eval_every=2, ckpt_every=2, eval_tokens=256)
    train(load_corpus(f"enwik8:{text_file}"), cfg, out, arch=small_arch(), show_progress=False)
    return out


def test_export_checks_parity(tiny_run, tmp_path):
    result = run("export", tiny_run, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert "max |ONNX Runtime - PyTorch|" in result.output and (tmp_path / "m.onnx").is_file()


def test_export_of_int8_blocks_checks_the_fp32_graph_and_the_int8_blocks(tmp_path, text_file):
    """An int8 network is verified as a build verifies it (planer.export.reference.verify): its graph's structure
    in fp32, its int8 graph block by block on the validation tokens of the data on record, or of --data."""
    import shutil

    from planer.arch import BlockSpec
    from planer.data import load_corpus
    from planer.train.presets import TrainConfig
    from planer.train.trainer import train

    int8 = small_arch([BlockSpec.attn(2, 16, precision="int8"), BlockSpec.ffn(64, precision="int8")])
    trained = tmp_path / "int8"
    cfg = TrainConfig(steps=2, batch=2, eval_every=2, ckpt_every=2, eval_tokens=256)
    train(load_corpus(f"enwik8:{text_file}"), cfg, trained, arch=int8, show_progress=False)
    result = run("export", trained, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert "its graph in fp32: max |ONNX Runtime - PyTorch|" in result.output
    assert "in int8, block by block" in result.output and f"validation tokens of enwik8:{text_file}" in result.output

    bare = tmp_path / "bare"  # weights alone: no record of the data
    bare.mkdir()
    for name in ("arch.json", "model.safetensors"):
        shutil.copy(trained / name, bare / name)
    _one_line_error(run("export", bare, "--out", tmp_path / "bare.onnx"),
                    "says which data it was trained on; pass --data")
    assert not (tmp_path / "bare.onnx").exists()
    given = run("export", bare, "--out", tmp_path / "bare.onnx", "--data", f"enwik8:{text_file}")
    assert given.exit_code == 0 and "in int8, block by block" in given.output, given.output


def test_export_refuses_a_lowering_it_cannot_do_exactly(tiny_run, tmp_path):
    _one_line_error(run("export", tiny_run, "--out", tmp_path / "m.onnx", "--lowering", "ort-moe"),
                    "cannot run activation 'gelu' exactly")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("engine, fragment", [("trt", "TensorRT is not installed here"),
                                              ("ort-cuda", "lacks CUDAExecutionProvider")])
def test_profile_engine_not_installed(tiny_run, tmp_path, engine, fragment):
    if engine == "trt" and HAS_TENSORRT:
        pytest.skip("TensorRT is installed here")
    _one_line_error(run("profile", "--model", tiny_run, "--engine", engine, "--out", tmp_path / "t.json"), fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_export_trt_lowering_says_it_is_unchecked_without_tensorrt(tiny_run, tmp_path):
    result = run("export", tiny_run, "--out", tmp_path / "m.onnx", "--lowering", "trt")
    assert result.exit_code == 0, result.output
    assert "not checked against PyTorch: TensorRT is not installed here" in result.output
    assert "--engine" not in result.output  # export has no such option


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_build_for_tensorrt_without_it_stops_before_anything(tiny_run, tmp_path):
    _one_line_error(run("build", "--model", tiny_run, "--engine", "trt", "--target-speedup", "2", "--out",
                        tmp_path / "b"), "TensorRT is not installed here")
    assert list(tmp_path.iterdir()) == []


def test_building_from_a_builds_output_is_refused_before_any_work(tiny_run, tmp_path):
    built = tmp_path / "built"
    built.mkdir()
    for name in ("arch.json", "model.safetensors"):
        (built / name).write_bytes((tiny_run / name).read_bytes())
    (built / "build.json").write_text(json.dumps({"model": str(tiny_run)}))
    _one_line_error(run("build", "--model", built, "--target-speedup", "2", "--out", tmp_path / "b"),
                    f"is a build's output, not a baseline's training run; build from the baseline it was built from "
                    f"({tiny_run})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built"]


def test_build_refuses_a_lowering_the_engine_cannot_run(tiny_run, tmp_path):
    _one_line_error(run("build", "--model", tiny_run, "--target-speedup", "2", "--out", tmp_path / "b",
                        "--lowering", "trt"), "does not run in engine ort (only in trt)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["build", "search"])
def test_a_precision_the_engine_does_not_run_stops_before_anything(tiny_run, tmp_path, command):
    _one_line_error(run(command, "--model", tiny_run, "--target-speedup", "2", "--out", tmp_path / "b",
                        "--precision", "fp32,fp16"), "engine ort does not run fp16 blocks; it runs fp32, int8")
    assert list(tmp_path.iterdir()) == []


def test_profile_refuses_a_table_from_another_shape(tiny_run, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"positions": 2, "candidates": [{"kind": "ffn", "d_inner": 16}]}))
    table = tmp_path / "t.json"
    assert run("profile", "--model", tiny_run, "--space", space, "--out", table, "--tgt-len", 8, "--quiet").exit_code == 0
    before = table.read_text()
    _one_line_error(run("profile", "--model", tiny_run, "--space", space, "--out", table, "--tgt-len", 16),
                    "tgt_len: table 8 vs now 16")
    assert table.read_text() == before


@pytest.mark.parametrize("args, message", [
    (["--search", "local", "--experts", "3"], "--experts 3: 3 experts do not divide the 64 units"),
    (["--search", "local", "--shared", "0.25", "--experts", "4,5"], "--experts 5: 5 experts do not divide the 48"),
    (["--experts", "2,4", "--top-k", "0"], "--top-k 0: top-k must be between 1 and the largest expert count (4)"),
    (["--experts", "2", "--top-k", "3"], "--top-k 3"),
    (["--shared", "0.25"], "--shared: only --search local"),
    (["--search", "local", "--shared", "1"], "--shared 1: the shared part is a share"),
])
def test_bad_expert_options_are_refused_before_any_work(tiny_run, tmp_path, args, message):
    _one_line_error(run("build", "--model", tiny_run, "--target-speedup", "2", "--out", tmp_path / "b", *args), message)
    assert list(tmp_path.iterdir()) == []


def test_profile_bad_space(tiny_run, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"positions": 2, "candidates": [{"kind": "moe", "experts": 2, "top_k": 4,
                                                                 "d_inner": 8}]}))
    _one_line_error(run("profile", "--model", tiny_run, "--space", space, "--out", tmp_path / "t.json"),
                    "candidate 0 (moe): moe top_k must be between")


@pytest.mark.parametrize("args, option", [
    (["train", "--preset", "tiny", "--steps", "0"], "--steps"),
    (["train", "--preset", "tiny", "--batch", "-1"], "--batch"),
    (["train", "--preset", "tiny", "--lr", "nan"], "--lr"),
    (["train", "--preset", "tiny", "--lr", "0"], "--lr"),
    (["train", "--preset", "tiny", "--eval-every", "0"], "--eval-every"),
    (["train", "--preset", "tiny", "--ckpt-every", "0"], "--ckpt-every"),
    (["build", "--model", "M", "--target-latency-ms", "0"], "--target-latency-ms"),
    (["build", "--model", "M", "--target-latency-ms", "inf"], "--target-latency-ms"),
    (["build", "--model", "M", "--target-speedup", "2", "--batch", "0"], "--batch"),
    (["build", "--model", "M", "--target-speedup", "2", "--threads", "0"], "--threads"),
    (["build", "--model", "M", "--target-speedup", "2", "--tgt-len", "0"], "--tgt-len"),
    (["build", "--model", "M", "--target-speedup", "2", "--mem-len", "-1"], "--mem-len"),
    (["build", "--model", "M", "--target-speedup", "nan"], "--target-speedup"),
    (["search", "--model", "M", "--target-speedup", "-2"], "--target-speedup"),
    (["build", "--model", "M", "--target-speedup", "2", "--local-steps", "0"], "--local-steps"),
    (["search", "--model", "M", "--target-speedup", "2", "--local-steps", "-5"], "--local-steps"),
    # as many local steps as the whole budget leaves the network chosen none to distil
    (["build", "--model", "M", "--target-speedup", "2", "--search", "local", "--local-steps", "4600"], "--local-steps"),
    (["search", "--model", "M", "--target-speedup", "2", "--search", "local", "--budget", "small", "--local-steps",
      "501"], "--local-steps"),
    (["build", "--model", "M", "--target-speedup", "2", "--search", "supernet"], "--search"),
    (["build", "--model", "M", "--target-speedup", "2", "--experts", "two"], "--experts"),
    (["search", "--model", "M", "--target-speedup", "2", "--shared", "1/4"], "--shared"),
    (["distill", "S", "T", "--steps", "0"], "--steps"),
    (["profile", "--model", "M", "--threads", "0"], "--threads"),
    (["eval", "R", "--max-tokens", "0"], "--max-tokens"),
    (["bench", "B", "--min-seconds", "0"], "--min-seconds"),
    (["bench", "B", "--max-slowdown", "0.9"], "--max-slowdown"),
    (["bench", "B", "--tries", "0"], "--tries"),
    (["serve", "B", "--port", "70000"], "--port"),
    (["serve", "B", "--max-batch", "0"], "--max-batch"),
    (["serve", "B", "--max-delay-ms", "-1"], "--max-delay-ms"),
    (["eval", "R", "--batch", "100000000"], "--batch"),  # sizes that would only allocate until the machine fails
    (["eval", "R", "--tgt-len", "10000000"], "--tgt-len"),
    (["export", "R", "--max-context", "1000000000"], "--max-context"),
    (["bench", "B", "--threads", "1000000"], "--threads"),
    (["serve", "B", "--threads", "99999"], "--threads"),
    (["serve", "B", "--max-batch", "1000000"], "--max-batch"),
])
def test_numbers_out_of_range_are_refused_before_any_work(tmp_path, args, option):
    # --out where the command has one: nothing may appear there
    out = ["--out", tmp_path / "out"] if args[0] in ("train", "build", "search", "distill", "profile") else []
    _one_line_error(run(*args, *out), option)
    assert list(tmp_path.iterdir()) == []


def _unwritable(tmp_path):
    """Output paths no one can write: under a regular file, and under /proc (refused even to root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return [blocker / "out", "/proc/planer-no-such-dir/out"]


@pytest.mark.parametrize("args", [
    ["train", "--preset", "tiny", "--out"],
    ["profile", "--model", "M", "--out"],
    ["build", "--model", "M", "--target-speedup", "2", "--out"],
    ["search", "--model", "M", "--target-speedup", "2", "--out"],
    ["distill", "S", "T", "--out"],
    ["import", "M", "--out"],
    ["export", "R", "--out"],
    ["bench", "B", "--save"],
    ["build", "--model", "M", "--target-speedup", "2", "--table"],
])
def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, args):
    for out in _unwritable(tmp_path):
        _one_line_error(run(*args, out), "cannot write")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_files_that_are_not_what_they_should_be_get_one_line_errors(tmp_path):
    from planer.checkpoint import save_weights
    from planer.nn import LM

    run_dir = _fake_run(tmp_path, weights=None)
    save_weights(LM(small_arch()), run_dir / "model.safetensors")
    (run_dir / "config.json").write_text("[1, 2]")
    _one_line_error(run("eval", run_dir / "arch.json"), "a file, not a run directory")
    _one_line_error(run("eval", run_dir, "--max-tokens", 8), "config.json: unreadable or not written by")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00junk")
    _one_line_error(run("import", gguf, "--out", tmp_path / "imported"), "transformers cannot read")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "wide"}))
    _one_line_error(run("import", hf, "--out", tmp_path / "imported"), "transformers cannot read")
    assert not (tmp_path / "imported").exists()


def test_a_resume_from_a_damaged_checkpoint_says_so(tmp_path, text_file):
    out = tmp_path / "run"
    assert run("train", "--preset", "tiny", "--data", f"enwik8:{text_file}", "--out", out, "--steps", 1,
               "--batch", 1, "--quiet").exit_code == 0
    (out / "train_state.pt").write_bytes(b"junk\n")  # torch.load raised KeyError on this
    _one_line_error(run("train", "--data", f"enwik8:{text_file}", "--out", out, "--resume", "--steps", 2),
                    "cannot resume, checkpoint unreadable")


def test_a_new_run_that_stops_before_its_first_checkpoint_leaves_nothing(tmp_path, text_file, monkeypatch):
    import planer.train.trainer as trainer

    real = trainer.lr_at
    stop_at = {"step": 1}  # lr_at(1) runs for the second step, before the checkpoint after it

    def failing(step, cfg):
        if step == stop_at["step"]:
            raise KeyboardInterrupt
        return real(step, cfg)

    monkeypatch.setattr(trainer, "lr_at", failing)
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", f"enwik8:{text_file}", "--out", out, "--steps", 4, "--batch", 1,
            "--ckpt-every", 2, "--quiet"]
    def stopped(result, fragment):  # after the architecture's summary: one error line, no traceback
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        assert result.output.strip().splitlines()[-1].startswith("Error: ") and fragment in result.output

    stopped(run(*args), "interrupted before the first checkpoint; nothing was kept")
    assert list(tmp_path.iterdir()) == []  # the same command can start again
    stop_at["step"] = 3  # after the checkpoint at step 2
    stopped(run(*args), "keeps the last checkpoint: run the same command with --resume")
    monkeypatch.setattr(trainer, "lr_at", real)
    resumed = run(*[a for a in args if a not in ("--data", f"enwik8:{text_file}")], "--resume")  # its own data
    assert resumed.exit_code == 0 and "step 4" in resumed.output, resumed.output


def test_a_run_killed_before_its_first_checkpoint_is_started_again(tmp_path, text_file):
    """SIGKILL leaves OUT.partial with no checkpoint in it: --resume says to start again, and the same command
    does (SIGTERM cleans up as Ctrl-C does)."""
    from planer.train.trainer import resumable

    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    partial.mkdir()
    (partial / "arch.json").write_text("{}")
    args = ["train", "--preset", "tiny", "--data", f"enwik8:{text_file}", "--out", out, "--steps", 1, "--batch", 1,
            "--quiet"]
    assert not resumable(out)  # so a build's stage killed like this starts again too
    _one_line_error(run(*args, "--resume"), "before its first checkpoint and holds nothing to resume; run the same "
                                            "command without --resume")
    again = run(*args)
    assert again.exit_code == 0 and "step 1" in again.output, again.output
    assert resumable(out)
    assert not partial.exists() and (out / "model.safetensors").is_file()


def test_a_second_writer_of_the_same_run_is_refused_and_touches_nothing(tmp_path, text_file):
    from planer.files import writing

    out = tmp_path / "run"
    partial = tmp_path / "run.partial"
    partial.mkdir()
    (partial / "arch.json").write_text("{}")  # the first writer's run, before its first checkpoint
    with writing(out):
        second = run("train", "--preset", "tiny", "--data", f"enwik8:{text_file}", "--out", out, "--steps", 1,
                     "--quiet")
        assert second.exit_code != 0 and "Traceback" not in second.output, second.output
        assert second.output.strip().splitlines()[-1].startswith("Error: another planer command is writing")
        assert (partial / "arch.json").read_text() == "{}"
    assert not (tmp_path / ".run.lock").exists()


def test_a_training_runs_final_evaluation_shows_progress(tmp_path, text_file):
    result = CliRunner().invoke(main, ["train", "--preset", "tiny", "--data", f"enwik8:{text_file}", "--out",
                                       tmp_path / "run", "--steps", 1, "--batch", 1])
    assert result.exit_code == 0, result.output
    assert "final eval: valid" in result.output and "final eval: test" in result.output


def test_sigterm_stops_a_training_run_as_ctrl_c_does(tmp_path, text_file):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "planer", "train", "--preset", "tiny", "--data",
                             f"enwik8:{text_file}", "--out", str(out), "--steps", "100000", "--batch", "1",
                             "--ckpt-every", "100000", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run.partial" / "arch.json").exists():  # under way, before its first checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert "interrupted before the first checkpoint; nothing was kept" in err
    assert list(tmp_path.iterdir()) == []  # the same command can start again


@pytest.mark.parametrize("args", [["export", "{run}", "--out", "{dir}"], ["bench", "{run}", "--save", "{dir}"],
                                  ["profile", "{run}", "--out", "{dir}"]])
def test_an_output_file_named_by_an_existing_directory_is_refused_before_any_work(tmp_path, args):
    """export wrote the graph, and bench timed both models, before failing on a directory where a file goes."""
    (tmp_path / "out").mkdir()
    _one_line_error(run(*(a.format(run=tmp_path, dir=tmp_path / "out") for a in args)), "is a directory")
