"""Corpora (enwik8-format bytes, WikiText-format words, the bundled sample) and segment streams."""

from planer.data.corpus import Corpus, DataError, TrainingSplit, load_corpus
from planer.data.stream import Segments, read_spans, unread_windows

__all__ = ["Corpus", "DataError", "Segments", "TrainingSplit", "load_corpus", "read_spans", "unread_windows"]
