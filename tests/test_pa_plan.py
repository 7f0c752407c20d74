"""A Pruning-Adapter's pruning plan is checked when a saved adapter loads: an edited adapter_config.json fails
with one clear error instead of rebuilding other shapes or other channels under the trained weights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import compress
from compress.errors import CompressError
from tests import tiny
from tests.methods import logits, perturb_adapters

ADVICE = "must not be edited"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple:
    """An adapter pruned in two events by the schedule (steps 2 and 4), with trained-looking weights: its folder,
    logits and plan."""
    config = compress.PruningAdapterConfig(
        task_type="SEQ_CLS", r=4, sparsity={"ffn": 0.5, "heads": 0.5}, mode="global", schedule="progressive",
        scoring_steps=2, pruning_interval=2, pruning_end_step=4, compensate_bias=True)
    model = get_peft_model(tiny.make_model("bert"), config)
    tuner = model.base_model
    model.train()
    tuner.start_scoring()  # what PruningAdapterCallback does, without a Trainer
    for step, batch in enumerate(tiny.make_batches("bert", 4), 1):
        model(**batch).loss.backward()
        tuner.update_and_prune(step)
        model.zero_grad()
    tuner.stop_scoring()
    assert len(config.pruning_plan) == 2 and tuner.pruning_finished
    perturb_adapters(model)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return folder, logits(model, "bert"), json.loads(json.dumps(config.pruning_plan))


def _copy(saved, tmp_path, edit: Callable[[list[dict]], None] | None = None):
    folder = tmp_path / "adapter"
    shutil.copytree(saved[0], folder)
    if edit is not None:
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        edit(config["pruning_plan"])
        path.write_text(json.dumps(config))
    return folder


def _load(folder):
    return PeftModel.from_pretrained(tiny.make_model("bert"), folder)


def _ffn_key(event: dict) -> str:
    return next(k for k in sorted(event["removed"]) if k.endswith(".ffn"))


def _set_first(value):
    def edit(plan):
        plan[1]["removed"][_ffn_key(plan[1])][0] = value
    return edit


def _duplicate(plan):
    removed = plan[1]["removed"][_ffn_key(plan[1])]
    removed.append(removed[0])


def _remove_all(plan):
    key = _ffn_key(plan[1])
    layer = int(key.split(".")[1])
    plan[1]["removed"][key] = list(range(plan[1]["widths_before"]["ffn"][layer]))


def _widths_after(index):
    def edit(plan):
        plan[index]["widths_after"]["ffn"][0] -= 1
    return edit


def _rename_unit(plan):
    key = _ffn_key(plan[1])
    plan[1]["removed"]["encoder.7.ffn"] = plan[1]["removed"].pop(key)


def _key(plan):
    return _ffn_key(plan[1]).replace(".", r"\.")


@pytest.mark.parametrize("edit,match", [
    (_set_first(9999), r"pruning_plan\[1\] \(step 4\), field 'removed'\['{key}'\]: index 9999 is out of range"),
    (_set_first(-1), r"pruning_plan\[1\] \(step 4\), field 'removed'\['{key}'\]: -1 is negative"),
    (_set_first("x"), r"pruning_plan\[1\] \(step 4\), field 'removed'\['{key}'\]: 'x' \(str\) is not an integer"),
    (_set_first(1.5), r"pruning_plan\[1\] \(step 4\), field 'removed'\['{key}'\]: 1.5 \(float\) is not an integer"),
    (_set_first(True), r"field 'removed'\['{key}'\]: True \(bool\) is not an integer"),
    (_duplicate, r"pruning_plan\[1\] \(step 4\), field 'removed'\['{key}'\]: \[\d+\] listed more than once"),
    (_remove_all, r"pruning_plan\[1\] \(step 4\), field 'removed'\['{key}'\]: removes all \d+ neurons"),
    (_rename_unit, r"pruning_plan\[1\] \(step 4\), field 'removed'\['encoder.7.ffn'\]: no unit .* is called"),
    (_widths_after(0), r"pruning_plan\[0\] \(step 2\), field 'widths_after': replaying the event gives widths"),
    (_widths_after(1), r"pruning_plan\[1\] \(step 4\), field 'widths_after': replaying the event gives widths"),
    (lambda plan: plan[0]["structures"].append("neurons"), r"pruning_plan\[0\] \(step 2\), field 'structures'"),
    (lambda plan: plan[1].pop("removed"), r"pruning_plan\[1\] \(step 4\): missing \['removed'\]"),
    (lambda plan: plan[0].update(final=True), r"pruning_plan\[0\] \(step 2\), field 'final': only the last event"),
    (lambda plan: plan[0].update(final="yes"), r"pruning_plan\[0\] \(step 2\), field 'final': expected bool"),
    (lambda plan: plan.__setitem__(0, "event"), r"pruning_plan\[0\]: an event is a dict, got str"),
], ids=["9999", "-1", "str", "float", "bool", "duplicate", "all", "unit-key", "widths_after-0", "widths_after-1",
        "structure", "missing-field", "final-early", "final-type", "not-a-dict"])
def test_edited_plan_fails_loading_with_one_clear_error(saved, tmp_path, edit, match):
    folder = _copy(saved, tmp_path, edit)
    with pytest.raises(CompressError, match=match.format(key=_key(saved[2]))) as info:
        _load(folder)
    assert ADVICE in str(info.value)


def test_changed_index_that_keeps_the_widths_fails_against_the_copy_in_the_weights(saved, tmp_path):
    plan = saved[2]
    key = _ffn_key(plan[1])
    layer = int(key.split(".")[1])
    removed = plan[1]["removed"][key]
    kept = next(i for i in range(plan[1]["widths_before"]["ffn"][layer]) if i not in removed)

    def swap(plan):
        plan[1]["removed"][key] = sorted([kept, *removed[1:]])

    folder = _copy(saved, tmp_path, swap)
    with pytest.raises(CompressError, match=rf"pruning_plan\[1\] \(step 4\) differs from the copy saved with the "
                                            rf"adapter weights .* field 'removed'\['{key}'\]: the config removes "
                                            rf"\[{kept}\] where the saved copy removes \[{removed[0]}\]") as info:
        _load(folder)
    assert ADVICE in str(info.value)


def test_untouched_save_reloads_with_identical_logits(saved, tmp_path):
    folder, expected, plan = saved
    assert [e.get("step") for e in plan] == [2, 4]  # events pruned by the schedule record their step
    reloaded = _load(_copy(saved, tmp_path))
    assert reloaded.peft_config["default"].pruning_plan == plan
    torch.testing.assert_close(logits(reloaded, "bert"), expected, rtol=0, atol=0)


def _strip_plan_copy(folder) -> None:
    """Make the folder look saved before the plan travelled with the weights."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if not k.startswith("pa_")}, path, metadata={"format": "pt"})


def test_folder_saved_before_the_plan_copy_loads_with_a_warning(saved, tmp_path, caplog):
    folder = _copy(saved, tmp_path)
    _strip_plan_copy(folder)
    with caplog.at_level("WARNING"):
        reloaded = _load(folder)
    assert any("carry no copy of the pruning plan" in r.message for r in caplog.records)
    torch.testing.assert_close(logits(reloaded, "bert"), saved[1], rtol=0, atol=0)
    # the checks that need only the model still apply to such folders
    edited = _copy(saved, tmp_path / "edited", _set_first(9999))
    _strip_plan_copy(edited)
    with pytest.raises(CompressError, match="index 9999 is out of range"):
        _load(edited)


def test_damaged_plan_copy_fails_clearly(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["pa_plan"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CompressError, match="saved with the adapter weights .* is unreadable"):
        _load(folder)


def test_missing_adapter_tensor_is_reported(saved, tmp_path, caplog):
    folder = _copy(saved, tmp_path)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if ".lora_B." in k)
    del tensors[key]
    save_file(tensors, path, metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        _load(folder)
    assert any("1 adapter tensors are missing" in r.message and "lora_B" in r.message for r in caplog.records)


def test_shapes_of_the_saved_tensors_are_checked_against_the_replayed_plan(saved, tmp_path):
    """Without the copy in the weights (an older folder), an edit that keeps the plan consistent with itself
    still has to rebuild the shapes of the saved adapter tensors."""
    plan = saved[2]
    key = _ffn_key(plan[1])
    layer = int(key.split(".")[1])
    extra = next(i for i in range(plan[1]["widths_before"]["ffn"][layer]) if i not in plan[1]["removed"][key])

    def remove_one_more(plan):
        plan[1]["removed"][key] = sorted([*plan[1]["removed"][key], extra])
        plan[1]["widths_after"]["ffn"][layer] -= 1

    folder = _copy(saved, tmp_path, remove_one_more)
    _strip_plan_copy(folder)
    with pytest.raises(CompressError, match=r"saved adapter tensors do not have the shapes pruning_plan rebuilds, "
                                            r"e\.g\. .*: saved \(\d+, \d+\), rebuilt \(\d+, \d+\)") as info:
        _load(folder)
    assert ADVICE in str(info.value)
