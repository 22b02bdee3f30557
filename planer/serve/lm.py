"""Scoring and generation on a built model, step by step through the batcher.

Both read text the way the model was evaluated (Transformer-XL): segments of
the training segment length, each with the memories the previous segment
returned. Generation feeds one token per step with the memory, so each new
token costs one short step, not a pass over the whole prefix.
"""

from __future__ import annotations

import math

import numpy as np

from planer.arch import Architecture
from planer.serve.batcher import Batcher
from planer.serve.text import Tokenizer, log_softmax, sample


class BadRequest(ValueError):
    """A request the model cannot answer as asked; the message says why (HTTP 400)."""


class ServedLM:
    def __init__(self, arch: Architecture, batcher: Batcher, tokenizer: Tokenizer, *,
                 max_input_tokens: int):
        self.arch = arch
        self.batcher = batcher
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens

    def _encode(self, text: str, field: str, at_least: int) -> np.ndarray:
        ids = self.tokenizer.encode(text)
        if not at_least <= len(ids) <= self.max_input_tokens:
            raise BadRequest(f"'{field}' has {len(ids)} tokens ({self.tokenizer.unit}s); it must have {at_least} "
                             f"to {self.max_input_tokens}")
        return ids

    def _empty_mems(self) -> list[np.ndarray]:
        return [np.zeros((0, self.arch.d_model), np.float32) for _ in self.arch.attn_positions]

    async def _read(self, ids: np.ndarray, mems: list[np.ndarray], targets: np.ndarray | None = None
                    ) -> tuple[np.ndarray, list[np.ndarray], float]:
        """Runs `ids` segment by segment; returns the last position's logits, the memories, and the
        summed negative log-likelihood (nats) of `targets` (ids shifted by one) when given."""
        nll = 0.0
        logits = np.empty(0)
        for s in range(0, len(ids), self.arch.tgt_len):
            out = await self.batcher.run(ids[s:s + self.arch.tgt_len], mems)
            mems, logits = out.mems, out.logits
            if targets is not None:
                t = targets[s:s + self.arch.tgt_len]
                nll -= float(log_softmax(logits[:len(t)])[np.arange(len(t)), t].sum())
        return logits[-1], mems, nll

    async def score(self, text: str) -> dict:
        ids = self._encode(text, "text", at_least=2)
        _, _, nll = await self._read(ids, self._empty_mems(), targets=ids[1:])
        scored = len(ids) - 1  # the first token has no context to be predicted from
        loss = nll / scored
        metric = {"bpc": loss / math.log(2)} if self.tokenizer.unit == "byte" else {"ppl": math.exp(min(loss, 700))}
        return {"tokens": len(ids), "scored": scored, "loss": loss, **metric, "log_prob": -nll}

    async def generate(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float,
                       seed: int) -> dict:
        rng = np.random.default_rng(seed)
        ids = self._encode(prompt, "prompt", at_least=1)
        logits, mems, _ = await self._read(ids, self._empty_mems())
        new: list[int] = []
        while True:
            new.append(sample(logits, temperature, top_p, rng))
            if len(new) == max_tokens:
                break
            out = await self.batcher.run(np.asarray(new[-1:], dtype=np.int64), mems)
            logits, mems = out.logits[-1], out.mems
        return {"text": self.tokenizer.decode(new), "tokens": new, "prompt_tokens": len(ids), "seed": seed}
