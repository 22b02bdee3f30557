"""Do split experts keep more accuracy than a narrower FFN of the same engine latency? (issue 40)

    python benchmarks/split_moe.py runs/tiny --local-steps 300
    python benchmarks/split_moe.py runs/smollm2 --data sample --positions 2 --batch 4 --widths 8 \
        --local-steps 150 --score-tokens 4096

Every FFN block of the baseline is split into experts (planer.search.split: E experts clustered on training
activations, k routed per token, optionally a shared always-on part of 1/4 of the units) and, beside them, narrowed
to widths of 1/16 .. 15/16 (`--widths`; units kept by activation importance, planer.search.units). Every alternative is then
trained locally as the local search trains it (planer.search.local: the parent's input, the parent block's output
as target, normalised MSE) and scored by its replace-one-block KL to the baseline on held-out training tokens.

Latency: each block exported alone and timed in ONNX Runtime at batch 1 and 8, segment 128, beside the dense FFN
it came from, split blocks in each MoE lowering (`ops`: standard operators, only routed rows reach an expert;
`ort-moe`: ONNX Runtime's fused MoE op, where it runs the activation exactly). For each split block the table also
gives the widest narrowed FFN that is no slower (than the split's fastest lowering) at each batch, and its KL: the
split must beat it for experts to be worth their place in the search.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import given_or_tiny, local_library, record, smoke_option, spread

from planer.arch import BlockSpec
from planer.checkpoint import load_model
from planer.deployment import Deployment
from planer.errors import PlanerError
from planer.latency import LatencyTable
from planer.latency.profile import profile
from planer.search.local import Library, parent_pass
from planer.search.search import SearchConfig
from planer.search.split import oracle_routes, split_spec
from planer.search.units import rank_units


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?", help="the baseline's run directory (planer train)")
    p.add_argument("--experts", default="2,4,8")
    p.add_argument("--top-k", default="1,2")
    p.add_argument("--shared", default="0,0.25", help="shares of the FFN's units kept always on")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--lowerings", default="ops,ort-moe", help="MoE lowerings to time the split blocks in (one that "
                   "cannot run the network's activation exactly is left out)")
    p.add_argument("--local-steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="streams of the segment length per local step")
    p.add_argument("--widths", type=int, default=16, help="narrowed FFNs: widths of 1/N .. (N-1)/N of the FFN")
    p.add_argument("--score-tokens", type=int, default=16384)
    p.add_argument("--data", help="corpus (default: the run's; an imported model needs one, e.g. sample)")
    p.add_argument("--gates-only", action="store_true", help="routers learn through their gates and the balance "
                   "loss alone, not also from the oracle's choice (SearchConfig.oracle_router; an ablation)")
    p.add_argument("--positions", type=int, help="FFN blocks to measure, spread evenly over the depth (default: all)")
    smoke_option(p)
    args = p.parse_args()
    if args.smoke:
        args.experts, args.top_k, args.shared, args.batches = "2", "1", "0", "1"
    run = given_or_tiny(p, args.run, args.smoke)
    baseline = load_model(run).eval()
    arch = baseline.arch
    ffn = next(b for b in arch.blocks if b.kind == "ffn")
    width = ffn.d_inner
    splits = [split_spec(width, e, k, int(width * s)) for s in map(float, args.shared.split(","))
              for e in map(int, args.experts.split(",")) for k in map(int, args.top_k.split(",")) if k < e
              and (width - int(width * s)) % e == 0]
    n = 2 if args.smoke else args.widths
    narrowed = [BlockSpec.ffn(width * i // n) for i in range(1, n) if width * i % n == 0]
    batches = [int(b) for b in args.batches.split(",")]
    lowerings = []  # the MoE lowerings that run this network's activation exactly
    tables: dict[tuple[str, int], LatencyTable] = {}
    for lowering in args.lowerings.split(","):
        try:
            for b in batches:
                dep = Deployment(batch=b, tgt_len=arch.tgt_len, mem_len=arch.mem_len, lowering=lowering,
                                 precisions=("fp32",))
                tables[lowering, b] = profile(arch, [*splits, *narrowed], dep)
            lowerings.append(lowering)
        except PlanerError as e:
            print(f"{lowering}: {e}")

    cfg = SearchConfig(local_steps=3 if args.smoke else args.local_steps, batch=args.batch,
                       score_tokens=512 if args.smoke else args.score_tokens, oracle_router=not args.gates_only)
    positions = spread([i for i, b in enumerate(arch.blocks) if b.kind == "ffn"], args.positions)
    options = [[b, *splits, *narrowed] if i in positions else [b] for i, b in enumerate(arch.blocks)]
    # the FFNs' units by activation importance; attention is not replaced
    library, probe = local_library(run, args.data, baseline, options, cfg, rank_units)

    def kl(spec: BlockSpec) -> float:
        return sum(library.figure((q, spec.label()), "kl") for q in positions) / len(positions)

    def nmse(spec: BlockSpec, when: str) -> float:
        return sum(library.figure((q, spec.label()), f"nmse_{when}") for q in positions) / len(positions)

    def ratio(spec: BlockSpec, b: int, lowering: str | None = None) -> float:
        """Latency ÷ the dense FFN's, timed in one run; in `lowering`, else the fastest (a dense FFN has none)."""
        return min(tables[lo, b].block_ms(spec) / tables[lo, b].block_ms(ffn) for lo in ([lowering] if lowering
                                                                                          else lowerings))

    oracle = {spec: sum(_oracle_nmse(library, (q, spec.label()), probe) for q in positions) / len(positions)
              for spec in splits}

    def twin(spec: BlockSpec, b: int) -> BlockSpec | None:
        """The widest narrowed FFN no slower than `spec` at batch b."""
        fits = [n for n in narrowed if ratio(n, b) <= ratio(spec, b)]
        return max(fits, key=lambda n: n.d_inner) if fits else None

    rows = [{"block": spec.label(), **{f"B{b}_{lo}_ratio": ratio(spec, b, lo) for b in batches for lo in lowerings},
             "nmse_before": nmse(spec, "before"), "nmse_after": nmse(spec, "after"), "oracle_nmse": oracle[spec],
             "kl": kl(spec), **{f"B{b}_narrowed": (t.label(), kl(t)) if (t := twin(spec, b)) else None
                                 for b in batches}} for spec in splits]
    dense = [{"block": n.label(), **{f"B{b}_ratio": ratio(n, b) for b in batches}, "nmse_before": nmse(n, "before"),
              "nmse_after": nmse(n, "after"), "kl": kl(n)} for n in narrowed]

    ratios = " | ".join(f"B{b} ÷ dense ({' / '.join(lowerings)})" for b in batches)
    twins = " | ".join(f"narrowed FFN no slower at B{b}: its KL" for b in batches)
    lines = [f"{run.name}: FFN {width} ({arch.activation}), d_model {arch.d_model}, FFN blocks {positions}; "
             f"ONNX Runtime, fp32, segment {arch.tgt_len}; {cfg.local_steps} local steps at {cfg.batch} "
             f"streams, routers {'taught through their gates alone' if args.gates_only else 'also taught the oracle'}; "
             "KL (replace-one-block, held-out training tokens) and NMSE are means over those blocks; "
             "oracle: the trained experts, each token sent to the k that reproduce the parent block best", "",
             f"| split block | {ratios} | NMSE sliced → trained | oracle-routed NMSE | KL | {twins} |",
             "|---|" + "---|" * (2 * len(batches) + 3)]
    for r in rows:
        cells = [" / ".join(f"{r[f'B{b}_{lo}_ratio']:.2f}" for lo in lowerings) for b in batches]
        cells += [f"{r['nmse_before']:.3f} → {r['nmse_after']:.3f}", f"{r['oracle_nmse']:.3f}", f"{r['kl']:.4f}"]
        for b in batches:
            t = r[f"B{b}_narrowed"]
            cells.append("none (the split wins)" if t is None else
                         f"{t[0]}: {t[1]:.4f}" + (" (the split wins)" if r["kl"] < t[1] else ""))
        lines.append(f"| {r['block']} | " + " | ".join(cells) + " |")
    plain = " | ".join(f"B{b} ÷ dense" for b in batches)
    lines += ["", f"| narrowed FFN | {plain} | NMSE sliced → trained | KL |", "|---|" + "---|" * (len(batches) + 2)]
    lines += [f"| {r['block']} | " + " | ".join(f"{r[f'B{b}_ratio']:.2f}" for b in batches)
              + f" | {r['nmse_before']:.3f} → {r['nmse_after']:.3f} | {r['kl']:.4f} |" for r in dense]
    record("split_moe", {"run": str(run), "lowerings": lowerings, "splits": rows, "narrowed": dense,
                         "local_steps": cfg.local_steps, "oracle_router": cfg.oracle_router,
                         "score_tokens": cfg.score_tokens}, "\n".join(lines) + "\n", smoke=args.smoke)


@torch.no_grad()
def _oracle_nmse(library: Library, key: tuple[int, str], probe: list) -> float:
    """The split block `key` with a perfect router: every token sent to the k experts whose summed output comes
    closest to the parent block's (every k-subset tried). Its normalised MSE against the parent block, beside
    the learned router's, says how much of the split's error is routing."""
    p, block = key[0], library.blocks[key]
    total, mems = 0.0, None
    for x, _ in probe:
        seg, mems = parent_pass(library.parent, x, mems)
        inp, target = seg.inputs[p], seg.outputs[p]
        _, best = oracle_routes(block.f, block.norm(inp), target - inp)
        total += float(best.mean() / inp.shape[-1] / (target - inp).pow(2).mean())
    return total / len(probe)


if __name__ == "__main__":
    main()
