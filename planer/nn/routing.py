"""Routing arithmetic shared by the eager MoE (planer.nn.moe), the supernet and the Triton dispatch
(planer.kernels.dispatch): which experts each token goes to, with which gate, and how balanced that is."""

from __future__ import annotations

import torch
from torch import Tensor


def routed_counts(ids: Tensor, experts: int, dtype: torch.dtype = torch.long) -> Tensor:
    """How many (token, slot) pairs each of the experts was sent, on ids' device: unlike bincount on CUDA, no
    wait for the host, so the grouped dispatch stays capturable in a CUDA graph."""
    flat = ids.reshape(-1)
    return torch.zeros(experts, dtype=dtype, device=ids.device).index_add_(0, flat, torch.ones_like(flat, dtype=dtype))


def balance_loss(probs: Tensor, expert_ids: Tensor, experts: int) -> Tensor:
    """Switch Transformer load-balancing loss: E * sum_e f_e * P_e.

    f_e is the fraction of routing assignments that went to expert e (all k
    slots count), P_e the mean router probability of e. It is 1 when routing
    is uniform and grows as tokens pile onto few experts.
    """
    fraction = routed_counts(expert_ids, experts, probs.dtype) / expert_ids.numel()
    return experts * (fraction * probs.mean(dim=0)).sum()


def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Router logits (N, E) -> probabilities (N, E) in fp32, gates (N, k), expert ids (N, k).

    Every gate is 1 in value: a token's output is the sum of its k experts' outputs, so experts split from an
    FFN add up to that FFN (all E selected: exactly it) and a fresh router shrinks nothing. Switch's top-1 gate
    (the raw probability, about 1/E for a fresh router) started an upcycled block at FFN/E, and renormalised
    top-k gates would average split experts instead of adding them. The gradient is the probability's
    (`p - stop_gradient(p) + 1`), so the router still learns from the loss as Switch's does.
    """
    probs = logits.float().softmax(dim=-1)
    chosen, ids = probs.topk(top_k, dim=-1)
    gates = (chosen - chosen.detach()) + 1  # exactly 1: p - p is 0, where 1 + p - p rounds
    return probs, gates.to(logits.dtype), ids
