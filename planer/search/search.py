"""PLANER's latency-aware search with the engine in the loop.

Each round trains the supernet single-path: weights on the training stream
(cross-entropy blended with distillation from the baseline, plus the MoE
balance loss), architecture logits on a separate stream (cross-entropy plus
lambda * max(0, E[latency] / target - 1), E[latency] from the engine-measured
latency table). The logits start with an advantage for the baseline's own
blocks and the first steps train only the weights, so every path is trained
before choices are made.

After each round one network is derived under a latency budget: the most
probable network, cut down to the budget move by move, each move the one
that costs the least loss on held-out data per millisecond saved (see
planer.search.derive). It is exported and timed in the engine beside the
baseline. That measurement calibrates the table and corrects the budget of
the next round by the ratio between the target and what the engine
measured, so the rounds close in on the target as the engine sees it.

Before one is chosen, the networks that met the target are timed once more,
together beside the baseline and as long as the build's final check, and
each keeps the slower of its two measurements.

With trials (SearchConfig.trials), networks keeping more attention blocks are
derived after the rounds too, and a short distillation of the best per
attention-block count (then of the runners-up) decides, since the supernet's
loss misranks them. The supernet inherits each baseline attention block's
heads most important first (planer.search.heads). Every derived network and
every trial is one line of the search log.

The supernet's weights only rank networks. A derived network starts its
trial, and the result its distillation, from the weights the supernet had
before training (the baseline's, sliced: planer.search.supernet.inherit).
After equal distillation the two starts scored alike, so the result can spend
the search's share of the token budget on its own training instead
(benchmarks/RESULTS.md, distill_gap 2026-12-03).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from planer import distributed
from planer.arch import Architecture, BlockSpec
from planer.checkpoint import WEIGHTS_FILE, load_model, save_weights
from planer.data import Segments, TrainingSplit
from planer.deployment import Deployment, Target
from planer.errors import PlanerError
from planer.export import export_lm
from planer.files import ARCH_FILE, atomic_write, read_json
from planer.latency import LatencyTable
from planer.latency.profile import measure
from planer.nn import LM
from planer.search.derive import shrink
from planer.search.heads import rank_heads
from planer.search.probe import ProbeLoss
from planer.search.supernet import SuperNet, inherit
from planer.space import SearchSpace
from planer.train.evaluate import evaluate
from planer.train.presets import COSINE, DISTILL_SHARE, finetune_config
from planer.train.trainer import alignment, distillation_loss, train


@dataclass(frozen=True)
class SearchConfig:
    rounds: int = 4
    steps: int = 200  # supernet steps per round (each a weight step and an architecture step)
    batch: int = 8
    lr: float = 1e-3
    arch_lr: float = 5e-3
    # Gumbel-softmax temperature, annealed geometrically over all steps. Hard samples are the argmax of
    # alpha + tau * noise: a hot start trains the shared weights on near-random paths far from anything the
    # derivation will pick.
    tau_start: float = 1.0
    tau_end: float = 0.3
    # Weight of the latency penalty. The derivation enforces the budget; the penalty only tilts the logits
    # towards cheaper blocks. At 1.0 it drowned the cross-entropy signal and every position moved to skip.
    lam: float = 0.1
    distill: float = 0.5  # share of the distillation loss in the weight loss
    aux_weight: float = 0.01
    arch_split: float = 0.1  # the last part of the training split trains the architecture logits
    warmup: float = 0.2  # share of all steps that train only the weights (every path learns before choices)
    baseline_bias: float = 3.0  # initial architecture-logit advantage of the baseline's own blocks
    valid_tokens: int = 16384
    # Networks are derived under the target less this share: the ratio of two networks timed together still
    # moves by a few percent from run to run. At 3 % a medium tiny 2x build's pick timed 0.483-0.490 of the
    # baseline in the search, 0.512-0.518 in the build's verdict and 0.486-0.502 in a check after it.
    margin: float = 0.05
    shortlist: int = 6  # per position, the most probable candidates the derivation may move to (and skip)
    probe_segments: int = 3  # held-out segments (x batch streams) the derivation measures losses on
    # The most forward FLOPs one derivation measurement may cost: deep baselines measure on fewer streams
    # (tiny's 3 x 8 x 128-token probe is ~16 GFLOP and keeps every stream; SmolLM2-135M keeps one).
    probe_flops: float = 4e10
    # Trials: the supernet's loss ranks networks with the weights they inherited, which favours whole blocks over
    # more blocks of fewer heads; after training the order can reverse (benchmarks/RESULTS.md, distill_gap). So
    # after the rounds, networks with one, two, ... more attention blocks than the last pick are derived too,
    # and the best network per attention-block count that meets the target, then the next best by supernet
    # loss (`trials` networks at most), are each distilled `trial_steps` steps and scored on held-out training
    # data; the best trained one is chosen.
    # 0: choose by the supernet's loss alone.
    trials: int = 0
    trial_steps: int = 300
    # The trials' recipe: the distillation share (the rest cross-entropy) and the hidden states' cosine loss. A
    # build sets them to its result's (Budget.searched_with), so that trials rank networks as they will be trained.
    trial_distill: float = DISTILL_SHARE
    trial_cosine: float = COSINE
    trial_tokens: int = 65536  # held-out tokens (the architecture split's last) that score candidates and trials
    seed: int = 0
    # Which search: `gumbel` (PLANER's supernet, this module) or `local` (Puzzle's, planer.search.local). Both read
    # batch, margin, rounds (the local search: at most this many rounds of exact selection timed in the engine),
    # trials and the held-out data settings above.
    method: str = "gumbel"
    local_steps: int = 400  # local distillation steps, every alternative on the same parent pass each step
    local_lr: float = 1e-3
    local_train: bool = True  # False: the alternatives keep their inherited weights (an ablation)
    # A split block's router also learns, by cross-entropy, each token's best k experts (planer.search.split.
    # oracle_routes); False: through its gates' gradient and the balance loss alone (an ablation).
    oracle_router: bool = True
    init: str = "activations"  # how narrower alternatives inherit: `activations` or `weights` (an ablation)
    pairs: bool = True  # FFN alternatives also trained to make up for the attention before them (kl scoring only)
    solutions: int = 4  # the best distinct solutions of each round's exact selection, each timed in the engine
    # Ablations of the local search: `greedy` selection (planer.search.select.greedy) instead of the exact one;
    # `nmse` scores (each alternative's local error) instead of its replace-one-block KL.
    selection: str = "exact"
    scoring: str = "kl"
    # Held-out training tokens each alternative's replace-one-block KL is measured on (the first segment of the
    # held-out stream only fills the memories; probe_flops caps the streams of a deep model's segments). Two
    # disjoint samples of 16,384 ranked the alternatives alike: Spearman 0.999 (tiny), 0.998 (deep preset, 768
    # alternatives); 32,768 cost a deep build 33 min of scoring. Each build logs the agreement of its halves.
    score_tokens: int = 16384


@dataclass
class Candidate:
    round: int
    arch: Architecture
    predicted_ms: float
    measured_ms: float
    baseline_ms: float
    held_out_loss: float  # with the supernet's weights, on held-out training tokens (never the validation split)
    model: LM | None = field(repr=False)  # inherited weights (not the supernet's): what trials and distillation
    # start from; built only for the networks a trial or the result needs, and kept for the chosen one once loaded
    min_attn: int = 1  # the fewest attention blocks its derivation could keep (above 1: a trial alternative)
    trial_loss: float | None = None  # after its trial run, on held-out training data
    onnx: str = field(default="", repr=False)  # its exported graph while the search runs, if it met the target
    positions: tuple[BlockSpec, ...] = field(default=(), repr=False)  # one per supernet position, skips included

    def to_dict(self) -> dict:
        return {"round": self.round, "arch": self.arch.to_dict(), "predicted_ms": self.predicted_ms,
                "measured_ms": self.measured_ms, "baseline_ms": self.baseline_ms, "held_out_loss": self.held_out_loss,
                "min_attn": self.min_attn, "trial_loss": self.trial_loss,
                "positions": [b.label() for b in self.positions]}

    def describe(self) -> str:
        more = f", derived with at least {self.min_attn} attention blocks" if self.min_attn > 1 else ""
        return f"round {self.round}{more}"


@dataclass
class SearchOutcome:
    chosen: Candidate  # meets the target with the lowest trial (else validation) loss, else the fastest measured
    candidates: list[Candidate]  # one per round, then the trial alternatives
    table: LatencyTable  # calibrated by the rounds' measurements
    target_ms: float  # the target in milliseconds (a speedup target turned into one by the baseline's measurement)

    def save(self, out: Path) -> None:
        """Into directory `out` (created if need be): the chosen network as a model directory, the rest as JSON."""
        out.mkdir(parents=True, exist_ok=True)
        self.chosen.arch.save(out / ARCH_FILE)
        save_weights(self.chosen.model, out / WEIGHTS_FILE)
        self.table.save(out / "latency_table.json")
        record = {"target_ms": self.target_ms, "chosen": self.candidates.index(self.chosen),
                  "candidates": [c.to_dict() for c in self.candidates]}
        atomic_write(out / OUTCOME_FILE, json.dumps(record, indent=2) + "\n")

    @staticmethod
    def load(out: Path) -> SearchOutcome:
        remedy = f"delete {out} and run the same command again (the search is redone)"
        record = read_json(out / OUTCOME_FILE, remedy)
        try:
            if any("held_out_loss" not in c for c in record["candidates"]):
                raise PlanerError(f"{out / OUTCOME_FILE} is from an earlier planer, which scored candidates on the "
                                  f"validation split; delete {out} and run the search again")
            candidates = [Candidate(c["round"], Architecture.from_dict(c["arch"]), c["predicted_ms"],
                                    c["measured_ms"], c["baseline_ms"], c["held_out_loss"], None,
                                    c.get("min_attn", 1), c.get("trial_loss"),
                                    positions=tuple(BlockSpec.parse(b) for b in c.get("positions", ())))
                          for c in record["candidates"]]
            chosen, target_ms = candidates[record["chosen"]], float(record["target_ms"])
        except (KeyError, TypeError, IndexError, AttributeError, ValueError):
            raise PlanerError(f"{out / OUTCOME_FILE}: not the record planer writes; {remedy}") from None
        chosen.model = load_model(out).eval()
        return SearchOutcome(chosen, candidates, LatencyTable.load(out / "latency_table.json"), target_ms)


OUTCOME_FILE = "outcome.json"


class InfeasibleTarget(PlanerError):
    """No network in the search space can meet the latency target."""


def held_out_probe(training: TrainingSplit, arch: Architecture, cfg: SearchConfig, streams: slice = slice(None)
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out segments the derivation and the heads' ranking measure losses on: the last
    `cfg.probe_segments` of the architecture split, on as many of `streams` as `cfg.probe_flops` allows."""
    arch_data = Segments(training.tokens[arch_start(training, cfg):], cfg.batch, arch.tgt_len, streams)
    probe = [arch_data[len(arch_data) - 1 - i] for i in reversed(range(min(cfg.probe_segments, len(arch_data))))]
    keep = max(1, int(cfg.probe_flops // (len(probe) * arch.tgt_len * arch.flops_per_token())))
    return [(x[:keep], y[:keep]) for x, y in probe]


def held_out_tokens(training: TrainingSplit, cut: int, cfg: SearchConfig) -> np.ndarray:
    """The training tokens candidates are scored and trials judged on: the last `cfg.trial_tokens` of the
    architecture split, which the weights never train on. The validation split judges only the result."""
    return training.tokens[cut:][-cfg.trial_tokens:]


def arch_start(training: TrainingSplit, cfg: SearchConfig) -> int:
    """Where the training split's last part, which trains the architecture logits and is held out from the
    weights, begins."""
    return int(len(training.tokens) * (1 - cfg.arch_split))


def candidate_latencies(table: LatencyTable, space: SearchSpace) -> torch.Tensor:
    return torch.tensor([table.block_ms(c) for c in space.candidates], dtype=torch.float32)


def fastest_predicted(table: LatencyTable, space: SearchSpace) -> float:
    """The lowest predicted latency in the space: one cheapest attention block (the memory needs one),
    every other position skipped or its cheapest block."""
    ms = candidate_latencies(table, space)
    attn = [i for i, c in enumerate(space.candidates) if c.kind == "attn"]
    cheapest_attn = min(ms[i].item() for i in attn) if attn else 0.0
    rest = (space.positions - 1) * ms.min().item()
    return table.scale * (table.fixed_ms() + cheapest_attn + rest)


def timed_baseline(baseline: LM, dep: Deployment, tmp: Path, exported: str | None) -> tuple[str, float]:
    """The baseline's graph (`exported`, or exported into `tmp` here) on rank 0 ("" elsewhere) and its p50 in the
    engine on every rank, the median of three timings: the first can land on a machine still busy (a --compare
    build's dense-only search, started after a training run, timed the baseline at 11.1 ms where every later run
    gave 7.2-8.4), and an absolute target is read against it."""
    if not distributed.is_main():
        return "", distributed.broadcast(None)
    path = exported or str(export_lm(baseline, tmp / "baseline.onnx", **dep.export_options()))
    return path, distributed.broadcast(statistics.median(measure([(path, baseline.arch)], dep)[0].p50
                                                         for _ in range(3)))


def search(baseline: LM, training: TrainingSplit, space: SearchSpace, table: LatencyTable, dep: Deployment,
           target: Target, *, cfg: SearchConfig = SearchConfig(), log_path: Path | None = None,
           show_progress: bool = True, baseline_onnx: str | None = None) -> SearchOutcome:
    """Search for a network that meets the target (see SearchOutcome for what is chosen), reading the training
    split alone. `baseline_onnx` is the baseline already exported for this deployment (exported here otherwise);
    candidates are timed beside it."""
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="planer-search-") as tmp:
        run = _Search(baseline.eval(), training, space, table, dep.resolved(table), target, cfg, Path(tmp), log_path,
                      show_progress, baseline_onnx)
        run.rounds()
        run.alternatives()
        chosen = run.choice()
    return SearchOutcome(chosen, run.candidates, run.table, run.target_ms)


class _Search:
    """One search: the baseline timed once, the supernet with its weight and architecture optimisers, the latency
    table (calibrated as candidates are timed) and the candidates derived so far. Its steps are the rounds (train,
    then derive and assess a network), the alternatives with more attention blocks, and the choice among the
    networks that met the target. Under torchrun every rank trains; rank 0 alone exports, times, evaluates and
    writes, and broadcasts what it measured."""

    def __init__(self, baseline: LM, training: TrainingSplit, space: SearchSpace, table: LatencyTable,
                 dep: Deployment, target: Target, cfg: SearchConfig, tmp: Path, log_path: Path | None,
                 show_progress: bool, baseline_onnx: str | None):
        self.baseline, self.training, self.space, self.dep, self.cfg = baseline, training, space, dep, cfg
        self.tmp, self.log_path = tmp, log_path
        self.arch = arch = baseline.arch
        self.main = main = distributed.is_main()
        self.base_path, self.baseline_ms = timed_baseline(baseline, dep, tmp, baseline_onnx)
        self.target_ms = target.ms_for(self.baseline_ms)
        # Each candidate's time as it would have measured beside this first baseline measurement: the machine
        # drifts between runs (a small tiny build's baseline measured 8.9, 9.5 and 11.1 ms in three of them),
        # the ratio to the baseline timed in the same run does not. Until a candidate is timed, the baseline
        # calibrates; then the candidates alone, which are near the target's size (the sum of blocks misses
        # a per-graph cost that weighs more in small networks: tiny's 2x candidates ran 20 % above it).
        self.measured: list[tuple[Architecture, float]] = []
        self.table = table.calibrate([(arch, self.baseline_ms)])
        floor = fastest_predicted(self.table, space)
        if self.target_ms < floor:
            raise InfeasibleTarget(f"target {self.target_ms:.2f} ms is below the fastest network in the space "
                                   f"(predicted {floor:.2f} ms; the baseline measures {self.baseline_ms:.2f} ms); "
                                   "raise the target or widen the space")
        self.cut = arch_start(training, cfg)
        self.held_out = held_out_tokens(training, self.cut, cfg)
        self.weight_data = Segments(training.tokens[:self.cut], cfg.batch, arch.tgt_len, distributed.share(cfg.batch))
        self.arch_data = Segments(training.tokens[self.cut:], cfg.batch, arch.tgt_len, distributed.share(cfg.batch))
        self.probe = held_out_probe(training, arch, cfg, distributed.share(cfg.batch))
        # The same function with each attention block's best heads first, so narrow candidates inherit those.
        self.ranked, self.orders = rank_heads(baseline, self.probe)
        self.net = SuperNet(self.ranked, space, baseline_bias=cfg.baseline_bias)
        distributed.same_start(self.net)
        self.weight_opt = torch.optim.AdamW(self.net.weight_parameters(), lr=cfg.lr, betas=(0.9, 0.99))
        self.arch_opt = torch.optim.Adam([self.net.alpha], lr=cfg.arch_lr, betas=(0.5, 0.999))
        self.block_ms = candidate_latencies(self.table, space)
        self.is_attn = [c.kind == "attn" for c in space.candidates]
        self.mems = {"w_mems": None, "t_mems": None, "a_mems": None}
        self.candidates: list[Candidate] = []
        self.tau = cfg.tau_start
        self.bar = tqdm(total=cfg.rounds * cfg.steps, desc="search", unit="step",
                        disable=not (show_progress and main), dynamic_ncols=True)
        self.show_progress = show_progress

    def say(self, text: str) -> None:
        if self.main:
            self.bar.write(text)

    def meets(self, c: Candidate) -> bool:
        """Judged by the ratio to the baseline timed in the same run, so machine drift cancels."""
        return c.measured_ms / c.baseline_ms <= self.target_ms / self.baseline_ms

    def rounds(self) -> None:
        """Train the supernet's weights (and, after the warm-up, its architecture weights) for each round, then
        derive the most probable network that fits and assess it; stop early when none fits."""
        cfg, total = self.cfg, self.cfg.rounds * self.cfg.steps
        for rnd in range(cfg.rounds):
            for i in range(cfg.steps):
                step = rnd * cfg.steps + i
                self.tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, total - 1))
                _weight_step(self.net, self.baseline, self.weight_data, step, self.weight_opt, cfg, self.tau,
                             self.mems)
                if step >= cfg.warmup * total:
                    e_lat = _arch_step(self.net, self.arch_data, step, self.arch_opt, self.block_ms, self.table,
                                       self.target_ms, cfg.lam, self.tau, self.mems)
                else:
                    e_lat = float(self.table.scale * self.net.expected_latency(
                        self.block_ms, self.table.fixed_ms()).detach())
                self.bar.update(1)
                if i % 10 == 0:
                    self.bar.set_postfix(tau=f"{self.tau:.2f}", E_lat=f"{e_lat:.2f}ms")
            self.bar.set_description(f"search: round {rnd}, deriving a network")  # minutes on deep baselines
            choice, derive_s = self.derive(self.net.argmax())
            self.bar.set_description("search")
            if choice is None:
                self.say(f"round {rnd}: after calibration no network fits {self.target_ms:.2f} ms; stopping the "
                         "search")
                break
            self.assess(choice, rnd, derive_s)

    def alternatives(self) -> None:
        """From the baseline's own blocks, networks with more attention blocks than the last derived one (the
        most probable network may hold fewer than the target affords), up to cfg.trials - 1 of them."""
        if self.cfg.trials <= 1 or not self.candidates:
            return
        start = self.net.baseline_choice(self.arch)
        kept = len(self.candidates[-1].arch.attn_positions)
        most = sum(self.is_attn[c] for c in start)
        for n in range(kept + 1, min(most, kept + self.cfg.trials - 1) + 1):
            self.bar.set_description(f"search: deriving a network with at least {n} attention blocks")
            choice, derive_s = self.derive(start, n)
            if choice is not None:
                self.assess(choice, self.candidates[-1].round, derive_s, n)

    def choice(self) -> Candidate:
        """The network to distil: the networks that met the target timed again together, then the best of a
        shortlist after short trial trainings (or the best held-out loss without trials)."""
        self.bar.close()
        cfg, candidates = self.cfg, self.candidates
        if not candidates:
            raise InfeasibleTarget(f"no network fits the target {self.target_ms:.2f} ms less the {cfg.margin:.0%} "
                                   f"margin kept for the machine's noise ({(1 - cfg.margin) * self.target_ms:.2f} "
                                   "ms) once the table is calibrated by the engine's measurements; raise the target "
                                   "or widen the space")
        _confirm([c for c in candidates if self.meets(c)], self.base_path, self.arch, self.dep, self.log_path)
        feasible = [c for c in candidates if self.meets(c)]
        if not feasible:
            shortlist = [min(candidates, key=lambda c: c.measured_ms / c.baseline_ms)]
        elif cfg.trials:
            shortlist = _shortlist(feasible, cfg.trials)
        else:
            shortlist = [min(feasible, key=lambda c: c.held_out_loss)]
        for c in shortlist:
            with torch.random.fork_rng(devices=[]):  # the same upcycled experts on every rank, whatever came before
                torch.manual_seed(cfg.seed)
                c.model = inherit(self.ranked, c.positions).eval()
        return _trials(shortlist, self.baseline, self.training, self.cut, cfg, self.tmp, self.log_path,
                       self.show_progress)

    def derive(self, start: list[int], min_attn: int = 1) -> tuple[list[int] | None, float]:
        """The network derived from `start` under the target less the margin (the same on every rank) and the
        seconds it took."""
        began = time.perf_counter()
        blocks_ms = (1 - self.cfg.margin) * self.target_ms / self.table.scale - self.table.fixed_ms()
        choice = derive_network(self.net, start, self.probe, self.block_ms, blocks_ms, self.is_attn,
                                self.cfg.shortlist, min_attn)
        return distributed.broadcast(choice), time.perf_counter() - began

    def assess(self, choice: list[int], rnd: int, derive_s: float, min_attn: int = 1) -> Candidate:
        """Export, time beside the baseline, evaluate, calibrate the table and log the derived network."""
        model = self.net.extract(choice).eval()
        base_ms = cand_ms = spread = loss = 0.0
        if self.main:
            path = export_lm(model, self.tmp / f"candidate-{len(self.candidates)}.onnx", **self.dep.export_options())
            base_stats, cand_stats = measure([(self.base_path, self.arch), (str(path), model.arch)], self.dep)
            scored = evaluate(model, self.held_out, self.training.unit, batch=8)
            base_ms, cand_ms, spread, loss = base_stats.p50, cand_stats.p50, cand_stats.spread, scored["loss"]
        base_ms, cand_ms, spread, loss = distributed.broadcast((base_ms, cand_ms, spread, loss))
        predicted = self.table.predict(model.arch)
        self.measured.append((model.arch, cand_ms * self.baseline_ms / base_ms))
        self.table = self.table.calibrate(self.measured)
        candidate = Candidate(rnd, model.arch, predicted, cand_ms, base_ms, loss, None, min_attn,
                              onnx=str(path) if self.main else "",
                              positions=tuple(self.space.candidates[c] for c in choice))
        if self.main and not self.meets(candidate):  # only those that met it are timed again; a deep model's graph
            path.unlink()  # is hundreds of MB
            candidate.onnx = ""
        self.candidates.append(candidate)
        _log(self.log_path, {
            "round": rnd, "min_attn": min_attn, "target_ms": self.target_ms,
            "baseline_ms": base_ms, "measured_ms": cand_ms, "measured_spread": spread, "predicted_ms": predicted,
            "calibration": self.table.scale, "held_out_loss": loss, "lambda": self.cfg.lam, "tau": self.tau,
            "derive_s": derive_s, "arch": [b.label() for b in model.arch.blocks], "head_orders": self.orders,
            "probabilities": [[round(p, 4) for p in row] for row in self.net.probabilities().tolist()],
        })
        self.say(f"{candidate.describe()}: {' '.join(b.label() for b in model.arch.blocks)}\n"
                 f"  measured {cand_ms:.2f} ms "
                 f"(predicted {predicted:.2f}, baseline {base_ms:.2f}, target {self.target_ms:.2f}); "
                 f"held-out loss {loss:.4f}; derived in {derive_s:.0f} s")
        return candidate


def _confirm(candidates: list[Candidate], base_path: str, base_arch: Architecture, dep: Deployment,
             log_path: Path | None) -> None:
    """Time the networks that met the target once more, together beside the baseline and as long as the build's
    final check does; each keeps the slower of its two ratios to the baseline. One measurement taken while the
    machine was busy can put a network a few percent on the wrong side of the target (a tiny 2x build chose a
    network measured at 0.497 of the baseline that its final check timed at 0.512)."""
    if not candidates:
        return
    again = None
    if distributed.is_main():
        base, *stats = measure([(base_path, base_arch)] + [(c.onnx, c.arch) for c in candidates], dep.verdict())
        again = [(base.p50, s.p50) for s in stats]
    for i, (c, (base_ms, cand_ms)) in enumerate(zip(candidates, distributed.broadcast(again))):
        _log(log_path, {"confirm": i, "round": c.round, "min_attn": c.min_attn, "baseline_ms": base_ms,
                        "measured_ms": cand_ms, "first_ratio": c.measured_ms / c.baseline_ms})
        if cand_ms / base_ms > c.measured_ms / c.baseline_ms:
            c.measured_ms, c.baseline_ms = cand_ms, base_ms


def _log(path: Path | None, record: dict) -> None:
    if path is not None and distributed.is_main():
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _shortlist(feasible: list[Candidate], trials: int) -> list[Candidate]:
    """The networks to try (see SearchConfig.trials): each attention-block count's best by supernet loss first
    (that loss misjudges this trade most), then the runners-up; `trials` at most, no network twice."""
    distinct: dict[tuple, Candidate] = {}  # rounds can derive the same network
    for c in sorted(feasible, key=lambda c: c.held_out_loss):
        distinct.setdefault(c.arch.blocks, c)
    ranked = list(distinct.values())
    best: dict[int, Candidate] = {}  # attention blocks -> the network with the lowest supernet loss
    for c in ranked:
        best.setdefault(len(c.arch.attn_positions), c)
    firsts = {id(c) for c in best.values()}
    return [*best.values(), *(c for c in ranked if id(c) not in firsts)][:trials]


def _trials(shortlist: list[Candidate], teacher: LM, training: TrainingSplit, cut: int, cfg: SearchConfig,
            tmp: Path, log_path: Path | None, show_progress: bool) -> Candidate:
    """The best of the shortlisted networks after `cfg.trial_steps` steps of distillation each (the only one
    without a trial). They train on the weights' split and are scored on the last `cfg.trial_tokens` of the
    architecture split, so the validation split judges only the result."""
    if len(shortlist) == 1:
        return shortlist[0]
    held_out = training.trial_corpus(cut, held_out_tokens(training, cut, cfg))
    for i, c in enumerate(shortlist):
        if show_progress and distributed.is_main():
            tqdm.write(f"trial {i + 1} of {len(shortlist)} ({c.describe()}): "
                       f"{' '.join(b.label() for b in c.arch.blocks)}")
        match = alignment(c.arch, teacher.arch, c.positions)
        recipe = finetune_config(cfg.trial_steps, cfg.batch, cfg.valid_tokens, distill=cfg.trial_distill,
                                 cosine=cfg.trial_cosine, aligned=match is not None)
        scored = train(held_out, recipe, tmp / f"trial-{i}", init=c.model, teacher=teacher, match=match,
                       show_progress=show_progress)
        c.trial_loss = scored["valid"]["loss"]
        _log(log_path, {"trial": i, "round": c.round, "min_attn": c.min_attn, "steps": cfg.trial_steps,
                        "arch": [b.label() for b in c.arch.blocks], "trial_loss": c.trial_loss})
        if show_progress and distributed.is_main():
            tqdm.write(f"  trial loss {c.trial_loss:.4f} (held-out training data)")
    return min(shortlist, key=lambda c: c.trial_loss)


@torch.no_grad()
def derive_network(net: SuperNet, start: list[int], probe: list[tuple[torch.Tensor, torch.Tensor]],
                   block_ms: torch.Tensor, budget_ms: float, is_attn: list[bool], shortlist: int, min_attn: int = 1
                   ) -> list[int] | None:
    """`start` (the most probable network, or the baseline's) cut to the budget by measured loss (see
    planer.search.derive.shrink), keeping at least `min_attn` attention blocks. Moves go to a position's
    `shortlist` most probable candidates, in any precision, or to skip. Public because a derivation's cost on
    a deep baseline decides a build's per-round time, and benchmarks/derive_cost.py times it alone."""
    logp = net.alpha.detach().log_softmax(-1)
    skip = [i for i, c in enumerate(net.space.candidates) if c.kind == "skip"]
    top = logp.topk(min(shortlist, logp.shape[1]), dim=-1).indices.tolist()
    # Each shortlisted block in every precision, so that "the same block in int8" is always a move to weigh.
    moves = [list(dict.fromkeys([*(v for c in top[p] for v in net.variants(c)), *skip])) for p in range(len(top))]
    loss_of = ProbeLoss(net, probe)
    return shrink(start, block_ms, budget_ms, is_attn, loss_of, moves.__getitem__, rebase=loss_of.rebase,
                  min_attn=min_attn)


def _stream(data: Segments, step: int):
    index = step % len(data)
    return data[index], index == 0


def _weight_step(net: SuperNet, teacher: LM, data: Segments, step: int, opt: torch.optim.Optimizer,
                 cfg: SearchConfig, tau: float, state: dict) -> None:
    (x, y), fresh = _stream(data, step)
    if fresh:
        state["w_mems"] = state["t_mems"] = None
    with torch.no_grad():
        choice, _ = net.sample(tau)
        t_out = teacher(x, state["t_mems"])
    state["t_mems"] = t_out.mems
    out = net(x, choice, mems=state["w_mems"])
    state["w_mems"] = out.mems
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1))
    loss = ((1 - cfg.distill) * ce + cfg.distill * distillation_loss(out.logits, t_out.logits)
            + cfg.aux_weight * out.aux_loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients(net.weight_parameters())
    torch.nn.utils.clip_grad_norm_(net.weight_parameters(), 1.0)
    opt.step()


def _arch_step(net: SuperNet, data: Segments, step: int, opt: torch.optim.Optimizer, block_ms: torch.Tensor,
               table: LatencyTable, target_ms: float, lam: float, tau: float, state: dict) -> float:
    (x, y), fresh = _stream(data, step)
    if fresh:
        state["a_mems"] = None
    choice, weights = net.sample(tau)
    out = net(x, choice, weights, mems=state["a_mems"])
    state["a_mems"] = out.mems
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1))
    e_lat = table.scale * net.expected_latency(block_ms, table.fixed_ms())
    loss = ce + lam * torch.relu(e_lat / target_ms - 1)
    opt.zero_grad(set_to_none=True)
    # Only the logits' gradient: autograd then skips every weight-gradient product (a third of a backward pass).
    loss.backward(inputs=[net.alpha])
    distributed.average_gradients([net.alpha])
    opt.step()
    return float(e_lat.detach())

