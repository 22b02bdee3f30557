"""The Triton model repository: layout, a config Triton's own schema accepts, and the refusals."""

import functools
import importlib.util
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from planer.arch import BlockSpec
from planer.errors import PlanerError
from planer.export import export_lm
from planer.nn import LM
from planer.runtime.feeds import example_feeds
from planer.serve import triton_repository as triton
from planer.serve.triton_repository import config_text, validate_config, write_repository
from tests.conftest import small_arch

ARCH = small_arch([BlockSpec.attn(2, 8), BlockSpec.ffn(16), BlockSpec.attn(2, 8), BlockSpec.moe(2, 1, 16)],
                  d_model=16, vocab_size=32, tgt_len=8, mem_len=8)
OPTIONS = dict(engine="ort", kind="cpu", instances=1, max_batch=8, max_queue_delay_us=2000)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """A build directory (arch.json, model.onnx) of a tiny random LM with two attention blocks."""
    torch.manual_seed(0)
    build = tmp_path_factory.mktemp("builds") / "tiny build"  # the space checks name sanitising
    build.mkdir()
    export_lm(LM(ARCH).eval(), build / "model.onnx")
    ARCH.save(build / "arch.json")
    return build


def test_layout_and_onnx_copy(build_dir, tmp_path):
    out = write_repository(build_dir, tmp_path / "repo")
    assert out == tmp_path / "repo" / "tiny_build"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt"]
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["tiny_build"]  # no staging left behind
    model = out / "1" / "model.onnx"
    assert not model.is_symlink() and model.read_bytes() == (build_dir / "model.onnx").read_bytes()


def test_copied_model_runs_with_the_config_names(build_dir, tmp_path):
    pytest.importorskip("tritonclient")
    out = write_repository(build_dir, tmp_path / "repo", name="lm")
    config = validate_config((out / "config.pbtxt").read_text())
    session = ort.InferenceSession(str(out / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in config.input]
    assert [o.name for o in session.get_outputs()] == [o.name for o in config.output]
    # Two requests' worth of batch, as Triton's dynamic batcher would send them; memories of length 0 start.
    feeds = example_feeds(ARCH, batch=2, tgt_len=5, mem_len=0)
    logits, *mems = session.run(None, feeds)
    assert logits.shape == (2, 5, ARCH.vocab_size) and all(m.shape == (2, 5, ARCH.d_model) for m in mems)
    assert np.isfinite(logits).all()


def _tensor(t) -> tuple:
    """(name, data type name, dims) of a ModelInput/ModelOutput message."""
    data_types = t.DESCRIPTOR.fields_by_name["data_type"].enum_type.values_by_number
    return t.name, data_types[t.data_type].name, list(t.dims)


def test_config_parses_with_triton_schema():
    pytest.importorskip("tritonclient")
    text = config_text(ARCH, name="lm", **{**OPTIONS, "kind": "gpu", "instances": 2, "max_batch": 4,
                                           "max_queue_delay_us": 500})
    config = validate_config(text)
    assert (config.name, config.platform, config.backend) == ("lm", "onnxruntime_onnx", "onnxruntime")
    assert config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 4
    assert [_tensor(t) for t in config.input] == [
        ("tokens", "TYPE_INT64", [-1]), ("mem0", "TYPE_FP32", [-1, 16]), ("mem1", "TYPE_FP32", [-1, 16])]
    assert [_tensor(t) for t in config.output] == [
        ("logits", "TYPE_FP32", [-1, 32]), ("new_mem0", "TYPE_FP32", [-1, 16]), ("new_mem1", "TYPE_FP32", [-1, 16])]
    [group] = config.instance_group
    assert (group.kind, group.count) == (group.KIND_GPU, 2)
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert "the client carries the memories" in text.lower()


def test_malformed_config_is_refused():
    pytest.importorskip("tritonclient")
    with pytest.raises(PlanerError, match="does not parse"):
        validate_config('name: "lm"\nmax_batch_size: "eight"\n')
    with pytest.raises(PlanerError, match="does not parse"):
        validate_config('name: "lm"\nno_such_field: 1\n')


def test_missing_tritonclient_says_what_to_install(monkeypatch):
    # A fresh cache, so the schema module loaded by the other tests is neither used nor lost.
    monkeypatch.setattr(triton, "_model_config_module", functools.cache(triton._model_config_module.__wrapped__))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PlanerError, match="pip install tritonclient"):
        validate_config('name: "lm"\n')


@pytest.mark.parametrize("option, match", [
    (dict(max_batch=0), "max_batch must be >= 1"),
    (dict(instances=0), "instances must be >= 1"),
    (dict(max_queue_delay_us=-1), "max_queue_delay_us must be >= 0"),
    (dict(kind="tpu"), "unknown instance kind 'tpu'"),
    (dict(engine="trt"), "TensorRT plans with planer.s MoE plugin are not written for Triton yet; use engine ort"),
    (dict(engine="tvm"), "unknown engine 'tvm'"),
    (dict(name="../escape"), "not usable by Triton"),
])
def test_bad_options(build_dir, tmp_path, option, match):
    with pytest.raises(PlanerError, match=match):
        write_repository(build_dir, tmp_path / "repo", **option)
    assert not (tmp_path / "repo").exists()


def test_existing_model_needs_overwrite(build_dir, tmp_path):
    pytest.importorskip("tritonclient")
    repo = tmp_path / "repo"
    out = write_repository(build_dir, repo, name="lm")
    (out / "stale.txt").write_text("from an older build")
    with pytest.raises(PlanerError, match="already exists.*--triton-name.*--overwrite"):  # the options, not keywords
        write_repository(build_dir, repo, name="lm", max_batch=2)
    assert (out / "stale.txt").exists()
    write_repository(build_dir, repo, name="lm", max_batch=2, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert validate_config((out / "config.pbtxt").read_text()).max_batch_size == 2
    assert sorted(p.name for p in repo.iterdir()) == ["lm"]


def test_build_without_model_says_how_to_fix(build_dir, tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    shutil.copy(build_dir / "arch.json", build / "arch.json")
    with pytest.raises(PlanerError, match="no model.onnx; export one with `planer export"):
        write_repository(build, tmp_path / "repo")


def test_model_of_another_architecture_is_refused(build_dir, tmp_path):
    build = tmp_path / "build"
    shutil.copytree(build_dir, build)
    small_arch([BlockSpec.attn(2, 8), BlockSpec.ffn(16)], d_model=16, vocab_size=32).save(build / "arch.json")
    with pytest.raises(PlanerError, match="inputs are .*come from different networks"):
        write_repository(build, tmp_path / "repo")


def test_module_imports_no_torch():
    code = ("import sys, planer.serve.triton_repository; "
            "assert 'torch' not in sys.modules, 'planer.serve.triton_repository imports torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_writes_the_repository_of_a_build(build_dir, tmp_path):
    from click.testing import CliRunner

    from planer.cli import main

    pytest.importorskip("tritonclient")
    result = CliRunner().invoke(main, ["export", str(build_dir), "--triton", str(tmp_path / "repo"),
                                       "--triton-name", "lm", "--triton-kind", "gpu", "--triton-max-batch", "4"])
    assert result.exit_code == 0, result.output
    config = validate_config((tmp_path / "repo" / "lm" / "config.pbtxt").read_text())
    assert config.max_batch_size == 4 and config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    again = CliRunner().invoke(main, ["export", str(build_dir), "--triton", str(tmp_path / "repo"),
                                      "--triton-name", "lm"])
    assert again.exit_code != 0 and "already exists" in again.output
