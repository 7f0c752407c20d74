"""Drives Pruning-Adapter's scoring and pruning schedule inside an unchanged HF ``Trainer``."""

from __future__ import annotations

import logging

from torch import nn
from transformers import TrainerCallback

from compress.errors import CompressError

from .model import PruningAdapterModel

logger = logging.getLogger(__name__)


def find_tuner(model: nn.Module) -> PruningAdapterModel:
    """The :class:`PruningAdapterModel` inside a ``PeftModel`` (or the tuner itself)."""
    for module in (model, getattr(model, "base_model", None), getattr(model, "module", None)):
        if isinstance(module, PruningAdapterModel):
            return module
        inner = getattr(module, "base_model", None)
        if isinstance(inner, PruningAdapterModel):
            return inner
    raise CompressError(f"{type(model).__name__} is not a Pruning-Adapter model: create it with "
                        "get_peft_model(model, PruningAdapterConfig(...))")


class PruningAdapterCallback(TrainerCallback):
    """Scores structures on the training batches and prunes on schedule.

    Gate gradients come from the same backward pass that trains the adapters. At each pruning step the
    backbone shrinks in place and the optimizer's parameters and state are remapped, so training goes on
    with the same ``Trainer``, optimizer and learning-rate schedule.

    Usage: ``Trainer(model=peft_model, ..., callbacks=[PruningAdapterCallback()])``.

    Resuming (``trainer.train(resume_from_checkpoint=...)`` on a freshly built model) needs nothing more: the
    checkpoint's adapter weights carry the pruning plan, replayed before they load, and the importance
    statistics gathered since the last event (see :mod:`~compress.plugins.pruning_adapter.plan`).
    """

    def __init__(self) -> None:
        self.events: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = find_tuner(model)
        if state.global_step:
            _check_resumed_schedule(tuner, state.global_step)
        if tuner.pruning_finished:
            return
        last = tuner.pruning_steps()[-1]
        if state.max_steps and last > state.max_steps:
            raise CompressError(
                f"the pruning schedule ends at step {last} but training has only {state.max_steps} steps: "
                "lower scoring_steps / pruning_end_step or train longer")
        _check_wrapper(args)
        tuner.start_scoring()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        event = find_tuner(model).update_and_prune(state.global_step, optimizer)
        if event is not None:
            event = {"step": state.global_step, **event}
            self.events.append(event)
            logger.info("step %d: pruned to %s", state.global_step, event["widths_after"])

    def on_train_end(self, args, state, control, model=None, **kwargs):
        find_tuner(model).stop_scoring()


def _check_wrapper(args) -> None:
    """Pruning during training replaces parameters; DDP's buckets are rebuilt for that, DeepSpeed's and FSDP's
    flattened parameters and optimizer partitions are not."""
    wrapper = "DeepSpeed" if getattr(args, "deepspeed", None) else "FSDP" if getattr(args, "fsdp", None) else None
    if wrapper:
        raise CompressError(
            f"Pruning-Adapter's progressive schedule prunes during training, which {wrapper} does not allow (it "
            "flattens and partitions the parameters when training starts): use schedule='oneshot' and call "
            "model.base_model.prune(data=...) before training with it, or train the progressive schedule with "
            "DDP (torchrun / accelerate launch without DeepSpeed or FSDP)")


def _check_resumed_schedule(tuner: PruningAdapterModel, global_step: int) -> None:
    """A checkpoint's pruning events must be ones this configuration's schedule has at or before ``global_step``."""
    recorded = [event["step"] for event in tuner.active_config.pruning_plan if "step" in event]
    steps = tuner.pruning_steps()
    if any(step not in steps or step > global_step for step in recorded):
        raise CompressError(f"the checkpoint's model was pruned at steps {recorded}, but this configuration prunes at "
                            f"{steps} (and training resumes after step {global_step}): resume with the "
                            "PruningAdapterConfig the run was started with")
