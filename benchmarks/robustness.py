"""Issue 39's robustness cases, replayed as a user and a hostile client would: interrupted and concurrent runs, a
hostile HTTP client, a doctored CI-gate reference, damaged files and absurd numbers, each against the real `planer`
command (`python -m planer ...` in subprocesses, real signals, a real `planer serve` process driven by raw sockets
and httpx) in a temporary directory. Prints one line per case: `held` or `FAILED`, its name and, on failure, what
was seen; exits 1 if any case failed.

    python benchmarks/robustness.py                       # every case: 2-5 minutes on 2 cores, with other work
    python benchmarks/robustness.py --only 'serve-*'      # a subset (shell-style patterns, repeatable)
    python benchmarks/robustness.py --list

A refusal "in one line" means: a non-zero exit, no "Traceback" in the output, and a last line that starts with
"Error:". A damaged file in a partial build or sweep holds when the command that continues it refuses in one line,
or finishes, or makes the file again and goes on (it is then stopped by SIGTERM, which must end it in one line: a
stage run again with a `--budget small` takes minutes); a truncated file planer made itself must be made again.

Fixtures are made as cheaply as the cases allow: micro training runs of the `tiny` preset narrowed to two layers of
width 32 (the CLI), a build-like directory (their weights exported with `planer export`), an interrupted sweep
(SIGTERM), and a partial build whose stages were trained through the library with a micro budget (cases marked
`(library)`: a `--budget small` build takes many minutes on 2 cores), its build.json then replaced by what the
CLI's command asks for, so that the command continues it.
"""

from __future__ import annotations

import argparse
import bz2
import fnmatch
import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import record

PY = sys.executable
# PyTorch's intra-op threads spin while they wait: on two cores shared with other work they made a 60-step micro
# run take 38 s instead of 11. What the cases check does not depend on them.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# The tiny preset narrowed to two layers of width 32: a training step takes milliseconds.
MICRO = ["--preset", "tiny", "--layers", "2", "--d-model", "32", "--heads", "2", "--d-head", "16", "--d-inner", "64",
         "--batch", "1", "--quiet"]
STEPS = 60  # long enough for a run to be stopped before its first checkpoint (see paused_before_checkpoint)
LONG = ["--steps", STEPS, "--eval-every", 20]
# The baseline's own blocks and skip: profiling exports and times no block beyond the baseline's.
SPACE = {"positions": 4, "candidates": [{"kind": "skip"}, {"kind": "attn", "heads": 2, "head_dim": 16},
                                        {"kind": "ffn", "d_inner": 64}]}
# A build from the fixture run that resumes the library-made partial build (its request is this command's).
BUILD_OPTIONS = ["--target-speedup", "1.2", "--budget", "small", "--precision", "fp32", "--threads", "1", "--quiet"]
SWEEP_OPTIONS = ["--target-speedup", "1.2,1.5", *BUILD_OPTIONS[2:]]
FEW_SECONDS = 15  # a refusal "before any work" on 2 busy cores: importing torch alone takes several
HUGE = "1000000000"


# Makes Fixtures.partial_build: a build through the library with a micro budget and short timings, stopped before
# its export, whose build.json is then rewritten to what the CLI's command (BUILD_OPTIONS) asks for.
PARTIAL_BUILD = """
import json
from dataclasses import asdict
from pathlib import Path
import planer.build as b
from planer.deployment import Deployment, Target
from planer.search.search import SearchConfig
from planer.space import SearchSpace

cli = Deployment(batch=1, tgt_len=128, mem_len=128, threads=1, precisions=("fp32",))
fast = Deployment(batch=1, tgt_len=128, mem_len=128, threads=1, precisions=("fp32",), min_iters=10,
                  min_seconds=0.1, verdict_seconds=0.3)
micro = b.Budget(SearchConfig(rounds=1, steps=3, batch=2, valid_tokens=512), distill_steps=3)

def stop(*args, **kwargs):
    raise KeyboardInterrupt

b._Build.exported = stop
try:
    b.build("{run}", "{out}", dep=fast, target=Target(speedup=1.2), budget=micro, space=SearchSpace.load("{space}"),
            show_progress=False)
except KeyboardInterrupt:
    pass
request = Path("{request}")
asked = json.loads(request.read_text())
asked.update(deployment=asdict(cli), budget=asdict(b.BUDGETS["small"].searching("gumbel")))
request.write_text(json.dumps(asked))
"""


class Setup(Exception):
    """A fixture could not be made: the cases that need it fail with this message."""


@dataclass
class Done:
    code: int | None  # None: still running at the timeout, then killed
    output: str  # stdout and stderr together
    seconds: float

    @property
    def last(self) -> str:
        lines = [line for line in self.output.splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""


class Command:
    """`python -m planer ARGS` running in the background, its output in a file (no pipe to fill and block it)."""

    def __init__(self, *args: object, cwd: Path, log: Path, **popen: object) -> None:
        self.log, self.start = log, time.monotonic()
        with log.open("w") as f:
            self.proc = subprocess.Popen([PY, "-m", "planer", *map(str, args)], cwd=cwd, stdout=f,
                                         stderr=subprocess.STDOUT, env=ENV, **popen)

    def until(self, ready: Callable[[], bool], timeout: float = 120) -> bool:
        """Waits for `ready()`; False if the command ended or the time ran out first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def signal(self, *signals: signal.Signals) -> None:
        for s in signals:
            self.proc.send_signal(s)

    def finish(self, timeout: float = 180) -> Done:
        """Waits for the command's end (killing it at `timeout`: code None)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            code = None
        return Done(code, self.log.read_text(errors="replace"), time.monotonic() - self.start)

    def stop(self) -> None:
        """Kills the command, stopped (SIGSTOP) or not."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(30)

    def end(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after 30 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.stop()


def refused(done: Done, about: str = "", within: float | None = None) -> str | None:
    """None if `done` is a refusal in one line (mentioning `about`, in `within` seconds), else what was seen."""
    if done.code is None:
        return f"not refused: still running after {done.seconds:.0f} s (last line {done.last[:160]!r})"
    if "Traceback" in done.output:
        return f"traceback: {' | '.join(done.output.strip().splitlines()[-3:])[:300]}"
    if done.code == 0:
        return f"accepted (exit 0): {done.last[:200]!r}"
    if not done.last.startswith("Error:"):
        return f"exit {done.code}, last line {done.last[:200]!r}"
    if about.lower() not in done.last.lower():
        return f"refused for another reason: {done.last[:250]}"
    if within is not None and done.seconds > within:
        return f"refused only after {done.seconds:.1f} s: {done.last[:200]}"
    return None


def rerun_over_damage(fx: Fixtures, out: Path, damaged: Path, redo: bool, *args: object) -> str | None:
    """Runs `planer ARGS`, the command that continues OUT.partial, in which the file `damaged` was damaged. Held
    when the command refuses in one line; or finishes cleanly; or redoes the file (removes or rewrites it and goes
    on), after which it is stopped with SIGTERM -- finishing would run that stage again with the command's budget,
    minutes here -- and must end in one line. With `redo` a refusal fails: the file is one planer can make again,
    so a command that stops at it stops there every time."""
    bad, inode = damaged.read_bytes(), damaged.stat().st_ino

    def redone() -> bool:  # removed, or written anew (planer writes files whole, by renaming: a new inode)
        try:
            return damaged.stat().st_ino != inode or damaged.read_bytes() != bad
        except OSError:
            return True

    command = fx.command(*args)
    redoing = command.until(redone, 240)
    if redoing:
        command.signal(signal.SIGTERM)
    done = command.finish(120)
    if done.code == 0 and "Traceback" not in done.output:
        return None if out.is_dir() and not partial(out).exists() else f"exit 0, yet {left_behind(out)}"
    problem = refused(done)
    if problem:
        return f"{'stopped (SIGTERM) while redoing it: ' if redoing else ''}{problem}"
    if redo and not redoing:
        return f"the same command stops at it every time: {done.last[:300]}"
    return None


def left_behind(out: Path) -> list[str]:
    """What a command writing OUT left beside it: OUT, OUT.partial, its lock."""
    return sorted(p.name for p in out.parent.iterdir() if p.name in (out.name, f"{out.name}.partial",
                                                                     f".{out.name}.lock"))


def partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_http(port: int, request: bytes, half_close: bool = False, timeout: float = 10) -> bytes:
    """Sends `request` on a new connection (then shuts down its sending side, with `half_close`) and returns all
    the server sent until it closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
        return b"".join(chunks)


def post(host: str, body: bytes = b'{"text": "hello there"}', origin: str | None = None,
         extra: str = "Connection: close\r\n") -> bytes:
    return (f"POST /v1/score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            + (f"Origin: {origin}\r\n" if origin else "") + extra
            + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def status(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode(errors="replace") or "(connection closed without an answer)"


class Server:
    """`planer serve BUILD` on a free port of 127.0.0.1, its log in a file; `preexec_fn` runs in the child first."""

    def __init__(self, root: Path, build: Path, *options: object, preexec_fn: Callable[[], None] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = Command("serve", build, "--port", self.port, "--threads", 1, *options, cwd=root,
                               log=root / f"serve-{self.port}.log", preexec_fn=preexec_fn)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.command.proc.poll() is not None or time.monotonic() > deadline:
                self.command.end()
                raise Setup(f"planer serve did not start: {self.command.log.read_text()[-300:]}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def pid(self) -> int:
        return self.command.proc.pid

    def log(self) -> str:
        return self.command.log.read_text(errors="replace")

    def metric(self, name: str, having: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and having in line)



class Fixtures:
    """What the cases run against, each made on first use, in ROOT."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[Server] = []
        self._names = 0

    def fresh(self, name: str) -> Path:
        """A path in ROOT that nothing has used."""
        self._names += 1
        return self.root / f"{name}-{self._names}"

    def planer(self, *args: object, timeout: float = 180) -> Done:
        """`python -m planer ARGS` run to its end (or killed at `timeout`)."""
        return self.command(*args).finish(timeout)

    def command(self, *args: object, **popen: object) -> Command:
        return Command(*args, cwd=self.root, log=self.fresh("log").with_suffix(".txt"), **popen)

    def train(self, out: Path, *options: object) -> list[object]:
        """`planer train`'s arguments for a micro run into OUT on the fixture's data."""
        return ["train", *MICRO, "--data", self.data, "--out", out, *options]

    @functools.cached_property
    def data(self) -> str:
        """120 kB of the bundled sample as an enwik8-format file (validation and test splits of 6 kB each)."""
        from planer.data.corpus import sample_path

        path = self.root / "enwik8-head"
        path.write_bytes(bz2.decompress(sample_path().read_bytes())[:120_000])
        return f"enwik8:{path}"

    @functools.cached_property
    def runs(self) -> tuple[Path, Path]:
        """Two finished micro runs of two steps (seeds 0 and 1), trained at once."""
        outs = (self.root / "run", self.root / "run-seed1")
        commands = [self.command(*self.train(out, "--steps", 2, "--seed", seed)) for seed, out in enumerate(outs)]
        for out, command in zip(outs, commands):
            done = command.finish(300)
            if done.code != 0:
                raise Setup(f"training {out.name} failed: {done.last}")
        return outs

    @property
    def run(self) -> Path:
        return self.runs[0]

    @functools.cached_property
    def space(self) -> Path:
        path = self.root / "space.json"
        path.write_text(json.dumps(SPACE))
        return path

    @functools.cached_property
    def exported(self) -> Path:
        """The fixture run's network exported and nothing else (arch.json, model.safetensors, model.onnx): a
        directory as `planer export` leaves one, without the training record of a run."""
        out = self.root / "exported"
        out.mkdir()
        for name in ("arch.json", "model.safetensors"):
            shutil.copy(self.run / name, out / name)
        done = self.planer("export", out)
        if done.code != 0:
            raise Setup(f"planer export failed: {done.last}")
        return out

    @functools.cached_property
    def build(self) -> Path:
        """A directory laid out like a build's: the exported network, its baseline/ (the same graph: the default
        reference of `planer bench`) and the build.json a build writes."""
        out = self.root / "build"
        shutil.copytree(self.exported, out)
        (out / "baseline").mkdir()
        for name in ("arch.json", "model.onnx"):
            shutil.copy(out / name, out / "baseline" / name)
        deployment = {"engine": "ort", "batch": 1, "tgt_len": 128, "mem_len": 128, "threads": 1}
        (out / "build.json").write_text(json.dumps({"model": str(self.run), "data": self.data,
                                                    "target_speedup": 2.0, "deployment": deployment}))
        return out

    @functools.cached_property
    def server(self) -> Server:
        """`planer serve` on the build, taking bodies up to 64 MB (so that a 50 MB one is read, not refused)."""
        self.servers.append(Server(self.root, self.build, "--max-body-kb", 65536))
        return self.servers[-1]

    def reference(self, **edit: object) -> Path:
        """A `planer bench --save` reference of the build against its baseline (ratio 1), with `edit` applied
        (a value None deletes the key)."""
        digest = {n: hashlib.sha256((self.build / n).read_bytes()).hexdigest() for n in
                  ("model.onnx", "baseline/model.onnx")}
        stored = {"format": "planer.bench/1", "ratio": 1.0, "engine": {"engine": "ort"},
                  "deployment": {"batch": 1, "tgt_len": 128, "mem_len": 128, "threads": 1},
                  "build": {"p50": 1.0, "sha256": digest["model.onnx"]},
                  "reference": {"p50": 1.0, "sha256": digest["baseline/model.onnx"]}}
        stored = {k: v for k, v in (stored | edit).items() if v is not None}
        path = self.fresh("reference").with_suffix(".json")
        path.write_text(json.dumps(stored))
        return path

    @functools.cached_property
    def partial_build_job(self) -> subprocess.Popen:
        """Starts making `partial_build` in the background (a minute of exports and timing), so that other
        cases run meanwhile."""
        out = self.root / "partial-template"
        code = PARTIAL_BUILD.format(run=str(self.run), out=str(out), space=str(self.space),
                                    request=str(partial(out) / "build.json"))
        with (self.root / "partial-template.txt").open("w") as log:
            return subprocess.Popen([PY, "-c", code], cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=ENV)

    @functools.cached_property
    def partial_build(self) -> Path:
        """A partial build of the fixture run whose search, distillation and reference baselines are done (the
        library, with a micro budget and short timings; interrupted before the export), and whose build.json is
        what `planer build --model RUN --space SPACE BUILD_OPTIONS` asks for, so that the command resumes it."""
        self.partial_build_job.wait(900)
        made = partial(self.root / "partial-template")
        if self.partial_build_job.returncode != 0 or not (made / "distill" / "eval.json").is_file():
            raise Setup(f"the partial build was not made: {(self.root / 'partial-template.txt').read_text()[-300:]}")
        return made

    def partial_build_copy(self) -> tuple[Path, list[object]]:
        """A copy of the partial build, as OUT.partial, and the command that continues it."""
        out = self.fresh("build")
        shutil.copytree(self.partial_build, partial(out))
        return out, ["build", "--model", self.run, "--space", self.space, *BUILD_OPTIONS, "--out", out]

    def resumed_build(self, damage: str, how: Callable[[Path], None], redo: bool = False) -> str | None:
        """Damages the file `damage` (`how`) of a copy of the partial build, and continues it with the same command
        (rerun_over_damage says when that holds)."""
        out, command = self.partial_build_copy()
        how(partial(out) / damage)
        return rerun_over_damage(self, out, partial(out) / damage, redo, *command)

    @functools.cached_property
    def interrupted_sweep(self) -> Path:
        """An OUT.partial of a sweep of the fixture run, stopped by SIGTERM while its first target profiles (once
        that build has recorded its request: a signal during `import onnxruntime` is reported as ONNX Runtime
        missing)."""
        out = self.root / "sweep-template"
        first = self.command("build", "--model", self.run, "--space", self.space, *SWEEP_OPTIONS, "--out", out)
        if not first.until(lambda: (partial(out) / "x1.2.partial" / "build.json").is_file()):
            first.stop()
            raise Setup(f"the sweep never started its first target: {first.finish().last}")
        first.signal(signal.SIGTERM)
        problem = refused(first.finish(60), "interrupted")
        if problem or not (partial(out) / "sweep.json").is_file():
            raise Setup(f"the sweep did not stop cleanly on SIGTERM: {problem}")
        return partial(out)

    def begin(self, names: list[str]) -> None:
        """Starts the background fixtures the cases `names` will need (a fixture that fails here fails again, with
        its message, in the cases)."""
        if any(name.startswith("partial-build") for name in names):
            try:
                self.partial_build_job  # noqa: B018 (a cached property: started now, awaited by the cases)
            except Setup:
                pass

    def close(self) -> None:
        if "partial_build_job" in self.__dict__ and self.partial_build_job.poll() is None:
            self.partial_build_job.kill()
            self.partial_build_job.wait()
        for server in self.servers:
            server.command.end()


# --- interruption and concurrency ---------------------------------------------------------------------------------

def paused_before_checkpoint(fx: Fixtures, out: Path) -> Command:
    """A new micro run into OUT, stopped (SIGSTOP) as soon as its staging directory exists, before any
    checkpoint: the caller sends it what it likes, then SIGCONT."""
    run = fx.command(*fx.train(out, *LONG, "--ckpt-every", STEPS))
    if not run.until(lambda: (partial(out) / "arch.json").is_file()):
        run.stop()
        raise Setup(f"training did not start: {run.finish().last}")
    run.signal(signal.SIGSTOP)
    if (partial(out) / "config.json").is_file():
        run.stop()
        raise Setup("the run reached its first checkpoint before it could be stopped")
    return run


def paused_after_checkpoint(fx: Fixtures, out: Path) -> Command:
    """A micro run into OUT that checkpoints every 20 steps, stopped (SIGSTOP) once its first checkpoint exists."""
    run = fx.command(*fx.train(out, *LONG, "--ckpt-every", 20))
    if not run.until(lambda: (partial(out) / "config.json").is_file()):
        run.stop()
        raise Setup(f"training never reached its first checkpoint: {run.finish().last}")
    run.signal(signal.SIGSTOP)
    return run


def finished_run(out: Path) -> str | None:
    """None if OUT is a finished run directory with nothing of its writing left beside it."""
    missing = [n for n in ("model.safetensors", "eval.json", "config.json") if not (out / n).is_file()]
    if missing:
        return f"{out.name} lacks {', '.join(missing)} (beside it: {left_behind(out)})"
    left = [n for n in left_behind(out) if n != out.name]
    return f"left beside {out.name}: {left}" if left else None


def killed_before_checkpoint(fx: Fixtures, sig: signal.Signals) -> str | None:
    out = fx.fresh("killed")
    run = paused_before_checkpoint(fx, out)
    run.signal(sig, signal.SIGCONT)
    killed = run.finish(60)
    if sig == signal.SIGTERM:
        problem = refused(killed)
        if problem:
            return f"on SIGTERM: {problem}"
        if left_behind(out):
            return f"SIGTERM left {left_behind(out)}"
    again = fx.planer(*fx.train(out, *LONG, "--ckpt-every", STEPS))
    if again.code != 0:
        return f"the same command after the kill: exit {again.code}: {again.last[:250]}"
    return finished_run(out)


def train_sigkill_before_checkpoint(fx: Fixtures) -> str | None:
    return killed_before_checkpoint(fx, signal.SIGKILL)


def train_sigterm_before_checkpoint(fx: Fixtures) -> str | None:
    return killed_before_checkpoint(fx, signal.SIGTERM)


def metrics_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def refused_beside(first: Command, second: Done, what: str) -> str | None:
    """`second`, started while `first` was paused, must be refused; `first`, resumed, must then finish."""
    first.signal(signal.SIGCONT)
    problem = refused(second)
    done = first.finish(300)
    if problem:
        return f"the {what}: {problem}"
    return None if done.code == 0 else f"the first run failed after the {what}: {done.last[:200]}"


def train_two_writers_one_out(fx: Fixtures) -> str | None:
    """The second command starts while the first (paused) holds OUT.partial; the first then goes on."""
    out = fx.fresh("two-writers")
    first = paused_before_checkpoint(fx, out)
    second = fx.planer(*fx.train(out, *LONG, "--ckpt-every", STEPS))
    return refused_beside(first, second, "second command") or finished_run(out) or (None if len(set(metrics_steps(out))) == len(metrics_steps(out))
                                 else f"metrics.jsonl steps {metrics_steps(out)}")


def train_resume_while_training(fx: Fixtures) -> str | None:
    out = fx.fresh("resume-while-training")
    first = paused_after_checkpoint(fx, out)
    second = fx.planer("train", "--out", out, "--resume", "--quiet")
    if problem := refused_beside(first, second, "--resume"):
        return problem
    steps = metrics_steps(out)
    return finished_run(out) or (None if steps == [20, 40, 60] else f"metrics.jsonl steps {steps}")


def train_sigterm_then_resume_without_data(fx: Fixtures) -> str | None:
    """SIGTERM after a checkpoint says to resume; then the README's `planer train --out R --resume` (no --data,
    no --preset) finishes the run."""
    out = fx.fresh("resume-without-data")
    run = paused_after_checkpoint(fx, out)
    run.signal(signal.SIGTERM, signal.SIGCONT)
    problem = refused(run.finish(60), "--resume")
    if problem:
        return f"on SIGTERM: {problem}"
    resumed = fx.planer("train", "--out", out, "--resume", "--quiet")
    if resumed.code != 0 or f"step {STEPS}," not in resumed.output:
        return f"train --out R --resume: exit {resumed.code}: {resumed.last[:250]}"
    return finished_run(out)


def train_resume_weights_overwritten(fx: Fixtures) -> str | None:
    """A kill between the checkpoint's renames, replayed: a finished run whose model.safetensors was replaced by
    another run's resumes exactly as its intact copy does (train_state.pt holds weights and optimizer together)."""
    from safetensors.numpy import load_file

    run, other = fx.runs
    intact, damaged = fx.fresh("resume-intact"), fx.fresh("resume-overwritten")
    shutil.copytree(run, intact)
    shutil.copytree(run, damaged)
    shutil.copy(other / "model.safetensors", damaged / "model.safetensors")
    resumes = [fx.command("train", "--out", out, "--resume", "--steps", 4, "--quiet") for out in (intact, damaged)]
    for out, resume in zip((intact, damaged), resumes):
        done = resume.finish(300)
        if done.code != 0:
            return f"resuming {'the overwritten' if out == damaged else 'the intact'} run: {done.last[:250]}"
    a, b = load_file(str(intact / "model.safetensors")), load_file(str(damaged / "model.safetensors"))
    apart = max(float(abs(a[k] - b[k]).max()) for k in a)
    return None if apart < 1e-5 else f"the resumed weights differ from the intact run's by up to {apart:.3g}"


def sweep_continued_with_another_model(fx: Fixtures) -> str | None:
    """An interrupted sweep (SIGTERM once it recorded its model) continued with another run as --model."""
    out = fx.fresh("sweep")
    shutil.copytree(fx.interrupted_sweep, partial(out))
    other = fx.runs[1]
    done = fx.planer("build", "--model", other, "--space", fx.space, *SWEEP_OPTIONS, "--out", out, timeout=90)
    return refused(done, "model", within=FEW_SECONDS)


def refused_without_trace(fx: Fixtures, out: Path, *args: object) -> str | None:
    """`planer ARGS` refused in one line within a few seconds, leaving nothing of OUT behind."""
    problem = refused(fx.planer(*args, timeout=120), within=FEW_SECONDS)
    return problem or (f"left behind: {left_behind(out)}" if left_behind(out) else None)


def build_model_is_a_build_directory(fx: Fixtures) -> str | None:
    out = fx.fresh("from-build")
    return refused_without_trace(fx, out, "build", "--model", fx.build, "--target-speedup", 2, "--out", out)


def build_model_is_an_export_directory(fx: Fixtures) -> str | None:
    out = fx.fresh("from-export")
    return refused_without_trace(fx, out, "build", "--model", fx.exported, "--target-speedup", 2, "--out", out)


def a_directory(fx: Fixtures) -> Path:
    target = fx.fresh("a-directory")
    target.mkdir()
    (target / "keep.txt").write_text("someone's file\n")
    return target


def export_out_is_a_directory(fx: Fixtures) -> str | None:
    target = a_directory(fx)
    scratch = target.with_name(f".{target.name}.tmp")  # where planer.files.replacing has the graph written
    command = fx.command("export", fx.run, "--out", target)
    exported = command.until(scratch.exists, 180)
    done = command.finish()
    if exported or "max |" in done.output:
        return f"exported the graph ({scratch.name}) before refusing, after {done.seconds:.0f} s: {done.last[:200]}"
    problem = refused(done, within=FEW_SECONDS)
    return problem or (None if [p.name for p in target.iterdir()] == ["keep.txt"] else "the directory was changed")


def bench_save_is_a_directory(fx: Fixtures) -> str | None:
    target = a_directory(fx)
    done = fx.planer("bench", fx.build, "--save", target, "--min-seconds", 2, "--threads", 1)
    if "build / reference (p50)" in done.output:
        return f"timed both models before refusing: {done.last[:200]}"
    problem = refused(done)
    return problem or (None if [p.name for p in target.iterdir()] == ["keep.txt"] else "the directory was changed")


# --- the server -----------------------------------------------------------------------------------------------------

def serve_slow_headers_at_file_limit(fx: Fixtures) -> str | None:
    """With the server's file limit at 128 (RLIMIT_NOFILE set before it starts; `planer serve` keeps a limit it
    cannot raise), 384 connections send part of their headers and wait. A valid request must be answered within
    2 s, the server must not spin (under half a core) nor flood its log, and it must serve on once they close."""
    limit = 128

    def low_file_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    server = Server(fx.root, fx.build, preexec_fn=low_file_limit)
    fx.servers.append(server)
    seen = []
    stalled = []
    try:
        for _ in range(3 * limit):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            conn.sendall(b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            stalled.append(conn)
        time.sleep(0.5)
        cpu, log, start = cpu_seconds(server.pid), len(server.log()), time.monotonic()
        try:
            answer = httpx.post(f"{server.url}/v1/score", json={"text": "a valid request"}, timeout=10)
            seen += [] if answer.status_code == 200 else [f"the valid request got {answer.status_code}"]
        except httpx.HTTPError as e:
            seen.append(f"the valid request failed: {type(e).__name__}")
        waited = time.monotonic() - start
        seen += [f"the valid request took {waited:.1f} s"] if waited > 2 else []
        time.sleep(max(0.0, 3 - waited))
        spent, window, flood = cpu_seconds(server.pid) - cpu, time.monotonic() - start, server.log()[log:]
        if spent > window / 2:
            seen.append(f"the server used {spent:.1f} s of CPU in {window:.1f} s")
        if flood.count("Traceback") > 1 or flood.count("\n") > 20:
            seen.append(f"its log grew by {flood.count(chr(10))} lines ({flood.count('Traceback')} tracebacks)")
    finally:
        for conn in stalled:
            conn.close()
    try:
        after = httpx.post(f"{server.url}/v1/score", json={"text": "afterwards"}, timeout=15).status_code
    except httpx.HTTPError as e:
        after = type(e).__name__
    seen += [] if after == 200 else [f"after they closed: {after}"]
    server.command.end()
    return "; ".join(seen) or None


def serve_hangup_mid_body(fx: Fixtures) -> str | None:
    """A client that sends half its declared body and hangs up: one log line at most, no traceback, no 500."""
    server = fx.server
    before, failed = len(server.log()), server.metric("planer_requests_total", 'code="500"')
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 40\r\n\r\n{\"text\": ")
        time.sleep(0.2)
    time.sleep(1.0)
    logged = [line for line in server.log()[before:].splitlines() if line.strip()]
    seen = []
    if any("Traceback" in line for line in logged) or len(logged) > 1:
        seen.append(f"{len(logged)} log lines: {' | '.join(logged)[:250]}")
    if server.metric("planer_requests_total", 'code="500"') > failed:
        seen.append("counted as a 500")
    return "; ".join(seen) or None


def forged(fx: Fixtures, host: str | None, origin: str | None) -> str | None:
    server = fx.server
    genuine = status(raw_http(server.port, post(f"127.0.0.1:{server.port}")))
    if "200" not in genuine:
        return f"a genuine request got {genuine!r}"
    answer = status(raw_http(server.port, post(host or f"127.0.0.1:{server.port}", origin=origin)))
    return None if " 403 " in f"{answer} " else f"answered {answer!r}"


def serve_forged_host(fx: Fixtures) -> str | None:
    return forged(fx, f"evil.example:{fx.server.port}", None)


def serve_forged_origin(fx: Fixtures) -> str | None:
    return forged(fx, None, "https://evil.example")


def serve_host(fx: Fixtures, host: str) -> str | None:
    return refused(fx.planer("serve", fx.build, "--host", host, "--port", free_port(), timeout=60), "host")


def serve_host_empty(fx: Fixtures) -> str | None:
    return serve_host(fx, "")


def serve_host_0(fx: Fixtures) -> str | None:
    return serve_host(fx, "0")


def serve_copy(fx: Fixtures, damage: Callable[[Path], None]) -> str | None:
    """`planer serve` on a damaged copy of the build: refused in one line at start (killed if it serves)."""
    copy = fx.fresh("served")
    shutil.copytree(fx.build, copy)
    damage(copy)
    return refused(fx.planer("serve", copy, "--port", free_port(), "--threads", 1, timeout=60))


def serve_arch_contradicts_onnx(fx: Fixtures) -> str | None:
    def contradict(build: Path) -> None:
        arch = json.loads((build / "arch.json").read_text())
        (build / "arch.json").write_text(json.dumps(arch | {"vocab_size": arch["vocab_size"] + 8}))

    return serve_copy(fx, contradict)


def serve_50mb_body(fx: Fixtures) -> str | None:
    """50 MB of a body, read in full (the server takes up to 64 MB; this JSON never closes its string, so nothing
    follows the reading but a failed parse): answered 400 or 413 for well under a second of the server's CPU
    (buffering that copied the body so far for every chunk took 3.7 s)."""
    server = fx.server
    cpu = cpu_seconds(server.pid)
    try:
        answer = httpx.post(f"{server.url}/v1/score", content=b'{"text": "' + b"a" * 50_000_000,
                            headers={"Content-Type": "application/json"}, timeout=60).status_code
    except httpx.HTTPError as e:
        answer = type(e).__name__
    spent = cpu_seconds(server.pid) - cpu
    seen = [] if answer in (400, 413) else [f"answered {answer}"]
    seen += [f"{spent:.2f} s of the server's CPU"] if spent > 1.0 else []
    return "; ".join(seen) or None


def serve_half_close(fx: Fixtures) -> str | None:
    """A complete request, then the client shuts down its sending side (as `nc -N` does) and waits for the
    answer; five times, since whether the answer comes first depends on the server's timing."""
    port = fx.server.port
    answers = [status(raw_http(port, post(f"127.0.0.1:{port}", extra=""), half_close=True)) for _ in range(5)]
    lost = [a for a in answers if "200" not in a]
    return f"{len(lost)} of 5 got {lost[0]!r}" if lost else None


# --- the CI gate ----------------------------------------------------------------------------------------------------

def gate(fx: Fixtures, **edit: object) -> str | None:
    """`planer bench --against` a reference with `edit` applied: refused in one line, before timing anything."""
    reference = fx.reference(**edit)
    done = fx.planer("bench", fx.build, "--against", reference, "--min-seconds", 1, "--tries", 1)
    if "build / reference (p50)" in done.output:
        return f"timed the models before refusing (last line {done.last[:160]!r})"
    return refused(done, reference.name)


def gate_control_valid_reference_is_used(fx: Fixtures) -> str | None:
    """The unedited reference passes the checks, so that the refusals below are the edits' doing."""
    done = fx.planer("bench", fx.build, "--against", fx.reference(), "--min-seconds", 1, "--tries", 1,
                     "--threads", 1)
    if "Traceback" in done.output or "max-slowdown" not in done.output:
        return f"the gate did not compare: exit {done.code}: {done.last[:200]}"
    return None


def gate_ratio_0(fx: Fixtures) -> str | None:
    return gate(fx, ratio=0)


def gate_ratio_text(fx: Fixtures) -> str | None:
    return gate(fx, ratio="fast")


def gate_ratio_negative(fx: Fixtures) -> str | None:
    return gate(fx, ratio=-1)


def gate_ratio_1e308(fx: Fixtures) -> str | None:
    return gate(fx, ratio=1e308)


def gate_missing_build(fx: Fixtures) -> str | None:
    return gate(fx, build=None)


def gate_missing_deployment(fx: Fixtures) -> str | None:
    return gate(fx, deployment=None)


def gate_missing_ratio(fx: Fixtures) -> str | None:
    return gate(fx, ratio=None)


# --- damaged files --------------------------------------------------------------------------------------------------

def garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\xff{garbage")


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def partial_build_sigkill_in_distillation_before_checkpoint(fx: Fixtures) -> str | None:
    """The partial build without its distillation, continued and killed (SIGKILL) as that stage starts, before
    its first checkpoint; then continued again: the stage must start over, not ask for a resume it cannot do."""
    out, command = fx.partial_build_copy()
    shutil.rmtree(partial(out) / "distill")
    staging = partial(out) / "distill.partial"
    first = fx.command(*command)
    if not first.until(lambda: (staging / "arch.json").is_file(), 240):
        first.stop()
        raise Setup(f"the distillation never started: {first.finish().last}")
    first.signal(signal.SIGSTOP)
    if (staging / "config.json").is_file():
        first.stop()
        raise Setup("the distillation reached its first checkpoint before it could be stopped")
    first.stop()
    return rerun_over_damage(fx, out, staging / "arch.json", True, *command)


def partial_build_garbage_timings_json(fx: Fixtures) -> str | None:
    return fx.resumed_build("timings.json", garbage)


def partial_build_garbage_outcome_json(fx: Fixtures) -> str | None:
    return fx.resumed_build("search/outcome.json", garbage)


def partial_build_garbage_eval_json(fx: Fixtures) -> str | None:
    return fx.resumed_build("distill/eval.json", garbage)


def partial_build_truncated_baseline_onnx(fx: Fixtures) -> str | None:
    return fx.resumed_build("baseline/model.onnx", truncated, redo=True)


def partial_build_truncated_reference_weights(fx: Fixtures) -> str | None:
    """A finished training stage's weights (the continued baseline's: retrained with the command's budget it
    would stay a fair reference for the micro-budget result)."""
    return fx.resumed_build("baseline-continued/model.safetensors", truncated, redo=True)


def sweep_garbage_build_json(fx: Fixtures) -> str | None:
    """An interrupted sweep whose finished target's build.json is garbage, continued by the same command."""
    out = fx.fresh("sweep")
    shutil.copytree(fx.interrupted_sweep, partial(out))
    damaged = partial(out) / "x1.2" / "build.json"
    garbage(damaged)
    return rerun_over_damage(fx, out, damaged, False, "build", "--model", fx.run, "--space", fx.space,
                             *SWEEP_OPTIONS, "--out", out)


def serve_garbage_vocab_json(fx: Fixtures) -> str | None:
    return serve_copy(fx, lambda build: garbage(build / "vocab.json"))


def serve_garbage_tokenizer_json(fx: Fixtures) -> str | None:
    return serve_copy(fx, lambda build: garbage(build / "tokenizer" / "tokenizer.json"))


def eval_config_data_5(fx: Fixtures) -> str | None:
    run = fx.fresh("run-data-5")
    shutil.copytree(fx.run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"data": 5}))
    return refused(fx.planer("eval", run, "--max-tokens", 256), "config.json")


# --- numbers --------------------------------------------------------------------------------------------------------

def number(option: str, value: str, *command: object, out: bool = False) -> Callable[[Fixtures], str | None]:
    """A case: `planer COMMAND OPTION VALUE` (RUN and BUILD standing for the fixtures; with `out`, a fresh --out)
    refused in one line naming OPTION, at once, writing nothing."""
    def case(fx: Fixtures) -> str | None:
        given = [fx.run if a == "RUN" else fx.build if a == "BUILD" else a for a in command]
        target = fx.fresh("out")
        done = fx.planer(*given, option, value, *(["--out", target] if out else []), timeout=60)
        problem = refused(done, option, within=FEW_SECONDS)
        return problem or (f"left behind: {left_behind(target)}" if left_behind(target) else None)
    return case


# Each case: a name and a function of the fixtures returning None (held) or what was seen.
CASES: list[tuple[str, Callable[[Fixtures], str | None]]] = [
    ("number-train-batch-huge", number("--batch", HUGE, "train", *MICRO, out=True)),
    ("nan-train-lr", number("--lr", "nan", "train", *MICRO, out=True)),
    ("number-eval-batch-huge", number("--batch", HUGE, "eval", "RUN")),
    ("number-eval-tgt-len-huge", number("--tgt-len", HUGE, "eval", "RUN")),
    ("number-eval-mem-len-huge", number("--mem-len", HUGE, "eval", "RUN")),
    ("number-export-max-context-huge", number("--max-context", HUGE, "export", "RUN")),
    ("number-export-mem-len-huge", number("--mem-len", HUGE, "export", "RUN")),
    ("number-bench-threads-huge", number("--threads", HUGE, "bench", "BUILD")),
    ("number-bench-batch-huge", number("--batch", HUGE, "bench", "BUILD")),
    ("number-bench-tgt-len-huge", number("--tgt-len", HUGE, "bench", "BUILD")),
    ("number-serve-threads-huge", number("--threads", HUGE, "serve", "BUILD")),
    ("number-serve-max-batch-huge", number("--max-batch", HUGE, "serve", "BUILD")),
    ("number-build-threads-huge", number("--threads", HUGE, "build", "--model", "RUN", "--target-speedup", 2,
                                         out=True)),
    ("nan-build-target-speedup", number("--target-speedup", "nan", "build", "--model", "RUN", out=True)),
    ("nan-build-target-latency-ms", number("--target-latency-ms", "nan", "build", "--model", "RUN", out=True)),
    ("nan-bench-max-slowdown", number("--max-slowdown", "nan", "bench", "BUILD")),
    ("nan-bench-min-seconds", number("--min-seconds", "nan", "bench", "BUILD")),
    ("nan-serve-max-delay-ms", number("--max-delay-ms", "nan", "serve", "BUILD")),
    ("nan-serve-body-timeout-s", number("--body-timeout-s", "nan", "serve", "BUILD")),
    ("gate-control-valid-reference-is-used", gate_control_valid_reference_is_used),
    ("gate-ratio-0", gate_ratio_0),
    ("gate-ratio-text", gate_ratio_text),
    ("gate-ratio-negative", gate_ratio_negative),
    ("gate-ratio-1e308", gate_ratio_1e308),
    ("gate-missing-ratio", gate_missing_ratio),
    ("gate-missing-build", gate_missing_build),
    ("gate-missing-deployment", gate_missing_deployment),
    ("train-sigkill-before-checkpoint", train_sigkill_before_checkpoint),
    ("train-sigterm-before-checkpoint", train_sigterm_before_checkpoint),
    ("train-two-writers-one-out", train_two_writers_one_out),
    ("train-resume-while-training", train_resume_while_training),
    ("train-sigterm-then-resume-without-data", train_sigterm_then_resume_without_data),
    ("train-resume-weights-overwritten", train_resume_weights_overwritten),
    ("eval-config-data-5", eval_config_data_5),
    ("export-out-is-a-directory", export_out_is_a_directory),
    ("bench-save-is-a-directory", bench_save_is_a_directory),
    ("build-model-is-a-build-directory", build_model_is_a_build_directory),
    ("build-model-is-an-export-directory", build_model_is_an_export_directory),
    ("sweep-continued-with-another-model", sweep_continued_with_another_model),
    ("sweep-garbage-build.json", sweep_garbage_build_json),
    ("partial-build-sigkill-in-distillation-before-checkpoint (library)",
     partial_build_sigkill_in_distillation_before_checkpoint),
    ("partial-build-garbage-timings.json (library)", partial_build_garbage_timings_json),
    ("partial-build-garbage-outcome.json (library)", partial_build_garbage_outcome_json),
    ("partial-build-garbage-eval.json (library)", partial_build_garbage_eval_json),
    ("partial-build-truncated-baseline-model.onnx (library)", partial_build_truncated_baseline_onnx),
    ("partial-build-truncated-continued-weights (library)", partial_build_truncated_reference_weights),
    ("serve-host-empty", serve_host_empty),
    ("serve-host-0", serve_host_0),
    ("serve-arch-contradicts-onnx", serve_arch_contradicts_onnx),
    ("serve-garbage-vocab.json", serve_garbage_vocab_json),
    ("serve-garbage-tokenizer.json", serve_garbage_tokenizer_json),
    ("serve-forged-host", serve_forged_host),
    ("serve-forged-origin", serve_forged_origin),
    ("serve-hangup-mid-body", serve_hangup_mid_body),
    ("serve-half-close", serve_half_close),
    ("serve-50mb-body", serve_50mb_body),
    ("serve-slow-headers-at-file-limit-128", serve_slow_headers_at_file_limit),
]
SMOKE = ("number-train-batch-huge", "nan-train-lr")  # no fixture: a second or two


def run_case(fx: Fixtures, case: Callable[[Fixtures], str | None]) -> str | None:
    try:
        return case(fx)
    except Setup as e:
        return f"setup: {e}"
    except Exception as e:  # the harness's own failure is the case's failure, and the other cases go on
        return f"harness error: {type(e).__name__}: {e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run the cases whose names match this shell-style pattern (repeatable)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    p.add_argument("--times", action="store_true", help="end each line with the case's wall time (fixtures made "
                   "for it included)")
    p.add_argument("--smoke", action="store_true", help=f"run only {', '.join(SMOKE)} (seconds, no fixtures)")
    a = p.parse_args()
    if a.list:
        print("\n".join(name for name, _ in CASES))
        return
    chosen = [(n, c) for n, c in CASES if (n in SMOKE if a.smoke else
                                           not a.only or any(fnmatch.fnmatch(n, pat) for pat in a.only))]
    if not chosen:
        p.error(f"no case matches {a.only}; see --list")
    root = Path(tempfile.mkdtemp(prefix="planer-robustness-"))
    fx = Fixtures(root)
    if a.smoke:
        print("smoke run of robustness, nothing recorded:\n")
    failed, start, lines = 0, time.monotonic(), []
    try:
        fx.begin([name for name, _ in chosen])
        for name, case in chosen:
            began = time.monotonic()
            seen = run_case(fx, case)
            failed += seen is not None
            took = f" [{time.monotonic() - began:.1f} s]" if a.times else ""
            lines.append(f"held    {name}{took}" if seen is None else f"FAILED  {name}: {seen}{took}")
            print(lines[-1], flush=True)
    finally:
        fx.close()
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    lines.append(f"{len(chosen) - failed} of {len(chosen)} cases held in {time.monotonic() - start:.0f} s")
    print(lines[-1])
    if not a.smoke and not a.only:  # a subset is a check while working, not a result
        record("robustness", {"cases": lines[:-1], "held": len(chosen) - failed, "of": len(chosen)},
               "```\n" + "\n".join(lines) + "\n```")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
