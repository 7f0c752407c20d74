"""Prune-retrain cycles with soups (Sparse Model Soups' recipe): prune, fine-tune several copies of the sparse
start, average them, and start the next cycle, at a higher sparsity, from the soup.

The ingredients of one cycle are independent. With ``workdir`` every cycle's ingredients and soup are saved
there, an ingredient already saved is loaded instead of trained, and a process can train only some of a cycle's
ingredients (``train_only``) and wait for the others: several processes given the same ``workdir`` and different
``train_only`` share a run, and each computes the same soups.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from compress.distributed import is_main_process, wait_for_everyone, world_size
from compress.errors import CompressError

logger = logging.getLogger(__name__)


@dataclass
class SoupCycle:
    """One prune-retrain cycle: its sparsity, each ingredient's score and the soup's (with ``eval_fn``)."""

    sparsity: float
    ingredient_scores: list[float] = field(default_factory=list)
    soup_score: float | None = None
    kept: list[int] | None = None


@dataclass
class SoupRun:
    """The result of :func:`run_sparse_soup`: the last cycle's soup and every cycle's record."""

    model: nn.Module
    cycles: list[SoupCycle]


def _folder_done(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def run_sparse_soup(model: nn.Module, sparsities: Sequence[float], train_fn: Callable[..., Any],
                    ingredients_per_cycle: int = 3, eval_fn: Callable[[nn.Module], float] | None = None,
                    vary: Sequence[dict] | None = None, strategy: str = "uniform", config=None,
                    workdir: str | os.PathLike | None = None, train_only: Sequence[int] | None = None,
                    wait_timeout: float = 24 * 3600.0, tokenizer=None) -> SoupRun:
    """Prune-retrain cycles whose retraining is a soup of ``ingredients_per_cycle`` fine-tunes.

    Cycle ``c`` computes the masks of ``config`` at ``sparsities[c]`` on the previous soup (on ``model`` for the
    first; the previous zeros have the lowest scores, so masks only grow), then fine-tunes each ingredient from
    that sparse start with ``train_fn(peft_model, **vary[i])`` (a PEFT model whose pruned weights stay zero:
    train it with the ``Trainer`` or any loop), merges them and averages them with
    :func:`~compress.soup.make_soup` (``strategy``; ``greedy`` needs ``eval_fn``).

    Args:
        model: the dense start (e.g. a fine-tuned model); not modified.
        sparsities: one sparsity per cycle, non-decreasing, each in ``[0, 1)``.
        train_fn: trains a PEFT model in place; receives ``vary[i]`` as keyword arguments.
        ingredients_per_cycle: fine-tunes averaged per cycle (1 gives plain iterative pruning with retraining).
        eval_fn: validation score (higher is better) of a model: recorded for every ingredient and soup, and
            what the greedy soup chooses by.
        vary: per-ingredient keyword arguments for ``train_fn`` (default ``{"seed": i}``); the same in every cycle.
        strategy: ``uniform`` or ``greedy``.
        config: a :class:`~compress.SparseSoupConfig` whose ``sparsity`` each cycle replaces (default: magnitude,
            per layer, ``SEQ_CLS``); its pattern must be unstructured.
        workdir: where cycle ``c``'s ingredient ``i`` and soup are saved (``cycle<c>/ingredient<i>``,
            ``cycle<c>/soup``, written by the process that trains ingredient 0, or under ``torchrun`` by the main
            process while the others wait); saved ingredients are reused.
        train_only: the ingredient indices this process trains; the others are waited for in ``workdir``. For
            separate processes; ranks of one ``torchrun`` job train every ingredient together instead.
        wait_timeout: seconds to wait for ingredients other processes train.
        tokenizer: saved with the folders in ``workdir``.

    Raises:
        CompressError: bad sparsities, ``vary`` of the wrong length, ``train_only`` without ``workdir``, or an
            ingredient that did not appear within ``wait_timeout``.
    """
    from compress import SparseSoupConfig
    from compress.soup import load_ingredient, make_soup

    if not sparsities or any(not 0 <= s < 1 for s in sparsities) or list(sparsities) != sorted(sparsities):
        raise CompressError(f"sparsities must be a non-decreasing list of fractions in [0, 1), got {list(sparsities)}")
    if ingredients_per_cycle < 1:
        raise CompressError("ingredients_per_cycle must be at least 1")
    vary = list(vary) if vary is not None else [{"seed": i} for i in range(ingredients_per_cycle)]
    if len(vary) != ingredients_per_cycle:
        raise CompressError(f"vary has {len(vary)} entries for {ingredients_per_cycle} ingredients per cycle")
    if train_only is not None and workdir is None:
        raise CompressError("train_only needs a workdir, where the other processes' ingredients appear")
    if train_only is not None and world_size() > 1:
        raise CompressError("train_only splits a cycle's ingredients over independent processes, but this one is "
                            f"one of {world_size()} ranks (torchrun), which train every ingredient together: drop "
                            "train_only, or start the workers as separate processes")
    config = config if config is not None else SparseSoupConfig(task_type="SEQ_CLS", sparsity=sparsities[0])
    if config.n_m is not None and any(abs(s - config.sparsity) > 1e-9 for s in sparsities):
        raise CompressError(f"pattern {config.pattern} has one sparsity ({config.sparsity:g}): give it for every "
                            "cycle, or use an unstructured pattern for rising sparsities")
    mine = set(range(ingredients_per_cycle) if train_only is None else train_only)
    workdir = Path(workdir) if workdir is not None else None
    current, cycles = model, []
    for c, sparsity in enumerate(sparsities):
        cycle_config = replace(config, sparsity=float(sparsity))
        record = SoupCycle(sparsity=float(sparsity))
        ingredients: list[nn.Module | Path] = []
        for i in range(ingredients_per_cycle):
            folder = workdir / f"cycle{c}" / f"ingredient{i}" if workdir is not None else None
            if folder is not None and _folder_done(folder):
                logger.info("cycle %d: ingredient %d is saved in %s; reusing it", c, i, folder)
                ingredients.append(folder)
                continue
            if i not in mine:
                ingredients.append(folder)  # trained by another process: waited for below
                continue
            from peft import get_peft_model

            peft_model = get_peft_model(copy.deepcopy(current), copy.deepcopy(cycle_config))
            logger.info("cycle %d (sparsity %.2f): training ingredient %d with %s", c, sparsity, i, vary[i])
            train_fn(peft_model, **vary[i])
            merged = peft_model.merge_and_unload()
            if folder is not None:
                _save_once(merged, folder, tokenizer)
            ingredients.append(merged)
        ingredients = [_wait_for(x, wait_timeout) if isinstance(x, Path) else x for x in ingredients]
        if eval_fn is not None:
            record.ingredient_scores = [float(eval_fn(load_ingredient(x))) for x in ingredients]
        soup = make_soup(ingredients, strategy=strategy, eval_fn=eval_fn)
        if eval_fn is not None:
            record.soup_score = float(eval_fn(soup))
        record.kept = soup.config.soup.get("kept") if hasattr(soup, "config") else None
        if workdir is not None and (train_only is None or 0 in mine):  # one writer per cycle
            _save_once(soup, workdir / f"cycle{c}" / "soup", tokenizer)
        logger.info("cycle %d (sparsity %.2f): ingredients %s, soup %s", c, sparsity, record.ingredient_scores,
                    record.soup_score)
        cycles.append(record)
        current = soup
    return SoupRun(model=current, cycles=cycles)


def _save_once(model: nn.Module, folder: Path, tokenizer) -> None:
    """Save on the main process; under ``torchrun`` every rank trains the same model, and the others wait for
    the folder before anything reads it."""
    from compress import save_pretrained

    if is_main_process():
        save_pretrained(model, folder, tokenizer=tokenizer, overwrite=True)
    wait_for_everyone()


def _wait_for(folder: Path, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while not _folder_done(folder):
        if time.monotonic() > deadline:
            raise CompressError(f"ingredient {folder} did not appear within {timeout:.0f} s: is the process that "
                                "trains it (train_only) running with the same workdir?")
        time.sleep(2.0)
    return folder
