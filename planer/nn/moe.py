"""Mixture of experts: a router and FFN experts with dropless sparse dispatch."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from planer.nn.ffn import FFN
from planer.nn.quant import quantized_linears
from planer.nn.routing import balance_loss, route, routed_counts

# The Triton expert kernel is right on CUDA (benchmarks/gpu_check.sh, on an H200) but not faster than the eager
# dispatch there at B8 or at few experts (benchmarks/RESULTS.md, "GPU check"): CUDA uses it only when asked to.
TRITON_EXPERTS_ENV = "PLANER_TRITON_EXPERTS"


def triton_experts_enabled() -> bool:
    """Whether MoE layers on CUDA dispatch through the Triton kernel (PLANER_TRITON_EXPERTS=1) rather than
    eager PyTorch."""
    return os.environ.get(TRITON_EXPERTS_ENV, "") == "1"


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
    kernel of planer.kernels.dispatch, forward and backward), plus an always-on `shared` FFN when its width is
    not 0 (the units every token needs, DeepSeekMoE's shared expert).

    The load-balancing loss of the last call is kept in `aux_loss` for the trainer.
    """

    def __init__(self, d_model: int, experts: int, top_k: int, d_inner: int,
                 activation: str = "gelu", bias: bool = True, shared: int = 0):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList(FFN(d_model, d_inner, activation, bias) for _ in range(experts))
        self.shared = FFN(d_model, shared, activation, bias) if shared else None
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

            out = kernel_dispatch(x, gates, ids, self.experts)
        else:
            out = dispatch(x, gates, ids, self.experts)
        return (out if self.shared is None else out + self.shared(x)).reshape(shape)
