"""ONNX export of a planer LM, of one block alone, and of the fixed part (embedding, final norm, head).

Memories are explicit inputs and outputs; batch, segment length and memory
length stay dynamic; MoE layers are lowered (see `lowering`) so the engine
dispatches tokens only to their experts. Relative-position (Transformer-XL)
attention holds its position keys as a constant for up to `max_context`
positions of memory + segment (recorded in the graph's metadata under
MAX_CONTEXT_KEY; planer's ONNX Runtime engine refuses longer inputs by name).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import torch
from torch import Tensor, nn

from planer.arch import Architecture, BlockSpec
from planer.errors import PlanerError
from planer.export.lowering import lower
from planer.export.quantize import digest, quantize_int8
from planer.files import replacing
from planer.nn import LM
from planer.nn.attention import Attention
from planer.nn.model import Block, compute_in, embed_tokens, head_logits, int8_weights, next_memory
from planer.nn.moe import MoE
from planer.nn.quant import quantized_linears
from planer.runtime.feeds import MAX_CONTEXT_KEY, input_names, output_names

# Sample sizes avoid 0/1 and each other, so the exporter specialises on none of them.
_B, _T, _M = 3, 5, 7


class ExportError(PlanerError):
    """A model the exporter cannot turn into a correct graph."""


class _LMGraph(nn.Module):
    """LM.forward with positional tensors in and out, as a graph needs."""

    def __init__(self, model: LM, mem_len: int):
        super().__init__()
        self.model = model
        self.mem_len = mem_len

    def forward(self, tokens: Tensor, *mems: Tensor) -> tuple[Tensor, ...]:
        out = self.model(tokens, list(mems), self.mem_len)
        return (out.logits, *out.mems)


class _AttnGraph(nn.Module):
    """One attention block and its memory update, as they run inside the LM."""

    def __init__(self, block: Block, mem_len: int):
        super().__init__()
        self.block = block
        self.mem_len = mem_len

    def forward(self, x: Tensor, mem: Tensor) -> tuple[Tensor, Tensor]:
        return self.block(x, mem), next_memory(x, mem, self.mem_len)


class _FixedGraph(nn.Module):
    """What every network pays regardless of its blocks: embedding, final norm, output head."""

    def __init__(self, model: LM):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        m = self.model
        return head_logits(m, m.norm(embed_tokens(m, tokens, 0)))


def _export(module: nn.Module, args: tuple[Tensor, ...], dynamic: tuple, inputs: list[str], outputs: list[str],
            path: str | os.PathLike, original: nn.Module, context: int) -> Path:
    """Export `module` to a self-contained ONNX file, written atomically and checked to hold every
    weight of `original` (the module before MoE lowering and in fp32); `context` is recorded as its
    max_context. The projections `original` computes in int8 are then quantized with the engine's tools."""
    path = Path(path)
    with replacing(path) as tmp:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, input_names=inputs,
                                        output_names=outputs, external_data=False, verbose=False)
        if _relative(original):
            program.model.metadata_props[MAX_CONTEXT_KEY] = str(context)
        program.save(str(tmp), external_data=False)
        check_weights_present(tmp, original)
        quantize_int8(tmp, [w.detach().numpy() for w in int8_weights(original)])
    return path


class _quiet_exporter:
    """torch.onnx logs progress and optional-dependency notes at WARNING; planer shows its own progress."""

    def __enter__(self) -> None:
        self.loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


def _relative(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention) and m.pos == "relative"]


def max_context(arch: Architecture, mem_len: int, min_context: int = 0) -> int:
    """The longest memory + segment an exported graph accepts: twice what the architecture trained on
    (`mem_len` of memory), or `min_context` if that is more."""
    return max(min_context, 2 * (mem_len + arch.tgt_len))


def _axes(model: nn.Module, context: int) -> tuple[torch.export.Dim, torch.export.Dim, torch.export.Dim]:
    """The batch, segment and memory axes. Frozen relative position keys bound segment and memory at
    `context` each; saying so up front spares torch.export a failed first trace and a retry (a third of
    the export time)."""
    bound = {"max": context} if _relative(model) else {}
    return torch.export.Dim("batch"), torch.export.Dim("seq", **bound), torch.export.Dim("mem", **bound)


def _lowered(model: nn.Module, lowering: str, context: int) -> nn.Module:
    """An eval-mode copy of `model` for inference graphs: relative position keys frozen for `context`
    positions, MoE layers in `lowering` form, every block traced in fp32 (`_export` quantizes the int8
    ones afterwards)."""
    if lowering != "ops" and any(quantized_linears(m) for m in model.modules() if isinstance(m, MoE)):
        raise ExportError(f"int8 MoE blocks run only in the `ops` lowering (the {lowering} lowering's fused "
                          "experts are fp32); use --lowering ops, or --precision fp32")
    copy_ = copy.deepcopy(model).eval()
    compute_in(copy_, "fp32")
    for attn in _relative(copy_):
        attn.freeze_positions(context)
    lower(copy_, lowering)
    return copy_


def export_lm(model: LM, path: str | os.PathLike, *, lowering: str = "ops", mem_len: int | None = None,
              min_context: int = 0) -> Path:
    """Write `model` as a self-contained ONNX file (weights inside) and return its path.

    The graph takes `tokens` and one memory per attention block (see
    planer.runtime.feeds) and returns logits and the new memories, at most
    `mem_len` (default: the architecture's) long. It accepts memory + segment
    up to `max_context(arch, mem_len, min_context)` positions.
    """
    arch = model.arch
    if not arch.attn_positions:
        raise ExportError("this network has no attention block; an LM export needs at least one")
    mem_len = arch.mem_len if mem_len is None else mem_len
    context = max_context(arch, mem_len, min_context)
    graph = _LMGraph(_lowered(model, lowering, context), mem_len)
    tokens = torch.randint(0, arch.vocab_size, (_B, _T))
    mems = tuple(torch.randn(_B, _M, arch.d_model) for _ in arch.attn_positions)
    batch, seq, mem = _axes(model, context)
    dynamic = ({0: batch, 1: seq}, tuple({0: batch, 1: mem} for _ in mems))  # *mems is one varargs entry
    return _export(graph, (tokens, *mems), dynamic, input_names(arch), output_names(arch), path, model, context)


def export_block(arch: Architecture, spec: BlockSpec, path: str | os.PathLike, *, lowering: str = "ops",
                 mem_len: int | None = None, min_context: int = 0, fp32_twin: str | os.PathLike | None = None
                 ) -> Path:
    """One block alone, randomly initialised (the same way every time), as the LM runs it: inputs `x` (and
    `mem` for attention), outputs `y` (and `new_mem`). Used to profile a block's latency.

    `fp32_twin` is this block's fp32 graph, exported before with the same options: an int8 block is that
    graph quantized, so it is copied and quantized instead of traced again (a trace takes seconds)."""
    if spec.kind == "skip":
        raise ExportError("a skip block is the identity; there is nothing to export")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        original = Block(arch, spec).eval()
    mem_len = arch.mem_len if mem_len is None else mem_len
    context = max_context(arch, mem_len, min_context)
    block = _lowered(original, lowering, context)
    if fp32_twin is not None:
        path = Path(path)
        with replacing(path) as tmp:
            shutil.copyfile(fp32_twin, tmp)
            quantize_int8(tmp, [w.detach().numpy() for w in int8_weights(original)])
        return path
    batch, seq, mem = _axes(original, context)
    x = torch.randn(_B, _T, arch.d_model)
    if spec.kind == "attn":
        return _export(_AttnGraph(block, mem_len), (x, torch.randn(_B, _M, arch.d_model)),
                       ({0: batch, 1: seq}, {0: batch, 1: mem}), ["x", "mem"], ["y", "new_mem"], path, original,
                       context)
    return _export(block, (x,), ({0: batch, 1: seq},), ["x"], ["y"], path, original, context)


def export_fixed(arch: Architecture, path: str | os.PathLike) -> Path:
    """Embedding, final norm and head of `arch` (the head in `arch.head_precision`): input `tokens`, output
    `logits`."""
    model = LM(arch.with_blocks([BlockSpec.skip()])).eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    return _export(_FixedGraph(_lowered(model, "ops", 0)), (torch.randint(0, arch.vocab_size, (_B, _T)),),
                   ({0: batch, 1: seq},), ["tokens"], ["logits"], path, model, 0)


def check_weights_present(onnx_path: str | os.PathLike, model: nn.Module) -> None:
    """Every Linear weight of `model` must be in the graph (as stored or transposed): an expert that the
    sample input never reached must not have been traced away. (Element counts would not do: the
    exporter merges identical initializers such as freshly-initialised norm weights.) The relative
    position projection is the exception: the graph holds its product, the frozen position keys."""
    stored = set()
    for tensor in onnx.load(str(onnx_path)).graph.initializer:
        array = numpy_helper.to_array(tensor)
        for matrix in (array,) if array.ndim == 2 else array if array.ndim == 3 else ():  # 3-D: stacked experts
            # ort-moe's SwiGLU experts interleave their gate and up rows
            for part in (matrix, *((matrix[0::2], matrix[1::2]) if array.ndim == 3 else ())):
                stored.add(digest(part))
                stored.add(digest(part.T))
    frozen = {id(attn.r) for attn in _relative(model) if attn.r_table is None}
    missing = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in frozen
               and digest(m.weight.detach().numpy()) not in stored]
    if missing:
        raise ExportError(f"the exported graph lacks {len(missing)} weight matrices ({', '.join(missing[:3])}); "
                          "some layer was traced away — this is a planer bug, please report it")


