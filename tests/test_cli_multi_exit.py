"""``compress info`` and ``compress prune`` on saved multi-exit models and on models whose widths differ per layer:
prune removes exactly what info lists, and refuses the rest before loading the weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification

import compress
from compress.cli import main
from tests import tiny
from tests.test_cli import WORDS, make_tokenizer

REPO = Path(__file__).resolve().parent.parent


def save_multi_exit(folder: Path) -> Path:
    """A merged multi-exit BERT whose exit policy sends every example out at the first exit."""
    config = compress.MultiExitConfig(task_type="SEQ_CLS", train_backbone=False, exit_policy="max_prob",
                                      exit_threshold=0.0)
    model = get_peft_model(tiny.make_model("bert"), config)
    return compress.save_pretrained(model.merge_and_unload(), folder, tokenizer=make_tokenizer())


def save_compact(folder: Path) -> Path:
    """A BERT whose FFN widths differ per layer (global mode)."""
    model = tiny.make_model("bert")
    torch.manual_seed(0)
    report = compress.prune_model(model, sparsity=0.5, structures="ffn", mode="global", importance="random")
    assert len(set(report.widths_after["ffn"])) > 1
    return compress.save_pretrained(model, folder, tokenizer=make_tokenizer(), report=report)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-multi-exit")
    save_multi_exit(root / "multi-exit")
    save_compact(root / "compact")
    rows = [f"{' '.join(WORDS[(i + j) % len(WORDS)] for j in range(5))}\t{i % 2}" for i in range(16)]
    (root / "data.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


def listed(info: str) -> dict[str, list[str]]:
    """The structures ``compress info`` lists per mode."""
    found = dict(re.findall(r"--mode (uniform|global):\s+(.+?)  \(", info))
    none = re.findall(r"--mode (uniform|global):\s+none \(", info)
    return {**{mode: found[mode].split(", ") for mode in found}, **{mode: [] for mode in none}}


def test_info_lists_what_a_multi_exit_model_can_lose(work, capsys):
    assert main(["info", str(work / "multi-exit")]) == 0
    info = capsys.readouterr().out
    assert "needs `import compress` (a multi-exit model)" in info
    assert listed(info) == {"uniform": ["ffn"], "global": ["ffn", "heads"]}
    assert re.search(r"not prunable: +layers: its exits sit after given blocks .*; hidden: its exit heads read", info)


@pytest.mark.parametrize(("mode", "structure", "importance"), [
    ("uniform", "ffn", "magnitude"), ("global", "ffn", "magnitude"),
    ("global", "heads", "taylor"),  # scored on the loss of every exit
])
def test_prune_removes_what_info_lists_from_a_multi_exit_model(work, tmp_path, capsys, mode, structure, importance):
    out = tmp_path / "out"
    data = ["--data", str(work / "data.tsv"), "--num-batches", "2", "--batch-size", "4"]
    rc = main(["prune", str(work / "multi-exit"), "--out", str(out), "--mode", mode, "--structures", structure,
               "--importance", importance, *(data if importance == "taylor" else []), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"Pruned multi-exit bert (MultiExitForSequenceClassification): removed {structure} 50%" in captured.out
    assert "loading: multi-exit model: run `import compress`" in captured.out
    original = AutoModelForSequenceClassification.from_pretrained(work / "multi-exit")
    pruned = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(pruned) is type(original) and len(pruned.exits) == len(original.exits) == 1
    assert pruned.config.exit_policy == "max_prob" and pruned.config.exit_threshold == 0.0
    widths = compress.pruning.arch.arch_spec(pruned.backbone).widths()
    before = compress.pruning.arch.arch_spec(original.backbone).widths()
    assert sum(widths[structure]) == sum(before[structure]) // 2 and widths["layers"] == before["layers"]
    pruned.eval()
    batch = tiny.make_batch("bert", labels=False)
    with torch.no_grad():
        assert pruned(**batch).logits.shape == (len(batch["input_ids"]), 2)


@pytest.mark.parametrize(("mode", "structure", "why"), [
    ("uniform", "layers", "its exits sit after given blocks (exit_layers)"),
    ("global", "hidden", "its exit heads read the hidden size"),
])
def test_prune_refuses_what_info_does_not_list(work, tmp_path, capsys, monkeypatch, mode, structure, why):
    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the request was refused")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_loading)
    rc = main(["prune", str(work / "multi-exit"), "--out", str(tmp_path / "out"), "--mode", mode, "--structures",
               structure, "--importance", "magnitude", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("compress: error:") == 1, err
    assert f"cannot prune {structure} from this multi-exit model: {why}" in err
    assert "it can be pruned with --mode uniform --structures ffn or --mode global --structures ffn,heads" in err
    assert not (tmp_path / "out").exists()


def test_info_and_prune_agree_on_a_model_with_per_layer_widths(work, tmp_path, capsys):
    assert main(["info", str(work / "compact")]) == 0
    info = capsys.readouterr().out
    assert listed(info) == {"uniform": [], "global": ["ffn", "heads", "layers", "hidden"]}
    assert "--mode uniform: none (its layers already differ in width" in info
    rc = main(["prune", str(work / "compact"), "--out", str(tmp_path / "out"), "--mode", "uniform",
               "--importance", "magnitude", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("compress: error:") == 1 and "internal" not in err
    assert "--mode uniform cannot prune this model with per-layer widths: its layers already differ" in err
    assert "it can be pruned with --mode global --structures ffn,heads,layers,hidden" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_prune_a_multi_exit_model_through_the_entry_point(work, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "compress", "prune", str(work / "multi-exit"), "--structures", "ffn",
               "--data", str(work / "data.tsv"), "--num-batches", "2", "--batch-size", "4", "--no-progress"]
    done = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Pruned multi-exit bert" in done.stdout and (tmp_path / "out" / "model.safetensors").is_file()
    refused = subprocess.run([*command, "--out", str(tmp_path / "never"), "--structures", "layers"],
                             capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("compress: error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "its exits sit after" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "never").exists()


def test_a_multi_exit_backbone_config_is_checked_like_any_config(work, tmp_path, capsys):
    folder = shutil.copytree(work / "multi-exit", tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["backbone"]["intermediate_size"] = -5
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for command in (["info", str(folder)], ["prune", str(folder), "--out", str(tmp_path / "out"), "--importance",
                                            "magnitude", "--no-progress"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.count("compress: error:") == 1 and "Traceback" not in err
        assert "config.json: backbone.intermediate_size is -5: it must be a positive integer" in err
