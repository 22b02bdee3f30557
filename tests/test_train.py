import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from planer.arch import BlockSpec
from planer.checkpoint import load_model, save_weights
from planer.data import load_corpus
from planer.errors import PlanerError
from planer.nn import LM
from planer.train.evaluate import evaluate
from planer.train.presets import TrainConfig, finetune_config
from planer.train.trainer import alignment, lr_at, train
from tests.conftest import small_arch

# Constant learning rate so that a run split by a resume follows the same schedule as a straight one.
FAST = TrainConfig(steps=40, batch=4, lr=3e-3, warmup=0, min_lr_ratio=1.0, clip=1.0, eval_every=20,
                   eval_tokens=2048, ckpt_every=20, eval_batch=4)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert abs(lr_at(100, cfg) - 0.1) < 1e-12
    assert lr_at(50, cfg) < lr_at(20, cfg)


def test_training_lowers_validation_loss(tmp_path, text_file):
    corpus = load_corpus(f"enwik8:{text_file}")
    arch = small_arch()
    torch.manual_seed(FAST.seed)
    before = evaluate(__import__("planer.nn", fromlist=["LM"]).LM(arch), corpus.valid, "byte",
                      batch=4, max_tokens=2048)["loss"]
    result = train(corpus, FAST, tmp_path / "run", arch=arch, show_progress=False)
    assert result["valid"]["loss"] < before - 1.0, (before, result["valid"])
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == [
        "arch.json", "config.json", "eval.json", "metrics.jsonl", "model.safetensors", "train_state.pt"]
    assert not (tmp_path / "run.partial").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [20, 40]
    reloaded = evaluate(load_model(out), corpus.valid, "byte", batch=FAST.eval_batch)
    assert abs(reloaded["loss"] - result["valid"]["loss"]) < 1e-5


def test_resume_continues_exactly(tmp_path, text_file):
    corpus = load_corpus(f"enwik8:{text_file}")
    arch = small_arch()
    train(corpus, FAST, tmp_path / "straight", arch=arch, show_progress=False)
    half = TrainConfig(**{**FAST.to_dict(), "steps": 20})
    train(corpus, half, tmp_path / "split", arch=arch, show_progress=False)
    # the data as spelled another way (a relative path) is the same data: runs record it resolved
    elsewhere = load_corpus(f"enwik8:{os.path.relpath(text_file)}")
    train(elsewhere, FAST, tmp_path / "split", resume=True, show_progress=False)
    assert json.loads((tmp_path / "split" / "config.json").read_text())["data"] == f"enwik8:{text_file.resolve()}"
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    assert json.loads((tmp_path / "split" / "config.json").read_text())["step"] == 40
    # A process killed between the checkpoint's renames leaves weights newer than the rest: the resume reads
    # its state file alone, which holds the weights it goes with.
    train(corpus, half, tmp_path / "torn", arch=arch, show_progress=False)
    save_weights(LM(arch), tmp_path / "torn" / "model.safetensors", metadata={"step": "25"})
    train(corpus, FAST, tmp_path / "torn", resume=True, show_progress=False)
    c = load_file(str(tmp_path / "torn" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], c[name], atol=0, rtol=0, msg=name)


def test_word_level_training_reports_perplexity(tmp_path):
    words = " ".join(f"w{i % 37}" for i in range(4000))
    for split in ("train", "valid", "test"):
        (tmp_path / f"wiki.{split}.tokens").write_text(words + "\n")
    corpus = load_corpus(f"wikitext103:{tmp_path}")
    cfg = TrainConfig(**{**FAST.to_dict(), "steps": 10, "eval_every": 10, "ckpt_every": 10})
    result = train(corpus, cfg, tmp_path / "run", arch=small_arch(vocab_size=corpus.vocab_size),
                   show_progress=False)
    assert "ppl" in result["valid"] and result["valid"]["ppl"] < corpus.vocab_size
    assert json.loads((tmp_path / "run" / "vocab.json").read_text()) == corpus.vocab
    # the run serves as it is (after `planer export`): the server reads the words from the same file
    from planer.serve.text import WordTokenizer, load_tokenizer

    tokenizer = load_tokenizer(tmp_path / "run", corpus.vocab_size)
    assert isinstance(tokenizer, WordTokenizer) and tokenizer.vocab == corpus.vocab


def _hidden_cosine(student, teacher, match, corpus) -> float:
    """1 - cosine similarity of the student's block outputs to the teacher's blocks `match`, computed here."""
    x = torch.as_tensor(corpus.valid[:4 * 16].astype("int64")).view(4, 16)
    with torch.no_grad():
        s, t = student(x, hidden=True).hidden, teacher(x, hidden=True).hidden
    return sum(float(1 - torch.nn.functional.cosine_similarity(s[i], t[p], dim=-1).mean())
               for i, p in enumerate(match)) / len(match)


def test_cosine_distillation_pulls_each_block_toward_the_teacher_block_it_stands_for(tmp_path, text_file):
    """The teacher without its first FFN, aligned to its blocks 0, 2, 3: KL with the cosine loss brings those
    blocks' outputs closer to the teacher's than KL alone does (a loss read at the wrong blocks would not), and
    an alignment that is not one increasing teacher block per student block is refused before any training."""
    corpus = load_corpus(f"enwik8:{text_file}")
    arch = small_arch([BlockSpec.attn(2, 16), BlockSpec.ffn(64), BlockSpec.attn(2, 16), BlockSpec.ffn(64)])
    train(corpus, FAST, tmp_path / "teacher", arch=arch, show_progress=False)
    teacher = load_model(tmp_path / "teacher").eval()
    kept = [0, 2, 3]
    student = LM(arch.with_blocks([arch.blocks[p] for p in kept]))
    assert alignment(student.arch, arch, [arch.blocks[0], BlockSpec.skip(), *arch.blocks[2:]]) == kept
    shared = {k: v for k, v in teacher.state_dict().items() if not k.startswith("blocks.")}
    student.load_state_dict(shared, strict=False)
    for i, p in enumerate(kept):
        student.blocks[i].load_state_dict(teacher.blocks[p].state_dict())
    short = TrainConfig(**{**FAST.to_dict(), "steps": 20, "distill": 1.0})
    after = {}
    for cosine in (0.0, 1.0):
        out = tmp_path / f"cosine{cosine:g}"
        train(corpus, replace(short, cosine=cosine), out, init=student, teacher=teacher, match=kept,
              show_progress=False)
        after[cosine] = _hidden_cosine(load_model(out).eval(), teacher, kept, corpus)
    assert after[1.0] < 0.8 * after[0.0], after
    for wrong in ([0, 1], [0, 3, 2], [0, 2, 4]):
        with pytest.raises(PlanerError, match="does not give each of the student's 3 blocks"):
            train(corpus, replace(short, cosine=1.0), tmp_path / "wrong", init=student, teacher=teacher, match=wrong,
                  show_progress=False)
        assert not (tmp_path / "wrong.partial").exists()
    assert alignment(student.arch, arch, [BlockSpec.skip()] * 3) is None  # another depth: nothing to align
    assert alignment(student.arch, arch) is None and alignment(arch, arch) == [0, 1, 2, 3]


def test_the_recipe_keeps_the_cosine_loss_only_for_an_aligned_distillation():
    """One rule for every distillation a build runs: hidden states are compared only with a teacher's blocks the
    network's stand for, so without an alignment, or without a teacher's logits to follow, the cosine loss is off."""
    def cosine(distill: float, aligned: bool) -> float:
        return finetune_config(100, 4, 2048, distill=distill, cosine=0.5, aligned=aligned).cosine

    assert cosine(1.0, True) == 0.5 and cosine(0.5, True) == 0.5
    assert cosine(1.0, False) == 0.0 and cosine(0.0, True) == 0.0


def test_a_baseline_taught_by_itself_without_cross_entropy_starts_at_the_recipes_minimum():
    """Why a build trains no self-distilled reference where the baseline teaches with KL and cosine alone
    (planer.build.teaches_the_baseline): the student's logits and hidden states are the teacher's, bit for bit,
    so the loss is zero and its gradient rounding alone, while any cross-entropy in the recipe moves it."""
    import copy

    from planer.build import teaches_the_baseline
    from planer.train.trainer import cosine_loss, distillation_loss

    torch.manual_seed(0)
    teacher = LM(small_arch()).eval()
    x = torch.randint(0, teacher.arch.vocab_size, (2, 16))
    y = torch.randint(0, teacher.arch.vocab_size, (2, 16))

    def gradient_norm(ce_share: float) -> float:
        student = copy.deepcopy(teacher).train()
        out = student(x, hidden=True)
        with torch.no_grad():
            taught = teacher(x, hidden=True)
        assert torch.equal(out.logits, taught.logits)
        match = list(range(len(teacher.arch.blocks)))
        kl, cos = distillation_loss(out.logits, taught.logits), cosine_loss(out.hidden, taught.hidden, match)
        assert kl.item() == 0.0 and abs(cos.item()) < 1e-6
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        ((1 - ce_share) * kl + ce_share * ce + cos).backward()
        return float(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]).norm())

    assert gradient_norm(0.0) < 1e-5 < 1e-2 < gradient_norm(0.5)
    assert not teaches_the_baseline("baseline", 1.0)
    assert teaches_the_baseline("baseline", 0.5) and teaches_the_baseline("continued", 1.0)
