"""Split experts in the engine, fp32 and int8: what a split block costs beside the dense FFN it came from (issue 40).

    python benchmarks/split_latency.py                        # the FFN shapes of tiny, the deep preset and SmolLM2
    python benchmarks/split_latency.py --shapes smollm2 --batches 1

Latency only, so no trained network is needed: every block is exported alone with random weights and a random
router (near-uniform routing; a trained router's imbalance costs more) and profiled the way a build profiles its
blocks (planer.latency.profile, the deployment's `ops` lowering), in fp32 and in int8 (ONNX Runtime's dynamic
quantization of every product, the experts' included). Each figure is divided by the dense FFN of the same
precision timed in the same profile, and by the fp32 dense FFN; narrowed FFNs of 1/4, 1/2 and 3/4 of the units
are timed beside them for scale.
"""

from __future__ import annotations

import argparse

from common import record, smoke_option

from planer.arch import Architecture, BlockSpec
from planer.deployment import Deployment
from planer.latency.profile import profile
from planer.search.split import split_spec

# name -> (d_model, FFN width, activation, bias, norm)
SHAPES = {"tiny": (192, 768, "gelu", True, "layernorm"), "deep": (128, 512, "gelu", True, "layernorm"),
          "smollm2": (576, 1536, "swiglu", False, "rmsnorm")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--batches", default="1,8")
    smoke_option(p)
    a = p.parse_args()
    shapes = {"smoke": (32, 64, "gelu", True, "layernorm")} if a.smoke else {s: SHAPES[s] for s in a.shapes.split(",")}
    batches = [1] if a.smoke else [int(b) for b in a.batches.split(",")]
    rows, lines = [], []
    segment = 16 if a.smoke else 128
    for name, (d_model, width, activation, bias, norm) in shapes.items():
        arch = Architecture(d_model=d_model, vocab_size=256, blocks=(BlockSpec.ffn(width),), activation=activation,
                            bias=bias, norm=norm, tgt_len=segment, mem_len=segment)
        splits = [split_spec(width, e, k, shared) for shared in (0, width // 4) for e in (2, 4, 8) for k in (1, 2)
                  if k < e and (width - shared) % e == 0]
        narrowed = [BlockSpec.ffn(width * i // 4) for i in (1, 2, 3)]
        blocks = [BlockSpec.ffn(width), *splits, *narrowed]
        if a.smoke:
            blocks = blocks[:2]
        for b in batches:
            dep = Deployment(batch=b, tgt_len=arch.tgt_len, mem_len=arch.mem_len, lowering="ops",
                             precisions=("fp32", "int8"), min_seconds=0.0 if a.smoke else 1.0)
            table = profile(arch, [s.in_precision(p) for s in blocks for p in ("fp32", "int8")], dep,
                            show_progress=not a.smoke)
            dense = {p: table.block_ms(BlockSpec.ffn(width).in_precision(p)) for p in ("fp32", "int8")}
            for spec in blocks[1:]:
                fp32, int8 = table.block_ms(spec), table.block_ms(spec.in_precision("int8"))
                rows.append({"shape": name, "batch": b, "block": spec.label(), "fp32_ms": fp32, "int8_ms": int8,
                             "dense_fp32_ms": dense["fp32"], "dense_int8_ms": dense["int8"]})
                lines.append(f"| {name} | B{b} | {spec.label()} | {fp32 / dense['fp32']:.2f} | "
                             f"{int8 / dense['int8']:.2f} | {int8 / dense['fp32']:.2f} |")
            lines.append(f"| {name} | B{b} | dense ffn{width}: {dense['fp32']:.3f} ms fp32, {dense['int8']:.3f} "
                         f"ms int8 | 1 | 1 | {dense['int8'] / dense['fp32']:.2f} |")
    table_md = ("| FFN shape | batch | block | fp32 ÷ dense fp32 | int8 ÷ dense int8 | int8 ÷ dense fp32 |\n"
                "|---|---|---|---|---|---|\n" + "\n".join(lines))
    record("split_latency", {"rows": rows}, f"ONNX Runtime CPU, 2 threads, `ops` lowering, segment {segment}, memory "
           f"{segment}; random weights and router; p50 of each block's profile.\n\n" + table_md, smoke=a.smoke)


if __name__ == "__main__":
    main()
