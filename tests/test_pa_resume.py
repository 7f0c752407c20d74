"""Pruning-Adapter training resumes from an HF Trainer checkpoint on a freshly built model, and ends with
the same model as a run that was never interrupted."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import compress
from compress.errors import CompressError
from tests import tiny

STEPS = 24
CONFIGS = {
    # BERT heads need global mode; events at steps 4, 8, 12 and 16
    "global": dict(sparsity={"ffn": 0.5, "heads": 0.5}, mode="global", schedule="progressive", scoring_steps=4,
                   pruning_interval=4, pruning_end_step=16),
    # uniform widths, a whole block removed (its parameters leave the optimizer), bias compensation's input means
    "uniform": dict(sparsity={"ffn": 0.5, "layers": 0.5}, schedule="progressive", scoring_steps=4,
                    pruning_interval=4, pruning_end_step=16, compensate_bias=True),
    # summed (not averaged) statistics, one event at step 6
    "oneshot": dict(sparsity={"ffn": 0.5}, scoring_steps=6),
    # the residual stream: trained LayerNorm copies, adapters and the optimizer's state shrink with it
    "hidden": dict(sparsity={"hidden": 0.25, "ffn": 0.5}, mode="global", schedule="progressive", scoring_steps=4,
                   pruning_interval=4, pruning_end_step=12, modules_to_save=["LayerNorm"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")


class Crash(Exception):
    """Stands for the process dying."""


class CrashAt(TrainerCallback):
    """Kills training when step ``step + 1`` begins, right after the checkpoint of step ``step`` was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"crashed after step {self.step}")


def _model(name: str, **overrides):
    config = compress.PruningAdapterConfig(task_type="SEQ_CLS", r=4, **{**CONFIGS[name], **overrides})
    return get_peft_model(tiny.make_model("bert"), config)


def _trainer(model, out, callbacks=(), **training_args) -> Trainer:
    batches = tiny.make_batches("bert", 8, batch_size=4)
    rows = [{k: v[i].tolist() for k, v in b.items()} for b in batches for i in range(4)]
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
                             seed=0, **training_args)
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                   callbacks=[compress.PruningAdapterCallback(), *callbacks])


def _losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


_straight: dict[str, tuple] = {}


def _uninterrupted(name: str, tmp_path_factory) -> tuple:
    """The run without a crash (once per configuration): final model, trainer."""
    if name not in _straight:
        model = _model(name)
        trainer = _trainer(model, tmp_path_factory.mktemp(f"straight-{name}"), save_strategy="no")
        trainer.train()
        _straight[name] = (model, trainer)
    return _straight[name]


def _crash_and_resume(name: str, step: int, out) -> tuple:
    """Train with checkpoints every ``step`` steps, crash after the first, resume on a new model."""
    args = {"save_strategy": "steps", "save_steps": step}
    with pytest.raises(Crash):
        _trainer(_model(name), out, [CrashAt(step)], **args).train()
    model = _model(name)  # built from scratch, as after a restart
    trainer = _trainer(model, out, **args)
    trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{step}"))
    return model, trainer


@pytest.mark.slow  # Trainer runs of more than a second
@pytest.mark.parametrize("name,step", [
    ("global", 2),    # before the first event: only importance statistics
    ("global", 10),   # between events (8 and 12): two events to replay, statistics of steps 9-10
    ("global", 20),   # after the last event: a finished plan, no scoring
    ("uniform", 10),
    ("oneshot", 3),
    ("hidden", 6),    # between events (4 and 8): one hidden event to replay on the wrapped model
])
def test_resumed_run_ends_with_the_uninterrupted_model(name, step, tmp_path, tmp_path_factory):
    straight, straight_trainer = _uninterrupted(name, tmp_path_factory)
    resumed, trainer = _crash_and_resume(name, step, tmp_path)

    assert resumed.peft_config["default"].pruning_plan == straight.peft_config["default"].pruning_plan
    expected, got = straight.state_dict(), resumed.state_dict()  # base and adapter tensors
    assert list(got) == list(expected)
    different = [k for k in expected if got[k].shape != expected[k].shape or not torch.equal(got[k], expected[k])]
    assert not different, different[:5]
    assert _losses(trainer) == _losses(straight_trainer)  # restored history, then the same steps
    expected_state = straight_trainer.optimizer.state_dict()["state"]
    got_state = trainer.optimizer.state_dict()["state"]
    assert got_state.keys() == expected_state.keys()
    for index, state in expected_state.items():
        for key, value in state.items():
            assert torch.equal(got_state[index][key], value), (index, key)


@pytest.mark.slow  # Trainer runs of more than a second
def test_loading_an_earlier_checkpoint_into_a_further_pruned_model_fails_clearly(tmp_path, tmp_path_factory):
    straight, _ = _uninterrupted("global", tmp_path_factory)
    with pytest.raises(Crash):
        _trainer(_model("global"), tmp_path, [CrashAt(10)], save_strategy="steps", save_steps=10).train()
    # e.g. load_best_model_at_end picking a checkpoint from before later events
    with pytest.raises(CompressError, match="already pruned by 4 events .* saved after 2: pruning cannot be undone"):
        straight.load_adapter(str(tmp_path / "checkpoint-10"), "default", is_trainable=True)


@pytest.mark.slow  # Trainer runs of more than a second
def test_resuming_with_another_schedule_fails_clearly(tmp_path):
    with pytest.raises(Crash):
        _trainer(_model("global"), tmp_path, [CrashAt(10)], save_strategy="steps", save_steps=10).train()
    model = _model("global", pruning_interval=3)  # would prune at 4, 7, 10, 13, 16
    with pytest.raises(CompressError, match=r"pruned at steps \[4, 8\].*prunes at \[4, 7, 10, 13, 16\]"):
        _trainer(model, tmp_path, save_strategy="steps", save_steps=10).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
