"""Layer-wise distillation from the frozen dense model into its pruned copy.

Pruning removes channels whose contribution the adapters must then learn to replace; with a small
training set the task loss alone says little about how. The dense model's own hidden states say it for
every token of every layer. The teacher is the *original* frozen model: :func:`frozen_teacher` builds it
on the meta device and assigns it the original weight tensors, so until a layer is pruned teacher and
student share its memory, and afterwards the teacher holds only the dense weights the model was loaded
with (the student's pruned copies are the new allocations). The teacher runs under ``no_grad``: no
activations are kept for it and it never trains.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError

#: output fields that hold per-layer hidden states (encoder-only/decoder-only, and both stacks of seq2seq)
HIDDEN_STATE_FIELDS = ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of ``model`` whose parameters and buffers share ``model``'s memory (no copy).

    Call it before anything replaces ``model``'s weights (pruning, adapter injection): later changes to
    ``model``'s modules do not reach the teacher; in-place writes to the shared tensors would.
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.data, requires_grad=False) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    teacher = copy.deepcopy(model, memo)  # modules, config and small attributes are copied; tensors are not
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def hidden_states_of(outputs: Any) -> list[torch.Tensor]:
    """Every layer's hidden states in a transformers output (empty if it returned none)."""
    states: list[torch.Tensor] = []
    for name in HIDDEN_STATE_FIELDS:
        value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
        if value:
            states.extend(value)
    return states


def hidden_state_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between matching hidden states, over real tokens, averaged over layers.

    ``attention_mask`` (``batch x tokens``, 1 for real tokens) excludes padding wherever a state has that
    many tokens; states of another length (e.g. a seq2seq decoder's) are averaged over all positions.
    """
    if len(student) != len(teacher) or not student:
        raise CompressError(f"distillation needs the same number of hidden states from student and teacher, got "
                            f"{len(student)} and {len(teacher)} (layer pruning changes the depth: not supported)")
    losses = []
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape:
            raise CompressError(f"student and teacher hidden states differ in shape: {tuple(s.shape)} vs "
                                f"{tuple(t.shape)}")
        error = (s.float() - t.float()).pow(2).mean(dim=-1)
        if attention_mask is not None and attention_mask.shape == error.shape:
            weights = attention_mask.to(error.dtype)
            losses.append((error * weights).sum() / weights.sum().clamp_min(1.0))
        else:
            losses.append(error.mean())
    return torch.stack(losses).mean()
