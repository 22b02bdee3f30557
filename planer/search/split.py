"""Experts made by splitting a trained FFN (MoEfication, arXiv 2110.01786), with an always-on shared part.

An FFN of width W is a sum over its hidden units. Partition the units into E groups of W/E and each group is an
FFN of width W/E: the sum of all E *is* the FFN, and a token that needs only k of the groups costs k/E of it.
Copies of the FFN (upcycling) start as that FFN at E times the weights and must diverge through training; split
experts start as the exact parts of it.

Which units go together decides how much a token loses when only k groups run. Units are grouped by *when* they
contribute: each unit's contribution on calibration tokens of the training split (|activation| x the norm of
its down-projection column, planer.search.units) is normalised to a unit vector over the tokens, and the
vectors are clustered into E equal groups (k-means, then each unit assigned to a centroid with W/E places by an
optimal assignment). SwiGLU units rarely group this way: a few carry every token (issue 40's oracle: a split
SmolLM2 lost more than the narrowed FFN). So the `shared` units of largest mean contribution are taken out
first and stay always on (DeepSeekMoE's shared expert); the rest are split.

The router starts by predicting the groups: a d x E linear map trained on the calibration tokens to give each
group the share of the token's routed contribution it carries (cross-entropy on those shares), so that its top k
are the groups that matter most to the token. The local search (planer.search.local) then trains experts,
router and shared part together to reproduce the parent FFN. There the router also learns from an oracle: for
each token, the k experts whose summed output comes closest to what the parent block wants of them
(`oracle_routes`). Gates are 1 in value (planer.nn.routing), so the router's only job is that choice, and the
gradient through its gates alone says little about experts it did not pick.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from torch import Tensor

from planer.arch import ArchError, BlockSpec
from planer.nn.ffn import FFN
from planer.nn.moe import MoE
from planer.search.units import hidden

CLUSTER_TOKENS = 4096  # tokens per unit feature vector: enough to tell the groups apart, cheap to cluster
ROUTER_STEPS = 300


def check_split(spec: BlockSpec, width: int) -> None:
    """Refuse, naming the problem, a MoE block that cannot be cut from an FFN of `width` units."""
    if spec.kind != "moe":
        raise ArchError(f"{spec.label()} is not a MoE block")
    if not 1 <= spec.top_k <= spec.experts:
        raise ArchError(f"{spec.label()}: top-k must be between 1 and the expert count ({spec.experts})")
    if spec.shared >= width:
        raise ArchError(f"{spec.label()}: the shared part ({spec.shared} units) leaves no units of the FFN's "
                        f"{width} to split")
    if (width - spec.shared) % spec.experts:
        raise ArchError(f"{spec.label()}: {spec.experts} experts do not divide the FFN's {width - spec.shared} "
                        f"routed units; choose an expert count that divides them")
    if spec.d_inner * spec.experts + spec.shared != width:
        raise ArchError(f"{spec.label()}: experts x width + shared must equal the FFN's width {width}")


def split_spec(width: int, experts: int, top_k: int, shared: int = 0, precision: str = "fp32") -> BlockSpec:
    """The MoE block that splits an FFN of `width` units into `experts` experts beside `shared` always-on units."""
    if experts < 1:
        raise ArchError(f"a split needs at least one expert, got {experts}")
    spec = BlockSpec.moe(experts, top_k, (width - shared) // experts, precision, shared)
    check_split(spec, width)
    return spec


def contributions(ffn: FFN, h: Tensor) -> Tensor:
    """(tokens, units): each unit's |activation| on the normalised inputs `h` (tokens, d) x its down column's
    norm."""
    with torch.no_grad():
        return hidden(ffn, h).abs() * ffn.down.weight.norm(dim=0)


def partition(contrib: Tensor, groups: int, seed: int = 0) -> Tensor:
    """Units (the columns of `contrib`) into `groups` equal groups of units that contribute on the same tokens:
    a (groups, units / groups) tensor of unit indices, each unit exactly once."""
    units = contrib.shape[1]
    if units % groups:
        raise ArchError(f"{units} units do not split into {groups} equal groups")
    size = units // groups
    if groups == 1:
        return torch.arange(units).unsqueeze(0)
    rows = torch.randperm(contrib.shape[0], generator=torch.Generator().manual_seed(seed))[:CLUSTER_TOKENS]
    features = F.normalize(contrib[rows].T.double(), dim=1).numpy()
    centroids = KMeans(groups, n_init=4, random_state=seed).fit(features).cluster_centers_
    distance = ((features[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # (units, groups)
    _, place = linear_sum_assignment(np.repeat(distance, size, axis=1))  # each group has `size` places
    group = torch.as_tensor(place // size)
    return torch.stack([torch.nonzero(group == g)[:, 0] for g in range(groups)])


@torch.no_grad()
def _copy_units(dst: FFN, src: FFN, units: Tensor, bias_share: float) -> None:
    """dst takes src's hidden units `units` and `bias_share` x src's output bias."""
    pairs = [(dst.up, src.up)] + ([(dst.gate, src.gate)] if src.activation == "swiglu" else [])
    for d, s in pairs:
        d.weight.copy_(s.weight[units])
        if d.bias is not None:
            d.bias.copy_(s.bias[units])
    dst.down.weight.copy_(src.down.weight[:, units])
    if dst.down.bias is not None:
        dst.down.bias.copy_(src.down.bias * bias_share)


@dataclass(frozen=True)
class Cut:
    """How an FFN splits into experts beside a shared part: the shared units, each expert's units, and the
    router's weight fitted to pick the groups. Neither top-k nor precision enters it, so one cut serves every
    MoE of its (experts, shared)."""
    shared: Tensor
    groups: Tensor  # (experts, units per expert)
    router: Tensor  # (experts, d)


def cut(ffn: FFN, h: Tensor, experts: int, shared: int, seed: int = 0) -> Cut:
    """The cut of `ffn` into `experts` groups beside its `shared` units of largest mean contribution, partition
    and router fitted on the FFN's normalised inputs `h` (tokens, d)."""
    contrib = contributions(ffn, h)
    order = contrib.mean(dim=0).argsort(descending=True)
    routed = order[shared:]
    groups = routed[partition(contrib[:, routed], experts, seed)]
    router = torch.nn.Linear(ffn.up.in_features, experts, bias=False)
    fit_router(router, h, torch.stack([contrib[:, g].sum(dim=1) for g in groups], dim=1), seed)
    return Cut(order[:shared], groups, router.weight.detach())


def split_ffn(ffn: FFN, h: Tensor, spec: BlockSpec, seed: int = 0,
              cuts: dict[tuple[int, int, int], Cut] | None = None) -> MoE:
    """The MoE `spec` cut from `ffn` (see the module's docstring), partition and router fitted on the FFN's
    normalised inputs `h` (tokens, d) from calibration tokens of the training split. With every expert selected
    it computes `ffn` exactly: the output bias goes to the shared part, or 1/k of it to every expert (exactly k
    are summed). `cuts`, one per (ffn, h), keeps the cuts made so that the MoEs of other top-k or precision
    reuse them (k-means and the router's fit take seconds per cut)."""
    check_split(spec, ffn.up.out_features)
    key = (spec.experts, spec.shared, seed)
    made = cuts.get(key) if cuts is not None else None
    if made is None:
        made = cut(ffn, h, spec.experts, spec.shared, seed)
        if cuts is not None:
            cuts[key] = made
    moe = MoE(ffn.up.in_features, spec.experts, spec.top_k, spec.d_inner, ffn.activation,
              ffn.down.bias is not None, spec.shared)
    for expert, units in zip(moe.experts, made.groups):
        _copy_units(expert, ffn, units, 0.0 if spec.shared else 1 / spec.top_k)
    if moe.shared is not None:
        _copy_units(moe.shared, ffn, made.shared, 1.0)
    with torch.no_grad():
        moe.router.weight.copy_(made.router)
    return moe


def fit_router(router: torch.nn.Linear, h: Tensor, mass: Tensor, seed: int = 0, steps: int = ROUTER_STEPS) -> float:
    """Train `router` (d -> E) on inputs `h` so that its probabilities match each group's share of `mass`
    (tokens, E); returns the fraction of tokens whose top-1 group it predicts."""
    torch.manual_seed(seed)
    target = mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-12)
    h = h.detach()
    with torch.no_grad():
        router.weight.normal_(0, 0.02)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    with torch.enable_grad():  # callers build blocks under no_grad
        for _ in range(steps):
            loss = router_loss(router, h, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((router(h).argmax(dim=-1) == mass.argmax(dim=-1)).float().mean())


@torch.no_grad()
def oracle_routes(moe: MoE, h: Tensor, want: Tensor) -> tuple[Tensor, Tensor]:
    """What a perfect router would pick for the inputs `h` (N, d) of `moe`: each token's k experts whose summed
    output, beside the shared part, comes closest to `want` (N, d), the output wanted of the whole block (every
    k-subset tried). Returns the (N, k) expert ids and the (N,) squared error of that choice."""
    if moe.shared is not None:
        want = want - moe.shared(h)
    outs = torch.stack([e(h) for e in moe.experts])  # (E, N, d)
    subsets = torch.tensor(list(combinations(range(len(moe.experts)), moe.top_k)), device=h.device)
    errors = torch.stack([(want - outs[s].sum(dim=0)).pow(2).sum(dim=-1) for s in subsets])  # (subsets, N)
    best = errors.min(dim=0)
    return subsets[best.indices], best.values


def routed_to(ids: Tensor, experts: int) -> Tensor:
    """The choice of experts `ids` (N, k) as (N, experts) distributions, 1/k on each chosen expert."""
    return torch.zeros(ids.shape[0], experts, device=ids.device).scatter_(1, ids, 1 / ids.shape[1])


def router_loss(router: torch.nn.Linear, h: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of `router`'s probabilities on `h` (N, d) against `target` (N, E) distributions. `h` is taken
    as given: no gradient reaches it."""
    return -(target * router(h.detach()).float().log_softmax(dim=-1)).sum(dim=1).mean()
