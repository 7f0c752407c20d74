"""Training under several processes: two gloo ranks through ``torchrun`` against one process, same global batch.

The multi-process tests are ``slow`` (each starts three interpreters). The artifacts of one and two processes
agree to float rounding, not bit for bit: two ranks sum the gradient of the batch in two halves, which rounds
differently from one sum. The tests train with SGD, where that rounding stays of its own size; Adam divides
each gradient by its running magnitude, so a gradient that is zero but for rounding (e.g. a key projection's
bias, which the softmax ignores) takes steps of the learning rate's size whatever the process count.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import compress
from compress.distributed import (
    all_reduce_mean,
    check_same_on_ranks,
    check_unsharded,
    mark_mean_loss,
    world_size,
)
from compress.errors import CompressError
from tests import tiny
from tests.fixtures.distributed_run import METHODS
from tests.methods import CASES, build

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "tests" / "fixtures" / "distributed_run.py"
#: float rounding after 16 SGD steps at lr 1e-2 (observed: below 1e-8)
TOLERANCE = 1e-6


def test_every_method_has_a_distributed_case():
    assert {name.lower() for name in compress.METHODS} <= set(METHODS)


def test_single_process_helpers_are_no_ops():
    assert world_size() == 1
    tensor = torch.tensor([1.0, 2.0])
    all_reduce_mean([tensor])
    assert tensor.tolist() == [1.0, 2.0]
    check_same_on_ranks({"ffn": [1, 2]}, "removed indices")  # nothing to compare with


def test_a_process_group_that_accelerate_does_not_see_is_refused(monkeypatch):
    """Reductions and checks follow accelerate's state (the Trainer's); one that counts fewer processes than
    torch.distributed runs would silently skip them."""
    assert world_size() == 1  # accelerate's state: one process
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    for helper in (lambda: check_same_on_ranks([1], "removed indices"), lambda: all_reduce_mean([torch.ones(2)]),
                   world_size):
        with pytest.raises(CompressError, match=r"runs 2 processes but accelerate's state .* sees 1.*use_cpu=True"):
            helper()


def test_sharded_parameters_are_refused_with_the_alternative():
    model = tiny.make_model("bert")
    model.bert.encoder.layer[0].output.dense.weight.ds_id = 7  # what DeepSpeed ZeRO-3 puts on a partitioned one
    with pytest.raises(CompressError, match=r"sharded by DeepSpeed ZeRO-3 .*Prune before sharding"):
        compress.prune_model(model, 0.5, ("ffn",), "magnitude")
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 64  # nothing changed
    with pytest.raises(CompressError, match="sharded by DeepSpeed"):
        check_unsharded(model, "prune")


@pytest.mark.parametrize("wrapper", ["deepspeed", "fsdp"])
def test_progressive_pruning_under_deepspeed_or_fsdp_is_refused_before_training(wrapper):
    from types import SimpleNamespace

    from peft import get_peft_model
    from transformers import TrainerControl, TrainerState

    config = compress.PruningAdapterConfig(task_type="SEQ_CLS", sparsity=0.5, r=4, scoring_steps=1,
                                           pruning_interval=1, pruning_end_step=2)
    model = get_peft_model(tiny.make_model("bert"), config)
    args = SimpleNamespace(deepspeed="ds_config.json" if wrapper == "deepspeed" else None, fsdp=wrapper == "fsdp")
    with pytest.raises(CompressError, match=r"progressive schedule prunes during training.*schedule='oneshot'"):
        compress.PruningAdapterCallback().on_train_begin(args, TrainerState(max_steps=4), TrainerControl(),
                                                         model=model)
    assert not model.base_model.pruning_finished and model.base_model.peft_config["default"].pruning_plan == []


def _accepts_loss_kwargs(model) -> bool:
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    return Trainer(model=model, args=args).model_accepts_loss_kwargs


def test_classifier_losses_are_not_rescaled_by_the_trainer():
    """The Trainer multiplies a loss it takes for token-normalised by the process count; a classifier's is a mean."""
    assert _accepts_loss_kwargs(tiny.make_model("bert"))  # the Trainer's default guess for this model
    pruned = tiny.make_model("bert")
    compress.prune_model(pruned, 0.5, ("ffn",), "magnitude")
    assert not _accepts_loss_kwargs(pruned)
    for case in CASES:
        if case.arch in ("bert", "t5"):  # a classifier's batch mean; T5's token mean over its own batch
            assert not _accepts_loss_kwargs(build(case)[1]), case.id
    language_model = tiny.make_model("llama")
    mark_mean_loss(language_model)
    assert _accepts_loss_kwargs(language_model)  # its loss does divide by the global num_items_in_batch


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(script: Path, *args: str, processes: int, launcher: str = "torchrun") -> None:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = []
    elif launcher == "torchrun":  # --standalone: a rendezvous on a free local port
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    else:  # the documented accelerate command: --multi_gpu starts gloo processes on a machine without GPUs
        command = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port())]
    done = subprocess.run([sys.executable, *command, str(script), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _run(method: str, out: Path, processes: int, launcher: str = "torchrun") -> dict:
    _launch(RUN, method, str(out), processes=processes, launcher=launcher)
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_ranks_that_disagree_fail_loudly(tmp_path):
    _launch(REPO / "tests" / "fixtures" / "rank_disagreement.py", str(tmp_path), processes=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in results:
        assert result["differing"].startswith("the removed heads differ between ranks (rank 1 disagrees")
        assert result["equal"] is None
        assert result["mean"] == 0.5


@pytest.mark.slow
@pytest.mark.parametrize(("method", "launcher"),
                         [(method, "torchrun") for method in METHODS] + [("prune_finetune", "accelerate")])
def test_two_processes_train_what_one_does(method, launcher, tmp_path):
    one = _run(method, tmp_path / "one", 1)
    two = _run(method, tmp_path / "two", 2, launcher)
    assert two["world_size"] == 2
    assert len(set(two["rank_digests"])) == 1, "the ranks' replicas drifted apart"
    assert two["removed"] == one["removed"]  # Pruning-Adapter: three events, the same channels on every count
    if method == "pruning_adapter":
        assert len(two["removed"]) == 3
    assert two["trainable"] == one["trainable"] and two.get("merged_params") == one.get("merged_params")
    files = sorted(p.name for p in (tmp_path / "one" / "artifact").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "two" / "artifact").glob("*.safetensors"))
    for name in files:
        a, b = load_file(tmp_path / "one" / "artifact" / name), load_file(tmp_path / "two" / "artifact" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=TOLERANCE, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["fsdp2", "zero3"])
def test_a_pruned_model_trains_sharded_and_pruning_a_sharded_one_is_refused(wrapper, tmp_path):
    if wrapper == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not a dependency: pip install deepspeed to run this")
    _launch(REPO / "tests" / "fixtures" / "sharded_run.py", wrapper, str(tmp_path), processes=2)
    result = json.loads((tmp_path / "result.json").read_text())
    trained = result["pruned_then_sharded"]
    assert trained["ffn"] == 32 and all(loss == loss for loss in trained["losses"])  # pruned width, finite losses
    if wrapper == "fsdp2":
        assert trained["parameter"] == "DTensor"
    name = {"fsdp2": "FSDP2 (DTensor)", "zero3": "DeepSpeed ZeRO-3"}[wrapper]
    for action in ("engine", "oneshot", "progressive"):
        assert result[action] is not None, f"{action}: pruning a sharded model was not refused"
        assert f"sharded by {name}" in result[action] and "Prune before sharding" in result[action]
