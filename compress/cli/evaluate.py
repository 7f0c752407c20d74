"""``compress eval``: perplexity of a causal LM (a folder or a Hub id) on a text, printed and saved with its
protocol.

:func:`is_local_model`, :func:`check_local_causal_lm` and :func:`load_causal_lm` are how the command finds and
loads the model; the recipes that take a causal LM (``recipes/llm_prune.py``, the benchmark's decoder track) load
theirs with them too."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

from .errors import UsageError
from .inputs import check_weight_files, load_config, load_tokenizer, read_config_json, resolve_device, resolve_task
from .parser import EVAL_DATASET, EVAL_DATASET_CONFIG
from .prune import progress_bars
from .summary import out

logger = logging.getLogger("compress.cli")

#: the keys that mark a JSON file as a result of ``compress eval`` (which ``--overwrite`` may replace)
_RESULT_KEYS = ("perplexity", "protocol", "model")


def _positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be a positive integer, got {value}")


def _check_out(path: Path, overwrite: bool, inputs: list[Path]) -> None:
    """``--out`` must be a new file, or with ``--overwrite`` an earlier result of compress eval (never an input)."""
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; name a file, e.g. {path / 'perplexity.json'}")
    resolved = path.resolve()
    for given in inputs:
        if given.exists() and (resolved == given.resolve() or given.resolve() in resolved.parents):
            raise UsageError(f"--out {path} is one of the inputs ({given}); write the result to a new file")
    if not path.exists():
        if path.parent.exists() and not path.parent.is_dir():
            raise UsageError(f"--out {path}: {path.parent} is a file, not a folder")
        return
    if not overwrite:
        raise UsageError(f"--out {path} already exists; choose another file or pass --overwrite")
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        earlier = None
    if not (isinstance(earlier, dict) and all(key in earlier for key in _RESULT_KEYS)):
        raise UsageError(f"--out {path} exists and is not a result of compress eval; --overwrite replaces only "
                         "those: choose another file")


class LocalCausalLM(NamedTuple):
    """A local causal-LM folder, checked before anything loads (:func:`check_local_causal_lm`)."""

    folder: Path
    #: the folder's config, through AutoConfig
    config: Any
    #: the name of the transformers Auto class that loads it, e.g. ``AutoModelForCausalLM``
    auto_class: str


def is_local_model(name: str) -> bool:
    """Whether a model name is a local path rather than a Hub id (``owner/name``): it exists, starts with ``.``,
    ``/`` or ``~``, or has more than one ``/`` or a backslash."""
    path = Path(name).expanduser()
    return path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_local_causal_lm(name: str) -> LocalCausalLM:
    """The folder ``name``, its config and Auto class, checked before any weight loads: config.json valid, a
    causal LM, weight files present when there are any. Raises :class:`UsageError` (one line) otherwise."""
    model_dir, config_dict = read_config_json(name)
    task, auto_name = resolve_task(config_dict)
    if task != "causal-lm":
        architectures = ", ".join(config_dict.get("architectures") or []) or config_dict.get("model_type", "?")
        raise UsageError(f"{model_dir} holds a {architectures} ({task or 'no known task'}): compress eval measures "
                         "the perplexity of causal LMs")
    check_weight_files(model_dir, required=False)
    return LocalCausalLM(model_dir, load_config(model_dir, config_dict), auto_name)


def load_causal_lm(name: str, local: LocalCausalLM | None = None, dtype: str = "float32",
                   tokenizer: str | None = None, *, option: str = "MODEL") -> tuple[Any, Any]:
    """The causal LM ``name`` names and its tokenizer, as ``compress eval`` loads them.

    Args:
        name: a local folder or a Hub model id; a Hub id goes through ``from_pretrained`` (the Hugging Face cache,
            or the network unless ``HF_HUB_OFFLINE`` is set).
        local: what :func:`check_local_causal_lm` found for a local ``name``; ``None`` checks a local ``name``
            here and loads anything else from the Hub.
        dtype: the torch dtype to load in, by name (``float32``, ``bfloat16``, ``float16``).
        tokenizer: a tokenizer folder, when the model has none of its own.
        option: how the caller's command line names ``name`` in errors (``MODEL``, ``--model``, ...).

    Raises:
        UsageError: one line naming ``name`` and the fix: no tokenizer, a folder the Auto class cannot load, or a Hub
            id that is neither in the cache nor reachable.
    """
    import torch
    import transformers

    if local is None and is_local_model(name):
        local = check_local_causal_lm(name)
    torch_dtype = getattr(torch, dtype)
    explicit_tokenizer = Path(tokenizer).expanduser() if tokenizer else None
    if local is not None:
        model_dir, config, auto_name = local
        loaded_tokenizer = load_tokenizer(explicit_tokenizer or model_dir, explicit=explicit_tokenizer is not None)
        if loaded_tokenizer is None:
            raise UsageError(f"{model_dir} holds no tokenizer; pass --tokenizer DIR")
        try:
            model = getattr(transformers, auto_name).from_pretrained(str(model_dir), config=config, dtype=torch_dtype,
                                                                     local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise UsageError(f"cannot load {model_dir} with {auto_name}: {exc}") from None
        return model, loaded_tokenizer
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        loaded_tokenizer = load_tokenizer(explicit_tokenizer, explicit=True) if explicit_tokenizer else \
            transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())  # one line: transformers' messages span several
        raise UsageError(f"{option} {name!r} is no local folder, and loading it from the Hub failed ({reason}); pass a "
                         "folder written by save_pretrained (offline, the Hub is out of reach)") from None
    return model, loaded_tokenizer


def run(args: argparse.Namespace) -> int:
    with progress_bars(not args.no_progress):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    from compress.data import load_text
    from compress.evaluate import evaluate_perplexity
    from compress.export import write_text_atomically

    # -- cheap checks first: flags, --out, the device ------------------------------------------------------
    for flag, value in (("--max-tokens", args.max_tokens), ("--window", args.window), ("--stride", args.stride),
                        ("--batch-size", args.batch_size)):
        _positive(flag, value)
    if args.stride is not None and args.stride > args.window:
        raise UsageError(f"--stride {args.stride} is larger than --window {args.window}: tokens between windows "
                         "would not be scored; use at most the window")
    inputs = [Path(p).expanduser() for p in (args.model, args.data, args.tokenizer) if p]
    out_file = Path(args.out).expanduser() if args.out else None
    if out_file is not None:
        _check_out(out_file, args.overwrite, inputs)
    device = resolve_device(args.device)
    local = check_local_causal_lm(args.model) if is_local_model(args.model) else None
    if local is not None:
        from compress.evaluate import position_limit

        limit = position_limit(local[1])
        if limit is not None and args.window > limit:
            raise UsageError(f"--window {args.window} exceeds the model's {limit} positions; use at most {limit}")

    # -- the text, then the model ----------------------------------------------------------------------------
    if args.data is None:
        corpus = load_text(EVAL_DATASET, config_name=args.data_config or EVAL_DATASET_CONFIG, split=args.split,
                           text_column=args.text_column)
    else:
        corpus = load_text(args.data, config_name=args.data_config, split=args.split, text_column=args.text_column)
    model, tokenizer = load_causal_lm(args.model, local, args.dtype, args.tokenizer)
    model_name = str(local[0]) if local is not None else args.model
    model.to(device)

    started = time.perf_counter()
    result = evaluate_perplexity(model, tokenizer, corpus, max_tokens=args.max_tokens, window=args.window,
                                 stride=args.stride, batch_size=args.batch_size, progress=not args.no_progress)
    elapsed = time.perf_counter() - started
    parameters = model.num_parameters() if hasattr(model, "num_parameters") else None
    out(f"perplexity: {result.perplexity:.2f} (loss {result.loss:.4f} nats per token)")
    out(f"protocol:   {result.describe_protocol()}")
    out(f"model:      {model_name} ({type(model).__name__}" + (f", {parameters:,} parameters" if parameters else "")
        + f"); {elapsed:.1f} s on {device}")
    if out_file is not None:
        from compress import __version__

        record = {"model": model_name, "model_class": type(model).__name__, "parameters": parameters,
                  **result.to_dict(), "seconds": round(elapsed, 1), "device": str(device),
                  "peft_compress": __version__}
        write_text_atomically(out_file, json.dumps(record, indent=2) + "\n")
        out(f"saved:      {out_file}")
    return 0
