"""Head warm-up before oneshot pruning: fit a new task head on the frozen model's features first.

A freshly initialised classifier makes the task loss, and so the gate gradients that score the backbone, close
to noise. :func:`warm_up_head` trains only the head (the PEFT model's ``modules_to_save`` minus normalisation
layers) for a few steps on the calibration batches, in eval mode: backprop never enters the backbone, so it
costs about as much memory as inference. Call it before ``peft_model.base_model.prune(data=...)``::

    from compress import warm_up_head
    from compress.data import calibration_batches

    batches = calibration_batches(train, batch_size=16, num_batches=32, tokenizer=tokenizer)
    warm_up_head(peft_model, batches, steps=100, lr=1e-3)
    peft_model.base_model.prune(data=train, tokenizer=tokenizer, num_batches=32, batch_size=16)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from compress.errors import CompressError
from compress.pruning.importance import task_loss


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters outside adapter layers and normalisation layers: the task head.

    Adapter layers (peft's tuner layers) and norms (e.g. LayerNorms in ``modules_to_save``) sit inside the
    backbone; training them would send gradients through it."""
    inside = {id(p) for m in model.modules() if isinstance(m, BaseTunerLayer) or "Norm" in type(m).__name__
              for p in m.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in inside]


def warm_up_head(peft_model: nn.Module, batches: Sequence[dict], steps: int, lr: float = 1e-3) -> list[float]:
    """Train only the task head of ``peft_model`` for ``steps`` AdamW steps on ``batches`` (cycled).

    Args:
        peft_model: a PEFT model whose head is trainable (``modules_to_save``; ``task_type="SEQ_CLS"`` adds the
            classifier).
        batches: model-input dicts with labels (e.g. :func:`compress.data.calibration_batches`).
        steps: optimizer steps.
        lr: learning rate.

    Returns:
        The loss of every step. Every other parameter keeps its value and its ``requires_grad`` flag; the model
        is left in the train/eval mode it had.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CompressError(f"steps={steps!r}: the number of warm-up steps must be a positive integer")
    batches = list(batches)
    if not batches:
        raise CompressError("warm_up_head needs calibration batches (model-input dicts with labels)")
    head = head_parameters(peft_model)
    if not head:
        raise CompressError("warm_up_head needs a trainable task head: set modules_to_save (task_type='SEQ_CLS' "
                            "adds the classifier automatically)")
    in_head = {id(p) for p in head}
    others = [p for p in peft_model.parameters() if p.requires_grad and id(p) not in in_head]
    device = head[0].device
    optimizer = torch.optim.AdamW(head, lr=lr)
    was_training = peft_model.training
    peft_model.eval()  # dropout off, as when the backbone is scored
    losses = []
    try:
        for p in others:
            p.requires_grad_(False)
        for step in range(steps):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batches[step % len(batches)].items()}
            loss = task_loss(peft_model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        for p in others:
            p.requires_grad_(True)
        peft_model.train(was_training)
    return losses
