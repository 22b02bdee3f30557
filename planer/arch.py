"""The network as data.

An `Architecture` is the single description of a planer network: the search
writes one, training, export and profiling read one. It is plain data with a
JSON round-trip, validation that names the offending block, and the counts the
search and the reports need (total and active parameters, FLOPs per token).

A network is an embedding, an ordered list of pre-norm residual sublayers
("blocks"), a final norm and an output head. Each block is one of:

    attn    multi-head attention (heads x head_dim, optionally fewer kv_heads)
    linear  one d_model x d_model projection in attention's place (Puzzle, arXiv 2411.19146): what an
            attention block computes when each token attends only to itself; no memory, no size fields
    ffn     Linear - activation - Linear of width d_inner
    moe     `experts` FFNs of width d_inner each, top_k routing per token, plus an always-on FFN of width
            `shared` (0: none). Split from a trained FFN (planer.search.split) its experts partition that
            FFN's units; the selected experts' outputs are summed (each gate is 1 in value; planer.nn.moe)
    skip    identity (a position the search left empty)

Every block but skip also has a numeric precision: the engine runs its
matrix products in fp32, or with int8 weights (per output channel) and
dynamically quantised int8 activations; PyTorch simulates that
(planer.nn.quant), so training sees what the engine computes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from planer.errors import PlanerError, not_found

FORMAT = "planer.arch/1"
BLOCK_KINDS = ("attn", "linear", "ffn", "moe", "skip")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("relative", "rotary", "learned")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu")
PRECISIONS = ("fp32", "int8")  # which of them an engine runs: planer.deployment.ENGINE_PRECISIONS

# Which BlockSpec fields each kind uses; the others must stay 0.
_KIND_FIELDS = {
    "attn": ("heads", "head_dim", "kv_heads"),
    "linear": (),
    "ffn": ("d_inner",),
    "moe": ("experts", "top_k", "d_inner", "shared"),
    "skip": (),
}


# label() in reverse: attn<heads>x<head_dim>[/kv<kv_heads>], linear, ffn<d_inner>,
# moe<experts>k<top_k>x<d_inner>[+s<shared>], skip.
_LABEL = re.compile(r"attn(?P<heads>\d+)x(?P<head_dim>\d+)(?:/kv(?P<kv_heads>\d+))?|ffn(?P<d_inner>\d+)"
                    r"|moe(?P<experts>\d+)k(?P<top_k>\d+)x(?P<moe_inner>\d+)(?:\+s(?P<shared>\d+))?|linear|skip")


class ArchError(PlanerError):
    """An architecture that cannot be built."""


@dataclass(frozen=True)
class BlockSpec:
    kind: str
    heads: int = 0
    head_dim: int = 0
    kv_heads: int = 0  # 0 means "same as heads" (plain multi-head attention)
    d_inner: int = 0
    experts: int = 0
    top_k: int = 0
    precision: str = "fp32"
    shared: int = 0  # moe: width of the always-on FFN beside the routed experts

    @staticmethod
    def attn(heads: int, head_dim: int, kv_heads: int = 0, precision: str = "fp32") -> BlockSpec:
        return BlockSpec("attn", heads=heads, head_dim=head_dim, kv_heads=kv_heads, precision=precision)

    @staticmethod
    def linear(precision: str = "fp32") -> BlockSpec:
        return BlockSpec("linear", precision=precision)

    @staticmethod
    def ffn(d_inner: int, precision: str = "fp32") -> BlockSpec:
        return BlockSpec("ffn", d_inner=d_inner, precision=precision)

    @staticmethod
    def moe(experts: int, top_k: int, d_inner: int, precision: str = "fp32", shared: int = 0) -> BlockSpec:
        return BlockSpec("moe", experts=experts, top_k=top_k, d_inner=d_inner, precision=precision, shared=shared)

    @staticmethod
    def skip() -> BlockSpec:
        return BlockSpec("skip")

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    def label(self) -> str:
        """Short human-readable name, e.g. `attn4x64`, `linear`, `ffn1024`, `moe8k2x512`, `moe4k1x96+s384`,
        `ffn1024@int8`."""
        if self.kind == "attn":
            kv = f"/kv{self.kv_heads}" if self.kv_heads and self.kv_heads != self.heads else ""
            shape = f"attn{self.heads}x{self.head_dim}{kv}"
        elif self.kind == "ffn":
            shape = f"ffn{self.d_inner}"
        elif self.kind == "moe":
            shape = f"moe{self.experts}k{self.top_k}x{self.d_inner}" + (f"+s{self.shared}" if self.shared else "")
        elif self.kind == "linear":
            shape = "linear"
        else:
            return "skip"
        return shape if self.precision == "fp32" else f"{shape}@{self.precision}"

    @staticmethod
    def parse(label: str) -> BlockSpec:
        """The block a label() names, e.g. `attn4x48`, `attn8x64/kv2`, `linear@int8`, `moe8k2x512@int8`, `skip`."""
        shape, _, precision = label.partition("@")
        match = _LABEL.fullmatch(shape)
        if not match or (precision and (precision not in PRECISIONS or shape == "skip")):
            raise ArchError(f"{label!r} is not a block label; write e.g. attn4x48, attn8x64/kv2, linear, ffn768, "
                            f"moe8k2x512, moe4k1x96+s384, skip, with @{'/@'.join(PRECISIONS[1:])} for another precision")
        n = {"d_inner" if k == "moe_inner" else k: int(v) for k, v in match.groupdict().items() if v}
        kind = shape if not n else "attn" if "heads" in n else "ffn" if "experts" not in n else "moe"
        return BlockSpec(kind, **n, precision=precision or "fp32")

    def in_precision(self, precision: str) -> BlockSpec:
        """The same block computed in `precision` (a skip stays a skip)."""
        return self if self.kind == "skip" else replace(self, precision=precision)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        for name in _KIND_FIELDS.get(self.kind, ()):
            value = getattr(self, name)
            if name not in ("kv_heads", "shared") or value:  # optional fields appear only when used
                d[name] = value
        if self.precision != "fp32":  # fp32 blocks read as they did before precision was a field
            d["precision"] = self.precision
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "block") -> BlockSpec:
        if not isinstance(d, dict) or "kind" not in d:
            raise ArchError(f"{where}: expected an object with a 'kind' field, got {d!r}")
        known = {f.name for f in fields(BlockSpec)}
        unknown = set(d) - known
        if unknown:
            raise ArchError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        for name, value in d.items():
            if name == "precision":
                if value not in PRECISIONS:
                    raise ArchError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
            elif name != "kind" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ArchError(f"{where}: field '{name}' must be an integer, got {value!r}")
        return BlockSpec(**d)

    def validate(self, where: str = "block") -> None:
        if self.kind not in BLOCK_KINDS:
            raise ArchError(f"{where}: unknown kind {self.kind!r}; use one of {', '.join(BLOCK_KINDS)}")
        if self.precision not in PRECISIONS:
            raise ArchError(f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.kind == "skip" and self.precision != "fp32":
            raise ArchError(f"{where}: a skip block computes nothing, so it has no precision")
        used = _KIND_FIELDS[self.kind]
        for f in fields(self):
            if f.name in ("kind", "precision"):
                continue
            value = getattr(self, f.name)
            if value < 0:
                raise ArchError(f"{where}: {f.name} must be >= 0, got {value}")
            if f.name not in used and value:
                raise ArchError(f"{where}: a {self.kind} block has no field '{f.name}' (got {value})")
        if self.kind == "attn":
            if self.heads < 1 or self.head_dim < 1:
                raise ArchError(f"{where}: attn needs heads >= 1 and head_dim >= 1, got {self.heads} x {self.head_dim}")
            if self.kv_heads and self.heads % self.kv_heads:
                raise ArchError(
                    f"{where}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
                )
        if self.kind in ("ffn", "moe") and self.d_inner < 1:
            raise ArchError(f"{where}: {self.kind} needs d_inner >= 1, got {self.d_inner}")
        if self.kind == "moe":
            if self.experts < 1:
                raise ArchError(f"{where}: moe needs experts >= 1, got {self.experts}")
            if not 1 <= self.top_k <= self.experts:
                raise ArchError(
                    f"{where}: moe top_k must be between 1 and experts ({self.experts}), got {self.top_k}"
                )


@dataclass(frozen=True)
class Architecture:
    d_model: int
    vocab_size: int
    blocks: tuple[BlockSpec, ...]
    tgt_len: int = 128
    mem_len: int = 128
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    pos: str = "relative"
    activation: str = "gelu"
    bias: bool = True  # biases in the FFN / expert linears (Transformer-XL: yes, Llama: no)
    tie_embeddings: bool = True
    attn_bias: bool = False  # biases in the attention projections (GPT-2: yes; Transformer-XL, Llama: no)
    scale_embeddings: bool = True  # token embeddings x sqrt(d_model) (Transformer-XL; not Llama, GPT-2)
    rope_base: float = 10000.0  # rotary: the frequencies' base (Llama's rope_theta)
    max_positions: int = 0  # learned: rows of the absolute position table (GPT-2's n_positions)
    # The output head's product: fp32, or int8 as ONNX Runtime runs an int8 block's (planer.nn.quant). A large
    # vocabulary makes the head a large share of a small model's latency (SmolLM2-135M's head alone in int8: 0.907x
    # the fp32 network's time, benchmarks/RESULTS.md).
    head_precision: str = "fp32"
    name: str = ""

    # ----------------------------------------------------------- construction
    @staticmethod
    def transformer_xl(
        *, n_layer: int, d_model: int, n_head: int, d_head: int, d_inner: int,
        vocab_size: int, tgt_len: int, mem_len: int, name: str = "",
    ) -> Architecture:
        """The classic stack: n_layer x (attention, FFN)."""
        blocks: list[BlockSpec] = []
        for _ in range(n_layer):
            blocks += [BlockSpec.attn(n_head, d_head), BlockSpec.ffn(d_inner)]
        return Architecture(d_model=d_model, vocab_size=vocab_size, blocks=tuple(blocks),
                            tgt_len=tgt_len, mem_len=mem_len, name=name)

    def with_blocks(self, blocks: list[BlockSpec] | tuple[BlockSpec, ...]) -> Architecture:
        return replace(self, blocks=tuple(blocks))

    # ------------------------------------------------------------- validation
    def validate(self) -> Architecture:
        for name in ("d_model", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ArchError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.tgt_len, int) or self.tgt_len < 1:
            raise ArchError(f"tgt_len must be a positive integer, got {self.tgt_len!r}")
        if not isinstance(self.mem_len, int) or self.mem_len < 0:
            raise ArchError(f"mem_len must be an integer >= 0, got {self.mem_len!r}")
        for name, allowed in (("norm", NORMS), ("pos", POSITIONS), ("activation", ACTIVATIONS),
                              ("head_precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ArchError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.pos == "learned" and (not isinstance(self.max_positions, int)
                                      or self.max_positions < self.mem_len + self.tgt_len):
            raise ArchError(f"learned positions need max_positions >= mem_len + tgt_len "
                            f"({self.mem_len + self.tgt_len}), got {self.max_positions!r}")
        if self.pos == "relative" and self.d_model % 2:
            raise ArchError(f"relative positions need an even d_model, got {self.d_model}")
        if not self.blocks:
            raise ArchError("an architecture needs at least one block")
        for i, b in enumerate(self.blocks):
            where = f"block {i} ({b.kind})"
            b.validate(where)
            if b.kind == "attn":
                if self.pos == "relative" and b.kv_heads and b.kv_heads != b.heads:
                    raise ArchError(
                        f"{where}: grouped kv heads need pos='rotary'; relative attention uses kv_heads == heads"
                    )
                if self.pos == "rotary" and b.head_dim % 2:
                    raise ArchError(f"{where}: rotary positions need an even head_dim, got {b.head_dim}")
        return self

    # ------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = [b.to_dict() for b in self.blocks]
        if self.head_precision == "fp32":  # as blocks' optional fields: it appears only when used
            del d["head_precision"]
        return {"format": FORMAT, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Architecture:
        if not isinstance(d, dict):
            raise ArchError(f"an architecture is a JSON object, got {type(d).__name__}")
        d = dict(d)
        fmt = d.pop("format", FORMAT)
        if fmt != FORMAT:
            raise ArchError(f"unsupported architecture format {fmt!r}; this planer reads {FORMAT!r}")
        known = {f.name for f in fields(Architecture)}
        unknown = set(d) - known
        if unknown:
            raise ArchError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        missing = {"d_model", "vocab_size", "blocks"} - set(d)
        if missing:
            raise ArchError(f"missing field(s) {sorted(missing)}")
        if not isinstance(d["blocks"], list):
            raise ArchError("'blocks' must be a list of block objects")
        d["blocks"] = tuple(BlockSpec.from_dict(b, f"block {i}") for i, b in enumerate(d["blocks"]))
        return Architecture(**d).validate()

    @staticmethod
    def from_json(text: str) -> Architecture:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArchError(f"not valid JSON ({e})") from None
        return Architecture.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json())

    @staticmethod
    def load(path: str | os.PathLike) -> Architecture:
        p = Path(path)
        if not p.is_file():
            raise ArchError(f"{not_found(p, 'architecture file')}; pass a run directory or an arch.json")
        try:
            return Architecture.from_json(p.read_text())
        except UnicodeDecodeError:
            raise ArchError(f"{p}: not a text file; pass a run directory or an arch.json") from None
        except ArchError as e:
            raise ArchError(f"{p}: {e}; fix the file or regenerate it") from None

    # ----------------------------------------------------------------- counts
    @property
    def attn_positions(self) -> list[int]:
        """Indices of the blocks that carry a Transformer-XL memory."""
        return [i for i, b in enumerate(self.blocks) if b.kind == "attn"]

    def _norm_params(self) -> int:
        return 2 * self.d_model if self.norm == "layernorm" else self.d_model

    def ffn_params(self, d_inner: int) -> int:
        """Parameters of one FFN (or one expert) of width d_inner."""
        d = self.d_model
        if self.activation == "swiglu":
            return 3 * d * d_inner + (2 * d_inner + d if self.bias else 0)
        return 2 * d * d_inner + (d_inner + d if self.bias else 0)

    def block_params(self, b: BlockSpec) -> tuple[int, int]:
        """(total, active per token) parameters of one block, its norm included."""
        d = self.d_model
        if b.kind == "skip":
            return 0, 0
        norm = self._norm_params()
        if b.kind == "linear":
            n = norm + d * d + (d if self.attn_bias else 0)
            return n, n
        if b.kind == "attn":
            q = d * b.heads * b.head_dim
            kv = 2 * d * b.n_kv_heads * b.head_dim
            o = b.heads * b.head_dim * d
            rel = (d * b.heads * b.head_dim + 2 * b.heads * b.head_dim) if self.pos == "relative" else 0
            biases = (b.heads + 2 * b.n_kv_heads) * b.head_dim + d if self.attn_bias else 0
            n = norm + q + kv + o + rel + biases
            return n, n
        if b.kind == "ffn":
            n = norm + self.ffn_params(b.d_inner)
            return n, n
        expert = self.ffn_params(b.d_inner)
        always = norm + d * b.experts + (self.ffn_params(b.shared) if b.shared else 0)  # norm, router, shared part
        return always + b.experts * expert, always + b.top_k * expert

    def param_counts(self) -> dict[str, int]:
        """Total and active-per-token parameters, with and without embeddings."""
        emb = self.vocab_size * self.d_model + (self.max_positions * self.d_model if self.pos == "learned" else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        total = active = 0
        for b in self.blocks:
            t, a = self.block_params(b)
            total += t
            active += a
        fixed = self._norm_params()
        return {
            "total": emb + head + fixed + total,
            "active": emb + head + fixed + active,
            "non_embedding_total": fixed + total,
            "non_embedding_active": fixed + active,
        }

    def flops_per_token(self) -> int:
        """Forward multiply-adds x2 per token at the deployment shape.

        Matmuls count 2 FLOPs per active weight; attention adds the score and
        value products against the average context a token of a segment sees
        (mem_len + (tgt_len + 1) / 2 keys) and, for relative positions, the
        position projection amortised over the segment.
        """
        d = self.d_model
        ctx = self.mem_len + (self.tgt_len + 1) / 2
        klen = self.mem_len + self.tgt_len
        total = 2 * d * self.vocab_size  # output head; the embedding is a lookup
        for b in self.blocks:
            if b.kind == "skip":
                continue
            if b.kind == "attn":
                hd = b.heads * b.head_dim
                total += 2 * (d * hd + 2 * d * b.n_kv_heads * b.head_dim + hd * d)
                scores = 2 if self.pos == "rotary" else 3  # relative adds the position-score product
                total += 2 * scores * hd * ctx
                if self.pos == "relative":
                    total += 2 * d * hd * klen / self.tgt_len
            elif b.kind == "linear":
                total += 2 * d * d
            else:
                mats = 3 if self.activation == "swiglu" else 2
                width = b.d_inner * b.top_k + b.shared if b.kind == "moe" else b.d_inner
                total += 2 * mats * d * width
                if b.kind == "moe":
                    total += 2 * d * b.experts
        return int(math.ceil(total))

    def summary(self) -> str:
        c = self.param_counts()
        seq = " ".join(b.label() for b in self.blocks)
        return (f"{self.name or 'network'}: d_model {self.d_model}, vocab {self.vocab_size}, "
                f"{len(self.blocks)} blocks, tgt_len {self.tgt_len}, mem_len {self.mem_len}; "
                f"{c['total'] / 1e6:.2f}M params ({c['active'] / 1e6:.2f}M active/token), "
                f"{self.flops_per_token() / 1e6:.1f} MFLOPs/token\n  {seq}")
