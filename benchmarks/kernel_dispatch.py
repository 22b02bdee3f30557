"""The Triton expert-dispatch kernel on a GPU: one MoE layer (route + grouped GEMMs + un-permute) against k x one
dense FFN of the expert's width, in PyTorch on CUDA, at B1 T128 and B8 T128 for E in {2, 4, 8, 16}. A ratio
near 1 means the layer pays only for the experts each token was routed to. The eager dispatch (a Python loop
over experts) is timed beside it.

    python benchmarks/kernel_dispatch.py [--d-model 512 --width 2048 --activation gelu_tanh]

Needs CUDA (see benchmarks/gpu_check.sh). `--smoke` runs one tiny case anywhere (in Triton's interpreter
without a GPU) to check the script itself; its timings mean nothing and it records nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import dispatch_options, record, smoke_option, smoke_shapes


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
    from planer.kernels.dispatch import dispatch as kernel_dispatch
    from planer.runtime import time_engines

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not a.smoke:
        sys.exit("no CUDA device: run this on a GPU, or pass --smoke to check the script in Triton's interpreter")
    if a.smoke:
        smoke_shapes(a)

    class Call:
        """A CUDA computation behind the engine interface, so the one timing function times it; each call
        waits for the device, or the clock would stop before the kernels do."""

        name, input_names, output_names = "torch-cuda", [], []

        def __init__(self, fn):
            self.fn = fn

        def run(self, feeds):
            with torch.no_grad():
                self.fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return {}

        def provenance(self):
            return {"engine": self.name, "torch": torch.__version__}

    rows, data = [], []
    torch.manual_seed(0)
    dense = FFN(a.d_model, a.width, a.activation).to(device).eval()
    for e in map(int, a.experts.split(",")):
        for k in (1, 2):
            moe = MoE(a.d_model, e, k, a.width, a.activation).to(device).eval()
            for b in map(int, a.batches.split(",")):
                x = torch.randn(b * a.tgt_len, a.d_model, device=device)
                _, gates, ids = moe.route(x)
                calls = [Call(lambda: dense(x)), Call(lambda: kernel_dispatch(x, gates, ids, moe.experts)),
                         Call(lambda: eager_dispatch(x, gates, ids, moe.experts))]
                ffn_ms, kernel_ms, eager_ms = (s.p50 for s in time_engines([(c, {}) for c in calls],
                                                                          min_iters=a.iters, min_seconds=0.0))
                ratio = kernel_ms / (k * ffn_ms)
                data.append({"experts": e, "top_k": k, "batch": b, "ffn_ms": ffn_ms, "kernel_ms": kernel_ms,
                             "eager_ms": eager_ms, "ratio": ratio})
                rows.append(f"| {e} | {k} | B{b} T{a.tgt_len} | {ffn_ms:.3f} | {kernel_ms:.3f} | {eager_ms:.3f} | "
                            f"**{ratio:.2f}** |")
                print(rows[-1], flush=True)

    table = ("| E | k | shape | dense FFN ms | kernel MoE ms | eager MoE ms | kernel / (k x FFN) |\n"
             "|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton's interpreter)"
    record("kernel_dispatch", {"device": gpu, "d_model": a.d_model, "width": a.width,
                               "activation": a.activation, "rows": data},
           f"PyTorch {torch.__version__} on {gpu}, fp32; d_model {a.d_model}, expert "
           f"width {a.width}, {a.activation}; random router; p50 of at least {a.iters} synchronised calls, the three "
           f"timed interleaved.\n\n{table}", smoke=a.smoke)


if __name__ == "__main__":
    main()
