"""The Ladder Side-Tuning benchmark's accuracy table over several seeds (training and evaluation replaced by
stand-ins, so only the bookkeeping runs): one run per configuration and seed, the mean, each seed's figure, the
gap to full fine-tuning and the test set's majority-class rate; and its configurations' pooling."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import ladder_side, recipe

FIXTURES = Path(__file__).resolve().parent / "fixtures"


class _Trained:
    """What the benchmark needs of a trained PEFT model: its trainable parameters and a folder to save."""

    peft_config = {"default": None}

    def get_nb_trainable_parameters(self):
        return 10, 100

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"0" * 1024)


def test_the_accuracy_table_averages_seeds(tmp_path, monkeypatch):
    from recipes import bench_ladder_side

    monkeypatch.setattr(recipe, "SHARED_DATA", FIXTURES)  # tests/fixtures/glue/MRPC
    built, trained = [], []

    def build(kind, args, calibration=None):
        built.append((kind, args.seed))
        return _Trained(), None

    def finetune(model, tokenizer, train, steps, seed, **options):
        trained.append(seed)
        return {"train_time_s": 2.0 * steps, "steps": steps}

    accuracy = {("full", 0): 0.80, ("full", 1): 0.82, ("lst-r8", 0): 0.75, ("lst-r8", 1): 0.76}
    monkeypatch.setattr(bench_ladder_side, "build", build)
    monkeypatch.setattr(bench_ladder_side, "finetune_classifier", finetune)
    monkeypatch.setattr(bench_ladder_side, "evaluate_accuracy", lambda *a, **k: accuracy[built[-1]])
    md = tmp_path / "bench.md"
    assert bench_ladder_side.main(["--glue-task", "MRPC", "--steps", "3", "--seeds", "0", "1", "--no-memory",
                                   "--kinds", "lst-r8", "full", "--out", str(tmp_path / "out"), "--md", str(md)]) == 0
    assert built == [("full", 0), ("full", 1), ("lst-r8", 0), ("lst-r8", 1)] and trained == [0, 1, 0, 1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["full-seed0", "full-seed1", "lst-r8-seed0",
                                                                     "lst-r8-seed1"]
    text = md.read_text()
    lines = text.splitlines()
    header = [c.strip() for c in next(line for line in lines if "test acc" in line).strip("|").split("|")]
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")
             and "test acc" not in line and not line.startswith("| --"))}
    assert rows["full"]["test acc"] == "81.00%" and rows["full"]["per seed"] == "80.00% / 82.00%"
    assert rows["lst-r8"]["test acc"] == "75.50%" and rows["lst-r8"]["acc vs full (pt)"] == "-5.5"
    assert "seeds 0, 1 (test acc: mean)" in text and "(majority class 66.67%)" in text


@pytest.mark.parametrize(("kind", "pooling"), [("lst-r8", None), ("lst-r8-cls", "model"), ("lst-r8-add", None)])
def test_the_benchmark_configurations_pooling(kind, pooling):
    args = recipe.default_arguments(ladder_side.add_arguments)
    assert ladder_side.lst_config(kind, args).pooling == pooling  # None: the method's default for the model
