"""The supernet: P positions, each able to become any candidate block of the search space.

Weights come from the baseline (PLANER): attention candidates take the
baseline's first h heads (the search orders them by importance first:
planer.search.heads), FFN candidates its hidden units sorted by
importance (so a narrower FFN keeps the units that matter most), and MoE
experts are upcycled copies of that FFN with a small perturbation so that the
router can specialise them. FFN and MoE candidates share weights at a
position: all FFN widths slice one FFN; every MoE candidate (E, k, width)
uses the first E experts of one pool of upcycled experts, sliced to its
width, with one router per E. Attention candidates do not: each head count
has its own copy of the baseline's first heads, trained only when sampled.
A linear candidate (attention replaced by one projection) starts as the map
the baseline's attention computes when a token attends only to itself
(Attention.as_linear) and shares the attention candidates' norm.
A block's fp32 and int8 candidates share its weights; an int8 candidate
computes as the engine will (planer.nn.quant), so the derivation sees what
int8 costs in loss and the shared weights learn to bear it.

Training is single-path: each step samples one candidate per position
(hard Gumbel-softmax with the straight-through estimator), so only sampled
blocks run and the architecture logits still receive gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from planer.arch import Architecture, BlockSpec
from planer.nn import LM, LMOutput
from planer.nn.attention import Attention
from planer.nn.ffn import FFN
from planer.nn.model import Block, embed_tokens, head_logits, init_weights, make_norm, next_memory
from planer.nn.moe import dispatch
from planer.nn.routing import balance_loss, route
from planer.nn.quant import QLinear, computing
from planer.space import SearchSpace


def weight_order(ffn: FFN) -> Tensor:
    """Hidden units of `ffn`, most important first (norm of the unit's input row x output column)."""
    return (ffn.up.weight.norm(dim=1) * ffn.down.weight.norm(dim=0)).argsort(descending=True)


@torch.no_grad()
def copy_ffn(dst: FFN, src: FFN, order: Tensor) -> None:
    """dst takes src's hidden units in `order` (as many as both have); extra units keep their init."""
    n = min(dst.up.out_features, src.up.out_features)
    units = order[:n]
    pairs = [(dst.up, src.up)] + ([(dst.gate, src.gate)] if hasattr(dst, "gate") and hasattr(src, "gate") else [])
    for d, s in pairs:
        d.weight[:n] = s.weight[units]
        if d.bias is not None and s.bias is not None:
            d.bias[:n] = s.bias[units]
    dst.down.weight[:, :n] = src.down.weight[:, units]
    if dst.down.bias is not None and src.down.bias is not None:
        dst.down.bias.copy_(src.down.bias)


@torch.no_grad()
def copy_attention(dst: Attention, src: Attention) -> None:
    """dst takes src's first heads (and kv heads); heads of another size keep their init."""
    hd = dst.head_dim
    if src.head_dim != hd or src.pos != dst.pos:
        return
    h, kv = min(dst.heads, src.heads), min(dst.kv_heads, src.kv_heads)
    dst.q.weight[: h * hd] = src.q.weight[: h * hd]
    dst.kv.weight.view(2, dst.kv_heads, hd, -1)[:, :kv] = src.kv.weight.view(2, src.kv_heads, hd, -1)[:, :kv]
    dst.o.weight[:, : h * hd] = src.o.weight[:, : h * hd]
    if dst.q.bias is not None and src.q.bias is not None:
        dst.q.bias[: h * hd] = src.q.bias[: h * hd]
        dst.kv.bias.view(2, dst.kv_heads, hd)[:, :kv] = src.kv.bias.view(2, src.kv_heads, hd)[:, :kv]
        dst.o.bias.copy_(src.o.bias)
    if dst.pos == "relative":
        dst.r.weight[: h * hd] = src.r.weight[: h * hd]
        dst.r_w_bias[:h] = src.r_w_bias[:h]
        dst.r_r_bias[:h] = src.r_r_bias[:h]


@torch.no_grad()
def copy_linear(dst: nn.Linear, src: Attention) -> None:
    """dst takes the map src computes when each token attends only to itself (Attention.as_linear)."""
    weight, bias = src.as_linear()
    dst.weight.copy_(weight)
    if dst.bias is not None and bias is not None:
        dst.bias.copy_(bias)


def _nearest(blocks: Sequence[Block], index: int, kinds: tuple[str, ...]) -> Block | None:
    found = [i for i, b in enumerate(blocks) if b.kind in kinds]
    return blocks[min(found, key=lambda i: (abs(i - index), i))] if found else None


class Position(nn.Module):
    """One position of the supernet: every candidate; FFN and MoE candidates share weights, attention ones do not
    (a linear candidate shares only their norm)."""

    def __init__(self, arch: Architecture, candidates: Sequence[BlockSpec], attn_src: Block | None,
                 ffn_src: Block | None, perturb: float):
        super().__init__()
        self.candidates = tuple(candidates)
        d = arch.d_model
        attns = list(dict.fromkeys(_shape(c) for c in candidates if c.kind == "attn"))
        linear = any(c.kind == "linear" for c in candidates)
        ffn_widths = [c.d_inner for c in candidates if c.kind == "ffn"]
        moes = [c for c in candidates if c.kind == "moe"]
        order = weight_order(ffn_src.f) if ffn_src is not None else None
        if attns or linear:
            self.attn_norm = copy.deepcopy(attn_src.norm) if attn_src is not None else make_norm(arch)
        if attns:
            self.attn = nn.ModuleDict({c.label(): Attention(arch, c) for c in attns})
            for module in self.attn.values():
                module.apply(init_weights)
                if attn_src is not None:
                    copy_attention(module, attn_src.f)
        if linear:
            self.linear = QLinear(d, d, bias=arch.attn_bias)
            self.linear.apply(init_weights)
            if attn_src is not None:
                copy_linear(self.linear, attn_src.f)
        if ffn_widths or moes:
            self.ffn_norm = copy.deepcopy(ffn_src.norm) if ffn_src is not None else make_norm(arch)
        if ffn_widths:
            self.ffn = FFN(d, max(ffn_widths), arch.activation, arch.bias)
            self.ffn.apply(init_weights)
            if ffn_src is not None:
                copy_ffn(self.ffn, ffn_src.f, order)
        if moes:
            width = max(c.d_inner for c in moes)
            self.experts = nn.ModuleList(FFN(d, width, arch.activation, arch.bias)
                                         for _ in range(max(c.experts for c in moes)))
            for expert in self.experts:
                expert.apply(init_weights)
                if ffn_src is not None:
                    copy_ffn(expert, ffn_src.f, order)
                    with torch.no_grad():
                        for p in expert.parameters():
                            p.add_(torch.randn_like(p) * perturb * (p.std() if p.numel() > 1 else 0.0))
            self.routers = nn.ModuleDict({str(e): nn.Linear(d, e, bias=False)
                                          for e in sorted({c.experts for c in moes})})
            self.routers.apply(init_weights)

    def forward(self, choice: int, x: Tensor, mem: Tensor | None) -> tuple[Tensor, Tensor]:
        """Output of candidate `choice` (residual included) and its balance loss (0 unless MoE)."""
        spec = self.candidates[choice]
        if spec.kind == "skip":
            return x, x.new_zeros(())
        with computing(self, spec.precision):
            return self._run(spec, x, mem)

    def _run(self, spec: BlockSpec, x: Tensor, mem: Tensor | None) -> tuple[Tensor, Tensor]:
        zero = x.new_zeros(())
        if spec.kind == "attn":
            context = x if mem is None else torch.cat([mem, x], dim=1)
            return x + self.attn[_shape(spec).label()](self.attn_norm(context), x.shape[1]), zero
        if spec.kind == "linear":
            return x + self.linear(self.attn_norm(x)), zero
        h = self.ffn_norm(x)
        if spec.kind == "ffn":
            return x + self.ffn(h, spec.d_inner), zero
        flat = h.reshape(-1, h.shape[-1])
        probs, gates, ids = route(self.routers[str(spec.experts)](flat), spec.top_k)
        experts = [partial(e, width=spec.d_inner) for e in self.experts[: spec.experts]]
        out = dispatch(flat, gates / spec.top_k, ids, experts).reshape(h.shape)  # copies: their mean is the FFN
        return x + out, balance_loss(probs, ids, spec.experts)

    @torch.no_grad()
    def extract(self, choice: int, arch: Architecture) -> Block:
        """The chosen candidate as a standalone Block with the supernet's weights."""
        spec = self.candidates[choice]
        block = Block(arch, spec)
        if spec.kind == "attn":
            block.norm.load_state_dict(self.attn_norm.state_dict())
            block.f.load_state_dict(self.attn[_shape(spec).label()].state_dict())
        elif spec.kind == "linear":
            block.norm.load_state_dict(self.attn_norm.state_dict())
            block.f.load_state_dict(self.linear.state_dict())
        elif spec.kind == "ffn":
            block.norm.load_state_dict(self.ffn_norm.state_dict())
            copy_ffn(block.f, self.ffn, torch.arange(spec.d_inner))
        elif spec.kind == "moe":
            block.norm.load_state_dict(self.ffn_norm.state_dict())
            block.f.router.weight.copy_(self.routers[str(spec.experts)].weight)
            for dst, src in zip(block.f.experts, self.experts):
                copy_ffn(dst, src, torch.arange(spec.d_inner))
                dst.down.weight /= spec.top_k  # a MoE block sums its k experts; the supernet averaged them
                if dst.down.bias is not None:
                    dst.down.bias /= spec.top_k
        return block


def _shape(spec: BlockSpec) -> BlockSpec:
    """The block whatever its precision: what the candidates that share weights have in common."""
    return spec.in_precision("fp32")


class SuperNet(nn.Module):
    def __init__(self, baseline: LM, space: SearchSpace, *, perturb: float = 0.01, baseline_bias: float = 0.0):
        super().__init__()
        arch = baseline.arch
        space.check_supernet(arch)
        self.arch = arch
        self.space = space
        self.embed = copy.deepcopy(baseline.embed)
        self.emb_scale = baseline.emb_scale
        self.pos_embed = copy.deepcopy(baseline.pos_embed)
        self.norm = copy.deepcopy(baseline.norm)
        self.head = copy.deepcopy(baseline.head)
        blocks = list(baseline.blocks)
        n = len(blocks)
        self.positions = nn.ModuleList()
        for p in range(space.positions):
            source = min(n - 1, p * n // space.positions)
            self.positions.append(Position(arch, space.candidates, _nearest(blocks, source, ("attn",)),
                                           _nearest(blocks, source, ("ffn",)), perturb))
        self.alpha = nn.Parameter(torch.zeros(space.positions, len(space.candidates)))
        with torch.no_grad():  # optionally start the search at the baseline (in any precision) instead of at uniform
            for p, c in enumerate(self.baseline_choice(baseline.arch)):
                self.alpha[p, self.variants(c)] += baseline_bias

    def baseline_choice(self, arch: Architecture) -> list[int]:
        """Per position, the baseline block it inherits from when that block is a candidate (each baseline
        block is claimed by the first position mapped to it), otherwise skip (or the first candidate)."""
        index = {c: i for i, c in enumerate(self.space.candidates)}
        fallback = index.get(BlockSpec.skip(), 0)
        n, positions = len(arch.blocks), self.space.positions
        choice, claimed = [], set()
        for p in range(positions):
            b = min(n - 1, p * n // positions)
            spec = arch.blocks[b]
            choice.append(index[spec] if b not in claimed and spec in index else fallback)
            claimed.add(b)
        return choice

    def variants(self, c: int) -> list[int]:
        """Candidate `c` and the candidates that are the same block in another precision."""
        shape = _shape(self.space.candidates[c])
        return [i for i, other in enumerate(self.space.candidates) if _shape(other) == shape]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name != "alpha"]

    def sample(self, tau: float) -> tuple[list[int], Tensor]:
        """One candidate per position from Gumbel-softmax(alpha / tau), and straight-through weights
        (each 1 in value) through which the architecture logits receive gradients."""
        hard = F.gumbel_softmax(self.alpha, tau=tau, hard=True)
        choice = hard.argmax(dim=-1)
        return choice.tolist(), hard.gather(1, choice[:, None])[:, 0]

    def forward(self, idx: Tensor, choice: Sequence[int], weights: Tensor | None = None,
                mems: list[Tensor] | None = None) -> LMOutput:
        """Run the sampled network; memories are kept for every position (a later sample may differ)."""
        x = embed_tokens(self, idx, 0 if not mems else mems[0].shape[1])
        x, new_mems, aux = self.run_positions(x, choice, mems, weights=weights)
        return LMOutput(self.logits(x), new_mems, aux)

    def run_positions(self, x: Tensor, choice: Sequence[int], mems: Sequence[Tensor | None] | None, *,
                      start: int = 0, weights: Tensor | None = None, inputs: list[Tensor] | None = None
                      ) -> tuple[Tensor, list[Tensor | None], Tensor]:
        """Positions `start`.. on `x` (the input to position `start`): the output before the final norm, the
        memories for the next segment (those before `start` passed through from `mems`) and the balance loss.
        `inputs`, when given, receives the input each position saw."""
        mem_len = self.arch.mem_len
        aux = x.new_zeros(())
        new_mems = list(mems[:start]) if mems is not None else [None] * start
        for p in range(start, len(self.positions)):
            if inputs is not None:
                inputs.append(x)
            mem = None if mems is None else mems[p]
            new_mems.append(next_memory(x, mem, mem_len).detach())
            y, block_aux = self.positions[p](choice[p], x, mem)
            x = y if weights is None else x + weights[p] * (y - x)
            aux = aux + block_aux
        return x, new_mems, aux

    def logits(self, x: Tensor) -> Tensor:
        return head_logits(self, self.norm(x))

    def probabilities(self) -> Tensor:
        return self.alpha.softmax(dim=-1)

    def expected_latency(self, block_ms: Tensor, fixed_ms: float) -> Tensor:
        """E[latency] under the current architecture distribution (differentiable in alpha)."""
        return fixed_ms + (self.probabilities() * block_ms).sum()

    def argmax(self) -> list[int]:
        """The most probable candidate per position. If that has no attention (the memory needs one), the
        position where an attention candidate costs the least log-probability takes its best one."""
        logp = self.alpha.detach().log_softmax(-1)
        choice = logp.argmax(dim=-1).tolist()
        attn = [i for i, c in enumerate(self.space.candidates) if c.kind == "attn"]
        if attn and not any(self.space.candidates[c].kind == "attn" for c in choice):
            best_attn = logp[:, attn].max(dim=1)
            p = int((logp.max(dim=1).values - best_attn.values).argmin())
            choice[p] = attn[int(best_attn.indices[p])]
        return choice

    def derive(self, choice: Sequence[int]) -> Architecture:
        return self.arch.with_blocks([self.space.candidates[c] for c in choice
                                      if self.space.candidates[c].kind != "skip"])

    @torch.no_grad()
    def extract(self, choice: Sequence[int]) -> LM:
        """The chosen network as a standalone LM carrying the supernet's weights (skips dropped)."""
        arch = self.derive(choice)
        model = LM(arch)
        model.embed.load_state_dict(self.embed.state_dict())
        if self.pos_embed is not None:
            model.pos_embed.load_state_dict(self.pos_embed.state_dict())
        model.norm.load_state_dict(self.norm.state_dict())
        if self.head is not None:
            model.head.load_state_dict(self.head.state_dict())
        kept = [(p, c) for p, c in enumerate(choice) if self.space.candidates[c].kind != "skip"]
        for block, (p, c) in zip(model.blocks, kept):
            block.load_state_dict(self.positions[p].extract(c, arch).state_dict())
        return model


def inherit(baseline: LM, blocks: Sequence[BlockSpec]) -> LM:
    """The network of `blocks`, one per position of a supernet with len(blocks) positions (skips drop one; as
    many as the baseline's blocks: block for block), with the weights that supernet gives its candidates before
    any training: the baseline's, sliced, and experts upcycled from its FFN."""
    if not blocks:
        raise ValueError("need at least one block")
    candidates = tuple(dict.fromkeys(blocks))
    net = SuperNet(baseline, SearchSpace(len(blocks), candidates))
    return net.extract([candidates.index(b) for b in blocks])
