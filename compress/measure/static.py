"""Static measures of a model or a saved folder: parameters, FLOPs of one forward call, size on disk."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (shared parameters counted once).

    With ``trainable_only=True`` only parameters with ``requires_grad`` are counted. PEFT models count with
    ``PeftModel.get_nb_trainable_parameters`` and transformers models with ``PreTrainedModel.num_parameters``
    (both count 4-bit quantised weights at their real size); any other ``torch.nn.Module`` (a training-memory
    factory may return one) by summing its parameters' sizes.
    """
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable if trainable_only else total)
    if hasattr(model, "num_parameters"):
        return int(model.num_parameters(only_trainable=trainable_only))
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def estimate_flops(model: torch.nn.Module, inputs: Mapping[str, Any]) -> int:
    """Estimated FLOPs of one forward call ``model(**inputs)``.

    Uses :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matrix multiplications,
    convolutions and attention kernels (a multiply-add counts as 2 FLOPs); element-wise ops are ignored.
    Runs under ``torch.no_grad``; the model's train/eval mode is not changed.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs)
    return int(counter.get_total_flops())


def folder_size(path: str | os.PathLike[str]) -> int:
    """Total size in bytes of all files under ``path`` (recursively; a file path gives its own size).

    Symlinks to files count with their target's size (as in a Hugging Face cache snapshot); symlinked
    directories are not descended into.
    """
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    if not root.is_dir():
        raise FileNotFoundError(f"no such file or folder: {root}")
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file = Path(dirpath, name)
            if file.is_file():  # follows symlinks; skips dangling links, sockets, fifos
                total += file.stat().st_size
    return total


def ratio(value: float, baseline: float) -> float:
    """``value / baseline`` as a float (a compression ratio, a speed-up); a zero baseline is an error."""
    if baseline == 0:
        raise ValueError(f"ratio: baseline is zero (value={value!r})")
    return float(value) / float(baseline)
