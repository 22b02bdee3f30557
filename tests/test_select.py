"""The exact selection step against brute force over every choice."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from planer.search.select import BUDGET_RTOL, Solution, greedy, select


def _instance(rng: np.random.Generator):
    sizes = rng.integers(1, 5, size=rng.integers(2, 6))
    scores = [list(rng.normal(size=k)) for k in sizes]  # normal: about half negative
    costs = [list(rng.uniform(0.0, 10.0, size=k)) for k in sizes]
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    return scores, costs, float(rng.uniform(lo, hi))


def _brute(scores, costs, budget, at_least=(), requires=()):
    """Every feasible choice as (score, cost, choice), best first."""
    out = []
    for choice in itertools.product(*(range(len(s)) for s in scores)):
        cost = math.fsum(costs[p][a] for p, a in enumerate(choice))
        if cost > budget + BUDGET_RTOL * abs(budget):
            continue
        if any(sum(bool(mask[p][a]) for p, a in enumerate(choice)) < n for mask, n in at_least):
            continue
        if any(choice[p] == a and choice[q] != b for (p, a), (q, b) in requires):
            continue
        out.append((math.fsum(scores[p][a] for p, a in enumerate(choice)), cost, choice))
    return sorted(out)


def _check(got: list[Solution], want, scores, costs, budget, at_least=(), requires=()):
    assert len(got) == len(want)
    assert [s.score for s in got] == pytest.approx([w[0] for w in want], abs=1e-9)
    assert len({s.choice for s in got}) == len(got)
    feasible = {w[2] for w in _brute(scores, costs, budget, at_least, requires)}
    for s in got:
        assert s.choice in feasible
        assert s.score == pytest.approx(math.fsum(scores[p][a] for p, a in enumerate(s.choice)), abs=1e-12)
        assert s.cost == pytest.approx(math.fsum(costs[p][a] for p, a in enumerate(s.choice)), abs=1e-12)


@pytest.mark.parametrize("best", [1, 3])
def test_matches_brute_force(best):
    rng = np.random.default_rng(1234 + best)
    for _ in range(200):
        scores, costs, budget = _instance(rng)
        got = select(scores, costs, budget, best=best)
        _check(got, _brute(scores, costs, budget)[:best], scores, costs, budget)


def test_at_least_is_honoured():
    rng = np.random.default_rng(7)
    binding = 0
    for _ in range(200):
        scores, costs, budget = _instance(rng)
        # Alternative 0 stands for the attention block: the most expensive, so the budget pushes it out.
        for c in costs:
            c[0] += 10.0
        budget += 10.0 * len(costs) * rng.uniform(0.0, 0.5)
        mask = [[a == 0 for a in range(len(s))] for s in scores]
        n = int(rng.integers(0, 3))
        at_least = [(mask, n)]
        want = _brute(scores, costs, budget, at_least)[:3]
        binding += want[:1] != _brute(scores, costs, budget)[:1]
        _check(select(scores, costs, budget, best=3, at_least=at_least), want, scores, costs, budget, at_least)
    assert binding > 20  # the constraint really changed the answer in a good share of the instances


def test_requirements_are_honoured():
    """A paired alternative (here: the cheapest and best of its position, as one that makes up for the block
    before it is) may be chosen only with its partner (that block's skip)."""
    rng = np.random.default_rng(11)
    binding = 0
    for _ in range(200):
        scores, costs, budget = _instance(rng)
        p = int(rng.integers(1, len(scores)))
        scores[p].append(min(scores[p]) - 1.0)
        costs[p].append(min(costs[p]))
        requires = [((p, len(scores[p]) - 1), (p - 1, int(rng.integers(0, len(scores[p - 1])))))]
        want = _brute(scores, costs, budget, requires=requires)[:3]
        binding += want[:1] != _brute(scores, costs, budget)[:1]
        _check(select(scores, costs, budget, best=3, requires=requires), want, scores, costs, budget,
               requires=requires)
        walked = greedy(scores, costs, budget, requires=requires)
        assert not walked or not any(walked[0].choice[a] == i and walked[0].choice[b] != j
                                     for (a, i), (b, j) in requires)
    assert binding > 20


def test_infeasible_returns_empty():
    assert select([[0.0, 1.0], [0.0]], [[2.0, 3.0], [1.0]], 2.5) == []
    assert select([[0.0, 1.0]], [[1.0, 2.0]], 5.0, at_least=[([[False, False]], 1)]) == []
    assert select([[0.0]], [[0.0]], 1.0, at_least=[([[True]], 2)]) == []


def test_fewer_solutions_than_asked():
    got = select([[0.0, 1.0], [5.0]], [[1.0, 1.0], [1.0]], 10.0, best=5)
    assert [(s.choice, s.score, s.cost) for s in got] == [((0, 0), 5.0, 2.0), ((1, 0), 6.0, 2.0)]


def test_budget_is_inclusive():
    # 0.1 + 0.2 != 0.3 in floating point; an exact-on-paper budget must still admit the choice.
    got = select([[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.1], [0.0, 0.2]], 0.3)
    assert got[0].choice == (1, 1)


def test_tiny_score_differences_are_resolved():
    # Scores far below HiGHS's absolute gap of 1e-6 must still rank correctly.
    rng = np.random.default_rng(3)
    for _ in range(20):
        scores, costs, budget = _instance(rng)
        scores = [[1e-9 * x for x in s] for s in scores]
        _check(select(scores, costs, budget, best=3), _brute(scores, costs, budget)[:3], scores, costs, budget)


@pytest.mark.parametrize("scores, costs, budget, kwargs, match", [
    ([[0.0], [1.0]], [[0.0]], 1.0, {}, "2 positions but costs has 1"),
    ([[0.0], [1.0, 2.0]], [[0.0], [1.0]], 1.0, {}, "position 1: 2 scores but 1 costs"),
    ([[0.0], []], [[0.0], []], 1.0, {}, "position 1: no alternatives"),
    ([[0.0], [float("nan")]], [[0.0], [1.0]], 1.0, {}, "scores: position 1: .*finite"),
    ([[0.0], [1.0]], [[float("inf")], [1.0]], 1.0, {}, "costs: position 0: .*finite"),
    ([[0.0], [1.0]], [[0.0], [1.0]], float("nan"), {}, "budget"),
    ([[0.0], [1.0]], [[0.0], [1.0]], 1.0, {"best": 0}, "best"),
    ([[0.0], [1.0]], [[0.0], [1.0]], 1.0, {"at_least": [([[True]], 1)]}, "mask has 1 positions"),
    ([[0.0], [1.0]], [[0.0], [1.0]], 1.0, {"at_least": [([[True], [True, False]], 1)]}, r"position 1: mask"),
    ([[0.0], [1.0]], [[0.0], [1.0]], 1.0, {"requires": [((1, 1), (0, 0))]}, r"\(1, 1\) -> \(0, 0\) names"),
])
def test_bad_shapes_raise(scores, costs, budget, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select(scores, costs, budget, **kwargs)


def test_greedy_fits_the_budget_and_exact_is_never_worse():
    rng = np.random.default_rng(1)
    worse = 0
    for _ in range(200):
        n = int(rng.integers(2, 6))
        sizes = rng.integers(1, 5, size=n)
        scores = [list(rng.normal(size=k)) for k in sizes]
        costs = [list(rng.uniform(0, 1, size=k)) for k in sizes]
        budget = float(rng.uniform(sum(min(c) for c in costs), sum(max(c) for c in costs)))
        walked = greedy(scores, costs, budget)
        exact = select(scores, costs, budget)
        assert exact and exact[0].cost <= budget * (1 + 1e-9)
        if walked:
            assert walked[0].cost <= budget and walked[0].score >= exact[0].score - 1e-9
            worse += walked[0].score > exact[0].score + 1e-9
    assert worse > 0  # instances where the walk is not optimal exist, so exactness is worth measuring


def test_alike_solutions_count_once():
    """Two positions, each a block in two precisions (nearly the same score) or a cheaper block: the k best
    distinct by `alike` are distinct networks, each in its best precisions."""
    scores = [[0.0, 0.001, 1.0], [0.0, 0.001, 2.0]]
    costs = [[2.0, 1.5, 1.0], [2.0, 1.5, 1.0]]
    alike = [["a", "a", "b"], ["c", "c", "d"]]
    plain = select(scores, costs, 4.0, best=3)
    assert [s.choice for s in plain] == [(0, 0), (0, 1), (1, 0)]  # one network three times
    distinct = select(scores, costs, 4.0, best=3, alike=alike)
    assert [s.choice for s in distinct] == [(0, 0), (2, 0), (0, 2)]
    assert [s.choice for s in select(scores, costs, 3.0, best=3, alike=alike)] == [(1, 1), (2, 0), (0, 2)]
