"""The language model built from an `Architecture`.

Embedding -> pre-norm residual blocks -> final norm -> (tied) output head.
Every attention block carries a Transformer-XL memory: the hidden states that
entered it during the previous segment(s), at most `mem_len` of them, reused
without gradient. `forward` takes the memories and returns the new ones. A
linear block, attention's replacement, sees only its own token: it has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from planer.arch import Architecture, BlockSpec
from planer.nn.attention import Attention
from planer.nn.ffn import FFN
from planer.nn.moe import MoE
from planer.nn.quant import QLinear, linear, quantized_linears, set_precision


def make_norm(arch: Architecture) -> nn.Module:
    if arch.norm == "rmsnorm":
        return nn.RMSNorm(arch.d_model, eps=arch.norm_eps)
    return nn.LayerNorm(arch.d_model, eps=arch.norm_eps)


class Block(nn.Module):
    """One pre-norm residual sublayer: x + dropout(f(norm(x)))."""

    def __init__(self, arch: Architecture, spec: BlockSpec, dropout: float = 0.0, dropatt: float = 0.0):
        super().__init__()
        self.kind = spec.kind
        if spec.kind == "skip":
            return
        self.norm = make_norm(arch)
        self.drop = nn.Dropout(dropout)
        if spec.kind == "attn":
            self.f: nn.Module = Attention(arch, spec, dropatt)
        elif spec.kind == "linear":  # biased as the attention it replaces (Attention.as_linear)
            self.f = QLinear(arch.d_model, arch.d_model, bias=arch.attn_bias)
        elif spec.kind == "ffn":
            self.f = FFN(arch.d_model, spec.d_inner, arch.activation, arch.bias)
        else:
            self.f = MoE(arch.d_model, spec.experts, spec.top_k, spec.d_inner, arch.activation, arch.bias, spec.shared)
        set_precision(self.f, spec.precision)

    def forward(self, x: Tensor, mem: Tensor | None = None) -> Tensor:
        if self.kind == "skip":
            return x
        if self.kind == "attn":
            context = x if mem is None else torch.cat([mem, x], dim=1)
            return x + self.drop(self.f(self.norm(context), x.shape[1]))
        return x + self.drop(self.f(self.norm(x)))


@dataclass
class LMOutput:
    logits: Tensor  # (B, T, vocab)
    mems: list[Tensor]  # one (B, <=mem_len, d_model) per attention block
    aux_loss: Tensor  # sum of the MoE blocks' load-balancing losses (0 without MoE)
    hidden: list[Tensor] = field(default_factory=list)  # each block's output (B, T, d), when asked for


def embed_tokens(model: nn.Module, idx: Tensor, offset: int) -> Tensor:
    """The input of the first block, for a model (LM or supernet) with `embed`, `emb_scale` and `pos_embed`:
    learned absolute positions count from the start of the memory window, `offset` tokens before idx."""
    x = model.embed(idx) * model.emb_scale
    if model.pos_embed is not None:
        x = x + model.pos_embed(torch.arange(offset, offset + idx.shape[1], device=idx.device))
    return x


def head_logits(model: nn.Module, x: Tensor, precision: str | None = None) -> Tensor:
    """Logits of the final hidden states `x` (already normalised), for a model (LM or supernet) with `embed` and
    `head`: the output head, or the input embedding transposed when the two are tied; computed in `precision`
    (default: the architecture's head_precision)."""
    weight = model.embed.weight if model.head is None else model.head.weight
    return linear(x, weight, None, precision or model.arch.head_precision)


def next_memory(x: Tensor, mem: Tensor | None, mem_len: int) -> Tensor:
    """What an attention block keeps for the next segment: the last `mem_len` positions of its memory followed by
    this segment's input `x`."""
    seen = x if mem is None else torch.cat([mem, x], dim=1)
    return seen[:, seen.shape[1] - min(mem_len, seen.shape[1]):]


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation (normal, std 0.02; zero biases), for a new model and for a supernet's new
    candidates alike; apply it with `module.apply`."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class LM(nn.Module):
    def __init__(self, arch: Architecture, dropout: float = 0.0, dropatt: float = 0.0):
        super().__init__()
        self.arch = arch.validate()
        self.embed = nn.Embedding(arch.vocab_size, arch.d_model)
        self.pos_embed = nn.Embedding(arch.max_positions, arch.d_model) if arch.pos == "learned" else None
        self.emb_scale = math.sqrt(arch.d_model) if arch.scale_embeddings else 1.0
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(arch, spec, dropout, dropatt) for spec in arch.blocks)
        self.norm = make_norm(arch)
        self.head = None if arch.tie_embeddings else nn.Linear(arch.d_model, arch.vocab_size, bias=False)
        self.apply(init_weights)

    def forward(self, idx: Tensor, mems: list[Tensor] | None = None, mem_len: int | None = None,
                hidden: bool = False) -> LMOutput:
        """idx (B, T) token ids; mems from the previous call (None at the start of a stream); `hidden`: return
        every block's output too (global distillation matches them to the teacher's)."""
        mem_len = self.arch.mem_len if mem_len is None else mem_len
        attn = [i for i, b in enumerate(self.blocks) if b.kind == "attn"]
        if mems is not None and len(mems) != len(attn):
            raise ValueError(f"expected {len(attn)} memories (one per attention block), got {len(mems)}")
        x = self.drop(embed_tokens(self, idx, 0 if not mems else mems[0].shape[1]))
        new_mems: list[Tensor] = []
        aux = x.new_zeros(())
        outputs: list[Tensor] = []
        j = 0
        for block in self.blocks:
            if block.kind == "attn":
                mem = None if mems is None else mems[j]
                j += 1
                new_mems.append(next_memory(x, mem, mem_len).detach())
                x = block(x, mem)
            else:
                x = block(x)
                if block.kind == "moe":
                    aux = aux + block.f.aux_loss
            if hidden:
                outputs.append(x)
        return LMOutput(head_logits(self, self.norm(x)), new_mems, aux, outputs)


def int8_weights(module: nn.Module) -> list[Tensor]:
    """The weight matrices `module` multiplies by in int8, as an export quantizes them: its int8 blocks'
    projections, and the output head of each LM inside it whose head is int8."""
    heads = [m.embed.weight if m.head is None else m.head.weight for m in module.modules()
             if isinstance(m, LM) and m.arch.head_precision == "int8"]
    return [m.weight for m in quantized_linears(module)] + heads


def compute_in(module: nn.Module, precision: str) -> None:
    """Every product inside `module` computes in `precision`, in place: its blocks' projections and the output
    head of each LM inside it (which reads its architecture's head_precision)."""
    set_precision(module, precision)
    for m in module.modules():
        if isinstance(m, LM):
            m.arch = replace(m.arch, head_precision=precision)


def in_precision(model: LM, precision: str) -> LM:
    """`model` with every block and the head computing in `precision`, sharing nothing but equal weights."""
    arch = replace(model.arch.with_blocks([b.in_precision(precision) for b in model.arch.blocks]),
                   head_precision=precision)
    other = LM(arch).eval()
    other.load_state_dict(model.state_dict())
    return other
