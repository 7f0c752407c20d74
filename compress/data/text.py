"""Text for language models: one string read from a file, a saved dataset or a Hub dataset (:func:`load_text`),
its token ids (:func:`tokenize_text`), and calibration rows of tokens cut from it (:func:`calibration_rows`).

What a source becomes (each :class:`Corpus` records it in ``handling``):

- a plain text file (``.txt`` and any suffix not listed below): the whole file, line endings normalised to ``\\n``;
- a ``.raw`` file (WikiText's raw files, e.g. ``wiki.test.raw``): its lines, line endings normalised, joined with
  ``"\\n\\n"``. Copies of WikiText-2 without the blank lines between paragraphs then read as the Hub's
  ``"\\n\\n".join(test["text"])``, the text the usual perplexity recipe evaluates;
- a ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` file (with a header row), a ``datasets`` ``save_to_disk`` folder,
  the shipped ``sst2-sample`` or a Hub dataset id: the rows of one text column (``text_column``; by default
  ``text`` or a common alias such as ``sentence``) joined with ``separator`` (``"\\n\\n"``); missing values are
  skipped.

Files are parsed by ``datasets.load_dataset`` (:mod:`compress.data.parse`) into memory: nothing is written next to
them or into the datasets cache. A Hub dataset is loaded with ``datasets.load_dataset(id, config_name, split=...)``
(its cache, or the network).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_from_disk

from compress.errors import DataError
from compress.pruning.spec import positive_int

logger = logging.getLogger("compress.data")

__all__ = ["SEPARATOR", "Corpus", "calibration_rows", "load_text", "tokenize_text"]

#: what joins the rows of a text column, and the lines of a ``.raw`` file
SEPARATOR = "\n\n"
_TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
_RAW_SUFFIX = ".raw"
#: column names taken for the text when ``text_column`` is not given, in this order
_TEXT_COLUMNS = ("text", "sentence", "content", "document", "sentence1", "question", "premise")
#: a Hub dataset id: ``name`` or ``owner/name``
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_ACCEPTS = ("a text file (.txt; .raw for WikiText's raw files), a .jsonl/.json/.csv/.tsv file with a text column, "
            "a datasets save_to_disk folder, or a Hub dataset id")


@dataclass(frozen=True)
class Corpus:
    """Text read by :func:`load_text`: the ``text``, where it came from (``source``) and how it was read and joined
    (``handling``), so that results computed on it can state their protocol."""

    text: str
    source: str
    handling: str

    def describe(self) -> str:
        """``source (handling)``, for messages and protocols."""
        return f"{self.source} ({self.handling})"

    def to_dict(self) -> dict[str, Any]:
        """``source`` and ``handling`` (the text itself is left out)."""
        return {key: value for key, value in asdict(self).items() if key != "text"}


def _joined(separator: str) -> str:
    return f"joined with {json.dumps(separator)}"


def load_text(source: str | os.PathLike, *, split: str = "train", config_name: str | None = None,
              text_column: str | None = None, separator: str = SEPARATOR) -> Corpus:
    """Read one text from a file, a saved dataset, the shipped SST-2 sample or a Hub dataset (module docstring).

    Args:
        source: a file or folder path, ``"sst2-sample"``, or a Hub dataset id such as ``"wikitext"``.
        split: the split of a saved ``DatasetDict``, the shipped sample or a Hub dataset (files have none).
        config_name: the Hub dataset's configuration, e.g. ``"wikitext-2-raw-v1"``.
        text_column: the column holding the text in a table, saved dataset or Hub dataset (default: ``text``, or
            the first of ``sentence``, ``content``, ``document``, ``sentence1``, ``question``, ``premise``).
        separator: what joins the rows of a column and the lines of a ``.raw`` file.

    Returns:
        A :class:`Corpus` whose ``handling`` says how the text was read and joined.

    Raises:
        DataError: the source does not exist, cannot be parsed, is binary, holds no text, has no such column or
            split, or is a Hub dataset that cannot be loaded (offline: the message says to pass a local file).
    """
    if isinstance(source, str) and source.strip().lower() in ("sst2-sample", "sst2_sample"):
        from compress.data.files import SHIPPED_SAMPLE, shipped_sample_path

        if split not in ("train", "test"):
            raise DataError(f"{SHIPPED_SAMPLE!r} has splits 'train' and 'test', not {split!r}")
        path = shipped_sample_path(split)  # type: ignore[arg-type]
        return _from_dataset(_parse_table(path), f"{SHIPPED_SAMPLE} ({split})", text_column, separator)
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_saved_dataset(path, split, text_column, separator)
    if path.is_file():
        return _from_file(path, text_column, separator)
    name = str(source)
    if path.exists() or not _HUB_ID.fullmatch(name) or path.suffix.lower() in (*_TABLE_SUFFIXES, _RAW_SUFFIX, ".txt"):
        raise DataError(f"{name!r} does not exist; pass {_ACCEPTS}")
    return _from_hub(name, config_name, split, text_column, separator)


def _parse_table(path: Path) -> Dataset:
    """A .jsonl/.json/.csv/.tsv file (header row) as a dataset whose columns are read as written."""
    from compress.data.parse import CSV, TSV, parse_delimited, parse_jsonl, scan_delimited

    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            return parse_jsonl(path)
        dialect = TSV if suffix == ".tsv" else CSV
        header, following = scan_delimited(path, dialect)
        if not header:
            raise DataError(f"{path} is empty")
        if not following:
            raise DataError(f"{path} has a header row and no data rows")
        return parse_delimited(path, dialect, [cell.strip() for cell in header], has_header=True)
    except DataError:
        raise
    except ValueError as exc:  # parse's messages name the file and line
        raise DataError(str(exc)) from None


def _from_file(path: Path, text_column: str | None, separator: str) -> Corpus:
    from compress.data.parse import parse_text

    suffix = path.suffix.lower()
    if suffix in _TABLE_SUFFIXES:
        return _from_dataset(_parse_table(path), str(path), text_column, separator)
    if text_column is not None:
        logger.warning("text_column=%r ignored: %s is a plain text file", text_column, path)
    with path.open("rb") as handle:
        start = handle.read(8192)
    if not start:
        raise DataError(f"{path} holds no text")
    if b"\x00" in start:  # before datasets sees it: it would try to unpack an archive, or read binary as text
        raise DataError(f"{path} looks like a binary file (it holds NUL bytes), not text; pass {_ACCEPTS}")
    raw = suffix == _RAW_SUFFIX
    try:
        parsed = parse_text(path, by_line=raw)
    except ValueError as exc:
        if "no data rows" in str(exc):  # a .raw file without lines
            raise DataError(f"{path} holds no text") from None
        raise DataError(str(exc)) from None
    lines = parsed["text"]
    if raw:
        corpus = Corpus(separator.join(lines), str(path),
                        f"WikiText raw file: lines, line endings normalised to \\n, {_joined(separator)}")
    else:
        corpus = Corpus(lines[0] if lines else "", str(path), "the whole file, line endings normalised to \\n")
    return _checked(corpus, binary_hint=True)


def _checked(corpus: Corpus, binary_hint: bool = False) -> Corpus:
    """Refuse text that is empty or binary."""
    if "\x00" in corpus.text:
        what = "looks like a binary file (it holds NUL bytes)" if binary_hint else "holds NUL bytes"
        raise DataError(f"{corpus.source} {what}, not text; pass {_ACCEPTS}")
    if not corpus.text.strip():
        raise DataError(f"{corpus.source} holds no text")
    return corpus


def _text_column(ds: Dataset, text_column: str | None, source: str) -> str:
    columns = list(ds.column_names)
    if text_column is not None:
        if text_column not in columns:
            raise DataError(f"{source} has no column {text_column!r} (columns: {', '.join(columns)}); name the "
                            "column that holds the text (text_column=, --text-column)")
        name = text_column
    else:
        name = next((column for column in _TEXT_COLUMNS if column in columns), None)
        if name is None:
            raise DataError(f"{source} has no text column: looked for {', '.join(_TEXT_COLUMNS)}, found "
                            f"{', '.join(columns) or 'no columns'}; name the column that holds the text "
                            "(text_column=, --text-column)")
    dtype = getattr(ds.features[name], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(f"{source}: column {name!r} holds {dtype or type(ds.features[name]).__name__} values, not "
                        "text; name the column that holds the text (text_column=, --text-column)")
    return name


def _from_dataset(ds: Dataset, source: str, text_column: str | None, separator: str) -> Corpus:
    """The rows of one text column of ``ds`` joined with ``separator`` (missing values skipped)."""
    name = _text_column(ds, text_column, source)
    values = ds[name][:]
    rows = [value for value in values if value is not None]
    skipped = f"; {len(values) - len(rows):,} missing values skipped" if len(rows) < len(values) else ""
    corpus = Corpus(separator.join(rows), source, f"column {name!r}, {len(rows):,} rows {_joined(separator)}{skipped}")
    return _checked(corpus)


def _from_saved_dataset(folder: Path, split: str, text_column: str | None, separator: str) -> Corpus:
    from compress.data.files import _is_saved_dataset, _pick_split

    if not _is_saved_dataset(folder):
        raise DataError(f"{folder} is a folder but not one written by datasets' save_to_disk; pass {_ACCEPTS}")
    try:
        loaded = load_from_disk(str(folder))
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read the saved dataset {folder}: {exc}") from None
    try:
        ds = _pick_split(loaded, split, str(folder)) if isinstance(loaded, DatasetDict) else loaded
    except ValueError as exc:  # names the split and the splits there are
        raise DataError(str(exc)) from None
    where = f"{folder} (split {split})" if isinstance(loaded, DatasetDict) else str(folder)
    return _from_dataset(ds, where, text_column, separator)


def _from_hub(name: str, config_name: str | None, split: str, text_column: str | None, separator: str) -> Corpus:
    from datasets import load_dataset

    what = f"{name}" + (f", {config_name}" if config_name else "") + f", split {split}"
    arguments = ", ".join(repr(a) for a in (name, config_name) if a) + f", split={split!r}"
    try:
        ds = load_dataset(name, config_name, split=split)
    except ConnectionError as exc:
        raise DataError(f"cannot load the Hub dataset {what}: the Hub cannot be reached ({exc}) and the dataset is "
                        "not in the local cache; pass a local text file or save_to_disk folder instead (--data FILE "
                        "on the command line), e.g. one written on a networked machine by "
                        f"datasets.load_dataset({arguments}).save_to_disk(DIR)") from None
    except (FileNotFoundError, ValueError, OSError) as exc:  # no such dataset, configuration or split
        raise DataError(f"cannot load the Hub dataset {what}: {exc}") from None
    return _from_dataset(ds, f"Hub dataset {what}", text_column, separator)


def tokenize_text(text: str | Corpus, tokenizer: Any) -> torch.Tensor:
    """The token ids of the whole text (1-D, int64), tokenised in one call with the tokenizer's defaults, so special
    tokens the tokenizer adds to a sequence (e.g. a leading BOS) appear once, at the start."""
    text = text.text if isinstance(text, Corpus) else text
    encoded = tokenizer(text, verbose=False)  # verbose: no warning that the text exceeds the model's length
    return torch.as_tensor(encoded["input_ids"], dtype=torch.long).flatten()


def calibration_rows(text: str | Corpus, tokenizer: Any, num_rows: int = 128, length: int = 512,
                     seed: int = 0) -> torch.Tensor:
    """``num_rows`` rows of ``length`` consecutive tokens of ``text``, for calibration.

    The whole text is tokenised once (:func:`tokenize_text`); row ``i`` starts at the ``i``-th offset drawn
    uniformly from ``[0, T - length)`` (``T`` tokens; ``0`` when ``T == length``) by ``random.Random(seed)``, the
    sampling of the SparseGPT / Wanda / FLAP calibration loaders. Rows are drawn independently, so they may overlap;
    a warning says so when the text has fewer tokens than the rows hold.

    Returns:
        An int64 tensor of shape ``(num_rows, length)``; use it in batches, e.g.
        ``[{"input_ids": chunk} for chunk in rows.split(4)]``.

    Raises:
        InvalidOptionError: ``num_rows``, ``length`` or ``seed`` is not a positive (seed: non-negative) integer.
        DataError: the text has fewer than ``length`` tokens.
    """
    positive_int("num_rows", num_rows)
    positive_int("length", length)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        from compress.pruning.spec import InvalidOptionError

        raise InvalidOptionError("seed", seed, "must be a non-negative integer")
    ids = tokenize_text(text, tokenizer)
    total = ids.numel()
    source = text.source if isinstance(text, Corpus) else "the text"
    if total < length:
        raise DataError(f"{source} has {total:,} tokens, fewer than one calibration row of {length:,}; give more "
                        "text or shorter rows")
    if num_rows * length > total:
        logger.warning("%s has %s tokens, fewer than the %d rows x %d tokens hold: rows overlap; more text gives "
                       "more varied calibration", source, f"{total:,}", num_rows, length)
    rng = random.Random(seed)
    starts = [rng.randrange(max(total - length, 1)) for _ in range(num_rows)]
    return torch.stack([ids[start:start + length] for start in starts])
