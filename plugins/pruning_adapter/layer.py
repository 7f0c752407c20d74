"""Adapter layers of Pruning-Adapter: peft's LoRA layers whose base layer can lose channels.

The low-rank update (``lora_A``/``lora_B``, scaling, dropout, merging, dtype handling and the bitsandbytes
variants) is peft's :mod:`peft.tuners.lora`. This module adds what pruning needs: removing output/input
channels from the base layer and the adapter matrices together, recording the replaced parameters so an
optimizer can follow, and a bias-compensation buffer (``pa_bias``). Once pruning is done the frozen base layer
may be quantised: :func:`rebuilt` gives the layer of peft's bitsandbytes LoRA class around it (and, to merge,
the float layer around its dequantised form) holding the same adapter parameters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch_pruning as tp
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils.integrations import dequantize_module_weight, get_bnb_param_type
from torch import nn

from compress._compat import BufferDict
from compress.errors import CompressError

QUANTIZED_CLASSES: dict[str, type] = {}  # "8bit"/"4bit" -> the layer class around a bitsandbytes base layer


class PruningAdapterLayer(LoraLayer):
    """A LoRA layer (``y = base(x) + B(A(dropout(x))) * scaling``) plus ``pa_bias``, around a base layer that
    pruning may shrink in place.

    ``prune_output_channels``/``prune_input_channels`` shrink the base layer and the adapter matrices together
    (the pruning engine calls them, see :class:`compress.pruning.surgery.PrunableLayer`) and record in
    ``pruned_params`` which rows/columns survived, so that an optimizer's state can follow
    (:func:`compress.pruning.optim.remap_optimizer`).

    ``pa_bias`` (a frozen buffer, saved with the adapter weights) holds the bias compensation for input
    channels pruned away (:mod:`compress.pruning.compensate`); the frozen base bias itself never changes,
    so the original base model plus the adapter checkpoint rebuild the same model. Merging folds it in.
    """

    other_param_names = (*LoraLayer.other_param_names, "pa_bias")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs) -> None:
        """LoRA's ``update_layer``, plus a zero bias compensation when ``config.compensate_bias`` is set."""
        if "pa_bias" not in dict(self.named_children()):  # the first adapter (LoRA's constructor calls this)
            self.pa_bias = BufferDict({}, persistent=True)
            #: id(old) -> (old, new, dim, kept indices) for every parameter replaced by the last pruning calls;
            #: holding `old` keeps its id from being reused by a new parameter while the record is alive
            self.pruned_params: dict[int, tuple[nn.Parameter, nn.Parameter, int, torch.Tensor]] = {}
        super().update_layer(adapter_name, r, lora_alpha, config=config, **kwargs)
        if getattr(config, "compensate_bias", False):
            self.add_bias_buffer(adapter_name)

    def add_bias_buffer(self, adapter_name: str) -> None:
        """Give ``adapter_name`` a zero bias compensation, if the base layer has a bias to fold it into (only
        then: otherwise forward would add a zero vector in every layer)."""
        bias = getattr(self.get_base_layer(), "bias", None)
        if bias is not None:
            self.pa_bias[adapter_name] = torch.zeros(self.out_features, dtype=torch.float32, device=bias.device)

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
        """Remove output channels from the base layer, every adapter's B and the bias compensation."""
        self._check_prunable()
        gone = set(removed)
        keep = [i for i in range(self.out_features) if i not in gone]
        self._prune(self.get_base_layer(), removed, out=True)
        for b in self.lora_B.values():
            self._prune(b, removed, out=True)
        for adapter, shift in list(self.pa_bias.items()):
            self.pa_bias[adapter] = shift[keep].clone()
        self.out_features = self.get_base_layer().out_features

    def prune_input_channels(self, removed: list[int]) -> None:
        """Remove input channels from the base layer and every adapter's A."""
        self._check_prunable()
        self._prune(self.get_base_layer(), removed, out=False)
        for a in self.lora_A.values():
            self._prune(a, removed, out=False)
        self.in_features = self.get_base_layer().in_features

    def add_bias_shift(self, shift: torch.Tensor) -> None:
        """Add ``shift`` to the bias compensation of every active adapter (base layers with a bias only)."""
        self._check_prunable()
        for adapter in self.active_adapters:
            if adapter not in self.pa_bias:
                raise CompressError(f"{type(self.get_base_layer()).__name__} has no bias to hold a compensation")
            self.pa_bias[adapter] = self.pa_bias[adapter] + shift.to(self.pa_bias[adapter])

    @property
    def quantized(self) -> bool:
        """Whether the base layer holds bitsandbytes weights."""
        return bool(get_bnb_param_type(self.get_base_layer().weight))

    def _check_prunable(self) -> None:
        if self.quantized:
            raise CompressError("cannot prune a quantised base layer: pruning must finish before quantize_backbone "
                                "applies")
        if self.merged:
            raise RuntimeError("unmerge the adapters before pruning: pruning a merged layer would bake the "
                               "adapter into the frozen weights")

    # -- the bias compensation in forward and merge ---------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = super().forward(x, *args, **kwargs)
        if self.disable_adapters or self.merged or not self.pa_bias:
            return result
        per_row = kwargs.get("adapter_names")  # peft's mixed-adapter batches: one adapter name per row
        for adapter in self.active_adapters if per_row is None else sorted(set(per_row)):
            if adapter not in self.pa_bias:
                continue
            shift = self.pa_bias[adapter].to(result.dtype)
            if per_row is None:
                result = result + shift
            else:
                rows = torch.tensor([i for i, name in enumerate(per_row) if name == adapter], device=result.device)
                result = result.index_add(0, rows, shift.expand(len(rows), *result.shape[1:]))
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """peft's LoRA merge plus the bias compensation (the tuner gives a quantised layer its float form first,
        see :func:`rebuilt`, so that merging gives a float layer)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter in self.merged_adapters and adapter in self.pa_bias:
                base.bias.data = (base.bias.data.float() + self.pa_bias[adapter]).to(base.bias.dtype)

    def unmerge(self) -> None:
        merged = list(self.merged_adapters)
        super().unmerge()
        base = self.get_base_layer()
        for adapter in merged:
            if adapter in self.pa_bias and adapter not in self.merged_adapters:
                base.bias.data = (base.bias.data.float() - self.pa_bias[adapter]).to(base.bias.dtype)

    def __repr__(self) -> str:
        return "pruning_adapter." + nn.Module.__repr__(self)


class Linear(PruningAdapterLayer, LoraLinear):
    """Pruning-Adapter around an ``nn.Linear``: peft's ``lora.Linear`` with channel pruning and ``pa_bias``."""


QUANTIZED_CLASSES: dict[str, type[PruningAdapterLayer]] = {}  # "8bit"/"4bit" -> the class around a bitsandbytes base

if is_bnb_available():
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt

    class Linear8bitLt(PruningAdapterLayer, LoraLinear8bitLt):
        """Pruning-Adapter around a bitsandbytes 8-bit base layer (once pruning is finished)."""

    QUANTIZED_CLASSES["8bit"] = Linear8bitLt

if is_bnb_4bit_available():
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    class Linear4bit(PruningAdapterLayer, LoraLinear4bit):
        """Pruning-Adapter around a bitsandbytes 4-bit (NF4) base layer (once pruning is finished)."""

    QUANTIZED_CLASSES["4bit"] = Linear4bit


def rebuilt(layer: PruningAdapterLayer, base: nn.Module, configs: Mapping[str, LoraConfig]) -> PruningAdapterLayer:
    """A layer of the class that fits ``base`` (float, or bitsandbytes 8/4-bit) in place of ``layer``: around
    ``base``, with ``layer``'s adapters, its adapter parameters and bias compensations themselves (an optimizer
    holding them goes on training them), their trainability and which adapters are active."""
    if layer.merged:
        raise CompressError("unmerge the adapters before quantising or dequantising the base layer")
    bits = get_bnb_param_type(base.weight)
    cls = QUANTIZED_CLASSES[bits] if bits else Linear
    first, *others = list(layer.lora_A)
    new = cls(base, first, config=configs[first], r=layer.r[first], lora_alpha=layer.lora_alpha[first])
    for name in others:
        new.update_layer(name, layer.r[name], layer.lora_alpha[name], config=configs[name])
    trainable = {parameter: parameter.requires_grad for parameter in layer.parameters()}
    new.set_adapter(layer.active_adapters)
    new.enable_adapters(not layer.disable_adapters)
    for name in layer.lora_A:
        new.lora_A[name], new.lora_B[name] = layer.lora_A[name], layer.lora_B[name]
        if name in layer.pa_bias:
            new.pa_bias[name] = layer.pa_bias[name]
    for parameter, requires_grad in trainable.items():
        parameter.requires_grad_(requires_grad)
    return new


def dequantized_linear(base: nn.Module) -> nn.Linear:
    """A float32 ``nn.Linear`` equal to a bitsandbytes base layer (peft's ``dequantize_module_weight``)."""
    weight = dequantize_module_weight(base).detach().to(torch.float32)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None, device=weight.device)
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.detach().to(torch.float32).clone(), requires_grad=False)
    return linear


def quantize_linear(layer: nn.Linear, bits: str) -> nn.Module:
    """A frozen bitsandbytes copy of ``layer``: ``"8bit"`` (LLM.int8) or ``"4bit"`` (NF4, fp32 compute)."""
    if bits not in QUANTIZED_CLASSES:
        if bits in ("8bit", "4bit"):
            raise CompressError("quantize_backbone needs bitsandbytes: pip install 'peft-compress[quant]'")
        raise CompressError(f"quantize_backbone={bits!r}; choose one of 8bit, 4bit")
    import bitsandbytes as bnb

    device = layer.weight.device
    weight = layer.weight.detach().to(torch.float32).cpu().clone()
    has_bias = layer.bias is not None
    try:
        if bits == "8bit":
            q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=0.0)
            q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=has_bias,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            # On CPUs with avx512_bf16, an eval/no-grad forward repacks the weights for a faster kernel; after
            # that, gradients through the layer are silently zero (and layers narrower than 64 inputs fail).
            # Adapters train through these layers, so keep the one packing format that supports backward.
            q.support_avx512bf16_for_cpu = False
        if has_bias:
            q.bias = nn.Parameter(layer.bias.detach().to(torch.float32).clone(), requires_grad=False)
        q = q.to(device)  # bitsandbytes quantises on the move to the device
    except (RuntimeError, NotImplementedError, ValueError) as err:
        raise CompressError(f"bitsandbytes cannot quantise to {bits} on {device}: {err}. Use a supported device "
                            "(CUDA, or a CPU backend of bitsandbytes >= 0.45) or quantize_backbone=None") from err
    return q
