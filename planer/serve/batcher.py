"""Dynamic batching of engine calls.

Every request is a stream of steps (a segment of tokens plus the memories the
previous step returned). Steps whose shapes agree -- same segment length, same
memory length -- are stacked into one engine call; the graph has no padding
mask, so steps of other shapes wait for their own call rather than being
padded into this one (padding the memory would change the answer). A step
waits at most `max_delay_s` for company, and not at all when every open stream
already has a step queued, since then nobody else can join the batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np

from planer.runtime import Engine


@dataclass
class StepResult:
    logits: np.ndarray  # (T, vocab)
    mems: list[np.ndarray]  # each (M', d_model)


@dataclass
class _Step:
    tokens: np.ndarray  # (T,)
    mems: list[np.ndarray]  # each (M, d_model)
    future: asyncio.Future
    queued: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[int, ...]:
        return (self.tokens.shape[0], *(m.shape[0] for m in self.mems))


class Batcher:
    """Runs steps on one engine, one call at a time, in a worker thread so the event loop keeps
    accepting (and refusing) requests while the engine computes."""

    def __init__(self, engine: Engine, *, max_batch: int, max_delay_s: float,
                 on_batch: Callable[[int, float], None] | None = None):
        self.engine = engine
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.on_batch = on_batch
        self.streams = 0
        self._pending: list[_Step] = []
        self._wake = asyncio.Event()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="planer-engine")
        self._task: asyncio.Task | None = None
        self._mem_names = [n for n in engine.input_names if n != "tokens"]

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._worker.shutdown(wait=True)

    @asynccontextmanager
    async def stream(self) -> AsyncIterator[None]:
        """Marks a request whose steps are coming, so the batcher knows whom it may wait for."""
        self.streams += 1
        try:
            yield
        finally:
            self.streams -= 1
            self._wake.set()

    async def run(self, tokens: np.ndarray, mems: list[np.ndarray]) -> StepResult:
        step = _Step(tokens, mems, asyncio.get_running_loop().create_future())
        self._pending.append(step)
        self._wake.set()
        return await step.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A client that went away cancels its future; its step is dropped, not computed.
            self._pending = [s for s in self._pending if not s.future.done()]
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self._pending[0]
            batch = [s for s in self._pending if s.key == first.key][:self.max_batch]
            wait = first.queued + self.max_delay_s - time.monotonic()
            if len(batch) < self.max_batch and wait > 0 and len(self._pending) < self.streams:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    pass
                continue
            taken = {id(s) for s in batch}
            self._pending = [s for s in self._pending if id(s) not in taken]
            feeds = {"tokens": np.stack([s.tokens for s in batch])}
            feeds.update({name: np.stack([s.mems[i] for s in batch]) for i, name in enumerate(self._mem_names)})
            t0 = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._worker, self.engine.run, feeds)
            except Exception as e:  # the engine's own errors reach each waiting request, the loop goes on
                for s in batch:
                    if not s.future.done():
                        s.future.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - t0)
            new_mems = [out[f"new_{name}"] for name in self._mem_names]
            for i, s in enumerate(batch):
                if not s.future.done():
                    s.future.set_result(StepResult(out["logits"][i], [m[i] for m in new_mems]))
