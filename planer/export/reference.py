"""PyTorch eager behind the engine interface: the reference every engine is compared with."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from planer.errors import PlanerError
from planer.nn import LM
from planer.nn.model import embed_tokens, head_logits, in_precision, int8_weights
from planer.runtime import Engine
from planer.runtime.feeds import example_feeds, input_names, output_names


class TorchEngine:
    """An LM run eagerly, with the same named inputs and outputs as its ONNX export."""

    name = "torch"

    def __init__(self, model: LM, *, threads: int | None = None, mem_len: int | None = None):
        self.model = model.eval()
        self.threads = threads
        self.mem_len = mem_len
        self.input_names = input_names(model.arch)
        self.output_names = output_names(model.arch)

    @torch.no_grad()
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.threads:
            torch.set_num_threads(self.threads)
        tokens = torch.from_numpy(feeds["tokens"])
        mems = [torch.from_numpy(feeds[n]) for n in self.input_names[1:]]
        out = self.model(tokens, mems, self.mem_len)
        return dict(zip(self.output_names, [out.logits.numpy(), *(m.numpy() for m in out.mems)]))

    def provenance(self) -> dict[str, Any]:
        return {"engine": self.name, "torch": torch.__version__, "threads": self.threads or torch.get_num_threads(),
                "machine": platform.machine()}


def parity(model: LM, engine: Engine, *, batch: int, tgt_len: int, mem_len: int, keep_len: int | None = None) -> float:
    """Max |engine - PyTorch| over every output on random inputs of memory length `mem_len`, for a graph
    that keeps `keep_len` (default: the architecture's) of memory; refuses a graph that disagrees.

    The refusal is relative to each output's scale: deep networks carry hidden states in the hundreds
    (SmolLM2's last memories reach ~330), where float32 summed in another order differs by ~1e-4 of that,
    while a wrong graph is off by the order of the values themselves: 1e-3 of the scale. A network with int8
    blocks is checked by `verify` instead."""
    feeds = example_feeds(model.arch, batch, tgt_len, mem_len)
    got, want = engine.run(feeds), TorchEngine(model, mem_len=keep_len).run(feeds)
    diffs = {n: float(np.abs(got[n] - want[n]).max()) for n in want}
    for n, diff in diffs.items():
        scale = max(1.0, float(np.abs(want[n]).max()))
        if diff > 1e-3 * scale:
            raise PlanerError(f"the exported graph's {n} disagrees with PyTorch by {diff:.2e} (values up to "
                              f"{scale:.3g}); please report this")
    return max(diffs.values())


def quantized_agreement(model: LM, engine: Engine, data: np.ndarray, *, keep_len: int | None = None,
                        windows: int = 4, length: int = 16, tolerance: float = 0.05) -> float:
    """How far the int8 graph in `engine` is from PyTorch's simulation of it (planer.nn.quant), as a fraction of
    how far it is from fp32, block by block; refuses a graph whose median over spans exceeds `tolerance`.

    The graph returns the input of every attention block (its memory), so each span of blocks from one to the next
    (the last one ending in the logits) is run in PyTorch from the engine's own input of that span, in int8 and in
    fp32, and compared with the engine's output of it: rounding does not compound across spans. The tokens are
    the first `length` of `windows` streams of `data` (validation tokens), each window run alone (a graph that
    keeps `keep_len` < `length` positions of memory is compared on that many; one that keeps none, as one span).
    Where an input lands a float's width from a rounding boundary, engine and simulation round it a step apart:
    SmolLM2 with all 60 blocks in int8 disagreed so in 14 of its 120 spans, by up to 0.1, and agreed to 4e-6 in
    the median. A quantizer that rounds another way disagrees in every span: medians 0.97 with the weight scale
    x1.5, 0.38 with the zero point off by one, 0.74 with the full int8 range (benchmarks/int8_verification.py,
    benchmarks/RESULTS.md). Neither the loss nor the logits can tell: those quantizers moved the loss of the tests'
    networks by 6e-8 to 6e-6, and on a deep network the steps compound through the blocks, so the logits of the
    whole network run by each side do not tell a correct simulation from a broken one either."""
    keep = model.arch.mem_len if keep_len is None else keep_len
    length = min(length, keep) if keep else length
    fp32 = in_precision(model, "fp32")
    ratios = [r for tokens in _windows(data, windows, length) for r in _span_ratios(model, fp32, engine, tokens, keep)]
    median = float(np.median(ratios))
    if median > tolerance:
        raise PlanerError(f"the exported int8 graph disagrees with PyTorch's simulation of it: block by block, on "
                          f"{windows} windows of {length} validation tokens, it is {median:.2f} as far from the "
                          f"simulation as from fp32 (median of {len(ratios)} spans; at most {tolerance:g} expected); "
                          "please report this")
    return median


def _windows(data: np.ndarray, count: int, length: int) -> list[np.ndarray]:
    """The first `length` tokens of each of `count` streams of `data`, as the evaluation reads them, batch 1 each:
    a quantized input's range is the whole tensor's, so a batch would share one window's rounding with another."""
    stream = len(data) // count
    if stream < length:
        raise ValueError(f"{len(data)} tokens are too few for {count} windows of {length}")
    return [np.asarray(data[i * stream:i * stream + length], dtype=np.int64)[None] for i in range(count)]


@torch.no_grad()
def _span_ratios(model: LM, fp32: LM, engine: Engine, tokens: np.ndarray, keep: int) -> list[float]:
    """|engine - int8 simulation| / |engine - fp32| of each span with int8 blocks (or ending in an int8 head), fed
    the engine's input of it."""
    arch = model.arch
    names = input_names(arch)[1:]
    out = engine.run({"tokens": tokens} | {n: np.zeros((1, 0, arch.d_model), np.float32) for n in names})
    hidden = [torch.from_numpy(out[f"new_{n}"]) for n in names] if keep else []
    bounds = [0, *(arch.attn_positions if keep else []), len(arch.blocks)]
    starts = [embed_tokens(model, torch.from_numpy(tokens), 0), *hidden]
    ends = [*hidden, torch.from_numpy(out["logits"])]
    ratios = []
    for k, (lo, hi, x, want) in enumerate(zip(bounds, bounds[1:], starts, ends)):
        last = k == len(ends) - 1
        if int8_weights(model.blocks[lo:hi]) or last and model.arch.head_precision == "int8":
            simulated, plain = (_span(m, lo, hi, x, last) for m in (model, fp32))
            ratios.append(float((simulated - want).norm() / (plain - want).norm()))
    return ratios


def _span(model: LM, lo: int, hi: int, x: torch.Tensor, last: bool) -> torch.Tensor:
    """Blocks lo..hi-1 of `model` from their input `x` (the first segment: no memory), then the head if `last`."""
    for block in model.blocks[lo:hi]:
        x = block(x)
    return head_logits(model, model.norm(x)) if last else x


def verify(model: LM, engine: Engine, *, batch: int, tgt_len: int, mem_len: int, keep_len: int | None = None,
           twin: Engine | None = None, data: np.ndarray | None = None) -> dict[str, float]:
    """What checks the exported graph of `model` (run by `engine`) against PyTorch, as latency.json records it;
    refuses a graph that fails. An fp32 graph: `parity` of its outputs. With int8 blocks: `parity` of the graph of
    its fp32 twin (`twin`, exported with the same options: the structure) and `quantized_agreement` of the int8
    graph, block by block on `data`, validation tokens, since max-difference parity cannot tell a deep int8
    network's rounding from a wrong graph."""
    shape = {"batch": batch, "tgt_len": tgt_len, "mem_len": mem_len, "keep_len": keep_len}
    if not int8_weights(model):
        return {"parity_max_abs_diff": parity(model, engine, **shape)}
    if twin is None or data is None:
        raise ValueError("an int8 graph is verified with its fp32 twin's graph and validation tokens")
    return {"parity_max_abs_diff": parity(in_precision(model, "fp32"), twin, **shape),
            "int8_simulation_disagreement": quantized_agreement(model, engine, data, keep_len=keep_len)}
