"""The local search (after Puzzle, arXiv 2411.19146): every alternative block trained alone, scored by the damage it
does, one chosen per position exactly under the engine's latency.

The Gumbel supernet (planer.search.search) trains every path of a shared network end to end and ranks networks
by the loss of weights that were never trained for them; its results stayed 4-5 % above the baseline's loss at
2x (benchmarks/RESULTS.md). Puzzle keeps 96.6 % of its parent's score before any global training by working
block by block instead:

1. **Alternatives.** Each block of the baseline (the parent) may become a cheaper block of its family, in any
   precision the deployment runs: an attention block fewer heads (its most important first,
   planer.search.heads), a `linear` block (planer.nn: attention's value and output projections folded into one
   matrix) or nothing; an FFN block fewer hidden units (the largest activation x output norm first,
   planer.search.units), experts split from its units with a router and an optional shared part
   (planer.search.split), or nothing.
2. **Local distillation.** Every alternative learns to reproduce its parent block's output from the parent's own
   input at that position (normalised MSE: the error over the parent block's own contribution, so that
   dropping the block scores exactly 1), all alternatives on the same parent forward pass, no gradient across
   blocks (a split block's router learns with the experts: the choice of each token's best k experts, by
   cross-entropy, plus the load-balancing loss). Where an attention block may be dropped, every alternative of
   the FFN after it is also trained as a *paired* one: from the attention's input to the FFN's output, so that
   it makes up for the attention it follows (chosen only together with that attention's skip). An alternative
   in int8 is not trained: it computes with its fp32 twin's trained weights. The library of trained
   alternatives is saved beside the search's outcome.
3. **Scoring.** Each alternative's damage is the KL divergence from the parent when it alone replaces its
   parent block, on held-out *training* tokens (the validation split judges only the result); a paired one's is
   that of the pair (skip and it) less the skip's own, so that the two add up to the pair's.
4. **Selection.** One alternative per position minimising the summed damage under the latency table's budget,
   solved exactly (planer.search.select). The engine stays in the loop: the best few solutions are exported
   and timed beside the baseline, the table is calibrated by what the engine measured and the problem solved
   again, until the solutions stop changing. Among those that met the target, the lowest held-out loss
   (or, with trials, the best after a short distillation each) is the result.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from planer import distributed
from planer.arch import Architecture, BlockSpec
from planer.data import Segments, TrainingSplit
from planer.deployment import Deployment, Target
from planer.errors import PlanerError
from planer.export import export_lm
from planer.files import atomic_write, read_json, replacing
from planer.latency import LatencyTable
from planer.latency.profile import measure
from planer.latency.table import fixed_label
from planer.nn import LM
from planer.nn.model import Block, embed_tokens, head_logits, init_weights, next_memory
from planer.search.heads import rank_heads
from planer.search.search import (Candidate, InfeasibleTarget, SearchConfig, SearchOutcome, arch_start, _confirm,
                                  _log, _shortlist, _trials, held_out_probe, held_out_tokens, timed_baseline)
from planer.search.select import greedy, select
from planer.search.split import Cut, oracle_routes, routed_to, router_loss, split_ffn
from planer.search.supernet import copy_attention, copy_ffn, copy_linear, weight_order
from planer.search.units import permute_units, rank_units
from planer.space import SearchSpace
from planer.train.evaluate import evaluate
from planer.train.presets import TrainConfig
from planer.train.trainer import distillation_loss, lr_at

LIBRARY_FILE = "library.safetensors"
LIBRARY_RECORD = "library.json"
INITS = ("activations", "weights")
SELECTIONS = ("exact", "greedy")
SCORINGS = ("kl", "nmse")
FAMILIES = {"attn": ("attn", "linear", "skip"), "ffn": ("ffn", "moe", "skip")}
BALANCE = 0.01  # the load-balancing loss's weight beside a split block's NMSE (Switch Transformer's)
CHECKPOINT_FILE = "training.pt"  # local distillation's state while it runs, beside the library it becomes
CHECKPOINT_S = 600.0  # at most this much local distillation is lost to an interruption
CALIBRATION_TOKENS = 8192  # training tokens the FFN splits are clustered and their routers fitted on
# What a library's trained weights and scores depend on beside the baseline and its alternatives (SearchConfig's
# fields): a library saved by a search that differs in any of them is trained again.
LIBRARY_SETTINGS = ("local_steps", "local_lr", "local_train", "oracle_router", "init", "batch", "seed",
                    "score_tokens", "trial_tokens", "probe_segments", "probe_flops", "arch_split")


def library_settings(cfg: SearchConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in LIBRARY_SETTINGS}


def alternatives(parent: Architecture, space: SearchSpace) -> list[list[BlockSpec]]:
    """Per block of `parent`, the parent block first, then every candidate of `space` of its family that can be
    cut from it (no more heads or units than it has), in every precision the space holds."""
    result = []
    for i, block in enumerate(parent.blocks):
        if block.kind not in FAMILIES:
            raise InfeasibleTarget(f"block {i} of the baseline is a {block.kind} block; the local search replaces "
                                   "attention and FFN blocks only: use --search gumbel")
        fits = [c for c in space.candidates if c.kind in FAMILIES[block.kind] and _cut_from(c, block)]
        result.append(list(dict.fromkeys([block, *fits])))
    return result


SPLIT_MARGIN = 0.9  # a split is trained only where the table times it under this share of its parent FFN


def undominated(options: list[list[BlockSpec]], table: LatencyTable) -> list[list[BlockSpec]]:
    """Each position's alternatives less those the table times at or above the parent block (each list's first):
    the parent costs no more and does no damage (its KL is 0, every other's at least 0), so no selection prefers
    them, in any round (calibration scales every cost alike). Dropped before training, they cost nothing: on
    `tiny` and the deep preset most split experts are slower than the FFN at B1 (benchmarks/RESULTS.md).

    Split experts must also be clearly faster (SPLIT_MARGIN): a few percent is within a block profile's noise
    here, and splits are the library's dearest alternatives to train. Two profiles of the deep preset timed its
    fp32 FFN at 0.326 and 0.367 ms; no split came under it in the first, six did in the second (0.885-0.994x of
    it), and training those at every position would have taken the library from 11 to about 36 minutes
    (estimated from its steps; benchmarks/RESULTS.md). With the margin, one of the six stays."""
    def kept(s: BlockSpec, parent_ms: float) -> bool:
        return table.block_ms(s) < parent_ms * (SPLIT_MARGIN if s.kind == "moe" else 1.0)

    return [[specs[0], *(s for s in specs[1:] if kept(s, table.block_ms(specs[0])))] for specs in options]


def with_pairs(parent: Architecture, options: list[list[BlockSpec]]) -> tuple[list[list[BlockSpec]], list[int]]:
    """`options` with, at each FFN position after an attention position that may be skipped, its dense FFN
    alternatives again as paired ones (trained to stand for the attention and the FFN together); and per
    position the index where its paired alternatives start.

    Splits are not paired: a pair's damage is the missing attention's, which no width recovers. On the deep
    preset (200 local steps) the paired splits' KL stayed within the paired dense FFNs' range at every one of
    the 12 positions (position 1: 1.039-1.071 against 1.041-1.067; benchmarks/RESULTS.md), at 4x the training."""
    result, starts = [], []
    for p, specs in enumerate(options):
        pairable = (p > 0 and parent.blocks[p].kind == "ffn" and parent.blocks[p - 1].kind == "attn"
                    and BlockSpec.skip() in options[p - 1])
        result.append(specs + ([s for s in specs if s.kind == "ffn"] if pairable else []))
        starts.append(len(specs))
    return result, starts


def _cut_from(c: BlockSpec, parent: BlockSpec) -> bool:
    if c.kind == "attn":
        return (c.head_dim == parent.head_dim and c.heads <= parent.heads and c.n_kv_heads <= parent.n_kv_heads
                and c.heads // c.n_kv_heads == parent.heads // parent.n_kv_heads)
    if c.kind == "ffn":
        return c.d_inner <= parent.d_inner
    if c.kind == "moe":  # split from the parent's units, not upcycled copies of them; all of them routed to
        # every token is the parent's FFN at a higher price
        return (parent.kind == "ffn" and c.experts * c.d_inner + c.shared == parent.d_inner
                and (c.top_k < c.experts or c.shared > 0))
    return True


def ranked_parent(baseline: LM, probe: Sequence[tuple[Tensor, Tensor]], init: str) -> LM:
    """The baseline with its heads and FFN units reordered (the function unchanged) so that narrower alternatives
    keep the first ones: by measured importance (`activations`), or FFN units by weight norms and heads as they
    are (`weights`, the supernet's order before the local search: an ablation)."""
    if init == "activations":
        return rank_units(rank_heads(baseline, probe)[0], probe)
    if init != "weights":
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    ranked = copy.deepcopy(baseline).eval()
    for block in ranked.blocks:
        if block.kind == "ffn":
            with torch.no_grad():
                permute_units(block.f, weight_order(block.f))
    return ranked


@torch.no_grad()
def initial_block(arch: Architecture, spec: BlockSpec, parent: Block, calibration: Tensor | None = None,
                  cuts: dict[tuple[int, int, int], Cut] | None = None) -> Block:
    """`spec` with the weights it inherits from `parent` (already ranked): the first heads or units, the linear
    fold of the attention, the FFN split into experts (clustered and routed on `calibration`, the parent
    block's inputs on training tokens; `cuts` keeps the splits made of this parent for its other MoEs), the
    parent's norm."""
    block = Block(arch, spec)
    if spec.kind == "skip":
        return block
    block.apply(init_weights)
    block.norm.load_state_dict(parent.norm.state_dict())
    if spec.kind == "moe":
        if calibration is None:
            raise ValueError(f"{spec.label()} is split from its parent FFN on calibration inputs; none were given")
        h = parent.norm(calibration.reshape(-1, arch.d_model))
        block.f.load_state_dict(split_ffn(parent.f, h, spec.in_precision("fp32"), cuts=cuts).state_dict())
    elif spec.kind == "attn":
        copy_attention(block.f, parent.f)
    elif spec.kind == "ffn":
        copy_ffn(block.f, parent.f, torch.arange(parent.f.up.out_features))
    elif spec.kind == "linear":
        copy_linear(block.f, parent.f)
    return block


def run_blocks(blocks: Sequence[Block], h: Tensor, mems: Sequence[Tensor | None] | None, mem_len: int, *,
               start: int = 0, inputs: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor | None]]:
    """Blocks `start`.. on `h` (the input of block `start`), each attention block over its memory in `mems` (one
    entry per block, whatever its kind, so that a block replaced by another kind keeps the layout). Returns the
    output and the next segment's memories, one per block (those before `start` passed through); `inputs`, when
    given, receives each block's input."""
    new_mems: list[Tensor | None] = list(mems[:start]) if mems is not None else [None] * start
    for p in range(start, len(blocks)):
        if inputs is not None:
            inputs.append(h)
        mem = None if mems is None else mems[p]
        new_mems.append(next_memory(h, mem, mem_len).detach())
        h = blocks[p](h, mem) if blocks[p].kind == "attn" else blocks[p](h)
    return h, new_mems


@dataclass
class ParentPass:
    """One segment through the parent: each block's input and memory, its output, and the final logits."""

    inputs: list[Tensor]
    mems: list[Tensor | None]
    outputs: list[Tensor]
    logits: Tensor


@torch.no_grad()
def parent_pass(parent: LM, x: Tensor, mems: Sequence[Tensor | None] | None) -> tuple[ParentPass, list[Tensor | None]]:
    """Segment `x` through `parent` with per-block memories `mems`; the pass and the next segment's memories."""
    inputs: list[Tensor] = []
    h = embed_tokens(parent, x, 0 if mems is None or mems[0] is None else mems[0].shape[1])
    out, new_mems = run_blocks(parent.blocks, h, mems, parent.arch.mem_len, inputs=inputs)
    used = list(mems) if mems is not None else [None] * len(parent.blocks)
    return ParentPass(inputs, used, inputs[1:] + [out], head_logits(parent, parent.norm(out))), new_mems


def parent_passes(parent: LM, probe: Iterable[tuple[Tensor, Tensor]]) -> Iterator[ParentPass]:
    """The parent's passes over `probe`'s consecutive segments, memories carried from one to the next."""
    mems = None
    for x, _ in probe:
        seg, mems = parent_pass(parent, x, mems)
        yield seg


def _call(block: Block, h: Tensor, mem: Tensor | None) -> Tensor:
    return block(h, mem) if block.kind == "attn" else block(h)


def nmse(block: Block, seg: ParentPass, p: int, paired: bool = False) -> Tensor:
    """Block `block` at position p against the parent's block there (`paired`: against the parent's blocks p - 1
    and p together, from the input of p - 1): squared error over the squared size of the parent blocks' own
    contribution (1 for a skip)."""
    target, h = seg.outputs[p], seg.inputs[p - 1 if paired else p]
    out = block(h) if paired else _call(block, h, seg.mems[p])
    return (out - target).pow(2).mean() / (target - h).pow(2).mean().clamp_min(1e-12)


Key = tuple[int, str]  # (position, the alternative's label, with AFTER_SKIP for a paired one)
AFTER_SKIP = "|after-skip"


def named(key: Key) -> str:
    """`key` as the library's files name it: "position:label"."""
    return f"{key[0]}:{key[1]}"


def paired(key: Key) -> bool:
    return key[1].endswith(AFTER_SKIP)


class Library:
    """The alternatives of every position with their weights, and what local distillation and scoring measured of
    each: `nmse_before`/`nmse_after` (on held-out training tokens) and `kl` (replace-one-block divergence)."""

    def __init__(self, parent: LM, options: list[list[BlockSpec]], calibration: dict[int, Tensor] | None = None,
                 paired_from: Sequence[int] | None = None, settings: dict[str, Any] | None = None):
        """`calibration`: per position with split alternatives, the parent block's inputs on training tokens.
        `paired_from`: per position, the index of its first paired alternative (with_pairs); none by default. A
        paired alternative starts from the weights of the same alternative unpaired. `settings`: what else its
        training and scores depend on (library_settings); a saved library of other settings is not loaded."""
        self.parent, self.options, self.settings = parent, options, settings or {}
        arch, calibration = parent.arch, calibration or {}
        starts = list(paired_from) if paired_from is not None else [len(specs) for specs in options]
        self.keys: list[list[Key]] = [[(p, s.label() + (AFTER_SKIP if c >= starts[p] else ""))
                                       for c, s in enumerate(specs)] for p, specs in enumerate(options)]
        self.spec: dict[Key, BlockSpec] = {key: s for keys, specs in zip(self.keys, options)
                                           for key, s in zip(keys, specs)}
        cuts: dict[int, dict] = {p: {} for p in range(len(options))}
        self.blocks: dict[Key, Block] = {}
        for p, specs in enumerate(options):
            for key, s in zip(self.keys[p], specs):
                self.blocks[key] = (copy.deepcopy(self.blocks[(p, s.label())]) if paired(key) else
                                    initial_block(arch, s, parent.blocks[p], calibration.get(p), cuts[p]))
        self.record: dict[str, dict[str, float]] = {}

    def exact(self, key: Key) -> bool:
        """Whether `key` is the parent's own block in its own precision, unpaired: nothing to train or score."""
        return self.spec[key] == self.parent.arch.blocks[key[0]] and not paired(key)

    def changed(self) -> list[Key]:
        """Every alternative whose local error is measured: all but the skips (1 by definition) and the exact."""
        return [key for key in self.blocks if self.spec[key].kind != "skip" and not self.exact(key)]

    def twin(self, key: Key) -> Key | None:
        """The fp32 alternative whose weights `key`, in another precision, computes with; None where there is none.
        Training an int8 block's own weights (through its simulation) was not worth it: on `tiny` and the deep
        preset every int8 twin trained alone ended within 0.008 nats of its fp32 twin's KL, most within 0.0005."""
        spec = self.spec[key]
        twin = (key[0], spec.in_precision("fp32").label() + (AFTER_SKIP if paired(key) else ""))
        return twin if spec.precision != "fp32" and twin in self.blocks else None

    def trainable(self) -> list[Key]:
        """The alternatives local distillation trains: the changed ones but those with a twin."""
        return [key for key in self.changed() if self.twin(key) is None]

    def share_twins(self) -> None:
        """Every alternative with a twin takes its (trained) weights."""
        for key, block in self.blocks.items():
            if (twin := self.twin(key)) is not None:
                block.load_state_dict(self.blocks[twin].state_dict())

    def requires(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Each paired alternative, (position, index), with the skip of the attention before it it needs."""
        return [((p, c), (p - 1, self.options[p - 1].index(BlockSpec.skip())))
                for p, keys in enumerate(self.keys) for c, key in enumerate(keys) if paired(key)]

    def note(self, key: Key, **figures: float) -> None:
        self.record.setdefault(named(key), {}).update(figures)

    def has(self, key: Key, name: str) -> bool:
        return name in self.record.get(named(key), {})

    def figure(self, key: Key, name: str, default: float | None = None) -> float:
        """What was measured of `key`; `default` where it was not (None: that is an error)."""
        figures = self.record.get(named(key), {})
        return figures[name] if default is None or name in figures else default

    def network(self, choice: Sequence[int], head: str = "fp32") -> LM:
        """The network of one alternative per position (index into that position's options), skips dropped, with
        the library's weights and its output head in precision `head`."""
        specs = [self.options[p][c] for p, c in enumerate(choice)]
        arch = replace(self.parent.arch.with_blocks([s for s in specs if s.kind != "skip"]), head_precision=head)
        model = LM(arch)
        state = {k: v for k, v in self.parent.state_dict().items() if not k.startswith("blocks.")}
        model.load_state_dict(state, strict=False)
        kept = [self.keys[p][c] for p, c in enumerate(choice) if specs[p].kind != "skip"]
        for block, key in zip(model.blocks, kept):
            block.load_state_dict(self.blocks[key].state_dict())
        return model.eval()

    def save(self, out: Path) -> None:
        """The weights and what was measured so far, in `out` (made if missing)."""
        out.mkdir(parents=True, exist_ok=True)
        tensors = {_tensor_prefix(key) + name: t.detach().contiguous() for key, block in self.blocks.items()
                   for name, t in block.state_dict().items()}
        with replacing(out / LIBRARY_FILE) as tmp:
            save_file(tensors, str(tmp))
        self.save_record(out)

    def save_record(self, out: Path) -> None:
        """What was measured so far (the weights, saved by `save`, unchanged since)."""
        atomic_write(out / LIBRARY_RECORD, json.dumps({"settings": self.settings, "alternatives": self.record,
                                                       "keys": list(map(named, self.blocks))},
                                                      indent=2) + "\n")

    def scored(self) -> bool:
        """Every alternative scored, the pairs' damage corrected too (scoring stopped between the two is not)."""
        return all(self.has(key, "kl") and (not paired(key) or self.has(key, "pair_kl")) for key in self.blocks)

    def agreement(self) -> float:
        """How stable the scored ranking is: the Spearman correlation between the alternatives' KL on the first
        and on the second half of the scoring segments (1: the same order)."""
        halves = [(self.figure(key, "kl_first_half"), self.figure(key, "kl_second_half"))
                  for key in self.blocks if not self.exact(key)]
        return _spearman(*zip(*halves)) if len(halves) > 1 else 1.0

    def load(self, out: Path) -> None:
        """The library saved in `out`, trained and scored or partly scored (see `scored`); one damaged, of another
        search or trained with other settings is refused (PlanerError), none of it loaded. Its one caller,
        `_Local.library_trained`, then trains the library again and saves it over, so that is the remedy named."""
        remedy = "it is trained again and saved over it"
        saved = read_json(out / LIBRARY_RECORD, remedy)
        if not isinstance(saved, dict) or not isinstance(saved.get("alternatives"), dict) or not isinstance(
                saved.get("keys"), list):
            raise PlanerError(f"{out / LIBRARY_RECORD} was made by another version of planer; {remedy}")
        if saved.get("settings") != json.loads(json.dumps(self.settings)):
            other = {k: v for k, v in (saved.get("settings") or {}).items() if self.settings.get(k) != v}
            raise PlanerError(f"the library in {out} was trained with other settings ("
                              + ", ".join(f"{k} {v}, not {self.settings.get(k)}" for k, v in other.items())
                              + f"); {remedy}")
        try:
            tensors = load_file(str(out / LIBRARY_FILE))
        except (SafetensorError, OSError) as e:
            raise PlanerError(f"{out / LIBRARY_FILE}: unreadable or truncated ({e}); {remedy}") from None
        states = {key: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                  for key, prefix in ((key, _tensor_prefix(key)) for key in self.blocks)}
        unfit = [named(key) for key, block in self.blocks.items()
                 if named(key) not in saved["keys"] or not _fits(states[key], block)]
        if unfit:
            raise PlanerError(f"the library in {out} lacks {len(unfit)} of this search's alternatives or holds them "
                              f"in other shapes (e.g. {unfit[0]}): it was made by another version of planer; {remedy}")
        for key, block in self.blocks.items():
            block.load_state_dict(states[key])
        self.record = saved["alternatives"]


def distil_locally(library: Library, data: Segments, probe: Sequence[tuple[Tensor, Tensor]], cfg: SearchConfig,
                   bar: tqdm | None = None, checkpoint: Path | None = None) -> None:
    """Train every trainable alternative for `cfg.local_steps` steps to reproduce its parent block (see `nmse`),
    all on one parent pass per step; each alternative's normalised MSE on `probe` is noted before and after.

    With `checkpoint` (a directory), the training's state is saved there every CHECKPOINT_S seconds, and training
    interrupted before its end continues from the last state saved: the steps an uninterrupted run would have
    taken, on the same segments (a SmolLM2-135M library trains for about half an hour on two cores)."""
    keys = library.trainable()
    params = [q for k in keys for q in library.blocks[k].parameters()]
    resumed = _resumed(library, keys, checkpoint) if cfg.local_steps and params else None
    if resumed is None:
        _note_nmse(library, library.changed(), probe, "nmse_before")
    if cfg.local_steps and params:
        opt = torch.optim.AdamW(params, lr=cfg.local_lr, betas=(0.9, 0.99), weight_decay=0.0)
        schedule = TrainConfig(steps=cfg.local_steps, lr=cfg.local_lr, warmup=min(100, cfg.local_steps // 10))
        for k in keys:
            library.blocks[k].train()
        first, mems = 0, None
        if resumed is not None:
            opt.load_state_dict(resumed["optimizer"])
            torch.set_rng_state(resumed["rng"])
            first = resumed["step"]
            mems = None if resumed["mems"] is None else [m[distributed.share(cfg.batch)] for m in resumed["mems"]]
            if bar is not None:
                bar.update(first)
        saved_at = time.perf_counter()
        for step in range(first, cfg.local_steps):
            index = step % len(data)
            x, _ = data[index]
            seg, mems = parent_pass(library.parent, x, None if index == 0 else mems)
            loss = sum(nmse(library.blocks[k], seg, k[0], paired(k)) + BALANCE * _balance(library.blocks[k])
                       + (_routing(library.blocks[k], seg, k[0]) if cfg.oracle_router else 0.0) for k in keys)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, schedule)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(params)
            for k in keys:  # each alternative as if trained alone: one's gradients never scale another's step
                torch.nn.utils.clip_grad_norm_(library.blocks[k].parameters(), 1.0)
            opt.step()
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(mean_nmse=f"{float(loss.detach()) / len(keys):.3f}")
            # rank 0's clock decides for every rank: saving gathers every rank's memories
            if checkpoint is not None and step + 1 < cfg.local_steps and distributed.broadcast(
                    time.perf_counter() - saved_at >= CHECKPOINT_S):
                _save_training(library, keys, checkpoint, step + 1, opt, mems)
                saved_at = time.perf_counter()
        for k in keys:
            library.blocks[k].eval()
    library.share_twins()
    _note_nmse(library, library.changed(), probe, "nmse_after")


def _save_training(library: Library, keys: list[Key], out: Path, step: int, opt: torch.optim.Optimizer,
                   mems: list[Tensor | None] | None) -> None:
    mems = distributed.gather_streams(mems)  # every rank's streams, so that any number of ranks can resume

    def write() -> None:
        state = {"settings": json.dumps(library.settings, sort_keys=True), "step": step,
                 "keys": list(map(named, keys)), "record": json.dumps(library.record),
                 "blocks": {named(k): library.blocks[k].state_dict() for k in keys},
                 "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "mems": mems}
        out.mkdir(parents=True, exist_ok=True)
        with replacing(out / CHECKPOINT_FILE) as tmp:
            torch.save(state, tmp)

    distributed.main_writes(write)


def _resumed(library: Library, keys: list[Key], out: Path | None) -> dict[str, Any] | None:
    """The training state saved in `out` for these alternatives and settings, loaded into `library` (its blocks
    and the errors noted before training); None where there is none, or one that cannot be used (said why)."""
    path = out / CHECKPOINT_FILE if out is not None else None
    if path is None or not path.is_file():
        return None
    try:  # tensors, numbers and strings only: nothing else is unpickled
        state = torch.load(path, weights_only=True)
        if state["keys"] != list(map(named, keys)) or state["settings"] != json.dumps(
                library.settings, sort_keys=True):
            why = "it trained other alternatives or with other settings"
        elif not all(_fits(state["blocks"][named(k)], library.blocks[k]) for k in keys):
            why = "its weights are not these alternatives' shapes"
        else:
            for k in keys:
                library.blocks[k].load_state_dict(state["blocks"][named(k)])
            library.record = json.loads(state["record"])
            return state
    except Exception as e:  # a damaged file fails inside the unpickler with whatever its bytes cause
        why = f"unreadable: {type(e).__name__}: {e}"
    if distributed.is_main():
        print(f"{path} cannot be resumed from ({why}); local distillation starts again", file=sys.stderr)
    return None


def _tensor_prefix(key: Key) -> str:
    """Where an alternative's tensors are in library.safetensors: its position and label, then the block's names."""
    return f"{key[0]}/{key[1]}/"


def _fits(state: dict[str, Tensor], block: Block) -> bool:
    """Whether saved weights are `block`'s, name for name and shape for shape (a skip has none)."""
    return {n: v.shape for n, v in state.items()} == {n: v.shape for n, v in block.state_dict().items()}


def _balance(block: Block) -> Tensor | float:
    return block.f.aux_loss if block.kind == "moe" else 0.0


def _routing(block: Block, seg: ParentPass, p: int) -> Tensor | float:
    """A split block's router against the oracle's choice at position p: the k experts whose outputs, beside the
    shared part, come closest to the parent block's contribution. (Splits are never paired.)"""
    if block.kind != "moe":
        return 0.0
    inp = seg.inputs[p]
    h = block.norm(inp).reshape(-1, inp.shape[-1]).detach()
    ids, _ = oracle_routes(block.f, h, (seg.outputs[p] - inp).reshape(h.shape))
    return router_loss(block.f.router, h, routed_to(ids, len(block.f.experts)))


@torch.no_grad()
def calibration_inputs(parent: LM, data: Segments, positions: Sequence[int], tokens: int = CALIBRATION_TOKENS
                       ) -> dict[int, Tensor]:
    """The inputs of the parent's blocks at `positions` on the first `tokens` of `data` (consecutive segments,
    memories carried), each (tokens, d_model)."""
    inputs: dict[int, list[Tensor]] = {p: [] for p in positions}
    mems, seen, index = None, 0, 0
    while positions and seen < tokens and index < len(data):
        x, _ = data[index]
        seg, mems = parent_pass(parent, x, mems)
        for p in positions:
            inputs[p].append(seg.inputs[p].reshape(-1, parent.arch.d_model))
        seen, index = seen + x.numel(), index + 1
    return {p: torch.cat(chunks)[:tokens] for p, chunks in inputs.items()}


@torch.no_grad()
def _note_nmse(library: Library, keys: list[Key], probe: Sequence[tuple[Tensor, Tensor]], name: str) -> None:
    totals = dict.fromkeys(keys, 0.0)
    for seg in parent_passes(library.parent, probe):
        for k in keys:
            totals[k] += float(nmse(library.blocks[k], seg, k[0], paired(k)))
    for k in keys:
        library.note(k, **{name: distributed.mean(totals[k] / len(probe))})


@torch.no_grad()
def score(library: Library, probe: Sequence[tuple[Tensor, Tensor]], bar: tqdm | None = None,
          saved: Callable[[], None] | None = None) -> float:
    """Note every alternative's `kl`: KL(parent || network with only that block replaced), per token, on `probe`
    (consecutive segments; the first only fills the memories unless it is the only one). The blocks before the
    replaced one see what they saw in the parent, so each pass starts at the replaced block.

    Alternatives already scored (by a search interrupted while scoring) are not scored again; `saved` is called
    after each position's, to keep what was scored (SmolLM2-135M's ~600 alternatives score for about an hour).

    Returns how stable the ranking is: the Spearman correlation between the alternatives' KL on the first and on
    the second half of the scored segments (1: the same order)."""
    parent = library.parent
    passes = list(parent_passes(parent, probe))
    first = 1 if len(passes) > 1 else 0  # the segments scored
    half = first + (len(passes) - first) // 2
    if bar is not None:
        bar.update(sum(library.has(key, "kl") and not library.exact(key) for key in library.blocks))
    for p, keys in enumerate(library.keys):
        todo = [key for key in keys if not library.has(key, "kl")]
        for key in todo:
            if library.exact(key):
                library.note(key, kl=0.0)
                continue
            start = p - 1 if paired(key) else p  # a paired one replaces the attention before it (by a skip) too
            replaced = [library.blocks[(p - 1, "skip")]] if paired(key) else []
            blocks = list(parent.blocks[:start]) + replaced + [library.blocks[key]] + list(parent.blocks[p + 1:])
            own: list[Tensor | None] | None = None
            kl = []
            for seg in passes:
                later = own[start + 1:] if own is not None else [None] * (len(blocks) - start - 1)
                out, own = run_blocks(blocks, seg.inputs[start], seg.mems[:start + 1] + later, parent.arch.mem_len,
                                      start=start)
                kl.append(distributed.mean(float(distillation_loss(head_logits(parent, parent.norm(out)), seg.logits))))
            library.note(key, kl=sum(kl[first:]) / len(kl[first:]),
                         kl_first_half=sum(kl[first:half]) / max(1, half - first),
                         kl_second_half=sum(kl[half:]) / max(1, len(kl) - half))
            if bar is not None:
                bar.update(1)
        if todo and saved is not None:
            saved()
    for key in library.blocks:  # the pair's damage less the skip's: the selection adds the two
        if paired(key) and not library.has(key, "pair_kl"):
            library.note(key, pair_kl=library.figure(key, "kl"),
                         kl=library.figure(key, "kl") - library.figure((key[0] - 1, "skip"), "kl"))
    return library.agreement()


@torch.no_grad()
def head_damage(parent: LM, probe: Sequence[tuple[Tensor, Tensor]], precision: str) -> float:
    """KL(parent || parent with its output head in `precision`) per token on `probe`, as `score` scores a block."""
    kl = []
    for seg in parent_passes(parent, probe):
        changed = head_logits(parent, parent.norm(seg.outputs[-1]), precision)
        kl.append(distributed.mean(float(distillation_loss(changed, seg.logits))))
    first = 1 if len(kl) > 1 else 0
    return sum(kl[first:]) / len(kl[first:])


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ranks = [torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def score_probe(training: TrainingSplit, cut: int, arch: Architecture, cfg: SearchConfig,
                streams: slice = slice(None)) -> list[tuple[Tensor, Tensor]]:
    """The segments alternatives are scored on: the first `cfg.score_tokens` of the held-out training tokens (as
    many streams as `cfg.probe_flops` allows each segment, as the supernet's probe)."""
    data = Segments(held_out_tokens(training, cut, cfg), cfg.batch, arch.tgt_len, streams)
    segments = [data[i] for i in range(min(len(data), max(2, cfg.score_tokens // (cfg.batch * arch.tgt_len))))]
    keep = max(1, int(cfg.probe_flops // (arch.tgt_len * arch.flops_per_token())))
    return [(x[:keep], y[:keep]) for x, y in segments]


def search_local(baseline: LM, training: TrainingSplit, space: SearchSpace, table: LatencyTable, dep: Deployment,
                 target: Target, *, cfg: SearchConfig = SearchConfig(), log_path: Path | None = None,
                 show_progress: bool = True, baseline_onnx: str | None = None, library_dir: Path | None = None
                 ) -> SearchOutcome:
    """The local search (see the module's docstring) on the training split alone, returning what the supernet
    search returns. `library_dir` receives the trained library (and a finished one there is reused)."""
    for name, value, allowed in (("init", cfg.init, INITS), ("selection", cfg.selection, SELECTIONS),
                                 ("scoring", cfg.scoring, SCORINGS)):
        if value not in allowed:
            raise ValueError(f"SearchConfig.{name} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.local_steps < 1:
        raise ValueError(f"SearchConfig.local_steps must be at least 1, got {cfg.local_steps}")
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="planer-local-") as tmp:
        run = _Local(baseline.eval(), training, space, table, dep.resolved(table), target, cfg, Path(tmp), log_path,
                     show_progress, baseline_onnx)
        run.library_trained(library_dir)
        run.heads_scored()
        run.solve()
        chosen = run.choice()
    return SearchOutcome(chosen, run.candidates, run.table, run.target_ms)


class _Local:
    """One local search: the baseline timed, the library built, trained and scored, then rounds of exact selection
    with the engine's measurements calibrating the table. Rank 0 alone exports, times and writes."""

    def __init__(self, baseline: LM, training: TrainingSplit, space: SearchSpace, table: LatencyTable,
                 dep: Deployment, target: Target, cfg: SearchConfig, tmp: Path, log_path: Path | None,
                 show_progress: bool, baseline_onnx: str | None):
        self.baseline, self.training, self.dep, self.cfg, self.tmp = baseline, training, dep, cfg, tmp
        self.log_path, self.show_progress = log_path, show_progress
        self.arch = arch = baseline.arch
        self.main = distributed.is_main()
        self.base_path, self.baseline_ms = timed_baseline(baseline, dep, tmp, baseline_onnx)
        self.target_ms = target.ms_for(self.baseline_ms)
        self.table = table.calibrate([(arch, self.baseline_ms)])
        self.measured: list[tuple[Architecture, float]] = []
        self.cut = arch_start(training, cfg)
        self.held_out = held_out_tokens(training, self.cut, cfg)
        share = distributed.share(cfg.batch)
        self.data = Segments(training.tokens[:self.cut], cfg.batch, arch.tgt_len, share)
        self.probe = held_out_probe(training, arch, cfg, share)
        every = alternatives(arch, space)
        self.options, paired_from = undominated(every, self.table), None
        if dropped := sum(map(len, every)) - sum(map(len, self.options)):
            self.say(f"{dropped} alternatives left out before training: the table times them at or above the block "
                     "they would replace")
        if cfg.pairs and cfg.scoring == "kl":  # a pair's local errors do not add up with the skip's
            self.options, paired_from = with_pairs(arch, self.options)
        self.parent = ranked_parent(baseline, self.probe, cfg.init)
        splits = [p for p, specs in enumerate(self.options) if any(s.kind == "moe" for s in specs)]
        self.library = Library(self.parent, self.options, calibration_inputs(self.parent, self.data, splits),
                               paired_from, library_settings(cfg))
        self.candidates: list[Candidate] = []
        self.by_choice: dict[tuple[int, ...], Candidate] = {}
        # The output head's precisions: int8 where the deployment runs it and the table timed the fixed part so
        # (with KL scoring only: a head's damage has no normalised MSE to add up with the blocks')
        self.heads = ["fp32"] + [h for h in dep.precisions if h != "fp32" and self.table.has(fixed_label(h))
                                 and cfg.scoring == "kl"]
        self.head_damage: dict[str, float] = {}

    def say(self, text: str) -> None:
        if self.main and self.show_progress:
            tqdm.write(text)

    def library_trained(self, out: Path | None) -> None:
        """The library trained and scored, saved in `out`; what an earlier run of the same search saved there (the
        library, trained or also scored, or the training's last state) is taken up where it stopped."""
        loaded = False
        if out is not None and (out / LIBRARY_RECORD).is_file():
            try:
                self.library.load(out)
                loaded = True
            except PlanerError as e:  # damaged, or saved by a search of other settings: made again, saved over it
                if self.main:
                    print(e, file=sys.stderr)
        began = time.perf_counter()
        steps = self.cfg.local_steps if self.cfg.local_train else 0
        if not loaded:
            with tqdm(total=steps, desc=f"local distillation of {len(self.library.trainable())} alternatives",
                      unit="step", disable=not (self.show_progress and self.main), dynamic_ncols=True) as bar:
                distil_locally(self.library, self.data, self.probe, replace(self.cfg, local_steps=steps), bar, out)
            if out is not None:
                distributed.main_writes(lambda: (self.library.save(out),
                                                 (out / CHECKPOINT_FILE).unlink(missing_ok=True)))
        trained_s, scored_s = time.perf_counter() - began, None
        if not self.library.scored():
            probe = score_probe(self.training, self.cut, self.arch, self.cfg, distributed.share(self.cfg.batch))
            scored = sum(not self.library.exact(key) for key in self.library.blocks)
            with tqdm(total=scored, desc="scoring: replace-one-block KL on held-out training tokens", unit="block",
                      disable=not (self.show_progress and self.main), dynamic_ncols=True) as bar:
                score(self.library, probe, bar, None if out is None else
                      lambda: distributed.main_writes(lambda: self.library.save_record(out)))
            if out is not None:
                distributed.main_writes(lambda: self.library.save_record(out))
            scored_s = round(time.perf_counter() - began - trained_s, 1)
        agreement = self.library.agreement()
        self.say(f"  rank agreement of the scores between the two halves of the scoring tokens: {agreement:.3f} "
                 "(Spearman)")
        # a library taken up from an earlier run is logged too; None: no time spent training or scoring in this one
        _log(self.log_path, {"library": self.library.record, "local_steps": steps, "init": self.cfg.init,
                             "score_tokens": self.cfg.score_tokens, "score_rank_agreement": agreement,
                             "trained_s": None if loaded else round(trained_s, 1),
                             "scored_s": scored_s})

    def heads_scored(self) -> None:
        """The damage of each precision the output head may run in (KL, as a block's), on the scoring tokens."""
        probe = score_probe(self.training, self.cut, self.arch, self.cfg, distributed.share(self.cfg.batch))
        self.head_damage = {h: head_damage(self.parent, probe, h) if h != "fp32" else 0.0 for h in self.heads}
        for h in self.heads[1:]:
            self.say(f"  the output head in {h}: KL {self.head_damage[h]:.4f}, the fixed part "
                     f"{self.table.fixed_ms(h):.2f} ms against {self.table.fixed_ms():.2f} in fp32")
        _log(self.log_path, {"head_damage": self.head_damage})

    def problem(self) -> tuple[list[list[float]], list[list[float]], float]:
        """Scores, costs and budget of the exact selection: one row per block position, then one for the output
        head (its precisions: the damage of each and what it saves on the fixed part)."""
        scores = [[self._score(key, s) for key, s in zip(self.library.keys[p], specs)]
                  for p, specs in enumerate(self.options)]
        costs = [[self.table.block_ms(s) for s in specs] for specs in self.options]
        fixed = [self.table.fixed_ms(h) for h in self.heads]
        scores.append([self.head_damage[h] for h in self.heads])
        costs.append([ms - min(fixed) for ms in fixed])
        budget = (1 - self.cfg.margin) * self.target_ms / self.table.scale - min(fixed)
        return scores, costs, budget

    def _score(self, key: Key, spec: BlockSpec) -> float:
        if self.cfg.scoring == "kl":
            return self.library.figure(key, "kl")
        if spec.kind == "skip":  # its local error is 1 by definition (nmse), and it is never trained
            return 1.0
        return self.library.figure(key, "nmse_after", 0.0)  # the parent's own block: not trained, exact

    def solve(self) -> None:
        """Rounds of exact selection: the best `cfg.solutions` distinct networks under the calibrated table, each
        new one timed beside the baseline, until a round finds none new. With trials, then also the best network
        keeping each other number of attention blocks: the summed KL of blocks judged alone favours narrowing
        every attention block over dropping some, and which is better shows only after training (a tiny 2x
        build chose all four attention blocks narrowed, 1.064x the reference, where the supernet's dropped two:
        benchmarks/RESULTS.md), so the trials decide between them."""
        head = [[False] * len(self.heads)]  # the head's row (problem): no attention block, one shape
        attn = [[s.kind == "attn" for s in specs] for specs in self.options] + head
        shapes = [[s.in_precision("fp32") for s in specs] for specs in self.options] + [["head"] * len(self.heads)]
        requires = self.library.requires()
        rnd = 0
        for rnd in range(self.cfg.rounds):
            scores, costs, budget = self.problem()
            solutions = (select(scores, costs, budget, best=self.cfg.solutions, at_least=[(attn, 1)], alike=shapes,
                                requires=requires)
                         if self.cfg.selection == "exact" else
                         greedy(scores, costs, budget, at_least=[(attn, 1)], requires=requires))
            new = [s for s in solutions if s.choice not in self.by_choice]
            if not solutions:
                self.say(f"round {rnd}: no network fits {self.target_ms:.2f} ms less the margin under the "
                         "calibrated table")
            for s in new:
                self.assess(s.choice, s.score, rnd)
            if not new:
                break
        if self.cfg.trials > 1 and self.cfg.selection == "exact":
            other = [[not x for x in row] for row in attn[:-1]] + head
            scores, costs, budget = self.problem()
            kept = {len(c.arch.attn_positions) for c in self.candidates}
            for n in range(1, sum(any(row) for row in attn) + 1):  # exactly n attention blocks
                if n in kept:
                    continue
                found = select(scores, costs, budget, at_least=[(attn, n), (other, len(self.options) - n)],
                               requires=requires)
                if found and found[0].choice not in self.by_choice:
                    self.assess(found[0].choice, found[0].score, rnd)
        if not self.candidates:
            raise InfeasibleTarget(f"no network fits the target {self.target_ms:.2f} ms less the "
                                   f"{self.cfg.margin:.0%} margin kept for the machine's noise; raise the target or "
                                   "widen the space")

    def assess(self, choice: tuple[int, ...], damage: float, rnd: int) -> Candidate:
        """Export, time beside the baseline, evaluate on held-out training tokens, calibrate and log. `choice`
        ends with the head's precision (problem's last row)."""
        model = self.library.network(choice[:-1], self.heads[choice[-1]])
        base_ms = cand_ms = spread = loss = 0.0
        path = self.tmp / f"candidate-{len(self.candidates)}.onnx"
        if self.main:
            export_lm(model, path, **self.dep.export_options())
            base_stats, cand_stats = measure([(self.base_path, self.arch), (str(path), model.arch)], self.dep)
            loss = evaluate(model, self.held_out, self.training.unit, batch=8)["loss"]
            base_ms, cand_ms, spread = base_stats.p50, cand_stats.p50, cand_stats.spread
        base_ms, cand_ms, spread, loss = distributed.broadcast((base_ms, cand_ms, spread, loss))
        predicted = self.table.predict(model.arch)
        self.measured.append((model.arch, cand_ms * self.baseline_ms / base_ms))
        self.table = self.table.calibrate(self.measured)
        specs = tuple(self.options[p][c] for p, c in enumerate(choice[:-1]))
        labels = [self.library.keys[p][c][1] for p, c in enumerate(choice[:-1])]  # paired ones marked
        labels += [f"head@{model.arch.head_precision}"] if model.arch.head_precision != "fp32" else []
        candidate = Candidate(rnd, model.arch, predicted, cand_ms, base_ms, loss, model, onnx=str(path),
                              positions=specs)
        self.candidates.append(candidate)
        self.by_choice[choice] = candidate
        _log(self.log_path, {"round": rnd, "target_ms": self.target_ms, "baseline_ms": base_ms,
                             "measured_ms": cand_ms, "measured_spread": spread, "predicted_ms": predicted,
                             "calibration": self.table.scale, "summed_kl": damage, "held_out_loss": loss,
                             "arch": labels})
        self.say(f"round {rnd}: {' '.join(labels)}\n  measured {cand_ms:.2f} ms (predicted "
                 f"{predicted:.2f}, baseline {base_ms:.2f}, target {self.target_ms:.2f}); summed KL {damage:.4f}, "
                 f"held-out loss {loss:.4f}")
        return candidate

    def meets(self, c: Candidate) -> bool:
        return c.measured_ms / c.baseline_ms <= self.target_ms / self.baseline_ms

    def choice(self) -> Candidate:
        """Among the networks that met the target (timed again together), the lowest held-out loss, or with trials
        the best after a short distillation each; the fastest measured when none met it."""
        met = [c for c in self.candidates if self.meets(c)]
        _confirm(met, self.base_path, self.arch, self.dep, self.log_path)
        feasible = [c for c in self.candidates if self.meets(c)]
        if not feasible:
            return min(self.candidates, key=lambda c: c.measured_ms / c.baseline_ms)
        if not self.cfg.trials:
            return min(feasible, key=lambda c: c.held_out_loss)
        return _trials(_shortlist(feasible, self.cfg.trials), self.baseline, self.training, self.cut, self.cfg,
                       self.tmp, self.log_path, self.show_progress)
