"""How well the latency table predicts end-to-end latency, and ONNX Runtime vs PyTorch eager.

Profiles PLANER's default search space around the `tiny` baseline, draws random
architectures from it, exports each and times it end to end in ONNX Runtime
and in PyTorch eager (interleaved, same run), in --passes separate passes over
all networks, so that a network's figure (the median of its passes) does not
hang on the moment it happened to be timed. The first --calibrate networks fit
the table's global calibration; the error is reported on the others.

    python benchmarks/latency_prediction.py [--archs 20 --calibrate 5 --threads 2 --passes 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import record, smoke_option, smoke_space, tiny_arch
from planer.arch import Architecture
from planer.deployment import Deployment
from planer.export import export_lm
from planer.export.reference import TorchEngine
from planer.latency.profile import profile
from planer.nn import LM
from planer.runtime import load_engine, time_engines
from planer.runtime.feeds import example_feeds
from planer.space import SearchSpace
from planer.train.presets import get_preset


def random_arch(base: Architecture, space: SearchSpace, rng: np.random.Generator) -> Architecture:
    while True:
        blocks = [space.candidates[i] for i in rng.integers(0, len(space.candidates), space.positions)]
        if any(b.kind == "attn" for b in blocks):
            return base.with_blocks(blocks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, default=20, help="networks the error is measured on")
    p.add_argument("--calibrate", type=int, default=5, help="further networks used only to calibrate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passes", type=int, default=3, help="timing passes over all networks (median taken)")
    smoke_option(p)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.smoke:  # one network to calibrate, one held out, around the smoke runs' network
        a.archs, a.calibrate, a.passes = 1, 1, 1
        base = tiny_arch()
        space = smoke_space(base)
    else:
        base = get_preset("tiny").architecture(256)
        space = SearchSpace.default(base)
    timing = {"min_seconds": 0.0, "min_iters": 3} if a.smoke else {"min_seconds": 1.0}
    dep = Deployment(batch=a.batch, tgt_len=base.tgt_len, mem_len=base.mem_len, threads=a.threads,
                     precisions=("fp32",) if a.smoke else (), **timing)
    table = profile(base, space.candidates, dep)
    rng = np.random.default_rng(a.seed)
    archs = [base] + [random_arch(base, space, rng) for _ in range(a.archs + a.calibrate)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i, arch in enumerate(archs):
            model = LM(arch).eval()
            path = export_lm(model, Path(tmp) / f"m{i}.onnx")
            feeds = example_feeds(arch, dep.batch, dep.tgt_len, dep.mem_len)
            runs.append([(load_engine("ort", str(path), threads=a.threads), feeds),
                         (TorchEngine(model, threads=a.threads), feeds)])
            print(f"exported {i + 1}/{len(archs)}", flush=True)
        passes = []
        for n in range(a.passes):
            passes.append([time_engines(pair, **timing) for pair in runs])
            print(f"pass {n + 1}/{a.passes} timed", flush=True)
    for i, arch in enumerate(archs):
        ort = min((p[i][0] for p in passes), key=lambda s: abs(s.p50 - np.median([q[i][0].p50 for q in passes])))
        eager = float(np.median([p[i][1].p50 for p in passes]))
        results.append({"arch": " ".join(b.label() for b in arch.blocks), "predicted_raw": table.predict(arch),
                        "ort": ort.to_dict(), "ort_passes": [p[i][0].p50 for p in passes], "torch": eager,
                        "ort_vs_torch": ort.p50 / eager})
    fit = archs[1:1 + a.calibrate]
    table = table.calibrate([(arch, r["ort"]["p50"]) for arch, r in zip(fit, results[1:1 + a.calibrate])])
    held = list(zip(archs[1 + a.calibrate:], results[1 + a.calibrate:]))
    raw = np.array([abs(r["predicted_raw"] / r["ort"]["p50"] - 1) for _, r in held])
    cal = np.array([abs(table.predict(arch) / r["ort"]["p50"] - 1) for arch, r in held])
    ratios = np.array([r["ort_vs_torch"] for r in results])
    spreads = np.array([r["ort"]["spread"] for r in results])
    drift = np.array([max(r["ort_passes"]) / min(r["ort_passes"]) for r in results])
    rows = "\n".join(f"| {r['arch'] if i else 'baseline (tiny)'} | {r['predicted_raw'] * table.scale:.2f} | "
                     f"{r['ort']['p50']:.2f} ({r['ort']['spread']:.2f}) | {r['torch']:.2f} | "
                     f"{r['ort_vs_torch']:.2f} |" for i, r in enumerate(results))
    md = (f"ONNX Runtime CPU ({a.threads} threads, no spinning), B{dep.batch} T{dep.tgt_len} mem {dep.mem_len}; "
          f"default PLANER space around `tiny` ({len(space.candidates)} candidates, {space.positions} positions); "
          f"{a.archs} random networks held out from the {a.calibrate} that fit the calibration "
          f"(scale {table.scale:.3f}).\n\n"
          f"- prediction error, calibrated: median **{np.median(cal) * 100:.1f} %**, p90 **{np.percentile(cal, 90) * 100:.1f} %** "
          f"(uncalibrated sum of blocks: median {np.median(raw) * 100:.1f} %, p90 {np.percentile(raw, 90) * 100:.1f} %)\n"
          f"- ONNX Runtime / PyTorch eager latency: median {np.median(ratios):.2f} "
          f"(range {ratios.min():.2f}–{ratios.max():.2f}) over {len(results)} networks\n"
          f"- noise: end-to-end p90/p50 median {np.median(spreads):.2f}, max {spreads.max():.2f}; a network's p50 "
          f"across the {a.passes} passes, max/min: median {np.median(drift):.2f}, max {drift.max():.2f}; block entries "
          f"p90/p50 median {np.median([e['spread'] for e in table.entries.values()]):.2f}\n\n"
          "| network | predicted ms | ORT p50 ms (p90/p50), median pass | eager p50 ms | ORT / eager |\n"
          "|---|---|---|---|---|\n"
          + rows)
    record("latency_prediction", {"table": table.to_dict(), "results": results,
                                  "calibrated_error": cal.tolist(), "raw_error": raw.tolist()}, md, smoke=a.smoke)


if __name__ == "__main__":
    main()
