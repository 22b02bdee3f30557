import json

import pytest

from planer.arch import ArchError, Architecture, BlockSpec
from planer.nn import LM
from tests.conftest import small_arch


def _module_params(arch: Architecture) -> int:
    return sum(p.numel() for p in LM(arch).parameters())


@pytest.mark.parametrize("kw", [
    {},
    {"norm": "rmsnorm", "pos": "rotary", "activation": "swiglu", "bias": False, "tie_embeddings": False},
    {"pos": "learned", "max_positions": 64, "attn_bias": True},
])
def test_param_count_matches_the_built_module(kw):
    blocks = [BlockSpec.attn(4, 8, kv_heads=2 if "activation" in kw else 0), BlockSpec.ffn(48), BlockSpec.skip(),
              BlockSpec.moe(4, 2, 24), BlockSpec.linear()]
    arch = small_arch(blocks, **kw)
    assert arch.param_counts()["total"] == _module_params(arch)


def test_active_params_of_a_known_moe():
    d, e, k, w = 32, 8, 2, 64
    arch = Architecture(d_model=d, vocab_size=256, blocks=(BlockSpec.moe(e, k, w),))
    expert = 2 * d * w + w + d  # up + down weights and biases
    fixed = 256 * d + 2 * d + 2 * d + d * e  # embedding, block norm, final norm, router
    counts = arch.param_counts()
    assert counts["total"] == fixed + e * expert
    assert counts["active"] == fixed + k * expert


def test_flops_scale_with_active_not_total_experts():
    one = Architecture(d_model=64, vocab_size=256, blocks=(BlockSpec.ffn(128),))
    moe = one.with_blocks([BlockSpec.moe(16, 1, 128)])
    extra = moe.flops_per_token() - one.flops_per_token()
    assert extra == 2 * 64 * 16  # only the router is added; one expert of the same width runs per token


def test_linear_block_counts():
    d = 32
    attn = Architecture(d_model=d, vocab_size=256, blocks=(BlockSpec.attn(2, 16),))
    arch = attn.with_blocks([BlockSpec.attn(2, 16), BlockSpec.linear()])
    assert arch.attn_positions == [0]  # no memory: a linear block is not attention
    assert arch.block_params(BlockSpec.linear()) == (2 * d + d * d,) * 2  # norm and the projection
    biased = Architecture(d_model=d, vocab_size=256, blocks=(BlockSpec.linear(),), attn_bias=True)
    assert biased.block_params(BlockSpec.linear())[0] == 2 * d + d * d + d
    assert arch.flops_per_token() - attn.flops_per_token() == 2 * d * d


def test_json_round_trip(tmp_path):
    arch = small_arch(name="rt", norm="rmsnorm", pos="rotary", blocks=[BlockSpec.attn(4, 8, 2), BlockSpec.skip(),
                                                                       BlockSpec.moe(4, 1, 16), BlockSpec.linear(),
                                                                       BlockSpec.linear("int8")])
    path = tmp_path / "arch.json"
    arch.save(path)
    assert Architecture.load(path) == arch
    saved = json.loads(path.read_text())
    assert saved["format"] == "planer.arch/1"
    assert saved["blocks"][3:] == [{"kind": "linear"}, {"kind": "linear", "precision": "int8"}]


@pytest.mark.parametrize("blocks, message", [
    ([{"kind": "moe", "experts": 4, "top_k": 5, "d_inner": 8}], "top_k must be between 1 and experts"),
    ([{"kind": "attn", "heads": 0, "head_dim": 8}], "heads >= 1"),
    ([{"kind": "ffn", "d_inner": 8, "heads": 2}], "has no field 'heads'"),
    ([{"kind": "linear", "d_inner": 8}], "a linear block has no field 'd_inner'"),
    ([{"kind": "conv"}], "unknown kind 'conv'"),
    ([{"kind": "ffn", "width": 8}], "unknown field(s) ['width']"),
    ([{"kind": "ffn", "d_inner": "8"}], "must be an integer"),
    ([{"kind": "attn", "heads": 4, "head_dim": 8, "kv_heads": 2}], "grouped kv heads need pos='rotary'"),
    ([], "at least one block"),
])
def test_invalid_blocks_are_named(blocks, message):
    d = {"d_model": 32, "vocab_size": 256, "blocks": blocks}
    with pytest.raises(ArchError, match=None) as err:
        Architecture.from_dict(d)
    assert message in str(err.value)
    if blocks:
        assert "block 0" in str(err.value)


def test_invalid_top_level_fields():
    with pytest.raises(ArchError, match="unknown field"):
        Architecture.from_dict({"d_model": 32, "vocab_size": 256, "blocks": [{"kind": "skip"}], "depth": 3})
    with pytest.raises(ArchError, match="norm must be one of"):
        Architecture.from_dict({"d_model": 32, "vocab_size": 256, "blocks": [{"kind": "skip"}], "norm": "batch"})
    with pytest.raises(ArchError, match="unsupported architecture format"):
        Architecture.from_dict({"format": "other/2", "d_model": 32, "vocab_size": 256, "blocks": []})
    with pytest.raises(ArchError, match="not valid JSON"):
        Architecture.from_json("{")


def test_block_labels_parse_back():
    blocks = [BlockSpec.attn(4, 48), BlockSpec.attn(8, 64, 2, "int8"), BlockSpec.ffn(768, "int8"),
              BlockSpec.moe(8, 2, 512), BlockSpec.moe(4, 1, 384, "int8"), BlockSpec.skip(), BlockSpec.linear(),
              BlockSpec.linear("int8")]
    assert [b.label() for b in blocks[-2:]] == ["linear", "linear@int8"]
    assert [BlockSpec.parse(b.label()) for b in blocks] == blocks
    for bad in ("attn4", "ffn", "ffn768@fp16", "skip@int8", "ffn768 ", "linear32", "linear@fp16"):
        with pytest.raises(ArchError, match="not a block label"):
            BlockSpec.parse(bad)
