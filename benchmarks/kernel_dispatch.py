"""The Triton expert kernels on a GPU: one MoE layer's dispatch against k x one dense FFN of the expert's width,
in PyTorch on CUDA, at B1 T128 and B8 T128 for E in {2, 4, 8, 16}. A ratio near 1 means the layer pays only for
the experts each token was routed to. Timed side by side: the MoE block's grouped kernel (planer.kernels.dispatch:
sort, tile plan, grouped GEMMs, un-permute; what training on a GPU runs, weights stacked per call), the TensorRT
plugin's single launch (planer.kernels.experts via planer.trt.plugin.run, weights stacked once, as an engine
holds them; plus the graph's sum over k) and the eager dispatch (a Python loop over experts).

    python benchmarks/kernel_dispatch.py [--d-model 512 --width 2048 --activation gelu_tanh]

Needs CUDA (see benchmarks/gpu_check.sh). `--smoke` runs one tiny case anywhere (in Triton's interpreter
without a GPU) to check the script itself; its timings mean nothing and it records nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import TorchCall, dispatch_options, record, smoke_option, smoke_shapes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dispatch_options(p)
    smoke_option(p)
    a = p.parse_args()
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from planer.nn.ffn import FFN
    from planer.nn.moe import MoE, dispatch as eager_dispatch
    from planer.export.lowering import stacked_experts
    from planer.kernels.dispatch import dispatch as kernel_dispatch
    from planer.trt import plugin
    from planer.runtime import time_engines

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.smoke:
        sys.exit("no CUDA device: run this on a GPU, or pass --smoke to check the script in Triton's interpreter")
    if a.smoke:
        smoke_shapes(a)

    rows, data = [], []
    torch.manual_seed(0)
    dense = FFN(a.d_model, a.width, a.activation).to(device).eval()
    for e in map(int, a.experts.split(",")):
        for k in (1, 2):
            moe = MoE(a.d_model, e, k, a.width, a.activation).to(device).eval()
            weights = stacked_experts(moe)
            for b in map(int, a.batches.split(",")):
                x = torch.randn(b * a.tgt_len, a.d_model, device=device)
                _, gates, ids = moe.route(x)
                calls = [TorchCall(lambda: dense(x)), TorchCall(lambda: kernel_dispatch(x, gates, ids, moe.experts)),
                         TorchCall(lambda: plugin.run(x, ids, gates, weights, a.activation).sum(dim=1)),
                         TorchCall(lambda: eager_dispatch(x, gates, ids, moe.experts))]
                ffn_ms, kernel_ms, plugin_ms, eager_ms = (
                    s.p50 for s in time_engines([(c, {}) for c in calls], min_iters=a.iters, min_seconds=0.0))
                data.append({"experts": e, "top_k": k, "batch": b, "ffn_ms": ffn_ms, "kernel_ms": kernel_ms,
                             "plugin_ms": plugin_ms, "eager_ms": eager_ms, "ratio": kernel_ms / (k * ffn_ms),
                             "plugin_ratio": plugin_ms / (k * ffn_ms)})
                rows.append(f"| {e} | {k} | B{b} T{a.tgt_len} | {ffn_ms:.3f} | {kernel_ms:.3f} | {plugin_ms:.3f} | "
                            f"{eager_ms:.3f} | **{data[-1]['ratio']:.2f}** | **{data[-1]['plugin_ratio']:.2f}** |")
                print(rows[-1], flush=True)

    table = ("| E | k | shape | dense FFN ms | grouped kernel ms | plugin kernel ms | eager ms | grouped / (k x FFN) "
             "| plugin / (k x FFN) |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton's interpreter)"
    record("kernel_dispatch", {"device": gpu, "d_model": a.d_model, "width": a.width,
                               "activation": a.activation, "rows": data},
           f"PyTorch {torch.__version__} on {gpu}, fp32; d_model {a.d_model}, expert "
           f"width {a.width}, {a.activation}; random router; p50 of at least {a.iters} synchronised calls, the four "
           f"timed interleaved.\n\n{table}", smoke=a.smoke)


if __name__ == "__main__":
    main()
