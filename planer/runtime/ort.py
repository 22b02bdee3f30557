"""ONNX Runtime as an engine: CPU by default, the CUDA or TensorRT providers when asked."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from planer.errors import not_found
from planer.runtime.engine import EngineError, check_context, require_inputs
from planer.runtime.feeds import MAX_CONTEXT_KEY

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
OPT_LEVELS = ("disable", "basic", "extended", "all")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def gpu_model() -> str:
    """The first NVIDIA GPU's name, from nvidia-smi ("unknown" where it cannot say); asked once per process."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe(device: str = "cpu", threads: int | None = None, opt_level: str = "all",
             allow_spinning: bool = False) -> dict[str, Any]:
    """What a latency figure from ONNX Runtime on `device` depends on; raises if it cannot run here."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise EngineError("ONNX Runtime is not installed here",
                          "pip install 'planer[cpu]', or 'planer[gpu]' on a machine with an NVIDIA GPU (not both)") \
            from None

    if device not in PROVIDERS:
        raise EngineError(f"unknown ONNX Runtime device {device!r}; use one of {', '.join(PROVIDERS)}")
    missing = [p for p in PROVIDERS[device] if p not in ort.get_available_providers()]
    if missing:
        raise EngineError(f"ONNX Runtime {ort.__version__} here lacks {missing[0]}; "
                          "install onnxruntime-gpu (`pip install planer[gpu]`) on a machine with a GPU")
    if opt_level not in OPT_LEVELS:
        raise EngineError(f"unknown optimisation level {opt_level!r}; use one of {', '.join(OPT_LEVELS)}")
    return {"engine": "ort" if device == "cpu" else f"ort-{device}", "onnxruntime": ort.__version__,
            "providers": PROVIDERS[device], "cpu": cpu_model(), **({"gpu": gpu_model()} if device != "cpu" else {}),
            "device": device, "threads": threads or 0,
            "opt_level": opt_level, "allow_spinning": allow_spinning}


class OrtEngine:
    """An ONNX model in an ONNX Runtime session.

    Intra-op threads do not spin by default: planer times engines side by side
    (and next to PyTorch), where spinning threads distort each other's figures.
    """

    def __init__(self, model: str | os.PathLike, *, device: str = "cpu", threads: int | None = None,
                 opt_level: str = "all", allow_spinning: bool = False):
        self._provenance = describe(device, threads, opt_level, allow_spinning)  # first: says what is missing
        import onnxruntime as ort

        path = Path(model)
        if not path.is_file():
            raise EngineError(f"{not_found(path, 'ONNX model')}; export one first (`planer export`)")
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[opt_level]
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=PROVIDERS[device])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise EngineError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        self.name = self._provenance["engine"]
        self.path = path
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        context = self.session.get_modelmeta().custom_metadata_map.get(MAX_CONTEXT_KEY)
        self.max_context = int(context) if context else None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_inputs(self.path.name, self.input_names, feeds)
        check_context(self.path.name, self.max_context, feeds)
        outputs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outputs))

    def provenance(self) -> dict[str, Any]:
        return dict(self._provenance)
