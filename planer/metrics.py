"""The scores a language model is reported by, with no torch: the PyTorch evaluator, the engine-side
evaluator and the reports all use these."""

from __future__ import annotations

import math


def scores(loss: float, unit: str) -> dict[str, float]:
    """Mean cross-entropy (nats/token) and the metric of the corpus' unit."""
    if unit == "byte":
        return {"loss": loss, "bpc": loss / math.log(2)}
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0))}


def headline(metrics: dict[str, float]) -> str:
    return f"bpc {metrics['bpc']:.4f}" if "bpc" in metrics else f"ppl {metrics['ppl']:.2f}"
