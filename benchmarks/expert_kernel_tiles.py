"""Where the expert kernels' GPU time goes: the TensorRT plugin's one-launch kernel (planer.kernels.experts) over
a grid of tile shapes, in fp32 and fp16, and the MoE block's grouped dispatch (planer.kernels.dispatch, fp32),
each against k x one dense FFN of the expert's width in the same precision. Everything is captured once as a CUDA
graph and timed replaying it: the device's own time, no host work. It answers whether a tile shape, the
precision or the host side keeps a kernel from paying only for the routed experts; benchmarks/kernel_dispatch.py
times the same layers as callers see them, host work included.

    python benchmarks/expert_kernel_tiles.py [--experts 8,16 --batches 1,8 --d-model 512 --width 2048]

Needs CUDA (see benchmarks/gpu_check.sh). `--smoke` runs one tiny case with two tile shapes in Triton's
interpreter to check the script; its timings mean nothing and it records nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import TorchCall, dispatch_options, record, smoke_option, smoke_shapes

# (BLOCK_D, num_warps, BLOCK_F, BLOCK_K): output columns per program, warps, hidden units and inputs per step.
TILES = [(256, 4, 32, 64), (128, 4, 32, 64), (64, 4, 32, 64), (32, 4, 32, 64), (128, 4, 16, 64),
         (64, 4, 64, 32), (64, 8, 64, 64), (128, 8, 64, 32)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dispatch_options(p)
    p.set_defaults(experts="8,16", iters=50)
    smoke_option(p)
    a = p.parse_args()
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton

    from planer.export.lowering import stacked_experts
    from planer.kernels.dispatch import dispatch as grouped
    from planer.kernels.experts import routed_experts
    from planer.nn.ffn import FFN
    from planer.nn.moe import MoE
    from planer.runtime import time_engines
    from planer.trt import plugin

    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        sys.exit("no CUDA device: run this on a GPU, or pass --smoke to check the script in Triton's interpreter")
    device = "cuda" if cuda else "cpu"
    if a.smoke:
        smoke_shapes(a)
    shipped = plugin.Launch(1, a.d_model, a.width, a.activation)
    ours = (shipped.block_d, plugin.NUM_WARPS, plugin.BLOCK_F, plugin.BLOCK_K)
    tiles = [ours] + [t for t in TILES if t != ours][:1 if a.smoke else None]  # what the plugin ships, first

    def time_all(fns: list) -> list[float]:
        calls = [TorchCall(as_graph(fn) if cuda else fn) for fn in fns]
        return [s.p50 for s in time_engines([(c, {}) for c in calls], min_iters=a.iters, min_seconds=0.0)]

    def as_graph(fn):
        """fn captured once as a CUDA graph, so that replaying it costs the device's time alone."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    rows, data = [], []
    torch.manual_seed(0)
    with torch.no_grad():
        for e in map(int, a.experts.split(",")):
            for k in (1, 2):
                moe = MoE(a.d_model, e, k, a.width, a.activation).to(device).eval()
                for b in map(int, a.batches.split(",")):
                    x = torch.randn(b * a.tgt_len, a.d_model, device=device)
                    _, gates, ids = moe.route(x)
                    slots, ids32 = ids.numel(), ids.to(torch.int32).contiguous()
                    (grouped_ms,) = time_all([lambda: grouped(x, gates, ids, moe.experts)])
                    for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16")):
                        dense = FFN(a.d_model, a.width, a.activation).to(device, dtype).eval()
                        xd, gd = x.to(dtype), gates.to(dtype).contiguous()
                        weights = [t.to(dtype).contiguous() for t in
                                   (stacked_experts(moe)[n] for n in plugin.INPUTS[3:])]
                        out = torch.empty(slots, a.d_model, dtype=dtype, device=device)

                        def launch(block_d, warps, block_f, block_k):
                            grid = (e, triton.cdiv(slots, plugin.BLOCK_M), triton.cdiv(a.d_model, block_d))
                            return lambda: routed_experts[grid](
                                xd, ids32, gd, *weights, slots, k, a.d_model, a.width, out,
                                **{**shipped.constexprs(), "BLOCK_D": block_d, "BLOCK_F": block_f,
                                   "BLOCK_K": block_k}, num_warps=warps)

                        ffn_ms, *tile_ms = time_all([lambda: dense(xd)] + [launch(*t) for t in tiles])
                        best = min(range(len(tiles)), key=tile_ms.__getitem__)
                        row = {"experts": e, "top_k": k, "batch": b, "dtype": name, "ffn_ms": ffn_ms,
                               "grouped_ms": grouped_ms if name == "fp32" else None,
                               "tiles": {"/".join(map(str, t)): ms for t, ms in zip(tiles, tile_ms)},
                               "best_tiles": "/".join(map(str, tiles[best])), "best_ms": tile_ms[best],
                               "shipped_ms": tile_ms[0]}
                        data.append(row)
                        grouped_cell = f"{grouped_ms:.3f}" if name == "fp32" else "—"
                        rows.append(f"| {e} | {k} | B{b} T{a.tgt_len} | {name} | {k * ffn_ms:.3f} | {grouped_cell} | "
                                    f"{tile_ms[0]:.3f} | {row['best_ms']:.3f} ({row['best_tiles']}) | "
                                    f"**{row['best_ms'] / (k * ffn_ms):.2f}** |")
                        print(rows[-1], flush=True)

    table = ("| E | k | shape | precision | k x dense FFN ms | grouped dispatch ms | plugin kernel ms (shipped "
             "tiles) | plugin kernel ms, best tiles (D/warps/F/K) | best plugin / (k x FFN) |\n"
             "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    gpu = torch.cuda.get_device_name() if cuda else "CPU (Triton's interpreter)"
    record("expert_kernel_tiles", {"device": gpu, "d_model": a.d_model, "width": a.width,
                                   "activation": a.activation, "rows": data},
           f"PyTorch {torch.__version__} on {gpu}; d_model {a.d_model}, expert width {a.width}, {a.activation}; "
           f"random router; p50 of at least {a.iters} synchronised replays of each one's CUDA graph"
           f"{'' if cuda else ' (here: plain calls)'}, all of a row's timed interleaved. Tile "
           f"shapes tried: {', '.join('/'.join(map(str, t)) for t in tiles)}. The grouped dispatch runs fp32 only."
           f"\n\n{table}", smoke=a.smoke)


if __name__ == "__main__":
    main()
