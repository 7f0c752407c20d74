"""The pruning engine's edges: criteria registered by name, refusals made before the model changes, compact classes
for every task head of a family, and Pruning-Adapter's bias compensation on decoders."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers

import compress
from compress.errors import CompressError, UnsupportedStructureError
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


# -- results the config cannot express: refused before the model changes ------------------------------------
def _tiny_llama(heads: int = 4, kv_heads: int = 4, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                                      intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def _state(model: torch.nn.Module) -> tuple[str, str, dict[str, torch.Tensor]]:
    return type(model).__name__, model.config.to_json_string(), {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    name, config, weights = _state(model)
    assert (name, config) == before[:2]
    assert weights.keys() == before[2].keys() and all(torch.equal(weights[k], before[2][k]) for k in weights)


class CountingMagnitude(MagnitudeImportance):
    """Magnitude scores on calibration data: counts the units it scores."""

    needs_calibration = True
    needs_gradients = False

    def __init__(self):
        super().__init__()
        self.scored = 0

    def __call__(self, unit, stats):
        self.scored += 1
        return super().__call__(unit, stats)


@pytest.mark.parametrize("make, options, advice", [
    # LlamaConfig requires hidden_size (32) to be a multiple of num_attention_heads
    (_tiny_llama, {"sparsity": {"heads": 0.25}}, r"divides the hidden size 32 \(one of 1, 2, 4\)"),
    (lambda: tiny.make_model("llama"), {"sparsity": {"hidden": 0.1}}, r"round_to=4"),
    (lambda: tiny.make_model("llama"), {"sparsity": {"ffn": 0.5, "hidden": 0.1}}, r"round_to=4"),
], ids=["heads", "hidden", "ffn+hidden"])
def test_a_uniform_prune_the_llama_config_cannot_express_is_refused_before_calibration(make, options, advice):
    model = make()
    before = _state(model)
    criterion = CountingMagnitude()
    with pytest.raises(UnsupportedStructureError, match=r"llama: after this pruning the config would not validate "
                       r"\(The hidden size .* is not a multiple of the number of attention heads .*nothing was "
                       rf"changed\. .*{advice}"):
        compress.prune_model(model, importance=criterion, data=tiny.make_batches("llama", 1), **options)
    assert criterion.scored == 0  # refused before any calibration
    _assert_unchanged(model, before)


class FixedHeadScores(importance.Importance):
    """Head scores that make global mode keep 3, 2 and 1 of the 4 heads of three layers (FFN neurons all equal)."""

    HEADS = [[10.0, 10.0, 10.0, 0.5], [10.0, 10.0, 0.4, 0.3], [10.0, 0.2, 0.1, 0.05]]

    def __call__(self, unit, stats):
        if unit.structure != "heads":
            return torch.ones(unit.size)
        return torch.tensor(self.HEADS[unit.site.layer])


@pytest.mark.parametrize("options", [{"sparsity": {"heads": 0.5}, "mode": "global"},
                                     {"sparsity": {"kv_heads": 0.5}, "mode": "global"},
                                     {"sparsity": None, "structures": "heads", "param_sparsity": 0.05}],
                         ids=["global-heads", "global-kv-heads", "param-sparsity"])
def test_a_planned_prune_the_llama_config_cannot_express_is_refused_before_the_model_changes(options):
    model = _tiny_llama(layers=3)  # a layer keeps 3 of 4 heads: the config's 3 heads (the most) do not divide 32
    before = _state(model)
    with pytest.raises(UnsupportedStructureError, match=r"not a multiple of the number of attention heads \(3\)"):
        compress.prune_model(model, importance=FixedHeadScores(), **options)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("arch, first, then", [
    ("llama", {"ffn": 0.5}, {"ffn": 0.25}),
    ("llama", {"ffn": 0.5}, {"layers": 0.5}),
    ("bert", {"heads": 0.25}, {"ffn": 0.25}),
    ("t5", {"ffn": 0.5}, {"heads": 0.25}),
])
def test_uniform_pruning_of_a_model_whose_widths_differ_is_refused_before_the_model_changes(arch, first, then):
    model = tiny.make_model(arch)
    with torch.no_grad():
        arch_spec(model).ffn_sites()[0].output.weight.mul_(10.0)
    compress.prune_model(model, first, importance="magnitude", mode="global")
    assert not arch_spec(model).fits_standard_config()
    before = _state(model)
    with pytest.raises(UnsupportedStructureError, match=rf"{arch_spec(model).family}: uniform mode keeps one width "
                       r"in every layer .* already differ .*: prune it with mode='global'"):
        compress.prune_model(model, then, importance="magnitude")
    _assert_unchanged(model, before)


@pytest.mark.parametrize("arch, options", [
    ("qwen2", {"sparsity": {"layers": 0.5}}),  # Qwen2's layer_types follow the kept blocks
    ("qwen2", {"sparsity": {"heads": 0.25}}),  # Qwen2Config does not tie the head count to the hidden size
    ("llama", {"sparsity": {"kv_heads": 0.5, "hidden": 0.25}}),
    ("llama", {"sparsity": {"ffn": 0.5, "heads": 0.5}, "mode": "global"}),
    ("bert", {"sparsity": {"heads": 0.25, "layers": 0.5}, "mode": "global"}),
    ("t5", {"sparsity": {"heads": 0.25, "hidden": 0.25}}),
])
def test_the_config_check_predicts_the_config_the_pruning_writes(arch, options):
    from compress.pruning.importance import units_for
    from compress.pruning.surgery import widths_after

    model = tiny.make_model(arch)
    original = copy.deepcopy(model)
    report = compress.prune_model(model, importance="magnitude", **options)
    arch_before = arch_spec(original)
    planned = widths_after(arch_before, units_for(arch_before, report.sparsity), report.removed)
    fields = arch_before.config_fields(planned)
    assert fields and {name: getattr(model.config, name) for name in fields} == fields
    assert dataclasses.replace(planned, kept_blocks=None) == arch_spec(model).current_widths()


def test_the_command_line_refuses_a_uniform_prune_the_config_cannot_express_before_loading_weights(
        tmp_path, capsys, monkeypatch):
    from compress.cli import main

    _tiny_llama().save_pretrained(tmp_path / "llama")
    # the weights are never read: the refusal comes from the config and the options alone
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("the weights were loaded"))
    capsys.readouterr()
    rc = main(["prune", str(tmp_path / "llama"), "--out", str(tmp_path / "out"), "--structures", "heads",
               "--sparsity", "0.25", "--importance", "magnitude", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "", captured.err
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("compress: error: llama: after this pruning the config would not validate (The hidden "
                           "size (32) is not a multiple of the number of attention heads (3).)")
    assert not (tmp_path / "out").exists()


def test_a_pruning_adapter_whose_final_widths_the_config_cannot_express_is_refused_when_created():
    from peft import get_peft_model

    model = _tiny_llama()
    before = _state(model)
    with pytest.raises(UnsupportedStructureError, match=r"not a multiple of the number of attention heads \(3\)"):
        get_peft_model(model, compress.PruningAdapterConfig(task_type="CAUSAL_LM", r=4, sparsity={"heads": 0.25},
                                                            importance="magnitude"))
    _assert_unchanged(model, before)


def test_a_pruning_adapter_event_the_config_cannot_express_is_refused_before_the_model_changes(registry):
    from peft import get_peft_model

    compress.register_importance("fixed_heads", FixedHeadScores)
    config = compress.PruningAdapterConfig(task_type="CAUSAL_LM", r=4, sparsity={"heads": 0.5}, mode="global",
                                           importance="fixed_heads")
    model = get_peft_model(_tiny_llama(layers=3), config)
    before = _state(model)
    with pytest.raises(UnsupportedStructureError, match=r"not a multiple of the number of attention heads \(3\)"):
        model.base_model.prune()
    _assert_unchanged(model, before)
    assert model.peft_config["default"].pruning_plan == []


# -- Pruning-Adapter's bias compensation on decoders --------------------------------------------------------
def _logits(model: torch.nn.Module, arch: str = "llama") -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tiny.make_batch(arch, labels=False)).logits


def test_pruning_adapter_compensates_llama_through_mlp_bias_and_attention_bias_as_the_engine_does(tmp_path):
    from peft import PeftModel, get_peft_model

    sparsity, data = {"ffn": 0.5, "heads": 0.5}, tiny.make_batches("llama", 2)
    engine = tiny.make_model("llama")
    compress.prune_model(engine, sparsity, importance="activation", data=data, compensate_bias=True)
    config = compress.PruningAdapterConfig(task_type="CAUSAL_LM", r=4, sparsity=sparsity, importance="activation",
                                           compensate_bias=True)
    model = get_peft_model(tiny.make_model("llama"), config)
    model.base_model.prune(data=data)
    layer = model.base_model.model.model.layers[0]
    assert layer.mlp.down_proj.pa_bias["default"].abs().sum() > 0
    assert layer.self_attn.o_proj.pa_bias["default"].abs().sum() > 0
    # zero-initialised adapters: the pruned, compensated base, which is what prune_model gives
    torch.testing.assert_close(_logits(model), _logits(engine), rtol=0, atol=1e-6)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny.make_model("llama"), tmp_path / "adapter")
    assert torch.equal(_logits(reloaded), _logits(model))
    reloaded.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # stock transformers
    assert type(merged) is transformers.LlamaForCausalLM
    assert merged.config.mlp_bias and merged.config.attention_bias
    torch.testing.assert_close(_logits(merged), _logits(model), rtol=0, atol=1e-6)


def test_pruning_adapter_warns_once_that_qwen2_cannot_hold_the_compensation(caplog):
    from peft import get_peft_model

    config = compress.PruningAdapterConfig(task_type="CAUSAL_LM", r=4, sparsity={"ffn": 0.5, "heads": 0.5},
                                           importance="activation", compensate_bias=True)
    with caplog.at_level("WARNING"):
        model = get_peft_model(tiny.make_model("qwen2"), config)
        model.base_model.prune(data=tiny.make_batches("qwen2", 2))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "compensate_bias" in
                r.getMessage()]
    assert warnings == ["compensate_bias: the FFN output and attention output projections have no bias and the "
                        "qwen2 config cannot give them one, so the channels pruned from them are not compensated "
                        "(the adapters still train on the pruned model); set compensate_bias=False to silence this"]
    layer = model.base_model.model.model.layers[0]
    assert not layer.mlp.down_proj.pa_bias and not layer.self_attn.o_proj.pa_bias  # no bias to hold one
    assert model.peft_config["default"].pruning_plan  # pruned all the same
