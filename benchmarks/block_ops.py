"""Where an exported block's time goes inside ONNX Runtime: its nodes after the engine's graph optimisation, and
their kernel time by operator, from the engine's own profiler (issue 40: why an int8 split block costs more than the
int8 dense FFN it came from).

    python benchmarks/block_ops.py                          # SmolLM2's FFN shape, B1
    python benchmarks/block_ops.py --shape tiny --batch 8

Each block is exported alone, as a build profiles it (random weights and router: near-uniform routing), in fp32
and in int8, and run `--runs` times in a session configured as planer's engine (2 threads, no spinning unless
`--allow-spinning`, every graph optimisation). Times are the profiler's, per run: `run` is its whole-run event
(median), `kernels` the sum of its node events (mean), split into matrix products (MatMul, Gemm and their int8
forms) and everything else.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from common import record, smoke_option
from split_latency import SHAPES

from planer.arch import Architecture, BlockSpec
from planer.export.onnx import export_block
from planer.search.split import split_spec

PRODUCTS = {"MatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "FusedMatMul",
            "FusedGemm"}
WARMUP = 10


def profiled(path: Path, batch: int, arch: Architecture, runs: int, prefix: Path, spinning: bool) -> dict:
    """The profiler's account of `runs` runs of the block graph at `path`, after 10 warm-up runs it drops."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.enable_profiling, options.profile_file_prefix = True, str(prefix)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.default_rng(0).standard_normal((batch, arch.tgt_len, arch.d_model), np.float32)
             for i in session.get_inputs()}
    for _ in range(WARMUP + runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    measured = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][WARMUP:]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
               and e["ts"] >= measured[0]["ts"]]
    whole = [e["dur"] / 1000 for e in measured]
    by_op: Counter = Counter()
    for e in kernels:
        by_op[e["args"]["op_name"]] += e["dur"] / runs / 1000
    return {"run_ms": statistics.median(whole), "nodes": len({e["name"] for e in kernels}),
            "kernel_ms": sum(by_op.values()), "products_ms": sum(v for k, v in by_op.items() if k in PRODUCTS),
            "by_op": dict(by_op.most_common())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--allow-spinning", action="store_true",
                   help="intra-op threads spin between kernels (ONNX Runtime's default; planer's engine does not)")
    smoke_option(p)
    a = p.parse_args()
    d_model, width, activation, bias, norm = (32, 64, "gelu", True, "layernorm") if a.smoke else SHAPES[a.shape]
    segment, runs = (16, 3) if a.smoke else (128, a.runs)
    arch = Architecture(d_model=d_model, vocab_size=256, blocks=(BlockSpec.ffn(width),), activation=activation,
                        bias=bias, norm=norm, tgt_len=segment, mem_len=segment)
    blocks = [BlockSpec.ffn(width), BlockSpec.ffn(width // 2), split_spec(width, 8, 1, 0), split_spec(width, 4, 1, 0),
              split_spec(width, 2, 1, width // 4)]
    rows, lines = [], []
    tmp = Path(tempfile.mkdtemp(prefix="planer-block-ops-"))
    for spec in blocks[:2] if a.smoke else blocks:
        fp32 = export_block(arch, spec, tmp / f"{spec.label()}.onnx")
        for precision in ("fp32", "int8"):
            s = spec.in_precision(precision)
            path = fp32 if precision == "fp32" else export_block(arch, s, tmp / f"{s.label()}.onnx", fp32_twin=fp32)
            r = {"block": s.label(), **profiled(path, a.batch, arch, runs, tmp / f"profile-{s.label()}",
                                                      a.allow_spinning)}
            rows.append(r)
            top = ", ".join(f"{k} {v:.3f}" for k, v in list(r["by_op"].items())[:4])
            lines.append(f"| {s.label()} | {r['nodes']} | {r['run_ms']:.3f} | {r['kernel_ms']:.3f} | "
                         f"{r['products_ms']:.3f} | {r['kernel_ms'] - r['products_ms']:.3f} | {top} |")
    shape = "smoke" if a.smoke else a.shape
    spin = "-spinning" if a.allow_spinning else ""
    record(f"block_ops-{shape}-b{a.batch}{spin}", {"shape": shape, "batch": a.batch, "runs": runs,
                                                   "allow_spinning": a.allow_spinning, "rows": rows},
           f"ONNX Runtime CPU, 2 threads ({'spinning' if a.allow_spinning else 'not spinning'}), `ops` lowering, "
           f"{shape} FFN shape (d {d_model}, width {width}, {activation}), B{a.batch}, segment {segment}; {runs} "
           "profiled runs per block; ms per run.\n\n"
           "| block | nodes run | run (median) | kernels | of which products | other kernels | largest by operator |\n"
           "|---|---|---|---|---|---|---|\n" + "\n".join(lines), smoke=a.smoke)


if __name__ == "__main__":
    main()
