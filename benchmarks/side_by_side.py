"""A build and its reference (by default its baseline) in the same engine, timed interleaved, at several
batch sizes: p50/p90/p99, spread, tokens/s and the latency ratio.

    python benchmarks/side_by_side.py builds/tiny-x2 [--reference runs/tiny] [--batches 1,8] [--threads 2]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from common import given_or_tiny, record, smoke_option
from planer.bench import default_deployment, measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build", type=Path, nargs="?")
    p.add_argument("--reference", type=Path, help="model directory to time beside the build [BUILD/baseline]")
    p.add_argument("--engine", default="ort")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-seconds", type=float, default=5.0)
    smoke_option(p)
    a = p.parse_args()
    a.build = given_or_tiny(p, a.build, a.smoke, build=True)
    if a.smoke:  # the tiny build has no baseline/: timed against itself
        a.reference, a.batches, a.min_seconds = a.reference or a.build, "1", 0.0
    dep = replace(default_deployment(a.build), engine=a.engine, threads=a.threads, min_seconds=a.min_seconds)
    rows = ["| batch | model | p50 ms | p90 ms | p99 ms | spread | tokens/s | build / reference |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    data = []
    for batch in map(int, a.batches.split(",")):
        m = measure(a.build, a.reference, dep=replace(dep, batch=batch))
        data.append(m.to_dict())
        for name, s in (("build", m.build), ("reference", m.reference)):
            ratio = f"{m.ratio:.3f}" if name == "build" else ""
            rows.append(f"| {batch} | {name} | {s.p50:.3f} | {s.p90:.3f} | {s.p99:.3f} | {s.spread:.2f} | "
                        f"{m.tokens_per_s(s):,.0f} | {ratio} |")
    reference = a.reference or a.build / "baseline"
    text = (f"Build `{a.build}` against `{reference}`, {a.engine}, {a.threads} threads, "
            f"{dep.tgt_len} tokens per call with {dep.mem_len} of memory; each batch size is one "
            f"interleaved run.\n\n" + "\n".join(rows))
    record("side_by_side", {"build": str(a.build), "reference": str(reference), "runs": data}, text, smoke=a.smoke)


if __name__ == "__main__":
    main()
