"""What ``compress push`` (:func:`compress.hub.check_folder`) checks in a saved Pruning-Adapter adapter without the
base model: the low-rank pairs against ``r``, the exit heads of ``exits``, and ``pruning_plan`` against the copy
saved with the weights (what loading replays is checked against that copy, so an edited plan would not load)."""

from __future__ import annotations

import logging
from pathlib import Path

from compress.errors import CompressError
from compress.hub import ADAPTER_WEIGHTS, low_rank_problems

logger = logging.getLogger(__name__)


def check_saved_folder(folder: Path, config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The shape problems of a saved Pruning-Adapter adapter, one line each (``config``: its
    :class:`~.config.PruningAdapterConfig`; ``shapes``: each saved tensor's shape).

    Raises:
        CompressError: ``pruning_plan`` differs from the copy saved with the weights.
    """
    from compress.plugins.multi_exit.checks import exit_head_problems

    from .plan import PLAN_KEY

    exits = config.exits
    problems = low_rank_problems(config, shapes, prefixes=("pa", "lora")) + (
        exit_head_problems(exits.get("exit_layers"), exits.get("exit_head", "pooled"), shapes) if exits else [])
    if not problems:
        saved_copy = None
        if PLAN_KEY in shapes:
            from safetensors import safe_open

            with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as f:
                saved_copy = f.get_tensor(PLAN_KEY)
        _check_saved_plan(config.pruning_plan, saved_copy, folder)
    return problems


def _check_saved_plan(plan: list[dict], saved_copy, folder: Path) -> None:
    """The config's ``pruning_plan`` must equal the copy saved in the weights file (what loading replays is
    checked against it, so an edited plan would not load)."""
    from .plan import ADVICE, decode_plan, describe_difference, same_events

    config_file = folder / "adapter_config.json"
    if saved_copy is None:
        if plan:
            logger.warning("%s carries no copy of the pruning plan (saved by an older peft-compress): pruning_plan "
                           "cannot be checked against it; save the adapter again to add it", folder / ADAPTER_WEIGHTS)
        return
    saved = decode_plan(saved_copy)
    for index, (ours, theirs) in enumerate(zip(plan, saved)):
        if not same_events(ours, theirs):
            raise CompressError(f"{config_file}: pruning_plan[{index}] differs from the copy saved with the adapter "
                                f"weights ({ADAPTER_WEIGHTS}) in {describe_difference(ours, theirs)}. {ADVICE}")
    if len(plan) != len(saved):
        raise CompressError(f"{config_file}: pruning_plan has {len(plan)} events, the copy saved with the adapter "
                            f"weights ({ADAPTER_WEIGHTS}) {len(saved)}. {ADVICE}")
