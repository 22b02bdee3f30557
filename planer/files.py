"""Writing outputs so that nothing half-written is left (torch-free: serving code uses it too)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from planer.arch import Architecture
from planer.errors import PlanerError

ARCH_FILE = "arch.json"
MODEL_FILE = "model.onnx"
REQUEST_FILE = "build.json"  # what a build was asked for: model, data, target, deployment, budget, space
TOKENIZER_DIR = "tokenizer"  # an imported model's Hugging Face tokenizer (tokenizer.json)
VOCAB_FILE = "vocab.json"  # word-level data: the words by id (training writes it, builds copy it, serving reads it)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer to fill; renamed onto `path` only when the block finishes, and
    removed if it fails, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with replacing(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex), read in chunks: model files can be large."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def staging_dir(out: Path) -> Path:
    """Where a command assembles OUT before renaming it into place."""
    return out.with_name(f"{out.name}.partial")


def publish(staging: Path, out: Path) -> None:
    """Move a completed staging directory to its final name; an existing `out` is replaced only once the
    new one is in place."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = staging.with_name(staging.name + ".old")
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def exported_model(directory: Path, what: str) -> tuple[Path, Architecture]:
    """DIRECTORY/model.onnx and the architecture beside it, as a build (or an exported run) lays them out."""
    for name in (ARCH_FILE, MODEL_FILE):
        if not (directory / name).is_file():
            raise PlanerError(f"{directory}: no {name}; the {what} must be a build directory or a run directory "
                              "after `planer export`")
    return directory / MODEL_FILE, Architecture.load(directory / ARCH_FILE)
