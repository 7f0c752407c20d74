"""One KV cache for the backbone and the side network, so ``generate()`` carries both."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache


class LadderCache(DynamicCache):
    """The backbone's :class:`~transformers.DynamicCache` plus the side network's own cache in :attr:`side`.

    ``generate()`` passes the cache a model returns back into the next step and reorders, crops or repeats it
    between steps; every such operation here applies to both caches, so beam search and assisted decoding keep
    the side network's keys and values aligned with the backbone's.
    """

    side: Cache

    @classmethod
    def around(cls, backbone: Cache, side: Cache) -> LadderCache:
        """Wrap the backbone's cache (sharing its layers, not copying them) with the side network's."""
        if isinstance(backbone, LadderCache):
            backbone.side = side
            return backbone
        if type(backbone) is not DynamicCache:
            raise TypeError(f"Ladder Side-Tuning generates with a DynamicCache; got {type(backbone).__name__} "
                            "(e.g. a static cache): use the default cache_implementation")
        cache = cls.__new__(cls)
        cache.__dict__.update(backbone.__dict__)
        cache.side = side
        return cache

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
