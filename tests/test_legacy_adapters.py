"""Adapter folders saved by earlier releases of Pruning-Adapter and sparse soups load onto the original base model
with the same logits: their LoRA matrices are renamed on load and their config's ``init_weights`` read as
``init_lora_weights``, each with a FutureWarning."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import compress
from tests import tiny
from tests.legacy_adapters import save_in_old_format
from tests.methods import logits, perturb_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned_adapter():
    config = compress.PruningAdapterConfig(task_type="SEQ_CLS", sparsity={"ffn": 0.5, "heads": 0.5}, mode="global",
                                           compensate_bias=True, r=4)
    model = get_peft_model(tiny.make_model("bert"), config)
    model.base_model.prune(data=tiny.make_batches("bert", 2))
    return model


def _sparse_lora_adapter():
    return get_peft_model(tiny.make_model("bert"), compress.SparseSoupConfig(task_type="SEQ_CLS", sparsity=0.5,
                                                                             train="lora", r=4))


@pytest.mark.parametrize("build, old_names", [(_pruned_adapter, (".pa_A.", ".pa_B.")),
                                              (_sparse_lora_adapter, (".sparse_A.", ".sparse_B."))],
                         ids=["pruning_adapter", "sparse_soup"])
def test_a_folder_of_the_earlier_format_loads_with_identical_logits(build, old_names, tmp_path):
    model = build()
    perturb_adapters(model)
    expected = logits(model, "bert")
    folder = save_in_old_format(model, tmp_path / "old")
    saved = load_file(folder / "adapter_model.safetensors")
    assert all(any(name in key for key in saved) for name in old_names)  # the folder really is in the old format
    assert "init_weights" in json.loads((folder / "adapter_config.json").read_text())

    old = "/".join(name.strip(".") for name in old_names)
    with pytest.warns(FutureWarning) as caught:
        reloaded = PeftModel.from_pretrained(tiny.make_model("bert"), folder)
    messages = [str(w.message) for w in caught]
    assert any(f"name LoRA's matrices {old}" in m for m in messages), messages
    assert any("init_weights=...) is deprecated" in m for m in messages), messages
    torch.testing.assert_close(logits(reloaded, "bert"), expected, rtol=0, atol=1e-6)
    with pytest.warns(FutureWarning, match="init_lora_weights"):
        config = PeftConfig.from_pretrained(folder)
    assert isinstance(config, type(model.peft_config["default"])) and config.init_lora_weights is True
