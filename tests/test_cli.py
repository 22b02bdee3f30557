"""The command line: help, a short real run, and bad input (one line, non-zero exit, nothing written)."""

import json

import pytest
from click.testing import CliRunner

from planer.cli import main
from tests.conftest import small_arch


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
    assert json.loads(scored.output)["tokens"] >= 512
    _one_line_error(run("train", "--preset", "tiny", "--data", f"enwik8:{text_file}", "--out", out),
                    "already exists; pass --resume")


@pytest.mark.parametrize("args, fragment", [
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
