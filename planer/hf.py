"""Hugging Face decoder LMs as planer networks: the Llama family (Llama, SmolLM, Mistral) and GPT-2.

`import_hf(SOURCE)` reads a local checkpoint directory (config.json and
weights, as `save_pretrained` writes them) or a GGUF file with transformers,
describes it as an `Architecture` (each layer an attention block and an FFN
block, the same block kinds planer searches over) and copies the weights into
a planer `LM`. Nothing is downloaded.

planer's memory is the Transformer-XL one -- the hidden states entering each
attention block, keys and values recomputed from them -- so the imported
model reproduces the original's logits exactly while the stream fits in
mem_len + tgt_len tokens, and slides a window over longer streams.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from planer.arch import Architecture, BlockSpec
from planer.errors import PlanerError
from planer.nn import LM

LLAMA_FAMILY = ("llama", "mistral")
IMPORT_TGT_LEN = IMPORT_MEM_LEN = 128  # segment and memory length of an import unless told otherwise
SUPPORTED = (*LLAMA_FAMILY, "gpt2")
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                "silu": "silu"}


class HFImportError(PlanerError):
    """A checkpoint planer cannot import; the message lists what it can."""


@dataclass
class Imported:
    model: LM
    hf_model: Any  # the transformers model, for parity checks
    tokenizer: Any | None  # the transformers tokenizer, when the checkpoint has one
    model_type: str


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _unsupported(what: str) -> HFImportError:
    return HFImportError(f"{what}; planer imports decoder-only LMs of types {', '.join(SUPPORTED)} "
                        "(Llama, SmolLM, Mistral, GPT-2)")


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """A .gguf file, or a directory in save_pretrained's layout that is not a planer run."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".gguf"
    return (path / "config.json").is_file() and not (path / "arch.json").is_file()


def _load(source: Path) -> tuple[Any, Any, Any]:
    try:
        import transformers
    except ImportError:
        raise HFImportError("importing Hugging Face models needs transformers: pip install 'planer[hf]'") from None
    if source.is_file() and source.suffix == ".gguf":
        where, extra = str(source.parent), {"gguf_file": source.name}
    elif source.is_dir() and (source / "config.json").is_file():
        where, extra = str(source), {}
    else:
        raise HFImportError(f"{source}: expected a checkpoint directory with config.json (save_pretrained's "
                           "layout) or a .gguf file")
    # transformers' readers fail on a damaged file with whatever error its bytes cause (struct.error from a
    # truncated .gguf, TypeError from a config field of the wrong type): each is the user's file, not a bug here.
    try:
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=True, **extra)
    except Exception as e:
        raise _unsupported(f"{source}: transformers cannot read its config ({_first_line(e)})") from None
    if config.model_type not in SUPPORTED:
        kind = ("an encoder-decoder model" if getattr(config, "is_encoder_decoder", False) else
                f"model_type {config.model_type!r}")
        raise _unsupported(f"{source}: {kind}")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=torch.float32,
                                                                  **extra)
    except Exception as e:
        raise HFImportError(f"{source}: transformers cannot load the weights ({_first_line(e)})") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    return config, model.eval(), tokenizer


def _rope_base(config: Any) -> float:
    # transformers 5 keeps these in rope_parameters, 4.x in rope_theta and rope_scaling.
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise _unsupported(f"rotary scaling {kind!r} is not supported")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def architecture(config: Any, *, tgt_len: int, mem_len: int) -> Architecture:
    """The planer description of a transformers config (see SUPPORTED)."""
    if config.model_type in LLAMA_FAMILY:
        if config.hidden_act != "silu":
            raise _unsupported(f"activation {config.hidden_act!r} in a {config.model_type} model (SwiGLU needs silu)")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layer = [BlockSpec.attn(heads, head_dim, config.num_key_value_heads), BlockSpec.ffn(config.intermediate_size)]
        return Architecture(
            d_model=config.hidden_size, vocab_size=config.vocab_size, blocks=tuple(layer * config.num_hidden_layers),
            tgt_len=tgt_len, mem_len=mem_len, norm="rmsnorm", norm_eps=config.rms_norm_eps, pos="rotary",
            activation="swiglu", bias=bool(getattr(config, "mlp_bias", False)),
            attn_bias=bool(getattr(config, "attention_bias", False)), tie_embeddings=bool(config.tie_word_embeddings),
            scale_embeddings=False, rope_base=_rope_base(config), name=config.model_type).validate()
    if config.activation_function not in _ACTIVATIONS:
        raise _unsupported(f"activation {config.activation_function!r} in a gpt2 model")
    if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
        raise _unsupported("gpt2 attention scaled other than by 1/sqrt(head_dim)")
    d, heads = config.n_embd, config.n_head
    layer = [BlockSpec.attn(heads, d // heads), BlockSpec.ffn(config.n_inner or 4 * d)]
    return Architecture(
        d_model=d, vocab_size=config.vocab_size, blocks=tuple(layer * config.n_layer), tgt_len=tgt_len,
        mem_len=mem_len, norm="layernorm", norm_eps=config.layer_norm_epsilon, pos="learned",
        activation=_ACTIVATIONS[config.activation_function], bias=True, attn_bias=True,
        tie_embeddings=bool(config.tie_word_embeddings), scale_embeddings=False, max_positions=config.n_positions,
        name="gpt2").validate()


def _llama_state(hf: Any, arch: Architecture) -> dict[str, torch.Tensor]:
    src = hf.model
    state = {"embed.weight": src.embed_tokens.weight, "norm.weight": src.norm.weight}
    for i, layer in enumerate(src.layers):
        a, f, att, mlp = f"blocks.{2 * i}", f"blocks.{2 * i + 1}", layer.self_attn, layer.mlp
        state |= {f"{a}.norm.weight": layer.input_layernorm.weight, f"{a}.f.q.weight": att.q_proj.weight,
                  f"{a}.f.kv.weight": torch.cat([att.k_proj.weight, att.v_proj.weight]),
                  f"{a}.f.o.weight": att.o_proj.weight, f"{f}.norm.weight": layer.post_attention_layernorm.weight,
                  f"{f}.f.gate.weight": mlp.gate_proj.weight, f"{f}.f.up.weight": mlp.up_proj.weight,
                  f"{f}.f.down.weight": mlp.down_proj.weight}
        if arch.attn_bias:
            state |= {f"{a}.f.q.bias": att.q_proj.bias, f"{a}.f.kv.bias": torch.cat([att.k_proj.bias, att.v_proj.bias]),
                      f"{a}.f.o.bias": att.o_proj.bias}
        if arch.bias:
            state |= {f"{f}.f.{p}.bias": getattr(mlp, f"{p}_proj").bias for p in ("gate", "up", "down")}
    return state


def _gpt2_state(hf: Any, arch: Architecture) -> dict[str, torch.Tensor]:
    src = hf.transformer
    state = {"embed.weight": src.wte.weight, "pos_embed.weight": src.wpe.weight, "norm.weight": src.ln_f.weight,
             "norm.bias": src.ln_f.bias}
    for i, layer in enumerate(src.h):
        a, f = f"blocks.{2 * i}", f"blocks.{2 * i + 1}"
        # GPT-2's Conv1D stores weights as (in, out): nn.Linear's transpose.
        qkv_w, qkv_b = layer.attn.c_attn.weight.t(), layer.attn.c_attn.bias
        d = arch.d_model
        state |= {f"{a}.norm.weight": layer.ln_1.weight, f"{a}.norm.bias": layer.ln_1.bias,
                  f"{a}.f.q.weight": qkv_w[:d], f"{a}.f.q.bias": qkv_b[:d],
                  f"{a}.f.kv.weight": qkv_w[d:], f"{a}.f.kv.bias": qkv_b[d:],
                  f"{a}.f.o.weight": layer.attn.c_proj.weight.t(), f"{a}.f.o.bias": layer.attn.c_proj.bias,
                  f"{f}.norm.weight": layer.ln_2.weight, f"{f}.norm.bias": layer.ln_2.bias,
                  f"{f}.f.up.weight": layer.mlp.c_fc.weight.t(), f"{f}.f.up.bias": layer.mlp.c_fc.bias,
                  f"{f}.f.down.weight": layer.mlp.c_proj.weight.t(), f"{f}.f.down.bias": layer.mlp.c_proj.bias}
    return state


def import_hf(source: str | os.PathLike, *, tgt_len: int = IMPORT_TGT_LEN, mem_len: int = IMPORT_MEM_LEN) -> Imported:
    """A local Hugging Face checkpoint (directory or .gguf) as a planer LM with the same weights."""
    config, hf, tokenizer = _load(Path(source))
    arch = architecture(config, tgt_len=tgt_len, mem_len=mem_len)
    state = (_llama_state if config.model_type in LLAMA_FAMILY else _gpt2_state)(hf, arch)
    if not arch.tie_embeddings:
        state["head.weight"] = hf.lm_head.weight
    model = LM(arch).eval()
    expected = set(model.state_dict())
    if set(state) != expected:  # a checkpoint with parts this mapping does not know (or lacks) is refused
        raise _unsupported(f"{source}: weights do not map onto planer's blocks (missing "
                           f"{sorted(expected - set(state))[:3]}, unmapped {sorted(set(state) - expected)[:3]})")
    model.load_state_dict({k: v.detach().clone().contiguous() for k, v in state.items()})
    return Imported(model, hf, tokenizer, config.model_type)


IMPORT_FILE = "import.json"


def write_run(imported: Imported, source: str | os.PathLike, out: str | os.PathLike, *, check_tokens: int = 256
              ) -> dict[str, Any]:
    """A planer run directory for an imported model: arch.json, model.safetensors, tokenizer/ and import.json
    (where it came from and the logit difference to transformers, measured here on random tokens)."""
    from planer.checkpoint import WEIGHTS_FILE, save_weights
    from planer.files import ARCH_FILE, TOKENIZER_DIR, atomic_write, publish, staging_dir

    out = Path(out)
    if out.exists():
        raise HFImportError(f"{out} already exists; choose another --out or remove it")
    arch = imported.model.arch
    tokens = torch.randint(0, arch.vocab_size, (1, check_tokens), generator=torch.Generator().manual_seed(0))
    if arch.pos == "learned":
        tokens = tokens[:, :arch.max_positions]
    diff = logit_difference(imported, tokens)
    staging = staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    arch.save(staging / ARCH_FILE)
    save_weights(imported.model, staging / WEIGHTS_FILE)
    if imported.tokenizer is not None:
        imported.tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
    record = {"source": str(Path(source).resolve()), "model_type": imported.model_type,
              "tokens_checked": tokens.shape[1], "max_abs_logit_difference": diff,
              "tokenizer": imported.tokenizer is not None}
    atomic_write(staging / IMPORT_FILE, json.dumps(record, indent=2) + "\n")
    publish(staging, out)
    return record


@torch.no_grad()
def logit_difference(imported: Imported, tokens: torch.Tensor) -> float:
    """max |planer - transformers| of the logits on tokens (B, T), one pass, no memory."""
    ours = imported.model(tokens).logits
    theirs = imported.hf_model(tokens).logits
    return float((ours - theirs).abs().max())
