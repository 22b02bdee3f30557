"""The floor under any MoE lowering in ONNX Runtime on this CPU: E experts' GEMMs alone, each on its even
share of the T tokens (rows pre-split: no router, no top-k, no gather or scatter), against one dense FFN
of the same width on all T tokens. If this ratio is already above the dispatch-efficiency bar (1.3),
no lowering can meet the bar here: the cost is the experts' own small GEMMs and their weights, not the
dispatch around them. A third column runs the same experts as one batched MatMul over (E, rows, d) (the
form a capacity-padded lowering would take) to show whether fusing the experts' GEMMs lowers that floor.

    python benchmarks/expert_gemm_bound.py [--d-model 256 --width 1024 --tokens 128 --threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from common import record, smoke_option
from planer.runtime import OrtEngine, time_engines


def save_graph(path: Path, nodes: list, weights: list, tokens: int, d_model: int) -> Path:
    """Save `nodes` as a model from x (tokens, d) to y (tokens, d)."""
    def io(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [tokens, d_model])

    graph = helper.make_graph(nodes, path.stem, [io("x")], [io("y")], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def experts_graph(path: Path, experts: int, tokens: int, d_model: int, width: int, rng) -> Path:
    """x (tokens, d) -> E slices of tokens/E rows, each relu(x W1) W2 with its own weights -> concat."""
    nodes, weights, outputs = [], [], []
    rows = tokens // experts
    for e in range(experts):
        weights += [numpy_helper.from_array((rng.standard_normal((d_model, width)) * 0.05).astype(np.float32),
                                            f"w1_{e}"),
                    numpy_helper.from_array((rng.standard_normal((width, d_model)) * 0.05).astype(np.float32),
                                            f"w2_{e}"),
                    numpy_helper.from_array(np.array([e * rows], np.int64), f"start{e}"),
                    numpy_helper.from_array(np.array([(e + 1) * rows], np.int64), f"end{e}"),
                    numpy_helper.from_array(np.array([0], np.int64), f"axis{e}")]
        nodes += [helper.make_node("Slice", ["x", f"start{e}", f"end{e}", f"axis{e}"], [f"x{e}"]),
                  helper.make_node("MatMul", [f"x{e}", f"w1_{e}"], [f"h{e}"]),
                  helper.make_node("Relu", [f"h{e}"], [f"r{e}"]),
                  helper.make_node("MatMul", [f"r{e}", f"w2_{e}"], [f"y{e}"])]
        outputs.append(f"y{e}")
    nodes.append(helper.make_node("Concat", outputs, ["y"], axis=0))
    return save_graph(path, nodes, weights, tokens, d_model)


def batched_graph(path: Path, experts: int, tokens: int, d_model: int, width: int, rng) -> Path:
    """x (tokens, d) -> (E, tokens/E, d) -> relu(x W1) W2 as two batched MatMuls with (E, ...) weights."""
    def array(name: str, a: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(a, name)

    weights = [array("w1", (rng.standard_normal((experts, d_model, width)) * 0.05).astype(np.float32)),
               array("w2", (rng.standard_normal((experts, width, d_model)) * 0.05).astype(np.float32)),
               array("grouped", np.array([experts, tokens // experts, d_model], np.int64)),
               array("flat", np.array([tokens, d_model], np.int64))]
    nodes = [helper.make_node("Reshape", ["x", "grouped"], ["xg"]), helper.make_node("MatMul", ["xg", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["yg"]),
             helper.make_node("Reshape", ["yg", "flat"], ["y"])]
    return save_graph(path, nodes, weights, tokens, d_model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--experts", default="2,4,8,16")
    p.add_argument("--threads", type=int, default=2)
    smoke_option(p)
    a = p.parse_args()
    if a.smoke:
        a.d_model, a.width, a.tokens, a.experts = 32, 64, 16, "2"
    min_seconds = 0.0 if a.smoke else 2.0
    rng = np.random.default_rng(0)
    x = {"x": rng.standard_normal((a.tokens, a.d_model)).astype(np.float32)}
    rows, data = [], []
    with tempfile.TemporaryDirectory() as tmp:
        dense = OrtEngine(experts_graph(Path(tmp) / "dense.onnx", 1, a.tokens, a.d_model, a.width, rng),
                          threads=a.threads)
        for e in map(int, a.experts.split(",")):
            split = OrtEngine(experts_graph(Path(tmp) / f"e{e}.onnx", e, a.tokens, a.d_model, a.width, rng),
                              threads=a.threads)
            batched = OrtEngine(batched_graph(Path(tmp) / f"b{e}.onnx", e, a.tokens, a.d_model, a.width, rng),
                                threads=a.threads)
            ffn, moe, bmm = time_engines([(dense, x), (split, x), (batched, x)], min_seconds=min_seconds)
            data.append({"experts": e, "ffn_ms": ffn.p50, "experts_ms": moe.p50, "ratio": moe.p50 / ffn.p50,
                         "batched_ms": bmm.p50, "batched_ratio": bmm.p50 / ffn.p50})
            rows.append(f"| {e} | {a.tokens // e} | {ffn.p50:.3f} ({ffn.spread:.2f}) | {moe.p50:.3f} "
                        f"({moe.spread:.2f}) | **{moe.p50 / ffn.p50:.2f}** | {bmm.p50:.3f} ({bmm.spread:.2f}) | "
                        f"{bmm.p50 / ffn.p50:.2f} |")
            print(rows[-1], flush=True)
    record("expert_gemm_bound", {"d_model": a.d_model, "width": a.width, "tokens": a.tokens, "rows": data},
           f"ONNX Runtime CPU ({a.threads} threads, no spinning), fp32; d_model {a.d_model}, expert width "
           f"{a.width}, {a.tokens} tokens (B1 T{a.tokens}), top-1 with tokens split evenly; "
           "batched: the same GEMMs as two batched MatMuls; all three timed interleaved.\n\n"
           "| E | rows per expert | dense FFN ms | E experts' GEMMs ms | ratio | batched ms | batched ratio |\n"
           "|---|---|---|---|---|---|---|\n" + "\n".join(rows), smoke=a.smoke)


if __name__ == "__main__":
    main()
