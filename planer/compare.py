"""The comparisons that show whether the search is worth it (`planer build --compare`).

The simpler ways to speed up the baseline, each with the precisions the result may use:
  fastest-precision  the baseline itself, each block in the precision the engine runs it fastest (int8
                     for ONNX Runtime where that pays): what a user tries first, at whatever latency it has;
  drop-attention     at the result's latency, the baseline with attention blocks removed, evenly spread (then
                     its other blocks, if that is not enough), until it is predicted to be as fast as the result;
  narrow             at the result's latency, every block narrowed by one factor (heads and FFN width), the
                     widest that is as fast;
  dense-only         the same search and distillation with the MoE candidates removed from the space.
drop-attention and narrow put each block in its fastest precision first. All four, like the result, start
from the baseline's weights and are distilled from it for as many steps as the search and the distillation
together (int8 blocks training as the engine computes them); the last goes through exactly the result's
pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planer.arch import Architecture, BlockSpec
from planer.deployment import Deployment
from planer.latency import LatencyTable
from planer.latency.profile import profile
from planer.nn import LM
from planer.search.supernet import inherit
from planer.space import SearchSpace


@dataclass
class Comparison:
    name: str
    model: LM  # initial weights, before its training
    positions: tuple[BlockSpec, ...]  # its block per baseline position, skips included


def _evenly(indices: list[int], count: int) -> list[int]:
    """`count` of `indices`, spread evenly (the middle of each of `count` equal slices)."""
    n = len(indices)
    return [indices[int((i + 0.5) * n / count)] for i in range(count)]


def drop_attention(arch: Architecture, table: LatencyTable, budget_ms: float) -> list[BlockSpec]:
    """The baseline's blocks with the fewest removals (attention first; a linear block, having no memory, counts
    among the others) that fit `budget_ms`; skips mark them."""
    blocks = list(arch.blocks)
    attn = [i for i, b in enumerate(blocks) if b.kind == "attn"]
    rest = [i for i, b in enumerate(blocks) if b.kind not in ("attn", "skip")]
    orders = [(len(attn) - keep, 0) for keep in range(len(attn), 0, -1)]  # (attention, other) blocks to drop
    orders += [(len(attn) - 1, n) for n in range(1, len(rest) + 1)]
    for drop_attn, drop_rest in orders:
        dropped = set(attn) - set(_evenly(attn, len(attn) - drop_attn)) if drop_attn else set()
        dropped |= set(rest) - set(_evenly(rest, len(rest) - drop_rest)) if drop_rest else set()
        kept = [BlockSpec.skip() if i in dropped else b for i, b in enumerate(blocks)]
        if table.predict(arch.with_blocks([b for b in kept if b.kind != "skip"])) <= budget_ms:
            return kept
    return kept  # one attention block alone: as far as dropping goes


def _narrowed(spec: BlockSpec, factor: float) -> BlockSpec:
    if spec.kind == "attn":
        heads = max(1, round(spec.heads * factor))
        kv = max(1, round(spec.kv_heads * factor)) if spec.kv_heads else 0
        while kv and heads % kv:
            kv -= 1
        return BlockSpec.attn(heads, spec.head_dim, kv)
    if spec.kind == "ffn":
        return BlockSpec.ffn(max(8, round(spec.d_inner * factor / 8) * 8))
    return spec


def fastest_precision(arch: Architecture, blocks: list[BlockSpec], table: LatencyTable, dep: Deployment,
                      show_progress: bool = True) -> tuple[list[BlockSpec], LatencyTable]:
    """Each of `blocks` in the precision the engine runs it fastest, and the table extended by the variants it
    lacked (profiled in the engine now)."""
    variants = [[b.in_precision(p) for p in dep.precisions] for b in blocks]
    missing = list(dict.fromkeys(v for vs in variants for v in vs if v.kind != "skip" and not table.has(v.label())))
    if missing:
        table = profile(arch, missing, dep, table=table, show_progress=show_progress)
    return [min(vs, key=table.block_ms) for vs in variants], table


def narrow(arch: Architecture, table: LatencyTable, budget_ms: float, dep: Deployment,
           show_progress: bool = True) -> tuple[list[BlockSpec], LatencyTable]:
    """The baseline's blocks narrowed by the largest factor in steps of 1/16 that fits `budget_ms` (1/16 if none
    does), each in its fastest precision, and the table extended by the blocks it lacked (profiled in the engine
    now). Narrower is faster, so the factor is bisected: four profiled factors instead of up to fifteen (each
    new width is a block to export and time, in every precision)."""
    fitting, lo, hi = None, 1, 15
    while lo <= hi:
        step = (lo + hi) // 2
        blocks, table = fastest_precision(arch, [_narrowed(b, step / 16) for b in arch.blocks], table, dep,
                                          show_progress)
        if table.predict(arch.with_blocks(blocks)) <= budget_ms:
            fitting, lo = blocks, step + 1
        else:
            hi = step - 1
    return fitting or blocks, table  # none fits: the last tried is 1/16's


def fixed_comparisons(baseline: LM, table: LatencyTable, budget_ms: float, dep: Deployment,
                      show_progress: bool = True) -> tuple[list[Comparison], LatencyTable]:
    """fastest-precision, and drop-attention and narrow at `budget_ms` (predicted), with the baseline's
    weights. Without a precision other than fp32 the first is the baseline itself and is left out."""
    arch = baseline.arch
    cheap, table = fastest_precision(arch, list(arch.blocks), table, dep, show_progress)
    dropped = drop_attention(arch.with_blocks(cheap), table, budget_ms)
    narrowed, table = narrow(arch, table, budget_ms, dep, show_progress)
    quantized = [_compared("fastest-precision", baseline, cheap)] if cheap != list(arch.blocks) else []
    return quantized + [_compared("drop-attention", baseline, dropped), _compared("narrow", baseline, narrowed)], table


def _compared(name: str, baseline: LM, positions: list[BlockSpec]) -> Comparison:
    return Comparison(name, inherit(baseline, positions), tuple(positions))


def dense_space(space: SearchSpace) -> SearchSpace:
    """The space without its MoE candidates."""
    return replace(space, candidates=tuple(c for c in space.candidates if c.kind != "moe")).validate()
