"""The Ladder Side-Tuning benchmark's accuracy table over several seeds (training and evaluation replaced by
stand-ins, so only the bookkeeping runs): one run per configuration and seed, the mean, each seed's figure, the
gap to full fine-tuning and the test set's majority-class rate; and its configurations' pooling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


# ---- recipes/diagnose_ladder_side.py: the side network trained on cached backbone states ---------------------


def _tiny_bert_folder(folder: Path) -> Path:
    from tests import tiny
    from tests.test_train import make_tokenizer

    tiny.make_model("bert").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_the_diagnosis_classifies_cached_states_as_the_model_classifies_the_text(tmp_path):
    """On the backbone's cached states, the diagnosis gives the logits the PEFT model gives on the text (eval mode),
    for both poolings."""
    from peft import get_peft_model

    import compress
    from common.train import load_sequence_classifier
    from recipes import diagnose_ladder_side as diagnose
    from tests.test_train import make_dataset

    folder = _tiny_bert_folder(tmp_path / "bert")
    data = make_dataset(6, seed=3)
    data = data.add_column("text_pair", list(reversed(data["text"])))
    for pooling in ("model", "segments"):
        model, tokenizer = load_sequence_classifier(folder)
        rows = diagnose.cached_states(model, tokenizer, data, tmp_path / f"{pooling}.pt", max_length=32)
        peft_model = get_peft_model(model, compress.LadderSideConfig(task_type="SEQ_CLS", r=2, pooling=pooling,
                                                                     importance="magnitude")).eval()
        encoded = tokenizer(list(data["text"]), list(data["text_pair"]), padding=True, return_token_type_ids=True,
                            return_tensors="pt")
        with torch.no_grad():
            expected = peft_model(**encoded).logits
            logits, labels, mask = diagnose.classify_cached(peft_model, rows)
        torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)  # (states cached in float16)
        assert labels.tolist() == data["label"] and torch.equal(mask, encoded["attention_mask"])
    network = peft_model.base_model.lst_side.lst_network["default"]
    states, types = torch.randn(2, 5, network.up.in_features), torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    separate = network.pool_segments(states, None, types)
    diagnose.pool_as_one_segment(network)
    torch.testing.assert_close(network.pool_segments(states, None, types), network.pool_segments(states, None, None))
    assert not torch.allclose(network.pool_segments(states, None, types), separate)


def test_the_diagnosis_prints_one_line_per_epoch_and_reuses_its_cache(tmp_path, monkeypatch, capsys):
    from recipes import diagnose_ladder_side as diagnose

    monkeypatch.setattr(recipe, "SHARED_DATA", FIXTURES)
    folder = _tiny_bert_folder(tmp_path / "bert")
    argv = ["--glue-task", "MRPC", "--model", str(folder), "--epochs", "2", "--batch-size", "2", "--max-length", "32",
            "--importance", "magnitude", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "d.json")]
    assert diagnose.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    epochs = lines[1:]
    assert [e["epoch"] for e in epochs] == [1.0, 2.0] and lines[0]["config"]["pooling"] == "segments"
    assert all(0 <= e["test_acc"] <= 1 and len(e["entropy"]) == 2 and len(e["gates"]) == 2 for e in epochs)
    assert all(0 < h <= lines[0]["entropy_uniform"] + 1e-2 for e in epochs for h in e["entropy"])
    assert json.loads((tmp_path / "d.json").read_text())["epochs"] == epochs
    cached = sorted((tmp_path / "cache").iterdir())
    assert [p.name.split("-")[1] for p in cached] == ["test", "train"]
    stamps = [p.stat().st_mtime_ns for p in cached]
    monkeypatch.setattr(diagnose, "_save_atomically", lambda *a: pytest.fail("the cache was written again"))
    assert diagnose.main([*argv[:-2], "--epochs", "0.5"]) == 0
    assert [p.stat().st_mtime_ns for p in cached] == stamps


def test_the_probe_pair_features_and_one_line_per_hidden_state(tmp_path, monkeypatch, capsys):
    """``--probe``: pair features are [u, v, |u - v|, u * v, cos] of the segments' mean states (the whole row as v
    when there is one segment), and a probe line per hidden state, learning a separable task."""
    from recipes import diagnose_ladder_side as diagnose

    states = torch.arange(2 * 4 * 3, dtype=torch.float16).reshape(2, 4, 3)
    rows = [{"states": states, "token_type_ids": torch.tensor([0, 0, 1, 1]), "label": 0},
            {"states": states, "token_type_ids": torch.tensor([0, 0, 0, 0]), "label": 1}]
    features = diagnose.pair_features(rows, layer=1)
    u, v = states[1, :2].float().mean(0), states[1, 2:].float().mean(0)
    torch.testing.assert_close(features[0], torch.cat([u, v, (u - v).abs(), u * v,
                                                        torch.cosine_similarity(u, v, dim=0)[None]]))
    torch.testing.assert_close(features[1, 3:6], states[1].float().mean(0))

    # a task the last hidden state separates and the first does not: the probe must tell them apart
    generator = torch.Generator().manual_seed(0)
    separable = []
    for k in range(64):
        label = k % 2
        hidden = torch.randn(2, 4, 3, generator=generator)
        hidden[1] += 4.0 * label
        separable.append({"states": hidden.half(), "token_type_ids": torch.tensor([0, 0, 1, 1]), "label": label})
    args = diagnose.argparse.Namespace(seed=0, lr=1e-2, weight_decay=0.0, epochs=20, batch_size=8)
    noise, signal = (diagnose.probe_layer(separable[:48], separable[48:], layer, args) for layer in (0, 1))
    assert signal["test_acc"] == 1.0 and noise["test_acc"] < 0.85 and signal["hidden_state"] == 1

    monkeypatch.setattr(recipe, "SHARED_DATA", FIXTURES)
    folder = _tiny_bert_folder(tmp_path / "bert")
    argv = ["--glue-task", "MRPC", "--model", str(folder), "--probe", "--epochs", "1", "--max-length", "32",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "p.json")]
    assert diagnose.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["hidden_state"] for line in lines] == [0, 1, 2]  # embeddings + two blocks
    assert json.loads((tmp_path / "p.json").read_text())["probe"] == lines
