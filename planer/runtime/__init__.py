"""Engines behind one interface, and the timing function every latency figure uses.

This package imports no torch: it is what a serving process needs.
"""

from planer.runtime.engine import Engine, EngineError
from planer.runtime.ort import OrtEngine
from planer.runtime.timing import LatencyStats, time_engine, time_engines

ENGINES = ("ort", "ort-cuda", "trt")


def load_engine(name: str, model: str, *, threads: int | None = None) -> Engine:
    """The engine called `name` on an exported model file."""
    if name == "ort":
        return OrtEngine(model, threads=threads)
    if name == "ort-cuda":
        return OrtEngine(model, device="cuda", threads=threads)
    if name == "trt":
        raise EngineError("the TensorRT engine is not available in this planer yet; use --engine ort")
    raise EngineError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "EngineError", "LatencyStats", "OrtEngine", "load_engine", "time_engine",
           "time_engines"]
