"""TensorRT as an engine: an exported ONNX model built into a TensorRT plan for one deployment shape, then run
and timed through the same interface and timing function as every other engine.

MoE layers exported with the `trt` lowering become planer's `planer::moe_experts` plugin (planer.trt.plugin),
registered before parsing so TensorRT compiles its Triton kernel into the plan. The build goes through
Polygraphy's TensorRT loaders; TensorRT itself is imported only here, and only when asked for.

Not executed in this repository's CI: TensorRT is not installable on its machines (see the README).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from planer.errors import not_found
from planer.runtime.engine import EngineError, require_inputs
from planer.runtime.ort import gpu_model

TENSORRT_MIN = (10, 10)  # ahead-of-time tensorrt.plugin kernels; the parser reads a plugin's namespace from a
# node's domain since 10.10
Shape = tuple[int, int, int]  # batch, tgt_len, mem_len


def describe(fp16: bool = False) -> dict[str, Any]:
    """What a latency figure from TensorRT depends on; raises if TensorRT cannot run here."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError("TensorRT is not installed here (`pip install planer[trt]` needs NVIDIA's package "
                          "index and a machine with an NVIDIA GPU)",
                          "use --engine ort, or --engine ort-cuda on a GPU") from None
    version = tuple(int(p) for p in trt.__version__.split(".")[:2])
    if version < TENSORRT_MIN:
        raise EngineError(f"TensorRT {trt.__version__} is too old: planer's MoE plugin needs TensorRT >= "
                          f"{'.'.join(map(str, TENSORRT_MIN))}", "upgrade it or use --engine ort-cuda")
    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception:  # no driver or no device: TensorRT's bindings raise untyped errors
        raise EngineError("TensorRT is installed but no NVIDIA GPU is usable here", "use --engine ort") from None
    return {"engine": "trt", "tensorrt": trt.__version__, "gpu": gpu_model(), "precision": "fp16" if fp16 else "fp32",
            "threads": 0}


def _polygraphy() -> None:
    """Polygraphy's TensorRT loaders, which the trt extra installs beside TensorRT, or a one-line error."""
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise EngineError("Polygraphy is not installed here (TensorRT's engines are built through it)",
                          "pip install 'planer[trt]'") from None


def profile_shapes(inputs: Mapping[str, Sequence[int | str]], shape: Shape) -> dict[str, tuple[tuple, ...]]:
    """TensorRT's optimisation profile (min, opt, max per input) for a planer graph's inputs, whose dynamic axes
    are named batch, seq and mem by the exporter: built for the deployment shape, down to one sequence of one
    token and an empty memory (the first segment of a stream)."""
    batch, tgt_len, mem_len = shape
    ranges = {"batch": (1, batch, batch), "seq": (1, tgt_len, tgt_len), "mem": (0, mem_len, mem_len)}
    profile = {}
    for name, dims in inputs.items():
        unknown = [d for d in dims if isinstance(d, str) and d not in ranges]
        if unknown:
            raise EngineError(f"input {name} has a dynamic axis {unknown[0]!r} planer cannot size for TensorRT; "
                              "export the model with planer (`planer export`)")
        profile[name] = tuple(tuple(ranges[d][i] if isinstance(d, str) else d for d in dims) for i in range(3))
    return profile


def _graph_inputs(onnx_path: Path) -> tuple[dict[str, list[int | str]], bool]:
    """The graph's inputs (static dims as ints, dynamic as their names) and whether it holds planer's plugin."""
    import onnx

    from planer.trt.plugin import NAME, NAMESPACE

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    return inputs, any(n.op_type == NAME and n.domain == NAMESPACE for n in graph.node)


def build_plan(onnx_path: str | os.PathLike, shape: Shape, *, fp16: bool = False,
               timing_cache: str | os.PathLike | None = None) -> bytes:
    """A serialised TensorRT engine for the ONNX model at `onnx_path`, optimised for `shape`. A timing cache
    file, when given, is read if present and written back, so rebuilding similar graphs is faster."""
    describe()
    _polygraphy()
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path

    inputs, has_plugin = _graph_inputs(Path(onnx_path))
    if has_plugin:
        from planer.trt.plugin import register

        register()
    profile = Profile()
    for name, (lo, opt, hi) in profile_shapes(inputs, shape).items():
        profile.add(name, lo, opt, hi)
    cache = None if timing_cache is None else str(timing_cache)
    config = CreateConfig(fp16=fp16, profiles=[profile],
                          load_timing_cache=cache if cache and Path(cache).is_file() else None)
    try:
        return bytes(engine_bytes_from_network(network_from_onnx_path(str(onnx_path)), config=config,
                                               save_timing_cache=cache))
    except Exception as e:  # TensorRT and Polygraphy raise their own untyped errors
        raise EngineError(f"{onnx_path}: TensorRT cannot build it ({str(e).splitlines()[0]})") from None


class TrtEngine:
    """A TensorRT plan: built from an ONNX model for `shape` (and written to `plan` when given), or loaded
    from a `.plan` file built before."""

    name = "trt"

    def __init__(self, model: str | os.PathLike, *, shape: Shape | None = None, fp16: bool = False,
                 plan: str | os.PathLike | None = None, timing_cache: str | os.PathLike | None = None):
        self._provenance = describe(fp16)
        _polygraphy()
        from polygraphy.backend.trt import TrtRunner, engine_from_bytes

        path = Path(model)
        if not path.is_file():
            raise EngineError(f"{not_found(path, 'model file')}; export one first (`planer export`)")
        if path.suffix == ".plan":
            data = path.read_bytes()
        elif shape is None:
            raise EngineError(f"{path}: a TensorRT engine is built for a deployment shape; give batch, tgt_len "
                              "and mem_len")
        else:
            data = build_plan(path, shape, fp16=fp16, timing_cache=timing_cache)
            if plan is not None:
                from planer.files import atomic_write

                atomic_write(Path(plan), data)
        self.path = path
        self.runner = TrtRunner(engine_from_bytes(data))
        self.runner.activate()
        inputs = self.runner.get_input_metadata()
        self.input_names = list(inputs)
        engine = self.runner.engine
        self.output_names = [n for n in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))
                             if n not in inputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_inputs(self.path.name, self.input_names, feeds)
        outputs = self.runner.infer({n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        return {n: np.asarray(outputs[n]) for n in self.output_names}

    def provenance(self) -> dict[str, Any]:
        return dict(self._provenance)
