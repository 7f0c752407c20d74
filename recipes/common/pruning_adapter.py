"""The Pruning-Adapter recipe's configurations, shared by ``recipes/pruning_adapter.py`` and
``recipes/bench_pruning_adapter.py``, and the benchmark's training-memory factory :func:`memory_job`.

Configurations (``KINDS``): ``full`` (every parameter trains), ``lora`` (LoRA on every attention and FFN
projection), ``pa-oneshot`` and ``pa-progressive`` (Pruning-Adapter, pruned before or during training). The
measuring subprocess of :func:`common.memory.peak_training_memory` imports the factory as
``common.pruning_adapter:memory_job``.
"""

from __future__ import annotations

import argparse
import copy

import torch
from peft import LoraConfig, get_peft_model

import compress
from common.memory import TrainingSetup
from common.recipe import add_data_arguments, default_arguments, load_splits, padded_batches
from common.train import load_sequence_classifier, minilm_path, transformers_model
from compress.data import calibration_batches, tokenize_dataset
from compress.measure import count_parameters
from compress.pruning.head_warmup import warm_up_head
from compress.pruning.spec import parse_sparsity

KINDS = ("full", "lora", "pa-oneshot", "pa-progressive")
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
#: pa-progressive's memory run compresses its schedule into the measured steps: dense, two prunings, pruned
MIN_PROGRESSIVE_MEM_STEPS = 4
#: arguments of the accuracy run that the memory measurement must share (they decide shapes and schedule)
SHAPE_ARGS = ("sparsity", "mode", "importance", "r", "normalize",
              "compensate_bias", "checkpoint_until_pruned", "quantize", "max_length", "train_norms",
              "calib_batch_size", "distill_weight", "max_keep")


def pa_config(kind: str, args) -> compress.PruningAdapterConfig:
    common = dict(task_type="SEQ_CLS", sparsity=parse_sparsity(args.sparsity), mode=args.mode,
                  importance=args.importance, r=args.r,
                  lora_alpha=2 * args.r, target_modules=TARGETS, quantize_backbone=args.quantize,
                  compensate_bias=args.compensate_bias, normalize=args.normalize,
                  max_keep=args.max_keep,
                  checkpoint_until_pruned=args.checkpoint_until_pruned, distill_weight=args.distill_weight,
                  modules_to_save=["LayerNorm"] if args.train_norms else None)
    if kind == "pa-progressive":
        end = max(args.scoring_steps + args.pruning_interval, int(args.steps * args.pruning_end))
        return compress.PruningAdapterConfig(schedule="progressive", scoring_steps=args.scoring_steps,
                                             pruning_interval=args.pruning_interval, pruning_end_step=end, **common)
    return compress.PruningAdapterConfig(schedule="oneshot", **common)


def build(kind: str, args, calibration=None, prune: bool = True):
    """(model, tokenizer, callbacks) for one configuration; ``pa-oneshot`` is pruned here, before training,
    unless ``prune=False`` (then call :func:`prune_oneshot`)."""
    model, tokenizer = load_sequence_classifier(minilm_path(), num_labels=args.num_labels, seed=args.seed)
    callbacks = []
    if kind == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS)
        model = get_peft_model(model, config)
    elif kind.startswith("pa-"):
        model = get_peft_model(model, pa_config(kind, args))
        if kind == "pa-oneshot":
            if prune:
                prune_oneshot(model, tokenizer, args, calibration)
        else:
            callbacks.append(compress.PruningAdapterCallback())
    elif kind != "full":
        raise ValueError(f"unknown configuration {kind!r}; choose from {', '.join(KINDS)}")
    return model, tokenizer, callbacks


def prune_oneshot(model, tokenizer, args, calibration) -> dict:
    """Head warm-up, gate-gradient scoring on calibration rows, pruning: the oneshot pre-training phase
    (checkpointed too when ``args.activation_checkpointing``)."""
    if getattr(args, "activation_checkpointing", False):  # the whole run, scoring included
        model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    data = tokenize_dataset(calibration, tokenizer, max_length=args.max_length)
    if args.head_warmup_steps:
        batches = calibration_batches(data, batch_size=args.calib_batch_size, num_batches=args.calib_batches,
                                      tokenizer=tokenizer)
        warm_up_head(model, batches, steps=args.head_warmup_steps, lr=1e-3)
    return model.base_model.prune(data=data, tokenizer=tokenizer, num_batches=args.calib_batches,
                                  batch_size=args.calib_batch_size)


def lr_for(kind: str, args) -> float:
    return args.full_lr if kind == "full" else args.lr


def encoder_layer_params(model) -> int:
    """Parameters of the transformer blocks of a plain (merged) transformers model: what pruning touches;
    embeddings and head excluded. ``count_parameters``: the encoder is a plain module, without
    ``num_parameters``."""
    return count_parameters(transformers_model(model).base_model.encoder)


def merged(model):
    """A plain transformers model: adapters folded in (PEFT models), or the model itself."""
    return copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options both Pruning-Adapter recipes take (data, training, Pruning-Adapter configuration)."""
    add_data_arguments(p)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of adapters (1e-3)")
    p.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of full fine-tuning (1e-4)")
    p.add_argument("--r", type=int, default=8, help="adapter rank (8)")
    p.add_argument("--sparsity", default="ffn=0.5,heads=0.5",
                   help="Pruning-Adapter: fraction removed per structure (ffn, heads, kv_heads, layers, hidden), "
                        "e.g. ffn=0.5,heads=0.5,hidden=0.25 (default: %(default)s)")
    p.add_argument("--mode", choices=["uniform", "global"], default="global",
                   help="global (default; needed for BERT heads) or uniform")
    p.add_argument("--importance", default="taylor")
    p.add_argument("--calib-batches", type=int, default=32, help="oneshot: calibration batches (32)")
    p.add_argument("--calib-batch-size", type=int, default=16, help="oneshot: rows per calibration batch (16)")
    p.add_argument("--head-warmup-steps", type=int, default=100, help="oneshot: head-only steps before scoring")
    p.add_argument("--scoring-steps", type=int, default=50, help="progressive: steps before the first pruning")
    p.add_argument("--pruning-interval", type=int, default=25, help="progressive: steps between prunings")
    p.add_argument("--pruning-end", type=float, default=0.5, help="progressive: final sparsity at this fraction")
    p.add_argument("--normalize", choices=["none", "mean", "l2"], default="none",
                   help="global mode: per-layer score scaling before ranking across layers (none)")
    p.add_argument("--max-keep", type=float, default=None,
                   help="global mode: the largest fraction of its FFN neurons / heads any one layer keeps, e.g. "
                        "0.6 (default: no cap); lowers the peak under activation checkpointing")
    p.add_argument("--train-norms", action=argparse.BooleanOptionalAction, default=True,
                   help="Pruning-Adapter: also train the LayerNorms (modules_to_save), which pruning shifts "
                        "(default: on)")
    p.add_argument("--compensate-bias", action=argparse.BooleanOptionalAction, default=False,
                   help="fold removed channels' mean contribution into the output bias (default: off)")
    p.add_argument("--checkpoint-until-pruned", action=argparse.BooleanOptionalAction, default=True,
                   help="progressive: gradient checkpointing until the final prune (default: on)")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="Pruning-Adapter: weight of hidden-state distillation from the frozen dense model (0: off)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="checkpoint activations for the whole run (Trainer option; less memory, slower steps)")
    p.add_argument("--quantize", choices=["8bit", "4bit"], default=None, help="quantise the frozen backbone")


# --------------------------------------------------------------------------------------------------------
# Training memory (run by common.memory in a fresh subprocess)
# --------------------------------------------------------------------------------------------------------


def memory_job(kind: str, batch_size: int = 32, seq_len: int = 128, n_batches: int = 2, steps: int = 6,
               num_labels: int = 2, activation_checkpointing: bool = False, **overrides) -> TrainingSetup:
    """Factory for :func:`common.memory.peak_training_memory`: one configuration, as a real run trains it.

    The baseline is the same for every configuration: the pretrained model loaded (and wrapped). Everything
    a method does after that counts: ``pa-oneshot``'s head warm-up, calibration scoring and pruning run in
    ``on_train_begin`` (with fewer calibration batches than the accuracy run: memory depends on the batch,
    not on how many are averaged); ``pa-progressive`` runs its whole schedule compressed into the measured
    ``steps``: dense steps with gates (and checkpointing, as configured), two pruning events, then steps on
    the final shapes. ``activation_checkpointing`` recomputes activations for the whole run (the Trainer's
    option of that name). Rows are SST-2 sentences padded to ``seq_len`` (only shapes matter);
    ``num_labels`` sizes the head.
    """
    overrides = {"calib_batches": 8, "head_warmup_steps": 20, **overrides}
    if kind == "pa-progressive":
        if steps < MIN_PROGRESSIVE_MEM_STEPS:
            raise ValueError(f"pa-progressive needs at least {MIN_PROGRESSIVE_MEM_STEPS} measured steps (dense, "
                             "two prunings, pruned)")
        third = max(1, steps // 3)
        overrides = {"scoring_steps": third, "pruning_interval": third, "steps": steps,
                     "pruning_end": min(2 * third, steps - 1) / steps, **overrides}
    args = default_arguments(add_arguments, num_labels=num_labels, **overrides)
    train, _, _ = load_splits(train_rows=2000)
    model, tokenizer, _ = build(kind, args, prune=False)
    model.train()
    labels = [label % num_labels for label in train["label"]]
    batches = padded_batches(tokenizer, list(train["text"]), labels, batch_size, seq_len, n_batches)
    base = transformers_model(model)

    def on_train_begin() -> None:
        if activation_checkpointing:  # the Trainer turns it on before any callback runs
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if kind == "pa-oneshot":  # checkpointed too, as the recipe does with --activation-checkpointing
            prune_oneshot(model, tokenizer, args, calibration=train)
        if kind == "pa-progressive":
            model.base_model.start_scoring()  # what PruningAdapterCallback.on_train_begin does

    optimizer: list[torch.optim.Optimizer] = []

    def build_optimizer() -> torch.optim.Optimizer:
        optimizer.append(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr_for(kind, args)))
        return optimizer[0]

    def on_step_end(step: int) -> None:  # what PruningAdapterCallback.on_step_end does
        model.base_model.update_and_prune(step, optimizer[0])

    return TrainingSetup(model, batches, build_optimizer, on_train_begin=on_train_begin,
                         on_step_end=on_step_end if kind == "pa-progressive" else None)
