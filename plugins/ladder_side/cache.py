"""One KV cache for the backbone and the side network, so ``generate()`` carries both."""

from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.cache_utils import Cache


class _WithSide:
    """The backbone's cache plus the side network's own cache in :attr:`side`: every operation ``generate()``
    applies between steps (reorder for beam search, crop for assisted decoding, repeat, select, reset) applies
    to both, so the side network's keys and values stay aligned with the backbone's."""

    side: Cache

    def reset(self) -> None:
        super().reset()
        self.side.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.side.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.side.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.side.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.side.batch_select_indices(indices)


class LadderCache(_WithSide, DynamicCache):
    """A decoder's :class:`~transformers.DynamicCache` with the side network's cache in :attr:`side`."""


class LadderEncoderDecoderCache(_WithSide, EncoderDecoderCache):
    """An encoder-decoder's :class:`~transformers.EncoderDecoderCache` with the side decoder's in :attr:`side`."""


_LADDER_CLASSES = {DynamicCache: LadderCache, EncoderDecoderCache: LadderEncoderDecoderCache}


def with_side(backbone: Cache, side: Cache) -> Cache:
    """The backbone's cache (sharing its layers, not copying them) carrying the side network's cache."""
    if isinstance(backbone, _WithSide):
        backbone.side = side
        return backbone
    ladder_class = _LADDER_CLASSES.get(type(backbone))
    if ladder_class is None:
        raise TypeError(f"Ladder Side-Tuning generates with a DynamicCache or EncoderDecoderCache; got "
                        f"{type(backbone).__name__} (e.g. a static cache): use the default cache_implementation")
    cache = ladder_class.__new__(ladder_class)
    cache.__dict__.update(backbone.__dict__)
    cache.side = side
    return cache


def side_cache(cache: Cache | None) -> Cache | None:
    """The side network's part of a cache this method returned (``None`` before the first step)."""
    return cache.side if isinstance(cache, _WithSide) else None
