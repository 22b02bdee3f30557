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
           exact_limit: int = EXACT_LIMIT, remeasure: int | None = None, bulk: bool = False,
           rebase: Callable[[list[int]], None] | None = None) -> list[int] | None:
    """Cheapen `choice` one position at a time until its cost fits `budget_ms`, then spend what is left.

    Each cutting step considers every move `moves(p)` offers at every position p that saves time, measures
    the network's loss with `loss_of`, and makes the move that loses the least per millisecond saved,
    counting only the saving still needed. A cut can overshoot (dropping one attention block saves
    more than the last step needed), so then each growing step makes the move that still fits and
    gains the most loss per millisecond added, while any does. Moves that would remove the last
    attention block are not tried. None when no move is left and the choice still does not fit.

    Up to `exact_limit` moves in all (over every position) every move is measured at every step. Beyond
    it (deep networks, where each measurement is a pass of the supernet) every step is lazy, however few
    moves are left in it: a move's loss change measured at an earlier step stands in for it until it
    ranks first, and is measured again then; a move is made only once it ranks first on a loss measured
    in this step. A moved position's other moves keep
    their earlier loss changes less that of the move made, instead of being measured again at once.
    `remeasure` caps the stale moves measured again per lazy step; once it is reached, the step makes
    the best move measured in it. With `bulk`, a lazy cutting step far from the budget makes several
    moves: the one it measured, then the next best by their earlier measurements at other positions
    while all of them together save at most half the time still to cut (a deep network then needs a
    few steps, not one per block).

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
    last_attn = lambda ch, now, c: (is_attn[now] and not is_attn[c]  # noqa: E731
                                    and sum(bool(is_attn[x]) for x in ch) == 1)

    def step(change: Callable[[int, int], float], score: Callable[[float, float], float], improving: bool,
             bulk_ms: float = 0.0) -> tuple[list[int], float | None] | None:
        options = [(p, c, change(now, c)) for p, now in enumerate(choice) for c in moves(p)
                   if change(now, c) > 0 and not last_attn(choice, now, c)]
        fresh: dict[tuple[int, int], float] = {}

        def measure(p: int, c: int) -> None:
            loss = loss_of(choice[:p] + [c] + choice[p + 1:])
            fresh[(p, c)] = loss
            stale[(p, c)] = loss - current

        for p, c, _ in options:
            if not lazy or (p, c) not in stale:
                measure(p, c)
        remeasured = 0
        while options:
            ranked = options if remeasure is None or remeasured < remeasure or not fresh else \
                [o for o in options if o[:2] in fresh]
            p, c, amount = min(ranked, key=lambda o: score(stale[o[:2]], o[2]))
            if (p, c) in fresh:
                if improving and fresh[(p, c)] >= current:
                    return None
                new, saved = choice[:p] + [c] + choice[p + 1:], amount
                for q, d, more in (sorted(options, key=lambda o: score(stale[o[:2]], o[2])) if lazy and bulk_ms else ()):
                    if new[q] == choice[q] and saved + more <= bulk_ms and not last_attn(new, new[q], d):
                        new[q], saved = d, saved + more
                return new, fresh[(p, c)] if saved == amount else None  # None: several moves, not measured
            measure(p, c)
            remeasured += 1
        return None

    def made(new: tuple[list[int], float | None] | None) -> bool:
        nonlocal choice, current
        if new is None:
            return False
        for p, (was, now) in enumerate(zip(choice, new[0])):
            if was != now:  # moving on from `now` is moving on from `was`, less the move to `now`
                moved = stale.get((p, now))
                for c in moves(p):
                    if (p, c) in stale and moved is not None:
                        stale[(p, c)] -= moved
                    else:
                        stale.pop((p, c), None)
        choice = new[0]
        if rebase is not None:
            rebase(choice)
        current = new[1] if new[1] is not None else loss_of(choice)
        return True

    while (excess := sum(cost[c] for c in choice) - budget_ms) > 0:
        if not made(step(lambda now, c: cost[now] - cost[c], lambda delta, saved: delta / min(saved, excess),
                         improving=False, bulk_ms=excess / 2 if bulk else 0.0)):
            return None
    while True:
        room = budget_ms - sum(cost[c] for c in choice)
        if not made(step(lambda now, c: cost[c] - cost[now] if cost[c] - cost[now] <= room else 0.0,
                         lambda delta, added: delta / added, improving=True)):
            return choice
