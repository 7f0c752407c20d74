"""Data loading for compression recipes: GLUE-format tsv files, the shipped SST-2 sample, tokenisation and
calibration batches.

Every loader returns a :class:`datasets.Dataset` with normalised columns:

- ``text``: the (first) sentence, surrounding whitespace stripped;
- ``text_pair``: the second sentence, for sentence-pair tasks (MRPC, RTE) only;
- ``label``: an integer class id (``-1`` for unlabelled GLUE test files).

GLUE files contain unbalanced ``"`` characters, so tsv files are always read with quoting disabled
(``csv.QUOTE_NONE``); reading them with default quoting silently merges rows.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset, DatasetDict, load_from_disk

logger = logging.getLogger(__name__)

__all__ = [
    "SHIPPED_SAMPLE",
    "SUPPORTED_TASKS",
    "calibration_batches",
    "load_task",
    "read_glue_tsv",
    "shipped_sample_path",
    "tokenize_dataset",
]

SHIPPED_SAMPLE = "sst2-sample"
"""Name accepted by :func:`load_task` for the SST-2 sample shipped inside the package."""

SUPPORTED_TASKS: tuple[str, ...] = ("sst2", "cola", "mrpc", "rte")
"""GLUE tasks :func:`read_glue_tsv` understands (folder names SST-2, CoLA, MRPC, RTE also accepted)."""

_UNLABELLED = -1
_SUPPORTED_MSG = "sst2 (SST-2), cola (CoLA), mrpc (MRPC), rte (RTE)"
_LOAD_ACCEPTS = (
    f"{SHIPPED_SAMPLE!r}, a folder of GLUE-style files (train/dev/validation/test .tsv, .csv or .jsonl), "
    "a single .tsv/.csv/.jsonl file, or a folder written by datasets' save_to_disk"
)

# Column aliases used to normalise generic files and saved datasets to text / text_pair / label.
_TEXT_ALIASES = ("sentence", "sentence1", "#1 String", "question1", "premise", "question", "content")
_PAIR_ALIASES = ("sentence2", "#2 String", "question2", "hypothesis")
_LABEL_ALIASES = ("labels", "Quality", "gold_label", "class")
_KNOWN_LABEL_NAMES = {
    "entailment": 0,
    "not_entailment": 1,
    "negative": 0,
    "positive": 1,
    "unacceptable": 0,
    "acceptable": 1,
    "not_equivalent": 0,
    "equivalent": 1,
}

_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "dev", "val"),
    "dev": ("dev", "validation", "val"),
    "val": ("val", "validation", "dev"),
    "test": ("test",),
}
_FILE_EXTENSIONS = (".tsv", ".csv", ".jsonl")


@dataclass(frozen=True)
class _TaskSpec:
    """How one GLUE task lays out its tsv columns."""

    text: str
    pair: str | None
    label: str
    num_labels: int = 2
    label_names: Mapping[str, int] = field(default_factory=dict)
    # Columns of a header-less file (CoLA train/dev); None when the file always has a header.
    headerless: tuple[str, ...] | None = None


_TASKS: dict[str, _TaskSpec] = {
    "sst2": _TaskSpec(text="sentence", pair=None, label="label"),
    "cola": _TaskSpec(
        text="sentence",
        pair=None,
        label="label",
        headerless=("source", "label", "original_label", "sentence"),
    ),
    "mrpc": _TaskSpec(text="#1 String", pair="#2 String", label="Quality"),
    "rte": _TaskSpec(
        text="sentence1",
        pair="sentence2",
        label="label",
        label_names={"entailment": 0, "not_entailment": 1},
    ),
}


# --------------------------------------------------------------------------------------------------------
# GLUE tsv files
# --------------------------------------------------------------------------------------------------------


def _normalise_task_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _resolve_task(task: str) -> str:
    key = _normalise_task_name(task)
    if key not in _TASKS:
        raise ValueError(f"unsupported GLUE task {task!r}; supported tasks: {_SUPPORTED_MSG}")
    return key


def _read_tsv_rows(path: Path) -> list[list[str]]:
    """All non-blank rows of a tab-separated file, quoting disabled, BOM stripped."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row for row in reader if row and any(cell.strip() for cell in row)]


def _first_tsv_row(path: Path) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return next(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), [])


def _task_from_header(header: Sequence[str]) -> str | None:
    columns = set(header)
    if "#1 String" in columns and "#2 String" in columns:
        return "mrpc"
    if {"sentence1", "sentence2", "label"} <= columns or (
        header[:1] == ["index"] and {"sentence1", "sentence2"} <= columns
    ):
        return "rte"
    if list(header) == ["sentence", "label"]:
        return "sst2"
    return None


def _infer_task(path: Path, rows: Sequence[Sequence[str]] | None = None) -> str | None:
    """Task from the parent folder name (``SST-2``, ``glue/CoLA``, ...), else from a recognised header."""
    folder = _normalise_task_name(path.parent.name)
    if folder in _TASKS:
        return folder
    if rows:
        return _task_from_header(rows[0])
    return None


def _parse_label(value: str, spec: _TaskSpec, where: str) -> int:
    value = value.strip()
    if value in spec.label_names:
        return spec.label_names[value]
    try:
        label = int(value)
    except ValueError:
        expected = sorted(spec.label_names) or [str(i) for i in range(spec.num_labels)]
        raise ValueError(f"{where}: label {value!r} is not one of {expected}") from None
    if not 0 <= label < spec.num_labels:
        raise ValueError(f"{where}: label {label} is outside 0..{spec.num_labels - 1}")
    return label


def read_glue_tsv(path: str | Path, task: str | None = None) -> Dataset:
    """Read one GLUE-format tsv file (quoting disabled) into a normalised :class:`~datasets.Dataset`.

    Args:
        path: a GLUE ``train.tsv`` / ``dev.tsv`` / ``test.tsv`` (or a file in the same layout).
        task: ``"sst2"``, ``"cola"``, ``"mrpc"`` or ``"rte"`` (case, ``-`` and ``_`` ignored, so the
            GLUE folder names ``SST-2``, ``CoLA``, ... work). When ``None`` the task is inferred from the
            parent folder name, then from a recognised header row.

    Returns:
        A dataset with columns ``text``, ``text_pair`` (MRPC and RTE only) and integer ``label``
        (RTE's ``entailment`` / ``not_entailment`` become 0 / 1; unlabelled test files get ``-1``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the task cannot be inferred or is unsupported, the header lacks the task's
            columns, a row has the wrong number of fields, or a label is invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE tsv file not found: {path}")
    rows = _read_tsv_rows(path)
    if task is None:
        inferred = _infer_task(path, rows)
        if inferred is None:
            header = rows[0] if rows else []
            raise ValueError(
                f"cannot infer the GLUE task of {path}: folder name {path.parent.name!r} is not a task "
                f"name and the header {header} is not recognised; pass task=... "
                f"(supported tasks: {_SUPPORTED_MSG})"
            )
        task = inferred
    key = _resolve_task(task)
    spec = _TASKS[key]
    if not rows:
        raise ValueError(f"{path} is empty")

    # Locate columns: by header name, or by position for header-less files (CoLA train/dev).
    first = rows[0]
    if spec.headerless is not None and first[:1] != ["index"] and spec.text not in first:
        columns, body, first_line = list(spec.headerless), rows, 1
    else:
        columns, body, first_line = [cell.strip() for cell in first], rows[1:], 2
    missing = [col for col in (spec.text, spec.pair) if col is not None and col not in columns]
    if missing:
        raise ValueError(
            f"{path}: header {columns} lacks column(s) {missing} expected for task {key!r}; "
            "is the task right?"
        )
    text_idx = columns.index(spec.text)
    pair_idx = columns.index(spec.pair) if spec.pair is not None else None
    label_idx = columns.index(spec.label) if spec.label in columns else None
    if label_idx is None:
        logger.warning(
            "%s has no %r column (GLUE test file?): labels set to %d", path, spec.label, _UNLABELLED
        )

    texts: list[str] = []
    pairs: list[str] = []
    labels: list[int] = []
    for offset, row in enumerate(body):
        where = f"{path}:{first_line + offset}"
        if len(row) != len(columns):
            raise ValueError(
                f"{where}: expected {len(columns)} tab-separated fields {columns}, got {len(row)}"
            )
        texts.append(row[text_idx].strip())
        if pair_idx is not None:
            pairs.append(row[pair_idx].strip())
        labels.append(_UNLABELLED if label_idx is None else _parse_label(row[label_idx], spec, where))

    data: dict[str, list[Any]] = {"text": texts}
    if spec.pair is not None:
        data["text_pair"] = pairs
    data["label"] = labels
    logger.debug("read %d %s rows from %s", len(texts), key, path)
    return Dataset.from_dict(data)


# --------------------------------------------------------------------------------------------------------
# Generic files, saved datasets and the shipped sample
# --------------------------------------------------------------------------------------------------------


def _label_to_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if text.lower() in _KNOWN_LABEL_NAMES:
        return _KNOWN_LABEL_NAMES[text.lower()]
    raise ValueError(
        f"{where}: label {value!r} is neither an integer nor one of the known names "
        f"{sorted(_KNOWN_LABEL_NAMES)}; convert labels to integer class ids first"
    )


def _normalise_columns(ds: Dataset, source: str) -> Dataset:
    """Rename common column names to text / text_pair / label and make string labels integers."""
    renames: dict[str, str] = {}
    for target, aliases in (("text", _TEXT_ALIASES), ("text_pair", _PAIR_ALIASES), ("label", _LABEL_ALIASES)):
        if target in ds.column_names:
            continue
        for alias in aliases:
            if alias in ds.column_names and alias not in renames:
                renames[alias] = target
                break
    if renames:
        ds = ds.rename_columns(renames)
    if "text" not in ds.column_names and "input_ids" not in ds.column_names:
        raise ValueError(
            f"{source}: no text column; expected 'text' or one of {list(_TEXT_ALIASES)} "
            f"(or an already tokenised 'input_ids'), found {ds.column_names}"
        )
    if "label" in ds.column_names and ds.features["label"].dtype in ("string", "large_string"):
        labels = [_label_to_int(value, source) for value in ds["label"]]
        ds = ds.remove_columns("label").add_column("label", labels)
    return ds


def _read_generic(path: Path) -> Dataset:
    """A headed .tsv (quoting disabled), .csv (standard quoting) or .jsonl file, columns normalised."""
    suffix = path.suffix.lower()
    records: list[dict[str, Any]]
    if suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: invalid JSON: {err}") from None
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}"
                    )
                records.append(record)
    else:
        quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
        delimiter = "\t" if suffix == ".tsv" else ","
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
            records = []
            for row in reader:
                if None in row:
                    raise ValueError(
                        f"{path}:{reader.line_num}: more fields than header columns {reader.fieldnames}"
                    )
                if None in row.values():
                    raise ValueError(
                        f"{path}:{reader.line_num}: fewer fields than header columns {reader.fieldnames} "
                        "(an unterminated quote swallows the rest of the file)"
                    )
                records.append(dict(row))
    if not records:
        raise ValueError(f"{path} has no data rows")
    import pyarrow as pa

    try:
        ds = Dataset.from_list(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"{path}: a column mixes value types across rows ({err}); give every row the same "
                         "type, e.g. integer labels") from None
    return _normalise_columns(ds, str(path))


def _read_any_file(path: Path, task: str | None) -> Dataset:
    try:
        return _read_file(path, task)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); convert it to UTF-8") from None


def _read_file(path: Path, task: str | None) -> Dataset:
    if path.suffix.lower() not in _FILE_EXTENSIONS:
        raise ValueError(
            f"unsupported file type {path.suffix!r} for {path}; load_task accepts {_LOAD_ACCEPTS}"
        )
    if path.suffix.lower() == ".tsv":
        if task is not None:
            return read_glue_tsv(path, task)
        inferred = _infer_task(path, [_first_tsv_row(path)])
        if inferred is not None:
            return read_glue_tsv(path, inferred)
    elif task is not None:
        logger.warning("task=%r ignored for %s: only .tsv files are read in GLUE layout", task, path)
    return _read_generic(path)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _pick_split(dd: DatasetDict, split: str, source: str) -> Dataset:
    for name in _SPLIT_ALIASES.get(split, (split,)):
        if name in dd:
            return dd[name]
    raise ValueError(f"split {split!r} not found in {source}; available splits: {sorted(dd)}")


def _find_split_file(folder: Path, split: str) -> Path:
    for name in _SPLIT_ALIASES.get(split, (split,)):
        for ext in _FILE_EXTENSIONS:
            candidate = folder / f"{name}{ext}"
            if candidate.is_file():
                return candidate
    present = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _FILE_EXTENSIONS)
    hint = " (GLUE test labels are hidden: use split='dev' as the test set)" if split == "test" else ""
    raise FileNotFoundError(
        f"no file for split {split!r} in {folder}: looked for "
        f"{[n + ext for n in _SPLIT_ALIASES.get(split, (split,)) for ext in _FILE_EXTENSIONS]}, "
        f"found {present or 'no data files'}{hint}"
    )


_extracted_resources = contextlib.ExitStack()
atexit.register(_extracted_resources.close)


def shipped_sample_path(split: Literal["train", "test"]) -> Path:
    """Path of the SST-2 sample shipped with the package (works from an installed wheel).

    Args:
        split: ``"train"`` (2,000 balanced rows from the GLUE SST-2 training set) or ``"test"`` (the full
            872-row official GLUE SST-2 dev set). See ``compress/_data/README.md``.

    Raises:
        ValueError: ``split`` is neither ``"train"`` nor ``"test"``.
        FileNotFoundError: the data file is missing from the installation.
    """
    if split not in ("train", "test"):
        raise ValueError(f"the shipped SST-2 sample has splits 'train' and 'test', not {split!r}")
    resource = resources.files("compress").joinpath("_data", f"sst2_{split}_sample.tsv")
    if not resource.is_file():
        raise FileNotFoundError(f"shipped sample file missing from the installation: {resource}")
    if isinstance(resource, Path):
        return resource
    # Non-filesystem installs (zip): extract once, kept until interpreter exit.
    return Path(_extracted_resources.enter_context(resources.as_file(resource)))


def load_task(name_or_path: str | Path, split: str, task: str | None = None) -> Dataset:
    """Load one split of a classification task as a normalised :class:`~datasets.Dataset`.

    Args:
        name_or_path: one of

            - ``"sst2-sample"``: the SST-2 sample shipped in the package (splits ``train`` and ``test``);
            - a folder of GLUE-style files: ``train``, ``dev`` / ``validation`` and ``test`` as ``.tsv``,
              ``.csv`` or ``.jsonl`` (e.g. ``glue/SST-2`` or ``glue/RTE``);
            - a single ``.tsv`` / ``.csv`` / ``.jsonl`` file (``split`` is then ignored);
            - a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
        split: ``"train"``, ``"validation"`` (alias ``"dev"``) or ``"test"``.
        task: GLUE task for tsv files (see :func:`read_glue_tsv`); inferred when ``None``.

    Returns:
        A dataset with ``text`` (``text_pair`` for pair tasks) and integer ``label`` columns; a saved
        dataset keeps its other columns (common column names are renamed to these).

    Raises:
        FileNotFoundError: the path, or the split's file in a folder, does not exist.
        ValueError: unknown file type, unknown split, or unreadable content.
    """
    if isinstance(name_or_path, str) and name_or_path.strip().lower() in (SHIPPED_SAMPLE, "sst2_sample"):
        if split not in ("train", "test"):
            raise ValueError(f"{SHIPPED_SAMPLE!r} has splits 'train' and 'test', not {split!r}")
        return read_glue_tsv(shipped_sample_path("train" if split == "train" else "test"), task="sst2")

    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is not a known dataset name or an existing path; "
            f"load_task accepts {_LOAD_ACCEPTS}"
        )
    if path.is_dir():
        if _is_saved_dataset(path):
            loaded = load_from_disk(str(path))
            if isinstance(loaded, DatasetDict):
                ds = _pick_split(loaded, split, str(path))
            else:
                logger.info("%s holds a single Dataset: split %r ignored", path, split)
                ds = loaded
            return _normalise_columns(ds, str(path))
        return _read_any_file(_find_split_file(path, split), task)
    logger.debug("%s is a single file: split %r ignored", path, split)
    return _read_any_file(path, task)


# --------------------------------------------------------------------------------------------------------
# Tokenisation and calibration batches
# --------------------------------------------------------------------------------------------------------


def tokenize_dataset(
    ds: Dataset,
    tokenizer: Any,
    max_length: int = 128,
    text_column: str = "text",
    pair_column: str = "text_pair",
    label_column: str = "label",
) -> Dataset:
    """Tokenise a normalised dataset (truncation to ``max_length``, no padding: pad per batch later).

    Args:
        ds: a dataset with a ``text`` column, optionally ``text_pair`` (encoded as the second segment) and
            ``label``.
        tokenizer: a Hugging Face tokenizer (anything callable like ``PreTrainedTokenizerBase``).
        max_length: maximum sequence length including special tokens.
        text_column, pair_column, label_column: column names, if not the normalised defaults.

    Returns:
        A dataset with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
        produces them) and ``labels`` (when ``ds`` has a label column); other columns are dropped.

    Raises:
        ValueError: ``text_column`` is missing or ``max_length`` is not positive.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"tokenize_dataset expects a datasets.Dataset, got {type(ds).__name__}")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if text_column not in ds.column_names:
        raise ValueError(
            f"dataset has no {text_column!r} column (columns: {ds.column_names}); "
            "load it with load_task / read_glue_tsv or pass text_column="
        )
    has_pair = pair_column in ds.column_names
    has_label = label_column in ds.column_names

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        pairs = batch[pair_column] if has_pair else None
        encoded = dict(tokenizer(batch[text_column], pairs, truncation=True, max_length=max_length))
        if has_label:
            encoded["labels"] = batch[label_column]
        return encoded

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


def _to_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"batch value {key!r} cannot be converted to a tensor ({type(value).__name__}): {err}"
        ) from None


def _stack_equal_length(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [feature[key] for feature in features]
        lengths = {len(v) for v in values if isinstance(v, (list, tuple))}
        if len(lengths) > 1:
            raise ValueError(
                f"sequences in {key!r} have different lengths ({min(lengths)}..{max(lengths)}); pass "
                "tokenizer= (pads with its pad id) or collate=, or tokenise with padding='max_length'"
            )
        batch[key] = _to_tensor(values, key)
    return batch


def _model_input_columns(ds: Dataset, include_labels: bool) -> list[str]:
    """Numeric columns (drops raw text); ``label`` is kept as ``labels`` only when include_labels."""
    keep = []
    for name, feature in ds.features.items():
        dtype = getattr(feature, "dtype", None)
        if dtype in ("string", "large_string"):
            continue
        if name in ("label", "labels") and not include_labels:
            continue
        keep.append(name)
    return keep


def calibration_batches(
    data: Dataset | Iterable[Mapping[str, Any]],
    batch_size: int = 16,
    num_batches: int = 8,
    collate: Callable[[list[dict[str, Any]]], Mapping[str, Any]] | None = None,
    seed: int | None = 0,
    tokenizer: Any | None = None,
    include_labels: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Build up to ``num_batches`` batches of model inputs for calibration or importance estimation.

    Args:
        data: either a tokenised :class:`~datasets.Dataset` (needs ``input_ids``; see
            :func:`tokenize_dataset`) or any iterable of model-input dicts that are already batches
            (a list of dicts, a ``DataLoader``, a generator...). Values become tensors.
        batch_size: rows per batch (Dataset input only; the last batch may be smaller when the dataset
            has fewer than ``batch_size * num_batches`` rows).
        num_batches: how many batches to return at most.
        collate: function turning a list of row dicts into a batch dict. For a Dataset it replaces the
            default padding; for an iterable it is applied to each item.
        seed: rows of a Dataset are drawn in a random order seeded with this (``None``: first rows in
            order). Ignored for iterables, whose first ``num_batches`` items are taken.
        tokenizer: for a Dataset, pad with ``DataCollatorWithPadding(tokenizer)`` (the tokenizer's pad id,
            attention mask padded with 0). Without it (and without ``collate``) all sequences of a batch
            must have the same length.
        include_labels: keep the ``labels`` (``label`` renamed) column of a Dataset. Set ``False`` for
            models whose ``labels`` mean something else (e.g. causal LMs fed classification data).

    Returns:
        A list of ``dict[str, torch.Tensor]`` batches (CPU tensors; move them to the model's device).

    Raises:
        ValueError: empty data, a Dataset without ``input_ids``, unequal lengths without a padder, a
            tokenizer without a pad token, or non-positive ``batch_size`` / ``num_batches``.
        TypeError: ``data`` or one of its items is not of an accepted type.
    """
    if batch_size < 1 or num_batches < 1:
        raise ValueError(f"batch_size and num_batches must be positive, got {batch_size} and {num_batches}")
    if isinstance(data, DatasetDict):
        raise TypeError(f"calibration_batches got a DatasetDict with splits {sorted(data)}; pass one split")
    if isinstance(data, Dataset):
        return _batches_from_dataset(data, batch_size, num_batches, collate, seed, tokenizer, include_labels)
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            "calibration_batches expects a tokenised datasets.Dataset or an iterable of batch dicts, "
            f"got {type(data).__name__}"
        )
    batches: list[dict[str, torch.Tensor]] = []
    for index, item in enumerate(itertools.islice(data, num_batches)):
        if collate is not None:
            item = collate(item)
        if not isinstance(item, Mapping):
            raise TypeError(
                f"item {index} of the calibration data is a {type(item).__name__}, not a dict of "
                "model inputs (pass collate= to convert it)"
            )
        if not item:
            raise ValueError(f"item {index} of the calibration data is an empty dict")
        batches.append({str(key): _to_tensor(value, str(key)) for key, value in item.items()})
    if not batches:
        raise ValueError("calibration data is empty: need at least one batch")
    return batches


def _batches_from_dataset(
    ds: Dataset,
    batch_size: int,
    num_batches: int,
    collate: Callable[[list[dict[str, Any]]], Mapping[str, Any]] | None,
    seed: int | None,
    tokenizer: Any | None,
    include_labels: bool,
) -> list[dict[str, torch.Tensor]]:
    if len(ds) == 0:
        raise ValueError("calibration dataset is empty: need at least one row")
    if "input_ids" not in ds.column_names:
        raise ValueError(
            f"calibration dataset has no 'input_ids' column (columns: {ds.column_names}); "
            "tokenise it first with tokenize_dataset(ds, tokenizer)"
        )
    if "label" in ds.column_names and "labels" not in ds.column_names:
        ds = ds.rename_column("label", "labels")
    ds = ds.select_columns(_model_input_columns(ds, include_labels))

    wanted = min(len(ds), batch_size * num_batches)
    if seed is None:
        indices = list(range(wanted))
    else:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(ds), generator=generator)[:wanted].tolist()
    if wanted < batch_size * num_batches:
        logger.warning(
            "calibration dataset has %d rows: fewer than %d batches of %d", len(ds), num_batches, batch_size
        )

    if collate is None and tokenizer is not None:
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(
                "tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token) "
                "or pass collate="
            )
        from transformers import DataCollatorWithPadding

        collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    batches: list[dict[str, torch.Tensor]] = []
    for start in range(0, wanted, batch_size):
        rows = ds.select(indices[start : start + batch_size])
        features = [dict(row) for row in rows]
        if collate is None:
            batch: Mapping[str, Any] = _stack_equal_length(features)
        else:
            batch = collate(features)
        batches.append({str(key): _to_tensor(value, str(key)) for key, value in batch.items()})
    return batches
