"""Scoring and generation on a built model, step by step through the batcher.

Both read text the way the model was evaluated (Transformer-XL): segments of
the training segment length, each with the memories the previous segment
returned. Generation feeds one token per step with the memory, so each new
token costs one short step, not a pass over the whole prefix.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence

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

    def encode_prompt(self, prompt: str) -> np.ndarray:
        return self._encode(prompt, "prompt", at_least=1)

    def completion(self, ids: np.ndarray, *, max_tokens: int, temperature: float, top_p: float, seed: int,
                   stop: Sequence[str] = ()) -> Completion:
        return Completion(self, ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          stop=stop)

    async def generate(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float,
                       seed: int) -> dict:
        done = await self.completion(self.encode_prompt(prompt), max_tokens=max_tokens, temperature=temperature,
                                     top_p=top_p, seed=seed).finish()
        return {"text": done.text, "tokens": done.tokens, "prompt_tokens": done.prompt_tokens, "seed": seed,
                "finish_reason": done.finish_reason}


class Completion:
    """One generation, read as it is decided: `async for piece in completion.pieces()` yields its text, holding
    back what may still become a stop string or is an incomplete character. It ends at the tokenizer's
    end-of-text token or a stop string (`finish_reason` "stop"; neither is part of the text) or after
    `max_tokens` (`length`). Abandoning the iteration (a client gone) stops it before the next engine step."""

    def __init__(self, lm: ServedLM, ids: np.ndarray, *, max_tokens: int, temperature: float, top_p: float,
                 seed: int, stop: Sequence[str] = ()):
        self.lm, self.ids, self.max_tokens = lm, ids, max_tokens
        self.temperature, self.top_p, self.rng = temperature, top_p, np.random.default_rng(seed)
        self.stop = [s for s in stop if s]
        self.prompt_tokens = len(ids)
        self.tokens: list[int] = []  # the text's tokens (not an end-of-text token)
        self.sampled = 0  # tokens generated, an end-of-text token included
        self.text = ""
        self.finish_reason: str | None = None

    async def pieces(self) -> AsyncIterator[str]:
        logits, mems, _ = await self.lm._read(self.ids, self.lm._empty_mems())
        emitted = 0
        while True:
            token = sample(logits, self.temperature, self.top_p, self.rng)
            self.sampled += 1
            if token == self.lm.tokenizer.eos_id:
                self.finish_reason = "stop"
            else:
                self.tokens.append(token)
                self.text = self.lm.tokenizer.decode(self.tokens)
                cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
                if cut >= 0:
                    self.text, self.finish_reason = self.text[:cut], "stop"
                elif self.sampled == self.max_tokens:
                    self.finish_reason = "length"
            if self.finish_reason is not None:
                if len(self.text) > emitted:
                    yield self.text[emitted:]
                return
            ready = len(self.text) - _held(self.text, self.stop)
            if ready > emitted:
                yield self.text[emitted:ready]
                emitted = ready
            out = await self.lm.batcher.run(np.asarray([token], dtype=np.int64), mems)
            logits, mems = out.logits[-1], out.mems

    async def finish(self) -> Completion:
        """Runs the whole generation; returns itself, finished."""
        async for _ in self.pieces():
            pass
        return self


def _held(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` may not be sent yet: a replacement character (the rest of its
    bytes may follow) or the start of a stop string."""
    incomplete = len(text) - len(text.rstrip("\ufffd"))
    starts = max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)
    return max(incomplete, starts)
