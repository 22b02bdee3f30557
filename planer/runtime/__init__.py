"""Engines behind one interface, and the timing function every latency figure uses.

This package imports no torch: it is what a serving process needs.
"""

from typing import Any

from planer.choices import ENGINES
from planer.runtime.engine import Engine, EngineError
from planer.runtime.evaluate import evaluate_engine
from planer.runtime.ort import OrtEngine, describe as describe_ort
from planer.runtime.timing import LatencyStats, time_engine, time_engines

_ORT_DEVICES = {"ort": "cpu", "ort-cuda": "cuda"}


def describe_engine(name: str, *, threads: int | None = None) -> dict[str, Any]:
    """The provenance of engine `name` on this machine, without a model; raises if it cannot run here."""
    if name in _ORT_DEVICES:
        return describe_ort(_ORT_DEVICES[name], threads)
    if name == "trt":
        from planer.runtime.trt import describe as describe_trt

        return describe_trt()
    raise _unknown(name)


def load_engine(name: str, model: str, *, threads: int | None = None,
                shape: tuple[int, int, int] | None = None) -> Engine:
    """The engine called `name` on an exported model file. `shape` (batch, tgt_len, mem_len) is the deployment
    an engine that compiles ahead of time (TensorRT) is built for; ONNX Runtime takes any shape. Each engine
    checks, as it loads, that it can run here."""
    if name == "trt":
        from planer.runtime.trt import TrtEngine

        return TrtEngine(model, shape=shape)
    if name not in _ORT_DEVICES:
        raise _unknown(name)
    return OrtEngine(model, device=_ORT_DEVICES[name], threads=threads)


def _unknown(name: str) -> EngineError:
    return EngineError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "EngineError", "LatencyStats", "OrtEngine", "describe_engine", "evaluate_engine",
           "load_engine", "time_engine", "time_engines"]
