"""The engine interface: load a model once, run it on named numpy arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from planer.errors import PlanerError


class EngineError(PlanerError):
    """An engine that cannot be loaded or run as asked (the message says why and what to do). `remedy` is kept
    apart from `reason` because it names command-line options some commands do not have."""

    def __init__(self, reason: str, remedy: str = ""):
        super().__init__(f"{reason}; {remedy}" if remedy else reason)
        self.reason = reason


@runtime_checkable
class Engine(Protocol):
    name: str  # "ort", "ort-cuda", "trt", "torch"
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for inputs by name."""
        ...

    def provenance(self) -> dict[str, Any]:
        """What a latency figure from this engine depends on: versions, device, threads, settings."""
        ...


def require_inputs(model: str, input_names: list[str], feeds: Mapping[str, np.ndarray]) -> None:
    """Refuse feeds that lack one of the model's inputs, naming them."""
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise EngineError(f"{model}: missing input(s) {', '.join(missing)}")


def check_context(model: str, max_context: int | None, feeds: Mapping[str, np.ndarray]) -> None:
    """Refuse memory + segment longer than a graph's relative-position table (planer.export), naming the fix;
    the engine itself would fail on a shape mismatch deep inside the graph."""
    segment = feeds.get("tokens", feeds.get("x"))
    memory = next((a for name, a in feeds.items() if name.startswith("mem")), None)
    if max_context is None or segment is None or memory is None:
        return
    context = segment.shape[1] + memory.shape[1]
    if context > max_context:
        raise EngineError(f"{model}: {memory.shape[1]} memory + {segment.shape[1]} segment positions, but the graph "
                          f"holds relative positions for at most {max_context}; export it again with "
                          f"`planer export --max-context {context}` (or shorter segments)")
