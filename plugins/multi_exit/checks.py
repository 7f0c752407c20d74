"""What ``compress push`` (:func:`compress.hub.check_folder`) checks in a saved multi-exit adapter without the base
model: the exit heads against each other, ``exit_layers`` and the model's own head, and the backbone projections
against ``slender_shapes``. :func:`exit_head_problems` also serves Pruning-Adapter's ``exits``."""

from __future__ import annotations

import re
from pathlib import Path

_EXIT_HEAD = re.compile(r"\.exit_heads\.(?:[^.]+\.)?(?P<index>\d+)\.(?P<part>(?:dense|out)\.(?:weight|bias))$")
#: the model's own classification head, whose classes the exit heads predict (BERT, RoBERTa, Llama/Qwen2)
_OWN_HEADS = (".classifier.weight", ".classifier.out_proj.weight", ".score.weight")


def exit_head_problems(exit_layers: list[int] | None, design: str, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Exit heads: numbered 0..n-1, one per listed block before the last, all of one shape (``dense`` only for the
    ``pooled`` design), predicting as many classes as the model's own head."""
    heads: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        found = _EXIT_HEAD.search(key)
        if found:
            heads.setdefault(int(found["index"]), {})[found["part"]] = shape
    if not heads:
        return []
    problems = []
    indices = sorted(heads)
    if indices != list(range(len(indices))):
        problems.append(f"the exit heads are numbered {indices}, expected 0..{len(indices) - 1}")
    if exit_layers is not None and len(heads) not in (len(exit_layers), len(exit_layers) - 1):
        problems.append(f"{len(heads)} exit heads, but exit_layers={exit_layers} gives one per listed block (the "
                        "last block's exit is the model's own head)")
    first = heads[indices[0]]
    for index in indices[1:]:
        for part in sorted(set(first) | set(heads[index])):
            if heads[index].get(part) != first.get(part):
                problems.append(f"exit head {index}: {part} is {_listed(heads[index].get(part))}, exit head "
                                f"{indices[0]}'s is {_listed(first.get(part))}; every exit head has one shape")
                break
    dense, dense_bias = first.get("dense.weight"), first.get("dense.bias")
    out, out_bias = first.get("out.weight"), first.get("out.bias")
    if out is None or len(out) != 2:
        return problems + [f"exit head {indices[0]}: out.weight is {_listed(out)}, expected [num_labels, width]"]
    if design == "linear" and dense is not None:
        problems.append("exit_head='linear' heads have no dense layer, but the weights hold exit_heads.*.dense")
    if dense is not None and (len(dense) != 2 or out[1] != dense[0]):
        problems.append(f"exit heads: dense.weight is {list(dense)} but out.weight {list(out)} (out reads what dense "
                        "writes)")
    if dense is not None and dense_bias is not None and dense_bias != dense[:1]:
        problems.append(f"exit heads: dense.bias is {list(dense_bias)}, dense.weight {list(dense)}")
    if out_bias is not None and out_bias != out[:1]:
        problems.append(f"exit heads: out.bias is {list(out_bias)}, out.weight {list(out)}")
    own = next(((key, shape) for key, shape in sorted(shapes.items()) if key.endswith(_OWN_HEADS) and len(shape) == 2),
               None)
    if own is not None and own[1][0] != out[0]:
        problems.append(f"the exit heads predict {out[0]} classes, the model's own head ({own[0]}) {own[1][0]}")
    return problems


def _listed(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else str(list(shape))


def slender_problems(config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Saved backbone projections have the ``[out, in]`` shapes ``slender_shapes`` records."""
    problems = []
    for path, (out_features, in_features) in sorted((config.slender_shapes or {}).items()):
        for key, shape in shapes.items():
            if key.endswith(f".{path}.weight") and shape != (out_features, in_features):
                problems.append(f"{key} is {list(shape)}, slender_shapes records [{out_features}, {in_features}]")
            elif key.endswith(f".{path}.bias") and shape != (out_features,):
                problems.append(f"{key} is {list(shape)}, slender_shapes records [{out_features}] outputs")
    return problems



def check_saved_folder(folder: Path, config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The problems of a saved multi-exit adapter (``config``: its :class:`~.config.MultiExitConfig`; ``shapes``: each
    saved tensor's shape), one line each."""
    return exit_head_problems(config.exit_layers, config.exit_head, shapes) + slender_problems(config, shapes)
