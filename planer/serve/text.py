"""Text <-> token ids for a served model (bytes, WikiText words, or an imported model's own tokenizer), and
sampling from its logits (numpy only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from planer.errors import PlanerError
from planer.files import TOKENIZER_DIR, VOCAB_FILE, read_json


class ByteTokenizer:
    """enwik8-style models: one token per UTF-8 byte."""

    unit = "byte"
    eos_id: int | None = None  # a byte stream has no end-of-text token
    chat_template: str | None = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class WordTokenizer:
    """WikiText-style models: whitespace-separated words, one <eos> per line, <unk> for unknown words."""

    unit = "word"
    eos_id: int | None = None  # <eos> ends a line, not the text
    chat_template: str | None = None

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.unk, self.eos = self.index["<unk>"], self.index["<eos>"]

    def encode(self, text: str) -> np.ndarray:
        ids: list[int] = []
        for i, line in enumerate(text.split("\n")):
            if i:
                ids.append(self.eos)
            ids.extend(self.index.get(w, self.unk) for w in line.split())
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids).replace(" <eos> ", "\n").replace("<eos>", "\n")


class HFTokenizer:
    """Models imported from Hugging Face: their own tokenizer (tokenizer.json, read by `tokenizers`), its end-of-text
    token and chat template (tokenizer_config.json, or chat_template.jinja beside it as newer transformers save
    it), where the checkpoint has them."""

    unit = "token"

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises its own untyped errors
            raise PlanerError(f"{directory / 'tokenizer.json'}: not a tokenizer the tokenizers library reads "
                              f"({str(e).splitlines()[0][:120]}); import the model again") from None
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path, "import the model again") if config_path.is_file() else {}
        self.special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
        eos = self.special["eos_token"]
        self.eos_id: int | None = self.tokenizer.token_to_id(eos) if eos else None
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text()
        self.chat_template: str | None = template if isinstance(template, str) and template.strip() else None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json names it: the text, or an AddedToken's dict with a `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


Tokenizer = ByteTokenizer | WordTokenizer | HFTokenizer


def load_tokenizer(build_dir: Path, vocab_size: int) -> Tokenizer:
    if (build_dir / TOKENIZER_DIR / "tokenizer.json").is_file():
        return HFTokenizer(build_dir / TOKENIZER_DIR)
    path = build_dir / VOCAB_FILE
    if path.is_file():
        vocab = read_json(path, "rebuild, or remove the file if the model reads bytes", list)
        if not (isinstance(vocab, list) and len(vocab) == vocab_size and {"<unk>", "<eos>"} <= set(vocab)):
            raise PlanerError(f"{path}: expected a list of {vocab_size} words including <unk> and <eos>; "
                              "rebuild, or remove the file if the model reads bytes")
        return WordTokenizer(vocab)
    if vocab_size != 256:
        raise PlanerError(f"{build_dir}: a {vocab_size}-token model needs its words in {VOCAB_FILE}; runs and "
                          "builds of word-level data write it -- train or build it again with this planer")
    return ByteTokenizer()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0; otherwise from the softmax at that temperature, restricted to the
    smallest set of most probable tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return int(np.argmax(logits))
    # Scaled after subtracting the maximum: the most probable token stays at 0, so a temperature near 0
    # sends the rest to -inf (greedy) instead of turning every logit into inf and the softmax into nan.
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):
        p = np.exp(log_softmax((z - z.max(axis=-1, keepdims=True)) / temperature))
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = order[:int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        nucleus = np.zeros_like(p)
        nucleus[keep] = p[keep]
        p = nucleus
    return int(rng.choice(p.size, p=p / p.sum()))
