"""Tests for compress.registry: registering a real (tiny) PEFT method with peft and using it end to end."""

from __future__ import annotations

import copy
import importlib
import json
import logging
import pickle
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft import mapping as peft_mapping
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from compress.registry import (
    MethodRegistrationError,
    PeftMethodType,
    register_method,
    registered_methods,
    unregister_method,
)
from tests import tiny

METHOD = PeftMethodType("TEST_SHIFT")
OTHER = PeftMethodType("TEST_OTHER")
TARGETS = ["query", "value"]

# --- a minimal but real PEFT method: add a trainable vector to a Linear's output ----------------------------


@dataclass
class ShiftConfig(PeftConfig):
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or regex of the Linear modules to shift."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = METHOD
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


class ShiftLayer(BaseTunerLayer):
    adapter_layer_names = ("tshift_vec",)

    def __init__(self, base_layer: nn.Linear) -> None:
        self.base_layer = base_layer
        self.tshift_vec = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.out_features = base_layer.out_features

    def update_layer(self, adapter_name: str, config: ShiftConfig) -> None:
        self.tshift_vec[adapter_name] = nn.Parameter(torch.zeros(self.out_features))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)


class ShiftLinear(nn.Module, ShiftLayer):
    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: ShiftConfig) -> None:
        super().__init__()
        ShiftLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return out
        for name in self.active_adapters:
            if name in self.tshift_vec:
                out = out + self.tshift_vec[name]
        return out


class ShiftModel(BaseTuner):
    prefix = "tshift_"
    tuner_layer_cls = ShiftLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise ValueError("Please specify `target_modules` in `peft_config`")
        return peft_config

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, parameter_name=None
    ):
        if isinstance(target, ShiftLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = ShiftLinear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


# --- classes for the failure cases --------------------------------------------------------------------------


@dataclass
class OtherConfig(ShiftConfig):
    def __post_init__(self):
        super().__post_init__()
        self.peft_type = OTHER


class OtherModel(ShiftModel):
    prefix = "tother_"


class SamePrefixModel(ShiftModel):  # prefix "tshift_" inherited
    pass


class LoraPrefixModel(ShiftModel):
    prefix = "lora_"  # peft's built-in LORA and ADALORA prefix


@dataclass
class LoraPrefixConfig(ShiftConfig):
    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftMethodType("TEST_LORA_PREFIX")


@dataclass
class PlainStrConfig(PeftConfig):
    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "TEST_PLAIN"  # works with peft, not with transformers' load_adapter


class PlainStrModel(ShiftModel):
    prefix = "tplain_"


class NoPrefixModel(BaseTuner):
    def _create_and_replace(self, *args, **kwargs):
        raise NotImplementedError


@dataclass
class WrongTypeConfig(PeftConfig):
    def __post_init__(self):
        super().__post_init__()
        self.peft_type = "SOMETHING_ELSE"


class UndecoratedConfig(ShiftConfig):  # no @dataclass: `scale` would not be saved
    scale: float = 1.0


# --- fixtures -----------------------------------------------------------------------------------------------

_PEFT_DICTS = (
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PEFT_TYPE_TO_PREFIX_MAPPING",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
)


def _snapshot() -> dict[str, dict]:
    return {n: dict(getattr(peft_mapping, n)) for n in _PEFT_DICTS}


@pytest.fixture(autouse=True)
def clean_registry():
    """Undo every registration made by a test, and check that peft's dicts end up exactly as they were."""
    before_ours = set(registered_methods())
    before = _snapshot()
    yield
    for name in set(registered_methods()) - before_ours:
        unregister_method(name)
    after = _snapshot()
    for n in _PEFT_DICTS:  # restore in place before asserting, so one failure cannot leak into other tests
        getattr(peft_mapping, n).clear()
        getattr(peft_mapping, n).update(before[n])
    assert after == before


@pytest.fixture
def shift_registered():
    register_method(METHOD, ShiftConfig, ShiftModel)
    return METHOD


def _peft_shift_model():
    model = tiny.make_model("bert")
    return get_peft_model(model, ShiftConfig(target_modules=TARGETS))


# --- end to end through peft --------------------------------------------------------------------------------


def test_get_peft_model_trains_only_adapter(shift_registered):
    peft_model = _peft_shift_model()
    assert isinstance(peft_model.base_model, ShiftModel)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    # 2 layers x (query, value)
    assert len(trainable) == 4
    assert all(".tshift_vec.default" in n for n in trainable)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 4 * 32


def test_save_and_load_roundtrip(shift_registered, tmp_path):
    peft_model = _peft_shift_model()
    batch = tiny.make_batch("bert", labels=False)
    with torch.no_grad():
        base_logits = peft_model(**batch).logits
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_()
        logits = peft_model(**batch).logits
    assert not torch.allclose(logits, base_logits)  # the perturbed adapter changes the output

    peft_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == METHOD
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert len(weights) == 4
    assert all(k.endswith(".tshift_vec") for k in weights), sorted(weights)

    loaded_cfg = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded_cfg) is ShiftConfig
    assert loaded_cfg.peft_type == METHOD
    assert isinstance(loaded_cfg.peft_type, PeftMethodType)
    assert loaded_cfg.target_modules == set(TARGETS)

    loaded = PeftModel.from_pretrained(tiny.make_model("bert"), tmp_path)
    assert isinstance(loaded.base_model, ShiftModel)
    assert type(loaded.peft_config["default"]) is ShiftConfig
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, logits, rtol=0, atol=0)

    # transformers' own PEFT integration reads peft_type.value: works because the config uses PeftMethodType
    hf_model = tiny.make_model("bert")
    hf_model.load_adapter(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(**batch).logits, logits, rtol=0, atol=0)


# --- registration semantics ---------------------------------------------------------------------------------


def test_register_records_and_writes_peft_dicts(shift_registered):
    record = registered_methods()[METHOD]
    assert (record.name, record.config_cls, record.model_cls, record.prefix) == (
        METHOD,
        ShiftConfig,
        ShiftModel,
        "tshift_",
    )
    assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING[METHOD] is ShiftConfig
    assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[METHOD] is ShiftModel
    assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[METHOD] == "tshift_"
    assert METHOD not in peft_mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING
    # a copy: callers cannot corrupt the registry
    registered_methods().clear()
    assert METHOD in registered_methods()


def test_register_twice_is_noop(shift_registered):
    before = _snapshot()
    register_method(METHOD, ShiftConfig, ShiftModel)
    register_method(METHOD, ShiftConfig, ShiftModel, prefix="tshift_")
    assert _snapshot() == before
    assert [name for name in registered_methods() if name.startswith("TEST_")] == [METHOD]


def test_peft_method_type_behaves_like_the_plain_string():
    assert METHOD == "TEST_SHIFT" and hash(METHOD) == hash("TEST_SHIFT")
    assert type(METHOD.value) is str and METHOD.value == "TEST_SHIFT"
    assert json.dumps({"peft_type": METHOD}) == '{"peft_type": "TEST_SHIFT"}'
    assert {"TEST_SHIFT": 1}[METHOD] == 1
    assert type(copy.deepcopy(METHOD)) is PeftMethodType
    assert pickle.loads(pickle.dumps(METHOD)) == METHOD


def test_plain_str_peft_type_registers_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="compress.registry"):
        register_method("TEST_PLAIN", PlainStrConfig, PlainStrModel)
    assert "TEST_PLAIN" in registered_methods()
    assert "PeftMethodType('TEST_PLAIN')" in caplog.text


def test_reload_of_registering_module_is_noop(tmp_path, monkeypatch):
    source = textwrap.dedent(
        """
        from dataclasses import dataclass

        from peft.config import PeftConfig
        from peft.tuners.tuners_utils import BaseTuner

        from compress.registry import PeftMethodType, register_method


        @dataclass
        class ReloadConfig(PeftConfig):
            def __post_init__(self):
                super().__post_init__()
                self.peft_type = PeftMethodType("TEST_RELOAD")


        class ReloadModel(BaseTuner):
            prefix = "treload_"

            def _create_and_replace(self, *args, **kwargs):
                raise NotImplementedError


        register_method("TEST_RELOAD", ReloadConfig, ReloadModel)
        """
    )
    module_name = "_compress_registry_reload_plugin"
    (tmp_path / f"{module_name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        plugin = importlib.import_module(module_name)
        old_config_cls = plugin.ReloadConfig
        plugin = importlib.reload(plugin)
        assert plugin.ReloadConfig is not old_config_cls  # reload made new class objects
        # ... and peft now points at them, without a second entry or an error
        assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING["TEST_RELOAD"] is plugin.ReloadConfig
        assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING["TEST_RELOAD"] is plugin.ReloadModel
        assert registered_methods()["TEST_RELOAD"].config_cls is plugin.ReloadConfig
    finally:
        sys.modules.pop(module_name, None)


def test_unregister_cleans_up(shift_registered, tmp_path):
    _peft_shift_model().save_pretrained(tmp_path)
    unregister_method(METHOD)
    assert METHOD not in registered_methods()
    for n in _PEFT_DICTS:
        assert METHOD not in getattr(peft_mapping, n)
    with pytest.raises(KeyError):  # peft no longer knows the type
        PeftConfig.from_pretrained(tmp_path)
    with pytest.raises(KeyError, match="not registered through compress.registry"):
        unregister_method(METHOD)
    unregister_method(METHOD, missing_ok=True)
    # the name and prefix are free again
    register_method(METHOD, ShiftConfig, ShiftModel)
    assert METHOD in registered_methods()


def test_unregister_refuses_peft_builtins():
    with pytest.raises(KeyError, match="built-in"):
        unregister_method("LORA")
    assert "LORA" in peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING


# --- rejected registrations: each leaves peft's dicts untouched (checked by the clean_registry fixture) -----


def test_name_clash_with_different_method(shift_registered):
    with pytest.raises(MethodRegistrationError, match=r"'TEST_SHIFT'.*already registered") as err:
        register_method(METHOD, OtherConfig, OtherModel)
    msg = str(err.value)
    assert "ShiftConfig" in msg and "OtherConfig" in msg
    assert "unregister_method('TEST_SHIFT')" in msg
    assert registered_methods()[METHOD].config_cls is ShiftConfig


def test_name_clash_with_method_registered_outside_this_module(monkeypatch):
    monkeypatch.setitem(peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING, OTHER, ShiftConfig)
    with pytest.raises(MethodRegistrationError, match="outside compress.registry; choose a different name"):
        register_method(OTHER, OtherConfig, OtherModel)


def test_name_of_peft_builtin_is_reserved():
    with pytest.raises(MethodRegistrationError, match=r"reserved by peft's built-in PeftType\.LORA"):
        register_method("LORA", ShiftConfig, ShiftModel)


def test_a_prefix_may_be_shared_as_adalora_shares_loras(shift_registered):
    # peft finds a method's tensors through its tuner layers, not by prefix: a method built on another keeps its
    # prefix (peft's own AdaLoRA keeps LoRA's), and both methods' adapters still save and load
    register_method(OTHER, OtherConfig, SamePrefixModel)
    register_method("TEST_LORA_PREFIX", LoraPrefixConfig, LoraPrefixModel)
    assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[OTHER] == peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[METHOD]
    assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING["TEST_LORA_PREFIX"] == "lora_"


def test_prefix_must_match_model_cls_prefix():
    with pytest.raises(MethodRegistrationError, match=r"Inconsistent prefixes.*'other_'.*'tshift_'"):
        register_method(METHOD, ShiftConfig, ShiftModel, prefix="other_")


def test_model_cls_without_prefix():
    with pytest.raises(MethodRegistrationError, match="has no `prefix` class attribute"):
        register_method(METHOD, ShiftConfig, NoPrefixModel)


@pytest.mark.parametrize("config_cls", [dict, BaseTuner, ShiftConfig(target_modules=TARGETS)])
def test_config_cls_must_subclass_peft_config(config_cls):
    with pytest.raises(MethodRegistrationError, match=r"config_cls must be a subclass of peft\.PeftConfig"):
        register_method(METHOD, config_cls, ShiftModel)


def test_prompt_learning_config_is_rejected():
    from peft import PromptTuningConfig

    with pytest.raises(MethodRegistrationError, match="prompt-learning config"):
        register_method(METHOD, PromptTuningConfig, ShiftModel)


@pytest.mark.parametrize("model_cls", [nn.Module, ShiftLinear, "ShiftModel"])
def test_model_cls_must_subclass_base_tuner(model_cls):
    with pytest.raises(MethodRegistrationError, match="model_cls must be a subclass of .*BaseTuner"):
        register_method(METHOD, ShiftConfig, model_cls)


@pytest.mark.parametrize(
    "name", ["", "test_shift", "Test_Shift", "TEST_SHIFT_", "_TEST", "1TEST", "TEST-SHIFT", "TÉST", None]
)
def test_invalid_names(name):
    with pytest.raises(MethodRegistrationError, match="upper-case ASCII identifier"):
        register_method(name, ShiftConfig, ShiftModel)


def test_config_must_set_registered_peft_type():
    match = r"peft_type is 'SOMETHING_ELSE'.*self\.peft_type = PeftMethodType\('TEST_SHIFT'\)"
    with pytest.raises(MethodRegistrationError, match=match):
        register_method(METHOD, WrongTypeConfig, ShiftModel)


def test_config_must_be_a_dataclass():
    match = r"declares \['scale'\] but is not decorated with @dataclass"
    with pytest.raises(MethodRegistrationError, match=match):
        register_method(METHOD, UndecoratedConfig, ShiftModel)


def test_mixed_compatible_is_rejected():
    with pytest.raises(MethodRegistrationError, match="PeftMixedModel mixes only its built-in adapter types"):
        register_method(METHOD, ShiftConfig, ShiftModel, is_mixed_compatible=True)
