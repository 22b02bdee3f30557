"""Narrower attention for grouped-query baselines: whole key/value groups, or query-head counts that split them?

    python benchmarks/attention_cuts.py runs/smollm2 --data sample --positions 3 --batch 4 --local-steps 150 \
        --score-tokens 4096

Until the space kept whole groups (planer.space), the default space cut attention to 1, 2, 4, ... query heads
over gcd(kv, h) key/value heads: for SmolLM2 (9 heads over 3 kv heads) 1/kv1, 2/kv1, 4/kv1, 8/kv1, whose
heads beyond the first group inherit query weights written for another group's keys (and the local search could
cut none of them). It now offers 3/kv1, 6/kv2, 9/kv3. Both sets, `linear` and `skip` are cut from the ranked
baseline (planer.search.heads: most important group first) at `--positions` attention blocks, trained locally as
the local search trains them and scored by their replace-one-block KL on held-out training tokens. Latency: each
block exported alone and timed in ONNX Runtime at batch 1, segment 128, fp32 and int8, beside the full attention
block in the same precision, in one profile.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from common import given_or_tiny, local_library, record, smoke_option, spread

from planer.arch import BlockSpec
from planer.checkpoint import load_model
from planer.deployment import Deployment
from planer.latency.profile import profile
from planer.search.heads import rank_heads
from planer.search.search import SearchConfig
from planer.space import SearchSpace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?", help="the baseline's run directory (planer train or import)")
    p.add_argument("--positions", type=int, default=3, help="attention blocks measured, spread over the depth")
    p.add_argument("--local-steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=4, help="streams of the segment length per local step")
    p.add_argument("--score-tokens", type=int, default=4096)
    p.add_argument("--data", help="corpus (default: the run's; an imported model needs one, e.g. sample)")
    smoke_option(p)
    args = p.parse_args()
    run = given_or_tiny(p, args.run, args.smoke)
    baseline = load_model(run).eval()
    arch = baseline.arch
    attn = next(b for b in arch.blocks if b.kind == "attn")
    group_cuts = [c for c in SearchSpace.default(arch).candidates if c.kind == "attn" and c != attn]
    split_cuts = [BlockSpec.attn(h, attn.head_dim, math.gcd(attn.kv_heads, h) if attn.kv_heads else 0)
                  for h in (2 ** i for i in range(attn.heads.bit_length())) if h < attn.heads]
    split_cuts = [c for c in split_cuts if c not in group_cuts]
    others = [BlockSpec.linear(), BlockSpec.skip()]
    specs = [*group_cuts, *split_cuts, *others]

    dep = Deployment(batch=1, tgt_len=arch.tgt_len, mem_len=arch.mem_len, precisions=("fp32", "int8"))
    timed = [s.in_precision(q) for s in [attn, *specs] if s.kind != "skip" for q in dep.precisions]
    table = profile(arch, timed, dep)

    cfg = SearchConfig(local_steps=3 if args.smoke else args.local_steps, batch=args.batch,
                       score_tokens=512 if args.smoke else args.score_tokens)
    positions = spread([i for i, b in enumerate(arch.blocks) if b.kind == "attn"], args.positions)
    options = [[b, *specs] if i in positions else [b] for i, b in enumerate(arch.blocks)]
    library, _ = local_library(run, args.data, baseline, options, cfg, lambda model, probe: rank_heads(model, probe)[0])

    def mean(spec: BlockSpec, name: str) -> float:
        return sum(library.figure((q, spec.label()), name, 1.0 if spec.kind == "skip" else None)
                   for q in positions) / len(positions)

    def ratio(spec: BlockSpec, precision: str) -> float | None:
        return None if spec.kind == "skip" else (table.block_ms(spec.in_precision(precision))
                                                 / table.block_ms(attn.in_precision(precision)))

    rows = [{"block": s.label(), "cut": "whole groups" if s in group_cuts else "splits groups" if s in split_cuts
             else s.kind, **{f"B1_{q}_ratio": ratio(s, q) for q in dep.precisions},
             "nmse_before": mean(s, "nmse_before"), "nmse_after": mean(s, "nmse_after"), "kl": mean(s, "kl")}
            for s in specs]
    lines = [f"{run.name}: attention {attn.label()}, d_model {arch.d_model}, attention blocks {positions}; ONNX "
             f"Runtime B1, segment {arch.tgt_len}, memory {arch.mem_len}; {cfg.local_steps} local steps at "
             f"{cfg.batch} streams; KL (replace-one-block, {cfg.score_tokens} held-out training tokens at most) and "
             f"NMSE are means over those blocks; full attention {table.block_ms(attn):.3f} ms fp32, "
             f"{table.block_ms(attn.in_precision('int8')):.3f} ms int8", "",
             "| block | cut | B1 ÷ full attention, fp32 / int8 | NMSE sliced → trained | KL |", "|---|---|---|---|---|"]
    for r in rows:
        cost = "-" if r["B1_fp32_ratio"] is None else f"{r['B1_fp32_ratio']:.2f} / {r['B1_int8_ratio']:.2f}"
        lines.append(f"| {r['block']} | {r['cut']} | {cost} | {r['nmse_before']:.3f} → {r['nmse_after']:.3f} | "
                     f"{r['kl']:.4f} |")
    record("attention_cuts", {"run": str(run), "positions": positions, "rows": rows, "local_steps": cfg.local_steps,
                              "score_tokens": cfg.score_tokens}, "\n".join(lines) + "\n", smoke=args.smoke)


if __name__ == "__main__":
    main()
