"""Opt-in distillation for Pruning-Adapter (``distill_weight > 0``): the training loss also gets the hidden-state
error of the pruned model against the frozen dense original.

:class:`Distillation` hooks the tuner's forward: while training with gradients, it asks the model for its
hidden states, runs the teacher (:func:`compress.pruning.distill.frozen_teacher`, which shares the loaded
weights) under ``no_grad``, and adds ``weight`` x the masked mean squared error between every layer's hidden
states (:func:`compress.pruning.distill.hidden_state_loss`) to the model's own loss. The teacher lives outside
the module tree: never saved, trained or moved with the model (it follows the student's device and dtype at
each forward).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from compress.pruning.distill import (
    HIDDEN_STATE_FIELDS,
    follow_student,
    frozen_teacher,
    hidden_state_loss,
    hidden_state_masks,
    hidden_states_of,
)

from .plan import kept_hidden_channels

logger = logging.getLogger(__name__)


class Distillation:
    """Hidden-state distillation from the dense original into a tuner's (pruned) model, through forward hooks
    on the tuner. Build it with :meth:`attach` before the model is pruned; :meth:`release` drops the teacher
    (merging calls it) and leaves the hooks inert."""

    def __init__(self, teacher: nn.Module, weight: float) -> None:
        self.teacher: nn.Module | None = teacher
        self.weight = weight
        self._asked_for_hidden: bool | None = None  # None: this forward is not distilled
        self._warned = False

    @classmethod
    def attach(cls, tuner: nn.Module, model: nn.Module, weight: float) -> Distillation:
        """Distil into ``tuner`` (whose forward runs ``model``) from a frozen copy of ``model`` as it is now."""
        distillation = cls(frozen_teacher(model), weight)
        tuner.register_forward_pre_hook(distillation._before, with_kwargs=True)
        tuner.register_forward_hook(distillation._after, with_kwargs=True)
        return distillation

    def release(self) -> None:
        """Drop the teacher (and the dense weights only it still holds); the hooks do nothing from now on."""
        self.teacher = None

    def _before(self, tuner: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._asked_for_hidden = None
        if self.teacher is None or not tuner.model.training or not torch.is_grad_enabled():
            return None
        if kwargs.get("return_dict") is False:
            self._warn("return_dict=False")
            return None
        if kwargs.get("labels") is None and not args:
            self._warn("the forward gets no labels (so returns no loss to add to)")
            return None
        self._asked_for_hidden = bool(kwargs.get("output_hidden_states"))
        return args, {**kwargs, "output_hidden_states": True}

    def _after(self, tuner: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        asked, self._asked_for_hidden = self._asked_for_hidden, None
        if asked is None:
            return None
        if not isinstance(outputs, Mapping):  # tuples by the model config's own choice (use_return_dict)
            self._warn("the model returns tuples")
            return None
        if outputs.get("loss") is None:
            self._warn("the model returned no loss")
        else:
            student = next(p for p in tuner.model.parameters() if p.is_floating_point())
            follow_student(self.teacher, student.device, student.dtype)
            with torch.no_grad():
                target = self.teacher(*args, **kwargs)
            masks = hidden_state_masks(outputs, kwargs.get("attention_mask"), kwargs.get("decoder_attention_mask"))
            student_states, teacher_states = hidden_states_of(outputs), hidden_states_of(target)
            if student_states and teacher_states and student_states[0].shape[-1] < teacher_states[0].shape[-1]:
                # hidden-size pruning: the student carries a subset of the teacher's channels
                kept = kept_hidden_channels(tuner.active_config.pruning_plan, teacher_states[0].shape[-1])
                index = torch.as_tensor(kept, device=teacher_states[0].device)
                teacher_states = [t.index_select(-1, index) for t in teacher_states]
            outputs.loss = outputs.loss + self.weight * hidden_state_loss(student_states, teacher_states, masks)
        if not asked:  # give the caller the output it asked for, and free the states early
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in HIDDEN_STATE_FIELDS})
        return outputs

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("distill_weight=%s is set, but %s: this step trains without the distillation term "
                           "(pass labels in the batch; with the Trainer, label smoothing and compute_loss_func "
                           "take them away)", self.weight, why)
