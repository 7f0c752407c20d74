"""``compress eval``: perplexity of a causal LM (a folder or a Hub id) on a text, printed and saved with its
protocol."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

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


def _is_local(name: str) -> bool:
    """Whether MODEL names a local path rather than a Hub id (``owner/name``)."""
    path = Path(name).expanduser()
    return path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _local_model(name: str):
    """``(folder, config, Auto class name)`` of a local causal-LM folder, checked before anything loads."""
    model_dir, config_dict = read_config_json(name)
    task, auto_name = resolve_task(config_dict)
    if task != "causal-lm":
        architectures = ", ".join(config_dict.get("architectures") or []) or config_dict.get("model_type", "?")
        raise UsageError(f"{model_dir} holds a {architectures} ({task or 'no known task'}): compress eval measures "
                         "the perplexity of causal LMs")
    check_weight_files(model_dir, required=False)
    return model_dir, load_config(model_dir, config_dict), auto_name


def _load_model(name: str, local, dtype_name: str, tokenizer_option: str | None):
    """The causal LM MODEL names (``local``: what :func:`_local_model` found, or ``None`` for a Hub id) in
    ``dtype_name``, and its tokenizer."""
    import torch
    import transformers

    dtype = getattr(torch, dtype_name)
    explicit_tokenizer = Path(tokenizer_option).expanduser() if tokenizer_option else None
    if local is not None:
        model_dir, config, auto_name = local
        tokenizer = load_tokenizer(explicit_tokenizer or model_dir, explicit=explicit_tokenizer is not None)
        if tokenizer is None:
            raise UsageError(f"{model_dir} holds no tokenizer; pass --tokenizer DIR")
        try:
            model = getattr(transformers, auto_name).from_pretrained(str(model_dir), config=config, dtype=dtype,
                                                                     local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise UsageError(f"cannot load {model_dir} with {auto_name}: {exc}") from None
        return model, tokenizer
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = load_tokenizer(explicit_tokenizer, explicit=True) if explicit_tokenizer else \
            transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UsageError(f"MODEL {name!r} is no local folder, and loading it from the Hub failed ({exc}); pass a "
                         "folder written by save_pretrained (offline, the Hub is out of reach)") from None
    return model, tokenizer


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
    local = _local_model(args.model) if _is_local(args.model) else None
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
    model, tokenizer = _load_model(args.model, local, args.dtype, args.tokenizer)
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
