"""planer's TensorRT MoE plugin on a GPU: one MoE block (router, top-k, the routed-experts kernel, slot sum)
against one dense FFN block of the expert's width, both exported alone and built into TensorRT engines, at
B1 T128 and B8 T128 for E in {2, 4, 8, 16}, k in {1, 2}. A ratio (MoE / (k x FFN)) near 1 means the plugin
pays only for the experts each token was routed to. Each block's output is checked against PyTorch first.

    python benchmarks/trt_dispatch.py [--d-model 512 --width 2048 --activation gelu_tanh --fp16]

Needs TensorRT >= 10.10 and an NVIDIA GPU (benchmarks/gpu_check.sh runs it when TensorRT is importable).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import dispatch_options, record, smoke_option, smoke_shapes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dispatch_options(p)
    p.add_argument("--fp16", action="store_true")
    smoke_option(p)
    a = p.parse_args()
    if a.smoke:
        smoke_shapes(a)
    import numpy as np
    import torch

    from planer.arch import Architecture, BlockSpec
    from planer.export import export_block
    from planer.nn.model import Block
    from planer.runtime import EngineError, time_engines
    from planer.runtime.trt import TrtEngine, describe

    try:
        info = describe(a.fp16)
    except EngineError as e:
        sys.exit(str(e))
    arch = Architecture(d_model=a.d_model, vocab_size=256, blocks=(BlockSpec.ffn(a.width),), tgt_len=a.tgt_len,
                        mem_len=0, activation=a.activation).validate()
    batches = [int(b) for b in a.batches.split(",")]
    top = max(batches)
    rows, data = [], []
    with tempfile.TemporaryDirectory() as tmp:
        def engine(spec: BlockSpec) -> TrtEngine:
            torch.manual_seed(0)
            path = export_block(arch, spec, Path(tmp) / f"{spec.label()}.onnx", lowering="trt")
            return TrtEngine(path, shape=(top, a.tgt_len, 0), fp16=a.fp16,
                             timing_cache=Path(tmp) / "timing.cache")

        dense = engine(BlockSpec.ffn(a.width))
        for e in map(int, a.experts.split(",")):
            for k in (1, 2):
                spec = BlockSpec.moe(e, k, a.width)
                moe = engine(spec)
                for b in batches:
                    x = np.random.default_rng(0).standard_normal((b, a.tgt_len, a.d_model), dtype=np.float32)
                    torch.manual_seed(0)
                    with torch.no_grad():  # export_block initialises the block from the same seed
                        want = Block(arch, spec).eval()(torch.from_numpy(x)).numpy()
                    diff = float(np.abs(moe.run({"x": x})["y"] - want).max())
                    ffn, layer = time_engines([(dense, {"x": x}), (moe, {"x": x})], min_iters=a.iters,
                                              min_seconds=0.0)
                    ratio = layer.p50 / (k * ffn.p50)
                    data.append({"experts": e, "top_k": k, "batch": b, "ffn_ms": ffn.p50, "moe_ms": layer.p50,
                                 "ratio": ratio, "max_abs_diff": diff})
                    rows.append(f"| {e} | {k} | B{b} T{a.tgt_len} | {ffn.p50:.3f} | {layer.p50:.3f} | "
                                f"**{ratio:.2f}** | {diff:.1e} |")
                    print(rows[-1], flush=True)

    table = ("| E | k | shape | dense FFN ms | MoE (plugin) ms | MoE / (k x FFN) | max abs diff vs PyTorch |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    record("trt_dispatch", {**info, "d_model": a.d_model, "width": a.width, "activation": a.activation,
                            "rows": data},
           f"TensorRT {info['tensorrt']} on {info['gpu']}, {info['precision']}; d_model {a.d_model}, expert width "
           f"{a.width}, {a.activation}; random router; p50 of at least {a.iters} calls (host copies included), "
           f"FFN and MoE timed interleaved.\n\n{table}", smoke=a.smoke)


if __name__ == "__main__":
    main()
