import numpy as np
import pytest
import torch

from planer.data import Segments, load_corpus, read_spans, unread_windows
from planer.data.corpus import DataError, split_bytes


def test_enwik8_split_is_90_5_5():
    train, valid, test = split_bytes(np.zeros(100_000_000, dtype=np.uint8))
    assert (len(train), len(valid), len(test)) == (90_000_000, 5_000_000, 5_000_000)


def test_sample_corpus():
    corpus = load_corpus("sample")
    assert corpus.unit == "byte" and corpus.vocab_size == 256
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (5_480_771, 304_487, 304_488)
    assert bytes(corpus.train[:5]) == b"<medi"  # the XML dump, in enwik8's format


@pytest.mark.parametrize("kind", ["enwik8", "text"])
def test_byte_file_round_trip(text_file, kind):
    corpus = load_corpus(f"{kind}:{text_file}")
    raw = text_file.read_bytes()
    assert bytes(np.concatenate([corpus.train, corpus.valid, corpus.test])) == raw
    assert len(corpus.valid) == len(raw) * 95 // 100 - len(raw) * 90 // 100


def test_wikitext_vocab_unk_and_eos(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text(" = A = \n the cat sat \n the dog the \n")
    (tmp_path / "wiki.valid.tokens").write_text(" the bird sat \n")
    (tmp_path / "wiki.test.tokens").write_text(" <unk> cat \n")
    corpus = load_corpus(f"wikitext103:{tmp_path}")
    assert corpus.unit == "word"
    assert corpus.vocab[:3] == ["<unk>", "<eos>", "the"]  # specials first, then by frequency
    words = [corpus.vocab[i] for i in corpus.valid]
    assert words == ["the", "<unk>", "sat", "<eos>"]  # 'bird' is not in train
    assert [corpus.vocab[i] for i in corpus.test] == ["<unk>", "cat", "<eos>"]
    assert corpus.train.tolist().count(corpus.vocab.index("<eos>")) == 3


@pytest.mark.parametrize("spec, message", [
    ("enwik9", "unknown data spec"),
    ("parquet:/x", "unknown data format 'parquet'"),
    ("enwik8:/nonexistent/enwik8", "no such file"),
    ("text:/nonexistent/notes.txt", "text:PATH needs"),
    ("wikitext103:/nonexistent", "no such directory"),
])
def test_bad_specs(spec, message):
    with pytest.raises(DataError, match=message):
        load_corpus(spec)


def test_compressed_and_tiny_files_are_refused(tmp_path):
    zipped = tmp_path / "enwik8.zip"
    zipped.write_bytes(b"PK\x03\x04" + bytes(5000))
    with pytest.raises(DataError, match="compressed archive"):
        load_corpus(f"enwik8:{zipped}")
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"abc")
    with pytest.raises(DataError, match="only 3 bytes"):
        load_corpus(f"enwik8:{tiny}")
    (tmp_path / "wiki.train.tokens").write_text("a\n")
    with pytest.raises(DataError, match="missing wiki.valid.tokens, wiki.test.tokens"):
        load_corpus(f"wikitext103:{tmp_path}")


def test_segments_are_ordered_streams():
    data = np.arange(103)
    seg = Segments(data, batch=4, tgt_len=5)  # 4 streams of 25 tokens, 24 targets each
    assert len(seg) == 5 and seg.tokens == 96
    x0, y0 = seg[0]
    x1, _ = seg[1]
    assert x0[:, 0].tolist() == [0, 25, 50, 75]
    torch.testing.assert_close(y0, x0 + 1)
    assert x1[0, 0].item() == x0[0, -1].item() + 1  # segment i+1 continues segment i in every stream
    xs = [x for x, _ in seg]
    assert xs[-1].shape == (4, 4)  # the last segment is shorter
    assert torch.cat(xs, 1)[1].tolist() == list(range(25, 49))


@pytest.mark.parametrize("steps", [0, 1, 3, 4, 5, 9])
def test_read_spans_are_the_positions_training_reads(steps):
    """What a training run of `steps` steps reads, as the trainer reads it (segment step % len, passes repeating),
    against the spans computed without reading."""
    data = np.arange(103)
    seg = Segments(data, batch=4, tgt_len=7)  # 4 streams of 25: 4 segments per pass, the last of 3
    read = set()
    for step in range(steps):
        x, y = seg[step % len(seg)]
        read |= set(x.flatten().tolist()) | set(y.flatten().tolist())
    assert read == {p for span in read_spans(len(data), 4, 7, steps) for p in span}


@pytest.mark.parametrize("seed", range(20))
def test_unread_windows_are_unread_and_spread(seed):
    """Against brute force on a mask: the candidates are each unread stretch cut into windows from its start, and
    the windows chosen are the middle candidates of `count` equal slices of them (all where fewer fit)."""
    rng = np.random.default_rng(seed)
    tokens, window, count = int(rng.integers(50, 400)), int(rng.integers(1, 9)), int(rng.integers(1, 12))
    read = [range(a, min(tokens, a + int(rng.integers(0, 40)))) for a in rng.integers(0, tokens, rng.integers(0, 8))]
    touched = np.zeros(tokens + 1, bool)  # a sentinel at the end closes the last stretch
    touched[tokens] = True
    for r in read:
        touched[r.start:r.stop] = True
    candidates, start = [], None
    for i, t in enumerate(touched):
        if not t and start is None:
            start = i
        elif t and start is not None:
            candidates += [range(s, s + window) for s in range(start, i - window + 1, window)]
            start = None
    want = (candidates if len(candidates) <= count else
            [candidates[(2 * i + 1) * len(candidates) // (2 * count)] for i in range(count)])
    windows = unread_windows(tokens, read, window, count)
    assert windows == want
    assert all(not touched[w.start:w.stop].any() for w in windows)
