"""What one derivation costs on a deep baseline: the supernet over a run (fresh, the baseline's choice
favoured as a search starts), the default space narrowed to this machine's memory, cut from the baseline's
predicted latency to a fraction of it. Reports the measurements made, the share of the supernet's positions
they ran (each reuses the blocks in front of its move) and the wall time, lazy as `planer build` runs it, so
the search's per-round cost for a baseline like SmolLM2 is known before a 2-hour build.

    python benchmarks/derive_cost.py RUN --table LATENCY_TABLE.json [--fraction 0.75] [--data sample]
    python benchmarks/derive_cost.py --smoke     # a micro run and a table profiled here, in seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import given_or_tiny, record, smoke_option, smoke_space
from planer.checkpoint import load_model
from planer.deployment import Deployment
from planer.latency import LatencyTable
from planer.latency.profile import profile
from planer.latency.table import FIXED
from planer.search.probe import ProbeLoss
from planer.search.search import SearchConfig, candidate_latencies, derive_network, held_out_probe
from planer.search.supernet import SuperNet
from planer.space import SearchSpace, trainable_params_limit
from planer.train.trainer import run_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, nargs="?")
    p.add_argument("--table", type=Path, help="a latency table of the run's space (planer profile)")
    p.add_argument("--fraction", type=float, default=0.75, help="budget as a fraction of the baseline's prediction")
    p.add_argument("--data", default="sample")
    p.add_argument("--threads", type=int, default=2)
    smoke_option(p)
    a = p.parse_args()
    if a.table is None and not a.smoke:
        p.error("give --table (or --smoke)")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    a.run = given_or_tiny(p, a.run, a.smoke)
    baseline = load_model(a.run).eval()
    arch, cfg = baseline.arch, SearchConfig()
    space = smoke_space(arch) if a.smoke else SearchSpace.default(arch, max_params=trainable_params_limit())
    if a.table is None:  # --smoke: a table of this space timed as briefly as the engine allows
        table = profile(arch, space.candidates, Deployment(tgt_len=arch.tgt_len, mem_len=arch.mem_len,
                        threads=a.threads, precisions=("fp32",), min_iters=3, min_seconds=0.0), show_progress=False)
    else:
        table = LatencyTable.load(a.table)
    corpus = run_corpus(a.run, None if a.smoke else a.data, arch.vocab_size)
    net = SuperNet(baseline, space, baseline_bias=cfg.baseline_bias).eval()
    probe = held_out_probe(corpus.training_split(), arch, cfg)  # the segments a search derives on
    streams = probe[0][0].shape[0]
    block_ms = candidate_latencies(table, space)
    baseline_ms = float(sum(block_ms[i] for i in net.argmax()))
    passes = positions_run = 0
    run_positions = net.run_positions

    def counted(x, choice, mems, *, start=0, **kwargs):  # one call per probe segment of a measurement
        nonlocal passes, positions_run
        passes += 1
        positions_run += space.positions - start
        return run_positions(x, choice, mems, start=start, **kwargs)

    net.run_positions = counted
    t0 = time.perf_counter()
    with torch.no_grad():
        choice = derive_network(net, net.argmax(), probe, block_ms, a.fraction * baseline_ms,
                                [c.kind == "attn" for c in space.candidates], cfg.shortlist)
    wall = time.perf_counter() - t0
    measurements = passes // len(probe)
    share = positions_run / max(1, passes * space.positions)
    net.run_positions = run_positions
    probe_loss = ProbeLoss(net, probe)  # what the derivation gave up: the probe's loss before and after
    with torch.no_grad():
        start_loss, derived_loss = probe_loss(net.argmax()), probe_loss(choice) if choice else float("nan")
    got_ms = sum(float(block_ms[i]) for i in choice) if choice else float("nan")
    text = (f"`{a.run}`: {arch.summary().splitlines()[0]}; space of {space.positions} positions x "
            f"{len(space.candidates)} candidates ({space.supernet_params(arch) / 1e6:.0f}M supernet parameters); "
            f"probe {len(probe)} segments x {streams} stream(s) x {arch.tgt_len} tokens; {a.threads} threads.\n\n"
            f"| blocks' predicted ms (without fixed {table.entries[FIXED]['p50']:.1f}) | budget | derived | "
            f"measurements | share of positions run | wall s | s per measurement | probe loss before / after |\n"
            f"|---|---|---|---|---|---|---|---|\n"
            f"| {baseline_ms:.1f} | {a.fraction * baseline_ms:.1f} | {got_ms:.1f} | {measurements} | {share:.2f} | "
            f"{wall:.0f} | {wall / max(1, measurements):.2f} | {start_loss:.4f} / {derived_loss:.4f} |\n")
    record("derive_cost", {"run": str(a.run), "positions": space.positions, "streams": streams,
                           "measurements": measurements, "share_of_positions_run": share, "wall_s": wall,
                           "start_loss": start_loss, "derived_loss": derived_loss, "baseline_ms": baseline_ms,
                           "budget_ms": a.fraction * baseline_ms, "derived_ms": got_ms}, text, smoke=a.smoke)


if __name__ == "__main__":
    main()
