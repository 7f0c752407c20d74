"""The Ladder Side-Tuning benchmark's configurations and its training-memory factory :func:`memory_job`.

Configurations (``KINDS``): ``full`` (every parameter trains), ``lora`` (LoRA r=8 on every attention and FFN
projection), ``lst-r8`` and ``lst-r4`` (side network at 1/8 and 1/4 of MiniLM's width, fisher-pruned from the
backbone; the classifier reads the side states pooled per segment, the default), ``lst-r8-cls`` (``lst-r8`` whose
classifier reads BERT's frozen pooler on the side network's first token, ``pooling="model"``), ``lst-r8-drop``
(every other side block dropped), ``lst-r8-add`` (side output added to the
backbone's, ``add_backbone_output=True``), ``lst-r8-8bit`` (``lst-r8`` on a backbone loaded in
bitsandbytes 8-bit), ``lst-r8-int8`` (``lst-r8`` with the encoder in torch's dynamic int8). The measuring
subprocess of :func:`common.memory.peak_training_memory` imports the factory as ``common.ladder_side:memory_job``.
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model

import compress
from common.memory import TrainingSetup
from common.pruning_adapter import TARGETS
from common.recipe import add_data_arguments, default_arguments, load_splits, padded_batches
from common.train import load_sequence_classifier, minilm_path
from compress.data import tokenize_dataset

KINDS = ("full", "lora", "lst-r8", "lst-r8-cls", "lst-r4", "lst-r8-drop", "lst-r8-add", "lst-r8-8bit", "lst-r8-int8")
#: MiniLM-L6's blocks that keep a side block in ``lst-r8-drop``
DROP_LAYERS = [1, 3, 5]


def lst_config(kind: str, args) -> compress.LadderSideConfig:
    r = 4 if kind == "lst-r4" else 8
    return compress.LadderSideConfig(task_type="SEQ_CLS", r=r, importance=args.importance,
                                     side_layers=DROP_LAYERS if kind.endswith("-drop") else None,
                                     add_backbone_output=kind.endswith("-add"),
                                     pooling="model" if kind.endswith("-cls") else None)


def backbone(args, quantize: str | None = None):
    """(MiniLM-L6 with a seeded classification head, tokenizer); ``quantize`` ``"8bit"``/``"4bit"`` loads the
    backbone in bitsandbytes form (pooler and head stay float: bitsandbytes cannot hold a freshly initialised
    layer, and they train or feed the head); ``"int8"`` converts the encoder's linear layers to torch's dynamic
    int8 (the pooler stays float: the gradient to the side network passes through it)."""
    load = {}
    if quantize in ("8bit", "4bit"):
        from transformers import BitsAndBytesConfig

        bits = ({"load_in_8bit": True} if quantize == "8bit" else
                {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32})
        load["quantization_config"] = BitsAndBytesConfig(llm_int8_skip_modules=["classifier", "pooler"], **bits)
    model, tokenizer = load_sequence_classifier(minilm_path(), num_labels=args.num_labels, seed=args.seed, **load)
    if quantize == "int8":
        encoder = model.base_model.encoder
        model.base_model.encoder = torch.ao.quantization.quantize_dynamic(encoder, {torch.nn.Linear},
                                                                          dtype=torch.qint8)
    return model, tokenizer


def build(kind: str, args, calibration=None, init: bool = True):
    """(model, tokenizer) for one configuration; an ``lst-*`` side network is fisher-initialised on
    ``calibration`` rows here unless ``init=False`` (then call :func:`init_side`)."""
    quantize = kind.rsplit("-", 1)[-1] if kind.endswith(("-8bit", "-int8")) else None
    model, tokenizer = backbone(args, quantize=quantize)
    if kind == "lora":
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=TARGETS))
    elif kind.startswith("lst-"):
        model = get_peft_model(model, lst_config(kind, args))
        if init:
            init_side(model, tokenizer, args, calibration)
    elif kind != "full":
        raise ValueError(f"unknown configuration {kind!r}; choose from {', '.join(KINDS)}")
    return model, tokenizer


def init_side(model, tokenizer, args, calibration) -> None:
    """The side network's pruned initialisation, scored on ``args.calib_batches`` calibration batches."""
    data = tokenize_dataset(calibration, tokenizer, max_length=args.max_length)
    model.base_model.init_side(data=data, tokenizer=tokenizer, num_batches=args.calib_batches,
                               batch_size=args.calib_batch_size)


def lr_for(kind: str, args) -> float:
    return {"full": args.full_lr, "lora": args.lr}.get(kind, args.lst_lr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Data, training and side-network options."""
    add_data_arguments(p)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of LoRA (1e-3)")
    p.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of full fine-tuning (1e-4)")
    p.add_argument("--lst-lr", type=float, default=1e-3, help="learning rate of the side networks (1e-3)")
    p.add_argument("--importance", choices=["fisher", "magnitude"], default="fisher",
                   help="side-network initialisation (fisher)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches of the fisher init (8)")
    p.add_argument("--calib-batch-size", type=int, default=8, help="rows per calibration batch (8)")


def memory_job(kind: str, batch_size: int = 32, seq_len: int = 128, n_batches: int = 2, num_labels: int = 2,
               **overrides) -> TrainingSetup:
    """Factory for :func:`common.memory.peak_training_memory`: one configuration, as the benchmark trains it.

    The baseline is the pretrained model loaded and wrapped; an ``lst-*`` side network's fisher initialisation
    (scoring a pruned copy of the backbone on calibration rows) runs in ``on_train_begin``, so its memory
    counts. Rows are SST-2 sentences padded to ``seq_len`` (only shapes matter).
    """
    args = default_arguments(add_arguments, num_labels=num_labels, **overrides)
    train, _, _ = load_splits(train_rows=2000)
    model, tokenizer = build(kind, args, init=False)
    model.train()
    labels = [label % num_labels for label in train["label"]]
    batches = padded_batches(tokenizer, list(train["text"]), labels, batch_size, seq_len, n_batches)

    def on_train_begin() -> None:
        if kind.startswith("lst-"):
            init_side(model, tokenizer, args, calibration=train)

    def build_optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr_for(kind, args))

    return TrainingSetup(model, batches, build_optimizer, on_train_begin=on_train_begin)
