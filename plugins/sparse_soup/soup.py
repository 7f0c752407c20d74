"""Model soups that keep a shared sparsity mask: averaging fine-tunes of one sparse start.

``make_soup`` averages ingredients that share an architecture and a mask (the zeros of their weights), and
refuses any pair that does not, naming the first tensor that differs. Ingredients are models, PEFT models (merged
first: a sparse-soup adapter merges with its mask; any other adapter is merged and the base model's zeros are
put back) or saved folders (a model, a PEFT adapter, or a compact sparse folder).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError

from .format import SPARSE_WEIGHTS, load_sparse
from .model import SparseSoupModel
from .tensors import check_weights_loaded

logger = logging.getLogger(__name__)

STRATEGIES = ("uniform", "greedy")
Ingredient = nn.Module | str | os.PathLike


def check_ingredients(ingredients: object) -> list[Ingredient]:
    """``ingredients`` as a list, after checking that it is a non-empty list of models, PEFT models or existing
    folders (before anything is loaded)."""
    if isinstance(ingredients, (str, bytes, os.PathLike, nn.Module)) or not isinstance(ingredients, Sequence):
        raise CompressError(f"ingredients must be a list of models, PEFT models or folders, got "
                            f"{type(ingredients).__name__}; pass a list, e.g. make_soup([model_a, model_b])")
    if not ingredients:
        raise CompressError("make_soup needs at least one ingredient")
    for index, source in enumerate(ingredients):
        if isinstance(source, (str, os.PathLike)):
            if not Path(source).is_dir():
                raise CompressError(f"soup ingredient #{index} ({source}) is not a folder; pass saved model, adapter "
                                    "or compact sparse folders")
        elif not isinstance(source, nn.Module):
            raise CompressError(f"soup ingredient #{index} is a {type(source).__name__}; an ingredient is a model, "
                                "a PEFT model or a folder")
    return list(ingredients)


def soup_weights(weights: object, count: int) -> list[float]:
    """``weights`` normalised to sum 1, after checking that they are ``count`` finite, non-negative numbers with a
    positive sum."""
    expected = (f"weights must be {count} finite, non-negative numbers (one per ingredient) with a positive sum, "
                "e.g. [1, 1, 2]")
    if hasattr(weights, "tolist") and not isinstance(weights, (str, bytes)):
        weights = weights.tolist()  # a numpy array or a tensor
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise CompressError(f"{expected}; got {type(weights).__name__} {weights!r}")
    if len(weights) != count:
        raise CompressError(f"{expected}; got {len(weights)}")
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise CompressError(f"{expected}; weight #{index} is {weight!r} ({type(weight).__name__})")
        if not math.isfinite(weight) or weight < 0:
            raise CompressError(f"{expected}; weight #{index} is {weight!r}")
    total = sum(float(w) for w in weights)
    if not (math.isfinite(total) and total > 0):
        raise CompressError(f"{expected}; these sum to {total!r}")
    return [float(w) / total for w in weights]


def score(eval_fn: Callable[[nn.Module], float], model: nn.Module, what: str, finite: bool = True) -> float:
    """``eval_fn(model)`` as a float; a value that is not a number (or, with ``finite``, is NaN or infinite) is
    refused naming ``what`` was scored."""
    value = eval_fn(model)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:  # a 0-d tensor or array scores too
            value = float(value)
        except (TypeError, ValueError):
            raise CompressError(f"eval_fn returned {value!r} ({type(value).__name__}) for {what}; it must return a "
                                "number (the validation score, higher is better)") from None
    value = float(value)
    if finite and not math.isfinite(value):
        raise CompressError(f"eval_fn scored {what} {value}: the greedy soup compares scores, and a {value} score "
                            "compares with nothing. Make eval_fn return a finite score (a NaN often means a diverged "
                            "ingredient, or a metric over no examples), or use strategy='uniform'")
    return value


def load_ingredient(source: Ingredient) -> nn.Module:
    """A plain model from an ingredient: the model itself, a PEFT model merged (on a copy), or a folder loaded."""
    if isinstance(source, (str, os.PathLike)):
        return _load_folder(Path(source))
    from peft import PeftModel

    if isinstance(source, PeftModel):
        return _merged_keeping_zeros(copy.deepcopy(source))
    if isinstance(source, nn.Module):
        return source
    raise CompressError(f"a soup ingredient is a model, a PEFT model or a folder, not {type(source).__name__}")


def _load_folder(folder: Path) -> nn.Module:
    if not folder.is_dir():
        raise CompressError(f"soup ingredient {folder} is not a folder")
    if (folder / SPARSE_WEIGHTS).exists():
        return load_sparse(folder)
    if (folder / "adapter_config.json").exists():
        from peft import AutoPeftModel

        return _merged_keeping_zeros(AutoPeftModel.from_pretrained(folder))
    import transformers

    from compress.tasks import task_of_class

    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    _refuse_compressed_tensors_sparsity(folder, config)
    found = task_of_class((config.get("architectures") or [""])[0])
    if found is None:
        raise CompressError(f"{folder} holds no model transformers can load (no config.json naming its "
                            "architecture, no adapter_config.json, no compact sparse weights)")
    return getattr(transformers, found[1]).from_pretrained(folder)


def _refuse_compressed_tensors_sparsity(folder: Path, config: dict) -> None:
    """Refuse a compressed-tensors checkpoint stored in a sparse format: transformers 5 ignores its
    ``sparsity_config`` and loads it with the sparse weights newly initialised, without an error."""
    quantization = config.get("quantization_config")
    sparsity = quantization.get("sparsity_config") if isinstance(quantization, dict) else None
    stored_as = sparsity.get("format") if isinstance(sparsity, dict) else None
    if stored_as not in (None, "dense"):
        raise CompressError(f"{folder / 'config.json'} describes a compressed-tensors checkpoint in the sparse format "
                            f"{stored_as!r}, which transformers 5 no longer reads (its sparse weights would load "
                            "randomly initialised). Decompress it with compressed-tensors 0.14 or earlier under "
                            "transformers 4 and save it dense, then pass that folder")


def _merged_keeping_zeros(peft_model) -> nn.Module:
    """Merge a PEFT model. A sparse-soup adapter keeps its mask itself; for any other adapter the zeros of the
    base weights are restored after merging (the adapter's update at those positions is dropped)."""
    if isinstance(peft_model.base_model, SparseSoupModel):
        return peft_model.merge_and_unload()
    zeros = {name: p.detach() == 0 for name, p in _base_parameters(peft_model).items() if _is_masked(p)}
    merged = peft_model.merge_and_unload()
    dropped = 0
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if name in zeros and zeros[name].any():
                dropped += int((p[zeros[name]] != 0).sum())
                p.masked_fill_(zeros[name], 0)
    if dropped:
        logger.warning("merging %s into a sparse base: %d updated weights fell on pruned positions and were reset "
                       "to zero; train with SparseSoupConfig(train='lora') to keep the update inside the mask",
                       type(peft_model.peft_config[peft_model.active_adapter]).__name__, dropped)
    return merged


def _base_parameters(peft_model) -> dict[str, torch.Tensor]:
    """The base model's parameters under the names they have after merging (adapter wrappers removed)."""
    out = {}
    for name, p in peft_model.get_base_model().named_parameters():
        if ".base_layer." in name:
            out[name.replace(".base_layer.", ".")] = p
        elif not any(part.startswith(("lora_", "original_module", "modules_to_save")) for part in name.split(".")):
            out[name] = p
    return out


def _tensors(model: nn.Module, which: str) -> dict[str, torch.Tensor]:
    """The state tensors of an ingredient, after checking that they hold weights (not the meta device) and that
    its floating tensors are finite."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    check_weights_loaded(state, f"soup ingredient {which}")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CompressError(f"soup ingredient {which} has {bad} non-finite values (NaN or infinite) in {name}: "
                                "its fine-tune diverged or it was damaged; leave it out of the soup")
    return state


def check_same_mask(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor], which: str) -> None:
    """Raise naming the first tensor where ``other`` differs from ``reference`` in architecture (names, shapes,
    dtypes) or mask (where the weights are zero)."""
    if set(reference) != set(other):
        missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        raise CompressError(f"soup ingredient {which} has a different architecture: "
                            + (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
                            + f" ({len(missing)} missing, {len(extra)} unexpected tensors)")
    for name, ref in reference.items():
        tensor = other[name]
        if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
            raise CompressError(f"soup ingredient {which} has a different architecture at {name}: "
                                f"{tuple(tensor.shape)} {tensor.dtype}, the first has {tuple(ref.shape)} {ref.dtype}")
        if _is_masked(ref):
            differ = int(((ref == 0) != (tensor == 0)).sum())
            if differ:
                raise CompressError(f"soup ingredient {which} has a different mask at {name}: {differ} weights are "
                                    "zero in one and not the other. Averaging would destroy the sparsity; fine-tune "
                                    "every ingredient from the same sparse start (SparseSoupConfig)")
        elif not ref.is_floating_point() and not torch.equal(ref, tensor):
            raise CompressError(f"soup ingredient {which} differs at {name} (a non-float tensor, which is not "
                                "averaged)")


def _is_masked(tensor: torch.Tensor) -> bool:
    """Whether a tensor's zeros are a mask to keep: floating weight matrices (biases and norms are dense; a zero
    there is a value, such as an untrained bias)."""
    return tensor.is_floating_point() and tensor.dim() >= 2


def _average(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of float tensors (in float64, then cast back); weight matrices stay zero wherever the
    first is zero."""
    first = states[0]
    out = {}
    for name, ref in first.items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        total = sum(w * s[name].double() for w, s in zip(weights, states))
        out[name] = _keep_zeros(ref, total.to(ref.dtype))
    return out


def _keep_zeros(reference: torch.Tensor, averaged: torch.Tensor) -> torch.Tensor:
    """``averaged`` with exact (positive) zeros at the mask's zeros, for weight matrices."""
    if not _is_masked(reference):
        return averaged
    return torch.where(reference == 0, torch.zeros((), dtype=averaged.dtype), averaged)


def _with_state(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state, strict=True)
    return model


def make_soup(ingredients: Sequence[Ingredient], strategy: str = "uniform",
              eval_fn: Callable[[nn.Module], float] | None = None,
              weights: Sequence[float] | None = None) -> nn.Module:
    """Average fine-tuned models that share an architecture and a sparsity mask; the soup has exactly that mask.

    Args:
        ingredients: models, PEFT models or folders (see :func:`load_ingredient`); never modified.
        strategy: ``uniform`` (the mean of all, or the ``weights``-weighted mean) or ``greedy`` (Wortsman et al.
            2022: ingredients sorted by ``eval_fn``, each added only if the soup's score does not drop).
        eval_fn: the validation score of a model, higher is better (``greedy`` only).
        weights: one finite, non-negative weight per ingredient, normalised to sum 1 (``uniform`` only).

    Returns:
        a new model (a copy of the first ingredient's architecture) holding the soup. Its config records the
        strategy and, for ``greedy``, which ingredients were kept (``config.soup``).

    Raises:
        CompressError: any argument of the wrong type or value (checked before anything is loaded: no ingredient,
            a folder that does not exist, an unknown strategy, ``weights`` that are not finite non-negative numbers
            with a positive sum, ``weights``/``eval_fn`` not matching the strategy); ingredients whose architecture
            or mask differ (naming the first differing tensor), with weights on the meta device or non-finite
            values; a score from ``eval_fn`` that is not a finite number (``greedy``).
    """
    ingredients = check_ingredients(ingredients)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise CompressError(f"unknown soup strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if eval_fn is not None and not callable(eval_fn):
        raise CompressError(f"eval_fn must be a function (model -> validation score), got {type(eval_fn).__name__}")
    if strategy == "greedy":
        if eval_fn is None:
            raise CompressError("a greedy soup needs eval_fn (model -> validation score, higher is better)")
        if weights is not None:
            raise CompressError("weights apply to the uniform soup; the greedy soup chooses its ingredients itself")
        return _greedy(ingredients, eval_fn)
    if weights is not None:
        weights = soup_weights(weights, len(ingredients))
    else:
        weights = [1 / len(ingredients)] * len(ingredients)
    template = load_ingredient(ingredients[0])
    reference = _tensors(template, "#0")
    total = {k: (v.double() * weights[0] if v.is_floating_point() else v.clone()) for k, v in reference.items()}
    for index in range(1, len(ingredients)):  # one ingredient in memory at a time beside the running sum
        state = _tensors(load_ingredient(ingredients[index]), f"#{index}")
        check_same_mask(reference, state, f"#{index}")
        for name, value in state.items():
            if value.is_floating_point():
                total[name] += weights[index] * value.double()
    soup_state = {name: (_keep_zeros(ref, total[name].to(ref.dtype)) if ref.is_floating_point() else total[name])
                  for name, ref in reference.items()}
    soup = _with_state(template, soup_state)
    _record(soup, {"strategy": "uniform", "ingredients": len(ingredients), "weights": list(weights)})
    return soup


def _greedy(ingredients: Sequence[Ingredient], eval_fn: Callable[[nn.Module], float]) -> nn.Module:
    models = [load_ingredient(source) for source in ingredients]
    states = [_tensors(m, f"#{index}") for index, m in enumerate(models)]
    for index in range(1, len(states)):
        check_same_mask(states[0], states[index], f"#{index}")
    scores = [score(eval_fn, m, f"ingredient #{index}") for index, m in enumerate(models)]
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    kept, best = [order[0]], scores[order[0]]
    for index in order[1:]:
        chosen = [*kept, index]
        candidate = _with_state(models[0], _average([states[i] for i in chosen], [1 / len(chosen)] * len(chosen)))
        with_it = score(eval_fn, candidate, f"the soup of ingredients {sorted(chosen)}")
        logger.info("greedy soup: ingredient #%d scores %.4f alone; the soup with it %.4f (without: %.4f)",
                    index, scores[index], with_it, best)
        if with_it >= best:
            kept.append(index)
            best = with_it
    soup = _with_state(models[0], _average([states[i] for i in kept], [1 / len(kept)] * len(kept)))
    _record(soup, {"strategy": "greedy", "ingredients": len(models), "kept": sorted(kept), "scores": scores,
                   "soup_score": best})
    return soup


def _record(model: nn.Module, info: dict) -> None:
    if getattr(model, "config", None) is not None:
        model.config.soup = info
