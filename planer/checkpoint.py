"""Reading and writing run directories safely.

A run directory holds `arch.json` and `model.safetensors` (weights only, never
pickled objects) plus whatever the stage that wrote it adds. Output
directories are assembled under a temporary name and renamed into place at
the end, so a failed or interrupted command never leaves a half-written one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from planer.arch import ArchError, Architecture
from planer.errors import PlanerError, not_found
from planer.files import ARCH_FILE, replacing
from planer.nn import LM

WEIGHTS_FILE = "model.safetensors"


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with replacing(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_model(run_dir: str | os.PathLike, **model_kwargs: float) -> LM:
    """Build the LM described by RUN/arch.json and load RUN/model.safetensors into it."""
    run = Path(run_dir)
    if not run.is_dir():
        raise PlanerError(f"{not_found(run, 'run directory')}; pass the --out directory of `planer train`")
    arch_path, weights_path = run / ARCH_FILE, run / WEIGHTS_FILE
    if not arch_path.is_file():
        raise PlanerError(f"{run}: no {ARCH_FILE}; this is not a planer run directory")
    arch = Architecture.load(arch_path)
    if not weights_path.is_file():
        raise PlanerError(f"{run}: no {WEIGHTS_FILE}; the run never saved a checkpoint — train it again")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PlanerError(f"{weights_path}: unreadable or corrupt ({e}); restore it or train again") from None
    model = LM(arch, **model_kwargs)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
                           for what, names in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong)) if names)
        raise PlanerError(f"{weights_path} does not match {arch_path} ({detail}); "
                          "the two files come from different runs")
    model.load_state_dict(state)
    return model


__all__ = ["WEIGHTS_FILE", "ArchError", "load_model", "save_weights"]
