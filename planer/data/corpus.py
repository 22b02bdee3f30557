"""Corpora in the two formats of the PLANER paper, and the bundled sample.

A data spec names the source:

    sample                 the enwik8-format Wikipedia excerpt shipped in gensim's test data
    enwik8:PATH            a raw byte file (enwik8 itself or anything in its format)
    text:PATH              the same for any UTF-8 text file (the name says what it is)
    wikitext103:DIR        a directory with wiki.{train,valid,test}.tokens

Byte corpora are split like Transformer-XL's enwik8 (first 90 % / next 5 % /
last 5 %); WikiText comes pre-split, with a word vocabulary built from train.
A model imported with its own tokenizer reads a byte corpus as text through
that tokenizer (`tokenize_corpus`), judged by perplexity per token.
"""

from __future__ import annotations

import bz2
import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planer.errors import PlanerError, not_found

SAMPLE_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
UNK, EOS = "<unk>", "<eos>"
SPLITS = ("train", "valid", "test")


class DataError(PlanerError):
    """A data source that cannot be read in the named format."""


@dataclass
class Corpus:
    spec: str  # the data spec it was loaded from, stored with every run (a tokenized one: the spec it was read from)
    unit: str  # "byte" (report bits per character), "word" or "token" (report perplexity)
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: list[str] | None = None  # words by id; None for bytes and tokenizer ids
    symbols: int = 256  # ids in [0, symbols): 256 for bytes, the tokenizer's vocabulary for tokenized text

    @property
    def name(self) -> str:
        """How reports name it: its spec, and whose tokens they are when a tokenizer read it."""
        return f"{self.spec}, read through the model's tokenizer" if self.unit == "token" else self.spec

    @property
    def vocab_size(self) -> int:
        return self.symbols if self.vocab is None else len(self.vocab)

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def training_split(self) -> TrainingSplit:
        """The training split alone: all that choosing a network may read."""
        return TrainingSplit(self.spec, self.unit, self.train, self.vocab, self.symbols)


@dataclass(frozen=True)
class TrainingSplit:
    """A corpus's training split and how to read it, without its validation and test splits: what the search
    receives, so that nothing it scores, trains or chooses on can be a token that judges the result."""

    spec: str
    unit: str
    tokens: np.ndarray
    vocab: list[str] | None = None
    symbols: int = 256

    def trial_corpus(self, cut: int, held_out: np.ndarray) -> Corpus:
        """A corpus for a trial training: the first `cut` tokens to train on and `held_out`, training tokens the
        trial never trains on, where the validation split would be, to judge it by."""
        return Corpus(self.spec, self.unit, self.tokens[:cut], held_out, held_out[:0], self.vocab, self.symbols)


def split_bytes(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Transformer-XL's enwik8 split: first 90 %, next 5 %, last 5 % (90M/5M/5M for enwik8)."""
    n = len(data)
    a, b = n * 90 // 100, n * 95 // 100
    return data[:a], data[a:b], data[b:]


def sample_path() -> Path:
    """The bundled sample, located without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the 'sample' corpus ships in gensim's test data; install it with "
                        "`pip install gensim` (or `pip install planer[sample]`), or pass --data enwik8:PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / SAMPLE_FILE
    if not path.is_file():
        raise DataError(f"gensim is installed but {path} is missing; reinstall gensim "
                        "(`pip install --force-reinstall gensim`) or pass --data enwik8:PATH")
    return path


def load_bytes(spec: str, raw: bytes) -> Corpus:
    if len(raw) < 1000:
        raise DataError(f"{spec}: only {len(raw)} bytes; a byte corpus needs at least 1000 to split 90/5/5")
    train, valid, test = split_bytes(np.frombuffer(raw, dtype=np.uint8))
    return Corpus(spec, "byte", train, valid, test)


def load_enwik8(path: Path, spec: str) -> Corpus:
    if not path.is_file():
        raise DataError(f"{not_found(path, 'file')}; {spec.partition(':')[0]}:PATH needs a raw (unzipped) file")
    raw = path.read_bytes()
    if raw[:2] == b"PK" or raw[:3] == b"BZh" or raw[:2] == b"\x1f\x8b":
        raise DataError(f"{path}: this is a compressed archive; unpack it and pass the raw file")
    return load_bytes(spec, raw)


def tokenize(path: Path) -> list[str]:
    """WikiText words: whitespace-split, one <eos> per line (Transformer-XL's convention)."""
    words: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            words.extend(line.split())
            words.append(EOS)
    return words


def build_vocab(words: list[str]) -> list[str]:
    """Vocabulary of the training words, most frequent first; <unk> and <eos> always present."""
    counts = Counter(words)
    vocab = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in (UNK, EOS)]
    return [UNK, EOS] + vocab


def encode(words: list[str], index: dict[str, int]) -> np.ndarray:
    unk = index[UNK]
    return np.fromiter((index.get(w, unk) for w in words), dtype=np.int32, count=len(words))


def load_wikitext(directory: Path, spec: str) -> Corpus:
    if not directory.is_dir():
        raise DataError(f"{not_found(directory, 'directory')}; wikitext103:DIR needs the folder with wiki.*.tokens")
    paths = {s: directory / f"wiki.{s}.tokens" for s in SPLITS}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(f"{directory}: missing {', '.join(missing)}; expected wiki.train.tokens, "
                        "wiki.valid.tokens and wiki.test.tokens (the WikiText-103 word-level release)")
    try:
        words = {s: tokenize(p) for s, p in paths.items()}
    except UnicodeDecodeError as e:
        raise DataError(f"{directory}: not UTF-8 text ({e}); is this the word-level (not raw) WikiText?") from None
    vocab = build_vocab(words["train"])
    index = {w: i for i, w in enumerate(vocab)}
    return Corpus(spec, "word", *(encode(words[s], index) for s in SPLITS), vocab=vocab)


def tokenize_corpus(corpus: Corpus, tokenizer_dir: Path) -> Corpus:
    """A byte corpus read as text by a Hugging Face tokenizer (an imported model's), split where the bytes
    were split, so the held-out text is the same one byte-level models are judged on. It keeps the byte corpus's
    spec: runs record the data the user named (the tokenizer travels in the run's tokenizer/, and a path to it
    would name the staging directory it was read from)."""
    if corpus.unit != "byte":
        raise DataError(f"{corpus.spec}: only byte corpora (sample, enwik8:PATH, text:PATH) can be re-tokenized for a "
                        "model with its own tokenizer")
    from tokenizers import Tokenizer  # ships with transformers; no torch

    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{tokenizer_dir}: no tokenizer.json (a fast tokenizer); import the model again")
    tokenizer = Tokenizer.from_file(str(path))

    def encode(data: np.ndarray) -> np.ndarray:
        # Lines are encoded separately (batched, in parallel) and joined: the same ids as one long call
        # except at line boundaries, without building one multi-megabyte encoding.
        lines = data.tobytes().decode("utf-8", errors="replace").splitlines(keepends=True)
        ids = [i for e in tokenizer.encode_batch(lines, add_special_tokens=False) for i in e.ids]
        return np.asarray(ids, dtype=np.int32)

    return Corpus(corpus.spec, "token", encode(corpus.train), encode(corpus.valid),
                  encode(corpus.test), symbols=tokenizer.get_vocab_size())


def canonical_spec(spec: str) -> str:
    """`spec` with its path absolute, so that runs record, and resumes compare, the data and not its spelling."""
    if not isinstance(spec, str):
        raise DataError(f"data spec {spec!r} is not text; use sample, enwik8:PATH, text:PATH or wikitext103:DIR")
    kind, sep, location = spec.partition(":")
    if spec == "sample" or not sep or not location:
        return spec
    return f"{kind}:{Path(location).expanduser().resolve()}"


def load_corpus(spec: str) -> Corpus:
    """Load a corpus from a data spec (see the module docstring)."""
    spec = canonical_spec(spec)
    if spec == "sample":
        return load_bytes(spec, bz2.decompress(sample_path().read_bytes()))
    kind, sep, location = spec.partition(":")
    if not sep or not location:
        raise DataError(f"unknown data spec {spec!r}; use sample, enwik8:PATH, text:PATH or wikitext103:DIR")
    path = Path(location)
    if kind in ("enwik8", "text"):
        return load_enwik8(path, spec)
    if kind == "wikitext103":
        return load_wikitext(path, spec)
    raise DataError(f"unknown data format {kind!r} in {spec!r}; use sample, enwik8:PATH, text:PATH or wikitext103:DIR")
