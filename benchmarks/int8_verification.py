"""Does the build's int8 check tell a right quantizer from a wrong one? A trained network with every block in int8
is exported (ONNX Runtime's own quantization, as a build does) and compared, span by span, with PyTorch's simulation
of it (planer.export.reference.quantized_agreement), once with planer.nn.quant as it is and once with each broken
quantizer of issue 39's mutation audit put into the simulation. A span's figure is |engine - simulation| /
|engine - fp32| of its output, both fed the engine's input of the span; the build refuses a median above the check's
tolerance.

    python benchmarks/int8_verification.py runs/smollm2 --data sample

With `--smoke` it uses a random micro network and a few hundred tokens (seconds; for the test suite).
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import planer.nn.quant as quant
from common import record, smoke_option, tiny_arch
from planer.checkpoint import load_model
from planer.export import export_lm
from planer.export.reference import _span_ratios, _windows, quantized_agreement
from planer.nn import LM
from planer.nn.model import in_precision
from planer.runtime import load_engine
from planer.train.trainer import run_corpus

# the audit's mutations of planer/nn/quant.py: (text, replacement)
BROKEN = {"weight scale x1.5": ("keepdim=True) / WEIGHT_QMAX", "keepdim=True) / WEIGHT_QMAX * 1.5"),
          "zero point off by one": ("/ scale).clamp(0, ACTIVATION_QMAX)", "/ scale).clamp(0, ACTIVATION_QMAX) + 1"),
          "full int8 range (±127)": ("WEIGHT_QMAX = 64", "WEIGHT_QMAX = 127")}
SIMULATED = ("int8_weight", "uint8_activation")


@contextmanager
def simulating(edit: tuple[str, str] | None) -> Iterator[None]:
    """PyTorch's int8 simulation with `edit` applied to planer.nn.quant's source (none: as it is)."""
    kept = {name: getattr(quant, name) for name in SIMULATED}
    if edit is not None:
        source = inspect.getsource(quant)
        if source.count(edit[0]) != 1:
            raise SystemExit(f"planer/nn/quant.py no longer holds {edit[0]!r} once: update BROKEN")
        mutant: dict = {"__name__": "mutant"}
        exec(compile(source.replace(*edit), "mutant", "exec"), mutant)
        for name in SIMULATED:
            setattr(quant, name, mutant[name])
    try:
        yield
    finally:
        for name, fn in kept.items():
            setattr(quant, name, fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", type=Path)
    p.add_argument("--data", help="the data to read validation tokens of (default: the run's; an imported model's "
                   "through its tokenizer, e.g. sample)")
    p.add_argument("--threads", type=int, default=2)
    smoke_option(p)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.smoke:
        torch.manual_seed(0)
        model, valid = LM(tiny_arch()).eval(), np.frombuffer(b"the quick brown fox " * 20, np.uint8)
    else:
        if a.run is None:
            raise SystemExit("give a run directory (or --smoke)")
        model = load_model(a.run).eval()
        valid = run_corpus(a.run, a.data, model.arch.vocab_size).valid
    int8, fp32 = in_precision(model, "int8"), model
    keep = model.arch.mem_len
    rows, data = [], {}
    with tempfile.TemporaryDirectory(prefix="planer-int8-check-") as tmp:
        engine = load_engine("ort", str(export_lm(int8, Path(tmp) / "int8.onnx")), threads=a.threads)
        for name, edit in {"planer.nn.quant (as it is)": None, **BROKEN}.items():
            with simulating(edit):
                spans = np.array([r for w in _windows(valid, 4, min(16, keep))
                                  for r in _span_ratios(int8, fp32, engine, w, keep)])
            data[name] = spans.tolist()
            rows.append(f"| {name} | {np.median(spans):.2g} | {(spans > 1e-3).sum()} / {spans.size} | "
                        f"{spans.min():.2g} | {spans.max():.2g} |")
        quantized_agreement(int8, engine, valid)  # as a build runs it: raises on a graph it refuses
    table = "\n".join(["| simulation | median | spans above 1e-3 | smallest | largest |", "|---|---|---|---|---|",
                       *rows])
    record("int8_verification", {"spans": data}, f"{len(model.arch.blocks)} blocks, every one in int8; 4 windows "
           f"of {min(16, keep)} validation tokens.\n\n{table}", smoke=a.smoke)


if __name__ == "__main__":
    main()
