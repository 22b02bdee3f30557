"""The `planer` command.

Each subcommand is a thin layer over the Python API of the same name; heavy
imports happen inside the command so `planer --help` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from planer import __version__
from planer.errors import PlanerError


class _Group(click.Group):
    """Turns user-input errors into one line and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PlanerError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="planer")
def main() -> None:
    """planer: compile a trained Transformer into a faster sparsely-activated (MoE) network.

    \b
    Start with a baseline:
      planer train --preset tiny --data sample --out runs/tiny
      planer eval runs/tiny
    """


_DATA_HELP = ("corpus: 'sample' (the enwik8-format excerpt bundled with gensim), 'enwik8:PATH' (raw bytes, "
              "split 90/5/5) or 'wikitext103:DIR' (wiki.{train,valid,test}.tokens)")


@main.command()
@click.option("--preset", help="baseline to train: tiny, txl-enwik8-base, txl-wt103-base "
              "(not needed with --resume)")
@click.option("--data", "data_spec", default="sample", show_default=True, help=_DATA_HELP)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="run directory to create (assembled as OUT.partial, renamed when training finishes)")
@click.option("--resume", is_flag=True, help="continue OUT (or an interrupted OUT.partial) from its last checkpoint")
@click.option("--steps", type=int, help="total optimizer steps (overrides the preset)")
@click.option("--batch", type=int, help="parallel streams per step (overrides the preset)")
@click.option("--lr", type=float, help="peak learning rate (overrides the preset)")
@click.option("--eval-every", type=int, help="steps between validations (overrides the preset)")
@click.option("--ckpt-every", type=int, help="steps between checkpoints (overrides the preset)")
@click.option("--seed", type=int, help="random seed (overrides the preset)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def train(preset: str | None, data_spec: str, out: Path, resume: bool, steps: int | None, batch: int | None,
          lr: float | None, eval_every: int | None, ckpt_every: int | None, seed: int | None, quiet: bool) -> None:
    """Train a baseline language model (Transformer-XL style, with segment memory)."""
    from planer.data import load_corpus
    from planer.train.evaluate import headline
    from planer.train.presets import get_preset, with_overrides
    from planer.train.trainer import check_new_run, saved_config, train as run_training

    if resume:
        cfg, saved_preset = saved_config(out)
        if preset and preset != saved_preset:
            raise PlanerError(f"{out} was trained with --preset {saved_preset}; drop --preset to resume it")
        arch = None
    else:
        if not preset:
            raise PlanerError("choose a baseline with --preset (tiny, txl-enwik8-base, txl-wt103-base)")
        chosen = get_preset(preset)
        check_new_run(out)
        cfg, arch = chosen.train, None
    corpus = load_corpus(data_spec)
    if not resume:
        arch = chosen.architecture(corpus.vocab_size)
    cfg = with_overrides(cfg, steps=steps, batch=batch, lr=lr, eval_every=eval_every, ckpt_every=ckpt_every,
                         seed=seed)
    if arch is not None:
        click.echo(arch.summary())
    result = run_training(corpus, cfg, out, arch=arch, preset=preset or "", resume=resume,
                          show_progress=not quiet)
    click.echo(f"{out}: step {result['step']}, {result['tokens_per_second']:.0f} tokens/s over "
               f"{result['train_seconds']:.0f} s; valid {headline(result['valid'])}, test {headline(result['test'])}")


@main.command("eval")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--data", "data_spec", help="corpus to score (default: the one the run was trained on). " + _DATA_HELP)
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--batch", type=int, default=8, show_default=True, help="parallel streams")
@click.option("--tgt-len", type=int, help="segment length (default: the architecture's)")
@click.option("--mem-len", type=int, help="memory length (default: the architecture's)")
@click.option("--max-tokens", type=int, help="stop after this many tokens (default: the whole split)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def eval_(run: Path, data_spec: str | None, split: str, batch: int, tgt_len: int | None, mem_len: int | None,
          max_tokens: int | None, as_json: bool) -> None:
    """Score a run on a split with the Transformer-XL protocol (memory carried through the split)."""
    from planer.checkpoint import load_model
    from planer.data import load_corpus
    from planer.train.evaluate import evaluate, headline
    from planer.train.trainer import CONFIG_FILE

    model = load_model(run)
    if data_spec is None:
        try:
            data_spec = json.loads((run / CONFIG_FILE).read_text())["data"]
        except (OSError, ValueError, KeyError):
            raise PlanerError(f"{run}: no {CONFIG_FILE} says which data it was trained on; pass --data") from None
    corpus = load_corpus(data_spec)
    if corpus.vocab_size != model.arch.vocab_size:
        raise PlanerError(f"{data_spec} has {corpus.vocab_size} symbols but the model {model.arch.vocab_size}; "
                          "score it on the data it was trained on")
    result = evaluate(model, corpus.split(split), corpus.unit, batch=batch, tgt_len=tgt_len, mem_len=mem_len,
                      max_tokens=max_tokens)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{run} on {data_spec} {split}: {headline(result)} (loss {result['loss']:.4f} nats, "
                   f"{result['tokens']} tokens)")


if __name__ == "__main__":
    sys.exit(main())
