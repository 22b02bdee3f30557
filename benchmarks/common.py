"""What every benchmark shares: the machine description and how results are recorded."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

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


def machine() -> str:
    from planer.runtime.ort import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(name: str, data: dict, markdown: str) -> None:
    """Write benchmarks/results/NAME.json and append a dated section to RESULTS.md."""
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
