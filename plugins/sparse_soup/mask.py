"""Masks from importance scores: unstructured (per layer or one global threshold) or n:m."""

from __future__ import annotations

import torch

from compress.errors import CompressError


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A boolean mask of ``scores``' shape keeping its ``keep`` largest entries (exactly that many)."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        mask[torch.topk(flat.float(), keep, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def removed_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a sparsity removes (rounded to the nearest count)."""
    return int(round(sparsity * numel))


def n_m_mask(scores: torch.Tensor, n: int, m: int, name: str = "") -> torch.Tensor:
    """Keep the ``n`` highest-scoring weights in every group of ``m`` consecutive weights along each row."""
    rows, columns = scores.shape
    if columns % m:
        raise CompressError(f"{name or 'a layer'} has {columns} input features, not a multiple of m={m}: an n:m "
                            "pattern needs whole groups; leave this layer out of target_modules")
    groups = scores.reshape(rows, columns // m, m).float()
    kept = torch.topk(groups, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True)
    return mask.reshape(rows, columns)


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float, n_m: tuple[int, int] | None,
                      scope: str) -> dict[str, torch.Tensor]:
    """One boolean mask (True = kept) per scored weight.

    ``n_m``: the pattern's ``(n, m)``; otherwise ``scope="layer"`` removes ``sparsity`` of every tensor's entries
    and ``"global"`` the lowest-scoring ``sparsity`` of all entries together.
    """
    if n_m is not None:
        return {name: n_m_mask(s, *n_m, name=name) for name, s in scores.items()}
    if scope == "layer":
        return {name: _keep_top(s, s.numel() - removed_count(s.numel(), sparsity)) for name, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[name].reshape(-1).float() for name in names])
    kept = _keep_top(flat, flat.numel() - removed_count(flat.numel(), sparsity))
    masks, start = {}, 0
    for name in names:
        size = scores[name].numel()
        masks[name] = kept[start:start + size].reshape(scores[name].shape)
        start += size
        if not masks[name].any():
            raise CompressError(f"a global sparsity of {sparsity:g} removes every weight of {name}; use scope='layer' "
                                "or a lower sparsity")
    return masks
