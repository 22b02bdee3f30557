"""MoE dispatch efficiency in the engine: one MoE layer vs k x one dense FFN of the expert's width.

A ratio near 1 means the engine pays only for the experts a token was routed
to; "run every expert and mask" would grow with E. Each MoE layer is timed
interleaved with the dense FFN in the same run.

    python benchmarks/dispatch_efficiency.py [--d-model 256 --width 1024 --activation gelu_tanh --threads 2]
    python benchmarks/dispatch_efficiency.py --engine ort-cuda     # ONNX Runtime's CUDA provider

gelu_tanh is the default because it is the GELU both lowerings can run exactly.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common import record, smoke_option, smoke_shapes
from planer.arch import Architecture, BlockSpec
from planer.export import export_block
from planer.runtime import load_engine, time_engines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--width", type=int, default=1024, help="expert (and dense FFN) width")
    p.add_argument("--activation", default="gelu_tanh", help="gelu_tanh, relu or silu (ort-moe runs these)")
    p.add_argument("--lowerings", default="ops,ort-moe", help="ONNX Runtime's lowerings (`trt` runs only in "
                   "TensorRT: benchmarks/trt_dispatch.py)")
    p.add_argument("--tgt-len", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--experts", default="2,4,8,16")
    p.add_argument("--engine", choices=("ort", "ort-cuda"), default="ort")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-seconds", type=float, default=2.0)
    smoke_option(p)
    a = p.parse_args()
    if a.smoke:
        smoke_shapes(a)
        a.min_seconds = 0.0
    arch = Architecture(d_model=a.d_model, vocab_size=256, blocks=(BlockSpec.ffn(a.width),), activation=a.activation)
    rng = np.random.default_rng(0)
    rows, data = [], []
    with tempfile.TemporaryDirectory() as tmp:
        dense = load_engine(a.engine, str(export_block(arch, BlockSpec.ffn(a.width), Path(tmp) / "ffn.onnx")),
                            threads=a.threads)
        for lowering in a.lowerings.split(","):
            for e in map(int, a.experts.split(",")):
                for k in (1, 2):
                    spec = BlockSpec.moe(e, k, a.width)
                    moe = load_engine(a.engine, str(export_block(arch, spec, Path(tmp) / "moe.onnx", lowering=lowering)),
                                      threads=a.threads)
                    for b in map(int, a.batches.split(",")):
                        feeds = {"x": rng.standard_normal((b, a.tgt_len, a.d_model), dtype=np.float32)}
                        f, m = time_engines([(dense, feeds), (moe, feeds)], min_seconds=a.min_seconds)
                        ratio = m.p50 / (k * f.p50)
                        data.append({"lowering": lowering, "experts": e, "top_k": k, "batch": b,
                                     "dense": f.to_dict(), "moe": m.to_dict(), "ratio": ratio})
                        rows.append(f"| {lowering} | {e} | {k} | B{b} T{a.tgt_len} | {f.p50:.3f} ({f.spread:.2f}) | "
                                    f"{m.p50:.3f} ({m.spread:.2f}) | **{ratio:.2f}** |")
    table = ("| lowering | E | k | shape | dense FFN p50 ms (p90/p50) | MoE p50 ms (p90/p50) | MoE / (k × FFN) |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    device = "CUDA" if a.engine == "ort-cuda" else f"CPU, {a.threads} threads, no spinning"
    record("dispatch_efficiency", {"engine": a.engine, "d_model": a.d_model, "width": a.width,
                                   "activation": a.activation, "threads": a.threads, "rows": data},
           f"ONNX Runtime {device}; d_model {a.d_model}, expert width {a.width}, "
           f"activation {a.activation}; "
           f"random router (near-uniform routing).\n\n{table}", smoke=a.smoke)


if __name__ == "__main__":
    main()
