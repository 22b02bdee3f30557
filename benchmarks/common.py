"""What every benchmark shares: the machine description, how results are recorded, and the tiny inputs of
`--smoke` (tests/test_benchmarks.py runs each benchmark with it, so that none stops working unseen)."""

from __future__ import annotations

import argparse
import atexit
import bz2
import functools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planer.arch import Architecture
    from planer.space import SearchSpace

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def dispatch_options(p: argparse.ArgumentParser) -> None:
    """The MoE layers the dispatch benchmarks sweep: E x k x batch at one width, against a dense FFN."""
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--activation", default="gelu_tanh")
    p.add_argument("--experts", default="2,4,8,16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tgt-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=200)


class TorchCall:
    """A PyTorch computation behind the engine interface, so the one timing function times it; each call waits
    for the device (on CUDA), or the clock would stop before the kernels do."""

    name, input_names, output_names = "torch", [], []

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn

    def run(self, feeds: dict) -> dict:
        import torch

        with torch.no_grad():
            self.fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {}

    def provenance(self) -> dict:
        import torch

        return {"engine": self.name, "torch": torch.__version__}


def smoke_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true",
                   help="run end to end on tiny inputs in seconds and record nothing (its figures mean nothing)")


def smoke_shapes(a: argparse.Namespace) -> None:
    """Shrink the layer options a dispatch benchmark sweeps (the names of `dispatch_options`) to one tiny case."""
    a.d_model, a.width, a.experts, a.batches, a.tgt_len, a.iters = 32, 64, "2", "1", 16, 3


def tiny_arch() -> Architecture:
    """The network of every smoke run: one attention block of two heads and one FFN, 16-token segments."""
    from planer.arch import Architecture, BlockSpec

    return Architecture(d_model=32, vocab_size=256, blocks=(BlockSpec.attn(2, 16), BlockSpec.ffn(64)), tgt_len=16,
                        mem_len=16).validate()


def smoke_space(arch: Architecture) -> SearchSpace:
    """PLANER's default space around `arch` with a single MoE candidate, so that profiling it takes seconds."""
    from planer.space import SearchSpace

    return SearchSpace.default(arch, experts=(2,), top_k=(1,), widths=(1.0,))


@functools.cache
def tiny_text() -> Path:
    """40 kB of the bundled sample as an enwik8-format file, in a folder removed when the process exits."""
    from planer.data.corpus import sample_path

    root = Path(tempfile.mkdtemp(prefix="planer-smoke-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    text = root / "enwik8_head"
    text.write_bytes(bz2.decompress(sample_path().read_bytes())[:40_000])
    return text


@functools.cache
def tiny_run() -> Path:
    """A run directory of `tiny_arch()` trained two steps on `tiny_text()` (its config.json names that file, so
    run_corpus reads it again)."""
    from planer.data import load_corpus
    from planer.train.presets import TrainConfig
    from planer.train.trainer import train

    run = tiny_text().parent / "run"
    train(load_corpus(f"enwik8:{tiny_text()}"), TrainConfig(steps=2, batch=2, eval_every=2, ckpt_every=2,
                                                            eval_tokens=256), run, arch=tiny_arch(), show_progress=False)
    return run


@functools.cache
def tiny_build() -> Path:
    """`tiny_run()` with its model.onnx, laid out as a build directory (a step of its own: exporting takes seconds and
    only the benchmarks of builds need it)."""
    from planer.checkpoint import load_model
    from planer.export import export_lm

    run = tiny_run()
    export_lm(load_model(run).eval(), run / "model.onnx")
    return run


def given_or_tiny(p: argparse.ArgumentParser, given: Path | None, smoke: bool, *, build: bool = False) -> Path:
    """The run (or with `build`, build) directory a benchmark measures: the one given, else under --smoke a tiny
    one made here."""
    if given is not None:
        return given
    if not smoke:
        p.error("give the directory to measure (or --smoke)")
    return tiny_build() if build else tiny_run()


def machine() -> str:
    from planer.runtime.ort import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(name: str, data: dict, markdown: str, *, smoke: bool = False) -> None:
    """Write benchmarks/results/NAME.json and append a dated section to RESULTS.md; a smoke run only prints its
    table (after checking its data would serialise), since tiny inputs' figures must not pass for results."""
    if smoke:
        json.dumps(data)
        print(f"smoke run of {name}, nothing recorded:\n\n{markdown.strip()}")
        return
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"benchmark": name, "date": stamp, "commit": commit(), "machine": machine(),
            "command": shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])}
    (out / f"{name}.json").write_text(json.dumps({**meta, **data}, indent=2) + "\n")
    section = (f"\n## {name} — {stamp}\n\nCommand: `{meta['command']}` (commit {meta['commit']}; "
               f"{meta['machine']})\n\n{markdown.strip()}\n")
    with RESULTS.open("a") as f:
        f.write(section)
    print(section)


def spread(positions: list[int], n: int | None) -> list[int]:
    """`n` of `positions` spread evenly over them, first and last included (all of them when n is None or more)."""
    if not n or n >= len(positions):
        return positions
    return [positions[round(j * (len(positions) - 1) / max(1, n - 1))] for j in range(n)]


def local_library(run: Path, data: str | None, baseline, options: list, cfg, rank: Callable):
    """The alternatives `options` (per block of `baseline`, planer.search.local.Library's layout) trained and scored
    as the local search trains and scores them: each position's parent block is `rank(baseline, probe)`'s, its
    narrower alternatives cut from it. Returns the library and the held-out probe it was trained beside."""
    from tqdm import tqdm

    from planer.data import Segments
    from planer.search.local import Library, calibration_inputs, distil_locally, score, score_probe
    from planer.search.search import arch_start, held_out_probe
    from planer.train.trainer import run_corpus

    arch = baseline.arch
    training = run_corpus(run, data, arch.vocab_size).training_split()
    cut = arch_start(training, cfg)
    segments = Segments(training.tokens[:cut], cfg.batch, arch.tgt_len)
    probe = held_out_probe(training, arch, cfg)
    parent = rank(baseline, probe)
    splits = [p for p, specs in enumerate(options) if any(s.kind == "moe" for s in specs)]
    library = Library(parent, options, calibration_inputs(parent, segments, splits))
    with tqdm(total=cfg.local_steps, desc=f"local distillation of {len(library.trainable())} alternatives",
              unit="step") as bar:
        distil_locally(library, segments, probe, cfg, bar)
    score(library, score_probe(training, cut, arch, cfg))
    return library, probe
