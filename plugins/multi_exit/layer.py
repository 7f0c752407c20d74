"""The trainable part of a multi-exit model: one classifier per exit after an intermediate block."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class ExitHead(nn.Module):
    """A classifier on a block's output, read as the mean over the tokens the attention mask keeps
    (``pooling="mean"``), at the first token (``"first"``) or at the last real token (``"last"``).

    ``pooled``: the shape of the model's own head: with ``pooled_size`` (BERT's pooler, RoBERTa's classification
    head) dense + tanh + dropout + linear, else (a decoder's ``score``) dropout + linear; ``linear``: dropout +
    linear.
    """

    def __init__(self, hidden_size: int, num_labels: int, design: str, pooled_size: int | None = None,
                 dropout: float = 0.1, pooling: str = "mean", bias: bool = True) -> None:
        super().__init__()
        self.pooling = pooling
        self.design = design
        self.dense = nn.Linear(hidden_size, pooled_size) if design == "pooled" and pooled_size else None
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(pooled_size if self.dense is not None else hidden_size, num_labels, bias=bias)

    @torch.no_grad()
    def copy_from(self, dense: nn.Linear | None, out: nn.Linear) -> None:
        """Start a ``pooled`` head from the weights of the model's own head (a ``linear`` head stays random)."""
        if self.design != "pooled":
            return
        if self.dense is not None and dense is not None:
            self.dense.load_state_dict(dense.state_dict())
        self.out.load_state_dict(out.state_dict())

    def pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One vector per example: the first token's state, the last real token's, or the mean over real tokens
        (``attention_mask``: ``(batch, sequence)``, 1 for real tokens; without it every token is real)."""
        if self.pooling == "first":
            return hidden_states[:, 0]
        if self.pooling == "last":
            if attention_mask is None:
                return hidden_states[:, -1]
            positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)
            last = (positions * attention_mask.to(positions.dtype)).argmax(-1)  # right or left padding
            return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]
        if attention_mask is None:
            return hidden_states.mean(1)
        weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pool(hidden_states, attention_mask)
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
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, heads: nn.ModuleList, trainable: bool) -> None:
        """Hold ``heads`` as ``adapter_name``'s exit heads and make them the active ones (trainable unless not
        ``trainable``; any other adapter's heads are frozen, as peft's ``set_adapter`` does)."""
        self.exit_heads[adapter_name] = heads
        self.set_adapter(adapter_name, inference_mode=not trainable)

    def active_heads(self) -> nn.ModuleList | None:
        """The exit heads in use, or ``None`` while adapters are disabled (the model runs as it was)."""
        if self.disable_adapters:
            return None
        return next((self.exit_heads[name] for name in self.active_adapters if name in self.exit_heads), None)
