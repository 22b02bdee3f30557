"""The MoE layer as a TensorRT plugin: `planer::moe_experts`, implemented ahead of time by the Triton kernel
of planer.kernels.experts, so an engine runs its experts without a Python callback (and loads in C++ alone).

The ONNX export (lowering `trt`) keeps the router, softmax and top-k as standard operators, which TensorRT runs
natively, and emits one `moe_experts` node per MoE layer: inputs x (tokens, d), ids (tokens, k) int32,
gates (tokens, k) and the stacked expert weights; output (tokens, k, d), each slot's gated expert output. The
graph sums the k slots. TensorRT's ONNX parser maps the node to this plugin by its op type, its domain or
`plugin_namespace` attribute, and `aot=1` (TensorRT >= 10.10).

What does not need TensorRT is plain functions here, tested everywhere: the shape and type rules, the launch
grid, the compiled PTX and the NumPy reference of what the node computes. `register()` alone imports
tensorrt.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from planer.errors import PlanerError
from planer.kernels import ACTIVATION_CODES

NAMESPACE, NAME = "planer", "moe_experts"
PLUGIN_ID = f"{NAMESPACE}::{NAME}"
INPUTS = ("x", "ids", "gates", "w_up", "b_up", "w_gate", "b_gate", "w_down", "b_down")
BLOCK_M, BLOCK_S, BLOCK_K, BLOCK_F = 16, 128, 64, 32
NUM_WARPS = 4
ACTIVATIONS = tuple(a for a in ACTIVATION_CODES if a != "none")
DTYPES = ("fp32", "fp16")


class PluginError(PlanerError):
    """A MoE layer the plugin cannot run as asked."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Launch:
    """Everything one compiled kernel is specialised for: a layer's sizes, activation and dtype."""

    experts: int
    d_model: int
    d_inner: int
    activation: str
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise PluginError(f"the TensorRT MoE plugin has no activation {self.activation!r} "
                              f"(it has {', '.join(ACTIVATIONS)})")
        if self.dtype not in DTYPES:
            raise PluginError(f"the TensorRT MoE plugin runs {' or '.join(DTYPES)}, not {self.dtype}")

    @property
    def block_d(self) -> int:
        """Output columns per program: the whole row up to 256 (wider rows recompute the hidden layer per
        block of columns; wider blocks would pass the 48 KiB of shared memory a kernel gets without opt-in)."""
        return min(256, max(16, 1 << (self.d_model - 1).bit_length()))

    def grid(self, slots: Any, cdiv: Callable[[Any, int], Any] = _cdiv) -> tuple[Any, Any, Any]:
        """(experts, slot blocks, column blocks). `slots` = tokens x k may be a TensorRT shape expression,
        with `cdiv` its ceiling division; an expert may receive every slot, hence slots / BLOCK_M blocks each."""
        return self.experts, cdiv(slots, BLOCK_M), _cdiv(self.d_model, self.block_d)

    def constexprs(self) -> dict[str, int]:
        return {"ACTIVATION": ACTIVATION_CODES[self.activation], "BLOCK_M": BLOCK_M, "BLOCK_S": BLOCK_S,
                "BLOCK_K": BLOCK_K, "BLOCK_F": BLOCK_F, "BLOCK_D": self.block_d}

    def signature(self) -> dict[str, str]:
        """Triton's signature of the kernel: inputs, then int32 scalars, then the output (TensorRT's order)."""
        ptr = f"*{self.dtype}"
        types = {f"{name}_ptr": "*i32" if name == "ids" else ptr for name in INPUTS}
        types |= {"slots": "i32", "top_k": "i32", "d_model": "i32", "d_inner": "i32", "out_ptr": ptr}
        return types | dict.fromkeys(self.constexprs(), "constexpr")


def output_shape(x_shape: tuple, ids_shape: tuple) -> tuple:
    """(tokens, k, d_model): one row per routed slot. Works on ints and on TensorRT shape expressions."""
    return ids_shape[0], ids_shape[1], x_shape[1]


def type_combination() -> str:
    """The plugin's I/O types in tensorrt.plugin.AutoTuneCombination grammar: floats all fp32 or all fp16,
    expert ids int32, the output as x."""
    floats = "FP32|FP16"
    return ", ".join("INT32" if name == "ids" else floats for name in INPUTS) + f", {floats}"


def reference(x: np.ndarray, ids: np.ndarray, gates: np.ndarray, w_up: np.ndarray, b_up: np.ndarray,
              w_gate: np.ndarray, b_gate: np.ndarray, w_down: np.ndarray, b_down: np.ndarray,
              activation: str) -> np.ndarray:
    """What a `moe_experts` node computes, in NumPy (float64 inside): each slot's gated expert output."""
    from math import erf, sqrt

    dtype = x.dtype
    x, gates = x.astype(np.float64), gates.astype(np.float64)
    tokens, k = ids.shape
    out = np.zeros((tokens, k, x.shape[1]))
    for t in range(tokens):
        for j in range(k):
            e = int(ids[t, j])
            up = w_up[e].astype(np.float64) @ x[t] + b_up[e]
            if activation == "swiglu":
                g = w_gate[e].astype(np.float64) @ x[t] + b_gate[e]
                h = g / (1 + np.exp(-g)) * up
            elif activation == "relu":
                h = np.maximum(up, 0)
            elif activation == "silu":
                h = up / (1 + np.exp(-up))
            elif activation == "gelu_tanh":
                h = 0.5 * up * (1 + np.tanh(0.7978845608028654 * (up + 0.044715 * up ** 3)))
            elif activation == "gelu":
                h = np.array([0.5 * v * (1 + erf(v / sqrt(2))) for v in up])
            else:
                raise PluginError(f"no activation {activation!r}")
            out[t, j] = gates[t, j] * (w_down[e].astype(np.float64) @ h + b_down[e])
    return out.astype(dtype)


def run(x: Any, ids: Any, gates: Any, weights: dict[str, Any], activation: str, out: Any = None) -> Any:
    """What the plugin's enqueue runs, from PyTorch: the kernel over torch tensors on one device (CUDA, or the
    CPU under TRITON_INTERPRET=1), x (tokens, d) and the stacked `weights` (planer.export.lowering's
    stacked_experts, in x's dtype). Writes `out` (tokens * k, d) as TensorRT's output buffer, a new one if
    None, and returns it as (tokens, k, d): each slot's gated expert output, in one launch."""
    import torch

    from planer.kernels.experts import routed_experts

    experts, d_inner, d_model = weights["w_up"].shape
    launch = Launch(experts, d_model, d_inner, activation, {torch.float32: "fp32", torch.float16: "fp16"}[x.dtype])
    tokens, k = ids.shape
    if out is None:
        out = torch.empty((tokens * k, d_model), dtype=x.dtype, device=x.device)
    routed_experts[launch.grid(tokens * k)](
        x.contiguous(), ids.to(torch.int32).contiguous(), gates.contiguous(),
        *(weights[name].contiguous() for name in INPUTS[3:]), tokens * k, k, d_model, d_inner, out,
        **launch.constexprs())
    return out.view(tokens, k, d_model)


@functools.lru_cache(maxsize=None)
def compile_kernel(launch: Launch, capability: int | None = None) -> tuple[str, str, int]:
    """The kernel compiled for `launch` to PTX: (kernel name, PTX, shared memory bytes). `capability` is the
    GPU's compute capability as 80, 90, ...; by default the current GPU's (compiling needs no GPU when given).
    Cached: a network's MoE layers of one shape, and TensorRT's repeated calls, compile once."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from planer.kernels.experts import routed_experts

    if capability is None:
        target = triton.runtime.driver.active.get_current_target()
    else:
        target = GPUTarget("cuda", capability, 32)
    compiled = triton.compile(ASTSource(fn=routed_experts, signature=launch.signature(),
                                        constexprs=launch.constexprs()),
                              target=target, options={"num_warps": NUM_WARPS, "enable_fp_fusion": True})
    name = compiled.metadata.name
    runtime_params = [k for k, v in launch.signature().items() if v != "constexpr"]
    ptx = strip_scratch_params(compiled.asm["ptx"], name, declared=len(runtime_params))
    return name, ptx, compiled.metadata.shared


def strip_scratch_params(ptx: str, name: str, declared: int) -> str:
    """Drop the scratch-buffer pointers Triton (>= 3.3) appends to every kernel's parameters. TensorRT launches
    an AOT kernel with exactly (inputs, scalars, outputs); extra declared parameters would be read from past
    the end of its argument array. They are removed only when the kernel never reads them."""
    head = re.search(rf"\.entry {re.escape(name)}\((.*?)\)", ptx, re.S)
    if head is None:
        raise PluginError(f"no kernel {name} in the compiled PTX")
    params = [p.strip() for p in head.group(1).split(",") if p.strip()]
    extra = params[declared:]
    for param in extra:
        if ptx.count(param.split()[-1]) > 1:  # declared once; any other mention is a use
            raise PluginError(f"kernel {name} uses its scratch parameter {param.split()[-1]}; "
                              "this Triton version's kernels cannot be launched by TensorRT as they are")
    kept = ",\n".join(f"\t{p}" for p in params[:declared])
    return ptx[:head.start(1)] + f"\n{kept}\n" + ptx[head.end(1):]


@functools.cache
def register() -> None:
    """Register `planer::moe_experts` with TensorRT (once per process), before parsing an ONNX graph that holds
    it. Needs tensorrt >= 10.10 and triton."""
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def describe(x: trtp.TensorDesc, ids: trtp.TensorDesc, gates: trtp.TensorDesc, w_up: trtp.TensorDesc,
                 b_up: trtp.TensorDesc, w_gate: trtp.TensorDesc, b_gate: trtp.TensorDesc, w_down: trtp.TensorDesc,
                 b_down: trtp.TensorDesc, activation: str, experts: int, d_model: int,
                 d_inner: int) -> trtp.TensorDesc:
        return trtp.from_shape_expr(output_shape(x.shape_expr, ids.shape_expr), dtype=x.dtype)

    @trtp.autotune(PLUGIN_ID)
    def combinations(x, ids, gates, w_up, b_up, w_gate, b_gate, w_down, b_down, outputs):
        return [trtp.AutoTuneCombination(type_combination())]

    @trtp.aot_impl(PLUGIN_ID)
    def ahead_of_time(x, ids, gates, w_up, b_up, w_gate, b_gate, w_down, b_down, activation: str, experts: int,
                      d_model: int, d_inner: int, outputs, tactic):
        import tensorrt as trt

        dtype = "fp16" if x.dtype == trt.float16 else "fp32"
        launch = Launch(experts, d_model, d_inner, activation, dtype)
        name, ptx, shared = compile_kernel(launch)
        slots = ids.shape_expr[0] * ids.shape_expr[1]
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = launch.grid(slots, trtp.cdiv)
        params.block_x = NUM_WARPS * 32
        params.shared_mem = shared
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in (slots, ids.shape_expr[1], d_model,
                                                                          d_inner)])
        return name.encode(), ptx.encode(), params, scalars
