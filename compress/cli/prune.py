"""``compress prune``: validate every input, load, score, prune, save atomically, print what changed."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import RunFailed, UsageError
from .inputs import (
    build_calibration,
    build_meta_model,
    build_text_calibration,
    check_weight_files,
    load_config,
    load_tokenizer,
    position_limit,
    read_config_json,
    resolve_device,
    resolve_task,
    shape_mismatches,
)
from .parser import MAX_LENGTH, TEXT_ROW_LENGTH
from .prunable import family_type, is_multi_exit, prunable, pruned_module, refuse_unavailable
from .summary import format_size, forward_flops, out, summary_rows

logger = logging.getLogger("compress.cli")

_WHOLE_UNITS = {"ffn": "whole neurons per layer", "heads": "whole heads, the same number per kv group",
                "kv_heads": "whole kv heads per layer", "layers": "whole layers"}


@contextlib.contextmanager
def _run_phase() -> Iterator[None]:
    """Errors raised inside happen after the inputs were validated: exit status 1, not 2."""
    from compress.errors import NothingToPruneError

    try:
        yield
    except NothingToPruneError:
        raise  # the request cannot be met by this model: a bad input (exit 2), found once scores exist
    except (ValueError, OSError) as exc:
        raise RunFailed(exc) from exc


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
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


@contextlib.contextmanager
def pruning_target(model) -> Iterator:
    """The module to give :func:`compress.prune_model`: the model, or a multi-exit model's backbone while its forward
    returns the loss of every exit (so that the scores keep what each exit needs)."""
    every_exit_loss = getattr(model, "every_exit_loss", None)
    if every_exit_loss is None:
        yield model
        return
    with every_exit_loss() as backbone:
        yield backbone


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise UsageError(f"{flag} must be a positive integer, got {value}")


def criterion_name(option: str) -> str:
    """The criterion ``--importance`` names: ``NAME`` as it is, or for ``MODULE:NAME`` the NAME that MODULE registers
    with :func:`compress.register_importance` when imported (from the current folder or ``PYTHONPATH``, as
    ``python -m`` would find it). The library then checks the name against every registered criterion."""
    from compress.pruning.importance import available_importances

    module, colon, name = option.partition(":")
    if not colon:
        if option.lower() not in available_importances():
            raise UsageError(f"--importance {option}: unknown criterion; choose one of "
                             f"{', '.join(available_importances())}, or MODULE:NAME for a criterion that a module "
                             "of yours registers with compress.register_importance")
        return option
    if not module or not name:
        raise UsageError(f"--importance {option}: expected NAME or MODULE:NAME (e.g. my_criteria:entropy)")
    folder = os.getcwd()
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module + ".").startswith(exc.name + "."):
            raise UsageError(f"--importance {option}: there is no module {exc.name!r} in the current folder or on "
                             "PYTHONPATH") from None
        raise UsageError(f"--importance {option}: importing {module} failed ({exc})") from exc
    except Exception as exc:  # the user's module: any failure is theirs to fix (--debug shows the traceback)
        raise UsageError(f"--importance {option}: importing {module} failed ({type(exc).__name__}: {exc})") from exc
    finally:
        if added:
            sys.path.remove(folder)
    if name.lower() not in available_importances():
        raise UsageError(f"--importance {option}: {module} registers no criterion {name!r} (registered: "
                         f"{', '.join(available_importances())}); call compress.register_importance({name!r}, "
                         "YourImportance) in it")
    return name


def run(args: argparse.Namespace) -> int:
    with progress_bars(not args.no_progress):
        return _prune(args)


def _prune(args: argparse.Namespace) -> int:
    from compress.errors import CalibrationError
    from compress.export import check_output_folder, needs_compress_to_load, removed_summary, save_pretrained
    from compress.measure import folder_size, format_table
    from compress.pruning.arch import arch_spec, base_model_type, spec_class, supported_model_types
    from compress.pruning.engine import check_support, check_uniform_result, prune_model
    from compress.pruning.importance import get_importance
    from compress.pruning.reconstruct import check_reconstructable
    from compress.pruning.spec import RECONSTRUCTED_STRUCTURES, PruningSpec, parse_sparsity

    # -- validate everything cheap before loading anything ------------------------------------------------
    for name in ("num_batches", "batch_size", "max_length"):
        if getattr(args, name) is not None:
            _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    damping = {} if args.damping is None else {"damping": args.damping}
    sparsity = parse_sparsity(args.sparsity) if args.sparsity is not None else None
    spec = PruningSpec.from_options(sparsity, args.structures, mode=args.mode, param_sparsity=args.param_sparsity,
                                    importance=criterion_name(args.importance), normalize=args.normalize,
                                    max_keep=args.max_keep, min_keep=args.min_keep, round_to=args.round_to,
                                    compensate_bias=args.compensate_bias, reconstruct=args.reconstruct, **damping)
    criterion = get_importance(spec.importance)
    model_dir, config_dict = read_config_json(args.model_dir)
    model_type = str(config_dict.get("model_type", ""))
    spec_cls = spec_class(family_type(config_dict))  # a multi-exit model: its backbone's family
    if spec_cls is None:
        raise UsageError(f"{model_dir}: model_type {model_type or '(none)'!r} is not supported for structured "
                         f"pruning; supported model types: {', '.join(supported_model_types())}")
    check_support(spec_cls, spec.sparsity, spec.mode)  # the family's structure tables suffice
    out_dir = Path(args.out).expanduser()
    if out_dir.resolve() == model_dir.resolve():
        raise UsageError("--out is MODEL_DIR itself; write the pruned model to a new folder")
    inputs = [model_dir, args.tokenizer, args.data]
    check_output_folder(out_dir, overwrite=args.overwrite, inputs=inputs, option="--overwrite",
                        name=f"--out {args.out}")
    device = resolve_device(args.device)
    check_weight_files(model_dir)
    config = load_config(model_dir, config_dict)
    task, auto_name = resolve_task(config_dict, args.task_type)
    structure = build_meta_model(model_dir, config, auto_name)  # the model's shapes, nothing allocated
    mismatches = shape_mismatches(model_dir, structure)
    if mismatches:
        raise UsageError(f"{model_dir / 'config.json'} disagrees with the weights: {mismatches[0]}"
                         + (f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else "")
                         + "; fix config.json or re-save the model with save_pretrained")
    # a multi-exit model, or one whose widths differ per layer, allows less than its family: as info lists
    arch = arch_spec(pruned_module(structure))
    per_layer_widths = not arch.fits_standard_config()
    refuse_unavailable(prunable(spec_cls, model_type, per_layer_widths), spec.sparsity, spec.mode, str(model_dir))
    # what the engine refuses before calibrating, refused here before the weights load
    if spec.reconstruct != "none":
        check_reconstructable(arch)
    if spec.compensate_bias:
        arch.check_output_biases([s for s in spec.sparsity if s in RECONSTRUCTED_STRUCTURES])
    check_uniform_result(arch, spec)
    del structure, arch

    reconstruct = spec.reconstruct != "none"
    text_rows = task == "causal-lm"  # a causal LM calibrates on rows of text; other heads on labelled rows
    dataset = corpus = None
    if criterion.needs_calibration or spec.compensate_bias or reconstruct:
        if not args.data:
            if criterion.needs_calibration and getattr(criterion, "needs_gradients", True):
                needs = f"--importance {spec.importance_name} scores units with the task loss"
            elif criterion.needs_calibration:
                needs = f"--importance {spec.importance_name} scores units by their activations"
            elif reconstruct:
                needs = f"--reconstruct {spec.reconstruct} refits the kept weights on calibration activations"
            else:
                needs = "--compensate-bias measures mean activations"
            example = "a text file, e.g. --data valid.tokens.txt" if text_rows else "e.g. --data sst2-sample or a " \
                ".tsv file"
            raise CalibrationError(
                f"{needs} and needs --data ({example}); or use --importance magnitude without --compensate-bias "
                "and --reconstruct, which needs no data")
        if text_rows:
            from compress.data import load_text

            corpus = load_text(args.data, split=args.split, config_name=args.data_config,
                               text_column=args.text_column)
        else:
            from compress.data import load_task

            for flag, value in (("--text-column", args.text_column), ("--data-config", args.data_config)):
                if value is not None:
                    logger.warning("%s ignored: it applies to the text a causal LM calibrates on", flag)
            try:
                dataset = load_task(args.data, split=args.split)
            except (FileNotFoundError, ValueError) as exc:
                raise UsageError(f"--data: {exc}") from None
    elif args.data:
        logger.warning("--data ignored: --importance %s needs no calibration data", spec.importance_name)

    tokenizer_dir = Path(args.tokenizer).expanduser() if args.tokenizer else model_dir
    tokenizer = load_tokenizer(tokenizer_dir, explicit=args.tokenizer is not None)
    if (dataset is not None or corpus is not None) and tokenizer is None:
        raise UsageError(f"--data needs a tokenizer, and {model_dir} has none; pass --tokenizer DIR")

    import transformers

    logger.info("loading %s with %s", model_dir, auto_name)
    try:
        model = getattr(transformers, auto_name).from_pretrained(str(model_dir), config=config, local_files_only=True,
                                                                 use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise UsageError(f"cannot load {model_dir} with {auto_name}: {exc}") from None
    model.to(device)
    model.eval()

    seq_len = args.max_length or (TEXT_ROW_LENGTH if text_rows else MAX_LENGTH)
    limit = position_limit(model.config, tokenizer)
    if limit is not None and seq_len > limit:
        if args.max_length is not None:
            logger.warning("--max-length %d exceeds the model's limit of %d positions; using %d", seq_len, limit,
                           limit)
        else:
            logger.info("rows of %d tokens: the model's limit of positions", limit)
        seq_len = limit

    batches = None
    calibration = ""
    task_loss = criterion.needs_calibration and getattr(criterion, "needs_gradients", True)
    if corpus is not None:
        batches = build_text_calibration(corpus, tokenizer, model, num_rows=args.num_batches * args.batch_size,
                                         length=seq_len, batch_size=args.batch_size, seed=args.seed,
                                         task_loss=task_loss)
        calibration = (f"calibration: {args.num_batches * args.batch_size} rows x {seq_len} tokens from "
                       f"{corpus.describe()}, seed {args.seed}")
    elif dataset is not None:
        batches = build_calibration(dataset, tokenizer, model, task, max_length=seq_len,
                                    batch_size=args.batch_size, num_batches=args.num_batches, task_loss=task_loss,
                                    seed=args.seed)
        rows = sum(len(batch["input_ids"]) for batch in batches)
        calibration = f"calibration: {rows} rows of up to {seq_len} tokens from {args.data}, seed {args.seed}"
    if calibration:
        logger.info("%s", calibration)

    # -- prune, measure, save: failures from here on are runtime errors (exit 1) -------------------------
    with _run_phase():
        started = time.perf_counter()
        flops_before = forward_flops(model, seq_len)
        with pruning_target(model) as target:
            report = prune_model(target, data=batches, num_batches=args.num_batches, batch_size=args.batch_size,
                                 tokenizer=tokenizer, progress=not args.no_progress, spec=spec)
        elapsed = time.perf_counter() - started
        flops_after = forward_flops(model, seq_len)
        model.to("cpu")
        saved = save_pretrained(model, out_dir, tokenizer=tokenizer, report=report, overwrite=args.overwrite,
                                inputs=inputs, option="--overwrite")
        size = folder_size(saved)

    for name, asked in spec.sparsity.items():
        if asked is None:  # --param-sparsity: the allocation chose it
            continue
        achieved = report.achieved_sparsity[name]
        if f"{achieved:.0%}" != f"{asked:.0%}":
            why = f"widths are kept a multiple of --round-to {spec.round_to}" if name == "ffn" and spec.round_to > 1 \
                else _WHOLE_UNITS.get(name, "whole units")
            logger.warning("%s: removed %.1f%%, not the %.1f%% asked (%s)", name, 100 * achieved, 100 * asked, why)
    what = f"multi-exit {base_model_type(family_type(config_dict))}" if is_multi_exit(model_type) else model_type
    refit = f", {spec.reconstruct} reconstruction" if reconstruct else ""
    out(f"Pruned {what} ({type(model).__name__}): removed {removed_summary(report.to_dict())}; {spec.mode} "
        f"mode, {spec.importance_name} importance{refit}; {elapsed:.1f} s")
    if spec.param_sparsity is not None:
        out(f"parameters removed: {report.achieved_param_sparsity:.1%} (asked {spec.param_sparsity:.1%}, added biases "
            "included)")
    if calibration:
        out(calibration)
    for note in report.notes:
        out(f"note: {note}")
    out()
    out(format_table(summary_rows(report, flops_before, flops_after, seq_len)))
    out()
    contents = "weights, config, " + ("tokenizer, " if tokenizer is not None else "no tokenizer, ")
    out(f"saved:   {saved} ({format_size(size)}: {contents}model card README.md, compress_report.json)")
    if is_multi_exit(model_type):
        out(f"loading: multi-exit model: run `import compress` before {auto_name}.from_pretrained")
    elif needs_compress_to_load(model):
        out(f"loading: compact model (model_type {model.config.model_type}, widths the standard config cannot "
            f"express): run `import compress` before {auto_name}.from_pretrained")
    else:
        out(f"loading: standard transformers folder, {auto_name}.from_pretrained works without `import compress`")
    return 0
