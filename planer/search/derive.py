"""Derive one network from the supernet under a latency budget.

Taking the argmax per position ignores the budget: when the latency penalty
pushes every position the same way, all positions flip together and the
network collapses far below the target. Choosing the most probable network
that fits the budget (a knapsack over log-probabilities) does not help
either: early in the search every baseline block is equally probable, so it
drops the most expensive blocks (the attention) first.

`shrink` starts from the most probable network (SuperNet.argmax) and cuts it
down to the budget one move at a time, choosing each move by the loss the
supernet actually shows on held-out data per millisecond saved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor


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
