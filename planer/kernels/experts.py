"""The routed-experts kernel: one launch computes every expert on only the token slots routed to it.

It is what the TensorRT plugin runs, so it must need nothing but its inputs: no host-side sort, no tile plan.
Program (e, t, c) takes the t-th block of BLOCK_M slots routed to expert e, in slot order, finding them with
a prefix count over the slot ids (E x slots integer compares: small next to the GEMMs), and computes output
columns c of `gate * down(act(up(x)))` for them. Programs past an expert's last slot do no GEMM, so an expert
without tokens costs one scan. Every slot belongs to exactly one expert, so every output row is written once:
no atomics, no scatter-add. The layer's output is the sum over a token's k slots, done by the graph.

Runs on CUDA and, with TRITON_INTERPRET=1, on the CPU (slowly), which is how the tests check it.
"""

from __future__ import annotations

import triton
import triton.language as tl



@triton.jit
def activate(z, ACTIVATION: tl.constexpr):
    """The activation coded ACTIVATION (swiglu's gating is its caller's) on an fp32 tile."""
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        z = z * tl.sigmoid(z)
    elif ACTIVATION == 3:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = 0.5 * z * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(x) = 2 sigmoid(2x) - 1
    elif ACTIVATION == 4:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    return z


@triton.jit
def routed_experts(x_ptr, ids_ptr, gates_ptr, w_up_ptr, b_up_ptr, w_gate_ptr, b_gate_ptr, w_down_ptr, b_down_ptr,
                   slots, top_k, d_model, d_inner,
                   out_ptr,
                   ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    # TensorRT's AOT plugins pass (inputs, scalars, outputs) in that order. fp32 GEMMs stay IEEE (no TF32),
    # so the plugin matches PyTorch to 1e-4; fp16 runs on tensor cores either way. Weights in nn.Linear layout:
    # up/gate (E, d_inner, d_model), down (E, d_model, d_inner); x (tokens, d_model); ids, gates, out by slot.
    expert = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_M
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d_model
    lane = tl.arange(0, BLOCK_M)
    slot = tl.zeros((BLOCK_M,), dtype=tl.int32)
    seen = 0
    for s0 in range(0, slots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mine = (tl.load(ids_ptr + s, mask=s < slots, other=-1) == expert).to(tl.int32)
        rank = seen + tl.cumsum(mine, 0) - 1
        hit = (mine[None, :] == 1) & (rank[None, :] == first + lane[:, None])
        slot += tl.sum(tl.where(hit, s[None, :], 0), axis=1)
        seen += tl.sum(mine, 0)
    rows = tl.minimum(seen - first, BLOCK_M)
    if rows > 0:
        row_ok = lane < rows
        token = slot // top_k
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for f0 in range(0, d_inner, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            f_ok = f < d_inner
            up = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
            gate = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
            for k0 in range(0, d_model, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < d_model
                a = tl.load(x_ptr + token[:, None] * d_model + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                            other=0.0)
                w_at = (expert * d_inner + f[None, :]) * d_model + k[:, None]  # (BLOCK_K, BLOCK_F) of W^T
                w_ok = k_ok[:, None] & f_ok[None, :]
                up += tl.dot(a, tl.load(w_up_ptr + w_at, mask=w_ok, other=0.0), input_precision="ieee")
                if ACTIVATION == 5:
                    gate += tl.dot(a, tl.load(w_gate_ptr + w_at, mask=w_ok, other=0.0), input_precision="ieee")
            up += tl.load(b_up_ptr + expert * d_inner + f, mask=f_ok, other=0.0)[None, :].to(tl.float32)
            if ACTIVATION == 5:
                gate += tl.load(b_gate_ptr + expert * d_inner + f, mask=f_ok, other=0.0)[None, :].to(tl.float32)
                h = gate * tl.sigmoid(gate) * up
            else:
                h = activate(up, ACTIVATION)
            w_down = tl.load(w_down_ptr + (expert * d_model + cols[None, :]) * d_inner + f[:, None],
                             mask=f_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.dot(h.to(w_down.dtype), w_down, input_precision="ieee")
        acc += tl.load(b_down_ptr + expert * d_model + cols, mask=col_ok, other=0.0)[None, :].to(tl.float32)
        acc *= tl.load(gates_ptr + slot, mask=row_ok, other=0.0)[:, None].to(tl.float32)
        tl.store(out_ptr + slot[:, None] * d_model + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
