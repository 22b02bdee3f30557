"""The `planer` command.

Each subcommand is a thin layer over the Python API of the same name; heavy
imports happen inside the command so `planer --help` stays instant.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import click

from planer import __version__
from planer.choices import ENGINES, LOWERINGS, SEARCH_METHODS, TEACHERS
from planer.errors import PlanerError


class _Group(click.Group):
    """Turns user-input errors into one line and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PlanerError as e:
            raise click.ClickException(str(e)) from None
        except click.BadParameter as e:  # one line, like every other error, not the usage block
            raise click.ClickException(e.format_message()) from None
        except OSError as e:  # a path the user named cannot be created, read or written
            if e.filename is None:
                raise
            raise click.ClickException(f"{e.filename}: {e.strerror or e}; check that the path exists, is the "
                                       "kind expected, and that you may write where outputs go") from None


class _Number(click.ParamType):
    """A finite number of at least `low` (above it, if `strict`): FloatRange lets nan and inf through."""

    name = "number"

    def __init__(self, low: float, strict: bool) -> None:
        self.low, self.strict = low, strict

    def convert(self, value, param, ctx) -> float:
        x = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(x) or x < self.low or (self.strict and x == self.low):
            self.fail(f"{value} is not a finite number {'>' if self.strict else '>='} {self.low:g}.", param, ctx)
        return x


@contextmanager
def _resumable(out: Path) -> Iterator[None]:
    """Ctrl-C during a training run says what was kept and how to go on."""
    from planer.files import staging_dir

    try:
        yield
    except KeyboardInterrupt:
        if staging_dir(out).is_dir():
            raise PlanerError(f"interrupted; {staging_dir(out)} keeps the last checkpoint: run the same command "
                              "with --resume to continue from it") from None
        raise PlanerError("interrupted before the first checkpoint; nothing was kept") from None


class _OutputPath(click.Path):
    """A path to write: checked before any work by creating a file beside it (a profile used to time every block
    for minutes, then fail to save); missing parent directories are fine where they can be created."""

    def convert(self, value, param, ctx) -> Path:
        path = Path(super().convert(value, param, ctx))
        ancestor = path.absolute().parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        try:
            if not ancestor.is_dir():
                raise NotADirectoryError(f"{ancestor} is not a directory")
            with tempfile.TemporaryFile(dir=ancestor):
                pass
        except OSError as e:
            self.fail(f"cannot write {value}: {e.strerror or e} in {ancestor}; choose a path in a directory "
                      "you can write", param, ctx)
        return path


_OUTPUT = _OutputPath(path_type=Path)
_OUTPUT_FILE = _OutputPath(path_type=Path, dir_okay=False)  # an existing directory there is refused before work

# Every numeric option is checked before any work: a zero step count or batch used to start (and finish) runs.
_COUNT, _NONNEG, _PORT = click.IntRange(min=1), click.IntRange(min=0), click.IntRange(0, 65535)
# Sizes that allocate memory or threads up front: far beyond any real use, they would only run the machine out of
# memory (with a traceback) before saying so.
_BATCH, _THREADS = click.IntRange(1, 4096), click.IntRange(1, 1024)
_TOKENS, _MEMORY, _CONTEXT = click.IntRange(1, 65536), click.IntRange(0, 65536), click.IntRange(0, 262144)
_POSITIVE, _NONNEG_FLOAT, _AT_LEAST_ONE = _Number(0, strict=True), _Number(0, strict=False), _Number(1, strict=False)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="planer")
def main() -> None:
    """planer: compile a trained Transformer into a faster sparsely-activated (MoE) network.

    \b
    Start with a baseline, then build:
      planer train --preset tiny --data sample --out runs/tiny
      planer eval runs/tiny
      planer build --model runs/tiny --engine ort --target-speedup 2
    \b
    A Hugging Face model (Llama, SmolLM, Mistral, GPT-2; a directory or a .gguf file) instead:
      planer import ~/models/SmolLM2-135M --out runs/smollm2     (or pass it to --model directly)
    \b
    Stages alone: planer profile (latency table), planer search, planer distill, planer export (ONNX).
    \b
    Then serve it:  planer serve builds/tiny-x2
    \b
    Data-parallel training and search (rank 0 measures and writes):
      torchrun --nproc-per-node 2 -m planer build --model runs/tiny --target-speedup 2
    """
    signal.signal(signal.SIGTERM, _terminated)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        from planer import distributed

        distributed.setup()


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (`kill`, a scheduler, a container stopping) cleans up and says what was kept, as Ctrl-C does."""
    raise KeyboardInterrupt


_DATA_HELP = ("corpus: 'sample' (the enwik8-format excerpt bundled with gensim), 'enwik8:PATH' or 'text:PATH' "
              "(raw bytes or UTF-8 text, split 90/5/5) or 'wikitext103:DIR' (wiki.{train,valid,test}.tokens)")


@main.command("train")
@click.option("--preset", help="baseline to train: tiny, deep, txl-enwik8-base, txl-wt103-base "
              "(not needed with --resume)")
@click.option("--data", "data_spec", help=_DATA_HELP + " [default: sample; with --resume, the run's own]")
@click.option("--out", required=True, type=_OUTPUT,
              help="run directory to create (assembled as OUT.partial, renamed when training finishes)")
@click.option("--resume", is_flag=True, help="continue OUT (or an interrupted OUT.partial) from its last checkpoint")
@click.option("--steps", type=_COUNT, help="total optimizer steps (overrides the preset)")
@click.option("--batch", type=_BATCH, help="parallel streams per step (overrides the preset)")
@click.option("--lr", type=_POSITIVE, help="peak learning rate (overrides the preset)")
@click.option("--eval-every", type=_COUNT, help="steps between validations (overrides the preset)")
@click.option("--ckpt-every", type=_COUNT, help="steps between checkpoints (overrides the preset)")
@click.option("--seed", type=_NONNEG, help="random seed (overrides the preset)")
@click.option("--layers", type=_COUNT, help="attention + FFN layers (overrides the preset's depth)")
@click.option("--d-model", type=_COUNT, help="model width (overrides the preset)")
@click.option("--heads", type=_COUNT, help="attention heads per layer (overrides the preset)")
@click.option("--d-head", type=_COUNT, help="width of each head (overrides the preset)")
@click.option("--d-inner", type=_COUNT, help="FFN width (overrides the preset)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def train_command(preset: str | None, data_spec: str, out: Path, resume: bool, steps: int | None, batch: int | None,
                  lr: float | None, eval_every: int | None, ckpt_every: int | None, seed: int | None,
                  layers: int | None, d_model: int | None, heads: int | None, d_head: int | None,
                  d_inner: int | None, quiet: bool) -> None:
    """Train a baseline language model (Transformer-XL style, with segment memory)."""
    from planer.data import load_corpus
    from planer.train.evaluate import headline
    from planer.train.presets import get_preset, with_overrides
    from planer.train.trainer import check_new_run, saved_config, saved_data, train

    from dataclasses import replace

    # the Preset field each shape option overrides
    options = {"n_layer": ("--layers", layers), "d_model": ("--d-model", d_model), "n_head": ("--heads", heads),
               "d_head": ("--d-head", d_head), "d_inner": ("--d-inner", d_inner)}
    shape = {field: value for field, (_, value) in options.items() if value is not None}
    if resume:
        if shape:
            given = ", ".join(options[field][0] for field in shape)
            raise PlanerError(f"{out} keeps the shape it was started with; drop {given} to resume it")
        cfg, saved_preset = saved_config(out)
        data_spec = data_spec or saved_data(out)
        if preset and preset != saved_preset:
            raise PlanerError(f"{out} was trained with --preset {saved_preset}; drop --preset to resume it")
        arch = None
    else:
        if not preset:
            raise PlanerError("choose a baseline with --preset (tiny, deep, txl-enwik8-base, txl-wt103-base)")
        chosen = replace(get_preset(preset), **shape)
        check_new_run(out)
        cfg, arch = chosen.train, None
        data_spec = data_spec or "sample"
    corpus = load_corpus(data_spec)
    if not resume:
        arch = chosen.architecture(corpus.vocab_size).validate()
    cfg = with_overrides(cfg, steps=steps, batch=batch, lr=lr, eval_every=eval_every, ckpt_every=ckpt_every,
                         seed=seed)
    from planer import distributed

    if arch is not None and distributed.is_main():  # under torchrun only rank 0 reports
        click.echo(arch.summary())
    with _resumable(out):
        result = train(corpus, cfg, out, arch=arch, preset=preset or "", resume=resume,
                              show_progress=not quiet)
    if distributed.is_main():
        click.echo(f"{out}: step {result['step']}, {result['tokens_per_second']:.0f} tokens/s over "
                   f"{result['train_seconds']:.0f} s; valid {headline(result['valid'])}, "
                   f"test {headline(result['test'])}")


@main.command("eval")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--data", "data_spec", help="corpus to score (default: the one the run was trained on). " + _DATA_HELP)
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--batch", type=_BATCH, default=8, show_default=True, help="parallel streams")
@click.option("--tgt-len", type=_TOKENS, help="segment length (default: the architecture's)")
@click.option("--mem-len", type=_MEMORY, help="memory length (default: the architecture's)")
@click.option("--max-tokens", type=_COUNT, help="stop after this many tokens (default: the whole split)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def eval_command(run: Path, data_spec: str | None, split: str, batch: int, tgt_len: int | None, mem_len: int | None,
                 max_tokens: int | None, as_json: bool) -> None:
    """Score a run on a split with the Transformer-XL protocol (memory carried through the split)."""
    from planer.checkpoint import load_model
    from planer.train.evaluate import evaluate, headline
    from planer.train.trainer import run_corpus

    model = load_model(run)
    corpus = run_corpus(run, data_spec, model.arch.vocab_size)
    result = evaluate(model, corpus.split(split), corpus.unit, batch=batch, tgt_len=tgt_len, mem_len=mem_len,
                      max_tokens=max_tokens, progress=f"eval {split}")
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{run} on {corpus.name} {split}: {headline(result)} (loss {result['loss']:.4f} nats, "
                   f"{result['tokens']} tokens)")


@main.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=_OUTPUT, help="run directory to write")
@click.option("--tgt-len", type=_TOKENS, default=128, show_default=True, help="segment length the run is evaluated with")
@click.option("--mem-len", type=_MEMORY, default=128, show_default=True,
              help="memory length (context carried between segments)")
def import_command(source: Path, out: Path, tgt_len: int, mem_len: int) -> None:
    """Import a local Hugging Face decoder LM (a save_pretrained directory or a .gguf file) as a planer run:
    Llama, SmolLM, Mistral or GPT-2.

    \b
      planer import ~/models/SmolLM2-135M --out runs/smollm2
    """
    from planer.hf import import_hf, write_run

    record = write_run(import_hf(source, tgt_len=tgt_len, mem_len=mem_len), source, out)
    click.echo(f"{out}: {_load_arch(out).summary().splitlines()[0]}\nmax |planer - transformers| logit "
               f"difference {record['max_abs_logit_difference']:.2e} on {record['tokens_checked']} tokens")


def _load_arch(source: Path):
    """An architecture from a run/build directory or an arch.json file."""
    from planer.arch import Architecture
    from planer.files import ARCH_FILE

    return Architecture.load(source / ARCH_FILE if source.is_dir() else source)


@main.command("export")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=_OUTPUT_FILE, help="ONNX file to write (default: RUN/model.onnx)")
@click.option("--lowering", type=click.Choice(LOWERINGS), default="ops", show_default=True,
              help="how MoE layers are lowered: 'ops' = standard ONNX ops (tokens sorted by expert and split, "
                   "each expert runs only on its routed tokens); 'ort-moe' = ONNX Runtime's fused com.microsoft::MoE "
                   "(activations gelu_tanh, relu, silu, swiglu); 'trt' = planer's TensorRT plugin (TensorRT only)")
@click.option("--mem-len", type=_MEMORY, help="memory length the graph keeps (default: the architecture's)")
@click.option("--max-context", type=_CONTEXT, default=0,
              help="longest memory + segment the graph must accept; Transformer-XL attention keeps its relative "
                   "positions as a table of this length (default: twice the architecture's mem-len + tgt-len)")
@click.option("--triton", "triton_repo", type=click.Path(path_type=Path),
              help="write RUN/model.onnx (exported first if missing) into this Triton model repository")
@click.option("--triton-name", help="model name in the repository (default: RUN's directory name)")
@click.option("--triton-kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Triton instance kind (ONNX Runtime backend on CPU or GPU)")
@click.option("--triton-instances", type=_COUNT, default=1, show_default=True, help="model instances")
@click.option("--triton-max-batch", type=_NONNEG, default=8, show_default=True, help="max_batch_size")
@click.option("--triton-max-delay-us", type=_NONNEG, default=2000, show_default=True,
              help="dynamic batching: how long Triton waits for a request to batch with")
@click.option("--overwrite", is_flag=True, help="replace the model already in the Triton repository")
@click.option("--data", "data_spec", help="corpus an int8 graph's loss is checked on, against PyTorch's simulation "
              "of it (default: the one the run or build was trained on; a model without int8 blocks reads none). "
              + _DATA_HELP)
def export_command(run: Path, out: Path | None, lowering: str, mem_len: int | None, max_context: int,
                   triton_repo: Path | None, triton_name: str | None, triton_kind: str, triton_instances: int,
                   triton_max_batch: int, triton_max_delay_us: int, overwrite: bool, data_spec: str | None) -> None:
    """Export a trained model to ONNX (memories as inputs/outputs, dynamic batch and lengths) and check
    it against PyTorch; with --triton, also as an NVIDIA Triton Inference Server model.

    \b
      planer export runs/tiny
      planer export builds/tiny-x2 --triton triton-models     # then: tritonserver --model-repository triton-models
    """
    if triton_repo is None or not (run / "model.onnx").is_file():
        _export_onnx(run, out, lowering, mem_len, max_context, data_spec)
    if triton_repo is not None:
        from planer.serve.triton_repository import write_repository

        model_dir = write_repository(run, triton_repo, name=triton_name, kind=triton_kind,
                                     instances=triton_instances, max_batch=triton_max_batch,
                                     max_queue_delay_us=triton_max_delay_us, overwrite=overwrite)
        click.echo(f"{model_dir}: Triton model (config.pbtxt, 1/model.onnx), checked against Triton's "
                   "model-config schema; serve with: tritonserver --model-repository " + str(triton_repo))


def _export_onnx(run: Path, out: Path | None, lowering: str, mem_len: int | None, max_context: int,
                 data_spec: str | None) -> None:
    from planer.checkpoint import load_model
    from planer.export import export_lm
    from planer.export.reference import verify
    from planer.nn.model import in_precision, int8_weights
    from planer.runtime import Engine, EngineError, OrtEngine, load_engine
    from planer.train.trainer import run_corpus

    model = load_model(run)
    # an int8 graph is checked by its loss on validation tokens: the data is settled before anything is written
    corpus = run_corpus(run, data_spec, model.arch.vocab_size) if int8_weights(model) else None
    out = out or run / "model.onnx"
    options = {"lowering": lowering, "mem_len": mem_len, "min_context": max_context}
    path = export_lm(model, out, **options)
    arch = model.arch
    mem = arch.mem_len if mem_len is None else mem_len
    size = f"{path}: {path.stat().st_size / 1e6:.1f} MB"
    name = "TensorRT" if lowering == "trt" else "ONNX Runtime"

    def graph(p: Path) -> Engine:
        return load_engine("trt", str(p), shape=(2, arch.tgt_len, mem)) if lowering == "trt" else OrtEngine(p)

    try:
        engine = graph(path)
    except EngineError as e:  # its remedy names --engine, which export does not have
        if lowering != "trt":
            raise
        click.echo(f"{size}; not checked against PyTorch: {e.reason}. The trt lowering runs only in TensorRT: "
                   "run this export where TensorRT runs to check it")
        return
    shape = {"batch": 2, "tgt_len": arch.tgt_len, "mem_len": mem, "keep_len": mem_len}
    if corpus is None:
        diff = verify(model, engine, **shape)["parity_max_abs_diff"]
        click.echo(f"{size}; max |{name} - PyTorch| = {diff:.2e} (batch 2, {arch.tgt_len} tokens)")
        return
    with tempfile.TemporaryDirectory(prefix="planer-export-") as tmp:
        twin = graph(export_lm(in_precision(model, "fp32"), Path(tmp) / "fp32.onnx", **options))
        checked = verify(model, engine, **shape, twin=twin, data=corpus.valid)
    click.echo(f"{size}; its graph in fp32: max |{name} - PyTorch| = {checked['parity_max_abs_diff']:.2e} (batch 2, "
               f"{arch.tgt_len} tokens); in int8, block by block: {checked['int8_simulation_disagreement']:.1e} as far "
               f"from PyTorch's simulation as from fp32, on validation tokens of {corpus.name}")


_PRECISION_HELP = ("the numeric precisions blocks may be built in, comma-separated; the search chooses one per "
                   "block by measured latency and held-out loss (ort: fp32,int8 -- int8 is ONNX Runtime's dynamic "
                   "quantization, simulated in training; ort-cuda, trt: fp32) [default: all the engine "
                   "runs]")


def _precisions(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip()) if value else ()


_LOWERING_HELP = ("how MoE layers are exported (see `planer export --help`); auto: the one in which the engine runs "
                  "the space's MoE blocks fastest, timed while profiling [default: trt with --engine trt, auto with "
                  "--engine ort-cuda, ops with --engine ort, where it beat the fused op at every shape measured]")


@main.command("profile")
@click.option("--model", "source", required=True, type=click.Path(path_type=Path),
              help="run directory or arch.json of the baseline whose blocks define the default space")
@click.option("--space", type=click.Path(path_type=Path), help="search space JSON (default: PLANER's space "
              "around the baseline: skip, attention heads, FFN widths, MoE experts/top-k/widths)")
@click.option("--engine", type=click.Choice(ENGINES), default="ort", show_default=True)
@click.option("--threads", type=_THREADS, default=2, show_default=True, help="intra-op threads of the engine")
@click.option("--batch", type=_BATCH, default=1, show_default=True)
@click.option("--tgt-len", type=_TOKENS, help="segment length (default: the architecture's)")
@click.option("--mem-len", type=_MEMORY, help="memory length (default: the architecture's)")
@click.option("--lowering", type=click.Choice([*LOWERINGS, "auto"]), help=_LOWERING_HELP)
@click.option("--precision", "precision", metavar="P[,P...]", help=_PRECISION_HELP)
@click.option("--out", required=True, type=_OUTPUT_FILE,
              help="latency table JSON; if it exists, its entries are reused (same engine and shape only)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def profile_command(source: Path, space: Path | None, engine: str, threads: int, batch: int, tgt_len: int | None,
                    mem_len: int | None, lowering: str | None, precision: str | None, out: Path, quiet: bool) -> None:
    """Time every candidate block alone in the engine at the deployment shape: the latency table."""
    from planer.latency import LatencyTable
    from planer.latency.table import fixed_label
    from planer.deployment import Deployment
    from planer.latency.profile import profile
    from planer.space import SearchSpace

    arch = _load_arch(source)
    dep = Deployment(engine=engine, batch=batch, tgt_len=tgt_len or arch.tgt_len,
                     mem_len=arch.mem_len if mem_len is None else mem_len, threads=threads, lowering=lowering or "",
                     precisions=_precisions(precision))
    chosen = dep.searchable(SearchSpace.load(space) if space else SearchSpace.default(arch))
    cached = LatencyTable.load(out) if out.exists() else None
    table = profile(arch, chosen.candidates, dep, table=cached, show_progress=not quiet)
    table.save(out)
    worst = max(table.entries.items(), key=lambda kv: kv[1]["spread"])
    trials = table.provenance.get("lowering_trials")
    measured = (" (MoE blocks in total: " + ", ".join(f"{lo} {ms:.2f} ms" for lo, ms in trials.items()) + ")"
                if trials else "")
    fixed = ", ".join(f"{table.fixed_ms(h):.3f} ms" + ("" if h == "fp32" else f" with the head in {h}")
                      for h in dep.precisions if table.has(fixed_label(h)))
    click.echo(f"{out}: {len(table.entries)} entries (fixed cost {fixed}); "
               f"noisiest {worst[0]} p90/p50 {worst[1]['spread']:.2f}; MoE lowering "
               f"{table.provenance['lowering']}{measured}")


def _options(*options):
    """One decorator applying `options` in the order given (as they appear in --help)."""
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


# What `planer build` and `planer search` share: baseline, engine and a target in ms; deployment and budget.
_request_options = _options(
    click.option("--model", "run", required=True, type=click.Path(path_type=Path),
                 help="baseline: a run directory (from `planer train` or `planer import`), or a Hugging Face "
                      "checkpoint directory or .gguf file, imported first"),
    click.option("--engine", type=click.Choice(ENGINES), default="ort", show_default=True,
                 help="engine the result is measured in and built for"),
    click.option("--target-latency-ms", type=_POSITIVE, help="latency target in milliseconds (p50 in the engine)"),
)
_search_options = _options(
    click.option("--batch", type=_BATCH, default=1, show_default=True, help="deployment batch size"),
    click.option("--tgt-len", type=_TOKENS, help="deployment segment length (default: the baseline's)"),
    click.option("--mem-len", type=_MEMORY, help="deployment memory length (default: the baseline's)"),
    click.option("--threads", type=_THREADS, default=2, show_default=True, help="engine intra-op threads"),
    click.option("--lowering", type=click.Choice([*LOWERINGS, "auto"]), help=_LOWERING_HELP),
    click.option("--precision", "precision", metavar="P[,P...]", help=_PRECISION_HELP),
    click.option("--budget", type=click.Choice(["small", "medium", "large"]), default="medium", show_default=True,
                 help="search rounds x steps, trial runs x steps, distillation steps beyond the search's (the "
                      "result distils for both, less the local search's --local-steps), streams of the segment "
                      "length per step: small 2x100, no trials, 300, at 4 streams; medium 4x250, 4x300, 3600, at 8; "
                      "large 6x500, 4x600, 7200, at 8"),
    click.option("--space", type=click.Path(path_type=Path), help="search space JSON (default: PLANER's space "
                 "around the baseline)"),
    click.option("--search", "method", type=click.Choice(SEARCH_METHODS), default="gumbel", show_default=True,
                 help="gumbel: PLANER's supernet with a Gumbel-softmax over blocks (the default: it kept more accuracy "
                      "on tiny at 2x, benchmarks/RESULTS.md); local: every alternative block distilled alone on the "
                      "baseline's hidden states, scored by the KL it causes alone, one per block chosen exactly under "
                      "the latency table (Puzzle)"),
    click.option("--local-steps", type=_COUNT, help="local search: distillation steps of every alternative block "
                 "(default: the budget's: small 200 of 500 at 4 streams, medium 250 of 4,600 and large 3,000 of "
                 "10,200 at 8); they are taken from the budget's training steps, and the network chosen distils "
                 "for the rest"),
    click.option("--experts", metavar="E[,E...]", help="expert counts of the default space's MoE candidates "
                 "(gumbel: copies of the FFN, default 2,4,8,16; local: the FFN's units split into E experts, "
                 "default 2,4,8; E must divide the units routed)"),
    click.option("--top-k", "top_k", metavar="K[,K...]", help="experts each token is routed to, 1 <= K <= E "
                 "[default: 1,2]"),
    click.option("--shared", metavar="F[,F...]", help="local search: share of the FFN's units (largest mean "
                 "contribution) kept always on beside the split experts, 0 <= F < 1 [default: 0,0.25]"),
    click.option("--data", "data_spec", help="corpus (default: the one the baseline was trained on; required for "
                 "an imported model, which reads it through its own tokenizer). " + _DATA_HELP),
    click.option("--table", "table_cache", type=_OUTPUT_FILE,
                 help="latency table file to reuse (same engine and shape only) and update; by default the "
                      "blocks are profiled afresh"),
    click.option("--quiet", is_flag=True, help="no progress bars"),
)


def _deployment(run: Path, engine: str, batch: int, tgt_len: int | None, mem_len: int | None, threads: int,
                lowering: str | None, precision: str | None):
    """The deployment asked for; lengths default to the baseline's (an import's defaults for a checkpoint)."""
    from planer.hf import IMPORT_MEM_LEN, IMPORT_TGT_LEN, is_hf_checkpoint
    from planer.deployment import Deployment

    if is_hf_checkpoint(run):  # imported first, with the deployment's lengths
        tgt_len, mem_len = tgt_len or IMPORT_TGT_LEN, IMPORT_MEM_LEN if mem_len is None else mem_len
    else:
        arch = _load_arch(run)
        tgt_len, mem_len = tgt_len or arch.tgt_len, arch.mem_len if mem_len is None else mem_len
    return Deployment(engine=engine, batch=batch, tgt_len=tgt_len, mem_len=mem_len, threads=threads,
                      lowering=lowering or "", precisions=_precisions(precision))


@main.command("build")
@_request_options
@click.option("--target-speedup", metavar="S[,S...]",
              help="latency target as baseline / result, measured side by side; a list (1.5,2,3) sweeps: one build per "
                   "target under --out and one pareto.png across them")
@click.option("--out", type=_OUTPUT,
              help="build directory to create (default: builds/<model>-x<speedup>, -<ms>ms or -sweep)")
@_search_options
@click.option("--compare", is_flag=True, help="also train and time, at the result's latency, the baseline with "
              "attention dropped, the baseline narrowed, and the search without MoE (about 3x the build time)")
@click.option("--reuse-continued", "continued", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="the baseline-continued/ directory of an earlier build of the same baseline and budget, reused "
                   "instead of training the reference again (refused if it trained on fewer tokens than the result); "
                   "that build's local-search library too, where it holds this search's alternatives")
@click.option("--teacher", type=click.Choice(TEACHERS), default="auto", show_default=True,
              help="what the result (and the self-distilled reference) distils from: baseline: the model as given; "
                   "continued: the baseline trained on --data with cross-entropy as long as the result (it adapts an "
                   "imported model to that data; the result then keeps half cross-entropy in its recipe, since the "
                   "data still teaches); auto: the one with the lower loss on training tokens neither "
                   "trained on, spread over the training split (recorded in teacher.json)")
def build_command(run: Path, engine: str, target_speedup: str | None, target_latency_ms: float | None, out: Path | None,
                  batch: int, tgt_len: int | None, mem_len: int | None, threads: int, lowering: str | None,
                  precision: str | None, budget: str, space: Path | None, method: str, local_steps: int | None,
                  experts: str | None, top_k: str | None, shared: str | None, data_spec: str | None,
                  table_cache: Path | None, compare: bool, continued: Path | None, teacher: str, quiet: bool) -> None:
    """Compile a baseline into a faster sparse (MoE) network that meets a latency target in the engine:
    profile, search, distill, export, verify."""
    from planer import distributed
    from planer.build import BUDGETS, build, sweep
    from planer.deployment import Target
    from planer.space import SearchSpace

    speedups = _speedups(target_speedup) if target_speedup is not None else [None]
    targets = [Target(ms=target_latency_ms, speedup=s) for s in speedups]
    if out is None:
        suffix = "sweep" if len(targets) > 1 else targets[0].label()
        out = Path("builds") / f"{run.stem if run.is_file() else run.name}-{suffix}"
    moe = _expert_options(experts, top_k, shared)
    chosen = replace(BUDGETS[budget].searching(method, local_steps), teacher=teacher)
    dep = _deployment(run, engine, batch, tgt_len, mem_len, threads, lowering, precision)
    options = dict(dep=dep, budget=chosen,
                   data=data_spec, space=SearchSpace.load(space) if space else None, moe=moe,
                   table_cache=table_cache, compare=compare, continued=continued, show_progress=not quiet)
    try:
        if len(targets) > 1:
            summaries = sweep(run, out, speedups, **options)
        else:
            summary = build(run, out, target=targets[0], **options)
    except KeyboardInterrupt:
        raise PlanerError(f"interrupted; {out}.partial keeps the finished stages: run the same command again "
                          "to continue") from None
    if not distributed.is_main():  # under torchrun only rank 0 reports
        return
    if len(targets) > 1:
        click.echo((out / "sweep.md").read_text())
        missed = [f"x{s['target_speedup']:g}" for s in summaries if not s["met"]]
    else:
        click.echo((out / "report.md").read_text())
        missed = [] if summary["met"] else [f"speedup {summary['speedup']:.2f}"]
    if missed:
        raise PlanerError(f"{out}: built, but the target was missed ({', '.join(missed)}); "
                          "raise --budget or relax the target")


@main.command("search")
@_request_options
@click.option("--target-speedup", type=_POSITIVE, help="latency target as baseline / result, measured side by side")
@click.option("--out", required=True, type=_OUTPUT,
              help="directory to create: the chosen network before distillation, outcome.json, search_log.jsonl, "
                   "the calibrated latency_table.json")
@_search_options
def search_command(run: Path, engine: str, target_speedup: float | None, target_latency_ms: float | None, out: Path,
                   batch: int, tgt_len: int | None, mem_len: int | None, threads: int, lowering: str | None,
                   precision: str | None, budget: str, space: Path | None, method: str, local_steps: int | None,
                   experts: str | None, top_k: str | None, shared: str | None, data_spec: str | None,
                   table_cache: Path | None, quiet: bool) -> None:
    """A build's profile and search stages alone: the network that meets the target, before distillation
    (`planer distill` trains it on)."""
    from planer import distributed
    from planer.build import BUDGETS, search_alone
    from planer.deployment import Target
    from planer.space import SearchSpace

    target = Target(ms=target_latency_ms, speedup=target_speedup)
    moe = _expert_options(experts, top_k, shared)
    chosen = BUDGETS[budget].searching(method, local_steps)
    dep = _deployment(run, engine, batch, tgt_len, mem_len, threads, lowering, precision)
    try:
        outcome = search_alone(run, out, dep=dep, target=target, budget=chosen,
                               data=data_spec, space=SearchSpace.load(space) if space else None,
                               moe=moe, table_cache=table_cache,
                               show_progress=not quiet)
    except KeyboardInterrupt:
        raise PlanerError("interrupted; nothing was kept: run the same command again to start over") from None
    if not distributed.is_main():
        return
    chosen = outcome.chosen
    teacher = out / "imported" if (out / "imported").is_dir() else run
    trial = f"; trial loss {chosen.trial_loss:.4f}" if chosen.trial_loss is not None else ""
    click.echo(f"{out}: {chosen.describe()} of {len(outcome.candidates)} candidates: "
               f"{' '.join(b.label() for b in chosen.arch.blocks)}\n"
               f"  {chosen.measured_ms:.2f} ms beside the baseline's {chosen.baseline_ms:.2f} "
               f"(x{chosen.baseline_ms / chosen.measured_ms:.2f}; target {outcome.target_ms:.2f} ms); "
               f"held-out training loss {chosen.held_out_loss:.4f} with the supernet's weights{trial}\n"
               f"  next: planer distill --student {out} --teacher {teacher} --out DIR")


@main.command("distill")
@click.option("--student", required=True, type=click.Path(path_type=Path),
              help="network to train: a directory with arch.json and model.safetensors (`planer search --out`)")
@click.option("--teacher", required=True, type=click.Path(path_type=Path),
              help="the baseline's run directory, whose logits the student learns from")
@click.option("--out", required=True, type=_OUTPUT, help="run directory to create")
@click.option("--steps", type=_COUNT, default=3600, show_default=True, help="training steps (a medium build's)")
@click.option("--batch", type=_BATCH, default=8, show_default=True, help="streams of the segment length per step")
@click.option("--data", "data_spec", help="corpus (default: the teacher's). " + _DATA_HELP)
@click.option("--resume", is_flag=True, help="continue the interrupted or finished run at --out")
@click.option("--quiet", is_flag=True, help="no progress bar")
def distill_command(student: Path, teacher: Path, out: Path, steps: int, batch: int, data_spec: str | None,
                    resume: bool, quiet: bool) -> None:
    """A build's distillation stage alone: train a network to match the baseline's logits (forward KL) and, where
    `planer search`'s output says which baseline block each of its blocks stands for, its hidden states (cosine
    loss), the recipe a build uses; then score it on the whole validation split."""
    from planer import distributed
    from planer.build import distill
    from planer.train.evaluate import headline

    with _resumable(out):
        final = distill(student, teacher, out, steps=steps, batch=batch, data=data_spec, resume=resume,
                            show_progress=not quiet)
    if distributed.is_main():
        click.echo(f"{out}: valid {headline(final['valid'])} after {final['step']} steps")


@main.command("bench")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path),
              help="directory (arch.json + model.onnx) of the model timed beside the build [BUILD/baseline]")
@click.option("--engine", type=click.Choice(ENGINES), help="engine [the stored one, else ort]")
@click.option("--batch", type=_BATCH, help="batch size [the stored deployment, else the build's]")
@click.option("--tgt-len", type=_TOKENS, help="tokens per call [the stored deployment, else the build's]")
@click.option("--mem-len", type=_MEMORY, help="memory length [the stored deployment, else the build's]")
@click.option("--threads", type=_THREADS, help="engine threads [the stored deployment, else the build's]")
@click.option("--save", "save_to", type=_OUTPUT_FILE, help="write the measurement as a reference JSON")
@click.option("--against", type=click.Path(path_type=Path),
              help="a reference JSON from --save: exit 1 if build/reference latency grew by more than --max-slowdown")
@click.option("--max-slowdown", type=_AT_LEAST_ONE, default=1.10, show_default=True,
              help="largest allowed growth of the build/reference latency ratio")
@click.option("--min-seconds", type=_POSITIVE, default=2.0, show_default=True, help="timing time per try")
@click.option("--tries", type=_COUNT, default=2, show_default=True,
              help="with --against, a regression must show in every try (shared machines are noisy)")
@click.option("--json", "as_json", is_flag=True,
              help="print one JSON object on stdout (the last measurement as --save writes it, with --against its "
                   "gate verdict under \"gate\"); the readable report goes to stderr")
def bench_command(build_dir: Path, reference: Path | None, engine: str | None, batch: int | None, tgt_len: int | None,
                  mem_len: int | None, threads: int | None, save_to: Path | None, against: Path | None,
                  max_slowdown: float, min_seconds: float, tries: int, as_json: bool) -> None:
    """Time a build beside a reference model (both in the engine, interleaved) and report the ratio;
    with --against, gate on it.

    \b
      planer bench builds/tiny-x2 --save latency-reference.json
      planer bench builds/tiny-x2 --against latency-reference.json --max-slowdown 1.10
      planer bench builds/tiny-x2 --json | jq .ratio
    """
    import json
    from dataclasses import replace

    from planer import bench

    def say(text: str) -> None:
        click.echo(text, err=as_json)

    stored = bench.load_reference(against) if against is not None else None
    given = {"engine": engine, "batch": batch, "tgt_len": tgt_len, "mem_len": mem_len, "threads": threads}
    dep = replace(bench.default_deployment(build_dir, stored), min_seconds=min_seconds,
                  **{k: v for k, v in given.items() if v is not None})
    ok, attempt = True, 0
    for attempt in range(tries if stored else 1):
        m = bench.measure(build_dir, reference, dep=dep)
        say(m.table())
        if stored:
            ok, diff = bench.gate(m, stored, max_slowdown)
            say(diff)
            if ok:
                break
            if attempt + 1 < tries:
                say(f"try {attempt + 1} of {tries} regressed; timing again")
    if save_to is not None:
        bench.save(m, save_to)
        say(f"wrote {save_to}")
    if as_json:
        gated = {"gate": {"passed": ok, "stored_ratio": stored["ratio"], "growth": m.ratio / stored["ratio"],
                          "max_slowdown": max_slowdown, "tries": attempt + 1}} if stored else {}
        click.echo(json.dumps(m.to_dict() | gated, indent=2))
    if not ok:
        raise PlanerError(f"latency regression: build/reference grew {m.ratio / stored['ratio']:.3f}x "
                          f"(allowed {max_slowdown:g}x) in all {tries} tries")


@main.command("serve")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--engine", type=click.Choice(ENGINES), default="ort", show_default=True,
              help="engine to serve model.onnx with")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; 0.0.0.0 exposes the server to the network. On a loopback address only requests "
                   "naming localhost, 127.0.0.1 or ::1 (Host, and a browser's Origin) are answered")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="another host name requests may carry (repeatable); on a non-loopback --host, naming any limits "
                   "the server to those")
@click.option("--port", type=_PORT, default=8000, show_default=True)
@click.option("--threads", type=_THREADS, default=None, help="engine intra-op threads (default: the engine's choice)")
@click.option("--max-batch", type=_BATCH, default=8, show_default=True,
              help="decoding steps of the same shape stacked into one engine call")
@click.option("--max-delay-ms", type=_NONNEG_FLOAT, default=2.0, show_default=True,
              help="how long a step may wait for others to batch with")
@click.option("--max-queue", type=_COUNT, default=64, show_default=True,
              help="requests in flight at once; more are answered 503 at once")
@click.option("--max-body-kb", type=_COUNT, default=1024, show_default=True, help="largest request body (413 beyond)")
@click.option("--max-new-tokens", type=_COUNT, default=1024, show_default=True,
              help="largest max_tokens of a generation (OpenAI's chat default)")
@click.option("--model-name", default=None,
              help="the model's id in OpenAI's API (GET /v1/models; requests must name it) [default: the build "
                   "directory's name]")
@click.option("--body-timeout-s", type=_POSITIVE, default=10.0, show_default=True,
              help="a request body not received in full by then is answered 408 (slow uploads hold no place in "
                   "the queue meanwhile); a connection that has not sent a request's headers by then is closed")
def serve_command(build_dir: Path, engine: str, host: str, port: int, threads: int | None, max_batch: int,
                  max_delay_ms: float, max_queue: int, max_body_kb: int, max_new_tokens: int,
                  body_timeout_s: float, model_name: str | None, allow_hosts: tuple[str, ...]) -> None:
    """Serve a build over HTTP: OpenAI's API (POST /v1/completions, POST /v1/chat/completions for models imported
    with a chat template, GET /v1/models; streaming as server-sent events), and POST /v1/score, POST
    /v1/generate, GET /healthz, GET /metrics.

    \b
      planer serve builds/tiny-x2 --port 8000
      curl -s localhost:8000/v1/completions -d '{"model": "tiny-x2", "prompt": "The ", "max_tokens": 40}'
      curl -sN localhost:8000/v1/completions -d '{"model": "tiny-x2", "prompt": "The ", "stream": true}'
    """
    from planer.serve import ServeConfig, serve

    if host.strip() in ("", "0"):
        raise PlanerError(f"--host {host!r} would bind every interface without saying so; give 0.0.0.0 for that, "
                          "or an address such as 127.0.0.1")
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        click.echo(f"serving on {host}: anyone who can reach this machine on port {port} can use the model", err=True)
    config = ServeConfig(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                         max_body_bytes=max_body_kb * 1024, max_new_tokens=max_new_tokens,
                         body_timeout_s=body_timeout_s)
    serve(build_dir, engine=engine, threads=threads, host=host, port=port, config=config, model_name=model_name,
          allow_hosts=allow_hosts)


def _expert_options(experts: str | None, top_k: str | None, shared: str | None):
    """--experts, --top-k and --shared as numbers; their sense is checked against the baseline (ExpertOptions)."""
    from planer.space import ExpertOptions

    def numbers(option: str, text: str | None, kind: type) -> tuple | None:
        if text is None:
            return None
        try:
            return tuple(dict.fromkeys(kind(v) for v in text.split(",")))
        except ValueError:
            raise PlanerError(f"{option} {text!r}: give a comma-separated list of {kind.__name__}s, e.g. "
                              f"{'2,4,8' if kind is int else '0,0.25'}") from None

    return ExpertOptions(numbers("--experts", experts, int), numbers("--top-k", top_k, int),
                         numbers("--shared", shared, float))


def _speedups(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise PlanerError(f"--target-speedup {text!r}: give a number or a comma-separated list (1.5,2,3)") from None
    if not all(math.isfinite(v) and v > 0 for v in values) or len(set(values)) != len(values):
        raise PlanerError(f"--target-speedup {text!r}: each speedup must be a finite positive number, each given once")
    return values


if __name__ == "__main__":
    sys.exit(main())
