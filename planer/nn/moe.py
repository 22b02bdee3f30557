"""Mixture of experts: a router and FFN experts with dropless sparse dispatch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from planer.nn.ffn import FFN


def balance_loss(probs: Tensor, expert_ids: Tensor, experts: int) -> Tensor:
    """Switch Transformer load-balancing loss: E * sum_e f_e * P_e.

    f_e is the fraction of routing assignments that went to expert e (all k
    slots count), P_e the mean router probability of e. It is 1 when routing
    is uniform and grows as tokens pile onto few experts.
    """
    counts = torch.zeros(experts, dtype=probs.dtype, device=probs.device)
    counts = counts.index_add(0, expert_ids.reshape(-1), torch.ones_like(expert_ids.reshape(-1), dtype=probs.dtype))
    fraction = counts / expert_ids.numel()
    return experts * (fraction * probs.mean(dim=0)).sum()


class MoE(nn.Module):
    """Top-k routed experts with dropless sparse dispatch.

    Tokens are sorted by expert, each expert runs on exactly the tokens routed
    to it (experts that receive none are not called), and the outputs are put
    back in token order by the inverse permutation before the gate-weighted
    sum over the k slots. The load-balancing loss of the last call is kept in
    `aux_loss` for the trainer.
    """

    def __init__(self, d_model: int, experts: int, top_k: int, d_inner: int,
                 activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList(FFN(d_model, d_inner, activation, bias) for _ in range(experts))
        self.aux_loss = torch.zeros(())

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, d) -> router probabilities (N, E), gates (N, k), expert ids (N, k).

        With k > 1 the k gates are renormalised to sum to one; with k = 1 the
        gate is the router probability itself, which keeps the router trainable.
        """
        probs = self.router(x).float().softmax(dim=-1)
        gates, ids = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return probs, gates.to(x.dtype), ids

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, gates, ids = self.route(x)
        self.aux_loss = balance_loss(probs, ids, len(self.experts))
        return self.dispatch(x, gates, ids).reshape(shape)

    def dispatch(self, x: Tensor, gates: Tensor, ids: Tensor) -> Tensor:
        n, k = ids.shape
        flat_ids = ids.reshape(-1)  # slot order: token-major
        order = flat_ids.argsort(stable=True)
        routed = x[order // k]
        counts = torch.bincount(flat_ids, minlength=len(self.experts)).tolist()
        outputs = [
            expert(chunk) if chunk.shape[0] else chunk
            for expert, chunk in zip(self.experts, routed.split(counts))
        ]
        by_slot = torch.cat(outputs)[order.argsort()]
        return (by_slot.view(n, k, -1) * gates[:, :, None]).sum(dim=1)
