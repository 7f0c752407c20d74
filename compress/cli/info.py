"""``compress info``: describe a model folder from its config and weight headers, without loading weights."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from .errors import UsageError
from .inputs import (
    build_meta_model,
    check_weight_files,
    has_tokenizer,
    load_config,
    read_config_json,
    resolve_task,
    shape_mismatches,
)
from .prunable import describe, family_type, is_multi_exit, prunable, pruned_module
from .summary import STRUCTURE_LABELS, format_size, format_widths, out

logger = logging.getLogger("compress.cli")


def _count_weights(folder: Path) -> int | None:
    """Number of values in the folder's safetensors files (read from their headers only)."""
    from .inputs import weight_shapes

    shapes = weight_shapes(folder)
    return sum(math.prod(shape) for shape in shapes.values()) if shapes else None


def run(args: argparse.Namespace) -> int:
    from compress.export import REPORT_FILE, needs_compress_to_load, removed_summary
    from compress.measure import folder_size, format_table
    from compress.pruning.arch import arch_spec, spec_class, supported_model_types

    model_dir, config_dict = read_config_json(args.model_dir)
    model_type = str(config_dict.get("model_type", ""))
    architectures = ", ".join(config_dict.get("architectures") or []) or "(not recorded)"
    spec_cls = spec_class(family_type(config_dict))  # a multi-exit model: its backbone's family
    task, auto_name = resolve_task(config_dict)
    check_weight_files(model_dir, required=False)
    config = load_config(model_dir, config_dict)

    model = build_meta_model(model_dir, config, auto_name)  # a config that builds no model: the folder cannot load
    mismatches = shape_mismatches(model_dir, model)
    weights = _count_weights(model_dir)
    params = model.num_parameters()
    has_weights = weights is not None or any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt"))

    out(f"folder:       {model_dir.resolve()} ({format_size(folder_size(model_dir))})")
    out(f"architecture: {architectures} (model_type {model_type or '?'})")
    out(f"parameters:   {params:,}" + ("" if has_weights else " (from config.json; no weight files in folder)"))
    if needs_compress_to_load(model):
        why = "a multi-exit model" if is_multi_exit(model_type) else "compact per-layer widths"
        out(f"loading:      needs `import compress` ({why}), then {auto_name}.from_pretrained")
    else:
        out(f"loading:      standard transformers folder ({auto_name}.from_pretrained)")
    out(f"tokenizer:    {'yes' if has_tokenizer(model_dir) else 'no'}")
    if mismatches:
        out(f"weights:      DISAGREE with config.json in {len(mismatches)} tensors, e.g. {mismatches[0]}")

    report_file = model_dir / REPORT_FILE
    if report_file.is_file():
        try:
            report = json.loads(report_file.read_text(encoding="utf-8"))
            out(f"pruned:       {removed_summary(report)} removed ({report.get('mode')} mode, "
                f"{report.get('importance')} importance); params {report.get('params_before', 0):,} -> "
                f"{report.get('params_after', 0):,}")
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            logger.warning("cannot read %s: %s", report_file, exc)

    if spec_cls is None:
        out(f"pruning:      model_type {model_type or '?'!r} is not supported for structured pruning "
            f"(supported: {', '.join(supported_model_types())})")
        return _status(model_dir, mismatches)
    out()
    arch = arch_spec(pruned_module(model))  # a multi-exit model: its backbone
    out(format_table([{"structure": STRUCTURE_LABELS.get(name, name), "per layer": format_widths(values),
                       "total": sum(values)} for name, values in arch.widths().items()]))
    allowed = prunable(spec_cls, model_type, per_layer_widths=not arch.fits_standard_config())
    out()
    for line in describe(allowed, tuple(spec_cls.uniform_only_structures)):
        out(line)
    out()
    for line in _option_lines(arch, task, model_type):
        out(line)
    return _status(model_dir, mismatches)


def _option_lines(arch, task: str | None, model_type: str) -> list[str]:
    """What --reconstruct, --compensate-bias, --data and --importance do for this model (``arch``: its family spec on
    the meta model)."""
    from compress.pruning.arch import base_model_type
    from compress.pruning.reconstruct import bias_fit_structures

    family = base_model_type(model_type)
    flags = arch.bias_flags()
    with_bias, without = bias_fit_structures(arch, ["ffn", "heads"])
    projections = {"ffn": [site.output for site in arch.ffn_sites()],
                   "heads": [site.o for site in arch.attention_sites()]}
    through = [flags[kind].flag for kind in with_bias
               if kind in flags and any(layer.bias is None for layer in projections[kind])]
    via = f" (sets {' / '.join(through)})" if through else ""
    if arch.sequential_reason:
        reconstruct = f"not available ({arch.sequential_reason})"
    elif without and not with_bias:
        reconstruct = f"refits kept weights, without a bias (the {family} config cannot hold one there)"
    elif without:
        reconstruct = f"refits kept weights, and biases where the config can hold them{via}"
    else:
        reconstruct = f"refits kept weights and biases{via}"
    compensate = f"not available (the {family} config cannot give the output projections a bias)" if without \
        else f"yes{via}"
    if task == "causal-lm":
        data = "text, 128 rows x 512 tokens by default (--num-batches x --batch-size, --max-length)"
        importance = "flap or wanda_sp, with --reconstruct least_squares (magnitude breaks real LLMs)"
    else:
        data = "labelled rows (sst2-sample, .tsv/.csv/.jsonl, a saved dataset), up to 128 tokens each"
        importance = "taylor (default) or fisher on labelled --data; flap, wanda_sp, activation need no labels"
    return ["options for this model (compress prune ...):",
            f"  --reconstruct least_squares  {reconstruct}",
            f"  --compensate-bias            {compensate}",
            f"  --data                       {data}",
            f"  --importance                 {importance}"]


def _status(model_dir: Path, mismatches: list[str]) -> int:
    """0, or the one-line error for weights that the config contradicts (the folder would not load)."""
    if mismatches:
        raise UsageError(f"{model_dir / 'config.json'} disagrees with the weights in {len(mismatches)} tensors, "
                         f"e.g. {mismatches[0]}; the folder will not load: fix config.json or re-save the model")
    return 0
