"""The pruning engine's edges: criteria registered by name, refusals made before the model changes, compact classes
for every task head of a family, and Pruning-Adapter's bias compensation on decoders."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import compress
from compress.errors import CompressError
from compress.pruning import importance
from compress.pruning.arch import arch_spec
from compress.pruning.importance import MagnitudeImportance, available_importances, get_importance
from compress.pruning.spec import PruningSpec
from compress.tasks import task_of_class
from tests import tiny


@pytest.fixture
def registry(monkeypatch):
    """The criteria registered during a test are forgotten afterwards."""
    monkeypatch.setattr(importance, "_IMPORTANCES", dict(importance._IMPORTANCES))


class ReversedMagnitude(MagnitudeImportance):
    def __call__(self, unit, stats):
        return -super().__call__(unit, stats)


def test_a_criterion_registered_with_capitals_is_found_in_any_case(registry):
    compress.register_importance("MyCrit", ReversedMagnitude)
    assert "mycrit" in available_importances()
    assert isinstance(get_importance("MYCRIT"), ReversedMagnitude)
    assert PruningSpec(importance="MyCrit").importance == "mycrit"
    report = compress.prune_model(tiny.make_model("llama"), 0.5, importance="MyCrit")
    assert report.importance == "mycrit"


def test_registering_a_taken_name_in_another_case_is_refused(registry):
    with pytest.raises(CompressError, match="'Magnitude' is taken by MagnitudeImportance"):
        compress.register_importance("Magnitude", ReversedMagnitude)
    assert type(get_importance("magnitude")) is MagnitudeImportance
    compress.register_importance("Taylor", importance.TaylorImportance)  # the same criterion again: nothing to do
    compress.register_importance("mycrit", ReversedMagnitude)
    with pytest.raises(CompressError, match="taken by ReversedMagnitude"):
        compress.register_importance("MYCRIT", MagnitudeImportance(p=1))


@pytest.mark.parametrize("name, entry", [("", ReversedMagnitude), (3, ReversedMagnitude), ("mine", len)])
def test_registering_a_bad_name_or_criterion_is_refused(registry, name, entry):
    with pytest.raises(CompressError, match="register_importance"):
        compress.register_importance(name, entry)
    assert "mine" not in available_importances()


def test_invalid_option_error_is_one_class_under_its_old_and_new_names():
    from compress.errors import InvalidOptionError
    from compress.pruning.spec import InvalidOptionError as from_spec

    assert from_spec is InvalidOptionError and compress.InvalidOptionError is InvalidOptionError
    with pytest.raises(InvalidOptionError, match="importance='no_such'") as raised:
        PruningSpec(importance="no_such")
    assert raised.value.spelled("--importance").startswith("--importance no_such: choose one of")


# -- compact classes for every task head ----------------------------------------------------------------
HEAD_CLASSES = [("llama", name) for name in ("LlamaForSequenceClassification",
                                              "LlamaForTokenClassification", "LlamaForQuestionAnswering")] + \
               [("qwen2", name) for name in ("Qwen2ForSequenceClassification", "Qwen2ForTokenClassification",
                                             "Qwen2ForQuestionAnswering")] + \
               [("t5", "T5ForSequenceClassification"), ("t5", "T5ForTokenClassification")]


def _head_model(arch: str, class_name: str) -> torch.nn.Module:
    """A tiny random model of ``class_name`` on the family's tiny config, whose first layer's FFN weighs ten times
    the others' so that global mode leaves unequal widths (a compact model)."""
    config = copy.deepcopy(tiny.make_model(arch).config)
    config.num_labels, config.pad_token_id = 2, 0
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        arch_spec(model).ffn_sites()[0].output.weight.mul_(10.0)
    return model


def _first_output(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).to_tuple()[0]


@pytest.mark.parametrize("arch, class_name", HEAD_CLASSES, ids=[name for _, name in HEAD_CLASSES])
def test_a_global_prune_of_each_head_class_reloads_with_identical_outputs(tmp_path, arch, class_name):
    model = _head_model(arch, class_name)
    compress.prune_model(model, 0.5, importance="magnitude", mode="global")
    assert type(model).__name__ == "Compressed" + class_name  # unequal widths: the compact class
    model.save_pretrained(tmp_path)
    task = task_of_class(class_name)[1]
    reloaded = getattr(transformers, task).from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "Compressed" + class_name
    batch = tiny.make_batch("llama", labels=False)
    batch["input_ids"][:, -1] = 1  # T5's classifier reads the state at the last <eos>
    assert torch.equal(_first_output(model, batch), _first_output(reloaded, batch))


def test_a_pruned_classifier_folder_loads_as_its_bare_model(tmp_path):
    """The classifier's head layer is recorded in the folder; the bare model has none and leaves it out."""
    model = _head_model("llama", "LlamaForSequenceClassification")
    compress.prune_model(model, 0.5, importance="magnitude", mode="global")
    model.save_pretrained(tmp_path)
    bare = transformers.AutoModel.from_pretrained(tmp_path).eval()
    batch = tiny.make_batch("llama", labels=False)
    assert torch.equal(_first_output(model.model, batch), _first_output(bare, batch))
