"""Hugging Face import: tiny random Llama-family and GPT-2 checkpoints reproduce transformers' logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from planer.checkpoint import load_model  # noqa: E402
from planer.cli import main  # noqa: E402
from planer.errors import PlanerError  # noqa: E402
from planer.export import export_lm  # noqa: E402
from planer.export.reference import parity  # noqa: E402
from planer.hf import import_hf, logit_difference  # noqa: E402
from planer.runtime import OrtEngine  # noqa: E402

VOCAB = 96
# initializer_range well above the default 0.02 so that logits differ visibly between tokens and a
# wrong mapping shows far above the tolerance.
CONFIGS = {
    "llama-gqa": lambda: transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        vocab_size=VOCAB, rope_theta=100000.0, max_position_embeddings=1024, initializer_range=0.1),
    "llama-tied-biased": lambda: transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=80,
        vocab_size=VOCAB, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6,
        initializer_range=0.1),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96,
        vocab_size=VOCAB, sliding_window=None, initializer_range=0.1),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=512,
                                            initializer_range=0.1, bos_token_id=0, eos_token_id=0),
}


def _checkpoint(root, name):
    torch.manual_seed(0)
    path = root / name
    if not path.exists():
        transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: _checkpoint(root, name) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoints, name):
    imported = import_hf(checkpoints[name], tgt_len=64, mem_len=192)
    tokens = torch.randint(0, VOCAB, (2, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        spread = imported.hf_model(tokens).logits.std().item()
        # Segment by segment with the memory, as planer evaluates and serves: the same logits while the
        # stream fits in mem_len + tgt_len.
        mems, pieces = None, []
        for s in range(0, 256, 64):
            out = imported.model(tokens[:, s:s + 64], mems)
            mems, pieces = out.mems, pieces + [out.logits]
        segmented = (torch.cat(pieces, 1) - imported.hf_model(tokens).logits).abs().max().item()
    assert spread > 0.1  # the check below is not vacuous
    assert logit_difference(imported, tokens) <= 1e-4
    assert segmented <= 1e-4


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_imported_models_export_to_onnx(checkpoints, name, tmp_path):
    model = import_hf(checkpoints[name], tgt_len=32, mem_len=32).model
    path = export_lm(model, tmp_path / "model.onnx")
    assert parity(model, OrtEngine(path), batch=2, tgt_len=32, mem_len=32) <= 1e-4


def test_cli_writes_a_run_directory(checkpoints, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["import", str(checkpoints["llama-gqa"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "import.json").read_text())
    assert record["model_type"] == "llama" and record["max_abs_logit_difference"] <= 1e-4
    model = load_model(out)
    assert model.arch.pos == "rotary" and model.arch.blocks[0].n_kv_heads == 2 and model.arch.rope_base == 100000.0
    again = CliRunner().invoke(main, ["import", str(checkpoints["llama-gqa"]), "--out", str(out)])
    assert again.exit_code != 0 and "already exists" in again.output


def test_a_partial_build_imports_again_an_import_damaged_since(checkpoints, tmp_path):
    from planer.build import _imported
    from planer.deployment import Deployment

    dep = Deployment(batch=1, tgt_len=32, mem_len=32, threads=1)
    work = tmp_path / "build.partial"
    imported = _imported(checkpoints["gpt2"], work, dep)
    weights = imported / "model.safetensors"
    expected = load_model(imported).state_dict()
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # a full disk, a hand
    assert _imported(checkpoints["gpt2"], work, dep) == imported
    again = load_model(imported).state_dict()
    assert again.keys() == expected.keys() and all(torch.equal(again[k], expected[k]) for k in expected)


def test_unsupported_models_get_a_one_line_error_naming_what_is_supported(tmp_path):
    torch.manual_seed(0)
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                   vocab_size=VOCAB)
    transformers.BertModel(bert).save_pretrained(str(tmp_path / "bert"))
    t5 = transformers.T5Config(d_model=32, d_ff=32, num_layers=1, num_heads=2, d_kv=16, vocab_size=VOCAB)
    transformers.T5ForConditionalGeneration(t5).save_pretrained(str(tmp_path / "t5"))
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    for name, says in (("bert", "'bert'"), ("t5", "encoder-decoder"), ("unknown", "no-such-model"),
                       ("missing", "config.json")):
        with pytest.raises(PlanerError) as e:
            import_hf(tmp_path / name)
        message = str(e.value)
        assert says in message and "\n" not in message, message
        if name != "missing":
            assert "llama, mistral, gpt2" in message


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_an_imported_tokenizer_reads_byte_corpora_as_tokens(text_file, tmp_path):
    from planer.hf import write_run
    from planer.train.trainer import run_corpus

    words = ["[UNK]"] + sorted(set(text_file.read_text(errors="replace").split()))[:VOCAB - 1]
    torch.manual_seed(0)
    config = CONFIGS["llama-gqa"]()
    checkpoint = tmp_path / "with-tokenizer"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(checkpoint))
    _word_tokenizer(words).save_pretrained(str(checkpoint))
    write_run(import_hf(checkpoint, tgt_len=16, mem_len=16), checkpoint, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    with pytest.raises(PlanerError, match="pass --data"):
        run_corpus(tmp_path / "run", None, VOCAB)
    corpus = run_corpus(tmp_path / "run", f"enwik8:{text_file}", VOCAB)
    assert corpus.unit == "token" and corpus.vocab_size == VOCAB
    # runs record the data as named, not the path it was tokenized from (a build's is its staging directory)
    assert corpus.spec == f"enwik8:{text_file}" and corpus.name.endswith("read through the model's tokenizer")
    assert 0 < len(corpus.valid) < len(corpus.train) and int(corpus.train.max()) < VOCAB


def test_build_takes_a_hugging_face_checkpoint(text_file, tmp_path):
    from planer.arch import BlockSpec
    from planer.build import Budget, build
    from planer.deployment import Deployment, Target
    from planer.search.search import SearchConfig
    from planer.space import SearchSpace
    from planer.train.trainer import run_corpus

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=256, vocab_size=256)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "llama"))
    space = SearchSpace(4, (BlockSpec.skip(), BlockSpec.attn(2, 16, 2), BlockSpec.ffn(64), BlockSpec.moe(2, 1, 64)))
    dep = Deployment(batch=1, tgt_len=32, mem_len=32, threads=1, min_iters=10, min_seconds=0.1, verdict_seconds=0.3)
    budget = Budget(SearchConfig(rounds=1, steps=2, batch=2, valid_tokens=256), distill_steps=2)
    summary = build(tmp_path / "llama", tmp_path / "out", dep=dep, target=Target(speedup=1.1), budget=budget, space=space,
                    data=f"enwik8:{text_file}", show_progress=False)
    out = tmp_path / "out"
    assert (out / "imported" / "import.json").is_file() and (out / "model.onnx").is_file()
    request = json.loads((out / "build.json").read_text())
    assert request["model"] == str((tmp_path / "llama").resolve()) and request["data"] == f"enwik8:{text_file}"
    report = (out / "report.md").read_text()
    assert report.startswith(f"# planer build of `{tmp_path / 'llama'}`") and ".partial" not in report
    assert run_corpus(out, None, 256).spec == f"enwik8:{text_file}"  # what eval and export read from a build
    assert summary["accuracy"]["baseline"]["tokens_trained"] == 0  # pretraining is not planer's to count
    assert load_model(out).arch.pos == "rotary"


def test_cli_build_of_an_unreadable_gguf_says_so_in_one_line(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"\xc3\x28 not a gguf file")
    result = CliRunner().invoke(main, ["build", "--model", str(junk), "--target-speedup", "2", "--data", "sample",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1  # a PlanerError, not a crash
    assert "model.gguf" in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
