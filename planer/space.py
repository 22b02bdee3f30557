"""The search space: which block each position of the supernet may become.

PLANER's space (arXiv 2208.14580) over a baseline with H heads and FFN width W:
`skip`; attention with h in {1, 2, 4, ..., H} heads of the baseline's head size
(with grouped-query attention, that many key/value groups, each with its query heads);
FFN of width {1/4, 1/2, 1} x W; MoE with E in {2, 4, 8, 16} experts, top-k
k in {1, 2}, expert width {1/4, 1/2, 1} x W. To these it adds Puzzle's (arXiv
2411.19146) `linear` replacement of attention, one d_model x d_model projection,
and for the local search the MoE blocks that split the FFN (`with_splits`:
MoEfication, arXiv 2110.01786, with a shared always-on part).
Positions default to twice the baseline's sublayers so the order and the
attention:FFN ratio can change.
The space is plain data with a JSON form users can narrow or widen.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planer.arch import ArchError, Architecture, BlockSpec

FORMAT = "planer.space/1"
BYTES_PER_TRAINED_PARAM = 16  # fp32 weights, gradients and Adam's two moments


def trainable_params_limit(share: float = 1 / 3) -> int:
    """Supernet parameters this machine can train in `share` of its memory (the rest: activations, the
    baseline as teacher, the data). Reads the cgroup limit where there is one."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        memory = min(memory, int(limit)) if limit.isdigit() else memory
    except OSError:
        pass
    return int(memory * share / BYTES_PER_TRAINED_PARAM)


@dataclass(frozen=True)
class ExpertOptions:
    """The MoE candidates of the default space, as `--experts`, `--top-k` and `--shared` give them (None: the
    search's default). The supernet upcycles E copies of the FFN; the local search splits the FFN into E experts
    beside a shared part of `shared` x its units."""

    experts: tuple[int, ...] | None = None
    top_k: tuple[int, ...] | None = None
    shared: tuple[float, ...] | None = None

    def given(self) -> list[str]:
        return [f"--{name.replace('_', '-')}" for name in ("experts", "top_k", "shared") if getattr(self, name)]

    def check(self, baseline: Architecture, local: bool) -> None:
        """Refuse, naming the option, what cannot make a MoE candidate of `baseline`."""
        if not self.given():
            return
        ffn = next((b for b in baseline.blocks if b.kind == "ffn"), None)
        if ffn is None:
            raise ArchError(f"{self.given()[0]}: MoE candidates are made from an FFN, and the baseline has none")
        if any(e < 1 for e in self.experts or ()):
            raise ArchError(f"--experts {_csv(self.experts)}: expert counts must be at least 1")
        top = max(self.experts or ((8,) if local else (16,)))
        bad_k = [k for k in self.top_k or () if not 1 <= k <= top]
        if bad_k:
            raise ArchError(f"--top-k {bad_k[0]}: top-k must be between 1 and the largest expert count ({top})")
        if self.shared is not None and not local:
            raise ArchError("--shared: only --search local makes experts with a shared part (the supernet upcycles "
                            "copies of the FFN)")
        bad_share = [f for f in self.shared or () if not 0 <= f < 1]
        if bad_share:
            raise ArchError(f"--shared {bad_share[0]:g}: the shared part is a share of the FFN's units, from 0 to below 1")
        if local:
            for f in self.shared or (0.0,):
                routed = ffn.d_inner - int(ffn.d_inner * f)
                for e in self.experts or ():
                    if routed % e:
                        raise ArchError(f"--experts {e}: {e} experts do not divide the {routed} units of the FFN "
                                        f"({ffn.d_inner}) left beside --shared {f:g}; use a divisor of {routed}")


def _narrower_attention(attn: BlockSpec) -> list[BlockSpec]:
    """The attention candidates cut from `attn`: 1, 2, 4, ... of its heads and all of them. With grouped-query
    attention the unit is a key/value head with the query heads that read it, so that a narrower block inherits
    whole groups (SmolLM2's 9 heads over 3 kv heads: 3/kv1, 6/kv2, 9/kv3); a count of query heads that splits a
    group would leave heads reading another group's keys, and the local search could not cut it at all."""
    units = attn.n_kv_heads
    group = attn.heads // units
    counts = sorted({u for u in (2 ** i for i in range(units.bit_length())) if u <= units} | {units})
    return [BlockSpec.attn(group * u, attn.head_dim, u if attn.kv_heads else 0) for u in counts]


def _csv(values: tuple) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclass(frozen=True)
class SearchSpace:
    positions: int
    candidates: tuple[BlockSpec, ...]  # every position chooses among the same candidates

    @staticmethod
    def default(baseline: Architecture, *, experts: tuple[int, ...] = (2, 4, 8, 16), top_k: tuple[int, ...] = (1, 2),
                widths: tuple[float, ...] = (0.25, 0.5, 1.0), max_params: int | None = None) -> SearchSpace:
        """PLANER's space around `baseline`. With `max_params`, a space whose supernet would hold more
        parameters is narrowed step by step -- positions to one per baseline sublayer, then the largest
        expert count, then the widest experts -- until it fits (deep baselines on small machines)."""
        attn = next((b for b in baseline.blocks if b.kind == "attn"), None)
        ffn = next((b for b in baseline.blocks if b.kind in ("ffn", "moe")), None)
        if attn is None or ffn is None:
            raise ArchError("the baseline needs an attention and an FFN block to define a search space")
        sizes = sorted({max(1, int(ffn.d_inner * w)) for w in widths})
        fixed = [BlockSpec.skip(), *_narrower_attention(attn)]
        fixed += [BlockSpec.linear()]
        fixed += [BlockSpec.ffn(w) for w in sizes]
        sublayers = sum(b.kind != "skip" for b in baseline.blocks)
        positions, experts, moe_sizes = 2 * sublayers, sorted(experts), list(sizes)

        def space() -> SearchSpace:
            moes = [BlockSpec.moe(e, k, w) for e in experts for k in top_k if k <= e for w in moe_sizes]
            return SearchSpace(positions, tuple(fixed + moes)).validate()

        while max_params is not None and space().supernet_params(baseline) > max_params:
            if positions > sublayers:
                positions = sublayers
            elif len(experts) > 1:
                experts.pop()
            elif len(moe_sizes) > 1:
                moe_sizes.pop()
            else:
                raise ArchError(f"even the narrowest default search space needs "
                                f"{space().supernet_params(baseline) / 1e6:,.0f}M supernet parameters, more than "
                                f"the {max_params / 1e6:,.0f}M this machine can train; pass a smaller --space")
        return space()

    def with_splits(self, baseline: Architecture, *, experts: tuple[int, ...] = (2, 4, 8),
                    top_k: tuple[int, ...] = (1, 2), shared: tuple[float, ...] = (0.0, 0.25)) -> SearchSpace:
        """This space and the MoE blocks that split the baseline's FFN (planer.search.split): E experts of
        (W - S) / E units, k < E of them routed per token, beside S = share x W always-on units, for every
        combination that divides evenly. Only the local search trains these."""
        ffn = next((b for b in baseline.blocks if b.kind == "ffn"), None)
        if ffn is None:
            raise ArchError("split experts are cut from an FFN, and the baseline has no FFN block")
        splits = []
        for share in shared:
            s = int(ffn.d_inner * share)
            splits += [BlockSpec.moe(e, k, (ffn.d_inner - s) // e, shared=s) for e in experts for k in top_k
                       if k < e and (ffn.d_inner - s) % e == 0]
        return SearchSpace(self.positions, tuple(dict.fromkeys(self.candidates + tuple(splits)))).validate()

    def without_moe(self) -> SearchSpace:
        """This space less its MoE blocks: the dense alternatives alone (a build without experts, side by side)."""
        return SearchSpace(self.positions, tuple(c for c in self.candidates if c.kind != "moe")).validate()

    def supernet_params(self, baseline: Architecture) -> int:
        """Parameters of the supernet over `baseline` (planer.search.supernet.Position's layout): per position,
        one attention module per head count, one linear projection (sharing the attention's norm), one FFN of
        the widest FFN candidate, as many experts as the largest MoE candidate at the widest expert width, and a
        router per expert count."""
        arch, norm = baseline, baseline.block_params(BlockSpec.ffn(1))[0] - baseline.ffn_params(1)
        attns = list(dict.fromkeys(c.in_precision("fp32") for c in self.candidates if c.kind == "attn"))  # shared
        linear = any(c.kind == "linear" for c in self.candidates)
        ffns = [c.d_inner for c in self.candidates if c.kind == "ffn"]
        moes = [c for c in self.candidates if c.kind == "moe"]
        per = sum(arch.block_params(c)[0] - norm for c in attns) + (norm if attns or linear else 0)
        per += arch.block_params(BlockSpec.linear())[0] - norm if linear else 0
        per += norm if ffns or moes else 0
        per += arch.ffn_params(max(ffns)) if ffns else 0
        if moes:
            per += max(c.experts for c in moes) * arch.ffn_params(max(c.d_inner for c in moes))
            per += arch.d_model * sum({c.experts for c in moes})
        embedding = arch.param_counts()["total"] - arch.param_counts()["non_embedding_total"]
        return self.positions * per + embedding + norm

    def check_supernet(self, baseline: Architecture, limit: int | None = None) -> None:
        """Refuse what the supernet cannot train: MoE blocks with a shared part (it upcycles its experts from
        copies of the FFN) and, given `limit`, a supernet of more parameters than that."""
        shared = next((c for c in self.candidates if c.kind == "moe" and c.shared), None)
        if shared is not None:
            raise ArchError(f"{shared.label()} is a MoE block with a shared part: only --search local trains "
                            "those (the supernet upcycles its experts)")
        if limit is not None and self.supernet_params(baseline) > limit:
            raise ArchError(f"the search space's supernet would hold {self.supernet_params(baseline) / 1e6:,.0f}M "
                            f"parameters; this machine trains at most {limit / 1e6:,.0f}M -- give fewer positions, "
                            "experts or widths in --space")

    def in_precisions(self, precisions: tuple[str, ...], moe: bool = True) -> SearchSpace:
        """Every candidate in each of `precisions` (MoE blocks in fp32 only unless `moe`): precision is
        chosen per position like width. A space that names precisions itself is kept as it is."""
        if any(c.precision != "fp32" for c in self.candidates):
            return self
        variants = [c.in_precision(p) for c in self.candidates for p in precisions
                    if p == "fp32" or (c.kind != "skip" and (moe or c.kind != "moe"))]
        return SearchSpace(self.positions, tuple(dict.fromkeys(variants))).validate()

    def validate(self) -> SearchSpace:
        if self.positions < 1:
            raise ArchError(f"a search space needs at least one position, got {self.positions}")
        if not self.candidates:
            raise ArchError("a search space needs at least one candidate block")
        for i, c in enumerate(self.candidates):
            c.validate(f"candidate {i} ({c.kind})")
        if len(set(self.candidates)) != len(self.candidates):
            raise ArchError("the candidate list repeats a block")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "positions": self.positions, "candidates": [c.to_dict() for c in self.candidates]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SearchSpace:
        if not isinstance(d, dict) or d.get("format", FORMAT) != FORMAT:
            raise ArchError(f"a search space is a JSON object with format {FORMAT!r}")
        unknown = set(d) - {"format", "positions", "candidates"}
        if unknown:
            raise ArchError(f"unknown field(s) {sorted(unknown)}; allowed: format, positions, candidates")
        if not isinstance(d.get("positions"), int) or not isinstance(d.get("candidates"), list):
            raise ArchError("a search space needs 'positions' (an integer) and 'candidates' (a list of blocks)")
        return SearchSpace(d["positions"], tuple(BlockSpec.from_dict(c, f"candidate {i}")
                                                 for i, c in enumerate(d["candidates"]))).validate()

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @staticmethod
    def load(path: str | os.PathLike) -> SearchSpace:
        p = Path(path)
        try:
            return SearchSpace.from_dict(json.loads(p.read_text()))
        except OSError as e:
            raise ArchError(f"{p}: cannot read the search space ({e.strerror})") from None
        except (ValueError, ArchError) as e:
            raise ArchError(f"{p}: {e}; fix the file or omit --space for the default") from None
