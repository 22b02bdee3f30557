"""MoE lowerings for export: how an engine runs a MoE layer sparsely.

`ops` — standard ONNX operators. The eager MoE (planer.nn.moe) groups tokens
with a sort and Python-side split sizes; `OpsMoE` keeps that shape of
computation in the graph: the (token, slot) pairs sorted by expert once (TopK),
every routed row gathered once, one Split by the routing counts (a
data-dependent sizes input, which ONNX carries), each expert run on its own
rows only, and the outputs written back to their slots by one ScatterND. Every
slot belongs to exactly one expert, so the writes never collide and no
scatter-add is needed (ONNX Runtime's ScatterND with reduction=add and
duplicate indices has given wrong results intermittently with 2 threads); the
k slots of a token are then summed (every gate is 1 in value:
planer.nn.routing). Found, gathered and written back per expert instead
(NonZero, two Gathers and a ScatterND each), the same split blocks ran as fast
or up to 17 % slower in ONNX Runtime on a CPU, and handing the Split its sizes
as the counts tensor itself, not count by count, took off up to 11 % more; the
experts' weights stacked for one batched product per layer, padded to the
busiest expert, were no faster than the sorted form and up to 30 % slower for
SmolLM2's FFN (benchmarks/RESULTS.md, "The ops lowering, sorted once").

`ort-moe` — ONNX Runtime's fused `com.microsoft::MoE` contrib op (softmax,
top-k, grouped expert GEMMs and the weighted combine in one kernel). Its GELU
is the tanh form, so it lowers networks whose activation is `gelu_tanh`,
`relu`, `silu` or `swiglu` (Llama's, as the op's SwiGLU with alpha 1, beta 0
and no clamp) exactly and refuses exact `gelu` rather than change the
network's function silently. Its gates are the renormalised top-k
probabilities, 1/k each when the op is given logits that are 0 on a token's
k chosen experts and far below elsewhere, so its output times k is the sum
of the k experts' outputs that planer's MoE computes.

Every form adds the block's always-on shared FFN, where it has one, as plain
operators.

`trt` — for TensorRT: router, softmax and top-k as standard operators, then
one `planer::moe_experts` node per layer that TensorRT's parser maps to
planer's plugin (planer.trt.plugin: a Triton kernel compiled ahead of time,
every activation), and a sum over each token's k slots. Only TensorRT with
that plugin registered runs this graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from planer.choices import LOWERINGS
from planer.errors import PlanerError
from planer.nn.moe import MoE

_ORT_ACTIVATIONS = {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu", "swiglu": "swiglu"}
# ONNX Runtime's SwiGLU is gpt-oss's, (up + beta) * gate * sigmoid(alpha * gate) with both clamped at the limit;
# these make it Llama's silu(gate) * up. Its CPU kernel takes gate and up rows interleaved (swiglu_fusion 1).
_LLAMA_SWIGLU = {"swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0, "swiglu_limit": 3.0e38}


class OpsMoE(nn.Module):
    """The MoE `moe` (sharing its weights) in standard-ONNX-op form."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.router = moe.router
        self.experts = moe.experts
        self.shared = moe.shared
        self.top_k = moe.top_k
        self.route = moe.route
        self.aux_loss = torch.zeros(())  # inference graphs carry no balance loss

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        _, gates, ids = self.route(x)
        flat = ids.reshape(-1)
        order = flat.argsort()  # slots grouped by expert; the order within an expert does not matter
        # slot -> token as a gather: a floor division on the data-dependent index vectors costs torch.export
        # time to decompose and adds sign-fixing nodes to the graph
        token = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand(-1, self.top_k).reshape(-1)
        rows = x.index_select(0, token.index_select(0, order))
        counts = (flat.unsqueeze(1) == torch.arange(len(self.experts), device=x.device)).sum(dim=0)
        sizes = counts.tolist()
        for size in sizes:
            torch._check(size >= 0)
        torch._check(sum(sizes) == rows.shape[0])
        if torch.onnx.is_in_onnx_export():  # the counts as the Split's sizes input: traced, `rows.split(sizes)`
            # reads each count back into the graph through five scalar nodes, which cost a small block up to 11 %
            chunks = torch.onnx.ops.symbolic_multi_out(
                "Split", (rows, counts), {"axis": 0}, dtypes=[rows.dtype] * len(sizes),
                shapes=[(size, shape[-1]) for size in sizes])
        else:
            chunks = rows.split(sizes)
        outs = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])
        slots = torch.zeros_like(outs).index_put((order,), outs)
        out = (slots.view(-1, self.top_k, shape[-1]) * gates.unsqueeze(-1)).sum(dim=1)
        return _with_shared(self.shared, x, out).reshape(shape)


class OrtMoE(nn.Module):
    """The MoE `moe` as one `com.microsoft::MoE` node; only meaningful while exporting."""

    def __init__(self, moe: MoE):
        super().__init__()
        first = moe.experts[0]
        if first.activation not in _ORT_ACTIVATIONS:
            raise PlanerError(
                f"the ort-moe lowering cannot run activation {first.activation!r} exactly (ONNX Runtime's fused "
                f"MoE has {', '.join(_ORT_ACTIVATIONS)}); use --lowering ops")
        self.router, self.shared = moe.router, moe.shared
        self.top_k = moe.top_k
        self.activation = _ORT_ACTIVATIONS[first.activation]
        w = stacked_experts(moe)
        if first.activation == "swiglu":  # gate and up rows interleaved: g0 u0 g1 u1 ...
            w["w_up"] = torch.stack([w["w_gate"], w["w_up"]], dim=2).flatten(1, 2)
            w["b_up"] = torch.stack([w["b_gate"], w["b_up"]], dim=2).flatten(1, 2)
        self.fc1, self.fc1_bias, self.fc2, self.fc2_bias = (nn.Parameter(w[n]) for n in ("w_up", "b_up", "w_down",
                                                                                          "b_down"))
        self.attrs = {"k": self.top_k, "activation_type": self.activation, "normalize_routing_weights": 1,
                      **(_LLAMA_SWIGLU if first.activation == "swiglu" else {})}
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        if self.top_k > 1:  # equal logits on the chosen experts: gates 1/k each (see the module's docstring)
            chosen = torch.zeros_like(logits).scatter(1, logits.topk(self.top_k, dim=-1).indices, 1.0)
            logits = (chosen - 1) * 1e4
        out = torch.onnx.ops.symbolic(
            "com.microsoft::MoE", (x, logits, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias), self.attrs,
            dtype=x.dtype, shape=x.shape, version=1) * self.top_k
        return _with_shared(self.shared, x, out).reshape(shape)


class TrtMoE(nn.Module):
    """The MoE `moe` as standard routing ops and one `planer::moe_experts` plugin node; only meaningful while
    exporting."""

    def __init__(self, moe: MoE):
        super().__init__()
        from planer.trt.plugin import NAMESPACE

        self.router, self.route, self.top_k, self.shared = moe.router, moe.route, moe.top_k, moe.shared
        self.weights = nn.ParameterDict({name: nn.Parameter(w) for name, w in stacked_experts(moe).items()})
        experts, d_inner, d_model = self.weights["w_up"].shape
        self.attrs = {"activation": moe.experts[0].activation, "experts": experts, "d_model": d_model,
                      "d_inner": d_inner, "plugin_namespace": NAMESPACE, "aot": 1}
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        from planer.trt.plugin import INPUTS, PLUGIN_ID

        shape = x.shape
        x = x.reshape(-1, shape[-1])
        _, gates, ids = self.route(x)
        weights = tuple(self.weights[name] for name in INPUTS[3:])
        slots = torch.onnx.ops.symbolic(PLUGIN_ID, (x, ids.to(torch.int32), gates, *weights), self.attrs,
                                        dtype=x.dtype, shape=(x.shape[0], self.top_k, shape[-1]), version=1)
        return _with_shared(self.shared, x, slots.sum(dim=1)).reshape(shape)


def _with_shared(shared: nn.Module | None, x: Tensor, routed: Tensor) -> Tensor:
    return routed if shared is None else routed + shared(x)


def stacked_experts(moe: MoE) -> dict[str, Tensor]:
    """The experts' weights stacked along a first expert axis, nn.Linear layout: w_up/w_gate (E, inner, d),
    w_down (E, d, inner), biases (zeros where the network has none). Without a gate projection w_gate is
    w_up: the fused kernels take one signature for every activation."""
    def stack(layer: str, part: str) -> Tensor:
        tensors = [getattr(getattr(e, layer), part) for e in moe.experts]
        if tensors[0] is None:
            weight = getattr(moe.experts[0], layer).weight
            return torch.zeros(len(tensors), weight.shape[0], dtype=weight.dtype, device=weight.device)
        return torch.stack(tensors).detach()

    gate = "gate" if moe.experts[0].activation == "swiglu" else "up"
    return {"w_up": stack("up", "weight"), "b_up": stack("up", "bias"), "w_gate": stack(gate, "weight"),
            "b_gate": stack(gate, "bias"), "w_down": stack("down", "weight"), "b_down": stack("down", "bias")}


def lower(model: nn.Module, lowering: str) -> None:
    """Replace, in place, every MoE layer inside `model` by its `lowering` form."""
    if lowering not in LOWERINGS:
        raise PlanerError(f"unknown MoE lowering {lowering!r}; use one of {', '.join(LOWERINGS)}")
    form = {"ops": OpsMoE, "ort-moe": OrtMoE, "trt": TrtMoE}[lowering]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE):
                setattr(parent, name, form(child))
