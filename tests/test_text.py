"""Text for language models (compress.data.text): reading files, saved and Hub datasets into one string with how it
was joined, and seeded calibration rows of tokens."""

from __future__ import annotations

import json
import logging
import random

import datasets
import pytest
import torch
from datasets import Dataset, DatasetDict

from compress.data import Corpus, calibration_rows, load_text, tokenize_text
from compress.errors import DataError
from compress.pruning.spec import InvalidOptionError

VOCAB_WORDS = 100  # tokens t0..t99 have ids 2..101


def word_tokenizer():
    """Whitespace words t0..t99 -> ids 2..101 (0 unknown, 1 padding), no special tokens: ids are easy to predict."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"t{i}": i + 2 for i in range(VOCAB_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def counting_text(n: int) -> str:
    """``n`` tokens t0 t1 ... (modulo the vocabulary), twelve to a line: token i has id 2 + i % 100."""
    words = [f"t{i % VOCAB_WORDS}" for i in range(n)]
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, n, 12)) + "\n"


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


# -- reading text ---------------------------------------------------------------------------------------------------
def test_a_text_file_is_read_whole_with_line_endings_normalised(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first line\r\nsecond line\n\nthird\n")
    corpus = load_text(path)
    assert corpus.text == "first line\nsecond line\n\nthird\n"
    assert corpus.source == str(path) and corpus.handling == "the whole file, line endings normalised to \\n"
    assert corpus.describe() == f"{path} (the whole file, line endings normalised to \\n)"
    assert corpus.to_dict() == {"source": str(path), "handling": corpus.handling}


def test_a_raw_wikitext_file_joins_its_lines_with_blank_lines(tmp_path):
    """WikiText-2's raw test file as shipped here: no blank lines, CRLF on heading lines. Joined with "\\n\\n" it is
    the Hub rows' "\\n\\n".join(test["text"]) recipe."""
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b" = Robert Boulter = \r\n Robert Boulter is an English film actor . \n = = Career = = \r\n")
    corpus = load_text(path)
    assert corpus.text == " = Robert Boulter = \n\n Robert Boulter is an English film actor . \n\n = = Career = = "
    assert corpus.handling == 'WikiText raw file: lines, line endings normalised to \\n, joined with "\\n\\n"'
    assert load_text(path, separator="\n").text.count("\n") == 2


def test_tables_give_one_column_joined(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in [{"id": 1, "text": "one"}, {"id": 2, "text": None},
                                                           {"id": 3, "text": "three"}]) + "\n", encoding="utf-8")
    corpus = load_text(jsonl)
    assert corpus.text == "one\n\nthree"
    assert corpus.handling == 'column \'text\', 2 rows joined with "\\n\\n"; 1 missing values skipped'
    csv_file = tmp_path / "reviews.csv"
    csv_file.write_text('label,body\n1,"good, very"\n0,bad\n', encoding="utf-8")
    assert load_text(csv_file, text_column="body", separator=" | ").text == "good, very | bad"
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\nfine film\t1\ndull\t0\n", encoding="utf-8")
    assert load_text(tsv).text == "fine film\n\ndull"  # a common alias of the text column


def test_saved_datasets_read_their_split(tmp_path):
    DatasetDict({"train": Dataset.from_dict({"content": ["a b", "c"]}),
                 "test": Dataset.from_dict({"content": ["held out"]})}).save_to_disk(tmp_path / "saved")
    assert load_text(tmp_path / "saved").text == "a b\n\nc"
    corpus = load_text(tmp_path / "saved", split="test")
    assert corpus.text == "held out" and corpus.source == f"{tmp_path / 'saved'} (split test)"
    with pytest.raises(DataError, match=r"split 'validation' not found in .*; available splits: \['test', 'train'\]"):
        load_text(tmp_path / "saved", split="validation")


def test_hub_datasets_go_through_load_dataset_and_name_the_fix_when_offline(monkeypatch):
    calls = []

    def fake_load_dataset(name, config_name, split):
        calls.append((name, config_name, split))
        if name == "wikitext":
            raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")
        return Dataset.from_dict({"text": [" = A = \n", "", " b . \n"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_text("someone/corpus", config_name="v1", split="test")
    # empty rows are kept: the usual "\n\n".join(test["text"])
    assert corpus.text == " = A = \n" + "\n\n" + "" + "\n\n" + " b . \n"
    assert corpus.source == "Hub dataset someone/corpus, v1, split test"
    with pytest.raises(DataError, match=r"cannot load the Hub dataset wikitext, wikitext-2-raw-v1, split test: the "
                                        r"Hub cannot be reached .*pass a local text file or save_to_disk folder "
                                        r"instead \(--data FILE"):
        load_text("wikitext", config_name="wikitext-2-raw-v1", split="test")
    assert calls == [("someone/corpus", "v1", "test"), ("wikitext", "wikitext-2-raw-v1", "test")]


@pytest.mark.parametrize("name,content,kwargs,match", [
    ("empty.txt", b"", {}, "holds no text"),
    ("blank.txt", b"\n \n", {}, "holds no text"),
    ("empty.raw", b"", {}, "holds no text"),
    ("model.txt", b"PK\x03\x04\x00\x00binary", {}, r"looks like a binary file \(it holds NUL bytes\)"),
    ("latin1.txt", "caf\u00e9\n".encode("latin-1"), {}, "is not UTF-8 text: line 1 has byte 0xe9"),
    ("rows.jsonl", b'{"body": "x"}\n', {}, "has no text column: looked for text, sentence"),
    ("rows.jsonl", b'{"text": "x"}\n', {"text_column": "body"}, r"has no column 'body' \(columns: text\)"),
    ("rows.jsonl", b'{"text": 3}\n', {}, "column 'text' holds int64 values, not text"),
    ("rows.csv", b"text\n", {}, "has a header row and no data rows"),
])
def test_bad_text_gets_one_clear_error(tmp_path, name, content, kwargs, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_text(path, **kwargs)


def test_missing_sources_are_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the Hub"))
    for missing in ("valid.tokens.txt", str(tmp_path / "nowhere"), "../text.raw"):
        with pytest.raises(DataError, match="does not exist; pass a text file"):
            load_text(missing)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="is a folder but not one written by datasets' save_to_disk"):
        load_text(tmp_path / "folder")


# -- calibration rows -------------------------------------------------------------------------------------------------
def test_calibration_rows_are_seeded_random_windows_of_the_token_stream(tokenizer):
    corpus = Corpus(counting_text(1000), "counting", "as is")
    ids = tokenize_text(corpus, tokenizer)
    assert ids.tolist() == [2 + i % VOCAB_WORDS for i in range(1000)]
    rows = calibration_rows(corpus, tokenizer, num_rows=6, length=32, seed=3)
    assert rows.shape == (6, 32) and rows.dtype == torch.long
    rng = random.Random(3)
    starts = [rng.randrange(1000 - 32) for _ in range(6)]
    assert torch.equal(rows, torch.stack([ids[s:s + 32] for s in starts]))
    assert torch.equal(calibration_rows(corpus, tokenizer, num_rows=6, length=32, seed=3), rows)
    assert not torch.equal(calibration_rows(corpus, tokenizer, num_rows=6, length=32, seed=4), rows)
    # a plain string works too, and more rows start with the same ones
    assert torch.equal(calibration_rows(corpus.text, tokenizer, num_rows=8, length=32, seed=3)[:6], rows)


def test_calibration_rows_need_one_row_of_text_and_warn_when_rows_overlap(tokenizer, caplog):
    with pytest.raises(DataError, match="short has 31 tokens, fewer than one calibration row of 32"):
        calibration_rows(Corpus(counting_text(31), "short", "as is"), tokenizer, num_rows=1, length=32)
    with caplog.at_level(logging.WARNING, logger="compress.data"):
        rows = calibration_rows(counting_text(32), tokenizer, num_rows=3, length=32)
    assert all(row.tolist() == list(range(2, 34)) for row in rows)  # the one possible row, three times
    assert "fewer than the 3 rows x 32 tokens hold: rows overlap" in caplog.text


@pytest.mark.parametrize("kwargs,match", [
    ({"num_rows": 0}, "num_rows=0: must be a positive integer"),
    ({"length": -1}, "length=-1: must be a positive integer"),
    ({"seed": -2}, "seed=-2: must be a non-negative integer"),
])
def test_calibration_rows_check_their_options(tokenizer, kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        calibration_rows(counting_text(100), tokenizer, **kwargs)
