"""Tokenising normalised datasets and cutting them into calibration batches (see :mod:`compress.data`).

Batches of a dataset come from a ``torch.utils.data.DataLoader`` whose collator is transformers'
``DataCollatorWithPadding`` (with a tokenizer), ``default_data_collator`` (equal-length rows) or the caller's own.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

logger = logging.getLogger("compress.data")


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
        An in-memory dataset with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
        produces them) and ``labels`` (when ``ds`` has a label column); other columns are dropped.

    Raises:
        TypeError: ``ds`` is not a :class:`~datasets.Dataset`.
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

    # keep_in_memory: on a save_to_disk folder, map would otherwise write cache-*.arrow files into the user's folder.
    return ds.map(encode, batched=True, remove_columns=ds.column_names, keep_in_memory=True, desc="Tokenizing")


def _to_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"batch value {key!r} cannot be converted to a tensor ({type(value).__name__}): {err}"
        ) from None


def _stack_equal_length(features: list[dict[str, Any]]) -> dict[str, Any]:
    """transformers' ``default_data_collator``, with a clear error for rows of different lengths."""
    from transformers import default_data_collator

    try:
        return default_data_collator(features, return_tensors="pt")
    except ValueError as err:  # torch.tensor on ragged lists: "expected sequence of length 5 at dim 1 (got 3)"
        raise ValueError(
            f"sequences in a batch have different lengths ({err}); pass tokenizer= (pads with its pad id) or "
            "collate=, or tokenise with padding='max_length'"
        ) from None


def _model_input_columns(ds: Dataset, include_labels: bool) -> list[str]:
    """Numeric columns (drops raw text); ``labels`` is kept only when include_labels."""
    keep = []
    for name, feature in ds.features.items():
        if getattr(feature, "dtype", None) in ("string", "large_string"):
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
            attention mask padded with 0). Without it (and without ``collate``) rows are stacked by
            ``default_data_collator``, so all sequences of a batch must have the same length.
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
    # Ready-made batches pass through: only the first num_batches items are read, so generators are not drained.
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
    """Batches of a tokenised Dataset through a DataLoader: seeded random rows (or the first rows)."""
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
    if len(ds) < batch_size * num_batches:
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
    sampler = (
        SequentialSampler(ds)
        if seed is None
        else RandomSampler(ds, generator=torch.Generator().manual_seed(seed))  # a seeded permutation of the rows
    )
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate or _stack_equal_length)
    return [
        {str(key): _to_tensor(value, str(key)) for key, value in batch.items()}
        for batch in itertools.islice(loader, num_batches)
    ]
