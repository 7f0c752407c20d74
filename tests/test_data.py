"""Tests for compress.data: shipped SST-2 sample, GLUE tsv parsing, load_task, tokenisation, calibration.

The GLUE tests run on tests/fixtures/glue (a few invented rows per task in GLUE's file layout), so a clean clone
runs them; two optional ``slow`` tests check the real files in ../shared/data when they are present.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import random
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from compress.data import (
    SUPPORTED_TASKS,
    calibration_batches,
    load_task,
    read_glue_tsv,
    shipped_sample_path,
    tokenize_dataset,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "glue"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GLUE = SHARED_DATA / "glue"

# Rows and label counts (label 0, label 1) of the fixture files (tests/fixtures/glue/README.md); None: unlabelled.
FIXTURE_EXPECTED = {
    ("SST-2", "train"): (6, 3, 3),
    ("SST-2", "dev"): (4, 2, 2),
    ("SST-2", "test"): (3, None, None),
    ("CoLA", "train"): (5, 2, 3),
    ("CoLA", "dev"): (4, 2, 2),
    ("CoLA", "test"): (2, None, None),
    ("MRPC", "train"): (4, 1, 3),
    ("MRPC", "dev"): (3, 1, 2),
    ("MRPC", "test"): (2, None, None),
    ("RTE", "train"): (4, 2, 2),  # entailment -> 0, not_entailment -> 1
    ("RTE", "dev"): (3, 2, 1),
    ("RTE", "test"): (2, None, None),
}
# Row counts and label counts (label 0, label 1) from ../shared/data/glue/SOURCES.md.
GLUE_EXPECTED = {
    ("SST-2", "train"): (67_349, 29_780, 37_569),
    ("SST-2", "dev"): (872, 428, 444),
    ("CoLA", "train"): (8_551, 2_528, 6_023),
    ("CoLA", "dev"): (1_043, 322, 721),
    ("MRPC", "train"): (3_668, 1_194, 2_474),
    ("MRPC", "dev"): (408, 129, 279),
    ("RTE", "train"): (2_490, 1_249, 1_241),
    ("RTE", "dev"): (277, 146, 131),
}
PAIR_TASKS = {"MRPC", "RTE"}
CLASS_NAMES = {
    "SST-2": ["negative", "positive"],
    "CoLA": ["unacceptable", "acceptable"],
    "MRPC": ["not_equivalent", "equivalent"],
    "RTE": ["entailment", "not_entailment"],
}


def _read_tsv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _check_glue(ds: Dataset, task: str, expected: tuple[int, int | None, int | None]) -> None:
    rows, zeros, ones = expected
    assert len(ds) == rows
    labels = ds["label"][:]
    assert all(isinstance(label, int) for label in labels)
    assert collections.Counter(labels) == ({-1: rows} if zeros is None else {0: zeros, 1: ones})
    assert ds.features["label"] == ClassLabel(names=CLASS_NAMES[task])  # int2str gives the task's class names
    columns = ["text", "text_pair", "label"] if task in PAIR_TASKS else ["text", "label"]
    assert ds.column_names == columns
    for column in columns[:-1]:
        texts = ds[column][:]
        assert all(texts), f"every row has a non-empty {column}"
        assert all(text == text.strip() and "\ufeff" not in text for text in texts)


# ------------------------------------------------------------------------------------------------------
# Shipped sample
# ------------------------------------------------------------------------------------------------------


def test_shipped_sample_files_exist_and_are_small():
    train, test = shipped_sample_path("train"), shipped_sample_path("test")
    assert train.is_file() and test.is_file()
    assert train.stat().st_size + test.stat().st_size < 400_000


def test_shipped_train_sample_is_balanced_and_filtered():
    rows = _read_tsv(shipped_sample_path("train"))
    assert rows[0] == ["sentence", "label"]
    body = rows[1:]
    assert len(body) == 2000
    assert all(len(row) == 2 for row in body)
    assert collections.Counter(label for _, label in body) == {"0": 1000, "1": 1000}
    assert all(len(sentence.split()) >= 4 for sentence, _ in body)
    assert len({sentence for sentence, _ in body}) == 2000


def test_shipped_test_sample_is_glue_sst2_dev():
    rows = _read_tsv(shipped_sample_path("test"))
    assert rows[0] == ["sentence", "label"]
    assert len(rows) - 1 == 872
    assert collections.Counter(label for _, label in rows[1:]) == {"0": 428, "1": 444}


def test_load_shipped_sample():
    train = load_task("sst2-sample", "train")
    test = load_task("sst2-sample", "test")
    assert (len(train), len(test)) == (2000, 872)
    assert train.column_names == ["text", "label"]
    assert set(train["label"][:]) == {0, 1}
    assert collections.Counter(test["label"][:]) == {0: 428, 1: 444}
    assert not any(text != text.strip() for text in train["text"][:])
    with pytest.raises(ValueError, match="'train' and 'test'"):
        load_task("sst2-sample", "validation")
    with pytest.raises(ValueError, match="'train' and 'test'"):
        shipped_sample_path("dev")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------
# GLUE tsv parsing (fixture)
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "split"), sorted(FIXTURE_EXPECTED))
def test_glue_fixture_parses(task, split):
    ds = read_glue_tsv(FIXTURE / task / f"{split}.tsv")  # task inferred from the folder name
    _check_glue(ds, task, FIXTURE_EXPECTED[(task, split)])


def test_glue_specifics():
    mrpc = read_glue_tsv(FIXTURE / "MRPC" / "dev.tsv", task="MRPC")
    assert mrpc[0]["text"] == "He said the bakery business does n't fit the plan ."  # BOM header, no BOM text
    assert mrpc[0]["text_pair"] == '" The bakery business does not fit our plan .'  # unbalanced quote kept
    assert len(mrpc) == 3  # the open quote did not swallow the following rows
    cola = read_glue_tsv(FIXTURE / "CoLA" / "train.tsv")  # header-less: the first row is data
    assert cola[0] == {"text": "The cat chased the mouse across the yard.", "label": 1}
    assert cola[2]["text"] == 'She said "hello" and left.'
    assert read_glue_tsv(FIXTURE / "CoLA" / "dev.tsv")[-1]["text"].endswith("knows it.")  # no final newline
    sst2 = read_glue_tsv(FIXTURE / "SST-2" / "train.tsv")
    assert sst2[2] == {"text": 'he says " trust me , and the movie never earns it', "label": 0}
    assert read_glue_tsv(FIXTURE / "SST-2" / "test.tsv")[2]["text"] == "null"  # not a missing value
    rte = load_task(FIXTURE / "RTE", "validation")  # validation -> dev.tsv
    assert rte["label"][:] == [1, 0, 0]  # not_entailment, entailment, entailment
    assert rte.features["label"].int2str(1) == "not_entailment"
    assert load_task(FIXTURE / "RTE", "test")["label"][:] == [-1, -1]
    # Explicit task that does not match the file's header.
    with pytest.raises(ValueError, match="lacks column"):
        read_glue_tsv(FIXTURE / "SST-2" / "dev.tsv", task="rte")


def test_split_folder_aliases(tmp_path):
    assert len(load_task(FIXTURE / "SST-2", "validation")) == 4
    assert len(load_task(FIXTURE / "SST-2", "val")) == 4
    assert load_task(str(FIXTURE / "SST-2"), "test")["label"][:] == [-1, -1, -1]
    folder = tmp_path / "RTE"
    folder.mkdir()
    shutil.copy(FIXTURE / "RTE" / "train.tsv", folder / "train.tsv")
    shutil.copy(FIXTURE / "RTE" / "dev.tsv", folder / "dev.tsv")
    with pytest.raises(FileNotFoundError, match="no file for split 'test'.*split='dev'"):
        load_task(folder, "test")


@pytest.mark.slow
@pytest.mark.skipif(not GLUE.is_dir(), reason=f"optional real GLUE data not present at {GLUE}")
@pytest.mark.parametrize(("task", "split"), sorted(GLUE_EXPECTED))
def test_real_glue_files_match_their_sources(task, split):
    """The real GLUE files parse to the row and label counts SOURCES.md lists (and GLUE publishes)."""
    rows, zeros, ones = GLUE_EXPECTED[(task, split)]
    _check_glue(read_glue_tsv(GLUE / task / f"{split}.tsv"), task, (rows, zeros, ones))


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason=f"optional data not present at {SHARED_DATA}")
def test_shipped_sample_matches_documented_procedure():
    """Re-run the procedure in compress/_data/README.md on the real SST-2 files and compare bytes."""
    assert shipped_sample_path("test").read_bytes() == (SHARED_DATA / "sst2" / "test.tsv").read_bytes()
    rows = _read_tsv(SHARED_DATA / "sst2" / "train.tsv")
    assert rows[0] == ["sentence", "label"]
    seen: set[str] = set()
    pools: dict[str, list[tuple[str, str]]] = {"0": [], "1": []}
    for sentence, label in rows[1:]:
        if len(sentence.split()) >= 4 and sentence not in seen:
            seen.add(sentence)
            pools[label].append((sentence, label))
    rng = random.Random(0)
    picked = rng.sample(pools["0"], 1000) + rng.sample(pools["1"], 1000)
    rng.shuffle(picked)
    expected = "sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in picked)
    assert shipped_sample_path("train").read_text(encoding="utf-8") == expected


# ------------------------------------------------------------------------------------------------------
# GLUE tsv parsing (files written by the tests)
# ------------------------------------------------------------------------------------------------------


def test_unbalanced_quote_read_intact(tmp_path):
    tsv = _write(
        tmp_path / "SST-2" / "train.tsv",
        'sentence\tlabel\nhe said " this is fine \t1\nsecond row , no quote \t0\n" starts with a quote\t1\n',
    )
    ds = read_glue_tsv(tsv)
    assert len(ds) == 3
    assert ds[0] == {"text": 'he said " this is fine', "label": 1}
    assert ds[1] == {"text": "second row , no quote", "label": 0}
    assert ds[2]["text"] == '" starts with a quote'


def test_rte_string_labels_and_pairs(tmp_path):
    tsv = _write(
        tmp_path / "x" / "rte.tsv",
        'index\tsentence1\tsentence2\tlabel\n0\tA "quoted\tB.\tentailment\n1\tC.\tD.\tnot_entailment\n',
    )
    ds = read_glue_tsv(tsv, task="rte")
    assert ds["label"][:] == [0, 1]
    assert ds[0]["text"] == 'A "quoted' and ds[0]["text_pair"] == "B."
    # Same file, task inferred from the header.
    assert read_glue_tsv(tsv)["label"][:] == [0, 1]


def test_headerless_cola_and_unlabelled_test(tmp_path):
    cola = _write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tGood one.\ngj04\t0\t*\tBad one bad.")
    assert read_glue_tsv(cola)["label"][:] == [1, 0]
    unlabelled = _write(tmp_path / "SST-2" / "test.tsv", "index\tsentence\n0\tno label here \n")
    assert read_glue_tsv(unlabelled)[0] == {"text": "no label here", "label": -1}


def test_read_glue_tsv_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_glue_tsv(tmp_path / "missing.tsv")
    odd = _write(tmp_path / "mystery" / "train.tsv", "foo\tbar\n1\t2\n")
    with pytest.raises(ValueError, match="supported tasks: sst2") as info:
        read_glue_tsv(odd)
    assert all(task in str(info.value) for task in SUPPORTED_TASKS)
    with pytest.raises(ValueError, match="unsupported GLUE task 'qqp'.*rte"):
        read_glue_tsv(odd, task="qqp")
    bad_label = _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\nfine\t1\n\nbad\t7\n")
    with pytest.raises(ValueError, match=r"train.tsv:4: label 7 is outside 0..1"):  # line 4: blank lines count
        read_glue_tsv(bad_label)
    bad_rte = _write(
        tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tcontradiction\n"
    )
    with pytest.raises(ValueError, match=r"dev.tsv:2: label 'contradiction' is not one of \['entailment'"):
        read_glue_tsv(bad_rte)
    extra_field = _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\na\tb\t1\n")
    with pytest.raises(ValueError, match="dev.tsv:2: expected 2 tab-separated fields.*got 3"):
        read_glue_tsv(extra_field)
    short_row = _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\na\t1\nno label\n")
    with pytest.raises(ValueError, match="dev.tsv:3: expected 2 tab-separated fields.*got 1: fewer fields"):
        read_glue_tsv(short_row)
    header_only = _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\n")
    with pytest.raises(ValueError, match="has a header but no data rows"):
        read_glue_tsv(header_only)


# ------------------------------------------------------------------------------------------------------
# load_task on generic files and saved datasets
# ------------------------------------------------------------------------------------------------------


def test_load_task_folder_and_single_files(tmp_path):
    folder = tmp_path / "my_task"
    _write(folder / "train.tsv", "sentence\tlabel\nit 's \" good \t1\nbad \t0\n")
    _write(folder / "validation.tsv", "sentence\tlabel\nok \t1\n")
    assert len(load_task(folder, "train")) == 2
    assert load_task(str(folder), "dev")[0] == {"text": "ok", "label": 1}  # dev -> validation.tsv

    csv_file = _write(tmp_path / "data.csv", 'text,label\n"hello, world",positive\nbye,negative\n')
    ds = load_task(csv_file, "train")
    assert ds[0] == {"text": "hello, world", "label": 1} and ds[1]["label"] == 0
    assert ds.features["label"].names == ["negative", "positive"]

    jsonl = _write(
        tmp_path / "pairs.jsonl",
        json.dumps({"sentence1": "a", "sentence2": "b", "label": 1})
        + "\n\n"
        + json.dumps({"sentence1": "c", "sentence2": "d", "label": 0})
        + "\n",
    )
    ds = load_task(jsonl, "train")
    assert ds.column_names == ["text", "text_pair", "label"] and ds["label"][:] == [1, 0]

    generic_tsv = _write(tmp_path / "plain.tsv", 'text\tlabel\nsay "hi\t3\n')
    assert load_task(generic_tsv, "train")[0] == {"text": 'say "hi', "label": 3}


def test_text_that_looks_missing_or_numeric_stays_text(tmp_path):
    """pandas (under load_dataset) reads "NA", "null" and "" as missing and "007" as 7 unless told not to."""
    csv_file = _write(tmp_path / "odd.csv", 'text,label\nNA,1\nnull,0\n007,1\n"",0\n')
    assert load_task(csv_file, "train")["text"][:] == ["NA", "null", "007", ""]
    tsv_file = _write(tmp_path / "odd.tsv", "text\tlabel\nN/A\t1\n1.50\t0\n")
    assert load_task(tsv_file, "train")["text"][:] == ["N/A", "1.50"]


def test_reading_leaves_no_files_and_sees_every_edit(tmp_path, monkeypatch):
    """Nothing appears next to the user's file or in the datasets cache, and an edited file is re-read even when
    its mtime is unchanged (datasets' own cache keys local files on path + mtime only)."""
    hub_cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hub_cache)
    folder = tmp_path / "mine"
    data = _write(folder / "data.csv", "text,label\nold row,0\n")
    assert load_task(data, "train")["text"][:] == ["old row"]
    before = os.stat(data)
    data.write_text("text,label\nnew row,1\n", encoding="utf-8")
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))  # as cp -p / rsync -t / tar leave it
    assert load_task(data, "train")[:] == {"text": ["new row"], "label": [1]}
    _write(folder / "more.jsonl", '{"text": "a", "label": 1}\n')
    load_task(folder / "more.jsonl", "train")
    _write(folder / "SST-2" / "train.tsv", "sentence\tlabel\na \t1\n")
    load_task(folder / "SST-2", "train")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "SST-2", "SST-2/train.tsv", "data.csv", "more.jsonl"
    ]
    assert not hub_cache.exists()


def test_saved_dataset_folder_is_left_untouched(tmp_path, tokenizer):
    """Tokenising a save_to_disk dataset must not write cache-*.arrow files into the user's folder."""
    saved = tmp_path / "saved"
    Dataset.from_dict({"sentence": ["the movie is good", "bad"], "label": ["positive", "negative"]}).save_to_disk(
        str(saved)
    )
    before = sorted(p.name for p in saved.rglob("*"))
    ds = load_task(saved, "train")
    assert ds[:] == {"text": ["the movie is good", "bad"], "label": [1, 0]}
    assert len(tokenize_dataset(ds, tokenizer)) == 2
    assert sorted(p.name for p in saved.rglob("*")) == before


def test_load_task_saved_datasets(tmp_path):
    dd = DatasetDict(
        {
            "train": Dataset.from_dict({"sentence": ["a b", "c d"], "label": [0, 1]}),
            "validation": Dataset.from_dict({"sentence": ["e f"], "label": [1]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    train = load_task(tmp_path / "dd", "train")
    assert train.column_names == ["text", "label"] and len(train) == 2
    assert len(load_task(tmp_path / "dd", "dev")) == 1
    with pytest.raises(ValueError, match=r"available splits: \['train', 'validation'\]"):
        load_task(tmp_path / "dd", "test")

    Dataset.from_dict({"text": ["x"], "label": ["1"]}).save_to_disk(str(tmp_path / "single"))
    single = load_task(tmp_path / "single", "train")
    assert single[0] == {"text": "x", "label": 1}
    Dataset.from_dict({"text": ["x", "y"], "label": ["1", "maybe"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"bad row 2: label 'maybe' is neither an integer"):
        load_task(tmp_path / "bad", "train")


def test_load_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sst2-sample"):
        load_task(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="sst2-sample"):
        load_task("sst3-sample", "train")
    parquet = _write(tmp_path / "data.parquet", "x")
    with pytest.raises(ValueError, match=r"unsupported file type '.parquet'.*\.tsv/\.csv/\.jsonl"):
        load_task(parquet, "train")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="no file for split 'train'"):
        load_task(empty_dir, "train")
    no_text = _write(tmp_path / "cols.csv", "foo,label\n1,0\n")
    with pytest.raises(ValueError, match="no text column"):
        load_task(no_text, "train")
    bad_label = _write(tmp_path / "lab.jsonl", json.dumps({"text": "a", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match="lab.jsonl:1: label 'maybe' is neither an integer"):
        load_task(bad_label, "train")


# Each bad file gets one error naming the file, the line where it is known, and the problem.
BAD_FILES = {
    "csv-unterminated-quote": (
        "q.csv", b'sentence,label\nfine,1\n"the movie,1\ngood,0\n',
        r"q.csv:3: expected 2 comma-separated fields .*got 1: fewer fields than header columns, because the "
        r"quote opened on line 3 runs on to line 4",
    ),
    "csv-unterminated-quote-last-column": (  # the right number of fields: the rest of the file as one row
        "l.csv", b'label,sentence\n0,fine\n1,"the movie\n0,good\n1,bad\n',
        r"l.csv:3: unbalanced quote: a \" in the row that starts on line 3 is never closed, so lines 3-5 \(the rest "
        r"of the file\) would be read as one row; close the quote, .* or save the file as .tsv \(read with quoting "
        r"disabled",
    ),
    "csv-unterminated-quote-last-row": ("r.csv", b'sentence,label\nfine,1\ngood,"0\n', r"r.csv:3: unbalanced quote"),
    "csv-unterminated-quote-in-header": ("k.csv", b'sentence,"label\nfine,1\n', r"k.csv:1: unbalanced quote"),
    "csv-extra-field": ("e.csv", b"text,label\nok,1\nhello, world,1\n", r"e.csv:3: .*got 3: more fields"),
    "csv-duplicate-column": ("d.csv", b"text,text\na,b\n", r"d.csv: the header names column\(s\) \['text'\] more"),
    "csv-header-only": ("h.csv", b"text,label\n", r"h.csv has no data rows"),
    "csv-empty": ("z.csv", b"", r"z.csv is empty"),
    "csv-name-sets-mixed": (
        "n.csv", b"text,label\na,positive\nb,entailment\n",
        r"n.csv:3: label 'entailment' is not one of the class names \['negative', 'positive'\]",
    ),
    "tsv-not-utf8": ("u.tsv", b"sentence\tlabel\nok\t1\ngood \xff\xfe film\t1\n", r"u.tsv is not UTF-8 text: line 3"),
    "jsonl-not-utf8": ("u.jsonl", b'{"text": "ok", "label": 1}\n{"text": "b\xffd", "label": 0}\n',
                       r"u.jsonl is not UTF-8 text: line 2"),
    "jsonl-mixed-types": (
        "m.jsonl", b'{"text": "good", "label": 1}\n{"text": "bad", "label": "x"}',
        r"m.jsonl: a column mixes value types: 'label' is 1 \(int\) on line 1 but 'x' \(str\) on line 2",
    ),
    "jsonl-mixed-types-blank-line": (  # datasets' own mixed-type handling fails on blank lines
        "b.jsonl", b'{"text": "good", "label": 1}\n\n{"text": "bad", "label": "x"}\n',
        r"b.jsonl: a column mixes value types: 'label' is 1 \(int\) on line 1 but 'x' \(str\) on line 3",
    ),
    "jsonl-invalid-line": ("i.jsonl", b'{"text": "a", "label": 1}\n\n{"text": "b", label: 0}\n',
                           r"i.jsonl:3: invalid JSON"),
    "jsonl-numbers-as-text": ("t.jsonl", b'{"text": 5, "label": 1}\n', r"t.jsonl: column 'text' holds int64 values"),
    "jsonl-empty": ("y.jsonl", b"\n\n", r"y.jsonl has no data rows"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_get_one_clear_error(tmp_path, name):
    filename, content, message = BAD_FILES[name]
    with pytest.raises(ValueError, match=message) as info:
        load_task(_write(tmp_path / filename, content), "train")
    assert "\n" not in str(info.value)


def test_closed_quotes_in_a_csv_may_span_lines(tmp_path):
    """Only a quote left open at the end of the file is refused: a quoted field may hold newlines and commas."""
    csv_file = _write(tmp_path / "ok.csv", 'label,text\n1,"two\nlines, one field"\n0,"a ""quoted"" word"\n')
    assert load_task(csv_file, "train")["text"][:] == ["two\nlines, one field", 'a "quoted" word']


def test_fractional_labels_are_kept_for_the_caller_to_judge(tmp_path):
    """Float labels (regression targets, or a mistake) pass through; the CLI rejects them for a classifier."""
    jsonl = _write(tmp_path / "f.jsonl", '{"text": "good", "label": 1.5}\n{"text": "bad", "label": 0}\n')
    assert load_task(jsonl, "train")["label"][:] == [1.5, 0.0]


# ------------------------------------------------------------------------------------------------------
# Tokenisation and calibration batches
# ------------------------------------------------------------------------------------------------------

WORDS = "the a movie film is good bad great awful not very fun boring it was and".split()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # BERT-like
    )


@pytest.fixture
def small_ds() -> Dataset:
    return Dataset.from_dict(
        {
            "text": [
                "the movie is good",
                "bad",
                "a very very boring film",
                "it was fun",
                "not great",
                "awful",
            ],
            "label": [1, 0, 0, 1, 0, 0],
        }
    )


def test_tokenize_single(tokenizer, small_ds):
    tok = tokenize_dataset(small_ds, tokenizer, max_length=5)
    assert set(tok.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert tok[0]["input_ids"] == [2, 4, 6, 8, 3]  # [CLS] the movie is [SEP] (truncated to 5)
    assert tok[1]["input_ids"] == [2, 10, 3]
    assert list(tok["labels"]) == [1, 0, 0, 1, 0, 0]
    assert max(len(ids) for ids in tok["input_ids"]) == 5


def test_tokenize_pairs_and_unknown_words(tokenizer):
    ds = Dataset.from_dict({"text": ["the film"], "text_pair": ["zebra good"], "label": [1]})
    row = tokenize_dataset(ds, tokenizer)[0]
    assert row["input_ids"] == [2, 4, 7, 3, 1, 9, 3]
    assert row["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert row["attention_mask"] == [1] * 7


def test_tokenize_without_token_type_ids(tokenizer):
    plain = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        pad_token="[PAD]",
        model_input_names=["input_ids", "attention_mask"],
    )
    ds = Dataset.from_dict({"text": ["the film"], "text_pair": ["good"], "label": [1]})
    assert tokenize_dataset(ds, plain).column_names == ["input_ids", "attention_mask", "labels"]


def test_tokenize_errors(tokenizer):
    with pytest.raises(ValueError, match="no 'text' column"):
        tokenize_dataset(Dataset.from_dict({"sentence": ["a"]}), tokenizer)
    with pytest.raises(ValueError, match="max_length must be positive"):
        tokenize_dataset(Dataset.from_dict({"text": ["a"]}), tokenizer, max_length=0)


def test_tokenize_shipped_sample(tokenizer):
    tok = tokenize_dataset(load_task("sst2-sample", "test"), tokenizer, max_length=16)
    assert len(tok) == 872 and max(len(ids) for ids in tok["input_ids"]) <= 16


def test_calibration_from_dataset_with_tokenizer(tokenizer, small_ds):
    tok = tokenize_dataset(small_ds, tokenizer)
    batches = calibration_batches(tok, batch_size=4, num_batches=8, tokenizer=tokenizer)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]  # only 6 rows
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert all(isinstance(v, torch.Tensor) for v in batch.values())
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape
        assert torch.all(ids[mask == 0] == tokenizer.pad_token_id)
    all_labels = sorted(torch.cat([b["labels"] for b in batches]).tolist())
    assert all_labels == sorted(small_ds["label"][:])  # every row once
    no_labels = calibration_batches(
        tok, batch_size=2, num_batches=1, tokenizer=tokenizer, include_labels=False
    )
    assert "labels" not in no_labels[0]


def test_calibration_rows_are_random_but_seeded(tokenizer):
    texts = [" ".join(WORDS[i : i + 1 + i % 3]) for i in range(12)]
    tok = tokenize_dataset(Dataset.from_dict({"text": texts, "label": list(range(12))}), tokenizer)

    def rows(**kwargs):
        batches = calibration_batches(tok, batch_size=4, tokenizer=tokenizer, **kwargs)
        return [b["labels"].tolist() for b in batches]

    assert rows(num_batches=2) == rows(num_batches=2)  # same seed, same rows in the same batches
    assert rows(num_batches=2) != rows(num_batches=2, seed=1)
    assert rows(num_batches=2, seed=None) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # seed=None: first rows in order
    assert rows(num_batches=2) == rows(num_batches=3)[:2]  # more batches extend the same draw
    assert sorted(sum(rows(num_batches=3), [])) == list(range(12))  # without replacement


def test_calibration_dataset_equal_lengths_and_collate(tokenizer, small_ds):
    text_only = small_ds.remove_columns("label")
    padded = text_only.map(lambda b: tokenizer(b["text"], padding="max_length", max_length=8), batched=True)
    batches = calibration_batches(padded, batch_size=3, num_batches=2)  # raw "text" column dropped
    assert [tuple(b["input_ids"].shape) for b in batches] == [(3, 8), (3, 8)]
    assert "text" not in batches[0]

    ragged = tokenize_dataset(small_ds, tokenizer)
    with pytest.raises(ValueError, match="different lengths.*tokenizer="):
        calibration_batches(ragged, batch_size=6, num_batches=1)

    def first_token_only(features):
        return {"input_ids": [[f["input_ids"][0]] for f in features]}

    custom = calibration_batches(ragged, batch_size=6, num_batches=1, collate=first_token_only)
    assert custom[0]["input_ids"].tolist() == [[2]] * 6


def test_calibration_from_iterables():
    data = [
        {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": [[1] * 5] * 2} for _ in range(5)
    ]
    batches = calibration_batches(data, num_batches=3)
    assert len(batches) == 3
    assert batches[0]["attention_mask"].dtype == torch.long and batches[0]["attention_mask"].shape == (2, 5)

    consumed = []

    def generate():
        for i in range(100):
            consumed.append(i)
            yield {"input_ids": torch.full((1, 3), i)}

    out = calibration_batches(generate(), num_batches=2)
    assert [b["input_ids"][0, 0].item() for b in out] == [0, 1]
    assert consumed == [0, 1]  # does not read past num_batches

    loader = torch.utils.data.DataLoader([{"input_ids": torch.arange(4)} for _ in range(6)], batch_size=3)
    assert [b["input_ids"].shape for b in calibration_batches(loader)] == [(3, 4), (3, 4)]


def test_calibration_errors(tokenizer):
    with pytest.raises(ValueError, match="calibration data is empty"):
        calibration_batches([])
    with pytest.raises(ValueError, match="calibration dataset is empty"):
        calibration_batches(Dataset.from_dict({"input_ids": []}))
    with pytest.raises(ValueError, match="no 'input_ids' column.*tokenize_dataset"):
        calibration_batches(Dataset.from_dict({"text": ["a"], "label": [0]}))
    with pytest.raises(TypeError, match="not a dict of model inputs"):
        calibration_batches([torch.ones(2, 3)])
    with pytest.raises(TypeError, match="got str"):
        calibration_batches("input_ids")
    with pytest.raises(TypeError, match="DatasetDict"):
        calibration_batches(DatasetDict({"train": Dataset.from_dict({"input_ids": [[1]]})}))
    with pytest.raises(ValueError, match="must be positive"):
        calibration_batches([{"input_ids": torch.ones(1, 1)}], num_batches=0)
    with pytest.raises(ValueError, match="empty dict"):
        calibration_batches([{}])
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="no pad token"):
        calibration_batches(Dataset.from_dict({"input_ids": [[1, 2], [3]]}), tokenizer=no_pad)
