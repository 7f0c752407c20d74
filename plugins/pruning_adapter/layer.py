"""Adapter layer of Pruning-Adapter: a low-rank update around a linear layer that can lose channels."""

from __future__ import annotations

import math

import torch
import torch_pruning as tp
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from compress.errors import CompressError
from compress.quantize import dequantize_linear, is_quantized, quantize_linear


class PruningAdapterLayer(BaseTunerLayer):
    """``y = base(x) + B(A(dropout(x))) * alpha / r + bias_shift`` where the base layer may be pruned in place.

    ``prune_output_channels``/``prune_input_channels`` shrink the base layer and the adapter matrices
    together (the pruning engine calls them), and record which rows/columns survived so that an
    optimizer's state can follow (:func:`compress.pruning.optim.remap_optimizer`).

    ``pa_bias`` (a frozen buffer, saved with the adapter weights) holds the bias compensation for input
    channels pruned away (:mod:`compress.pruning.compensate`); the frozen base bias itself never changes,
    so the original base model plus the adapter checkpoint rebuild the same model. Merging folds it in.
    """

    adapter_layer_names = ("pa_A", "pa_B")
    other_param_names = ("r", "lora_alpha", "scaling", "pa_dropout", "pa_bias")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.pa_dropout = nn.ModuleDict({})
        self.pa_A = nn.ModuleDict({})
        self.pa_B = nn.ModuleDict({})
        self.pa_bias = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        #: id(old) -> (old, new, dim, kept indices) for every parameter replaced by the last pruning calls;
        #: holding `old` keeps its id from being reused by a new parameter while the record is alive
        self.pruned_params: dict[int, tuple[nn.Parameter, nn.Parameter, int, torch.Tensor]] = {}
        self.kwargs = kwargs

    @property
    def in_features(self) -> int:
        return self.get_base_layer().in_features

    @property
    def out_features(self) -> int:
        return self.get_base_layer().out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                     init_weights: bool = True, inference_mode: bool = False, compensate_bias: bool = False) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.pa_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.pa_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.pa_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.pa_A[adapter_name].weight, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.pa_B[adapter_name].weight)
        else:  # a non-zero start, so tests can tell the adapter path from the base path
            nn.init.normal_(self.pa_B[adapter_name].weight, std=0.02)
        # only when compensation is configured: otherwise forward would add a zero vector in every layer
        if compensate_bias and getattr(self.get_base_layer(), "bias", None) is not None:
            self.pa_bias[adapter_name] = torch.zeros(self.out_features, dtype=torch.float32)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # -- structural pruning ----------------------------------------------------------------------------
    def _record(self, old: nn.Parameter, new: nn.Parameter, dim: int, removed: list[int], size: int) -> None:
        keep = torch.tensor(sorted(set(range(size)) - set(removed)), dtype=torch.long)
        self.pruned_params[id(old)] = (old, new, dim, keep)

    def _prune(self, layer: nn.Linear, removed: list[int], out: bool) -> None:
        size = layer.out_features if out else layer.in_features
        old_weight, old_bias = layer.weight, layer.bias
        (tp.prune_linear_out_channels if out else tp.prune_linear_in_channels)(layer, removed)
        self._record(old_weight, layer.weight, 0 if out else 1, removed, size)
        if out and old_bias is not None:
            self._record(old_bias, layer.bias, 0, removed, size)

    def prune_output_channels(self, removed: list[int]) -> None:
        """Remove output channels from the base layer and every adapter's B."""
        self._check_unmerged()
        gone = set(removed)
        keep = [i for i in range(self.out_features) if i not in gone]
        self._prune(self.get_base_layer(), removed, out=True)
        for b in self.pa_B.values():
            self._prune(b, removed, out=True)
        for adapter, shift in list(self.pa_bias.items()):
            self.pa_bias[adapter] = shift[keep].clone()

    def add_bias_shift(self, shift: torch.Tensor) -> None:
        """Add ``shift`` to the bias compensation of every active adapter (base layers with a bias only)."""
        self._check_unmerged()
        for adapter in self.active_adapters:
            if adapter not in self.pa_bias:
                raise CompressError(f"{type(self.get_base_layer()).__name__} has no bias to hold a compensation")
            self.pa_bias[adapter] = self.pa_bias[adapter] + shift.to(self.pa_bias[adapter])

    def prune_input_channels(self, removed: list[int]) -> None:
        """Remove input channels from the base layer and every adapter's A."""
        self._check_unmerged()
        self._prune(self.get_base_layer(), removed, out=False)
        for a in self.pa_A.values():
            self._prune(a, removed, out=False)

    def quantize_base(self, bits: str) -> None:
        """Replace the frozen base layer by its bitsandbytes form (``"8bit"`` or ``"4bit"``)."""
        if not is_quantized(self.base_layer):
            self.base_layer = quantize_linear(self.base_layer, bits)

    def dequantize_base(self) -> None:
        """Bring a quantised base layer back to a float ``nn.Linear`` (before merging)."""
        if is_quantized(self.base_layer):
            self.base_layer = dequantize_linear(self.base_layer)

    def _check_unmerged(self) -> None:
        if is_quantized(self.get_base_layer()):
            raise CompressError("cannot prune a quantised base layer: pruning must finish before quantize_backbone "
                                "applies")
        if self.merged:
            raise RuntimeError("unmerge the adapters before pruning: pruning a merged layer would bake the "
                               "adapter into the frozen weights")


class Linear(nn.Module, PruningAdapterLayer):
    """Pruning-Adapter around an ``nn.Linear``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0, init_weights: bool = True, compensate_bias: bool = False,
                 **kwargs) -> None:
        super().__init__()
        PruningAdapterLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_weights, compensate_bias=compensate_bias)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, b = self.pa_A[adapter].weight, self.pa_B[adapter].weight
        return (b.float() @ a.float()) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        self.dequantize_base()  # quantised weights cannot absorb the update: merging yields a float layer
        base = self.get_base_layer()
        for adapter in adapter_names or self.active_adapters:
            if adapter not in self.pa_A or adapter in self.merged_adapters:
                continue
            merged = base.weight.data.float() + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights of adapter {adapter!r}")
            base.weight.data = merged.to(base.weight.dtype)
            if adapter in self.pa_bias:
                base.bias.data = (base.bias.data.float() + self.pa_bias[adapter]).to(base.bias.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            base.weight.data = (base.weight.data.float() - self.get_delta_weight(adapter)).to(base.weight.dtype)
            if adapter in self.pa_bias:
                base.bias.data = (base.bias.data.float() - self.pa_bias[adapter]).to(base.bias.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.pa_A:
                continue
            a = self.pa_A[adapter]
            h = self.pa_dropout[adapter](x.to(a.weight.dtype))
            result = result + (self.pa_B[adapter](a(h)) * self.scaling[adapter]).to(result.dtype)
            if adapter in self.pa_bias:
                result = result + self.pa_bias[adapter].to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "pruning_adapter." + super().__repr__()
