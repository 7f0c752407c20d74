"""Data for compression: tokenisation and calibration batches, and one split of a task read from files.

Every loader returns a :class:`datasets.Dataset` with normalised columns:

- ``text``: the (first) sentence, surrounding whitespace stripped (files; saved datasets are left as saved);
- ``text_pair``: the second sentence, for sentence-pair tasks (MRPC, RTE) only;
- ``label``: an integer class id (``-1`` for unlabelled GLUE test files); GLUE files and files with class
  names get a :class:`datasets.ClassLabel` carrying the names.

Files are parsed by ``datasets.load_dataset`` (GLUE ``.tsv`` files with quoting disabled: their sentences contain
unbalanced ``"``) into memory, so nothing is written next to them or into the datasets cache.

Language models read text instead: :func:`load_text` reads one text (a file, a saved dataset, a Hub dataset) as
a :class:`Corpus` that records how it was read and joined, and :func:`calibration_rows` cuts seeded rows of tokens
from it (:mod:`compress.data.text`).

The package is split by concern: :mod:`compress.data.batches` (tokenising and calibration batches, what the
library itself uses) and the file formats, which only the command line and the recipes read and which are
imported on first use of their names: :mod:`compress.data.files` (``load_task``, the shipped sample, generic
files and saved datasets), :mod:`compress.data.glue` (GLUE tsv layouts), :mod:`compress.data.text` (text for
language models) and :mod:`compress.data.parse` (``load_dataset`` calls and error messages).
"""

from __future__ import annotations

import importlib
from typing import Any

from compress.data.batches import calibration_batches, tokenize_dataset

__all__ = [
    "SHIPPED_SAMPLE",
    "SUPPORTED_TASKS",
    "Corpus",
    "calibration_batches",
    "calibration_rows",
    "load_task",
    "load_text",
    "read_glue_tsv",
    "shipped_sample_path",
    "tokenize_dataset",
    "tokenize_text",
]

#: public names of the file-format modules, imported when first asked for (PEP 562)
_FILE_FORMATS = {
    "SHIPPED_SAMPLE": "compress.data.files",
    "load_task": "compress.data.files",
    "shipped_sample_path": "compress.data.files",
    "SUPPORTED_TASKS": "compress.data.glue",
    "read_glue_tsv": "compress.data.glue",
    "Corpus": "compress.data.text",
    "calibration_rows": "compress.data.text",
    "load_text": "compress.data.text",
    "tokenize_text": "compress.data.text",
}


def __getattr__(name: str) -> Any:
    if name not in _FILE_FORMATS:
        raise AttributeError(f"module 'compress.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_FILE_FORMATS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
