"""Device helpers shared by the latency and training-memory measurements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a module without either."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors moved to ``device`` (other values unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (timings must not stop before the kernels do); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
