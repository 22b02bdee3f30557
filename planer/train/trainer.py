"""Baseline training: AdamW, warm-up then cosine decay, gradient clipping,
ordered segments with Transformer-XL memory, periodic validation, resumable
checkpoints, and an output directory that appears only when training is done.

Run directory (OUT):
    arch.json          the network
    model.safetensors  its weights
    config.json        data spec, training recipe, progress (step, tokens, time)
    train_state.pt     optimizer, RNG and memories, to resume exactly (tensors and numbers only)
    metrics.jsonl      one line per validation
    eval.json          final validation and test scores
    vocab.json         word vocabulary by id (word corpora only; planer serve reads it)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from planer import __version__, distributed
from planer.arch import Architecture, BlockSpec
from planer.checkpoint import WEIGHTS_FILE, load_model, save_weights
from planer.data import Corpus, Segments, load_corpus
from planer.data.corpus import canonical_spec, tokenize_corpus
from planer.errors import PlanerError
from planer.files import (ARCH_FILE, REQUEST_FILE, TOKENIZER_DIR, VOCAB_FILE, atomic_write, publish, replacing,
                          staging_dir, writing)
from planer.nn import LM
from planer.train.evaluate import evaluate, headline
from planer.train.presets import TrainConfig

CONFIG_FILE = "config.json"
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"


class DamagedCheckpoint(PlanerError):
    """A checkpoint whose files cannot be read back (truncated, garbage, or weights of another network): there is
    nothing to resume from. A build, whose own training runs these are, starts such a run again."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0


def run_source(out: Path) -> Path | None:
    """The directory a --resume of OUT continues: an interrupted staging dir first, else OUT itself."""
    for candidate in (staging_dir(out), out):
        if candidate.is_dir():
            return candidate
    return None


def run_corpus(run: Path, data: str | None, vocab_size: int) -> Corpus:
    """The corpus `data`, by default the one run `run` was trained on, checked against the model's vocabulary."""
    if data is None and (run / "import.json").is_file():
        raise PlanerError(f"{run} was imported, so no training data is on record; pass --data (e.g. --data sample, "
                          "read through the model's own tokenizer)")
    if data is None:  # a training run's config, else a build's request
        path = next((p for p in (run / CONFIG_FILE, run / REQUEST_FILE) if p.is_file()), None)
        if path is None:
            raise PlanerError(f"{run}: no {CONFIG_FILE} or {REQUEST_FILE} says which data it was trained on; "
                              "pass --data")
        try:
            data = json.loads(path.read_text())["data"]
            if not isinstance(data, str):
                raise TypeError(f"its data is {data!r}, not a data spec")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PlanerError(f"{path}: unreadable or not written by planer ({type(e).__name__}: {e}), so "
                              "it does not say which data the run was trained on; pass --data") from None
    corpus = load_corpus(data)
    if (run / TOKENIZER_DIR).is_dir():  # an imported model reads text through its own tokenizer
        corpus = tokenize_corpus(corpus, run / TOKENIZER_DIR)
    if corpus.vocab_size != vocab_size:
        raise PlanerError(f"{data} has {corpus.vocab_size} symbols but the model {vocab_size}; "
                          "use the data it was trained on")
    return corpus


def resumable(out: Path) -> bool:
    """Whether OUT (or its interrupted staging directory) holds a checkpoint to resume from."""
    source = run_source(out)
    return source is not None and has_checkpoint(source)


def has_checkpoint(work: Path) -> bool:
    """Whether a run directory holds a checkpoint (its config.json is written last, once one is complete)."""
    return (work / CONFIG_FILE).is_file()


def check_new_run(out: Path) -> None:
    """Refuse to start a run over an existing or interrupted one (an OUT.partial killed before its first
    checkpoint holds nothing, and the new run replaces it)."""
    if has_checkpoint(staging_dir(out)):
        raise PlanerError(f"{staging_dir(out)} holds an interrupted run; pass --resume to continue it, or delete it")
    if out.exists():
        raise PlanerError(f"{out} already exists; pass --resume to train it further, or choose another --out")


def saved_config(out: str | os.PathLike) -> tuple[TrainConfig, str]:
    """The training recipe and preset name a run was started with (for --resume)."""
    config = _saved(out)
    try:
        return TrainConfig.from_dict(config["train"]), config.get("preset", "")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PlanerError(f"{run_source(Path(out))}: {CONFIG_FILE} is not one planer wrote ({e}); it cannot be "
                          "resumed") from None


def saved_data(out: str | os.PathLike) -> str:
    """The --data a run was trained on (for --resume)."""
    data = _saved(out).get("data")
    if not isinstance(data, str):
        raise PlanerError(f"{run_source(Path(out))}: {CONFIG_FILE} does not say which data it was trained on; pass "
                          "--data")
    return data


def _saved(out: str | os.PathLike) -> dict:
    source = run_source(Path(out))
    if source is None:
        raise PlanerError(f"--resume: nothing to resume at {out}; drop --resume to start a new run")
    if not has_checkpoint(source):
        raise PlanerError(f"--resume: {source} was interrupted before its first checkpoint and holds nothing to "
                          "resume; run the same command without --resume to start again")
    try:
        config = json.loads((source / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise PlanerError(f"{source}: no readable {CONFIG_FILE} ({e}); it cannot be resumed") from None
    if not isinstance(config, dict):
        raise PlanerError(f"{source}: {CONFIG_FILE} is not one planer wrote; it cannot be resumed")
    return config


def _save_checkpoint(work: Path, model: LM, opt: torch.optim.Optimizer, mems: list[torch.Tensor] | None,
                     cfg: TrainConfig, corpus: Corpus, preset: str, progress: Progress) -> None:
    mems = distributed.gather_streams(mems)  # every process's streams, so any number of processes can resume
    if not distributed.is_main():
        return
    # The state file alone is what a resume reads, weights and progress included, so that a process killed
    # between the checkpoint's renames resumes consistently (model.safetensors is the run's output for others).
    state = {
        "step": progress.step,
        "tokens": progress.tokens,
        "seconds": progress.seconds,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "mems": mems,
    }
    with replacing(work / STATE_FILE) as tmp:
        torch.save(state, tmp)
    save_weights(model, work / WEIGHTS_FILE, metadata={"step": str(progress.step)})
    config = {
        "planer_version": __version__, "preset": preset, "data": corpus.spec, "unit": corpus.unit,
        "train": cfg.to_dict(), "step": progress.step, "tokens_seen": progress.tokens,
        "train_seconds": round(progress.seconds, 2),
    }
    # config.json is written last: its step marks the checkpoint as complete.
    atomic_write(work / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def _load_checkpoint(work: Path, corpus: Corpus, cfg: TrainConfig) -> tuple[LM, dict, Progress]:
    config_path = work / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
        # A damaged file fails inside torch's unpickler with whatever error its bytes happen to cause.
        state = torch.load(work / STATE_FILE, weights_only=True)
        vocab = json.loads((work / VOCAB_FILE).read_text()) if corpus.vocab is not None else None
        if not (isinstance(config, dict) and isinstance(state, dict)):
            raise ValueError("not the layout planer writes")
    except Exception as e:
        raise DamagedCheckpoint(f"{work}: cannot resume, checkpoint unreadable ({type(e).__name__}: {e}); "
                                "delete it and train again") from None
    if not isinstance(config.get("data"), str) or canonical_spec(config["data"]) != corpus.spec:
        raise PlanerError(f"{work} was trained on --data {config.get('data')}, not {corpus.spec}; "
                          "resume with the same data")
    if vocab != corpus.vocab:
        raise PlanerError(f"{work}: the vocabulary of {corpus.spec} changed since training; resume with the same files")
    try:
        model = load_model(work, dropout=cfg.dropout, dropatt=cfg.dropatt)
    except PlanerError as e:  # its weights or arch.json damaged
        raise DamagedCheckpoint(str(e)) from None
    if "model" in state:  # written by this planer: self-contained
        model.load_state_dict(state["model"])
        return model, state, Progress(state["step"], state["tokens"], state["seconds"])
    if config["step"] != state["step"]:
        raise PlanerError(f"{work}: checkpoint files disagree on the step (interrupted while saving); "
                          "delete the directory and train again")
    return model, state, Progress(config["step"], config["tokens_seen"], config["train_seconds"])


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged (temperature 1)."""
    s = student.reshape(-1, student.shape[-1]).float().log_softmax(-1)
    t = teacher.reshape(-1, teacher.shape[-1]).float().log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def cosine_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], match: Sequence[int]) -> torch.Tensor:
    """1 - cosine similarity per token between the student's block outputs and the teacher's block outputs they
    stand for (`match[i]`: the teacher block whose output the student's block i replaces), averaged over tokens
    and blocks (Puzzle's global distillation)."""
    return torch.stack([1 - F.cosine_similarity(s.float(), teacher[t].float(), dim=-1).mean()
                        for s, t in zip(student, match)]).mean()


def alignment(student: Architecture, teacher: Architecture, positions: Sequence[BlockSpec] = ()) -> list[int] | None:
    """The teacher block each of the student's blocks stands for: from the blocks it was chosen as, one per
    teacher block with skips included (`positions`), or block for block where the student has the teacher's
    depth; None where neither tells (a space of another depth)."""
    if positions:
        return [p for p, spec in enumerate(positions) if spec.kind != "skip"] \
            if len(positions) == len(teacher.blocks) else None
    return list(range(len(student.blocks))) if len(student.blocks) == len(teacher.blocks) else None


def check_match(student: Architecture, teacher: Architecture, match: Sequence[int] | None) -> list[int]:
    """The student's block -> teacher block alignment the cosine loss uses: `match`, or the one `alignment`
    tells. Refuses one that does not name increasing teacher blocks, one per student block."""
    given = alignment(student, teacher) if match is None else list(match)
    if given is None:
        raise PlanerError(f"a cosine loss needs to know which of the teacher's {len(teacher.blocks)} blocks each "
                          f"of the student's {len(student.blocks)} stands for; pass its alignment")
    if len(given) != len(student.blocks) or any(not 0 <= t < len(teacher.blocks) for t in given) \
            or any(a >= b for a, b in zip(given, given[1:])):
        raise PlanerError(f"alignment {given} does not give each of the student's {len(student.blocks)} blocks a "
                          f"teacher block (increasing, below {len(teacher.blocks)})")
    return given


def train(corpus: Corpus, cfg: TrainConfig, out: str | os.PathLike, *, arch: Architecture | None = None,
          init: LM | None = None, teacher: LM | None = None, match: Sequence[int] | None = None, preset: str = "",
          resume: bool = False, show_progress: bool = True) -> dict:
    """Train (or resume) a model and return its final evaluation.

    A new run needs `arch`, or `init`, a model whose weights it starts from. With a
    `teacher`, the loss blends cross-entropy with distillation from the teacher's
    logits (cfg.distill is the distillation share) and adds cfg.cosine x the cosine loss between the hidden
    states (block i's output against teacher block `match[i]`'s; by default block for block); resume passes
    the teacher and `match` again.
    A new run that fails or is interrupted before its first checkpoint leaves nothing behind
    (there is nothing to resume, and a leftover OUT.partial would stop the same command).
    """
    work = staging_dir(Path(out))
    with writing(Path(out)) if distributed.is_main() else nullcontext():
        try:
            return _train(corpus, cfg, Path(out), arch=arch, init=init, teacher=teacher, match=match, preset=preset,
                          resume=resume, show_progress=show_progress)
        except BaseException:
            if not resume and distributed.is_main() and work.is_dir() and not has_checkpoint(work):
                shutil.rmtree(work, ignore_errors=True)
            raise


def _train(corpus: Corpus, cfg: TrainConfig, out: Path, *, arch: Architecture | None, init: LM | None,
           teacher: LM | None, match: Sequence[int] | None, preset: str, resume: bool, show_progress: bool) -> dict:
    work = staging_dir(out)
    main = distributed.is_main()
    torch.manual_seed(cfg.seed)
    model, state, progress, preset = _started(corpus, cfg, out, arch, init, preset, resume)
    arch = model.arch
    if teacher is not None and cfg.cosine > 0:
        match = check_match(arch, teacher.arch, match)
    distributed.same_start(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    mems = None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        mems = None if state["mems"] is None else [m[distributed.share(cfg.batch)] for m in state["mems"]]

    segments = Segments(corpus.train, cfg.batch, arch.tgt_len, distributed.share(cfg.batch))
    if teacher is not None:
        teacher.eval()
    teacher_mems = None
    distributed.barrier()  # the staging directory exists
    metrics_file = (work / METRICS_FILE).open("a") if main else None
    model.train()
    bar = tqdm(total=cfg.steps, initial=progress.step, disable=not (show_progress and main), unit="step",
               dynamic_ncols=True, desc="train")
    last = time.perf_counter()
    while progress.step < cfg.steps:
        index = progress.step % len(segments)
        if index == 0:
            mems = teacher_mems = None  # a new pass starts every stream afresh
        x, y = segments[index]
        lr = lr_at(progress.step, cfg)
        loss, mems, teacher_mems = _step(model, opt, x, y, mems, teacher, teacher_mems, match, lr, cfg)
        progress.step += 1
        progress.tokens += y.numel() * distributed.world()
        now = time.perf_counter()
        progress.seconds += now - last
        last = now
        bar.update(1)
        if progress.step % 10 == 0 or progress.step == cfg.steps:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{progress.tokens / max(progress.seconds, 1e-9):.0f}")
        if main and (progress.step % cfg.eval_every == 0 or progress.step == cfg.steps):
            valid = evaluate(model, corpus.valid, corpus.unit, batch=cfg.eval_batch, max_tokens=cfg.eval_tokens)
            record = {"step": progress.step, "tokens_seen": progress.tokens, "train_loss": loss.item(),
                      "lr": lr, "seconds": round(progress.seconds, 1), "valid": valid}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            bar.write(f"step {progress.step}: valid {headline(valid)} (first {valid['tokens']} tokens)")
            last = time.perf_counter()  # validation time is not training time
        if progress.step % cfg.ckpt_every == 0 or progress.step == cfg.steps:
            _save_checkpoint(work, model, opt, mems, cfg, corpus, preset, progress)
            last = time.perf_counter()
    bar.close()
    if not main:
        distributed.barrier()  # rank 0 evaluates and publishes
        return distributed.broadcast(None)
    metrics_file.close()
    final = _final_evaluation(model, corpus, cfg, progress, show_progress)
    atomic_write(work / EVAL_FILE, json.dumps(final, indent=2) + "\n")
    publish(work, out)
    distributed.barrier()
    return distributed.broadcast(final)


def _started(corpus: Corpus, cfg: TrainConfig, out: Path, arch: Architecture | None, init: LM | None, preset: str,
             resume: bool) -> tuple[LM, dict | None, Progress, str]:
    """The model to train, the optimiser state to restore (None for a new run), the progress so far and the
    preset: from OUT's last checkpoint (copied into the staging directory), or a new run's staging directory
    with its arch.json (and vocabulary)."""
    work = staging_dir(out)
    main = distributed.is_main()
    if resume:
        source = run_source(out)
        if source is None:
            raise PlanerError(f"--resume: nothing to resume at {out}; drop --resume to start a new run")
        model, state, progress = _load_checkpoint(source, corpus, cfg)
        preset = preset or json.loads((source / CONFIG_FILE).read_text()).get("preset", "")
        distributed.barrier()  # everyone has read the checkpoint before it moves
        if source != work and main:
            shutil.copytree(source, work)
        return model, state, progress, preset
    check_new_run(out)
    if main and work.is_dir():  # killed before its first checkpoint: nothing in it to keep
        print(f"{work}: interrupted before its first checkpoint; starting again", file=sys.stderr)
        shutil.rmtree(work)
    distributed.barrier()  # every process checked before any creates it
    if init is not None:
        arch = init.arch
        model = LM(arch, dropout=cfg.dropout, dropatt=cfg.dropatt)
        model.load_state_dict(init.state_dict())
    elif arch is not None:
        model = LM(arch, dropout=cfg.dropout, dropatt=cfg.dropatt)
    else:
        raise PlanerError("a new run needs an architecture (a --preset)")
    if main:
        work.mkdir(parents=True)
        arch.save(work / ARCH_FILE)
        if corpus.vocab is not None:
            atomic_write(work / VOCAB_FILE, json.dumps(corpus.vocab) + "\n")
    return model, None, Progress(), preset


def _step(model: LM, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, mems: list | None,
          teacher: LM | None, teacher_mems: list | None, match: Sequence[int] | None, lr: float, cfg: TrainConfig
          ) -> tuple[torch.Tensor, list, list | None]:
    """One optimisation step on segment (x, y): the cross-entropy (blended with distillation from `teacher`'s
    logits, plus the hidden states' cosine loss), the MoE balance loss, gradients averaged over processes and
    clipped. Returns the cross-entropy and both networks' new memories."""
    for group in opt.param_groups:
        group["lr"] = lr
    cosine = teacher is not None and cfg.cosine > 0
    result = model(x, mems, hidden=cosine)
    loss = F.cross_entropy(result.logits.reshape(-1, model.arch.vocab_size).float(), y.reshape(-1))
    objective = loss
    if teacher is not None and (cfg.distill > 0 or cosine):
        with torch.no_grad():
            taught = teacher(x, teacher_mems, hidden=cosine)
        teacher_mems = taught.mems
        objective = (1 - cfg.distill) * loss + cfg.distill * distillation_loss(result.logits, taught.logits)
        if cosine:
            objective = objective + cfg.cosine * cosine_loss(result.hidden, taught.hidden, match)
    opt.zero_grad(set_to_none=True)
    (objective + cfg.aux_weight * result.aux_loss).backward()
    distributed.average_gradients(model.parameters())
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    return loss, result.mems, teacher_mems


def _final_evaluation(model: LM, corpus: Corpus, cfg: TrainConfig, progress: Progress, show_progress: bool) -> dict:
    """eval.json: the run's totals and its model on the whole validation split (and the test split, if asked)."""
    final = {
        "step": progress.step, "tokens_seen": progress.tokens, "train_seconds": round(progress.seconds, 1),
        "tokens_per_second": round(progress.tokens / max(progress.seconds, 1e-9), 1),
        "params": model.arch.param_counts(),
        "valid": evaluate(model, corpus.valid, corpus.unit, batch=cfg.eval_batch,
                          progress="final eval: valid" if show_progress else None),
    }
    if cfg.test_split:
        final["test"] = evaluate(model, corpus.test, corpus.unit, batch=cfg.eval_batch,
                                 progress="final eval: test" if show_progress else None)
    return final
