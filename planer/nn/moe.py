"""Mixture of experts: a router and FFN experts with dropless sparse dispatch."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from planer.nn.ffn import FFN
from planer.nn.quant import quantized_linears

# The Triton expert kernel is right on CUDA (benchmarks/gpu_check.sh, on an H200) but not faster than the eager
# dispatch there at B8 or at few experts (benchmarks/RESULTS.md, "GPU check"): CUDA uses it only when asked to.
TRITON_EXPERTS_ENV = "PLANER_TRITON_EXPERTS"


def triton_experts_enabled() -> bool:
    """Whether MoE layers on CUDA dispatch through the Triton kernel (PLANER_TRITON_EXPERTS=1) rather than
    eager PyTorch."""
    return os.environ.get(TRITON_EXPERTS_ENV, "") == "1"


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

    With k > 1 the k gates are renormalised to sum to one; with k = 1 the gate
    is the router probability itself, which keeps the router trainable.
    """
    probs = logits.float().softmax(dim=-1)
    gates, ids = probs.topk(top_k, dim=-1)
    if top_k > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return probs, gates.to(logits.dtype), ids


def dispatch(x: Tensor, gates: Tensor, ids: Tensor, experts: Sequence[Callable[[Tensor], Tensor]]) -> Tensor:
    """Dropless sparse dispatch: sort the (token, slot) pairs by expert, run each expert once on exactly
    its rows (not at all when it has none), un-permute and sum the k slots with their gates."""
    n, k = ids.shape
    flat_ids = ids.reshape(-1)  # slot order: token-major
    order = flat_ids.argsort(stable=True)
    routed = x[order // k]
    counts = routed_counts(flat_ids, len(experts)).tolist()
    outputs = [expert(chunk) if chunk.shape[0] else chunk for expert, chunk in zip(experts, routed.split(counts))]
    by_slot = torch.cat(outputs)[order.argsort()]
    return (by_slot.view(n, k, -1) * gates[:, :, None]).sum(dim=1)


class MoE(nn.Module):
    """Top-k routed FFN experts with dropless sparse dispatch (see `dispatch`; on a GPU the grouped Triton
    kernel of planer.kernels.dispatch, forward and backward).

    The load-balancing loss of the last call is kept in `aux_loss` for the trainer.
    """

    def __init__(self, d_model: int, experts: int, top_k: int, d_inner: int,
                 activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList(FFN(d_model, d_inner, activation, bias) for _ in range(experts))
        self.aux_loss = torch.zeros(())

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, d) -> router probabilities (N, E), gates (N, k), expert ids (N, k)."""
        return route(self.router(x), self.top_k)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, gates, ids = self.route(x)
        self.aux_loss = balance_loss(probs, ids, len(self.experts))
        if (x.is_cuda and x.dtype == torch.float32 and not quantized_linears(self)  # the kernel runs fp32 only
                and triton_experts_enabled()):
            from planer.kernels.dispatch import dispatch as kernel_dispatch  # Triton: only where a GPU runs it

            return kernel_dispatch(x, gates, ids, self.experts).reshape(shape)
        return dispatch(x, gates, ids, self.experts).reshape(shape)
