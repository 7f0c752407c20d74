"""Behaviour every PEFT method of the project shares, over the matrix in ``tests/methods.py``."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

import compress
from tests import tiny
from tests.methods import CASES, MERGES, PREPARE, TASK, adapter_parameter_names, build, logits, perturb_adapters

IDS = [c.id for c in CASES]


def test_every_method_has_cases():
    covered = {c.method for c in CASES}
    missing = set(compress.METHODS) - covered
    assert not missing, f"methods without test cases in tests/methods.py: {sorted(missing)}"
    assert set(PREPARE) >= set(compress.METHODS), "add a PREPARE entry for every method"
    assert set(MERGES) >= set(compress.METHODS), "say in MERGES whether every method merges"


def test_import_compress_registers_every_method_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from compress.registry import registered_methods

    for name in compress.METHODS:
        assert name in registered_methods()
        assert name in PEFT_TYPE_TO_CONFIG_MAPPING and name in PEFT_TYPE_TO_TUNER_MAPPING


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_only_adapter_parameters_train(case):
    _, model = build(case)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapters = adapter_parameter_names(model)
    assert adapters and adapters <= set(trainable)
    assert all(n in adapters or "modules_to_save" in n for n in trainable), trainable


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_step_moves_adapters_not_backbone(case):
    _, model = build(case)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in tiny.make_batches(case.arch, 2):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items()), "backbone weights changed"
    assert any(not torch.equal(after[n], v) for n, v in trainable.items()), "adapters did not learn"
    assert all(p.grad is None for n, p in after.items() if n in frozen), "backbone got gradients"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_and_reload_give_identical_logits(case, tmp_path):
    pristine, model = build(case)
    perturb_adapters(model)
    expected = logits(model, case.arch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert compress.export.is_compress_output(tmp_path)  # the model card is tagged peft-compress
    assert isinstance(PeftConfig.from_pretrained(tmp_path), case.config_cls)
    reloaded = PeftModel.from_pretrained(pristine, tmp_path)
    torch.testing.assert_close(logits(reloaded, case.arch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_and_unload_matches_unmerged(case):
    _, model = build(case)
    if not MERGES[case.method]:
        with pytest.raises(compress.CompressError, match="nothing to merge"):
            model.merge_and_unload()
        return
    perturb_adapters(model)
    expected = logits(model, case.arch)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any(model.base_model.prefix in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, case.arch), expected, rtol=1e-4, atol=1e-4)


_AUTO_CLASS = {"SEQ_CLS": "AutoModelForSequenceClassification", "CAUSAL_LM": "AutoModelForCausalLM",
               "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}

# Runs in a new interpreter: the merged model loads with plain transformers unless its config is a compact
# type (then after ``import compress``); the adapter loads onto the saved base after ``import compress``.
_FRESH_RELOAD = textwrap.dedent("""
    import sys, torch, transformers
    base_dir, adapter_dir, merged_dir, tensors_file, auto_class, merged_needs_compress = sys.argv[1:7]
    tensors = torch.load(tensors_file)
    auto = getattr(transformers, auto_class)
    def logits(model):
        with torch.no_grad():
            return model.eval()(**tensors["batch"]).logits
    if merged_needs_compress == "none":
        pass
    elif merged_needs_compress == "0":
        torch.testing.assert_close(logits(auto.from_pretrained(merged_dir)), tensors["merged"], rtol=0, atol=1e-5)
        assert "compress" not in sys.modules
    import compress  # registers the PEFT method (and the compact model types)
    from peft import PeftModel
    if merged_needs_compress == "1":
        torch.testing.assert_close(logits(auto.from_pretrained(merged_dir)), tensors["merged"], rtol=0, atol=1e-5)
    adapter = PeftModel.from_pretrained(auto.from_pretrained(base_dir), adapter_dir)
    torch.testing.assert_close(logits(adapter), tensors["adapter"], rtol=0, atol=1e-6)
    print("FRESH-RELOAD-OK")
""")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapter_and_merged_model_reload_in_a_fresh_process(case, tmp_path):
    pristine, model = build(case)
    perturb_adapters(model)
    pristine.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    batch = tiny.make_batch(case.arch, labels=False)
    tensors = {"batch": batch, "adapter": logits(model, case.arch)}
    needs = "none"
    if MERGES[case.method]:
        merged = copy.deepcopy(model).merge_and_unload()
        compress.save_pretrained(merged, tmp_path / "merged")
        tensors["merged"] = logits(merged, case.arch)
        needs = "1" if compress.export.needs_compress_to_load(merged) else "0"
    torch.save(tensors, tmp_path / "tensors.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_RELOAD, str(tmp_path / "base"), str(tmp_path / "adapter"),
         str(tmp_path / "merged"), str(tmp_path / "tensors.pt"), _AUTO_CLASS[TASK[case.arch]], needs],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert "FRESH-RELOAD-OK" in proc.stdout, proc.stderr[-3000:]
