"""Loading one split of a classification task (see :mod:`compress.data`): the shipped SST-2 sample, folders of
split files, single .tsv/.csv/.jsonl files and ``save_to_disk`` folders, normalised to ``text`` / ``text_pair`` /
``label``. Files are parsed by :mod:`compress.data.parse` (``datasets.load_dataset``), GLUE files by
:mod:`compress.data.glue`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
from importlib import resources
from pathlib import Path
from typing import Literal

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, Value, load_from_disk

from compress.data.glue import infer_task, read_glue, read_glue_tsv, resolve_task
from compress.data.parse import (
    CSV,
    INTEGER,
    TSV,
    Dialect,
    Where,
    delimited_where,
    jsonl_where,
    mixed_types_error,
    parse_delimited,
    parse_jsonl,
    same_json_type,
    scan_delimited,
    strip_text,
)

logger = logging.getLogger("compress.data")

SHIPPED_SAMPLE = "sst2-sample"
"""Name accepted by :func:`load_task` for the SST-2 sample shipped inside the package."""

_LOAD_ACCEPTS = (
    f"{SHIPPED_SAMPLE!r}, a folder of GLUE-style files (train/dev/validation/test .tsv, .csv or .jsonl), "
    "a single .tsv/.csv/.jsonl file, or a folder written by datasets' save_to_disk"
)

# Column aliases used to normalise generic files and saved datasets to text / text_pair / label.
_TEXT_ALIASES = ("sentence", "sentence1", "#1 String", "question1", "premise", "question", "content")
_PAIR_ALIASES = ("sentence2", "#2 String", "question2", "hypothesis")
_LABEL_ALIASES = ("labels", "Quality", "gold_label", "class")

# Class names (in class-id order) that string labels of generic files and saved datasets may use.
_KNOWN_LABEL_NAMES: tuple[tuple[str, ...], ...] = (
    ("negative", "positive"),
    ("unacceptable", "acceptable"),
    ("not_equivalent", "equivalent"),
    ("entailment", "not_entailment"),
)

_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "dev", "val"),
    "dev": ("dev", "validation", "val"),
    "val": ("val", "validation", "dev"),
    "test": ("test",),
}
_FILE_EXTENSIONS = (".tsv", ".csv", ".jsonl")


# --------------------------------------------------------------------------------------------------------
# Generic files and saved datasets: column names and labels
# --------------------------------------------------------------------------------------------------------


def _string_labels_to_ids(ds: Dataset, where: Where) -> Dataset:
    """Make a string ``label`` column integer: integers as written, or one known set of class names."""
    values = ds["label"][:]
    if all(INTEGER.fullmatch(value.strip()) for value in set(values) if value is not None):
        ids = [None if value is None else int(value) for value in values]
        return ds.remove_columns("label").add_column("label", ids, feature=Value("int64"))
    first = next(i for i, value in enumerate(values) if value is not None and not INTEGER.fullmatch(value.strip()))
    names = next((names for names in _KNOWN_LABEL_NAMES if values[first].strip() in names), None)
    if names is None:
        known = sorted(name for names in _KNOWN_LABEL_NAMES for name in names)
        raise ValueError(
            f"{where.at(first)}: label {values[first]!r} is neither an integer nor one of the known names {known}; "
            "convert labels to integer class ids first"
        )
    feature = ClassLabel(names=list(names))
    ids: list[int | None] = []
    for index, value in enumerate(values):
        try:
            ids.append(None if value is None else feature.str2int(value))
        except ValueError:
            raise ValueError(
                f"{where.at(index)}: label {value!r} is not one of the class names {feature.names} "
                f"(or 0..{len(names) - 1}) that the label {values[first]!r} on {where.short(first)} belongs to; "
                "use one set of names or integer ids"
            ) from None
    return ds.remove_columns("label").add_column("label", ids, feature=feature)


def _check_column_types(ds: Dataset, where: Where) -> None:
    """Each normalised column holds one type, and text columns hold strings."""
    for name in ("text", "text_pair", "label"):
        feature = ds.features.get(name)
        if isinstance(feature, datasets.Json):
            # datasets keeps a column of mixed JSON types as one Json column instead of failing.
            values = ds[name][:]
            first = next((i for i, value in enumerate(values) if value is not None), 0)
            mismatched = (i for i, v in enumerate(values) if v is not None and not same_json_type(values[first], v))
            other = next(mismatched, None)
            if other is None:  # e.g. objects with different keys: same Python type, still no single Arrow type
                raise ValueError(f"{where.source}: a column mixes value types: {name!r} holds values of no single type")
            raise mixed_types_error(
                where.source, name, values[first], where.short(first), values[other], where.short(other)
            )
        if name != "label" and feature is not None and getattr(feature, "dtype", None) not in (
            "string",
            "large_string",
        ):
            kind = getattr(feature, "dtype", None) or type(feature).__name__
            raise ValueError(
                f"{where.source}: column {name!r} holds {kind} values, not text; make every {name!r} a string"
            )


def _normalise_columns(ds: Dataset, where: Where) -> Dataset:
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
            f"{where.source}: no text column; expected 'text' or one of {list(_TEXT_ALIASES)} "
            f"(or an already tokenised 'input_ids'), found {ds.column_names}"
        )
    _check_column_types(ds, where)
    if "label" in ds.column_names and getattr(ds.features["label"], "dtype", None) in ("string", "large_string"):
        ds = _string_labels_to_ids(ds, where)
    return ds


def _read_delimited(path: Path, dialect: Dialect, first: list[str], following: int) -> Dataset:
    """A scanned .tsv/.csv file with a header row, columns normalised."""
    if not first:
        raise ValueError(f"{path} is empty")
    if not following:
        raise ValueError(f"{path} has no data rows")
    ds = parse_delimited(path, dialect, [cell.strip() for cell in first], has_header=True)
    ds = _normalise_columns(ds, delimited_where(path, dialect, has_header=True))
    return strip_text(ds)


def _read_jsonl(path: Path) -> Dataset:
    """A .jsonl file, columns normalised."""
    return strip_text(_normalise_columns(parse_jsonl(path), jsonl_where(path)))


def _read_file(path: Path, task: str | None) -> Dataset:
    """One .tsv (GLUE layout when recognised), .csv or .jsonl file."""
    suffix = path.suffix.lower()
    if suffix not in _FILE_EXTENSIONS:
        raise ValueError(f"unsupported file type {path.suffix!r} for {path}; load_task accepts {_LOAD_ACCEPTS}")
    if suffix == ".jsonl":
        if task is not None:
            logger.warning("task=%r ignored for %s: only .tsv files are read in GLUE layout", task, path)
        return _read_jsonl(path)
    dialect = TSV if suffix == ".tsv" else CSV
    first, following = scan_delimited(path, dialect)
    if dialect is TSV:
        key = resolve_task(task) if task is not None else infer_task(path, first)
        if key is not None:
            return read_glue(path, key, first, following)
    elif task is not None:
        logger.warning("task=%r ignored for %s: only .tsv files are read in GLUE layout", task, path)
    return _read_delimited(path, dialect, first, following)


# --------------------------------------------------------------------------------------------------------
# Splits, the shipped sample and load_task
# --------------------------------------------------------------------------------------------------------


def _is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _pick_split(dd: DatasetDict, split: str, source: str) -> Dataset:
    """The split of a saved DatasetDict, accepting the aliases dev / validation / val."""
    for name in _SPLIT_ALIASES.get(split, (split,)):
        if name in dd:
            return dd[name]
    raise ValueError(f"split {split!r} not found in {source}; available splits: {sorted(dd)}")


def _find_split_file(folder: Path, split: str) -> Path:
    """The file of ``split`` in a folder of split files (``dev.tsv``, ``validation.jsonl``, ...)."""
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
        dataset keeps its other columns (common column names are renamed to these). Nothing is written
        next to the data or into the datasets cache.

    Raises:
        FileNotFoundError: the path, or the split's file in a folder, does not exist.
        ValueError: unknown file type, unknown split, or unreadable content (the message names the file and,
            where known, the line).
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
            return _normalise_columns(ds, Where(str(path), lambda index: None))
        return _read_file(_find_split_file(path, split), task)
    logger.debug("%s is a single file: split %r ignored", path, split)
    return _read_file(path, task)
