"""GLUE-format tsv files: SST-2, CoLA (header-less train/dev), MRPC and RTE, with their class names (internal to
:mod:`compress.data`, which re-exports :func:`read_glue_tsv` and :data:`SUPPORTED_TASKS`)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset

from compress.data.parse import INTEGER, TSV, delimited_where, parse_delimited, scan_delimited, strip_text

logger = logging.getLogger("compress.data")

SUPPORTED_TASKS: tuple[str, ...] = ("sst2", "cola", "mrpc", "rte")
"""GLUE tasks :func:`read_glue_tsv` understands (folder names SST-2, CoLA, MRPC, RTE also accepted)."""

_UNLABELLED = -1
_SUPPORTED_MSG = "sst2 (SST-2), cola (CoLA), mrpc (MRPC), rte (RTE)"


@dataclass(frozen=True)
class _TaskSpec:
    """How one GLUE task lays out its tsv columns and names its classes (in class-id order)."""

    text: str
    pair: str | None
    label: str
    label_names: tuple[str, ...]
    # Columns of a header-less file (CoLA train/dev); None when the file always has a header.
    headerless: tuple[str, ...] | None = None


_TASKS: dict[str, _TaskSpec] = {
    "sst2": _TaskSpec(text="sentence", pair=None, label="label", label_names=("negative", "positive")),
    "cola": _TaskSpec(
        text="sentence",
        pair=None,
        label="label",
        label_names=("unacceptable", "acceptable"),
        headerless=("source", "label", "original_label", "sentence"),
    ),
    "mrpc": _TaskSpec(
        text="#1 String", pair="#2 String", label="Quality", label_names=("not_equivalent", "equivalent")
    ),
    "rte": _TaskSpec(
        text="sentence1", pair="sentence2", label="label", label_names=("entailment", "not_entailment")
    ),
}


def _normalise_task_name(name: str) -> str:
    """``"SST-2"`` -> ``"sst2"``: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def resolve_task(task: str) -> str:
    """The key of a supported task, or an error listing the supported ones."""
    key = _normalise_task_name(task)
    if key not in _TASKS:
        raise ValueError(f"unsupported GLUE task {task!r}; supported tasks: {_SUPPORTED_MSG}")
    return key


def _task_from_header(header: list[str]) -> str | None:
    """The GLUE task whose header row this is, or None."""
    columns = set(header)
    if "#1 String" in columns and "#2 String" in columns:
        return "mrpc"
    if {"sentence1", "sentence2", "label"} <= columns or (
        header[:1] == ["index"] and {"sentence1", "sentence2"} <= columns
    ):
        return "rte"
    if header == ["sentence", "label"]:
        return "sst2"
    return None


def infer_task(path: Path, first_row: list[str]) -> str | None:
    """Task from the parent folder name (``SST-2``, ``glue/CoLA``, ...), else from a recognised header."""
    folder = _normalise_task_name(path.parent.name)
    if folder in _TASKS:
        return folder
    return _task_from_header([cell.strip() for cell in first_row]) if first_row else None


def read_glue_tsv(path: str | Path, task: str | None = None) -> Dataset:
    """Read one GLUE-format tsv file (quoting disabled) into a normalised :class:`~datasets.Dataset`.

    Args:
        path: a GLUE ``train.tsv`` / ``dev.tsv`` / ``test.tsv`` (or a file in the same layout).
        task: ``"sst2"``, ``"cola"``, ``"mrpc"`` or ``"rte"`` (case, ``-`` and ``_`` ignored, so the
            GLUE folder names ``SST-2``, ``CoLA``, ... work). When ``None`` the task is inferred from the
            parent folder name, then from a recognised header row.

    Returns:
        A dataset with columns ``text``, ``text_pair`` (MRPC and RTE only) and ``label``, a
        :class:`~datasets.ClassLabel` with the task's class names (RTE's ``entailment`` / ``not_entailment``
        become 0 / 1; unlabelled test files get ``-1``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the task cannot be inferred or is unsupported, the header lacks the task's
            columns, a row has the wrong number of fields, a label is invalid, or the file is not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE tsv file not found: {path}")
    first, following = scan_delimited(path, TSV)
    if task is None:
        inferred = infer_task(path, first)
        if inferred is None:
            raise ValueError(
                f"cannot infer the GLUE task of {path}: folder name {path.parent.name!r} is not a task "
                f"name and the header {first} is not recognised; pass task=... "
                f"(supported tasks: {_SUPPORTED_MSG})"
            )
        task = inferred
    return read_glue(path, resolve_task(task), first, following)


def read_glue(path: Path, key: str, first: list[str], following: int) -> Dataset:
    """A scanned tsv file in task ``key``'s layout, normalised."""
    spec = _TASKS[key]
    if not first:
        raise ValueError(f"{path} is empty")
    # Header-less files (CoLA train/dev) are recognised by a first row without the task's column names.
    has_header = spec.headerless is None or first[:1] == ["index"] or spec.text in first
    columns = [cell.strip() for cell in first] if has_header else list(spec.headerless or ())
    missing = [col for col in (spec.text, spec.pair) if col is not None and col not in columns]
    if missing:
        raise ValueError(
            f"{path}: header {columns} lacks column(s) {missing} expected for task {key!r}; is the task right?"
        )
    if has_header and not following:
        raise ValueError(f"{path} has a header but no data rows")
    feature = ClassLabel(names=list(spec.label_names))
    has_label = spec.label in columns
    try:
        ds = parse_delimited(path, TSV, columns, has_header, typed={spec.label: feature} if has_label else None)
    except ValueError as err:
        # ClassLabel's cast error names the value but not the row: re-read the labels as text to find the line.
        bad_label = _label_error(path, columns, has_header, spec.label, feature, key) if has_label else None
        raise (bad_label or err) from None
    renames = {spec.text: "text", spec.label: "label", **({spec.pair: "text_pair"} if spec.pair else {})}
    kept = [name for name in (spec.text, spec.pair, spec.label) if name is not None and name in columns]
    ds = strip_text(ds.select_columns(kept).rename_columns({name: renames[name] for name in kept}))
    if not has_label:
        logger.warning("%s has no %r column (GLUE test file?): labels set to %d", path, spec.label, _UNLABELLED)
        ds = ds.add_column("label", [_UNLABELLED] * len(ds), feature=feature)
    logger.debug("read %d %s rows from %s", len(ds), key, path)
    return ds


def _first_invalid(feature: ClassLabel, values: list[Any]) -> int | None:
    """Index of the first value ClassLabel cannot turn into a class id, or None."""
    for index, value in enumerate(values):
        try:
            feature.str2int(value)
        except ValueError:
            return index
    return None


def _label_error(
    path: Path, columns: list[str], has_header: bool, label: str, feature: ClassLabel, task: str
) -> ValueError | None:
    """The error for the first label of a GLUE file that is not a class of ``feature``, naming its line."""
    values = parse_delimited(path, TSV, columns, has_header)[label][:]
    index = _first_invalid(feature, values)
    if index is None:
        return None
    text, top = values[index].strip(), feature.num_classes - 1
    problem = (
        f"label {int(text)} is outside 0..{top}"
        if INTEGER.fullmatch(text)
        else f"label {values[index]!r} is not one of {feature.names} or a class id 0..{top}"
    )
    where = delimited_where(path, TSV, has_header).at(index)
    return ValueError(f"{where}: {problem} ({task} has {feature.num_classes} classes: {', '.join(feature.names)})")
