"""ONNX Runtime's fused expert ops against the `ops` lowering and the dense FFN, fp32 and int8 (issue 40).

    python benchmarks/fused_moe.py                       # the FFN shapes of tiny, the deep preset and SmolLM2
    python benchmarks/fused_moe.py --shapes smollm2 --batches 1

An int8 split block pays ONNX Runtime a fixed cost per product call (`block_ops`: 24 calls for moe8k1x192),
so the lever to try is one call for all experts: `com.microsoft::QMoE`, whose CPU kernel runs block-wise 8-bit
experts with int8 activations. planer has no QMoE lowering; this measures whether one would pay before building
it. Every split block is exported by planer in its `ort-moe` form (one `com.microsoft::MoE` node, fp32), and that
node is then rewritten into a QMoE node with the same experts quantized symmetrically to 8 bits per block of
input features (the largest power of two from 16 to 128 that divides both widths). Its output is checked against
the fp32 graph's before it is timed. Beside it, the same block in the `ops` lowering in fp32 and in int8 (planer's
own int8: ONNX Runtime's dynamic quantization), the dense FFN it came from in both precisions, and narrowed
int8 FFNs of 1/8, 1/4 and 1/2 of the units, all timed interleaved in one run per shape and batch. Random weights
and router (near-uniform routing). ONNX Runtime's fused ops have only the tanh GELU, so the GELU shapes are
built with it (latency only; the exact GELU's cost is the same kind of elementwise op).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from common import record, smoke_option
from onnx import helper, numpy_helper

from planer.arch import Architecture, BlockSpec
from planer.export import export_block
from planer.runtime.ort import OrtEngine
from planer.runtime.timing import time_engines
from planer.search.split import split_spec

# name -> (d_model, FFN width, activation, bias, norm)
SHAPES = {"tiny": (192, 768, "gelu_tanh", True, "layernorm"), "deep": (128, 512, "gelu_tanh", True, "layernorm"),
          "smollm2": (576, 1536, "swiglu", False, "rmsnorm")}
MAX_ERROR = 0.05  # QMoE's block output vs the fp32 block's, relative to the block's change of x


def block_size(*widths: int) -> int:
    """The largest power of two from 16 to 128 that divides every width (QMoE's block-wise quantization)."""
    for size in (128, 64, 32, 16):
        if all(w % size == 0 for w in widths):
            return size
    raise SystemExit(f"no QMoE block size (16-128) divides {widths}")


def quantized(w: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(E, N, K) fp32 -> uint8 (E, N, K) with zero point 128 and fp32 scales (E, N, K / size), symmetric."""
    e, n, k = w.shape
    blocks = w.reshape(e, n, k // size, size)
    scales = np.maximum(np.abs(blocks).max(-1), 1e-12) / 127.0
    q = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int16) + 128
    return q.reshape(e, n, k).astype(np.uint8), scales.astype(np.float32)


def to_qmoe(src: Path, dst: Path) -> int:
    """The ort-moe block graph `src` with its MoE node replaced by a QMoE node of the same experts in 8 bits;
    returns the block size used."""
    model = onnx.load(str(src))
    init = {t.name: t for t in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.op_type == "MoE"]
    x, logits, fc1, b1, fc2, b2 = node.input
    w1, w2 = numpy_helper.to_array(init[fc1]), numpy_helper.to_array(init[fc2])  # (E, N, K): out x in per expert
    size = block_size(w1.shape[2], w2.shape[2])
    tensors = []
    for name, w in ((fc1, w1), (fc2, w2)):
        q, s = quantized(w, size)
        tensors += [numpy_helper.from_array(q, f"{name}_q8"), numpy_helper.from_array(s, f"{name}_scales")]
    kept = [t for t in model.graph.initializer if t.name not in (fc1, fc2)]  # the fp32 experts: only MoE read them
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + tensors)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    qmoe = helper.make_node("QMoE", [x, logits, f"{fc1}_q8", f"{fc1}_scales", b1, f"{fc2}_q8", f"{fc2}_scales", b2],
                            list(node.output), domain="com.microsoft", expert_weight_bits=8, block_size=size,
                            **attrs)
    nodes = [qmoe if n is node else n for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--seconds", type=float, default=0.5, help="timing seconds per graph, interleaved")
    smoke_option(p)
    a = p.parse_args()
    shapes = ({"smoke": (32, 128, "swiglu", False, "rmsnorm")} if a.smoke
              else {s: SHAPES[s] for s in a.shapes.split(",")})
    batches = [1] if a.smoke else [int(b) for b in a.batches.split(",")]
    segment = 16 if a.smoke else 128
    rows, lines = [], []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="planer-fused-moe-") as tmp:
        for name, (d_model, width, activation, bias, norm) in shapes.items():
            arch = Architecture(d_model=d_model, vocab_size=256, blocks=(BlockSpec.ffn(width),),
                                activation=activation, bias=bias, norm=norm, tgt_len=segment, mem_len=segment)
            splits = [split_spec(width, e, k) for e in (2, 4, 8) for k in (1, 2) if k < e]
            if a.smoke:
                splits = splits[:1]
            graphs: dict[str, Path] = {}

            def export(label: str, spec: BlockSpec, lowering: str = "ops", twin: str | None = None) -> None:
                graphs[label] = export_block(arch, spec, Path(tmp) / f"{name}-{len(graphs)}.onnx", lowering=lowering,
                                             min_context=2 * segment, fp32_twin=graphs.get(twin))

            export("dense fp32", BlockSpec.ffn(width))
            export("dense int8", BlockSpec.ffn(width, "int8"), twin="dense fp32")
            for share in (8,) if a.smoke else (8, 4, 2):
                narrow = BlockSpec.ffn(width // share)
                export(f"{narrow.label()} fp32", narrow)
                export(f"{narrow.label()}@int8", replace(narrow, precision="int8"), twin=f"{narrow.label()} fp32")
            sizes, errors = {}, {}
            for spec in splits:
                label = spec.label()
                export(f"{label} ops fp32", spec)
                export(f"{label} ops int8", spec.in_precision("int8"), twin=f"{label} ops fp32")
                export(f"{label} ort-moe fp32", spec, lowering="ort-moe")
                graphs[f"{label} qmoe int8"] = Path(tmp) / f"{name}-{label}-qmoe.onnx"
                sizes[label] = to_qmoe(graphs[f"{label} ort-moe fp32"], graphs[f"{label} qmoe int8"])
            for b in batches:
                x = rng.standard_normal((b, segment, d_model), dtype=np.float32)
                engines = {label: OrtEngine(path, threads=2) for label, path in graphs.items()}
                for spec in splits:  # the rewritten node computes the block, or its timing would mean nothing
                    label = spec.label()
                    want = engines[f"{label} ort-moe fp32"].run({"x": x})["y"] - x
                    got = engines[f"{label} qmoe int8"].run({"x": x})["y"] - x
                    error = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                    if not error <= MAX_ERROR:
                        raise SystemExit(f"{name} {label}: QMoE's output is {error:.3f} from the fp32 block's "
                                         f"(at most {MAX_ERROR}); the rewrite is wrong")
                    errors[label] = error
                stats = dict(zip(engines, time_engines([(e, {"x": x}) for e in engines.values()],
                                                      min_seconds=(0.05 if a.smoke else a.seconds) * len(engines))))
                ms = {label: s.p50 for label, s in stats.items()}
                worst = max(s.spread for s in stats.values())
                rows.append({"shape": name, "batch": b, "ms": ms, "spread": {k: s.spread for k, s in stats.items()},
                             "block_sizes": sizes, "qmoe_error": dict(errors)})
                dense32, dense8 = ms["dense fp32"], ms["dense int8"]
                for spec in splits:
                    label = spec.label()
                    fused = [ms[f"{label} {form}"] for form in ("ops fp32", "ort-moe fp32", "ops int8", "qmoe int8")]
                    lines.append(f"| {name} | B{b} | {label} | " + " | ".join(f"{v / dense8:.2f}" for v in fused)
                                 + f" | {sizes[label]} / {errors[label]:.3f} |")
                narrowed = ", ".join(f"{k.split('@')[0]} {ms[k] / dense8:.2f}" for k in ms if k.endswith("@int8"))
                lines.append(f"| {name} | B{b} | dense ffn{width}: fp32 {dense32:.3f} ms, int8 {dense8:.3f} ms "
                             f"(int8 narrowed: {narrowed}) | {dense32 / dense8:.2f} | | 1 | | worst spread "
                             f"{worst:.2f} |")
    header = ("| FFN shape | batch | split block | ops fp32 | ort-moe fp32 | ops int8 | qmoe int8 | "
              "QMoE block size / error |\n|---|---|---|---|---|---|---|---|\n")
    record("fused_moe", {"rows": rows},
           f"ONNX Runtime CPU, 2 threads, segment {segment}; every figure is a block's p50 ÷ the int8 dense FFN's "
           "(planer's int8), all of one shape and batch timed interleaved; QMoE error: its output's distance from "
           "the fp32 block's, relative to the block's change.\n\n" + header + "\n".join(lines), smoke=a.smoke)


if __name__ == "__main__":
    main()
