"""The multi-exit benchmark's configurations and measurements, shared by ``recipes/multi_exit.py`` and
``recipes/bench_multi_exit.py``.

Configurations (``KINDS``): ``me`` and ``me-slim50`` are students started from the fine-tuned teacher and
trained with every exit's loss and distillation from the teacher's logits, ``me`` at full width and
``me-slim50`` after removing half of the heads and FFN neurons with :func:`compress.prune_model` (scored on
the loss of every exit). ``pa-exits`` is Pruning-Adapter with exits on the frozen pretrained backbone: the
progressive schedule of ``recipes/bench_pruning_adapter.py`` (FFN and heads 50%, global widths, rank-8
adapters, LayerNorms trained) scored on every exit's loss, adapters and exit heads trained together (no
teacher, no backbone gradient).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math

import numpy as np
import torch
from peft import get_peft_model

import compress
from common.latency import interleaved_pass_latency
from common.recipe import add_data_arguments, default_arguments
from common.train import load_sequence_classifier, minilm_path
from compress.data import tokenize_dataset
from compress.measure import count_parameters

KINDS = ("me", "me-slim50", "pa-exits")
SLENDERIZE = {"me-slim50": {"heads": 0.5, "ffn": 0.5}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Data, teacher, student and exit-policy options."""
    add_data_arguments(p)
    p.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of the teacher's fine-tuning (1e-4)")
    p.add_argument("--exit-lr", type=float, default=5e-5, help="learning rate of the multi-exit students (5e-5)")
    p.add_argument("--student-steps", type=int, default=None, help="training steps of each student (--steps)")
    p.add_argument("--distill-weight", type=float, default=0.5, help="weight of the teacher's logits (0.5)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (2)")
    p.add_argument("--policy", choices=["entropy", "max_prob", "patience"], default="entropy")
    p.add_argument("--calib-rows", type=int, default=1000,
                   help="training rows held out to choose the thresholds (1000)")
    p.add_argument("--slenderize-batches", type=int, default=8, help="batches scoring the slenderization (8)")


def exit_config(kind: str, args) -> compress.MultiExitConfig:
    return compress.MultiExitConfig(task_type="SEQ_CLS", exit_policy=args.policy, distill_weight=args.distill_weight,
                                    distill_temperature=args.temperature, slenderize=SLENDERIZE.get(kind))


def build_student(kind: str, teacher, tokenizer, args, calibration=None):
    """A copy of the fine-tuned ``teacher`` with exits (slenderized on ``calibration`` rows for ``-slim``
    kinds), distilling from ``teacher``."""
    if kind not in KINDS:
        raise ValueError(f"unknown configuration {kind!r}; choose from {', '.join(KINDS)}")
    model = get_peft_model(copy.deepcopy(teacher), exit_config(kind, args))
    model.base_model.set_teacher(teacher)
    if kind in SLENDERIZE:
        data = tokenize_dataset(calibration, tokenizer, max_length=args.max_length)
        model.base_model.slenderize(data=data, tokenizer=tokenizer, num_batches=args.slenderize_batches,
                                    batch_size=args.batch_size)
    return model


def build_pa_exits(args):
    """(Pruning-Adapter model with exits on the pretrained backbone, its callbacks, its learning rate)."""
    from common import pruning_adapter

    pa_args = default_arguments(pruning_adapter.add_arguments, steps=args.steps, seed=args.seed,
                                num_labels=args.num_labels)
    config = dataclasses.replace(pruning_adapter.pa_config("pa-progressive", pa_args),
                                 exits={"exit_policy": args.policy})
    model, _ = load_sequence_classifier(minilm_path(), num_labels=args.num_labels, seed=args.seed)
    return get_peft_model(model, config), [compress.PruningAdapterCallback()], pa_args.lr


def test_batches(tokenizer, ds, batch_size: int, max_length: int) -> list[dict]:
    """The test rows in their order, in batches padded to their longest row (labels kept aside)."""
    batches = []
    for start in range(0, len(ds), batch_size):
        rows = ds[start:start + batch_size]
        pairs = rows.get("text_pair")
        batches.append(dict(tokenizer(rows["text"], pairs, padding=True, truncation=True, max_length=max_length,
                                      return_tensors="pt")))
    return batches


@torch.no_grad()
def outcome(model, batches: list[dict], labels: np.ndarray) -> dict:
    """Accuracy and mean blocks run per example on ``batches``: a multi-exit model with its config's threshold,
    or a plain classifier (every block)."""
    model.eval()
    predictions, layers = [], []
    for batch in batches:
        out = model(**batch)
        predictions.append(out.logits.argmax(-1))
        exits = getattr(out, "exit_layers", None)
        last = model.config.num_hidden_layers - 1
        layers.append(exits if exits is not None else torch.full((len(out.logits),), last))
    predictions = torch.cat(predictions).numpy()
    return {"accuracy": float(np.mean(predictions == labels)),
            "mean_blocks": float((torch.cat(layers) + 1).float().mean())}


def timed_against(dense, model, batches_32: list[dict], rows_1: list[dict], rounds: int) -> dict:
    """Seconds per pass over the batch-32 batches and over the batch-1 rows, of ``model`` and of ``dense``
    measured in alternation with it (median of ``rounds`` passes each)."""
    b32 = interleaved_pass_latency({"dense": dense, "model": model}, batches_32, rounds=rounds)
    b1 = interleaved_pass_latency({"dense": dense, "model": model}, rows_1, rounds=rounds)
    return {"b32_s": b32["model"].median_s, "b1_s": b1["model"].median_s,
            "dense_b32_s": b32["dense"].median_s, "dense_b1_s": b1["dense"].median_s}


def params_without_word_embeddings(model) -> int:
    """Parameters of the model but its word embeddings (a lookup, not compute; what pruning can shrink)."""
    total = count_parameters(model)
    return total - model.get_input_embeddings().weight.numel()


def threshold_label(value: float | None) -> str:
    if value is None:
        return "none"
    return "inf" if math.isinf(value) else f"{value:.4g}"
