"""The GPU image, read rather than built (CI has no GPU and no NVIDIA registry): one ONNX Runtime flavour, pinned
torch and triton, a smoke test that asserts the CUDA provider and loads TensorRT and the plugin, a volume, and
the ONNX Runtime CUDA quickstart as its default command."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTRUCTIONS = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines() if not line.startswith("#")))


def _run_lines() -> list[str]:
    return [line for line in INSTRUCTIONS.splitlines() if line.startswith("RUN ")]


def test_one_onnx_runtime_flavour_in_the_image_and_in_the_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {re.split(r"[<>=\[ ;]", r)[0].lower() for r in reqs}  # noqa: E731
    assert "onnxruntime" not in names(project["dependencies"])  # the core never brings the CPU package
    extras = {k: names(v) for k, v in project["optional-dependencies"].items()}
    assert "onnxruntime" in extras["cpu"] and "onnxruntime-gpu" in extras["gpu"]
    assert not any({"onnxruntime", "onnxruntime-gpu"} <= deps for deps in extras.values())
    installs = " ".join(_run_lines())
    extras_installed = set().union(*(set(m.split(",")) for m in re.findall(r"\.\[([\w,]+)\]", installs)))
    assert "gpu" in extras_installed and "cpu" not in extras_installed
    assert not re.search(r"\bonnxruntime(?!-gpu)[=<> \"']", installs.split("python -c")[0])
    assert "'onnxruntime' in" in installs  # and the build fails if something else brought the CPU package


def test_torch_and_triton_are_pinned_and_the_smoke_test_asserts_what_it_needs():
    installs = " ".join(_run_lines())
    assert re.search(r"\btorch==\d+\.\d+\.\d+", installs) and re.search(r"\btriton==\d+\.\d+\.\d+", installs)
    assert "'CUDAExecutionProvider' in o.get_available_providers()" in installs
    for module in ("tensorrt", "tensorrt.plugin", "planer.runtime.trt", "planer.trt.plugin"):
        assert re.search(rf"import [\w., ]*\b{re.escape(module)}\b", installs), module


def test_runs_go_to_a_volume_and_the_default_command_is_the_onnx_runtime_cuda_quickstart():
    volume = re.search(r"^VOLUME (\S+)", INSTRUCTIONS, re.M)
    workdirs = re.findall(r"^WORKDIR (\S+)", INSTRUCTIONS, re.M)
    assert volume and workdirs[-1] == volume.group(1)  # relative outputs (runs/, builds/) land on the volume
    cmd = re.search(r"^CMD (.+)$", INSTRUCTIONS, re.M).group(1)
    assert "--engine ort-cuda" in cmd and "--engine trt" not in cmd
