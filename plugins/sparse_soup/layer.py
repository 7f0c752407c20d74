"""Sparse fine-tuning layers: a linear layer computing with ``(W + update) * mask``.

The mask is a saved boolean buffer per adapter (``sparse_mask``). Because the product with the mask is inside
the forward, a pruned weight gets a zero gradient: no optimizer step (momentum and weight decay included)
can move its update away from zero, so training never revives it. The base weight is never written until
merging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from compress._compat import BufferDict
from compress.errors import CompressError

_NO_UNMERGE = ("a merged sparse layer cannot be unmerged: merging zeroed the pruned base weights. Keep the adapter "
               "unmerged, or reload the base model")


class SparseMask:
    """The mask half of a sparse layer: one boolean mask per adapter, shaped like the base weight, and merging
    (first among the layer's bases, so that its ``merge`` replaces LoRA's)."""

    def add_mask(self, adapter_name: str) -> None:
        """Start ``adapter_name`` with every weight kept (the tuner computes the real mask afterwards)."""
        if "sparse_mask" not in dict(self.named_children()):  # the layer's first adapter
            self.sparse_mask = BufferDict({}, persistent=True)
        weight = self.get_base_layer().weight
        self.sparse_mask[adapter_name] = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)

    def set_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        weight = self.get_base_layer().weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise CompressError(f"a mask of shape {tuple(mask.shape)} does not fit a weight of {tuple(weight.shape)}")
        self.sparse_mask[adapter_name] = mask.to(device=weight.device, dtype=torch.bool)

    def masked_weight(self, adapter_name: str) -> torch.Tensor:
        """The weight the layer computes with: ``(W + update) * mask``."""
        base = self.get_base_layer().weight
        weight = base + self.update_weight(adapter_name).to(base.dtype)
        return weight * self.sparse_mask[adapter_name].to(base.dtype)

    def update_weight(self, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def _adapter_in_use(self) -> str | None:
        """The active adapter with a mask, or ``None`` when the layer computes as its base layer (adapters off,
        or merged)."""
        if self.disable_adapters or self.merged:
            return None
        return next((a for a in self.active_adapters if a in self.sparse_mask), None)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write ``(W + update) * mask`` into the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if len(adapter_names) > 1:
            raise CompressError("merge one sparse adapter at a time: each carries its own mask")
        for name in adapter_names:
            weight = self.masked_weight(name).detach()
            if safe_merge and not torch.isfinite(weight).all():
                raise CompressError(f"merging adapter {name!r} gives non-finite weights; not merged")
            self.get_base_layer().weight.data.copy_(weight)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        raise CompressError(_NO_UNMERGE)


class SparseLinear(SparseMask, nn.Module, BaseTunerLayer):
    """``train="weights"``: a dense update ``sparse_delta`` of the base weight, trained on the kept entries only."""

    adapter_layer_names = ("sparse_delta",)
    other_param_names = ("sparse_mask",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.sparse_delta = nn.ParameterDict()
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.update_layer(adapter_name, config)
        self.set_adapter(adapter_name, inference_mode=config.inference_mode)

    def update_layer(self, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        """A dense update of the base weight, at zero (``init_lora_weights=True``) or random, and a full mask."""
        weight = self.get_base_layer().weight
        zero = config.init_lora_weights is not False
        delta = torch.zeros_like(weight) if zero else torch.randn_like(weight) * weight.std() * 0.1
        self.sparse_delta[adapter_name] = nn.Parameter(delta)
        self.add_mask(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def update_weight(self, adapter_name: str) -> torch.Tensor:
        return self.sparse_delta[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._adapter_in_use()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        return F.linear(x, self.masked_weight(adapter), self.get_base_layer().bias)

    def __repr__(self) -> str:
        return "sparse_soup." + super().__repr__()


class SparseLoraLinear(SparseMask, LoraLinear):
    """``train="lora"``: peft's LoRA update ``B @ A * scaling``, masked like the weight it updates, so that the
    trained function and the merged sparse layer are the same. The LoRA input keeps its dropout:
    ``y = x (W*M)^T + dropout(x) (dW*M)^T + b``."""

    other_param_names = (*LoraLayer.other_param_names, "sparse_mask")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs) -> None:
        """LoRA's ``update_layer``, plus a full mask for the adapter."""
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        self.add_mask(adapter_name)

    def update_weight(self, adapter_name: str) -> torch.Tensor:
        return self.get_delta_weight(adapter_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._adapter_in_use()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        mask = self.sparse_mask[adapter].to(base.weight.dtype)
        delta = self.get_delta_weight(adapter).to(base.weight.dtype) * mask
        result = F.linear(x, base.weight * mask, base.bias)
        return result + F.linear(self.lora_dropout[adapter](x), delta)

    def __repr__(self) -> str:
        return "sparse_soup." + super().__repr__()
