"""Layer-wise distillation from the frozen dense model into its pruned copy.

Pruning removes channels whose contribution the adapters must then learn to replace; with a small
training set the task loss alone says little about how. The dense model's own hidden states say it for
every token of every layer. The teacher is the *original* frozen model: :func:`frozen_teacher` copies its
modules but not its tensors, so until a layer is pruned teacher and student share its memory, and
afterwards the teacher holds only the dense weights the model was loaded with (the student's pruned copies
are the new allocations). When the student moves or is cast, :func:`follow_student` points the teacher at
the student's new tensors again and moves only what the student no longer has. The teacher runs under
``no_grad``: no activations are kept for it and it never trains.
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
    links = [(nn.Parameter(p.data, requires_grad=False), p) for p in model.parameters()]
    memo: dict[int, Any] = {id(student): own for own, student in links}
    memo.update({id(b): b for b in model.buffers()})
    teacher = copy.deepcopy(model, memo)  # modules, config and small attributes are copied; tensors are not
    teacher.eval()
    teacher.requires_grad_(False)
    teacher.__dict__[_LINKS] = links  # outside the module tree: not a submodule, not in state_dict
    return teacher


_LINKS = "_compress_student_parameters"


def follow_student(teacher: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Bring ``teacher`` to the student's ``device``/``dtype`` without a second copy of shared weights.

    ``model.to(...)`` gives the student's parameters new tensors; the teacher's still point at the old
    ones. Parameters the student still has (same shape) are re-pointed at its current tensors; only the
    rest, the dense originals of pruned layers, are moved or cast.
    """
    for own, student in teacher.__dict__.get(_LINKS, ()):
        if own.data_ptr() != student.data_ptr() and own.shape == student.shape and \
                student.device == device and student.dtype == dtype:
            own.data = student.data
    teacher.to(device=device, dtype=dtype)


def hidden_states_of(outputs: Any) -> list[torch.Tensor]:
    """Every layer's hidden states in a transformers output (empty if it returned none)."""
    states: list[torch.Tensor] = []
    for name in HIDDEN_STATE_FIELDS:
        value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
        if value:
            states.extend(value)
    return states


def hidden_state_masks(outputs: Any, attention_mask: torch.Tensor | None,
                       decoder_attention_mask: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """The padding mask for each state :func:`hidden_states_of` returns: a seq2seq decoder's states get
    ``decoder_attention_mask`` (or none), every other state ``attention_mask``."""
    masks: list[torch.Tensor | None] = []
    for name in HIDDEN_STATE_FIELDS:
        value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
        if value:
            masks.extend([decoder_attention_mask if name == "decoder_hidden_states" else attention_mask] * len(value))
    return masks


def hidden_state_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                      attention_mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Mean squared error between matching hidden states, over real tokens, averaged over layers.

    ``attention_mask`` (``batch x tokens``, 1 for real tokens; or one mask or None per state, see
    :func:`hidden_state_masks`) excludes padding wherever a state has that many tokens; states of another
    length, or without a mask, are averaged over all positions.
    """
    if len(student) != len(teacher) or not student:
        raise CompressError(f"distillation needs the same number of hidden states from student and teacher, got "
                            f"{len(student)} and {len(teacher)} (layer pruning changes the depth: not supported)")
    masks = list(attention_mask) if isinstance(attention_mask, (list, tuple)) else [attention_mask] * len(student)
    if len(masks) != len(student):
        raise CompressError(f"got {len(masks)} masks for {len(student)} hidden states")
    losses = []
    for s, t, mask in zip(student, teacher, masks, strict=True):
        if s.shape != t.shape:
            raise CompressError(f"student and teacher hidden states differ in shape: {tuple(s.shape)} vs "
                                f"{tuple(t.shape)}")
        error = (s.float() - t.float()).pow(2).mean(dim=-1)
        if mask is not None and mask.shape == error.shape:
            weights = mask.to(error.dtype)
            losses.append((error * weights).sum() / weights.sum().clamp_min(1.0))
        else:
            losses.append(error.mean())
    return torch.stack(losses).mean()
