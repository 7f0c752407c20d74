"""The trainable part of Ladder Side-Tuning: the side network, its ladders (down-projections from the backbone's
hidden states), the gates that mix ladder and side state, and the up-projection back to the backbone's width."""

from __future__ import annotations

from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from compress.pruning.arch import arch_spec


class LadderSide(nn.Module):
    """Side network plus ladders for one adapter.

    The side network has one stack of blocks per backbone stack (encoder-only and decoder-only models: one; T5:
    encoder and decoder). :meth:`run` runs stack ``s`` on the backbone's states of that stack: its embedding
    output (``states[0]``, through the first ladder) and the outputs of the backbone blocks that feed ladders
    (``states[1:]``, one per side block). :attr:`up` projects the last stack's output back to the backbone's
    width; with ``segment_pooling``, :meth:`pool_segments` gives a sequence classifier its pooled input.
    """

    def __init__(self, side: PreTrainedModel, backbone_width: int, gate_temperature: float, gate_init: float,
                 kept_hidden: list[int] | None = None, zero_up: bool = False, segment_pooling: bool = False) -> None:
        super().__init__()
        side_width = side.config.hidden_size
        self.side = side
        stacks = arch_spec(side).stacks()
        self.stack_names = [stack.name for stack in stacks]
        self.num_blocks = len(stacks[0].blocks)
        self.down = nn.ModuleList(
            nn.ModuleList(nn.Linear(backbone_width, side_width) for _ in range(len(stack.blocks) + 1))
            for stack in stacks)
        self.gates = nn.Parameter(torch.full((len(stacks), self.num_blocks), float(gate_init)))
        self.up = nn.Linear(side_width, backbone_width)
        # [u, v, |u - v|, u * v] of the two segments' mean side states -> side width (then `up`, as every side state)
        self.pool = nn.Linear(4 * side_width, side_width) if segment_pooling else None
        self.gate_temperature = gate_temperature
        dtype = next(side.parameters()).dtype
        self.down.to(dtype)
        self.up.to(dtype)
        if self.pool is not None:
            self.pool.to(dtype)
        if kept_hidden is not None:
            self.select_channels(kept_hidden)
        if zero_up:  # added to the backbone's output: start from the backbone's own predictions
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self._ladders: tuple[int, list[torch.Tensor]] | None = None
        for s, stack in enumerate(stacks):
            for j, block in enumerate(stack.blocks):
                # partials of a bound method, not closures: copy.deepcopy rebinds them to the copy
                block.register_forward_pre_hook(partial(self._mix_ladder, s, j), with_kwargs=True)

    @torch.no_grad()
    def select_channels(self, kept: list[int]) -> None:
        """Ladders that pick the backbone's ``kept`` hidden channels and an up-projection that puts them back:
        with the pruned initialisation, each side block then starts from the channels its pruned copy reads."""
        index = torch.as_tensor(kept)
        for down in (d for stack in self.down for d in stack):
            down.weight.zero_()
            down.weight[torch.arange(len(kept)), index] = 1.0
            down.bias.zero_()
        self.up.weight.zero_()
        self.up.weight[index, torch.arange(len(kept))] = 1.0
        self.up.bias.zero_()

    def gate_values(self) -> torch.Tensor:
        """``sigmoid(alpha / T)`` per stack and side block: the weight of the ladder against the side state."""
        return torch.sigmoid(self.gates / self.gate_temperature)

    def _mix_ladder(self, stack: int, j: int, module: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook of side block ``j`` of ``stack``: its input becomes gate * ladder + (1 - gate) * side state."""
        if self._ladders is None or self._ladders[0] != stack:
            return None
        ladder = self.down[stack][j + 1](self._ladders[1][j + 1])
        gate = self.gate_values()[stack, j].to(ladder.dtype)
        if args:
            return (gate * ladder + (1 - gate) * args[0], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": gate * ladder + (1 - gate) * kwargs["hidden_states"]}

    def pool_segments(self, states: torch.Tensor, attention_mask: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """A sequence classifier's input from the side network's last ``states`` (``[batch, length, side width]``):
        ``tanh(up(pool([u, v, |u - v|, u * v])))`` at the backbone's width, where ``u`` and ``v`` are the mean
        states of the first segment (``token_type_ids`` 0) and of the second (any other id; zero when a row has
        none), over the tokens the ``attention_mask`` keeps."""
        keep = (attention_mask if attention_mask is not None and attention_mask.dim() == 2
                else torch.ones(states.shape[:2], device=states.device)).to(states.dtype)
        second = (torch.zeros_like(keep) if token_type_ids is None else (token_type_ids != 0).to(states.dtype)) * keep
        first = keep - second
        u = (states * first.unsqueeze(-1)).sum(1) / first.sum(1, keepdim=True).clamp(min=1)
        v = (states * second.unsqueeze(-1)).sum(1) / second.sum(1, keepdim=True).clamp(min=1)
        return torch.tanh(self.up(self.pool(torch.cat([u, v, (u - v).abs(), u * v], dim=-1))))

    def stack_module(self, stack: int) -> nn.Module:
        """What runs side stack ``stack``: the side model itself, or its ``encoder``/``decoder``."""
        return self.side if len(self.stack_names) == 1 else getattr(self.side, self.stack_names[stack])

    def run(self, stack: int, states: list[torch.Tensor], **inputs):
        """Run side stack ``stack`` on the backbone's ``states``; ``inputs`` are the stack's own keyword arguments
        (attention mask, position ids, cache, encoder states, ...). Returns its outputs."""
        if len(states) != len(self.down[stack]):
            raise ValueError(f"expected {len(self.down[stack])} backbone states (embeddings + one per side block), "
                             f"got {len(states)}")
        dtype = self.up.weight.dtype
        ladders = [s.to(dtype) for s in states]
        self._ladders = (stack, ladders)
        try:
            return self.stack_module(stack)(inputs_embeds=self.down[stack][0](ladders[0]), return_dict=True,
                                            **inputs)
        finally:
            self._ladders = None


class LadderSideLayer(nn.Module, BaseTunerLayer):
    """peft's view of the side networks: a tuner layer (no base layer) holding one :class:`LadderSide` per
    adapter in ``lst_network``, so that peft's adapter switching, ``disable_adapter()`` and status reports see
    them."""

    adapter_layer_names = ("lst_network",)

    def __init__(self) -> None:
        super().__init__()
        self.lst_network = nn.ModuleDict()
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, network: LadderSide, trainable: bool) -> None:
        """Hold ``network`` as ``adapter_name``'s side network and make it the active one (trainable unless not
        ``trainable``; any other adapter's network is frozen, as peft's ``set_adapter`` does)."""
        self.lst_network[adapter_name] = network
        self.set_adapter(adapter_name, inference_mode=not trainable)

    def active_network(self) -> LadderSide | None:
        """The side network that runs, or ``None`` while adapters are disabled."""
        if self.disable_adapters:
            return None
        return next((self.lst_network[name] for name in self.active_adapters if name in self.lst_network), None)
