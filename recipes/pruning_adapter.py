"""Recipe: Pruning-Adapter on the packaged MiniLM-L6 and SST-2 (train, prune, evaluate, merge, save, report).

    python recipes/pruning_adapter.py                        # progressive, FFN 50% + heads 50% (global), 1000 steps
    python recipes/pruning_adapter.py --steps 1600 --activation-checkpointing   # leanest memory, same numbers
    python recipes/pruning_adapter.py --schedule oneshot --glue-task RTE --steps 300

The backbone's weights stay frozen throughout (its LayerNorms train, unless ``--no-train-norms``).
``progressive`` (the default) scores on the training batches and prunes along a cubic schedule while the
adapters train (``PruningAdapterCallback`` in an unchanged ``Trainer``; activations are recomputed until the
final prune). ``oneshot`` first fits the classification head on frozen features (head-only gradients),
scores FFN neurons and heads with gate gradients of the task loss on calibration batches, prunes, then
trains adapters on the smaller model. The merged model is saved as a compact safetensors folder
(``global`` mode: load it after ``import compress``) next to the adapter checkpoint.

This module's functions are reused by ``recipes/bench_pruning_adapter.py``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

import compress  # noqa: E402, I001  (first: it quiets bitsandbytes' import-time warning)
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from compress.data import load_task, tokenize_dataset  # noqa: E402
from compress.export import atomic_directory  # noqa: E402
from compress.train import (  # noqa: E402
    evaluate_accuracy,
    finetune_classifier,
    load_sequence_classifier,
    minilm_path,
    transformers_model,
)

SHARED_DATA = REPO.parent / "shared" / "data"
KINDS = ("full", "lora", "pa-oneshot", "pa-progressive")
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def load_splits(glue_task: str | None = None, train_rows: int | None = None, seed: int = 0):
    """(train, test, description): ../shared SST-2 (or a GLUE task) when present, else the shipped sample."""
    if glue_task:
        folder = SHARED_DATA / "glue" / glue_task
        train, test = load_task(folder, "train"), load_task(folder, "dev")
        source = f"GLUE {glue_task} ({folder}; dev.tsv as test)"
    elif (SHARED_DATA / "sst2").exists():
        train, test = load_task(SHARED_DATA / "sst2", "train"), load_task(SHARED_DATA / "sst2", "test")
        source = f"SST-2 ({SHARED_DATA / 'sst2'}; test = official GLUE dev set)"
    else:
        train, test = load_task("sst2-sample", "train"), load_task("sst2-sample", "test")
        source = "SST-2 shipped sample (2,000 train rows; test = official GLUE dev set)"
    if train_rows and len(train) > train_rows:
        train = train.shuffle(seed=seed).select(range(train_rows))
    return train, test, source


def pa_config(kind: str, args) -> compress.PruningAdapterConfig:
    common = dict(task_type="SEQ_CLS", ffn_sparsity=args.ffn_sparsity, head_sparsity=args.head_sparsity,
                  layer_sparsity=args.layer_sparsity, mode=args.mode, importance=args.importance, r=args.r,
                  lora_alpha=2 * args.r, target_modules=TARGETS, quantize_backbone=args.quantize,
                  compensate_bias=args.compensate_bias, score_normalization=args.score_normalization,
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
    return model.base_model.prune(data=data, tokenizer=tokenizer, num_batches=args.calib_batches,
                                  batch_size=args.calib_batch_size, head_warmup_steps=args.head_warmup_steps)


def lr_for(kind: str, args) -> float:
    return args.full_lr if kind == "full" else args.lr


def encoder_layer_params(model) -> int:
    """Parameters of the transformer blocks (what pruning touches; embeddings and head excluded)."""
    base = transformers_model(model)
    return sum(p.numel() for n, p in base.base_model.encoder.named_parameters()
               if "pa_" not in n and "lora_" not in n)


def merged(model):
    """A plain transformers model: adapters folded in (PEFT models), or the model itself."""
    return copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--glue-task", choices=["SST-2", "CoLA", "MRPC", "RTE"], help="use ../shared/data/glue/<task>")
    p.add_argument("--train-rows", type=int, default=None, help="subsample the training set (all rows)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (1000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of adapters (1e-3)")
    p.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of full fine-tuning (1e-4)")
    p.add_argument("--r", type=int, default=8, help="adapter rank (8)")
    p.add_argument("--ffn-sparsity", type=float, default=0.5)
    p.add_argument("--head-sparsity", type=float, default=0.5)
    p.add_argument("--layer-sparsity", type=float, default=0.0)
    p.add_argument("--mode", choices=["uniform", "global"], default="global",
                   help="global (default; needed for BERT heads) or uniform")
    p.add_argument("--importance", default="taylor")
    p.add_argument("--calib-batches", type=int, default=32, help="oneshot: calibration batches (32)")
    p.add_argument("--calib-batch-size", type=int, default=16, help="oneshot: rows per calibration batch (16)")
    p.add_argument("--head-warmup-steps", type=int, default=100, help="oneshot: head-only steps before scoring")
    p.add_argument("--scoring-steps", type=int, default=50, help="progressive: steps before the first pruning")
    p.add_argument("--pruning-interval", type=int, default=25, help="progressive: steps between prunings")
    p.add_argument("--pruning-end", type=float, default=0.5, help="progressive: final sparsity at this fraction")
    p.add_argument("--score-normalization", choices=["none", "mean", "l2"], default="none",
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
    p.add_argument("--seed", type=int, default=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--schedule", choices=["oneshot", "progressive"], default="progressive")
    p.add_argument("--out", default=str(REPO / "runs" / "pruning_adapter"), help="output folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    train, test, source = load_splits(args.glue_task, args.train_rows, args.seed)
    args.num_labels = len(set(train["label"]))
    kind = f"pa-{args.schedule}"
    model, tokenizer, callbacks = build(kind, args, calibration=train)
    dense_encoder = encoder_layer_params(load_sequence_classifier(minilm_path(), num_labels=args.num_labels)[0])
    stats = finetune_classifier(model, tokenizer, train, steps=args.steps, batch_size=args.batch_size,
                                lr=lr_for(kind, args), max_length=args.max_length, seed=args.seed,
                                callbacks=callbacks, activation_checkpointing=args.activation_checkpointing)
    accuracy = evaluate_accuracy(model, tokenizer, test, max_length=args.max_length)
    out = Path(args.out)
    with atomic_directory(out / "adapter", overwrite=True) as tmp:
        model.save_pretrained(tmp)
    plain = merged(model)
    compress.save_pretrained(plain, out / "merged", tokenizer=tokenizer, overwrite=True,
                             title="MiniLM-L6 pruned with Pruning-Adapter")
    print(f"data: {source}")
    print(f"trained {stats['steps']} steps in {stats['train_time_s']:.0f} s; test accuracy {accuracy:.2%}")
    print(f"encoder-layer params: {encoder_layer_params(plain):,} ({encoder_layer_params(plain) / dense_encoder:.1%}"
          " of dense)")
    print(f"widths: {model.peft_config['default'].pruning_plan[-1]['widths_after']}")
    print(f"saved: {out / 'adapter'} (PeftModel.from_pretrained after `import compress`), {out / 'merged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
