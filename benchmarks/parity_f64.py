"""Where an exported network's ONNX Runtime outputs differ from PyTorch, and whether that is rounding.

Each output of a build's model.onnx is compared with PyTorch in float32 and with PyTorch in float64
on the same random inputs. If ONNX Runtime is as far from float64 as PyTorch's own float32 is, the
difference is float32 summed in another order, not a wrong graph.

    python benchmarks/parity_f64.py builds/smollm2-x1.5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import given_or_tiny, record, smoke_option

from planer.checkpoint import load_model
from planer.export.reference import TorchEngine
from planer.runtime import load_engine
from planer.runtime.feeds import example_feeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build", type=Path, nargs="?", help="a build directory (model.onnx, arch.json, model.safetensors)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tgt-len", type=int, default=128)
    p.add_argument("--mem-len", type=int, default=128)
    smoke_option(p)
    args = p.parse_args()
    if args.smoke:
        args.tgt_len, args.mem_len = 16, 16
    args.build = given_or_tiny(p, args.build, args.smoke, build=True)

    model = load_model(args.build)
    feeds = example_feeds(model.arch, args.batch, args.tgt_len, args.mem_len)
    ort = load_engine("ort", f"{args.build}/model.onnx", threads=2).run(feeds)
    f32 = TorchEngine(model).run(feeds)
    f64 = TorchEngine(model.double()).run({k: v.astype(np.float64) if v.dtype == np.float32 else v
                                          for k, v in feeds.items()})
    rows = [{"output": n, "scale": float(np.abs(f64[n]).max()),
             "ort_vs_f32": float(np.abs(ort[n] - f32[n]).max()), "ort_vs_f64": float(np.abs(ort[n] - f64[n]).max()),
             "f32_vs_f64": float(np.abs(f32[n] - f64[n]).max())} for n in f32]
    lines = [f"`{args.build}`: {len(model.arch.blocks)} blocks; B{args.batch} T{args.tgt_len} memory {args.mem_len}, "
             "random inputs; max abs differences per output.", "",
             "| output | max abs value | ORT vs torch fp32 | ORT vs torch fp64 | torch fp32 vs fp64 |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['output']} | {r['scale']:.1f} | {r['ort_vs_f32']:.2e} | {r['ort_vs_f64']:.2e} | "
              f"{r['f32_vs_f64']:.2e} |" for r in rows]
    record("parity_f64", {"build": str(args.build), "rows": rows}, "\n".join(lines), smoke=args.smoke)


if __name__ == "__main__":
    main()
