"""The one exception type users see.

Every problem caused by the user's input (a bad path, an invalid arch.json, an
unknown preset) raises `PlanerError` with a one-line message naming the
problem and the fix; the CLI prints it and exits non-zero without a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class PlanerError(Exception):
    """A problem with the user's input; the message says what to change."""


def not_found(path: os.PathLike[str] | str, expected: str) -> str:
    """'PATH: no such <expected>' only when nothing is there; otherwise what is there instead."""
    p = Path(path)
    if not p.exists():
        return f"{p}: no such {expected}"
    return f"{p}: a {'directory' if p.is_dir() else 'file'}, not a {expected}"
