"""Writing outputs so that nothing half-written is left (torch-free: serving code uses it too)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def read_json(path: Path, remedy: str, kind: type = dict) -> Any:
    """PATH's JSON, which must be a `kind`; a file that is unreadable, not JSON or of another shape is a one-line
    error ending in `remedy` (what to delete or rerun), not a traceback."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise PlanerError(f"{path}: unreadable or not JSON ({type(e).__name__}); {remedy}") from None
    if not isinstance(value, kind):
        raise PlanerError(f"{path}: not the {kind.__name__} planer writes there; {remedy}")
    return value


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


@contextmanager
def writing(out: Path) -> Iterator[None]:
    """Holds OUT's lock (a file beside it) while a command writes OUT or its staging directory, so that a second
    command writing the same place is refused at once, instead of deleting or doubling the first one's work.
    The lock goes with the process, however it ends."""
    lock = out.with_name(f".{out.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PlanerError(f"another planer command is writing {out} right now; let it finish (or stop it), or "
                              "choose another output") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file as we opened it: lock the one there now
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


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
