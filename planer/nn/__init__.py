"""Blocks (attention, FFN, MoE, skip) and the language model built from an Architecture."""

from planer.nn.model import LM, LMOutput

__all__ = ["LM", "LMOutput"]
