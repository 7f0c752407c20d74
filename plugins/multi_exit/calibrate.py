"""Choosing the exit threshold on validation data: for a target accuracy drop or a target speedup."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from torch import nn

from compress.data import calibration_batches
from compress.errors import CompressError

from .modeling import MultiExitForSequenceClassification, exit_blocks
from .policy import simulate_exits

logger = logging.getLogger(__name__)


@dataclass
class ThresholdChoice:
    """The chosen threshold and what it gives on the validation data, against running every block.

    ``speedup`` is the number of blocks divided by the mean number of blocks run per example (exit heads and
    embeddings not counted). ``candidates`` lists every threshold tried with its accuracy, mean blocks and
    speedup."""

    policy: str
    threshold: float
    accuracy: float
    full_accuracy: float
    mean_blocks: float
    speedup: float
    candidates: list[dict] = field(default_factory=list)


def _exit_settings(model: nn.Module):
    """Where the model keeps its exit settings: the active PEFT config, or a saved model's config."""
    tuner = getattr(model, "base_model", None)
    if hasattr(model, "peft_config") and hasattr(tuner, "settings"):
        return model.peft_config[tuner.active_adapters[0]]
    if hasattr(model.config, "exit_policy"):
        return model.config
    raise CompressError(f"{type(model).__name__} is not a multi-exit model: wrap it with get_peft_model(model, "
                        "MultiExitConfig(...)) or load a saved multi-exit model")


@contextlib.contextmanager
def _every_exit(settings) -> Iterator[None]:
    saved = settings.exit_threshold
    settings.exit_threshold = None
    try:
        yield
    finally:
        settings.exit_threshold = saved


@torch.no_grad()
def collect_exit_logits(model: nn.Module, data, tokenizer=None, batch_size: int = 32
                        ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every exit's logits for every row of ``data`` (a tokenized Dataset with labels, or batches), and the
    labels."""
    settings = _exit_settings(model)
    _check_label_column(data)
    # every row: a Dataset's exact batch count (a larger one would be reported as missing rows), else all batches
    num_batches = max(1, math.ceil(len(data) / batch_size)) if isinstance(data, Dataset) else sys.maxsize
    batches = calibration_batches(data, batch_size=batch_size, num_batches=num_batches, seed=None,
                                  tokenizer=tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_exit: list[list[torch.Tensor]] = []
    labels = []
    try:
        with _every_exit(settings):
            for batch in batches:
                if "labels" not in batch:
                    raise CompressError("calibrating the exit threshold needs labelled data (a labels or label "
                                        "column)")
                labels.append(batch.pop("labels"))
                out = model(**{k: v.to(device) for k, v in batch.items()})
                for index, logits in enumerate(out.exit_logits):
                    if len(per_exit) <= index:
                        per_exit.append([])
                    per_exit[index].append(logits.float().cpu())
    finally:
        model.train(was_training)
    exit_logits, labels = [torch.cat(chunks) for chunks in per_exit], torch.cat(labels)
    _check_class_ids(labels, exit_logits[-1].shape[-1])
    return exit_logits, labels


_MAP_LABELS = ("map them to the model's class ids first, e.g. data.map(lambda row: {'labels': "
               "model.config.label2id[row['labels']]})")


def _check_label_column(data) -> None:
    """Refuse labels that are not class ids before anything runs: a Dataset's string column (its batches would
    silently leave it out) or string labels in the first of a list of batches."""
    if isinstance(data, Dataset):
        name = next((n for n in ("labels", "label") if n in data.column_names), None)
        dtype = getattr(data.features[name], "dtype", None) if name is not None else None
        if dtype in ("string", "large_string"):
            raise CompressError(f"calibrating the exit threshold measures accuracy against integer class ids, but "
                                f"the {name!r} column holds strings (e.g. {data[0][name]!r}): {_MAP_LABELS}")
    elif isinstance(data, (list, tuple)) and data and isinstance(data[0], Mapping):
        labels = data[0].get("labels", data[0].get("label"))
        if isinstance(labels, str) or (isinstance(labels, (list, tuple)) and any(isinstance(v, str) for v in labels)):
            raise CompressError("calibrating the exit threshold measures accuracy against integer class ids, but "
                                f"the batches' labels are strings (e.g. {labels!r}): {_MAP_LABELS}")


def _check_class_ids(labels: torch.Tensor, num_classes: int) -> None:
    """Accuracy compares each exit's predicted class with the label: one integer id in ``0..num_classes - 1`` per
    example."""
    if labels.dim() != 1 or labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise CompressError(f"calibrating the exit threshold measures accuracy against one integer class id per "
                            f"example, but the labels are {labels.dtype} of shape {tuple(labels.shape)} (regression "
                            "or multi-label targets?): calibrate a single-label classifier on its class ids")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.numel():
        raise CompressError(f"the labels hold class id {int(outside[0])}, outside the model's {num_classes} classes "
                            f"(0..{num_classes - 1}): {_MAP_LABELS}")


def _candidates(policy: str, exit_logits: list[torch.Tensor]) -> list[float]:
    """Thresholds worth trying: the values at which some example changes its exit."""
    if policy == "patience":
        return [float(p) for p in range(len(exit_logits))] + [math.inf]
    stacked = torch.cat(exit_logits[:-1]) if len(exit_logits) > 1 else exit_logits[0]
    log_probs = torch.log_softmax(stacked, dim=-1)
    if policy == "entropy":
        scores = -(log_probs.exp() * log_probs).sum(-1)
        ends = [0.0, math.inf]
    else:
        scores = log_probs.exp().amax(-1)
        ends = [0.0, 1.0]
    quantiles = torch.quantile(scores, torch.linspace(0, 1, 101)).tolist()
    # just above each score: that example then counts as confident (entropy) / not yet (max_prob)
    return sorted(set(ends + [math.nextafter(q, math.inf) for q in quantiles]))


def exit_block_indices(model: nn.Module) -> tuple[list[int], int]:
    """The block after each exit of a multi-exit model (the last block included), and its number of blocks."""
    if isinstance(model, MultiExitForSequenceClassification):
        blocks, exits = model.exit_block_indices()
    else:
        tuner = getattr(model, "base_model", None)
        inner = tuner.model if hasattr(tuner, "settings") else model
        blocks, exits = exit_blocks(inner, _exit_settings(model).exit_layers)
    return [*exits, len(blocks) - 1], len(blocks)


def choose_exit_threshold(exit_logits: list[torch.Tensor], labels: torch.Tensor, exit_blocks: list[int],
                          num_blocks: int, policy: str, *, target_accuracy_drop: float | None = None,
                          target_speedup: float | None = None, thresholds: list[float] | None = None
                          ) -> ThresholdChoice:
    """The threshold of ``policy`` that meets a target, from every exit's logits on validation data
    (:func:`collect_exit_logits`): ``target_accuracy_drop`` (accuracy points): the fastest whose accuracy is at
    most that far below running every block; ``target_speedup``: the most accurate that runs at most
    ``1 / target_speedup`` of the blocks on average. Give exactly one."""
    if (target_accuracy_drop is None) == (target_speedup is None):
        raise CompressError("give exactly one of target_accuracy_drop (points) or target_speedup (x)")
    if target_accuracy_drop is not None and not target_accuracy_drop >= 0:
        raise CompressError(f"target_accuracy_drop={target_accuracy_drop!r}: must be >= 0 (accuracy points)")
    if target_speedup is not None and not target_speedup >= 1:
        raise CompressError(f"target_speedup={target_speedup!r}: must be >= 1")
    blocks_of_exit = torch.tensor(exit_blocks)
    predictions = torch.stack([logits.argmax(-1) for logits in exit_logits])  # exits x rows
    full_accuracy = 100.0 * (predictions[-1] == labels).float().mean().item()
    rows = []
    for threshold in thresholds if thresholds is not None else _candidates(policy, exit_logits):
        chosen = simulate_exits(exit_logits, policy, threshold)
        correct = predictions[chosen, torch.arange(len(labels))] == labels
        mean_blocks = (blocks_of_exit[chosen] + 1).float().mean().item()
        rows.append({"threshold": threshold, "accuracy": 100.0 * correct.float().mean().item(),
                     "mean_blocks": mean_blocks, "speedup": num_blocks / mean_blocks})
    if target_accuracy_drop is not None:
        fine = [r for r in rows if r["accuracy"] >= full_accuracy - target_accuracy_drop]
        if not fine:
            raise CompressError("no candidate threshold keeps the accuracy within target_accuracy_drop; pass "
                                "thresholds that include running every block")
        best = min(fine, key=lambda r: (r["mean_blocks"], -r["accuracy"]))
    else:
        fast = [r for r in rows if r["speedup"] >= target_speedup]
        if not fast:
            raise CompressError(f"no threshold reaches a {target_speedup}x speedup on this data (at most "
                                f"{max(r['speedup'] for r in rows):.2f}x: every example leaving at the first exit); "
                                "lower target_speedup or add an earlier exit")
        best = max(fast, key=lambda r: (r["accuracy"], r["speedup"]))
    return ThresholdChoice(policy, best["threshold"], best["accuracy"], full_accuracy, best["mean_blocks"],
                           best["speedup"], rows)


def calibrate_exit_threshold(model: nn.Module, data, *, target_accuracy_drop: float | None = None,
                             target_speedup: float | None = None, tokenizer=None, batch_size: int = 32,
                             thresholds: list[float] | None = None, store: bool = True) -> ThresholdChoice:
    """Choose the exit threshold of ``model``'s policy on validation ``data`` and (``store``) set it in the
    model's config, so that ``save_pretrained`` saves it.

    ``target_accuracy_drop`` (accuracy points, e.g. ``1.0``): the fastest threshold whose accuracy is at most that
    far below running every block. ``target_speedup`` (e.g. ``3.0``): the most accurate threshold that runs at most
    ``1 / target_speedup`` of the blocks on average. Give exactly one. Each threshold's outcome is computed from
    one pass that records every exit (the decisions depend on each example's own logits only), so trying many
    costs no extra forward passes (:func:`choose_exit_threshold`).
    """
    if (target_accuracy_drop is None) == (target_speedup is None):
        raise CompressError("give exactly one of target_accuracy_drop (points) or target_speedup (x)")
    settings = _exit_settings(model)
    exit_blocks, num_blocks = exit_block_indices(model)
    exit_logits, labels = collect_exit_logits(model, data, tokenizer=tokenizer, batch_size=batch_size)
    choice = choose_exit_threshold(exit_logits, labels, exit_blocks, num_blocks, settings.exit_policy,
                                   target_accuracy_drop=target_accuracy_drop, target_speedup=target_speedup,
                                   thresholds=thresholds)
    if store:
        settings.exit_threshold = choice.threshold
    logger.info("exit threshold %s=%g: accuracy %.2f%% (every block: %.2f%%), %.2f blocks per example, %.2fx",
                choice.policy, choice.threshold, choice.accuracy, choice.full_accuracy, choice.mean_blocks,
                choice.speedup)
    return choice
