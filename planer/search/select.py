"""Exact choice of one alternative per position under a latency budget (the selection step of Puzzle).

Puzzle (arXiv 2411.19146) scores every alternative of every position (block) on its own, predicts its
latency, and then picks one alternative per position so that the summed damage is least while the summed
latency fits the budget. That is a multiple-choice knapsack. A greedy walk (drop whatever loses least per
millisecond saved) is cheap but not optimal: with the same scores Puzzle reports 78.39 MMLU for the
mixed-integer program against 70.74 for greedy. The problem is small (tens of positions, tens of
alternatives each), so it is solved exactly here with HiGHS through `scipy.optimize.milp`.

`select` can also return the k best distinct solutions (each one found is excluded with a no-good cut and
the program solved again), so the caller can measure a few candidates rather than trust the scores alone.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

# A total up to budget * (1 + BUDGET_RTOL) still fits: summing the same costs in another order must not flip it.
BUDGET_RTOL = 1e-9

# HiGHS stops at an absolute gap of 1e-6 whatever mip_rel_gap says (scipy does not expose mip_abs_gap), so
# the objective is rescaled to make that gap negligible next to the scores' own spread.
OBJECTIVE_SPAN = 1e3


Requirement = tuple[tuple[int, int], tuple[int, int]]  # ((p, a), (q, b)): a at p only with b at q


@dataclass(frozen=True)
class Solution:
    """One choice of alternatives and its totals."""

    choice: tuple[int, ...]  # per position, the index of the chosen alternative in that position's list
    score: float  # summed score
    cost: float  # summed cost


def select(scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float, *,
           best: int = 1, at_least: Sequence[tuple[Sequence[Sequence[bool]], int]] = (),
           alike: Sequence[Sequence[Hashable]] | None = None, requires: Sequence[Requirement] = ()
           ) -> list[Solution]:
    """Choose one alternative per position minimising the summed score with the summed cost <= `budget`.

    `scores[p][a]` and `costs[p][a]` describe alternative a of position p; positions may have different
    numbers of alternatives, scores may be negative. Each `(mask, n)` in `at_least` requires at least n
    positions to choose an alternative a with `mask[p][a]` true. Each `((p, a), (q, b))` in `requires` allows
    alternative a at p only with alternative b at q. Returns up to `best` distinct solutions,
    best (lowest score) first; [] when nothing fits. With `alike`, solutions whose alternatives carry the same
    `alike[p][a]` at every position count as one, and only the best of them is returned: the same blocks in
    other precisions score and cost nearly alike, and would otherwise fill the k best with one network.
    Raises ValueError on malformed input.
    """
    best = operator.index(best)
    if best < 1:
        raise ValueError(f"best must be at least 1, got {best}")
    budget = float(budget)
    if math.isnan(budget):
        raise ValueError("budget is NaN")
    score_rows = _rows(scores, "scores")
    cost_rows = _rows(costs, "costs")
    if len(score_rows) != len(cost_rows):
        raise ValueError(f"scores has {len(score_rows)} positions but costs has {len(cost_rows)}")
    for p, (s, c) in enumerate(zip(score_rows, cost_rows)):
        if len(s) != len(c):
            raise ValueError(f"position {p}: {len(s)} scores but {len(c)} costs")
    sizes = [len(s) for s in score_rows]
    masks = []
    for i, (mask, n) in enumerate(at_least):
        rows = [np.asarray(m, dtype=bool) for m in mask]
        if len(rows) != len(sizes):
            raise ValueError(f"at_least[{i}]: mask has {len(rows)} positions, scores has {len(sizes)}")
        for p, (m, k) in enumerate(zip(rows, sizes)):
            if m.shape != (k,):
                raise ValueError(f"at_least[{i}]: position {p}: mask has shape {m.shape}, expected ({k},)")
        masks.append((rows, operator.index(n)))

    for (p, a), (q, b) in requires:
        if not (0 <= p < len(sizes) and 0 <= a < sizes[p] and 0 <= q < len(sizes) and 0 <= b < sizes[q]):
            raise ValueError(f"requires: ({p}, {a}) -> ({q}, {b}) names an alternative that does not exist")

    limit = budget + BUDGET_RTOL * abs(budget) if math.isfinite(budget) else budget
    if not sizes:  # no variables: milp cannot take an empty program, and the only choice is () anyway
        ok = 0.0 <= limit and all(n <= 0 for _, n in masks)
        return [Solution((), 0.0, 0.0)] if ok else []

    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n_vars = int(offsets[-1])
    positions = len(sizes)

    # Only differences within a position matter (exactly one alternative is taken there), so each position
    # is shifted to start at 0 before the whole objective is scaled to OBJECTIVE_SPAN.
    shifted = [s - s.min() for s in score_rows]
    spread = max(float(s.max()) for s in shifted)
    objective = np.concatenate(shifted) * (OBJECTIVE_SPAN / spread if spread > 0 else 1.0)

    one_each = csr_array((np.ones(n_vars), np.arange(n_vars), offsets), shape=(positions, n_vars))
    # HiGHS's feasibility tolerance is absolute; scaling the row to O(1) makes it relative to the costs.
    flat_costs = np.concatenate(cost_rows)
    cost_scale = float(np.abs(flat_costs).max()) or 1.0
    constraints = [LinearConstraint(one_each, 1.0, 1.0),
                   LinearConstraint((flat_costs / cost_scale)[None, :], -np.inf, limit / cost_scale)]
    for rows, n in masks:
        constraints.append(LinearConstraint(np.concatenate(rows).astype(float)[None, :], n, np.inf))
    for (p, a), (q, b) in requires:  # x[p, a] <= x[q, b]
        row = np.zeros(n_vars)
        row[offsets[p] + a], row[offsets[q] + b] = 1.0, -1.0
        constraints.append(LinearConstraint(row[None, :], -np.inf, 0.0))

    found: list[Solution] = []
    while len(found) < best:
        res = milp(objective, integrality=np.ones(n_vars), bounds=Bounds(0.0, 1.0), constraints=constraints,
                   options={"mip_rel_gap": 0.0})
        if res.status == 2:  # infeasible: no (further) solution fits
            break
        if res.status != 0 or res.x is None:
            raise RuntimeError(f"the selection MIP did not solve (status {res.status}): {res.message}")
        choice = tuple(int(np.argmax(res.x[offsets[p]:offsets[p + 1]])) for p in range(positions))
        # Excluding the choice is right both when it is kept (the next solve finds the next best) and when it
        # is not: HiGHS accepts rows up to its own tolerance (1e-6), looser than BUDGET_RTOL.
        cost = math.fsum(float(cost_rows[p][a]) for p, a in enumerate(choice))
        kept = cost <= limit and all(sum(bool(m[p][a]) for p, a in enumerate(choice)) >= n for m, n in masks) \
            and _met(choice, requires)
        cut = np.zeros(n_vars)
        cut[offsets[:-1] + np.asarray(choice)] = 1.0
        if kept and alike is not None:  # a rejected choice's alike twins may still fit: only it goes
            for p, a in enumerate(choice):
                cut[offsets[p] + np.flatnonzero([x == alike[p][a] for x in alike[p]])] = 1.0
        constraints.append(LinearConstraint(cut[None, :], -np.inf, positions - 1))
        if not kept:
            continue
        found.append(Solution(choice, math.fsum(float(score_rows[p][a]) for p, a in enumerate(choice)), cost))
    # Successive optima are already in order up to the solver's gap; sorting makes the order exact.
    return sorted(found, key=lambda s: s.score)


def _rows(table: Sequence[Sequence[float]], name: str) -> list[np.ndarray]:
    """Each position's values as a 1-d float array, checked to be non-empty and finite."""
    rows = []
    for p, row in enumerate(table):
        try:
            values = np.asarray(row, dtype=float)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: position {p}: not a list of numbers ({e})") from None
        if values.ndim != 1:
            raise ValueError(f"{name}: position {p}: expected a flat list of numbers, got shape {values.shape}")
        if values.size == 0:
            raise ValueError(f"{name}: position {p}: no alternatives")
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: position {p}: values must be finite, got {row!r}")
        rows.append(values)
    return rows


def _met(choice: Sequence[int], requires: Sequence[Requirement]) -> bool:
    return all(choice[p] != a or choice[q] == b for (p, a), (q, b) in requires)


def greedy(scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float, *,
           at_least: Sequence[tuple[Sequence[Sequence[bool]], int]] = (), requires: Sequence[Requirement] = ()
           ) -> list[Solution]:
    """The greedy walk `select` replaces, kept for the ablation that measures what exactness buys: from every
    position's first alternative, move one position at a time to the alternative that adds the least score per
    unit of cost saved, until the budget holds (moves that would break an `at_least` constraint or a requirement
    are not made). The one solution, or [] when no move is left and the budget still does not hold."""
    choice = [0] * len(scores)

    def allowed(p: int, a: int) -> bool:
        after = choice[:p] + [a] + choice[p + 1:]
        return all(sum(bool(mask[q][c]) for q, c in enumerate(after)) >= n for mask, n in at_least) \
            and _met(after, requires)

    while (total := sum(costs[p][c] for p, c in enumerate(choice))) > budget:
        moves = [((scores[p][a] - scores[p][c]) / (costs[p][c] - costs[p][a]), p, a)
                 for p, c in enumerate(choice) for a in range(len(scores[p]))
                 if costs[p][a] < costs[p][c] and allowed(p, a)]
        if not moves:
            return []
        _, p, a = min(moves)
        choice[p] = a
    return [Solution(tuple(choice), math.fsum(scores[p][c] for p, c in enumerate(choice)), total)]
