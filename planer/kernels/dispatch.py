"""The expert-dispatch kernel in OpenAI Triton: the design of TensorRT-LLM's MoE plugin and ONNX Runtime's
CUDA MoE -- route, sort the (token, slot) pairs by expert, one grouped GEMM over only the routed rows per
layer, weighted un-permute -- as one kernel planer's MoE block and (later) its TensorRT plugin share.

`grouped_linear` is the kernel: rows of `a` (gathered through `rows`, so the permutation is never
materialised) times the weight of the expert that owns each tile of rows. The sorted rows are cut into
tiles of BLOCK_M that never straddle two experts (`tiles`), so every program multiplies by one expert's
weight and experts without rows cost nothing. `dispatch` is planer.nn.moe.dispatch's contract.

It runs on CUDA and, with TRITON_INTERPRET=1, on the CPU (slowly), which is how the tests check it
against the eager dispatch on machines without a GPU, values and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from planer.kernels import ACTIVATION_CODES
from planer.nn.ffn import ACTIVATIONS, FFN
from planer.nn.routing import routed_counts
from planer.kernels.experts import activate

BLOCK_M = 16  # tl.dot's smallest tile; routed rows are padded to it per expert, never across experts


@triton.jit
def _grouped_linear(a_ptr, rows_ptr, w_ptr, bias_ptr, out_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                    K, N, stride_a, stride_we, stride_wn, stride_out,
                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    m = start + tl.arange(0, BLOCK_M)
    m_ok = m < end
    src = tl.load(rows_ptr + m, mask=m_ok, other=0)  # the row of `a` each sorted row reads
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_stop = tl.where(start < end, K, 0)  # a padding tile of the plan (start == end) reads no weights
    for k0 in range(0, k_stop, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(a_ptr + src[:, None] * stride_a + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # nn.Linear layout: weight[e] is (N, K); read its transpose tile (K, N).
        w = tl.load(w_ptr + expert * stride_we + n[None, :] * stride_wn + k[:, None],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * N + n, mask=n_ok, other=0.0)[None, :]
    acc = activate(acc, ACTIVATION)
    tl.store(out_ptr + m[:, None] * stride_out + n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_weight_grad(a_ptr, rows_ptr, g_ptr, out_ptr, starts_ptr, ends_ptr, K, N,
                         stride_a, stride_g, stride_oe, stride_on,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] (N, K) = sum over expert e's sorted rows i of g[i]^T a[rows[i]]: the weight gradient."""
    expert = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = n < N, k < K
    start = tl.load(starts_ptr + expert)
    end = tl.load(ends_ptr + expert)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < end
        src = tl.load(rows_ptr + m, mask=m_ok, other=0)
        g = tl.load(g_ptr + m[:, None] * stride_g + n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        a = tl.load(a_ptr + src[:, None] * stride_a + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(g), a, input_precision="ieee")
    tl.store(out_ptr + expert * stride_oe + n[:, None] * stride_on + k[None, :], acc,
             mask=n_ok[:, None] & k_ok[None, :])


class TilePlan(NamedTuple):
    """Where each expert's sorted rows are, and the tiles of BLOCK_M rows the kernel's programs take."""

    expert: Tensor  # per tile (int32): the expert whose weight it multiplies by
    start: Tensor  # per tile (int32): its first sorted row
    end: Tensor  # per tile (int32): its expert's end row (exclusive); start == end marks a padding tile
    row_start: Tensor  # per expert: its first sorted row
    row_end: Tensor  # per expert: its end row (exclusive)


def tiles(counts: Tensor, rows: int) -> TilePlan:
    """The plan for `rows` sorted rows, `counts` of them per expert. Tiles stop at each expert's last row, so no
    tile mixes experts, and an expert with no rows has none. The number of tiles is the bound
    ceil(rows / BLOCK_M) + min(E, rows) - 1, known without reading `counts` back from the device (a GPU would
    wait for it); the tiles past the real ones are padding (start == end) and do no work."""
    experts = len(counts)
    row_end = counts.cumsum(0)
    row_start = row_end - counts
    per = (counts + BLOCK_M - 1) // BLOCK_M
    last = per.cumsum(0)  # one past each expert's last tile
    bound = max(1, -(-rows // BLOCK_M) + min(experts, rows) - 1)
    tile = torch.arange(bound, device=counts.device)
    owner = torch.searchsorted(last, tile, right=True)  # == experts for a padding tile
    real = owner < experts
    e = owner.clamp(max=experts - 1)
    start = row_start[e] + (tile - (last - per)[e]) * BLOCK_M
    end = row_end[e]
    start, end = torch.where(real, start, 0), torch.where(real, end, 0)
    return TilePlan(torch.where(real, e, 0).to(torch.int32), start.to(torch.int32), end.to(torch.int32),
                    row_start, row_end)


_TORCH_ACTIVATIONS = {"none": lambda z: z, **ACTIVATIONS}  # the FFN's own, so the gradients are the eager ones


class _GroupedLinear(torch.autograd.Function):
    """grouped_linear with its backward: the activation's derivative from the saved pre-activation, the
    input gradient from the same kernel with each expert's weight transposed (summed back onto `a`'s rows),
    the weight gradient from `_grouped_weight_grad`, the bias gradient as a per-expert sum."""

    @staticmethod
    def forward(ctx, a, rows, weight, bias, plan, activation):
        pre = _launch(a, rows, weight, bias, plan, "none")
        ctx.save_for_backward(a, rows, weight, pre, *plan)
        ctx.has_bias, ctx.activation = bias is not None, activation
        return _TORCH_ACTIVATIONS[activation](pre)

    @staticmethod
    def backward(ctx, grad_out):
        a, rows, weight, pre, *saved = ctx.saved_tensors
        plan = TilePlan(*saved)
        with torch.enable_grad():
            z = pre.detach().requires_grad_()
            (grad_pre,) = torch.autograd.grad(_TORCH_ACTIVATIONS[ctx.activation](z), z, grad_out)
        grad_pre = grad_pre.contiguous()
        identity = torch.arange(len(rows), device=a.device)
        grad_rows = _launch(grad_pre, identity, weight.transpose(1, 2).contiguous(), None, plan, "none")
        grad_a = torch.zeros_like(a).index_add_(0, rows.long(), grad_rows)
        experts, n_out, k_in = weight.shape
        grad_w = torch.zeros_like(weight)
        block_n = min(64, max(16, triton.next_power_of_2(n_out)))
        block_k = min(64, max(16, triton.next_power_of_2(k_in)))
        grid = (experts, triton.cdiv(n_out, block_n), triton.cdiv(k_in, block_k))
        _grouped_weight_grad[grid](a.contiguous(), rows.to(torch.int32).contiguous(), grad_pre, grad_w,
                                   plan.row_start.to(torch.int32), plan.row_end.to(torch.int32), k_in, n_out,
                                   a.stride(0), grad_pre.stride(0), grad_w.stride(0), grad_w.stride(1),
                                   BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)
        grad_b = None
        if ctx.has_bias:
            owner = torch.searchsorted(plan.row_end, identity, right=True)  # each sorted row's expert
            grad_b = torch.zeros(experts, n_out, dtype=grad_pre.dtype, device=a.device).index_add_(0, owner, grad_pre)
        return grad_a, None, grad_w, grad_b, None, None


def grouped_linear(a: Tensor, rows: Tensor, weight: Tensor, bias: Tensor | None, tile_plan: TilePlan,
                   activation: str = "none") -> Tensor:
    """out[i] = act(a[rows[i]] @ weight[e(i)].T + bias[e(i)]) for the sorted rows i, e(i) the expert owning
    row i's tile. a (R, K) float32, rows (M,), weight (E, N, K) in nn.Linear layout, bias (E, N) or None.
    Differentiable in a, weight and bias (the backward runs the same kernels)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, weight, bias)):
        return _GroupedLinear.apply(a, rows, weight, bias, tile_plan, activation)
    return _launch(a, rows, weight, bias, tile_plan, activation)


def _launch(a: Tensor, rows: Tensor, weight: Tensor, bias: Tensor | None, plan: TilePlan,
            activation: str) -> Tensor:
    n_out, k_in = weight.shape[1], weight.shape[2]
    out = a.new_empty(rows.shape[0], n_out)
    if rows.shape[0] == 0:
        return out
    a, weight = a.contiguous(), weight.contiguous()
    block_n = min(64, max(16, triton.next_power_of_2(n_out)))
    block_k = min(64, max(16, triton.next_power_of_2(k_in)))
    grid = (len(plan.expert), triton.cdiv(n_out, block_n))
    _grouped_linear[grid](a, rows.to(torch.int32).contiguous(), weight, bias if bias is not None else weight, out,
                          plan.expert, plan.start, plan.end, k_in, n_out, a.stride(0), weight.stride(0),
                          weight.stride(1), out.stride(0), HAS_BIAS=bias is not None,
                          ACTIVATION=ACTIVATION_CODES[activation], BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def _stacked(experts: Sequence[FFN], name: str) -> tuple[Tensor, Tensor | None]:
    layers = [getattr(e, name) for e in experts]
    bias = None if layers[0].bias is None else torch.stack([layer.bias for layer in layers])
    return torch.stack([layer.weight for layer in layers]), bias


def dispatch(x: Tensor, gates: Tensor, ids: Tensor, experts: Sequence[FFN]) -> Tensor:
    """planer.nn.moe.dispatch with the grouped kernel: x (N, d), gates and expert ids (N, k)."""
    n, k = ids.shape
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    plan = tiles(routed_counts(flat, len(experts)), len(flat))
    tokens = torch.div(order, k, rounding_mode="floor")  # sorted row -> token: the gather happens in the kernel
    activation = experts[0].activation
    up_w, up_b = _stacked(experts, "up")
    if activation == "swiglu":
        gate_w, gate_b = _stacked(experts, "gate")
        hidden = grouped_linear(x, tokens, gate_w, gate_b, plan, "silu") * grouped_linear(x, tokens, up_w, up_b, plan)
    else:
        hidden = grouped_linear(x, tokens, up_w, up_b, plan, activation)
    down_w, down_b = _stacked(experts, "down")
    identity = torch.arange(hidden.shape[0], device=x.device)
    out_sorted = grouped_linear(hidden, identity, down_w, down_b, plan)
    by_slot = out_sorted[order.argsort()]  # un-permute by a gather: nothing summed in a scatter
    return (by_slot.view(n, k, -1) * gates[:, :, None]).sum(dim=1)
