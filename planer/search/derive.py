"""Derive one network from the supernet under a latency budget.

Taking the argmax per position ignores the budget: when the latency penalty
pushes every position the same way, all positions flip together and the
network collapses far below the target. Two tools here:

`constrained_choice` picks, per position, the candidate that maximises the
total log-probability subject to the predicted latency fitting a budget (a
multiple-choice knapsack, solved exactly by dynamic programming over latency
quantised to `bins` steps). With an unbounded budget it is the most probable
network that keeps an attention block.

`shrink` starts from such a network and cuts it down to the budget one move
at a time, choosing each move by the loss the supernet actually shows on
held-out data per millisecond saved. The log-probabilities alone do not say
what a block is worth: early in the search every baseline block is equally
probable, and a budget-only derivation then drops the most expensive blocks
(the attention) first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def constrained_choice(logp: Tensor, cost_ms: Tensor, budget_ms: float, is_attn: Sequence[bool], *,
                       bins: int = 1000) -> list[int] | None:
    """Per position, the candidate index maximising sum(logp[p, c]) with sum(cost_ms[c]) <= budget_ms and at
    least one attention block (the memory needs one). None when no choice fits the budget.

    logp: (positions, candidates) log-probabilities; cost_ms: (candidates,) block latencies.
    Costs are rounded up to the quantum, so a returned choice never exceeds the budget.
    """
    if budget_ms <= 0:
        return None
    positions, n = logp.shape
    quantum = budget_ms / bins
    steps = [math.ceil(float(c) / quantum - 1e-9) for c in cost_ms]
    attn = [bool(a) for a in is_attn]
    neg = float("-inf")
    # best[h, b]: highest total log-probability of the positions so far using b quanta, h = has attention
    best = torch.full((2, bins + 1), neg, dtype=torch.float64)
    best[0, 0] = 0.0
    back = []  # per position: (chosen candidate, previous flag) for every state
    for p in range(positions):
        new = torch.full_like(best, neg)
        pick = torch.full((2, bins + 1), -1, dtype=torch.long)
        prev = torch.zeros((2, bins + 1), dtype=torch.long)
        for c in range(n):
            s = steps[c]
            if s > bins:
                continue
            for h_from in (0, 1):
                h_to = 1 if attn[c] else h_from
                value = torch.full((bins + 1,), neg, dtype=torch.float64)
                value[s:] = best[h_from, : bins + 1 - s] + float(logp[p, c])
                better = value > new[h_to]
                new[h_to] = torch.where(better, value, new[h_to])
                pick[h_to][better] = c
                prev[h_to][better] = h_from
        best = new
        back.append((pick, prev))
    if math.isinf(float(best[1].max())):
        return None
    b = int(best[1].argmax())
    h = 1
    choice = []
    for pick, prev in reversed(back):
        c = int(pick[h, b])
        choice.append(c)
        h, b = int(prev[h, b]), b - steps[c]
    return choice[::-1]


def shrink(choice: Sequence[int], cost_ms: Tensor, budget_ms: float, is_attn: Sequence[bool],
           loss_of: Callable[[list[int]], float], moves: Callable[[int], Sequence[int]]) -> list[int] | None:
    """Cheapen `choice` one position at a time until its cost fits `budget_ms`, then spend what is left.

    Each cutting step tries every move `moves(p)` offers at every position p that saves time, measures
    the network's loss with `loss_of`, and makes the move that loses the least per millisecond saved,
    counting only the saving still needed. A cut can overshoot (dropping one attention block saves
    more than the last step needed), so then each growing step makes the move that still fits and
    gains the most loss per millisecond added, while any does. Moves that would remove the last
    attention block are not tried. None when no move is left and the choice still does not fit.
    """
    choice = list(choice)
    cost = [float(c) for c in cost_ms]
    current = loss_of(choice)
    last_attn = lambda ch, now, c: (is_attn[now] and not is_attn[c]  # noqa: E731
                                    and sum(bool(is_attn[x]) for x in ch) == 1)
    while (excess := sum(cost[c] for c in choice) - budget_ms) > 0:
        best: tuple[float, list[int], float] | None = None
        for p, now in enumerate(choice):
            for c in moves(p):
                saved = cost[now] - cost[c]
                if saved <= 0 or last_attn(choice, now, c):
                    continue
                trial = choice[:p] + [c] + choice[p + 1:]
                loss = loss_of(trial)
                score = (loss - current) / min(saved, excess)
                if best is None or score < best[0]:
                    best = (score, trial, loss)
        if best is None:
            return None
        _, choice, current = best
    while True:
        room = budget_ms - sum(cost[c] for c in choice)
        best = None
        for p, now in enumerate(choice):
            for c in moves(p):
                added = cost[c] - cost[now]
                if added <= 0 or added > room or last_attn(choice, now, c):
                    continue
                trial = choice[:p] + [c] + choice[p + 1:]
                loss = loss_of(trial)
                score = (loss - current) / added
                if loss < current and (best is None or score < best[0]):
                    best = (score, trial, loss)
        if best is None:
            return choice
        _, choice, current = best
