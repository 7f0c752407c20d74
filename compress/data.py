"""Data for compression recipes: GLUE-format tsv files, .csv/.jsonl files, saved datasets, the shipped SST-2
sample, tokenisation and calibration batches.

Every loader returns a :class:`datasets.Dataset` with normalised columns:

- ``text``: the (first) sentence, surrounding whitespace stripped (files; saved datasets are left as saved);
- ``text_pair``: the second sentence, for sentence-pair tasks (MRPC, RTE) only;
- ``label``: an integer class id (``-1`` for unlabelled GLUE test files); GLUE files and files with class
  names get a :class:`datasets.ClassLabel` carrying the names.

Files are parsed by ``datasets.load_dataset`` (GLUE ``.tsv`` files with quoting disabled: their sentences contain
unbalanced ``"``) into memory, so nothing is written next to them or into the datasets cache.

This module is the public entry point; the code is split by concern: :mod:`compress.data_files` (``load_task``,
the shipped sample, generic files and saved datasets), :mod:`compress.data_glue` (GLUE tsv layouts),
:mod:`compress.data_parse` (``load_dataset`` calls and error messages) and :mod:`compress.data_batches`
(tokenising and calibration batches).
"""

from __future__ import annotations

from compress.data_batches import calibration_batches, tokenize_dataset
from compress.data_files import SHIPPED_SAMPLE, load_task, shipped_sample_path
from compress.data_glue import SUPPORTED_TASKS, read_glue_tsv

__all__ = [
    "SHIPPED_SAMPLE",
    "SUPPORTED_TASKS",
    "calibration_batches",
    "load_task",
    "read_glue_tsv",
    "shipped_sample_path",
    "tokenize_dataset",
]
