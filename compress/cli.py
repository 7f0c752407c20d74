"""The ``compress`` command line: ``compress prune`` and ``compress info``.

``main(argv)`` returns the exit status instead of exiting: 0 on success, 2 for bad arguments or inputs
(reported on one ``compress: error: ...`` line, no traceback), 1 when a valid run fails part-way.
``--debug`` re-raises with the full traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

PROG = "compress"

logger = logging.getLogger("compress.cli")

#: ``--task-type`` -> transformers Auto class used to load MODEL_DIR
TASK_AUTO_CLASSES: dict[str, str] = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
}
TASK_TYPES = ("auto", *TASK_AUTO_CLASSES)

# class-name suffix in config.json `architectures` -> task type
_ARCH_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForConditionalGeneration", "seq2seq"),
    ("ForMaskedLM", "masked-lm"),
)
# when config.json names no architecture: the usual head of each family
_FAMILY_DEFAULT_TASK = {"bert": "sequence-classification", "llama": "causal-lm", "t5": "seq2seq"}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "tokenizer.model", "sentencepiece.bpe.model")

_STRUCTURE_LABELS = {
    "ffn": "FFN width per layer",
    "heads": "attention heads per layer",
    "kv_heads": "kv heads per layer",
    "layers": "layers per stack",
}


# --------------------------------------------------------------------------------------------------------
# Errors and output
# --------------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A bad command line or input: reported on one line, exit status 2."""


class _RunFailed(Exception):
    """A valid run failed part-way (pruning, saving): reported on one line, exit status 1."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


# What a user can cause and fix: caught at the top of main and reported on one line.
_EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, ValueError, FileNotFoundError, FileExistsError, OSError,
)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err_line(exc: BaseException) -> str:
    """``compress: error: <message>`` on one line (newlines in the message are folded)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"{PROG}: error: {message}"


@contextlib.contextmanager
def _run_phase() -> Iterator[None]:
    """Errors raised inside happen after the inputs were validated: exit status 1, not 2."""
    from compress.errors import NothingToPruneError

    try:
        yield
    except NothingToPruneError:
        raise  # the request cannot be met by this model: a bad input (exit 2), found once scores exist
    except _EXPECTED_ERRORS as exc:
        raise _RunFailed(exc) from exc


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at emit time (pytest swaps it per test)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def _cli_logging(verbose: bool, debug: bool) -> Iterator[None]:
    """Log the package's messages to stderr for one command; the logger is restored afterwards, so
    calling :func:`main` in-process leaves no trace on logging."""
    log = logging.getLogger("compress")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


# --------------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise :class:`UsageError` (one line, no usage block) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def _common_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    # On subcommands the defaults are SUPPRESS so that they do not overwrite flags given before the
    # subcommand (`compress --debug prune ...`).
    default = False if top else argparse.SUPPRESS
    group = parser.add_argument_group("output and debugging")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="log what is happening (INFO level)")
    group.add_argument("--debug", action="store_true", default=default,
                       help="show full tracebacks instead of one-line errors, and DEBUG logs")


def build_parser() -> argparse.ArgumentParser:
    from compress import __version__
    from compress.pruning.arch import supported_model_types
    from compress.pruning.importance import STRUCTURES, available_importances

    types = ", ".join(supported_model_types())
    parser = _Parser(
        prog=PROG,
        formatter_class=_Formatter,
        description=(
            "peft-compress: shrink Hugging Face transformers models by structured pruning.\n\n"
            "Parameters are physically removed (FFN neurons, attention heads, kv heads, whole layers), so\n"
            "the saved folder is smaller and inference is cheaper.\n"
            f"Supported model types: {types}."
        ),
        epilog=(
            "examples:\n"
            "  compress info ./bert-sst2\n"
            "  compress prune ./bert-sst2 --out ./bert-sst2-ffn50 --ratio 0.5 --structures ffn "
            "--data sst2-sample\n"
            "  compress prune --help\n\n"
            "exit status: 0 success, 2 bad arguments or inputs, 1 a run that failed part-way."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # -- prune -------------------------------------------------------------------------------------------
    prune = sub.add_parser(
        "prune",
        formatter_class=_Formatter,
        help="structurally prune a model folder and save the smaller model",
        description=(
            "Structurally prune a model saved with save_pretrained and save the smaller model.\n\n"
            "Scores every prunable unit (FFN neurons, attention heads, kv heads or layers) with the chosen\n"
            "importance criterion, removes the lowest-scoring --ratio of each structure, rewrites the config\n"
            "and saves a safetensors folder with the tokenizer, a model card (README.md) and\n"
            "compress_report.json. Prints parameters, estimated FLOPs and per-layer widths before/after.\n\n"
            "--mode uniform (default) removes the same number of units in every layer, so the result is a\n"
            "standard transformers folder. --mode global ranks units across layers; layers then differ in\n"
            "width and the saved folder needs `import compress` before AutoModel*.from_pretrained."
        ),
        epilog=(
            "examples:\n"
            "  # half of every FFN of a BERT classifier, Taylor importance on the shipped SST-2 sample\n"
            "  compress prune ./bert-sst2 --out ./bert-ffn50 --ratio 0.5 --structures ffn --data sst2-sample\n\n"
            "  # FFN neurons and heads ranked across layers, calibrated on a GLUE folder\n"
            "  compress prune ./bert-sst2 --out ./bert-global --ratio 0.3 --structures ffn,heads \\\n"
            "      --mode global --data glue/SST-2 --num-batches 16\n\n"
            "  # data-free: weight magnitude; whole kv heads of a Llama/Qwen2 model\n"
            "  compress prune ./llama --out ./llama-pruned --ratio 0.25 --structures ffn,kv_heads \\\n"
            "      --importance magnitude\n\n"
            "  # a different fraction per structure\n"
            "  compress prune ./bert-sst2 --out ./bert-mixed --ratio ffn=0.5,layers=0.25 --importance l1\n\n"
            f"supported model types: {types}\n"
            "structures by family (uniform mode / also in global mode):\n"
            "  bert, roberta: ffn, layers / heads\n"
            "  llama, qwen2:  ffn, heads, kv_heads, layers\n"
            "  t5:            ffn, heads (heads always uniform: T5 shares its position bias across layers)\n"
            "`compress info MODEL_DIR` lists what a given model supports."
        ),
    )
    prune.add_argument("model_dir", metavar="MODEL_DIR",
                       help="folder written by save_pretrained (config.json + weights; tokenizer if present)")
    prune.add_argument("--out", "-o", required=True, metavar="DIR",
                       help="folder to write the pruned model to (must not exist unless --overwrite)")
    what = prune.add_argument_group("what to prune")
    what.add_argument("--ratio", default="0.5", metavar="R",
                      help="fraction of each structure to remove, in (0, 1); or per structure, e.g. "
                           "ffn=0.5,heads=0.25 (default: %(default)s)")
    what.add_argument("--structures", default=None, metavar="S[,S...]",
                      help=f"comma-separated structures to prune, from: {', '.join(STRUCTURES)} "
                           "(default: ffn, or the names given in --ratio)")
    what.add_argument("--importance", default="taylor", metavar="NAME",
                      help=f"how units are scored: {', '.join(available_importances())}. taylor and fisher "
                           "use gradients of the task loss on --data; magnitude/l1/l2 (weight norms) and "
                           "random need no data (default: %(default)s)")
    what.add_argument("--mode", default="uniform", choices=("uniform", "global"),
                      help="uniform: same width in every layer, plain transformers folder; global: rank "
                           "units across layers, needs `import compress` to load (default: %(default)s)")
    what.add_argument("--normalize", default="none", choices=("none", "mean", "l2"),
                      help="global mode: scale each layer's scores by their mean / L2 norm before ranking "
                           "across layers, so layers near the loss do not win by scale (default: %(default)s)")
    what.add_argument("--max-keep", type=float, default=None, metavar="F",
                      help="global mode: the largest fraction of its FFN neurons / heads any one layer keeps, "
                           "e.g. 0.6; at least 1 - ratio (default: no cap)")
    what.add_argument("--compensate-bias", action="store_true",
                      help="add removed neurons'/heads' mean contribution (measured on --data) to the output "
                           "projection's bias; projections without a bias are left as they are")
    what.add_argument("--round-to", type=int, default=1, metavar="N",
                      help="keep FFN widths a multiple of N, e.g. 8 or 64 for faster kernels "
                           "(default: %(default)s)")
    data = prune.add_argument_group("calibration data (taylor / fisher)")
    data.add_argument("--data", default=None, metavar="FILE_OR_DATASET",
                      help="'sst2-sample' (shipped), a GLUE-style .tsv/.csv/.jsonl file or folder, or a "
                           "datasets save_to_disk folder. Required by taylor and fisher")
    data.add_argument("--split", default="train",
                      help="split to read from a folder or saved DatasetDict (default: %(default)s)")
    data.add_argument("--num-batches", type=int, default=8, metavar="N",
                      help="calibration batches to score with (default: %(default)s)")
    data.add_argument("--batch-size", type=int, default=16, metavar="N",
                      help="rows per calibration batch (default: %(default)s)")
    data.add_argument("--max-length", type=int, default=128, metavar="N",
                      help="tokens per row (truncation), also the sequence length of the FLOPs estimate; "
                           "capped at the model's position limit (default: %(default)s)")
    model = prune.add_argument_group("loading")
    model.add_argument("--task-type", default="auto", choices=TASK_TYPES,
                       help="which head to load MODEL_DIR with; auto reads `architectures` in config.json "
                            "(default: %(default)s)")
    model.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="tokenizer folder, if not saved in MODEL_DIR (default: MODEL_DIR)")
    model.add_argument("--device", default="auto",
                       help="device to prune on: auto (cuda if available), cpu, cuda, cuda:1, ... "
                            "(default: %(default)s)")
    model.add_argument("--overwrite", action="store_true",
                       help="replace --out if it exists (atomically, after pruning succeeded)")
    model.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _common_flags(prune, top=False)
    prune.set_defaults(func=_cmd_prune)

    # -- info --------------------------------------------------------------------------------------------
    info = sub.add_parser(
        "info",
        formatter_class=_Formatter,
        help="show a model folder's type, parameters, per-layer widths and prunable structures",
        description=(
            "Describe a model folder without loading its weights: architecture, parameter count, per-layer\n"
            "widths, whether loading it needs `import compress` (a compact model from --mode global), the\n"
            "pruning record of a folder written by `compress prune`, and which --structures each --mode\n"
            "supports for this architecture."
        ),
        epilog="example:\n  compress info ./bert-sst2",
    )
    info.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by save_pretrained")
    _common_flags(info, top=False)
    info.set_defaults(func=_cmd_info)
    return parser


# --------------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------------


def _check_ratio(name: str, value: float) -> float:
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise UsageError(f"{name} must be in (0, 1), got {value:g}")
    return value


def parse_ratio(text: str, structures: str | None) -> dict[str, float]:
    """``--ratio``/``--structures`` -> ``{"ffn": 0.5, ...}``, validated (structure names included)."""
    from compress.pruning.engine import normalize_ratios

    names = [s.strip() for s in structures.split(",")] if structures is not None else None
    if names is not None and not all(names):
        raise UsageError(f"--structures has an empty name: {structures!r}; write e.g. ffn,heads")
    text = text.strip()
    if "=" in text:
        ratio: float | dict[str, float] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or not key:
                raise UsageError(f"--ratio: cannot parse {part!r}; write 0.5 or ffn=0.5,heads=0.25")
            if key in ratio:
                raise UsageError(f"--ratio names {key!r} twice; give each structure once, e.g. ffn=0.5,heads=0.25")
            try:
                ratio[key] = _check_ratio(f"--ratio for {key!r}", float(value))
            except ValueError:
                raise UsageError(f"--ratio for {key!r} must be a number in (0, 1), got {value.strip()!r}") \
                    from None
    else:
        try:
            ratio = _check_ratio("--ratio", float(text))
        except ValueError:
            raise UsageError(f"--ratio must be a number in (0, 1), got {text!r}") from None
        if names is None:
            names = ["ffn"]
    return normalize_ratios(ratio, names)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value}")


def _read_config(model_dir: str) -> tuple[Path, dict[str, Any]]:
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
    return path, config


def _check_weight_files(model_dir: Path, required: bool = True) -> None:
    """Refuse pickle-only folders (when weights are ``required``) and unreadable safetensors files before
    anything loads them."""
    from safetensors import SafetensorError, safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files and required:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
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


def _load_config(model_dir: Path):
    """The folder's config through AutoConfig, its validation errors reported on one line naming the file."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    import compress  # noqa: F401  (compact config classes)

    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (StrictDataclassError, OSError, ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"{model_dir / 'config.json'} is not a valid config: {exc}") from None


def _weight_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of every safetensors file in the folder (read from the headers only)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = list(handle.get_slice(key).get_shape())
    return shapes


def shape_mismatches(model_dir: Path, config, auto_name: str) -> list[str]:
    """Tensors whose shape in the folder's weights differs from the shape its config.json implies.

    The model is built on the meta device (nothing allocated); names are matched with or without the
    base-model prefix (a ``BertModel`` checkpoint under a classification head).
    """
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, auto_name).from_config(config)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    problems = []
    for key, shape in _weight_shapes(model_dir).items():
        for candidate in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            if candidate in expected:
                if expected[candidate] != shape:
                    problems.append(f"{key} is {shape} in the weights but {expected[candidate]} by the config")
                break
    return problems


def _why_different(structure: str, round_to: int) -> str:
    if structure == "ffn" and round_to > 1:
        return f"widths are kept a multiple of --round-to {round_to}"
    return {"ffn": "whole neurons per layer", "heads": "whole heads, the same number per kv group",
            "kv_heads": "whole kv heads per layer", "layers": "whole layers"}.get(structure, "whole units")


def _adapter_class(model_type: str):
    """The architecture adapter class for a config's ``model_type``, or None when unsupported."""
    from compress.pruning.arch import ADAPTERS, base_model_type

    base = base_model_type(model_type or "")
    return next((cls for cls in ADAPTERS if base in cls.model_types), None)


def _require_supported(model_type: str, model_dir: Path):
    from compress.errors import UnsupportedModelError
    from compress.pruning.arch import supported_model_types

    adapter_cls = _adapter_class(model_type)
    if adapter_cls is None:
        raise UnsupportedModelError(
            f"{model_dir}: model_type {model_type or '(none)'!r} is not supported for structured pruning; "
            f"supported model types: {', '.join(supported_model_types())}")
    return adapter_cls


def resolve_task(config: Mapping[str, Any], task_type: str = "auto") -> tuple[str | None, str]:
    """(task type or None, transformers Auto class name) for a config.json dict and ``--task-type``."""
    if task_type != "auto":
        return task_type, TASK_AUTO_CLASSES[task_type]
    for arch in config.get("architectures") or []:
        for suffix, task in _ARCH_SUFFIXES:
            if str(arch).endswith(suffix):
                return task, TASK_AUTO_CLASSES[task]
        for suffix, auto in (("ForTokenClassification", "AutoModelForTokenClassification"),
                             ("ForQuestionAnswering", "AutoModelForQuestionAnswering")):
            if str(arch).endswith(suffix):
                return None, auto
        if str(arch).endswith("Model"):
            return None, "AutoModel"
    adapter_cls = _adapter_class(str(config.get("model_type", "")))
    if adapter_cls is not None:
        task = _FAMILY_DEFAULT_TASK[adapter_cls.family]
        logger.info("config.json names no architecture: loading as %s (set --task-type to change)", task)
        return task, TASK_AUTO_CLASSES[task]
    return None, "AutoModel"


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _load_tokenizer(folder: Path, explicit: bool):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise UsageError(f"--tokenizer {str(folder)!r} is not a folder")
    if not _has_tokenizer(folder):
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


def _position_limit(config, tokenizer) -> int | None:
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if str(config.model_type).removeprefix("compressed_") == "roberta":
            positions -= (getattr(config, "pad_token_id", None) or 0) + 1  # positions start after pad
        limits.append(positions)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    return min(limits) if limits else None


def _resolve_device(name: str):
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


# --------------------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------------------


def build_calibration(dataset, tokenizer, model, task: str | None, *, max_length: int, batch_size: int,
                      num_batches: int) -> list[dict]:
    """Tokenise ``dataset`` and cut it into calibration batches whose ``labels`` suit the model's head.

    Sequence classification keeps the class labels; causal, masked and seq2seq LMs are scored on the
    text itself (``labels`` = ``input_ids`` with padding ignored), whatever labels the data has.
    """
    import torch

    from compress.data import calibration_batches, tokenize_dataset

    if task is None:
        raise UsageError(
            f"{type(model).__name__} has no task loss to score with; pass --task-type "
            f"({', '.join(TASK_AUTO_CLASSES)}) or use --importance magnitude")
    if tokenizer.pad_token_id is None:
        # decoder-only tokenizers often have no pad token: pad with EOS for calibration only
        if getattr(tokenizer, "eos_token", None) is None:
            raise UsageError("the tokenizer has neither a pad nor an eos token; cannot pad calibration batches")
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    tokenized = tokenize_dataset(dataset, tokenizer, max_length=max_length)
    classify = task == "sequence-classification"
    if classify:
        if "labels" not in tokenized.column_names:
            raise UsageError("--data has no label column; sequence classification is scored on its labels")
        labels = tokenized["labels"]
        num_labels = int(getattr(model.config, "num_labels", 0) or 0)
        missing = next((i for i, label in enumerate(labels) if label is None), None)
        if missing is not None:
            raise UsageError(f"--data row {missing + 1} has no label (a missing field, or an unterminated quote "
                             "that swallowed the rest of the file?)")
        if num_labels != 1:
            fractional = next((label for label in labels if float(label) != int(label)), None)
            if fractional is not None:
                raise UsageError(f"--data has label {fractional!r}, but a classifier with num_labels={num_labels} "
                                 "needs integer class ids 0..num_labels-1")
            labels = [int(label) for label in labels]
            if tokenized.features["labels"].dtype != "int64":
                from datasets import Value

                tokenized = tokenized.cast_column("labels", Value("int64"))  # 1.0 -> 1: a class id, not a target
        if any(label < 0 for label in labels):
            raise UsageError("--data has unlabelled rows (label -1, e.g. a GLUE test file); use a labelled "
                             "split such as --split train")
        if num_labels and max(labels) >= num_labels:
            raise UsageError(f"--data has label {max(labels)} but the model has num_labels={num_labels}")
    batches = calibration_batches(tokenized, batch_size=batch_size, num_batches=num_batches,
                                  tokenizer=tokenizer, include_labels=classify)
    if not classify:
        for batch in batches:
            ids = batch["input_ids"]
            mask = batch.get("attention_mask", torch.ones_like(ids))
            batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batches


# --------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------


def format_widths(values: Sequence[int]) -> str:
    """``[64, 64]`` -> ``64 (all 2)``; unequal widths listed, or summarised when there are many."""
    values = list(values)
    if not values:
        return "-"
    if len(set(values)) == 1:
        return f"{values[0]:,} (all {len(values)})" if len(values) > 1 else f"{values[0]:,}"
    if len(values) <= 12:
        return "[" + ", ".join(str(v) for v in values) + "]"
    return f"{min(values)}..{max(values)}, mean {sum(values) / len(values):.1f} over {len(values)}"


def format_size(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover


def _kept(after: float, before: float) -> str:
    return f"{after / before:.1%}" if before else ""


def summary_rows(report, flops_before: int | None, flops_after: int | None, seq_len: int) -> list[dict]:
    rows: list[dict[str, Any]] = [{
        "": "parameters", "before": report.params_before, "after": report.params_after,
        "kept": _kept(report.params_after, report.params_before),
    }]
    if flops_before is not None and flops_after is not None:
        rows.append({"": f"FLOPs, one 1x{seq_len} forward", "before": flops_before, "after": flops_after,
                     "kept": _kept(flops_after, flops_before)})
    def widths(table: Mapping[str, list[int]], name: str) -> list[int]:
        # the adapter lists kv_heads only where they differ from the query heads
        return list(table.get(name) or (table.get("heads", []) if name == "kv_heads" else []))

    for name in dict.fromkeys([*report.widths_before, *report.widths_after]):
        before, after = widths(report.widths_before, name), widths(report.widths_after, name)
        rows.append({"": _STRUCTURE_LABELS.get(name, name), "before": format_widths(before),
                     "after": format_widths(after), "kept": _kept(sum(after), sum(before))})
    return rows


def _flops(model, seq_len: int) -> int | None:
    import torch

    from compress.measure import estimate_flops

    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    ids = torch.full((1, seq_len), min(5, max(vocab - 1, 0)), dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids.clone()
    was_training = model.training
    model.eval()
    try:
        return estimate_flops(model, inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        logger.warning("could not estimate FLOPs (%s)", exc)
        return None
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' and datasets' progress bars off for the block (restored afterwards)."""
    import datasets
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not enabled:
            if was[0]:
                hf_logging.enable_progress_bar()
            if was[1]:
                datasets.enable_progress_bars()


def _cmd_prune(args: argparse.Namespace) -> int:
    with _progress_bars(not args.no_progress):
        return _prune(args)


def _prune(args: argparse.Namespace) -> int:
    from compress.errors import CalibrationError, CompressError, UnsupportedStructureError
    from compress.export import check_output_folder, needs_compress_to_load, removed_summary, save_pretrained
    from compress.measure import folder_size, format_table
    from compress.pruning.engine import check_max_keep, check_support, prune_model
    from compress.pruning.importance import available_importances, get_importance

    # -- validate everything cheap before loading anything ------------------------------------------------
    ratios = parse_ratio(args.ratio, args.structures)
    importance = args.importance.lower()
    if importance not in available_importances():
        raise UsageError(f"unknown importance {args.importance!r}; choose from {', '.join(available_importances())}")
    criterion = get_importance(importance)
    for name in ("num_batches", "batch_size", "max_length", "round_to"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    try:
        check_max_keep(args.max_keep, ratios, args.mode)
    except CompressError as exc:
        raise UsageError(str(exc).replace("max_keep", "--max-keep").replace("mode='global'", "--mode global")) \
            from None
    model_dir, config_dict = _read_config(args.model_dir)
    model_type = str(config_dict.get("model_type", ""))
    adapter_cls = _require_supported(model_type, model_dir)
    try:
        check_support(adapter_cls, ratios, args.mode)  # the class's structure tables suffice
    except UnsupportedStructureError as exc:
        message = str(exc).replace("mode='global'", "--mode global").replace("mode='uniform'", "--mode uniform")
        raise UsageError(message) from None
    out = Path(args.out).expanduser()
    if out.resolve() == model_dir.resolve():
        raise UsageError("--out is MODEL_DIR itself; write the pruned model to a new folder")
    inputs = [model_dir, args.tokenizer, args.data]
    check_output_folder(out, overwrite=args.overwrite, inputs=inputs, option="--overwrite", name=f"--out {args.out}")
    device = _resolve_device(args.device)
    _check_weight_files(model_dir)
    config = _load_config(model_dir)

    dataset = None
    if criterion.needs_calibration or args.compensate_bias:
        if not args.data:
            needs = (f"--importance {importance} scores units with the task loss" if criterion.needs_calibration
                     else "--compensate-bias measures mean activations")
            raise CalibrationError(
                f"{needs} and needs --data (e.g. --data sst2-sample or a .tsv file); or use --importance "
                "magnitude without --compensate-bias, which needs no data")
        from compress.data import load_task

        try:
            dataset = load_task(args.data, split=args.split)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--data: {exc}") from None
    elif args.data:
        logger.warning("--data ignored: --importance %s needs no calibration data", importance)

    task, auto_name = resolve_task(config_dict, args.task_type)
    tokenizer_dir = Path(args.tokenizer).expanduser() if args.tokenizer else model_dir
    tokenizer = _load_tokenizer(tokenizer_dir, explicit=args.tokenizer is not None)
    if dataset is not None and tokenizer is None:
        raise UsageError(f"--data needs a tokenizer, and {model_dir} has none; pass --tokenizer DIR")

    import transformers

    import compress  # noqa: F401  (registers the compact model classes with the Auto classes)

    auto_cls = getattr(transformers, auto_name)
    mismatches = shape_mismatches(model_dir, config, auto_name)
    if mismatches:
        raise UsageError(f"{model_dir / 'config.json'} disagrees with the weights: {mismatches[0]}"
                         + (f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else "")
                         + "; fix config.json or re-save the model with save_pretrained")
    logger.info("loading %s with %s", model_dir, auto_name)
    try:
        model = auto_cls.from_pretrained(str(model_dir), config=config, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise UsageError(f"cannot load {model_dir} with {auto_name}: {exc}") from None
    model.to(device)
    model.eval()

    seq_len = args.max_length
    limit = _position_limit(model.config, tokenizer)
    if limit is not None and seq_len > limit:
        logger.warning("--max-length %d exceeds the model's limit of %d positions; using %d",
                       seq_len, limit, limit)
        seq_len = limit

    batches = None
    if dataset is not None:
        batches = build_calibration(dataset, tokenizer, model, task, max_length=seq_len,
                                    batch_size=args.batch_size, num_batches=args.num_batches)

    # -- prune, measure, save: failures from here on are runtime errors (exit 1) -------------------------
    with _run_phase():
        started = time.perf_counter()
        flops_before = _flops(model, seq_len)
        report = prune_model(model, ratio=ratios, structures=list(ratios), importance=importance,
                             data=batches, mode=args.mode, num_batches=args.num_batches,
                             batch_size=args.batch_size, round_to=args.round_to, tokenizer=tokenizer,
                             progress=not args.no_progress, normalize=args.normalize,
                             compensate_bias=args.compensate_bias, max_keep=args.max_keep)
        elapsed = time.perf_counter() - started
        flops_after = _flops(model, seq_len)
        model.to("cpu")
        saved = save_pretrained(model, out, tokenizer=tokenizer, report=report, overwrite=args.overwrite,
                                inputs=inputs, option="--overwrite")
        size = folder_size(saved)

    for name, asked in ratios.items():
        achieved = report.achieved_ratios[name]
        if f"{achieved:.0%}" != f"{asked:.0%}":
            logger.warning("%s: removed %.1f%%, not the %.1f%% asked (%s)", name, 100 * achieved, 100 * asked,
                           _why_different(name, args.round_to))
    removed = removed_summary(report.to_dict())
    calibration = f", {len(batches)} calibration batches" if batches else ""
    _out(f"Pruned {model_type} ({type(model).__name__}): removed {removed}; {args.mode} mode, "
         f"{importance} importance{calibration}; {elapsed:.1f} s")
    _out()
    _out(format_table(summary_rows(report, flops_before, flops_after, seq_len)))
    _out()
    contents = "weights, config, " + ("tokenizer, " if tokenizer is not None else "no tokenizer, ")
    _out(f"saved:   {saved} ({format_size(size)}: {contents}model card README.md, compress_report.json)")
    if needs_compress_to_load(model):
        _out(f"loading: compact model (model_type {model.config.model_type}, widths the standard config cannot "
             f"express): run `import compress` before {auto_name}.from_pretrained")
    else:
        _out(f"loading: standard transformers folder, {auto_name}.from_pretrained works without "
             "`import compress`")
    return 0


def _count_weights(folder: Path) -> int | None:
    """Number of values in the folder's safetensors files (read from their headers only)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def _meta_model(config, auto_name: str):
    """The model built on the meta device from its config: structure without reading the weights."""
    import torch
    import transformers

    with torch.device("meta"):
        return getattr(transformers, auto_name).from_config(config)


def _cmd_info(args: argparse.Namespace) -> int:
    from compress.export import removed_summary
    from compress.measure import count_parameters, folder_size, format_table
    from compress.pruning.arch import get_adapter, supported_model_types
    from compress.pruning.compact import PREFIX

    model_dir, config = _read_config(args.model_dir)
    model_type = str(config.get("model_type", ""))
    architectures = ", ".join(config.get("architectures") or []) or "(not recorded)"
    adapter_cls = _adapter_class(model_type)
    _, auto_name = resolve_task(config)

    _check_weight_files(model_dir, required=False)
    loaded_config = _load_config(model_dir)
    model = None
    try:
        model = _meta_model(loaded_config, auto_name)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
        logger.info("cannot build %s from its config (%s)", auto_name, exc)
    mismatches = shape_mismatches(model_dir, loaded_config, auto_name) if model is not None else []
    weights = _count_weights(model_dir)
    params = count_parameters(model) if model is not None else weights
    has_weights = weights is not None or any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt"))

    compact = model_type.startswith(PREFIX)
    _out(f"folder:       {model_dir.resolve()} ({format_size(folder_size(model_dir))})")
    _out(f"architecture: {architectures} (model_type {model_type or '?'})")
    if params is None:
        _out("parameters:   unknown (no safetensors weights)")
    else:
        _out(f"parameters:   {params:,}" + ("" if has_weights else " (from config.json; no weight files in folder)"))
    if compact:
        _out(f"loading:      needs `import compress` (compact per-layer widths), then {auto_name}.from_pretrained")
    else:
        _out(f"loading:      standard transformers folder ({auto_name}.from_pretrained)")
    _out(f"tokenizer:    {'yes' if _has_tokenizer(model_dir) else 'no'}")
    if mismatches:
        _out(f"weights:      DISAGREE with config.json in {len(mismatches)} tensors, e.g. {mismatches[0]}")

    report_file = model_dir / "compress_report.json"
    if report_file.is_file():
        try:
            rep = json.loads(report_file.read_text(encoding="utf-8"))
            removed = removed_summary(rep)
            _out(f"pruned:       {removed} removed ({rep.get('mode')} mode, {rep.get('importance')} importance); "
                 f"params {rep.get('params_before', 0):,} -> {rep.get('params_after', 0):,}")
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            logger.warning("cannot read %s: %s", report_file, exc)

    if adapter_cls is None:
        _out(f"pruning:      model_type {model_type or '?'!r} is not supported for structured pruning "
             f"(supported: {', '.join(supported_model_types())})")
        return _info_status(model_dir, mismatches)
    if model is not None:
        widths = get_adapter(model).widths()
        _out()
        _out(format_table([{"structure": _STRUCTURE_LABELS.get(name, name), "per layer": format_widths(values),
                            "total": sum(values)} for name, values in widths.items()]))
    uniform = ", ".join(adapter_cls.uniform_structures)
    extra = [s for s in adapter_cls.supported_structures if s not in adapter_cls.uniform_structures]
    _out()
    _out("prunable structures (compress prune --structures ...):")
    _out(f"  --mode uniform: {uniform}  (result loads with plain transformers)")
    note = ""
    if adapter_cls.uniform_only_structures:
        note = f"; {', '.join(adapter_cls.uniform_only_structures)} stay equal across layers"
    _out(f"  --mode global:  {', '.join(adapter_cls.supported_structures)}  "
         f"(per-layer widths need `import compress` to load{note})"
         + (f"; {', '.join(extra)} only in global mode" if extra else ""))
    return _info_status(model_dir, mismatches)


def _info_status(model_dir: Path, mismatches: list[str]) -> int:
    """0, or the one-line error for weights that the config contradicts (the folder would not load)."""
    if mismatches:
        raise UsageError(f"{model_dir / 'config.json'} disagrees with the weights in {len(mismatches)} tensors, "
                         f"e.g. {mismatches[0]}; the folder will not load: fix config.json or re-save the model")
    return 0


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the ``compress`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else 0
        debug = bool(getattr(args, "debug", False))
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return 2
        with _cli_logging(bool(getattr(args, "verbose", False)), debug):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except _RunFailed as exc:
        if debug:
            raise exc.cause from None
        sys.stderr.write(_err_line(exc.cause) + "\n")
        return 1
    except _EXPECTED_ERRORS as exc:
        if debug:
            raise
        sys.stderr.write(_err_line(exc) + "\n")
        return 2
