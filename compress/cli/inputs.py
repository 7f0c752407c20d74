"""Reading what a command is given: model folders (config, safetensors weights, tokenizer), the device, the
task, and calibration data. Every problem becomes one :class:`~compress.cli.errors.UsageError` naming the file or flag.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UsageError

logger = logging.getLogger("compress.cli")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "tokenizer.model", "sentencepiece.bpe.model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_config_json(model_dir: str) -> tuple[Path, dict[str, Any]]:
    """The folder and its config.json as a dict, checked without importing transformers."""
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise UsageError(f"MODEL_DIR {model_dir!r} does not exist")
    if not path.is_dir():
        raise UsageError(f"MODEL_DIR {model_dir!r} is a file; pass the folder written by save_pretrained")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"MODEL_DIR {model_dir!r} has no config.json; pass a folder written by save_pretrained")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {config_file}: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{config_file} does not hold a JSON object")
    check_config_fields(config_file, config)
    return path, config


#: config fields that count or size something (families' own names: BERT/Llama, T5, compact models): where set,
#: a positive integer. transformers builds the model from them without checking, and fails deep inside (a negative
#: tensor dimension, a division by zero) or builds a model the weights do not fit.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "type_vocab_size", "num_labels",
               "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
               "relative_attention_num_buckets", "relative_attention_max_distance", "compress_head_dim")
_RESTORE = "restore the value the model was saved with, or re-save the model with save_pretrained"


def check_config_fields(config_file: Path, config: dict[str, Any], prefix: str = "") -> None:
    """Refuse config.json fields that transformers would trust and crash on (or read wrongly), each with one
    error naming the file, the field and the fix: sizes, ``id2label`` / ``label2id``, ``architectures``,
    ``model_type``, ``pad_token_id``, the compact models' ``compress_shapes``; in a multi-exit model's ``backbone``
    sub-config too (``prefix``: where the fields sit)."""
    def refuse(field: str, problem: str, fix: str = _RESTORE) -> UsageError:
        return UsageError(f"{config_file}: {prefix}{field} is {_short(config[field])}: {problem}; {fix}")

    if isinstance(config.get("backbone"), dict):
        check_config_fields(config_file, config["backbone"], f"{prefix}backbone.")

    for field in SIZE_FIELDS:
        value = config.get(field)
        if value is not None and not (_is_int(value) and value > 0):
            raise refuse(field, "it must be a positive integer")
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise refuse("model_type", "it must be a string naming the model family, e.g. \"bert\"")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(name, str) for name in architectures)):
        raise refuse("architectures", "it must be a list of class names, e.g. [\"BertForSequenceClassification\"]",
                     "write it as a list, or remove it")
    label_fix = 'write id2label as {"0": "negative", "1": "positive"} and label2id as its inverse, or remove them'
    id2label = config.get("id2label")
    if id2label is not None and not (isinstance(id2label, dict) and all(
            INTEGER_KEY.fullmatch(str(key)) and isinstance(name, str) for key, name in id2label.items())):
        raise refuse("id2label", "it must map class ids to label names", label_fix)
    label2id = config.get("label2id")
    if label2id is not None and not (isinstance(label2id, dict) and all(_is_int(i) for i in label2id.values())):
        raise refuse("label2id", "it must map label names to class ids", label_fix)
    vocab_size, pad = config.get("vocab_size"), config.get("pad_token_id")
    if pad is not None and not (_is_int(pad) and (vocab_size is None or -vocab_size <= pad < vocab_size)):
        raise refuse("pad_token_id", f"it must be a token id below vocab_size ({vocab_size})" if vocab_size else
                     "it must be an integer token id", "set the tokenizer's pad token id, or remove it")
    shapes = config.get("compress_shapes")
    if shapes is not None and not (isinstance(shapes, dict) and all(
            isinstance(shape, list) and len(shape) == 2 and all(_is_int(n) and n > 0 for n in shape)
            for shape in shapes.values())):
        raise refuse("compress_shapes", "it must map each projection to [out_features, in_features], positive "
                     "integers", "it is written by `compress prune --mode global`: " + _RESTORE)


INTEGER_KEY = re.compile(r"-?\d+")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_weight_files(model_dir: Path, required: bool = True) -> None:
    """Refuse pickle-only folders (when weights are ``required``) and unreadable safetensors files before
    anything loads them."""
    from safetensors import SafetensorError, safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files and required:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise UsageError(f"{model_dir} holds {pickles[0]} (a pickle file) and no safetensors weights; compress "
                             "loads safetensors only: re-save the model with save_pretrained, which writes "
                             "model.safetensors")
        raise UsageError(f"{model_dir} has no *.safetensors weights; pass a folder written by save_pretrained")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"{file} is not a readable safetensors file ({exc}); it may be truncated or "
                             "corrupt: save the model again") from None


def load_config(model_dir: Path, config_dict: Mapping[str, Any]):
    """The folder's config through AutoConfig, its validation errors reported on one line naming the file;
    ``config_dict`` is config.json as :func:`read_config_json` read it."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    _check_activation_and_dtype(model_dir / "config.json", config_dict)
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (StrictDataclassError, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UsageError(f"{model_dir / 'config.json'} is not a valid config: {exc}") from None


def _check_activation_and_dtype(config_file: Path, config: Mapping[str, Any]) -> None:
    """The activation function and dtype config.json names exist (transformers looks them up only when it builds
    the model or converts the dtype, and fails there with a bare KeyError / AttributeError)."""
    import torch
    from transformers.activations import ACT2FN

    for field in ("hidden_act", "hidden_activation"):
        name = config.get(field)
        if name is not None and (not isinstance(name, str) or name not in ACT2FN):
            raise UsageError(f"{config_file}: {field} is {_short(name)}, which is not an activation transformers "
                             "knows; restore the model's own, e.g. \"gelu\", \"relu\" or \"silu\"")
    for field in ("dtype", "torch_dtype"):
        dtype = config.get(field)
        if dtype is not None and dtype != "auto" and not (
                isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
            raise UsageError(f"{config_file}: {field} is {_short(dtype)}, which is not a torch dtype; use e.g. "
                             '"float32", "bfloat16" or "float16", or remove it')


def build_meta_model(model_dir: Path, config, auto_name: str):
    """:func:`meta_model`, with a config that builds no model reported on one line naming config.json."""
    try:
        return meta_model(config, auto_name)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError, RuntimeError,
            AssertionError) as exc:  # what transformers' and torch's constructors raise for values they cannot use
        raise UsageError(f"{model_dir / 'config.json'} describes no model {auto_name} can build "
                         f"({type(exc).__name__}: {exc}); {_RESTORE}") from None


def weight_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of every safetensors file in the folder (read from the headers only)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = list(handle.get_slice(key).get_shape())
    return shapes


def meta_model(config, auto_name: str):
    """The model built on the meta device from its config: its structure, with nothing allocated."""
    import torch
    import transformers

    with torch.device("meta"):
        return getattr(transformers, auto_name).from_config(config)


def shape_mismatches(model_dir: Path, model) -> list[str]:
    """Tensors whose shape in the folder's weights differs from the shape ``model`` (built from the folder's
    config, e.g. by :func:`meta_model`) gives them; names match with or without the base-model prefix (a
    ``BertModel`` checkpoint under a classification head)."""
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    problems = []
    for key, shape in weight_shapes(model_dir).items():
        for candidate in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            if candidate in expected:
                if expected[candidate] != shape:
                    problems.append(f"{key} is {shape} in the weights but {expected[candidate]} by the config")
                break
    return problems


def resolve_task(config: Mapping[str, Any], task_type: str = "auto") -> tuple[str | None, str]:
    """(task or None, transformers Auto class name) for a config.json dict and ``--task-type``."""
    from compress.pruning.arch import spec_class
    from compress.tasks import auto_class_name, task_of_class

    if task_type != "auto":
        return task_type, auto_class_name(task_type)
    for architecture in config.get("architectures") or []:
        found = task_of_class(str(architecture))
        if found is not None:
            return found
    spec_cls = spec_class(str(config.get("model_type", "")))
    if spec_cls is not None:
        logger.info("config.json names no architecture: loading as %s (set --task-type to change)",
                    spec_cls.default_task)
        return spec_cls.default_task, auto_class_name(spec_cls.default_task)
    return None, auto_class_name(None)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(folder: Path, explicit: bool):
    """The tokenizer in ``folder``; ``None`` when there is none and it was not asked for (``explicit``)."""
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise UsageError(f"--tokenizer {str(folder)!r} is not a folder")
    if not has_tokenizer(folder):
        if explicit:
            raise UsageError(f"--tokenizer {str(folder)!r} holds no tokenizer files")
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        if explicit:
            raise UsageError(f"cannot load the tokenizer in {folder}: {exc}") from None
        logger.warning("cannot load the tokenizer in %s (%s); continuing without one", folder, exc)
        return None


def position_limit(config, tokenizer) -> int | None:
    """The longest input the model and tokenizer allow (``None``: no known limit)."""
    from compress.pruning.arch import ArchSpec, spec_class

    limits = []
    model_limit = (spec_class(str(config.model_type)) or ArchSpec).position_limit(config)
    if model_limit is not None:
        limits.append(model_limit)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    return min(limits) if limits else None


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a device: {exc}") from None
    if device.type == "meta":
        raise UsageError("--device meta holds no weights to score or prune; use --device cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def build_text_calibration(corpus, tokenizer, model, *, num_rows: int, length: int, batch_size: int, seed: int,
                           task_loss: bool) -> list[dict]:
    """Calibration batches of a causal LM: ``num_rows`` rows of ``length`` tokens of ``corpus``
    (:func:`compress.data.calibration_rows`), ``batch_size`` rows per batch, with ``labels`` (the tokens themselves)
    when ``task_loss`` (gradient importance)."""
    import torch

    from compress.data import calibration_rows

    rows = calibration_rows(corpus, tokenizer, num_rows=num_rows, length=length, seed=seed)
    batches = []
    for chunk in rows.split(batch_size):
        batch = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        if task_loss:
            batch["labels"] = chunk.clone()
        batches.append(batch)
    _check_token_ids(batches, model, tokenizer)
    return batches


def build_calibration(dataset, tokenizer, model, task: str | None, *, max_length: int, batch_size: int,
                      num_batches: int, task_loss: bool = True, seed: int = 0) -> list[dict]:
    """Tokenise ``dataset`` and cut it into calibration batches whose ``labels`` suit the model's head.

    With ``task_loss`` (gradient importance), sequence classification keeps the class labels and causal,
    masked and seq2seq LMs are scored on the text itself (``labels`` = ``input_ids`` with padding ignored),
    whatever labels the data has. Without it (activation statistics only) the batches carry no labels, so
    unlabelled data and heads without a task loss work.
    """
    import torch

    from compress.data import calibration_batches, tokenize_dataset
    from compress.tasks import SCORABLE_TASKS

    if task_loss and task not in SCORABLE_TASKS:
        raise UsageError(
            f"{type(model).__name__} has no task loss to score with; pass --task-type "
            f"({', '.join(SCORABLE_TASKS)}) or use --importance magnitude or activation")
    if tokenizer.pad_token_id is None:
        # decoder-only tokenizers often have no pad token: pad with EOS for calibration only
        if getattr(tokenizer, "eos_token", None) is None:
            raise UsageError("the tokenizer has neither a pad nor an eos token; cannot pad calibration batches")
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    tokenized = tokenize_dataset(dataset, tokenizer, max_length=max_length)
    class_labels = task_loss and task == "sequence-classification"
    if class_labels:
        tokenized = _class_labels(tokenized, int(getattr(model.config, "num_labels", 0) or 0))
    batches = calibration_batches(tokenized, batch_size=batch_size, num_batches=num_batches,
                                  tokenizer=tokenizer, include_labels=class_labels, seed=seed)
    _check_token_ids(batches, model, tokenizer)
    if task_loss and not class_labels:
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask", torch.ones_like(ids))
            batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batches


def _check_token_ids(batches: list[dict], model, tokenizer) -> None:
    """Refuse token ids the model's embedding has no row for (a tokenizer of another model)."""
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    largest = max((int(batch["input_ids"].max()) for batch in batches), default=-1)
    if rows is not None and largest >= rows:
        raise UsageError(f"the tokenizer produces token id {largest}, but the model's embedding has {rows} rows; "
                         f"the tokenizer ({getattr(tokenizer, 'name_or_path', '') or 'given'}) belongs to another "
                         "model: pass the model's own tokenizer with --tokenizer")


def _class_labels(tokenized, num_labels: int):
    """Check the ``labels`` column against a classifier with ``num_labels`` outputs; integer class ids."""
    if "labels" not in tokenized.column_names:
        raise UsageError("--data has no label column; sequence classification is scored on its labels")
    labels = tokenized["labels"]
    missing = next((i for i, label in enumerate(labels) if label is None), None)
    if missing is not None:
        raise UsageError(f"--data row {missing + 1} has no label (a missing field, or an unterminated quote "
                         "that swallowed the rest of the file?)")
    if num_labels == 1:  # regression: labels are targets
        return tokenized
    fractional = next((label for label in labels if float(label) != int(label)), None)
    if fractional is not None:
        raise UsageError(f"--data has label {fractional!r}, but a classifier with num_labels={num_labels} "
                         "needs integer class ids 0..num_labels-1")
    labels = [int(label) for label in labels]
    if any(label < 0 for label in labels):
        raise UsageError("--data has unlabelled rows (label -1, e.g. a GLUE test file); use a labelled "
                         "split such as --split train")
    if num_labels and max(labels) >= num_labels:
        raise UsageError(f"--data has label {max(labels)} but the model has num_labels={num_labels}")
    if tokenized.features["labels"].dtype != "int64":
        from datasets import Value

        tokenized = tokenized.cast_column("labels", Value("int64"))  # 1.0 -> 1: a class id, not a target
    return tokenized
