"""Named baselines: an architecture shape plus the training recipe that goes with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from planer.arch import Architecture
from planer.errors import PlanerError


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch: int = 16  # parallel streams per step
    lr: float = 2.5e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 0
    weight_decay: float = 0.0
    clip: float = 0.25
    dropout: float = 0.0
    dropatt: float = 0.0
    aux_weight: float = 0.01  # weight of the MoE load-balancing loss
    distill: float = 0.0  # share of the distillation loss when a teacher is given
    cosine: float = 0.0  # weight of the hidden states' cosine loss to the teacher's (global distillation)
    eval_every: int = 500
    eval_tokens: int = 65536  # periodic validation reads this many tokens; the final one reads the whole split
    eval_batch: int = 8
    test_split: bool = True  # the final evaluation scores the test split too
    ckpt_every: int = 500
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in d.items() if k in known})


# The recipe a build distils with unless its budget says otherwise (the search's trials, `planer distill`, and where
# the baseline teaches, the result, the comparisons and the self-distilled reference): forward KL alone (the rest
# of the logits' loss would be cross-entropy), plus the cosine loss between the hidden states at the blocks a
# network kept and the baseline's.
# On the deep preset's 2x network, 1,200 steps from the same weights: validation loss 1.3801 with KL and cosine,
# 1.3822 with KL alone, 1.3908 with half cross-entropy, half KL (benchmarks/distill_recipe.py; RESULTS.md).
DISTILL_SHARE = 1.0
COSINE = 1.0
# The KL share of a build's recipe where the result distils from the continued baseline: that teacher was chosen
# because the build's data still taught the baseline (planer.build, teacher.json), and then it still teaches the
# student, so half the logits' loss stays cross-entropy. On SmolLM2-135M's 2x network taught by its continued
# baseline, 300 steps from the same weights: validation loss 2.8864 with half cross-entropy, half KL, and cosine,
# 2.9304 with KL and cosine (benchmarks/distill_recipe.py; RESULTS.md); on `tiny`, a baseline far from its plateau
# and taught by itself, half cross-entropy beat KL and cosine by 0.7 % too.
ADAPTED_SHARE = 0.5


def finetune_config(steps: int, batch: int, valid_tokens: int, distill: float, cosine: float = 0.0,
                    aligned: bool = True) -> TrainConfig:
    """The recipe a build trains every network on from inherited weights: the distillation, the baseline's
    continuation, the search's trial runs (same batch, lr, schedule). The cosine loss compares hidden states with
    the teacher's, so it is kept only for a distillation whose blocks are `aligned` with the teacher's."""
    return TrainConfig(steps=steps, batch=batch, lr=1e-3, warmup=min(100, steps // 10), clip=1.0,
                       distill=distill, cosine=cosine if distill and aligned else 0.0,
                       eval_every=max(1, steps // 4), ckpt_every=max(1, steps // 4),
                       eval_tokens=valid_tokens, test_split=False)  # a build judges on valid


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    n_layer: int
    d_model: int
    n_head: int
    d_head: int
    d_inner: int
    tgt_len: int
    mem_len: int
    train: TrainConfig

    def architecture(self, vocab_size: int) -> Architecture:
        return Architecture.transformer_xl(
            n_layer=self.n_layer, d_model=self.d_model, n_head=self.n_head, d_head=self.d_head,
            d_inner=self.d_inner, vocab_size=vocab_size, tgt_len=self.tgt_len, mem_len=self.mem_len,
            name=self.name,
        )


PRESETS = {
    p.name: p
    for p in (
        Preset(
            "tiny", "byte-level baseline that trains on 2 CPU cores in minutes",
            n_layer=4, d_model=192, n_head=4, d_head=48, d_inner=768, tgt_len=128, mem_len=128,
            train=TrainConfig(steps=2100, batch=16, lr=2e-3, warmup=100, clip=1.0, min_lr_ratio=0.05,
                              eval_every=300, ckpt_every=300),
        ),
        # 12 layers, the depth of the paper's enwik8 baseline, at widths 2 CPU cores can train to a plateau within
        # an hour: the depth where attention is redundant (PAR Transformer) and removing a block costs 1/24 of the
        # network rather than tiny's 1/8.
        Preset(
            "deep", "byte-level 12-layer baseline that trains to a plateau on 2 CPU cores within an hour",
            n_layer=12, d_model=128, n_head=4, d_head=32, d_inner=512, tgt_len=128, mem_len=128,
            train=TrainConfig(steps=6000, batch=16, lr=2e-3, warmup=200, clip=1.0, min_lr_ratio=0.05,
                              eval_every=500, ckpt_every=500),
        ),
        Preset(
            "txl-enwik8-base", "Transformer-XL base, enwik8 configuration (12L, 512, 8 heads, 2048)",
            n_layer=12, d_model=512, n_head=8, d_head=64, d_inner=2048, tgt_len=512, mem_len=512,
            train=TrainConfig(steps=400_000, batch=22, lr=2.5e-4, dropout=0.1, eval_every=4000, ckpt_every=4000),
        ),
        Preset(
            "txl-wt103-base", "Transformer-XL base, WikiText-103 configuration (16L, 512, 8 heads, 2048)",
            n_layer=16, d_model=512, n_head=8, d_head=64, d_inner=2048, tgt_len=192, mem_len=192,
            train=TrainConfig(steps=200_000, batch=60, lr=2.5e-4, dropout=0.1, eval_every=4000, ckpt_every=4000),
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise PlanerError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def with_overrides(cfg: TrainConfig, **overrides: Any) -> TrainConfig:
    """Replace the fields given a value (None means keep the preset's)."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
