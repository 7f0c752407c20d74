"""compress.measure: parameter and FLOP counts, folder sizes, tables."""

from __future__ import annotations

import re

import pytest
import torch

from compress.measure import count_parameters, estimate_flops, folder_size, format_table, ratio
from tests import tiny

# ---- static measures -------------------------------------------------------------------------------


def test_count_parameters_all_and_trainable():
    model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.Linear(5, 3))
    assert count_parameters(model) == (10 * 5 + 5) + (5 * 3 + 3)
    model[0].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 5 * 3 + 3
    assert count_parameters(model) == 73


def test_count_parameters_of_transformers_and_peft_models():
    from peft import LoraConfig, get_peft_model

    model = tiny.make_model("llama")  # untied embeddings; tie them so one tensor serves both
    model.lm_head.weight = model.model.embed_tokens.weight
    distinct = {p.data_ptr(): p.numel() for p in model.state_dict().values()}
    assert count_parameters(model) == sum(distinct.values())  # the tied matrix counted once
    lora = get_peft_model(tiny.make_model("bert"), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    # LoRA A (2 x 32) and B (32 x 2) in each of 2 layers, plus the classifier (2 x 32 + 2) that SEQ_CLS trains
    assert count_parameters(lora, trainable_only=True) == 2 * (2 * 32 + 32 * 2) + (2 * 32 + 2)
    assert count_parameters(lora) == count_parameters(lora.get_base_model())


def test_estimate_flops_linear():
    model = torch.nn.Linear(16, 32)
    assert estimate_flops(model, {"input": torch.randn(4, 16)}) == 2 * 4 * 16 * 32
    assert torch.is_grad_enabled()


def test_folder_size(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "b.txt").write_bytes(b"y" * 23)
    (tmp_path / "sub" / "deeper" / "c").write_bytes(b"z" * 7)
    assert folder_size(tmp_path) == 130
    assert folder_size(str(tmp_path / "sub")) == 30
    assert folder_size(tmp_path / "a.bin") == 100
    with pytest.raises(FileNotFoundError):
        folder_size(tmp_path / "missing")


def test_ratio():
    assert ratio(50, 200) == 0.25
    with pytest.raises(ValueError):
        ratio(1, 0)


# ---- tables ----------------------------------------------------------------------------------------


def test_format_table_alignment_and_numbers():
    rows = [
        {"method": "full", "params": 22_713_216, "peak_mb": 1683.0, "latency_s": 0.0123456},
        {"method": "lora|r8", "params": 73_728, "peak_mb": 1497.25},
    ]
    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 4
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    assert re.fullmatch(r"\| method +\| +params \| +peak_mb \| +latency_s \|", lines[0])
    assert re.fullmatch(r"\|-+\|-+:\|-+:\|-+:\|", lines[1])
    assert "22,713,216" in lines[2] and "1,683.000" in lines[2] and "0.0123" in lines[2]
    assert lines[3].startswith("| lora\\|r8 ")  # text left-aligned, pipe escaped
    assert lines[3].rstrip().endswith("|") and "73,728" in lines[3]
    # numbers right-aligned: their column cells end at the same offset as the header's name
    assert lines[2].index("22,713,216") + len("22,713,216") == lines[0].index("params") + len("params")
    assert lines[3].index("73,728") + len("73,728") == lines[0].index("params") + len("params")
    subset = format_table(rows, columns=["params", "method"]).splitlines()
    assert subset[0].split("|")[1].strip() == "params" and len(subset[0].split("|")) == 4
