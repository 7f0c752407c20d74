"""Tests for compress.data: shipped SST-2 sample, GLUE tsv parsing, load_task, tokenisation, calibration."""

from __future__ import annotations

import collections
import csv
import json
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
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

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GLUE = SHARED_DATA / "glue"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"shared GLUE data not present at {GLUE}")
needs_sst2 = pytest.mark.skipif(
    not (SHARED_DATA / "sst2").is_dir(), reason=f"shared SST-2 data not present at {SHARED_DATA / 'sst2'}"
)

# Row counts and label counts (label 0, label 1) from ../shared/data/glue/SOURCES.md.
GLUE_EXPECTED = {
    ("SST-2", "train"): (67_349, 29_780, 37_569),
    ("SST-2", "dev"): (872, 428, 444),
    ("CoLA", "train"): (8_551, 2_528, 6_023),
    ("CoLA", "dev"): (1_043, 322, 721),
    ("MRPC", "train"): (3_668, 1_194, 2_474),
    ("MRPC", "dev"): (408, 129, 279),
    ("RTE", "train"): (2_490, 1_249, 1_241),  # entailment -> 0, not_entailment -> 1
    ("RTE", "dev"): (277, 146, 131),
}
PAIR_TASKS = {"MRPC", "RTE"}


def _read_tsv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------
# Shipped sample
# ------------------------------------------------------------------------------------------------------


def test_shipped_sample_files_exist_and_are_small():
    train, test = shipped_sample_path("train"), shipped_sample_path("test")
    assert train.is_file() and test.is_file()
    assert train.stat().st_size + test.stat().st_size < 400_000
    assert (train.parent / "README.md").is_file()


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
    assert set(train["label"]) == {0, 1}
    assert all(isinstance(label, int) for label in test["label"])
    assert not any(text != text.strip() for text in train["text"])
    with pytest.raises(ValueError, match="'train' and 'test'"):
        load_task("sst2-sample", "validation")
    with pytest.raises(ValueError, match="'train' and 'test'"):
        shipped_sample_path("dev")  # type: ignore[arg-type]


@needs_sst2
def test_shipped_sample_matches_documented_procedure():
    """Re-run the procedure in compress/_data/README.md and compare bytes."""
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
# GLUE tsv parsing
# ------------------------------------------------------------------------------------------------------


@needs_glue
@pytest.mark.parametrize(("task", "split"), sorted(GLUE_EXPECTED))
def test_glue_task_parses(task, split):
    ds = read_glue_tsv(GLUE / task / f"{split}.tsv")  # task inferred from the folder name
    rows, zeros, ones = GLUE_EXPECTED[(task, split)]
    assert len(ds) == rows
    labels = list(ds["label"])
    assert all(isinstance(label, int) for label in labels)
    assert collections.Counter(labels) == {0: zeros, 1: ones}
    texts = list(ds["text"])
    assert all(texts), "every row has a non-empty text"
    if task in PAIR_TASKS:
        assert ds.column_names == ["text", "text_pair", "label"]
        assert all(list(ds["text_pair"]))
    else:
        assert ds.column_names == ["text", "label"]


@needs_glue
def test_glue_specifics():
    mrpc = read_glue_tsv(GLUE / "MRPC" / "dev.tsv", task="MRPC")
    assert mrpc[0]["text_pair"].startswith('" The foodservice pie business')  # unbalanced quote kept
    assert not mrpc[0]["text"].startswith("\ufeff")
    cola = read_glue_tsv(GLUE / "CoLA" / "train.tsv")
    first = "Our friends won't buy this analysis, let alone the next one we propose."
    assert cola[0] == {"text": first, "label": 1}
    rte = load_task(GLUE / "RTE", "validation")  # validation -> dev.tsv
    assert rte[0]["label"] == 1 and rte[1]["label"] == 0  # not_entailment, entailment
    with pytest.raises(FileNotFoundError, match="split='dev'"):
        load_task(GLUE / "RTE", "test")
    # Explicit task that does not match the file's header.
    with pytest.raises(ValueError, match="lacks column"):
        read_glue_tsv(GLUE / "SST-2" / "dev.tsv", task="rte")


@needs_sst2
def test_shared_sst2_split_folder():
    assert len(load_task(SHARED_DATA / "sst2", "validation")) == 6_735
    assert len(load_task(SHARED_DATA / "sst2", "test")) == 872


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
    assert list(ds["label"]) == [0, 1]
    assert ds[0]["text"] == 'A "quoted' and ds[0]["text_pair"] == "B."
    # Same file, task inferred from the header.
    assert list(read_glue_tsv(tsv)["label"]) == [0, 1]


def test_headerless_cola_and_unlabelled_test(tmp_path):
    cola = _write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tGood one.\ngj04\t0\t*\tBad one bad.")
    assert list(read_glue_tsv(cola)["label"]) == [1, 0]
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
    bad_label = _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\nfine\t1\nbad\t7\n")
    with pytest.raises(ValueError, match=r"train.tsv:3: label 7 is outside 0..1"):
        read_glue_tsv(bad_label)
    bad_rte = _write(
        tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tcontradiction\n"
    )
    with pytest.raises(ValueError, match="'contradiction' is not one of"):
        read_glue_tsv(bad_rte)
    extra_field = _write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\na\tb\t1\n")
    with pytest.raises(ValueError, match="expected 2 tab-separated fields"):
        read_glue_tsv(extra_field)


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

    jsonl = _write(
        tmp_path / "pairs.jsonl",
        json.dumps({"sentence1": "a", "sentence2": "b", "label": 1})
        + "\n\n"
        + json.dumps({"sentence1": "c", "sentence2": "d", "label": 0})
        + "\n",
    )
    ds = load_task(jsonl, "train")
    assert ds.column_names == ["text", "text_pair", "label"] and list(ds["label"]) == [1, 0]

    generic_tsv = _write(tmp_path / "plain.tsv", 'text\tlabel\nsay "hi\t3\n')
    assert load_task(generic_tsv, "train")[0] == {"text": 'say "hi', "label": 3}


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
    with pytest.raises(ValueError, match="'maybe' is neither an integer"):
        load_task(bad_label, "train")


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
    assert all_labels == sorted(small_ds["label"])
    # Deterministic for a seed, different order for another seed, dataset order with seed=None.
    again = calibration_batches(tok, batch_size=4, num_batches=1, tokenizer=tokenizer)
    assert torch.equal(again[0]["input_ids"], batches[0]["input_ids"])
    ordered = calibration_batches(tok, batch_size=2, num_batches=1, tokenizer=tokenizer, seed=None)
    assert ordered[0]["labels"].tolist() == [1, 0]
    no_labels = calibration_batches(
        tok, batch_size=2, num_batches=1, tokenizer=tokenizer, include_labels=False
    )
    assert "labels" not in no_labels[0]


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
