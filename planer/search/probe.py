"""The held-out loss the derivation ranks its moves by, without re-running shared blocks.

A derivation move changes one position of the current network, so every
position before it sees exactly the inputs it saw in the current network,
segment after segment (its memories come from those same inputs). The inputs
of every position in the current network are kept, and a move's pass starts
at the position it changes: on a deep network (SmolLM2: 60 positions, each
measurement a pass of the supernet) about half the work of a full pass, for
the same loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from planer import distributed
from planer.nn.model import embed_tokens
from planer.search.supernet import SuperNet


class ProbeLoss:
    """Mean cross-entropy of a supernet path on `probe` (consecutive segments; the first only fills the
    memory unless it is the only one). Call it with a choice; `rebase` names the network that moves start
    from, whose per-position inputs are then kept."""

    def __init__(self, net: SuperNet, probe: Sequence[tuple[Tensor, Tensor]]):
        self.net = net
        self.probe = list(probe)
        self.base: list[int] = []
        self.inputs: list[list[Tensor]] = []  # [segment][position]: what each position of `base` received
        self.losses: dict[tuple[int, ...], float] = {}
        self.positions_run = 0  # block evaluations per segment, summed over passes (what the reuse saves)

    def __call__(self, choice: Sequence[int]) -> float:
        key = tuple(choice)
        if key not in self.losses:
            self.losses[key] = distributed.mean(self._run(list(choice), record=False))  # same on every rank
        return self.losses[key]

    def rebase(self, choice: Sequence[int]) -> None:
        if list(choice) != self.base:
            self.losses[tuple(choice)] = distributed.mean(self._run(list(choice), record=True))

    def _shared(self, choice: list[int]) -> int:
        """Positions at the front that `choice` shares with the base network (none without a base; the
        last position always runs, so that its output need not be kept)."""
        if not self.base:
            return 0
        return next((p for p, (a, b) in enumerate(zip(choice, self.base)) if a != b), len(choice) - 1)

    @torch.no_grad()
    def _run(self, choice: list[int], record: bool) -> float:
        net, start = self.net, self._shared(choice)
        mem_len, past = net.arch.mem_len, 0
        mems: list[Tensor | None] | None = None
        inputs, total = [], 0.0
        for i, (x, y) in enumerate(self.probe):
            row = self.inputs[i][:start] if start else []
            h = self.inputs[i][start] if start else embed_tokens(net, x, past)
            h, mems, _ = net.run_positions(h, choice, mems, start=start, inputs=row)
            past = min(mem_len, past + x.shape[1])
            inputs.append(row)
            if i or len(self.probe) == 1:
                logits = net.logits(h)
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)))
        self.positions_run += len(choice) - start
        if record:
            self.base, self.inputs = choice, inputs
        return total / max(1, len(self.probe) - 1)
