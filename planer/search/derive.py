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


EXACT_LIMIT = 256  # moves in all up to which every move is measured at every step


def shrink(choice: Sequence[int], cost_ms: Tensor, budget_ms: float, is_attn: Sequence[bool],
           loss_of: Callable[[list[int]], float], moves: Callable[[int], Sequence[int]], *,
           exact_limit: int = EXACT_LIMIT, rebase: Callable[[list[int]], None] | None = None,
           min_attn: int = 1) -> list[int] | None:
    """Cheapen `choice` one position at a time until its cost fits `budget_ms`, then spend what is left.

    Each cutting step considers every move `moves(p)` offers at every position p that saves time, measures
    the network's loss with `loss_of`, and makes the move that loses the least per millisecond saved,
    counting only the saving still needed. A cut can overshoot (dropping one attention block saves
    more than the last step needed), so then each growing step makes the move that still fits and
    gains the most loss per millisecond added, while any does. Moves that would leave fewer than
    `min_attn` attention blocks (the memory needs one) are not tried. None when no move is left and the
    choice still does not fit.

    Up to `exact_limit` moves in all (over every position) every move is measured at every step. Beyond
    it (deep networks, where each measurement is a pass of the supernet) every step is lazy, however few
    moves are left in it: a move's loss change measured at an earlier step stands in for it until it
    ranks first, and is measured again then; a move is made only once it ranks first on a loss measured
    in this step. A moved position's other moves keep their earlier loss changes less that of the move
    made, instead of being measured again at once.

    `rebase`, when given, is called with the network each time the moves start from another one (first
    with `choice`), so that `loss_of` can reuse what the moves share with it.
    """
    choice = list(choice)
    lazy = sum(len(moves(p)) for p in range(len(choice))) > exact_limit
    if rebase is not None:
        rebase(choice)
    cost = [float(c) for c in cost_ms]
    current = loss_of(choice)
    stale: dict[tuple[int, int], float] = {}  # (position, candidate) -> loss change when last measured
    too_few = lambda ch, now, c: (is_attn[now] and not is_attn[c]  # noqa: E731
                                  and sum(bool(is_attn[x]) for x in ch) <= min_attn)

    def step(change: Callable[[int, int], float], score: Callable[[float, float], float],
             improving: bool) -> tuple[int, int, float] | None:
        """The move to make (position, candidate, the network's loss after it), or None."""
        options = [(p, c, change(now, c)) for p, now in enumerate(choice) for c in moves(p)
                   if change(now, c) > 0 and not too_few(choice, now, c)]
        fresh: dict[tuple[int, int], float] = {}

        def measure(p: int, c: int) -> None:
            loss = loss_of(choice[:p] + [c] + choice[p + 1:])
            fresh[(p, c)] = loss
            stale[(p, c)] = loss - current

        for p, c, _ in options:
            if not lazy or (p, c) not in stale:
                measure(p, c)
        while options:
            p, c, _ = min(options, key=lambda o: score(stale[o[:2]], o[2]))
            if (p, c) in fresh:
                return None if improving and fresh[(p, c)] >= current else (p, c, fresh[(p, c)])
            measure(p, c)
        return None

    def made(move: tuple[int, int, float] | None) -> bool:
        nonlocal choice, current
        if move is None:
            return False
        p, now, loss = move
        moved = stale[(p, now)]  # moving on from `now` is moving on from the old block, less the move to `now`
        for c in moves(p):
            if (p, c) in stale:
                stale[(p, c)] -= moved
        choice, current = choice[:p] + [now] + choice[p + 1:], loss
        if rebase is not None:
            rebase(choice)
        return True

    while (excess := sum(cost[c] for c in choice) - budget_ms) > 0:
        if not made(step(lambda now, c: cost[now] - cost[c], lambda delta, saved: delta / min(saved, excess),
                         improving=False)):
            return None
    while True:
        room = budget_ms - sum(cost[c] for c in choice)
        if not made(step(lambda now, c: cost[c] - cost[now] if cost[c] - cost[now] <= room else 0.0,
                         lambda delta, added: delta / added, improving=True)):
            return choice
