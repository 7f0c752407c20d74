"""Quantised frozen linear layers (bitsandbytes 8-bit / 4-bit NF4) and back.

Used to keep a pruned, frozen backbone in 8 or 4 bits while adapters train in full precision. Install
the ``quant`` extra (``pip install peft-compress[quant]``) for bitsandbytes.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError

BITS = ("8bit", "4bit")


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise CompressError("quantize_backbone needs bitsandbytes: pip install 'peft-compress[quant]'") from err
    return bnb


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 8-bit or 4-bit linear layer."""
    name = type(module).__name__
    return name in ("Linear8bitLt", "Linear4bit", "LinearNF4", "LinearFP4")


def quantize_linear(layer: nn.Linear, bits: str) -> nn.Module:
    """A frozen bitsandbytes copy of ``layer``: ``"8bit"`` (LLM.int8) or ``"4bit"`` (NF4, fp32 compute)."""
    if bits not in BITS:
        raise CompressError(f"quantize_backbone={bits!r}; choose one of {', '.join(BITS)}")
    bnb = _bnb()
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


def dequantize_linear(module: nn.Module) -> nn.Linear:
    """A float32 ``nn.Linear`` with the (de)quantised weights of a bitsandbytes layer."""
    if not is_quantized(module):
        return module
    bnb = _bnb()
    w = module.weight
    if hasattr(w, "quant_state") and w.quant_state is not None:
        weight = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
    else:
        # LLM.int8 keeps int8 rows (in .data; .CB may be released after the first matmul) and per-row scales
        scale = w.SCB if w.SCB is not None else module.state.SCB
        weight = w.data.to(torch.float32) * scale.to(torch.float32)[:, None] / 127.0
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device=weight.device)
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(torch.float32).clone(), requires_grad=False)
    return linear
