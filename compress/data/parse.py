"""Parsing one data file with ``datasets.load_dataset`` into an in-memory Dataset, with one clear error per bad
file (internal to :mod:`compress.data`).

``.tsv`` and ``.csv`` files go through the ``"csv"`` builder (every column read as text; ``.tsv`` with quoting
disabled, because GLUE sentences contain unbalanced ``"``), ``.jsonl`` files through the ``"json"`` builder, plain
text files through the ``"text"`` builder. Each file is parsed through a throwaway cache folder: nothing is written
next to the user's file or into ``~/.cache``, and a file edited since the last run is never answered from a stale
cache. What the builders do not do (count the fields of every row, name the line of a bad row) is done here with the
standard library.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow as pa
from datasets import Dataset, Features, Value, load_dataset
from datasets.exceptions import DatasetGenerationError

INTEGER = re.compile(r"-?\d+")
"""A label written as an integer class id."""


@dataclass(frozen=True)
class Dialect:
    """How a delimited file is split into fields, for the stdlib check and for load_dataset alike."""

    delimiter: str
    quoting: int
    name: str  # "tab" or "comma", for messages


TSV = Dialect("\t", csv.QUOTE_NONE, "tab")
CSV = Dialect(",", csv.QUOTE_MINIMAL, "comma")
# pandas (under the csv builder) would turn "NA", "null" and "" into missing values and "007" into 7: every
# column is read as text, and labels are converted afterwards.
_AS_TEXT = {"keep_default_na": False, "na_filter": False, "index_col": False, "encoding": "utf-8-sig"}


# --------------------------------------------------------------------------------------------------------
# Parsing files with datasets
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide datasets' progress bars and log lines while it parses or maps one of our small files."""
    # Our loaders raise one clear error of their own; datasets' "Generating split" bars and its
    # "Failed to read file" log line would only add noise to the CLI's output.
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _parse_file(builder: Literal["csv", "json", "text"], path: Path, **options: Any) -> Dataset:
    """Parse one local file with datasets' packaged ``builder`` into an in-memory Dataset."""
    # datasets fingerprints a local data file by path and mtime only, so a file rewritten with its old mtime
    # (cp -p, rsync -t, tar x) would be answered from ~/.cache with the old rows: a throwaway cache_dir plus
    # keep_in_memory re-parses the file every time and leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix="compress-data-") as cache_dir, _quiet_datasets():
        try:
            return load_dataset(
                builder,
                data_files={"data": str(path)},
                split="data",
                cache_dir=cache_dir,
                keep_in_memory=True,
                **options,
            )
        except (DatasetGenerationError, ValueError, UnicodeDecodeError, StopIteration) as err:
            raise _explain(err, builder, path) from None


def _explain(err: BaseException, builder: str, path: Path) -> ValueError:
    """One clear error for a file datasets could not parse (its own error names no line)."""
    cause = err
    while isinstance(cause, DatasetGenerationError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return _not_utf8_error(path)
    # An empty or blank .jsonl: the json builder stops early (StopIteration) or finds no rows for the split.
    if isinstance(cause, StopIteration) or "corresponds to no data" in str(cause):
        return ValueError(f"{path} has no data rows")
    if builder == "json":
        bad_line = _first_invalid_json_line(path)
        if bad_line is not None:
            return bad_line
    return ValueError(f"{path}: datasets' {builder} loader cannot read it: {cause}")


def _not_utf8_error(path: Path) -> ValueError:
    """The error for a file that is not UTF-8, naming the line of the first undecodable byte."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        return ValueError(
            f"{path} is not UTF-8 text: line {line} has byte {raw[err.start]:#04x}, which is not valid UTF-8; "
            "re-save the file as UTF-8"
        )
    return ValueError(f"{path} is not UTF-8 text; re-save the file as UTF-8")


def parse_text(path: Path, by_line: bool) -> Dataset:
    """Parse a plain text file with load_dataset("text") into a ``text`` column: one row per line (line breaks
    dropped) with ``by_line``, else the whole file as one row. Line endings become ``\\n`` either way."""
    return _parse_file("text", path, sample_by="line" if by_line else "document")


def parse_jsonl(path: Path) -> Dataset:
    """Parse a .jsonl file (one JSON object per line, blank lines skipped) with load_dataset("json")."""
    ds = _parse_file("json", path)
    try:
        ds.data.validate(full=True)  # pyarrow's JSON reader keeps invalid UTF-8 in strings without checking
    except pa.ArrowInvalid:
        raise _not_utf8_error(path) from None
    return ds


def _first_invalid_json_line(path: Path) -> ValueError | None:
    """The error for the first line of a .jsonl file that is not a JSON object or changes a column's type."""
    # pyarrow's parse errors count rows inside a block, not lines, and datasets' own handling of mixed types
    # fails on files with blank lines: after a failed parse, re-read the lines with the json module to explain.
    seen: dict[str, tuple[Any, int]] = {}
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                return ValueError(
                    f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno}); write one JSON object "
                    "per line"
                )
            if not isinstance(record, dict):
                return ValueError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
            for key, value in record.items():
                if value is None:
                    continue
                if key in seen and not same_json_type(seen[key][0], value):
                    first, first_line = seen[key]
                    return mixed_types_error(str(path), key, first, f"line {first_line}", value, f"line {number}")
                seen.setdefault(key, (value, number))
    return None


def same_json_type(a: Any, b: Any) -> bool:
    """Whether two JSON values fit one Arrow column (integers and floats do; booleans are not numbers)."""
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b)
    return type(a) is type(b) or (isinstance(a, numbers) and isinstance(b, numbers))


def mixed_types_error(source: str, column: str, first: Any, first_at: str, other: Any, other_at: str) -> ValueError:
    """The error for a column whose rows hold values of different JSON types."""
    return ValueError(
        f"{source}: a column mixes value types: {column!r} is {first!r} ({type(first).__name__}) on {first_at} "
        f"but {other!r} ({type(other).__name__}) on {other_at}; give every row the same type, e.g. integer labels"
    )


# --------------------------------------------------------------------------------------------------------
# Delimited files (.tsv, .csv): the field-count check load_dataset does not make
# --------------------------------------------------------------------------------------------------------


def _rows(path: Path, dialect: Dialect) -> Iterator[tuple[int, int, list[str]]]:
    """(first line, last line, fields) of every non-empty row, split the way the csv builder splits it."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=dialect.delimiter, quoting=dialect.quoting)
        start = 1
        for row in reader:
            if row:
                yield start, reader.line_num, row
            start = reader.line_num + 1


def scan_delimited(path: Path, dialect: Dialect) -> tuple[list[str], int]:
    """The first row of a delimited file and how many rows follow it.

    Raises:
        ValueError: a row has more or fewer fields than the first row, or the file is not UTF-8.
    """
    # pandas (under load_dataset) pads a short row with empty fields and drops the extra fields of a first data
    # row with only a warning, so a broken row would shift or lose columns silently: count fields here first.
    try:
        rows = _rows(path, dialect)
        last_start, last_end, first = next(rows, (0, 0, []))
        following = 0
        for start, end, row in rows:
            following += 1
            if len(row) != len(first):
                raise _field_count_error(path, dialect, [cell.strip() for cell in first], start, end, len(row))
            last_start, last_end = start, end
        if first and dialect.quoting != csv.QUOTE_NONE and _quote_left_open(path, dialect, last_start):
            # the csv reader (and pandas) end the open field at the end of the file: the rows after the quote
            # would silently merge into one, with the right number of fields when the quote is in the last column
            raise ValueError(
                f"{path}:{last_start}: unbalanced quote: a \" in the row that starts on line {last_start} is never "
                f"closed, so lines {last_start}-{last_end} (the rest of the file) would be read as one row; close the "
                'quote, write a " that is part of the text as "", or save the file as .tsv (read with quoting '
                "disabled, as GLUE files are)"
            )
        return first, following
    except UnicodeDecodeError:
        raise _not_utf8_error(path) from None


def _quote_left_open(path: Path, dialect: Dialect, start: int) -> bool:
    """Whether the row that starts on line ``start`` (the last one) still has a quote open at the end of the file."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(itertools.islice(handle, start - 1, None), delimiter=dialect.delimiter,
                            quoting=dialect.quoting, strict=True)  # strict: an open quote at the end is an error
        try:
            for _ in reader:
                pass
        except csv.Error as err:
            return "unexpected end of data" in str(err)
    return False


def _field_count_error(
    path: Path, dialect: Dialect, columns: list[str], start: int, end: int, got: int
) -> ValueError:
    """The error for a row whose field count differs from the header's."""
    expected = f"{path}:{start}: expected {len(columns)} {dialect.name}-separated fields {columns}, got {got}"
    if got > len(columns):
        fix = "remove the stray tab" if dialect is TSV else 'put "..." around fields that contain commas'
        return ValueError(f"{expected}: more fields than header columns; {fix}")
    if end > start:
        return ValueError(
            f"{expected}: fewer fields than header columns, because the quote opened on line {start} runs on to "
            f"line {end}; close the quote"
        )
    return ValueError(f"{expected}: fewer fields than header columns; add the missing fields")


def parse_delimited(
    path: Path, dialect: Dialect, columns: list[str], has_header: bool, typed: dict[str, Any] | None = None
) -> Dataset:
    """Parse a scanned delimited file with load_dataset("csv"): columns in ``typed`` get that feature (e.g. a
    ClassLabel), every other column is read as text."""
    duplicates = sorted({name for name in columns if columns.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path}: the header names column(s) {duplicates} more than once; rename them")
    features = Features({name: (typed or {}).get(name, Value("string")) for name in columns})
    return _parse_file(
        "csv",
        path,
        delimiter=dialect.delimiter,
        quoting=dialect.quoting,
        header=0 if has_header else None,
        column_names=columns,
        features=features,
        **_AS_TEXT,
    )


# --------------------------------------------------------------------------------------------------------
# Naming rows in messages, and text clean-up
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    """Names a data row in messages: ``path:line`` for files, ``source row N`` for saved datasets."""

    source: str
    line_of: Callable[[int], int | None]  # data-row index -> line number (re-reads the file: error paths only)

    def at(self, index: int) -> str:
        """``path:line`` (or ``source row N``) of data row ``index``, to open in an editor."""
        line = self.line_of(index)
        return f"{self.source}:{line}" if line else f"{self.source} row {index + 1}"

    def short(self, index: int) -> str:
        """``line N`` (or ``row N``) of data row ``index``, for a message that already names the file."""
        line = self.line_of(index)
        return f"line {line}" if line else f"row {index + 1}"


def delimited_where(path: Path, dialect: Dialect, has_header: bool) -> Where:
    """Row locator for a delimited file (data rows counted the way the csv builder counts them)."""

    def line_of(index: int) -> int | None:
        found = next(itertools.islice(_rows(path, dialect), index + int(has_header), None), None)
        return found[0] if found else None

    return Where(str(path), line_of)


def jsonl_where(path: Path) -> Where:
    """Row locator for a .jsonl file."""

    def line_of(index: int) -> int | None:  # the json builder skips blank lines
        with path.open(encoding="utf-8-sig") as handle:
            lines = (number for number, line in enumerate(handle, start=1) if line.strip())
            return next(itertools.islice(lines, index, None), None)

    return Where(str(path), line_of)


def strip_text(ds: Dataset) -> Dataset:
    """Strip surrounding whitespace from ``text`` / ``text_pair`` (in memory: files are parsed into memory)."""
    columns = [name for name in ("text", "text_pair") if name in ds.column_names]

    def strip(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {name: [v.strip() if isinstance(v, str) else v for v in batch[name]] for name in columns}

    with _quiet_datasets():
        return ds.map(strip, batched=True, keep_in_memory=True)
