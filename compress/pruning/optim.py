"""Keep an optimizer working after structural pruning replaced or removed its parameters."""

from __future__ import annotations

import torch
from torch import nn


def remap_optimizer(optimizer: torch.optim.Optimizer,
                    replaced: dict[int, tuple[nn.Parameter, nn.Parameter, int, torch.Tensor]],
                    live: list[nn.Parameter]) -> None:
    """Point ``optimizer`` at the pruned parameters and slice their state the same way.

    Args:
        optimizer: any torch optimizer (or a wrapper exposing ``.optimizer``, like accelerate's).
        replaced: ``id(old_param) -> (old_param, new_param, dim, kept_indices)`` from the pruning step;
            chains (a parameter pruned twice) are followed.
        live: the parameters the model still has; optimizer entries for anything else (a removed block)
            are dropped together with their state.
    """
    opt = getattr(optimizer, "optimizer", optimizer)
    live_ids = {id(p) for p in live}
    for group in opt.param_groups:
        params = []
        for param in group["params"]:
            state = opt.state.pop(param, None)
            chain, current = [], param
            while id(current) in replaced and replaced[id(current)][0] is current:
                _, nxt, dim, keep = replaced[id(current)]
                chain.append((current.shape, dim, keep))
                current = nxt
            if id(current) not in live_ids:
                continue  # the parameter left the model (its block was removed)
            if state is not None:
                for shape, dim, keep in chain:
                    state = {k: _slice(v, shape, dim, keep) for k, v in state.items()}
                opt.state[current] = state
            params.append(current)
        group["params"] = params


def _slice(value, shape: torch.Size, dim: int, keep: torch.Tensor):
    # per-element state (exp_avg, momentum...) has the parameter's shape; scalars such as `step` do not
    if torch.is_tensor(value) and value.shape == shape:
        return value.index_select(dim, keep.to(value.device))
    return value
