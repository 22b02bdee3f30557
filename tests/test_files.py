"""Damaged files a run, build or server reads are one-line errors naming the file and what to do, never a
traceback: garbage bytes, JSON of another shape, a tokenizer the library cannot read."""

import json

import pytest

from planer.errors import PlanerError
from planer.files import read_json
from planer.search.search import SearchOutcome
from planer.serve.text import load_tokenizer
from planer.train.trainer import run_corpus


@pytest.mark.parametrize("content", [b"\x00\xffgarbage", b"{not json", b"[1, 2]", b'"text"'])
def test_read_json_refuses_garbage_and_other_shapes_with_the_remedy(tmp_path, content):
    path = tmp_path / "timings.json"
    path.write_bytes(content)
    with pytest.raises(PlanerError, match="timings.json: .*; delete it"):
        read_json(path, "delete it")
    path.write_text('{"profile": 1.5}')
    assert read_json(path, "delete it") == {"profile": 1.5}


@pytest.mark.parametrize("record", ["garbage", {"candidates": [{"round": 0, "held_out_loss": 1.0}], "chosen": 0},
                                    {"candidates": [], "chosen": 3, "target_ms": 1.0}])
def test_a_damaged_search_outcome_says_to_redo_the_search(tmp_path, record):
    (tmp_path / "outcome.json").write_text(record if isinstance(record, str) else json.dumps(record))
    with pytest.raises(PlanerError, match="outcome.json: .*delete .* run the same command again"):
        SearchOutcome.load(tmp_path)


def test_damaged_vocabularies_and_tokenizers_are_refused_in_one_line(tmp_path):
    (tmp_path / "vocab.json").write_bytes(b"\xff\xfe")
    with pytest.raises(PlanerError, match="vocab.json: unreadable or not JSON"):
        load_tokenizer(tmp_path, 300)
    (tmp_path / "vocab.json").unlink()
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(PlanerError, match="not a tokenizer the tokenizers library reads"):
        load_tokenizer(tmp_path, 300)
    (tmp_path / "tokenizer" / "tokenizer.json").unlink()
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer" / "tokenizer.json"))
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text("[]")
    with pytest.raises(PlanerError, match="tokenizer_config.json: not the dict planer writes there; import"):
        load_tokenizer(tmp_path, 2)


def test_a_run_whose_config_names_no_data_spec_says_to_pass_data(tmp_path):
    (tmp_path / "config.json").write_text('{"data": 5}')
    with pytest.raises(PlanerError, match="config.json: .*its data is 5, not a data spec.*pass --data"):
        run_corpus(tmp_path, None, 256)
