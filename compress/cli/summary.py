"""What the commands print: per-layer widths, sizes, and the before/after table of ``compress prune``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from compress.pruning.spec import STRUCTURE_LABELS

logger = logging.getLogger("compress.cli")


def out(text: str = "") -> None:
    """One line of command output on stdout (library code logs; commands print their results)."""
    sys.stdout.write(text + "\n")


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
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _kept(after: float, before: float) -> str:
    return f"{after / before:.1%}" if before else ""


def summary_rows(report, flops_before: int | None, flops_after: int | None, seq_len: int) -> list[dict]:
    """Rows of the before/after table: parameters, FLOPs of one forward, and widths per structure."""
    rows: list[dict[str, Any]] = [{
        "": "parameters", "before": report.params_before, "after": report.params_after,
        "kept": _kept(report.params_after, report.params_before),
    }]
    if flops_before is not None and flops_after is not None:
        rows.append({"": f"FLOPs, one 1x{seq_len} forward", "before": flops_before, "after": flops_after,
                     "kept": _kept(flops_after, flops_before)})

    def widths(table: Mapping[str, list[int]], name: str) -> list[int]:
        # the architecture spec lists kv_heads only where they differ from the query heads
        return list(table.get(name) or (table.get("heads", []) if name == "kv_heads" else []))

    for name in dict.fromkeys([*report.widths_before, *report.widths_after]):
        before, after = widths(report.widths_before, name), widths(report.widths_after, name)
        rows.append({"": STRUCTURE_LABELS.get(name, name), "before": format_widths(before),
                     "after": format_widths(after), "kept": _kept(sum(after), sum(before))})
    return rows


def forward_flops(model, seq_len: int) -> int | None:
    """Estimated FLOPs of one forward pass over a 1 x ``seq_len`` input (``None`` when it cannot run)."""
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
