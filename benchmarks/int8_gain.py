"""What int8 buys a network in ONNX Runtime: the same trained network exported in fp32 and with a part of it in
int8 (planer's quantization: planer.export.quantize) -- every block, the output head, or both (`--part`) -- timed
interleaved in several separate runs, and both graphs' losses over the validation split (its first `--tokens`)
run in the engine (planer.runtime.evaluate_engine).

    python benchmarks/int8_gain.py runs/tiny [--runs 3] [--threads 2] [--batch 1]
    python benchmarks/int8_gain.py runs/smollm2 --data sample --part head --tokens 32768

With `--smoke` it uses a random micro network and a few hundred tokens (seconds; for the test suite).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common import record, smoke_option, tiny_arch
from planer.checkpoint import load_model
from planer.deployment import Deployment
from planer.export import export_lm
from planer.export.reference import TorchEngine
from planer.latency.profile import measure
from planer.nn import LM
from planer.nn.model import in_precision
from planer.runtime import evaluate_engine, load_engine
from planer.runtime.feeds import example_feeds
from planer.train.trainer import run_corpus


PARTS = {"blocks": "every block (the head in fp32)", "head": "the output head alone", "all": "every block and the head"}


def in_part(model: LM, part: str) -> LM:
    """`model` with `part` (PARTS) computing in int8, the rest in fp32."""
    int8 = in_precision(model, "int8")
    arch = {"blocks": replace(int8.arch, head_precision="fp32"), "all": int8.arch,
            "head": replace(model.arch, head_precision="int8")}[part]
    other = LM(arch).eval()
    other.load_state_dict(model.state_dict())
    return other


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", type=Path)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--part", choices=PARTS, default="blocks", help="what goes int8: every block, the head, or all")
    p.add_argument("--tokens", type=int, help="validation tokens the losses are measured on (default: all)")
    p.add_argument("--data", help="corpus (default: the run's; an imported model needs one, e.g. sample)")
    smoke_option(p)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.smoke:
        a.runs = 1
        model, valid, unit = LM(tiny_arch()).eval(), np.frombuffer(b"the quick brown fox " * 20, np.uint8), "byte"
    else:
        if a.run is None:
            raise SystemExit("give a run directory (or --smoke)")
        model = load_model(a.run).eval()
        corpus = run_corpus(a.run, a.data, model.arch.vocab_size)
        valid, unit = np.asarray(corpus.valid)[:a.tokens], corpus.unit
    arch = model.arch
    dep = Deployment(batch=a.batch, tgt_len=arch.tgt_len, mem_len=arch.mem_len, threads=a.threads,
                     min_seconds=0.05 if a.smoke else a.min_seconds, min_iters=5 if a.smoke else 50)
    with tempfile.TemporaryDirectory(prefix="planer-int8-") as tmp:
        int8 = in_part(model, a.part)
        paths = [str(export_lm(m, Path(tmp) / f"{name}.onnx", **dep.export_options()))
                 for name, m in (("fp32", model), ("int8", int8))]
        runs = [measure([(paths[0], arch), (paths[1], arch)], dep) for _ in range(a.runs)]
        ratios = [q.p50 / f.p50 for f, q in runs]
        # the int8 graph against PyTorch's simulation of it, and against the fp32 network
        feeds = example_feeds(arch, 1, arch.tgt_len, arch.mem_len)
        engine8 = load_engine("ort", paths[1], threads=a.threads).run(feeds)["logits"]
        sim = TorchEngine(int8).run(feeds)["logits"]
        plain = TorchEngine(model).run(feeds)["logits"]
        sim_gap, fp32_gap = float(np.abs(engine8 - sim).max()), float(np.abs(engine8 - plain).max())
        losses = [evaluate_engine(load_engine("ort", path, threads=a.threads), valid, unit, d_model=arch.d_model,
                                  tgt_len=arch.tgt_len, mem_len=arch.mem_len)["loss"] for path in paths]
    lines = [f"- run {i}: fp32 {f}; int8 {q}; int8/fp32 **{q.p50 / f.p50:.3f}**" for i, (f, q) in enumerate(runs)]
    lines += [f"- int8 part: {PARTS[a.part]}",
              f"- int8/fp32 latency: median **{statistics.median(ratios):.3f}** over {len(runs)} interleaved runs "
              f"(B{a.batch} T{arch.tgt_len} M{arch.mem_len}, {a.threads} threads)",
              f"- int8 graph in ONNX Runtime vs PyTorch's simulation of it (planer.nn.quant): max |logits diff| "
              f"{sim_gap:.2e}; vs the fp32 network {fp32_gap:.2e}",
              f"- validation loss in the engine, {'whole split' if a.tokens is None else f'first {len(valid)} tokens'}: fp32 {losses[0]:.4f}, int8 {losses[1]:.4f} "
              f"(**{losses[1] / losses[0]:.5f}x**)"]
    record("int8_gain", {"run": str(a.run), "part": a.part, "threads": a.threads, "batch": a.batch, "ratios": ratios,
                         "runs": [[f.to_dict(), q.to_dict()] for f, q in runs], "loss_fp32": losses[0],
                         "loss_int8": losses[1], "int8_vs_simulation": sim_gap, "int8_vs_fp32": fp32_gap},
           f"The same trained network in fp32 and with {PARTS[a.part]} in int8:\n\n" + "\n".join(lines), smoke=a.smoke)


if __name__ == "__main__":
    main()
