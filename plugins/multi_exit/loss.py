"""The training loss of a multi-exit model: the weighted mean over exits of the task loss, mixed with
distillation from a teacher's logits (and optionally its hidden states)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig


def exit_weights(setting: str | list[float], exit_blocks: list[int]) -> list[float]:
    """One loss weight per exit (``exit_blocks``: the block after each exit, the last block included)."""
    if setting == "linear":
        return [float(block + 1) for block in exit_blocks]
    if setting == "equal":
        return [1.0] * len(exit_blocks)
    return [float(w) for w in setting]


def task_loss(logits: torch.Tensor, labels: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    """The loss transformers' sequence classifiers use for ``config`` (regression, single- or multi-label)."""
    num_labels = config.num_labels
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype)) if num_labels == 1 \
            else F.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence from the teacher's temperature-softened distribution, scaled by ``T^2`` (Hinton et al.)."""
    return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def multi_exit_loss(exit_logits: list[torch.Tensor], labels: torch.Tensor | None, weights: list[float],
                    config: PretrainedConfig, teacher_logits: torch.Tensor | None = None, distill_weight: float = 0.0,
                    temperature: float = 1.0) -> torch.Tensor:
    """``sum_k w_k * ((1 - a) * task_k + a * distill_k) / sum_k w_k`` over the exits ``k``; without labels the
    distillation term alone, without a teacher the task term alone."""
    total = exit_logits[0].new_zeros(())
    for logits, weight in zip(exit_logits, weights):
        parts = []
        task_share = 1 - distill_weight if teacher_logits is not None else 1.0
        if labels is not None and task_share > 0:
            parts.append(task_share * task_loss(logits, labels, config))
        if teacher_logits is not None and distill_weight > 0:
            parts.append(distill_weight * distillation_loss(logits, teacher_logits, temperature))
        total = total + weight * sum(parts)
    return total / sum(weights)


def hidden_distillation_loss(student_hidden: list[torch.Tensor], teacher_hidden: tuple[torch.Tensor, ...],
                             exit_blocks: list[int], num_blocks: int) -> torch.Tensor:
    """Mean squared error between each exit's first-token hidden state and the teacher's at the same relative
    depth (``teacher_hidden``: the teacher's ``hidden_states``, embeddings first)."""
    teacher_blocks = len(teacher_hidden) - 1
    losses = []
    for hidden, block in zip(student_hidden, exit_blocks):
        index = round((block + 1) * teacher_blocks / num_blocks)
        losses.append(F.mse_loss(hidden, teacher_hidden[index][:, 0].to(hidden.dtype)))
    return torch.stack(losses).mean()
