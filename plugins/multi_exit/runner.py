"""Running a sequence classifier with exits after some of its blocks: every exit (training, calibration) or early
exit per example, with the examples that left removed from the running batch.

Both the PEFT tuner and the saved multi-exit model classes run through here. Exits are read from forward hooks
added for the duration of one call, so the model's own forward (embeddings, attention masks, pooling, head) runs
unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from compress.errors import CompressError

from .loss import exit_weights, hidden_distillation_loss, multi_exit_loss, task_loss
from .policy import ExitDecision


@dataclass
class MultiExitClassifierOutput(SequenceClassifierOutput):
    """A sequence classifier's output with its exits.

    ``logits`` are each example's prediction: the last exit's when every block ran, else the exit where the
    example left. ``exit_logits`` holds every exit's logits (in block order) when every exit ran;
    ``exit_layers`` the block after which each example left (early exit).
    """

    exit_logits: tuple[torch.Tensor, ...] | None = None
    exit_layers: torch.Tensor | None = None


#: output fields the Trainer leaves out of its predictions (so that compute_metrics gets the logits alone)
OUTPUT_EXTRAS = ["exit_logits", "exit_layers"]


class _AllExited(Exception):
    """Raised from a block's hook when no example is left to run the remaining blocks."""


def _token_mask(inputs: dict) -> torch.Tensor | None:
    """The ``(batch, sequence)`` padding mask of a model call, which mean-pooling exit heads read."""
    mask = inputs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_block_output(output, hidden: torch.Tensor, rows: torch.Tensor):
    if not isinstance(output, tuple):
        return hidden
    rest = tuple(t[rows] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows.shape[0] else t
                 for t in output[1:])
    return (hidden, *rest)


@dataclass
class ExitsRun:
    """The result of :func:`run_every_exit`: the model's own outputs and every exit's logits; with
    ``keep_hidden``, each exit's first-token hidden state too."""

    outputs: object
    exit_logits: list[torch.Tensor]
    exit_hidden: list[torch.Tensor] | None


def run_every_exit(forward: Callable, blocks: nn.ModuleList, exit_blocks: list[int], heads: nn.ModuleList,
                   inputs: dict, keep_hidden: bool = False) -> ExitsRun:
    """Run ``forward(**inputs)`` once, evaluating ``heads[k]`` on the output of block ``exit_blocks[k]``.
    The last exit's logits are the model's own."""
    captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    mask = _token_mask(inputs)

    def capture(k: int, module: nn.Module, args: tuple, output) -> None:
        hidden = _block_output(output)
        captured.append((heads[k](hidden, mask), hidden[:, 0] if keep_hidden else None))

    last: list[torch.Tensor] = []
    handles = [blocks[b].register_forward_hook(partial(capture, k)) for k, b in enumerate(exit_blocks)]
    if keep_hidden:
        handles.append(blocks[-1].register_forward_hook(
            lambda module, args, output: last.append(_block_output(output)[:, 0])))
    try:
        outputs = forward(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    exit_logits = [logits for logits, _ in captured] + [outputs.logits]
    hidden = [h for _, h in captured] + last if keep_hidden else None
    return ExitsRun(outputs, exit_logits, hidden)


def run_early_exit(forward: Callable, blocks: nn.ModuleList, exit_blocks: list[int], heads: nn.ModuleList,
                   inputs: dict, policy: str, threshold: float,
                   final_head: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``forward(**inputs)`` with early exit: after block ``exit_blocks[k]``, ``heads[k]`` classifies the
    running examples and those that ``policy`` lets leave are removed from the batch (from the hidden states and
    from every per-example tensor the following blocks receive). ``final_head``, the model's own output
    projection, gets its rows put back in place in a full-batch output, because a decoder's head indexes its
    output with the whole batch's ``input_ids``. Returns each example's logits and the block after which it
    left."""
    reference = inputs.get("input_ids")
    reference = inputs.get("inputs_embeds") if reference is None else reference
    batch = reference.shape[0]
    last_block = len(blocks) - 1
    state = {"keep": torch.arange(batch, device=reference.device), "logits": None}
    exit_layers = torch.full((batch,), last_block, dtype=torch.long, device=reference.device)
    decide = ExitDecision(policy, threshold)
    mask = _token_mask(inputs)

    def store(rows: torch.Tensor, logits: torch.Tensor) -> None:
        if state["logits"] is None:
            state["logits"] = logits.new_zeros((batch, *logits.shape[1:]))
        state["logits"][rows] = logits

    def rows_only(value):
        # per-example tensors the model hands every block (attention masks, a decoder's rotary cos/sin pair)
        # still hold the whole batch; 1-d tensors (cache positions) and broadcast ones (batch dimension 1) are
        # shared by all rows
        keep = state["keep"]
        if isinstance(value, torch.Tensor) and value.dim() > 1 and value.shape[0] == batch:
            return value[keep]
        if isinstance(value, tuple):
            return tuple(rows_only(v) for v in value)
        return value

    def slice_inputs(module: nn.Module, args: tuple, kwargs: dict):
        if state["keep"].shape[0] == batch:
            return None
        return tuple(rows_only(a) for a in args), {k: rows_only(v) for k, v in kwargs.items()}

    def exit_after(k: int, module: nn.Module, args: tuple, output):
        hidden = _block_output(output)
        keep = state["keep"]
        logits = heads[k](hidden, None if mask is None else mask[keep])
        leaves = decide(logits)
        if not bool(leaves.any()):
            return None
        store(keep[leaves], logits[leaves])
        exit_layers[keep[leaves]] = exit_blocks[k]
        stays = ~leaves
        decide.keep(stays)
        state["keep"] = keep[stays]
        if state["keep"].shape[0] == 0:
            raise _AllExited
        return _replace_block_output(output, hidden[stays], stays)

    def full_batch(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        keep = state["keep"]
        if keep.shape[0] == batch or output.shape[0] != keep.shape[0]:
            return None
        full = output.new_zeros((batch, *output.shape[1:]))
        full[keep] = output
        return full

    handles = [block.register_forward_pre_hook(slice_inputs, with_kwargs=True) for block in blocks]
    handles += [blocks[b].register_forward_hook(partial(exit_after, k)) for k, b in enumerate(exit_blocks)]
    if final_head is not None:
        handles.append(final_head.register_forward_hook(full_batch))
    try:
        outputs = forward(**inputs)
        logits = outputs.logits
        store(state["keep"], logits[state["keep"]] if logits.shape[0] == batch else logits)
    except _AllExited:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return state["logits"], exit_layers


@dataclass
class ExitSettings:
    """How a multi-exit forward runs: the exit policy and, for training, the loss."""

    policy: str
    threshold: float | None
    loss_weights: str | list[float] = "linear"
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    distill_hidden_weight: float = 0.0


def forward_with_exits(forward: Callable, blocks: nn.ModuleList, exit_blocks: list[int], heads: nn.ModuleList,
                       model_config, settings: ExitSettings, inputs: dict, labels: torch.Tensor | None,
                       training: bool, teacher: nn.Module | None = None,
                       final_head: nn.Module | None = None) -> MultiExitClassifierOutput:
    """A multi-exit classifier's forward. Training, or without a threshold: every exit runs and the loss is
    :func:`~.loss.multi_exit_loss` (with distillation from ``teacher`` while training). Otherwise early exit,
    and the loss (given labels) is the task loss of each example's chosen exit (``final_head``: see
    :func:`run_early_exit`)."""
    if training or settings.threshold is None:
        distill = training and settings.distill_weight > 0
        distill_hidden = training and settings.distill_hidden_weight > 0
        if (distill or distill_hidden) and teacher is None:
            raise CompressError("distillation (distill_weight / distill_hidden_weight > 0) needs a teacher: "
                                "model.base_model.set_teacher(teacher_model), or pass teacher= to "
                                "compress.apply_multi_exit")
        run = run_every_exit(forward, blocks, exit_blocks, heads, inputs, keep_hidden=distill_hidden)
        teacher_out = None
        if distill or distill_hidden:
            with torch.no_grad():
                teacher_out = teacher(**{**inputs, "output_hidden_states": distill_hidden})
            _check_teacher_output(teacher_out, run, distill, distill_hidden)
        loss = None
        all_blocks = [*exit_blocks, len(blocks) - 1]
        if labels is not None or distill:
            loss = multi_exit_loss(run.exit_logits, labels, exit_weights(settings.loss_weights, all_blocks),
                                   model_config, teacher_out.logits if distill else None, settings.distill_weight,
                                   settings.distill_temperature)
        if distill_hidden:
            extra = settings.distill_hidden_weight * hidden_distillation_loss(
                run.exit_hidden, teacher_out.hidden_states, all_blocks, len(blocks))
            loss = extra if loss is None else loss + extra
        outputs = run.outputs
        return MultiExitClassifierOutput(loss=loss, logits=run.exit_logits[-1], exit_logits=tuple(run.exit_logits),
                                         hidden_states=getattr(outputs, "hidden_states", None),
                                         attentions=getattr(outputs, "attentions", None))
    logits, exit_layers = run_early_exit(forward, blocks, exit_blocks, heads, inputs, settings.policy,
                                         settings.threshold, final_head=final_head)
    loss = task_loss(logits, labels, model_config) if labels is not None else None
    return MultiExitClassifierOutput(loss=loss, logits=logits, exit_layers=exit_layers)


def _check_teacher_output(teacher_out, run: ExitsRun, logits: bool, hidden: bool) -> None:
    """The teacher's logits and hidden states must have the student's widths (a teacher without a config is not
    checked when it is set)."""
    theirs, ours = teacher_out.logits.shape[-1], run.exit_logits[-1].shape[-1]
    if logits and theirs != ours:
        raise CompressError(f"the teacher predicts {theirs} classes but the model {ours}: distill_weight compares "
                            "their logits class by class; use a teacher fine-tuned on the same labels")
    if hidden:
        theirs, ours = teacher_out.hidden_states[-1].shape[-1], run.exit_hidden[-1].shape[-1]
        if theirs != ours:
            raise CompressError(f"the teacher's hidden size is {theirs} but the model's {ours}: "
                                "distill_hidden_weight compares their hidden states; use a teacher of the same "
                                "width, or distill_hidden_weight=0")


@contextlib.contextmanager
def every_exit_loss(model: nn.Module, blocks: nn.ModuleList, exit_blocks: list[int], heads: nn.ModuleList | None,
                    loss_weights: str | list[float]) -> Iterator[None]:
    """While active, ``model``'s own forward returns the loss of every exit (:func:`~.loss.multi_exit_loss`,
    without distillation) whenever it gets labels: what a pruning importance computed from ``model(**batch).loss``
    then differentiates. Block outputs are only referenced until the forward returns."""
    weights = exit_weights(loss_weights, [*exit_blocks, len(blocks) - 1])
    states: list[torch.Tensor] = []

    def keep_state(module: nn.Module, args: tuple, output) -> None:
        states.append(_block_output(output))

    def replace_loss(module: nn.Module, args: tuple, kwargs: dict, output):
        captured = states[:len(exit_blocks)]
        states.clear()
        labels = kwargs.get("labels")
        if labels is None or heads is None:
            return None
        mask = _token_mask(kwargs)
        logits = [head(state, mask) for head, state in zip(heads, captured)] + [output.logits]
        output["loss"] = multi_exit_loss(logits, labels, weights, module.config)
        return output

    handles = [blocks[b].register_forward_hook(keep_state) for b in exit_blocks]
    handles.append(model.register_forward_hook(replace_loss, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
