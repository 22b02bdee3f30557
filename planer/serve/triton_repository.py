"""A Triton Inference Server model repository for a planer build.

`write_repository(BUILD, REPO)` turns a build directory (model.onnx and
arch.json) into one model of a Triton repository:

    REPO/NAME/config.pbtxt    ONNX Runtime backend, dynamic batching, one input per ONNX input
    REPO/NAME/1/model.onnx    a copy of BUILD/model.onnx (version 1)

Serve it with `tritonserver --model-repository REPO`.

A planer model is a Transformer-XL with explicit memories: the server keeps no
state between requests. Each request sends `tokens` and one memory `mem{i}`
per attention block, and gets back `logits` and the new memories `new_mem{i}`;
the client carries the memories, sending the `new_mem{i}` of one call as the
`mem{i}` of the next (empty memories, length 0, start a sequence).

This module imports no torch, so a serving machine can run it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import uses_external_data

from planer.arch import Architecture
from planer.errors import PlanerError, not_found
from planer.files import ARCH_FILE, MODEL_FILE, publish
from planer.runtime.feeds import input_names, output_names

ENGINES = ("ort", "trt")
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
CONFIG_FILE = "config.pbtxt"
VERSION = "1"

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class TritonError(PlanerError):
    """A build directory or option that cannot become a Triton model."""


def write_repository(build_dir: str | os.PathLike, repo: str | os.PathLike, *, name: str | None = None,
                     engine: str = "ort", kind: str = "cpu", instances: int = 1, max_batch: int = 8,
                     max_queue_delay_us: int = 2000, overwrite: bool = False) -> Path:
    """Writes REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx; returns REPO/NAME."""
    build = Path(build_dir)
    name = _model_name(build, name)
    # Checked here too so that a bad option fails before the (possibly large) model is read.
    _check_options(engine, kind, instances, max_batch, max_queue_delay_us)
    arch = _load_build(build)
    text = config_text(arch, name=name, engine=engine, kind=kind, instances=instances, max_batch=max_batch,
                       max_queue_delay_us=max_queue_delay_us)
    validate_config(text)

    out = Path(repo) / name
    if out.exists() and not overwrite:
        raise TritonError(f"{out} already exists; choose another model name (--triton-name), or replace it "
                          "(--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Assembled beside its final place so the rename stays on one file system; a unique hidden
    # name keeps concurrent writers apart, and a failure removes it.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out.parent))
    try:
        (staging / VERSION).mkdir()
        shutil.copyfile(build / MODEL_FILE, staging / VERSION / MODEL_FILE)
        (staging / CONFIG_FILE).write_text(text)
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def config_text(arch: Architecture, *, name: str, engine: str, kind: str, instances: int, max_batch: int,
                max_queue_delay_us: int) -> str:
    """The config.pbtxt of model NAME serving `arch` (Triton's text protobuf format)."""
    _check_options(engine, kind, instances, max_batch, max_queue_delay_us)
    # Dims exclude the batch dimension: with max_batch_size > 0 Triton adds it in front.
    inputs = [("tokens", "TYPE_INT64", [-1])] + [(n, "TYPE_FP32", [-1, arch.d_model]) for n in input_names(arch)[1:]]
    outputs = ([("logits", "TYPE_FP32", [-1, arch.vocab_size])]
               + [(n, "TYPE_FP32", [-1, arch.d_model]) for n in output_names(arch)[1:]])
    lines = [
        f"# planer model {name}: a Transformer-XL with explicit memories; the server keeps no state.",
        "# The client carries the memories: new_mem{i} of one call is mem{i} of the next",
        "# (memories of length 0 start a sequence).",
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        'backend: "onnxruntime"',
        f'default_model_filename: "{MODEL_FILE}"',
        f"max_batch_size: {max_batch}",
        _tensors("input", inputs),
        _tensors("output", outputs),
        f"instance_group [ {{ count: {instances} kind: {KINDS[kind]} }} ]",
        "# Triton batches only requests whose tokens and memory shapes agree (same sequence and",
        "# memory lengths); other requests run in separate batches.",
        f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}",
    ]
    return "\n".join(lines) + "\n"


def _tensors(field: str, tensors: list[tuple[str, str, list[int]]]) -> str:
    entries = ",\n".join(f'  {{ name: "{name}" data_type: {data_type} dims: [ {", ".join(map(str, dims))} ] }}'
                         for name, data_type, dims in tensors)
    return f"{field} [\n{entries}\n]"


def validate_config(text: str) -> Any:
    """Parse `text` with Triton's own ModelConfig schema and return the message; raises TritonError if it does not parse."""
    from google.protobuf import text_format

    config = _model_config_module().ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise TritonError(f"the Triton model config does not parse ({e}); fix config.pbtxt") from None
    return config


def _check_options(engine: str, kind: str, instances: int, max_batch: int, max_queue_delay_us: int) -> None:
    if engine == "trt":
        raise TritonError("Triton repositories from planer hold ONNX models for Triton's ONNX Runtime backend; "
                          "TensorRT plans with planer's MoE plugin are not written for Triton yet; use engine ort")
    if engine not in ENGINES:
        raise TritonError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if kind not in KINDS:
        raise TritonError(f"unknown instance kind {kind!r}; use one of {', '.join(KINDS)}")
    if instances < 1:
        raise TritonError(f"instances must be >= 1, got {instances}")
    if max_batch < 1:
        raise TritonError(f"max_batch must be >= 1 (Triton batches requests up to it), got {max_batch}")
    if max_queue_delay_us < 0:
        raise TritonError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")


def _model_name(build: Path, name: str | None) -> str:
    if name is None:
        # An explicit name is the user's choice and is checked; the default is made to fit.
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", build.resolve().name).lstrip(".-") or "planer"
    if not _NAME.fullmatch(name):
        raise TritonError(f"model name {name!r} is not usable by Triton; use letters, digits, '_', '.' and '-', "
                          "not starting with '.' or '-'")
    return name


def _load_build(build: Path) -> Architecture:
    """The build's architecture, after checking that its model.onnx has the signature that goes with it."""
    if not build.is_dir():
        raise TritonError(f"{not_found(build, 'build directory')}; pass the --out directory of `planer build`")
    model_path = build / MODEL_FILE
    if not model_path.is_file():
        raise TritonError(f"{build}: no {MODEL_FILE}; export one with `planer export {build}`")
    arch = Architecture.load(build / ARCH_FILE)
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises protobuf's DecodeError and others on a damaged file
        raise TritonError(f"{model_path}: not a readable ONNX model ({e}); export it again with `planer export`") from None
    if any(uses_external_data(t) for t in model.graph.initializer):
        raise TritonError(f"{model_path}: its weights live in separate files, which are not copied; "
                          "export it again with `planer export` (weights inside)")
    n = ["batch"]
    expected = ([("tokens", onnx.TensorProto.INT64, n + ["seq"])]
                + [(m, onnx.TensorProto.FLOAT, n + ["mem", arch.d_model]) for m in input_names(arch)[1:]])
    _check_signature(model_path, "inputs", model.graph.input, expected)
    expected = ([("logits", onnx.TensorProto.FLOAT, n + ["seq", arch.vocab_size])]
                + [(m, onnx.TensorProto.FLOAT, n + ["mem", arch.d_model]) for m in output_names(arch)[1:]])
    _check_signature(model_path, "outputs", model.graph.output, expected)
    return arch


def _check_signature(path: Path, what: str, values: Any, expected: list[tuple[str, int, list]]) -> None:
    """Names, element types and shapes; a str dim stands for any dynamic dim, an int for that size."""
    fix = f"{path.parent / ARCH_FILE} and {path.name} come from different networks; export the model again"
    names = [v.name for v in values]
    if names != [e[0] for e in expected]:
        raise TritonError(f"{path}: {what} are {names}, the architecture expects {[e[0] for e in expected]}; {fix}")
    for value, (name, elem_type, dims) in zip(values, expected):
        tensor = value.type.tensor_type
        got = [d.dim_value if d.HasField("dim_value") else "dynamic" for d in tensor.shape.dim]
        want = [d if isinstance(d, int) else "dynamic" for d in dims]
        if tensor.elem_type != elem_type or got != want:
            have = f"{onnx.TensorProto.DataType.Name(tensor.elem_type)} {got}"
            need = f"{onnx.TensorProto.DataType.Name(elem_type)} {want}"
            raise TritonError(f"{path}: {name} is {have}, expected {need}; {fix}")


@functools.cache
def _model_config_module() -> Any:
    """tritonclient's model_config_pb2, loaded by file: importing tritonclient.grpc would need grpcio."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise TritonError("checking a Triton config needs Triton's schema; pip install tritonclient")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise TritonError(f"{path} is missing from this tritonclient; pip install --upgrade tritonclient")
    file_spec = importlib.util.spec_from_file_location("planer._triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except Exception as e:  # typically protobuf older than the one tritonclient was generated for
        raise TritonError(f"cannot load Triton's schema from {path} ({e}); pip install --upgrade protobuf") from None
    return module
