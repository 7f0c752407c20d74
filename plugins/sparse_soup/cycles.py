"""Prune-retrain cycles with soups (Sparse Model Soups' recipe): prune, fine-tune several copies of the sparse
start, average them, and start the next cycle, at a higher sparsity, from the soup.

The ingredients of one cycle are independent. With ``workdir`` every cycle's ingredients and soup are saved
there, an ingredient already saved is loaded instead of trained, and a process can train only some of a cycle's
ingredients (``train_only``) and wait for the others: several processes given the same ``workdir`` and different
``train_only`` share a run, and each computes the same soups.

Each cycle folder records what produced it (``run_settings.json``: a SHA-256 of the dense start's weights and
the run's settings up to that cycle), and a run refuses a ``workdir`` whose records differ from its own, so
ingredients of another run (another sparsity, another dense model) are never averaged into this one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.distributed import is_main_process, wait_for_everyone, world_size
from compress.errors import CompressError
from compress.export import save_pretrained

from .config import SparseSoupConfig
from .soup import STRATEGIES, check_weights_loaded, load_ingredient, make_soup, score

logger = logging.getLogger(__name__)

#: in each cycle folder of a ``workdir``: what produced the cycle (see :func:`run_settings`)
RUN_SETTINGS = "run_settings.json"
_RECORD_FORMAT = 1


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


# -- arguments -------------------------------------------------------------------------------------------------
def _check_sparsities(sparsities: object) -> list[float]:
    expected = "sparsities must be a non-decreasing list of fractions in [0, 1), one per cycle, e.g. [0.5, 0.7]"
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Sequence):
        raise CompressError(f"{expected}; got {type(sparsities).__name__} {sparsities!r}")
    if not sparsities:
        raise CompressError(f"{expected}; got an empty list")
    for value in sparsities:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or not 0 <= value < 1:
            raise CompressError(f"{expected}; got {list(sparsities)}, where {value!r} is not such a fraction")
    values = [float(v) for v in sparsities]
    if values != sorted(values):
        raise CompressError(f"{expected}; got {values}")
    return values


def _check_arguments(model, train_fn, ingredients_per_cycle, eval_fn, vary, strategy, config, workdir, train_only,
                     wait_timeout, tokenizer) -> None:
    """Every argument of :func:`run_sparse_soup` except ``sparsities``, before any training."""
    from peft import PeftModel

    if isinstance(model, PeftModel) or not isinstance(model, nn.Module):
        what = "a PEFT model: merge it first (model.merge_and_unload())" if isinstance(model, PeftModel) else \
            f"a {type(model).__name__}"
        raise CompressError(f"model must be the dense start (a transformers model), got {what}")
    check_weights_loaded(model.state_dict(), "the dense start")
    if not callable(train_fn):
        raise CompressError(f"train_fn must be a function that trains a PEFT model in place, got "
                            f"{type(train_fn).__name__}")
    if isinstance(ingredients_per_cycle, bool) or not isinstance(ingredients_per_cycle, int) \
            or ingredients_per_cycle < 1:
        raise CompressError(f"ingredients_per_cycle must be a whole number >= 1, got {ingredients_per_cycle!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise CompressError(f"eval_fn must be a function (model -> validation score), got {type(eval_fn).__name__}")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise CompressError(f"unknown soup strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "greedy" and eval_fn is None:
        raise CompressError("strategy='greedy' chooses ingredients by eval_fn (model -> validation score, higher is "
                            "better): pass one, or use strategy='uniform'")
    if vary is not None:
        if isinstance(vary, (str, bytes, dict)) or not isinstance(vary, Sequence):
            raise CompressError(f"vary must be a list of dicts (train_fn's keyword arguments, one per ingredient), "
                                f"got {type(vary).__name__}")
        if len(vary) != ingredients_per_cycle:
            raise CompressError(f"vary has {len(vary)} entries for {ingredients_per_cycle} ingredients per cycle")
        for index, entry in enumerate(vary):
            if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
                raise CompressError(f"vary[{index}] must be a dict of train_fn's keyword arguments, got {entry!r}")
    if config is not None:
        if not isinstance(config, SparseSoupConfig):
            raise CompressError(f"config must be a compress.SparseSoupConfig, got {type(config).__name__}")
        if config.importance != "magnitude":
            raise CompressError(f"config.importance={config.importance!r}: run_sparse_soup computes every cycle's "
                                "masks by magnitude (it takes no calibration data); use importance='magnitude'")
    if workdir is not None:
        if not isinstance(workdir, (str, os.PathLike)):
            raise CompressError(f"workdir must be a folder path, got {type(workdir).__name__}")
        if Path(workdir).exists() and not Path(workdir).is_dir():
            raise CompressError(f"workdir {workdir} is a file; pass a folder")
    if train_only is not None:
        if workdir is None:
            raise CompressError("train_only needs a workdir, where the other processes' ingredients appear")
        if isinstance(train_only, (str, bytes)) or not isinstance(train_only, Sequence) or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < ingredients_per_cycle
                for i in train_only):
            raise CompressError(f"train_only must be a list of ingredient indices in 0..{ingredients_per_cycle - 1}, "
                                f"got {train_only!r}")
        if world_size() > 1:
            raise CompressError("train_only splits a cycle's ingredients over independent processes, but this one "
                                f"is one of {world_size()} ranks (torchrun), which train every ingredient together: "
                                "drop train_only, or start the workers as separate processes")
    if isinstance(wait_timeout, bool) or not isinstance(wait_timeout, numbers.Real) or not wait_timeout > 0:
        raise CompressError(f"wait_timeout must be a positive number of seconds, got {wait_timeout!r}")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise CompressError(f"tokenizer must be a transformers tokenizer (saved with the folders in workdir), got "
                            f"{type(tokenizer).__name__}")


# -- what produced a workdir's cycles ----------------------------------------------------------------------------
def weights_fingerprint(model: nn.Module) -> str:
    """A SHA-256 of a model's state: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _plain(value: object) -> object:
    """``value`` as JSON compares it: objects JSON cannot hold are recorded by their type only (their ``repr``
    may carry a memory address, which differs from process to process)."""
    def fallback(obj: object) -> object:
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=str)
        if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):
            return obj.item()  # a numpy or torch scalar
        return f"<{type(obj).__module__}.{type(obj).__qualname__}>"

    return json.loads(json.dumps(value, sort_keys=True, default=fallback))


def run_settings(dense_fingerprint: str, config, sparsities: Sequence[float], cycle: int,
                 ingredients_per_cycle: int, vary: Sequence[dict], strategy: str) -> dict:
    """What produces cycle ``cycle``'s ingredients: the dense start's weights, the method's settings, the
    sparsities up to this cycle, the ingredients and how they vary, and the soup strategy (which made the earlier
    cycles' soups). ``train_fn`` and ``eval_fn`` are code and cannot be recorded."""
    from peft.config import PeftConfig

    own = {f.name for f in dataclasses.fields(config)} - {f.name for f in dataclasses.fields(PeftConfig)}
    settings = {name: getattr(config, name) for name in sorted(own - {"sparsity"})}
    settings["task_type"] = config.task_type
    return _plain({"format": _RECORD_FORMAT, "dense_model_sha256": dense_fingerprint,
                   "sparsities": list(sparsities[:cycle + 1]), "ingredients_per_cycle": ingredients_per_cycle,
                   "vary": list(vary), "strategy": strategy, "config": settings})


def _stale_error(folder: Path, problem: str) -> CompressError:
    return CompressError(f"workdir {folder.parent} was used by another run: {folder.name} {problem}. Its ingredients "
                         f"would be averaged into this run's soup; pass a new workdir, or delete {folder} to train "
                         "that cycle again")


def _check_record(folder: Path, ours: dict) -> bool:
    """Compare ``folder``'s record with ``ours``; ``False`` when there is none yet. Raises when they differ, or
    when the folder holds ingredients without a record (of unknown origin)."""
    path = folder / RUN_SETTINGS
    if not path.exists():
        saved = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if folder.is_dir() else []  # (hidden: temporaries of interrupted saves)
        if saved:
            raise _stale_error(folder, f"holds {', '.join(saved)} but no {RUN_SETTINGS} recording what produced "
                               "them")
        return False
    try:
        theirs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _stale_error(folder, f"has an unreadable {RUN_SETTINGS} ({exc})") from None
    if theirs == ours:
        return True
    if not isinstance(theirs, dict):
        raise _stale_error(folder, f"has a {RUN_SETTINGS} that is not a record of settings")
    for key, value in ours.items():
        if theirs.get(key) != value:
            if key == "dense_model_sha256":
                raise _stale_error(folder, "was trained from a dense model with other weights")
            raise _stale_error(folder, f"was made with {key}={json.dumps(theirs.get(key))}, this run has "
                               f"{key}={json.dumps(value)}")
    raise _stale_error(folder, f"has a {RUN_SETTINGS} with other fields ({sorted(set(theirs) - set(ours))})")


def _claim(folder: Path, ours: dict) -> None:
    """Write ``folder``'s record unless one exists (created whole, never replaced: a worker of another run
    writing at the same moment loses), then check it."""
    if _check_record(folder, ours):
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_SETTINGS}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(ours, f, indent=2, sort_keys=True)
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.link(tmp, folder / RUN_SETTINGS)  # fails if it exists: the first writer's record stands
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: a rename, which a simultaneous writer could win
            if not (folder / RUN_SETTINGS).exists():
                os.replace(tmp, folder / RUN_SETTINGS)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _check_record(folder, ours)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    :func:`~compress.make_soup` (``strategy``; ``greedy`` needs ``eval_fn``).

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
            per layer, ``SEQ_CLS``); importance ``magnitude``; an ``n:m`` pattern needs its one sparsity in every
            cycle.
        workdir: where cycle ``c``'s ingredient ``i`` and soup are saved (``cycle<c>/ingredient<i>``,
            ``cycle<c>/soup``, written by the process that trains ingredient 0, or under ``torchrun`` by the main
            process while the others wait); saved ingredients are reused. ``cycle<c>/run_settings.json`` records
            what produced them (the dense start's weights, ``config``, the sparsities up to ``c``,
            ``ingredients_per_cycle``, ``vary``, ``strategy``); a workdir whose records differ is refused, so
            another run's ingredients are never reused. A longer schedule with the same start reuses the cycles
            the runs share. ``train_fn`` and ``eval_fn`` are not recorded: after changing them, use a new workdir.
        train_only: the ingredient indices this process trains; the others are waited for in ``workdir``. For
            separate processes; ranks of one ``torchrun`` job train every ingredient together instead.
        wait_timeout: seconds to wait for ingredients other processes train.
        tokenizer: saved with the folders in ``workdir``.

    Raises:
        CompressError: any argument of the wrong type or value (all checked before the first ingredient trains:
            e.g. sparsities that are not a non-decreasing list of fractions, ``vary`` of the wrong length,
            ``train_only`` without ``workdir``, ``greedy`` without ``eval_fn``, a model on the meta device); a
            ``workdir`` holding another run's cycles; an ingredient that did not appear within ``wait_timeout``.
    """
    sparsities = _check_sparsities(sparsities)
    _check_arguments(model, train_fn, ingredients_per_cycle, eval_fn, vary, strategy, config, workdir, train_only,
                     wait_timeout, tokenizer)
    vary = list(vary) if vary is not None else [{"seed": i} for i in range(ingredients_per_cycle)]
    config = config if config is not None else SparseSoupConfig(task_type="SEQ_CLS", sparsity=sparsities[0])
    if config.n_m is not None and any(abs(s - config.sparsity) > 1e-9 for s in sparsities):
        raise CompressError(f"pattern {config.pattern} has one sparsity ({config.sparsity:g}): give it for every "
                            "cycle, or use an unstructured pattern for rising sparsities")
    mine = set(range(ingredients_per_cycle) if train_only is None else train_only)
    workdir = Path(workdir) if workdir is not None else None
    records = []
    if workdir is not None:  # every cycle checked before the first is trained
        dense = weights_fingerprint(model)
        records = [run_settings(dense, config, sparsities, c, ingredients_per_cycle, vary, strategy)
                   for c in range(len(sparsities))]
        for c, settings in enumerate(records):
            _check_record(workdir / f"cycle{c}", settings)
    current, cycles = model, []
    for c, sparsity in enumerate(sparsities):
        cycle_config = replace(config, sparsity=float(sparsity))
        record = SoupCycle(sparsity=float(sparsity))
        ingredients: list[nn.Module | Path] = []
        if workdir is not None:
            _claim(workdir / f"cycle{c}", records[c])
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
            record.ingredient_scores = [score(eval_fn, load_ingredient(x), f"cycle {c}'s ingredient {i}", finite=False)
                                        for i, x in enumerate(ingredients)]
        soup = make_soup(ingredients, strategy=strategy, eval_fn=eval_fn)
        if eval_fn is not None:
            record.soup_score = score(eval_fn, soup, f"cycle {c}'s soup", finite=False)
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
