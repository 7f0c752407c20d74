"""The trainable part of a multi-exit model: one classifier per exit after an intermediate block."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class ExitHead(nn.Module):
    """A classifier on the first token of a block's output.

    ``pooled``: dense + tanh + dropout + linear (the shape of BERT's pooler and classifier, RoBERTa's
    classification head); ``linear``: dropout + linear.
    """

    def __init__(self, hidden_size: int, num_labels: int, design: str, pooled_size: int | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        pooled_size = pooled_size or hidden_size
        self.dense = nn.Linear(hidden_size, pooled_size) if design == "pooled" else None
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(pooled_size if design == "pooled" else hidden_size, num_labels)

    @torch.no_grad()
    def copy_from(self, dense: nn.Linear | None, out: nn.Linear) -> None:
        """Start from the weights of the model's own head (``dense`` is skipped by a ``linear`` head)."""
        if self.dense is not None and dense is not None:
            self.dense.load_state_dict(dense.state_dict())
            self.out.load_state_dict(out.state_dict())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states[:, 0]
        if self.dense is not None:
            x = torch.tanh(self.dense(x))
        return self.out(self.dropout(x))


class MultiExitLayer(nn.Module, BaseTunerLayer):
    """peft's view of the exits: a tuner layer (no base layer) holding, per adapter, the :class:`ExitHead` of each
    exit before the last block in ``exit_heads`` (the last block's exit is the model's own head)."""

    adapter_layer_names = ("exit_heads",)

    def __init__(self) -> None:
        super().__init__()
        self.exit_heads = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, heads: nn.ModuleList, trainable: bool) -> None:
        self.exit_heads[adapter_name] = heads
        heads.requires_grad_(trainable)
        self._active_adapter = adapter_name

    def active_heads(self) -> nn.ModuleList | None:
        """The exit heads in use, or ``None`` while adapters are disabled (the model runs as it was)."""
        if self.disable_adapters:
            return None
        return next((self.exit_heads[name] for name in self.active_adapters if name in self.exit_heads), None)
