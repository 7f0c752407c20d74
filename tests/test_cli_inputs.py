"""Hostile input to ``compress prune`` / ``compress info``: every case ends in one ``compress: error:`` line (or
an honest warning), a non-zero exit where it fails, and nothing lost or left behind.

Each case runs in-process through :func:`compress.cli.main` (fast) and, marked ``slow``, through the real
``compress`` entry point in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from compress.cli import main
from tests import tiny
from tests.test_cli import WORDS, make_tokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A fresh folder per test (cases delete and corrupt things): models, data files and decoys."""
    tokenizer = make_tokenizer()
    tiny.make_model("bert").save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    one_head = BertForSequenceClassification(BertConfig(
        vocab_size=tiny.VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=1, intermediate_size=16,
        max_position_embeddings=64))
    one_head.save_pretrained(tmp_path / "one-head")
    tokenizer.save_pretrained(tmp_path / "one-head")
    rows = [f"{' '.join(WORDS[(i + j) % len(WORDS)] for j in range(5))}\t{i % 2}" for i in range(16)]
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "nest").mkdir()
    shutil.copytree(tmp_path / "bert", tmp_path / "nest" / "bert")
    (tmp_path / "nest" / "notes.txt").write_text("my notes", encoding="utf-8")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work", encoding="utf-8")
    (tmp_path / "tok").mkdir()
    tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path


def _copy_model(work: Path, name: str) -> Path:
    shutil.copytree(work / "bert", work / name)
    return work / name


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def _setup_truncated(work: Path) -> None:
    weights = _copy_model(work, "broken") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _setup_zero_byte(work: Path) -> None:
    (_copy_model(work, "broken") / "model.safetensors").write_bytes(b"")


def _setup_data_truncated(work: Path) -> None:
    weights = _copy_model(work, "broken") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _setup_pickle(work: Path) -> None:
    folder = _copy_model(work, "broken")
    (folder / "model.safetensors").unlink()
    torch.save(tiny.make_model("bert").state_dict(), folder / "pytorch_model.bin")


def _setup_bad_type(work: Path) -> None:
    _edit_config(_copy_model(work, "broken"), hidden_size="abc")


def _setup_mismatch(work: Path) -> None:
    _edit_config(_copy_model(work, "broken"), intermediate_size=48)


def _config_with(**changes):
    def setup(work: Path) -> None:
        _edit_config(_copy_model(work, "broken"), **changes)
    return setup


def _setup_adapter_out(work: Path) -> None:
    folder = work / "adapter"  # what Pruning-Adapter's save_pretrained writes: our tag in the card
    folder.mkdir()
    (folder / "README.md").write_text("---\ntags:\n- peft-compress\n---\n", encoding="utf-8")
    (folder / "adapter_config.json").write_text("{}", encoding="utf-8")


def _setup_trainer_out(work: Path) -> None:
    folder = work / "run"
    folder.mkdir()
    (folder / "compress_report.json").write_text("{}", encoding="utf-8")
    (folder / "trainer_state.json").write_text("{}", encoding="utf-8")


def _setup_foreign_tokenizer(work: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(400)}}  # ids beyond the model's 128 rows
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(work / "big-tok")
    rows = [f"w{300 + i} w{i}\t{i % 2}" for i in range(8)]
    (work / "big.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")


def _write(name: str, content: bytes):
    def setup(work: Path) -> None:
        (work / name).write_bytes(content)
    return setup


@dataclass
class Case:
    argv: list[str]
    error: str | None  # expected in the one error line; None: the run succeeds
    setup: object = None
    warning: str | None = None
    kept: list[str] = field(default_factory=list)  # files that must survive the run
    cwd: str | None = None  # run from this folder (relative to work)
    out: str | None = "out"  # the --out folder that must not appear (None: the case writes one)

    def args(self, work: Path) -> list[str]:
        return [a.format(w=work) for a in self.argv]


MAGNITUDE = ["--importance", "magnitude", "--no-progress"]
CASES = {
    # 1. data loss with --overwrite
    "out-is-parent-of-model": Case(["prune", "{w}/nest/bert", "--out", "{w}/nest", "--overwrite", *MAGNITUDE],
                                   "contains", kept=["nest/bert/config.json", "nest/notes.txt"], out=None),
    "out-is-data": Case(["prune", "{w}/bert", "--out", "{w}/mydata", "--data", "{w}/mydata", "--overwrite",
                         "--no-progress"], "contains", kept=["mydata/train.tsv"], out=None),
    "out-is-tokenizer": Case(["prune", "{w}/bert", "--out", "{w}/tok", "--tokenizer", "{w}/tok", "--overwrite",
                              *MAGNITUDE], "contains", kept=["tok/tokenizer.json"], out=None),
    "out-is-cwd": Case(["prune", "{w}/bert", "--out", ".", "--overwrite", *MAGNITUDE], "contains",
                       kept=["mine/thesis.tex", "bert/config.json"], cwd="mine", out=None),
    "out-not-ours": Case(["prune", "{w}/bert", "--out", "{w}/mine", "--overwrite", *MAGNITUDE],
                         "was not written by peft-compress", kept=["mine/thesis.tex"], out=None),
    "out-exists": Case(["prune", "{w}/bert", "--out", "{w}/mine", *MAGNITUDE], "pass --overwrite",
                       kept=["mine/thesis.tex"], out=None),
    "out-is-our-adapter": Case(["prune", "{w}/bert", "--out", "{w}/adapter", "--overwrite", *MAGNITUDE],
                               "holds a PEFT adapter", _setup_adapter_out, kept=["adapter/adapter_config.json"],
                               out=None),
    "out-holds-training-state": Case(["prune", "{w}/bert", "--out", "{w}/run", "--overwrite", *MAGNITUDE],
                                     "holds training state", _setup_trainer_out, kept=["run/trainer_state.json"],
                                     out=None),
    # 2. reports that claim what did not happen
    "round-to-removes-nothing": Case(["prune", "{w}/bert", "--out", "{w}/out", "--round-to", "1000", *MAGNITUDE],
                                     "ffn: sparsity 0.5 removes nothing"),
    "tiny-sparsity-removes-nothing": Case(["prune", "{w}/bert", "--out", "{w}/out", "--sparsity", "0.001", *MAGNITUDE],
                                       "ffn: sparsity 0.001 removes nothing"),
    "one-head-removes-nothing": Case(["prune", "{w}/one-head", "--out", "{w}/out", "--sparsity", "heads=0.5", "--mode",
                                      "global", *MAGNITUDE], "heads: sparsity 0.5 removes nothing"),
    "layers-rounded": Case(["prune", "{w}/bert", "--out", "{w}/out", "--structures", "layers", "--sparsity", "0.4",
                            *MAGNITUDE], None, warning="layers: removed 50.0%, not the 40.0% asked", out=None),
    "repeated-sparsity-key": Case(["prune", "{w}/bert", "--out", "{w}/out", "--sparsity", "ffn=0.5,ffn=0.3",
                                   *MAGNITUDE], "names 'ffn' twice"),
    # 5. raw tracebacks
    "truncated-weights": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE],
                              "model.safetensors is not a readable safetensors file", _setup_truncated),
    "truncated-weights-data": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE],
                                   "model.safetensors is not a readable safetensors file", _setup_data_truncated),
    "zero-byte-weights": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE],
                              "model.safetensors is not a readable safetensors file", _setup_zero_byte),
    "info-truncated-weights": Case(["info", "{w}/broken"], "model.safetensors is not a readable safetensors file",
                                   _setup_truncated),
    "info-zero-byte-weights": Case(["info", "{w}/broken"], "model.safetensors is not a readable safetensors file",
                                   _setup_zero_byte),
    "pickle-weights": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE], "loads safetensors only",
                           _setup_pickle),
    "config-wrong-type": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE],
                              'config.json: hidden_size is "abc": it must be a positive integer', _setup_bad_type),
    "info-config-wrong-type": Case(["info", "{w}/broken"], 'hidden_size is "abc": it must be a positive integer',
                                   _setup_bad_type),
    "config-disagrees-with-weights": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE],
                                          "config.json disagrees with the weights", _setup_mismatch),
    "info-config-disagrees-with-weights": Case(["info", "{w}/broken"], "config.json disagrees with the weights",
                                               _setup_mismatch),
    # config.json fields transformers trusts and crashes on (or reads wrongly): the file, the field and the fix
    "config-negative-size": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE],
                                 "config.json: intermediate_size is -5: it must be a positive integer; restore",
                                 _config_with(intermediate_size=-5)),
    "info-config-negative-size": Case(["info", "{w}/broken"], "config.json: intermediate_size is -5: it must be a "
                                      "positive integer", _config_with(intermediate_size=-5)),
    "config-id2label-list": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE],
                                 'config.json: id2label is [1, 2]: it must map class ids to label names; write '
                                 'id2label as {"0": "negative", "1": "positive"}', _config_with(id2label=[1, 2])),
    "info-config-id2label-list": Case(["info", "{w}/broken"], "config.json: id2label is [1, 2]",
                                      _config_with(id2label=[1, 2])),
    "config-zero-heads": Case(["info", "{w}/broken"], "config.json: num_attention_heads is 0: it must be a positive "
                              "integer", _config_with(num_attention_heads=0)),
    "config-architectures-not-a-list": Case(["info", "{w}/broken"], "config.json: architectures is [3]: it must be a "
                                            "list of class names", _config_with(architectures=[3])),
    "config-unknown-activation": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE],
                                      'config.json: hidden_act is "nope", which is not an activation',
                                      _config_with(hidden_act="nope")),
    "config-unknown-dtype": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE],
                                 'config.json: dtype is "float99", which is not a torch dtype',
                                 _config_with(dtype="float99")),
    "config-pad-beyond-vocab": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE],
                                    "config.json: pad_token_id is 500: it must be a token id below vocab_size (128)",
                                    _config_with(pad_token_id=500)),
    "config-builds-no-model": Case(["prune", "{w}/broken", "--out", "{w}/out", *MAGNITUDE],
                                   "config.json describes no model AutoModelForSequenceClassification can build "
                                   "(ValueError: dropout probability", _config_with(hidden_dropout_prob=5)),
    "tokenizer-of-another-model": Case(["prune", "{w}/bert", "--out", "{w}/out", "--tokenizer", "{w}/big-tok",
                                        "--data", "{w}/big.tsv", "--no-progress"],
                                       "but the model's embedding has 128 rows", _setup_foreign_tokenizer),
    "device-meta": Case(["prune", "{w}/bert", "--out", "{w}/out", "--device", "meta", *MAGNITUDE],
                        "--device meta holds no weights"),
    "csv-unterminated-quote": Case(["prune", "{w}/bert", "--out", "{w}/out", "--data", "{w}/q.csv", "--no-progress"],
                                   "fewer fields than header columns",
                                   _write("q.csv", b'sentence,label\n"the movie,1\ngood,0\n')),
    "csv-unterminated-quote-last-column": Case(["prune", "{w}/bert", "--out", "{w}/out", "--data", "{w}/l.csv",
                                                "--no-progress"], "l.csv:3: unbalanced quote",
                                               _write("l.csv", b'label,sentence\n0,fine\n1,"the movie\n0,good\n')),
    "jsonl-mixed-label-types": Case(["prune", "{w}/bert", "--out", "{w}/out", "--data", "{w}/m.jsonl",
                                     "--no-progress"], "m.jsonl: a column mixes value types",
                                    _write("m.jsonl", b'{"text": "good", "label": 1}\n{"text": "bad", "label": "x"}')),
    "non-utf8-data": Case(["prune", "{w}/bert", "--out", "{w}/out", "--data", "{w}/n.tsv", "--no-progress"],
                          "n.tsv is not UTF-8 text", _write("n.tsv", b"sentence\tlabel\ngood \xff\xfe film\t1\n")),
    "float-labels": Case(["prune", "{w}/bert", "--out", "{w}/out", "--data", "{w}/f.jsonl", "--no-progress"],
                         "has label 1.5, but a classifier with num_labels=2 needs integer class ids",
                         _write("f.jsonl", b'{"text": "good", "label": 1.5}\n{"text": "bad", "label": 0.0}\n')),
}


def _prepare(case: Case, work: Path) -> dict[str, bytes]:
    if case.setup is not None:
        case.setup(work)
    return {name: (work / name).read_bytes() for name in case.kept}


def _check(case: Case, work: Path, rc: int, stdout: str, stderr: str, kept: dict[str, bytes]) -> None:
    assert "Traceback" not in stderr, stderr
    for name, content in kept.items():
        assert (work / name).is_file() and (work / name).read_bytes() == content, f"{name} was lost"
    hidden = [p.name for p in work.rglob(".*tmp-*")]
    assert not hidden, f"temporary folders left behind: {hidden}"
    if case.error is None:
        assert rc == 0, stderr
        if case.warning:
            assert case.warning in stderr
        return
    errors = [line for line in stderr.splitlines() if line.startswith("compress: error:")]
    assert rc == 2, stderr
    assert len(errors) == 1 and case.error in errors[0], stderr
    if case.out:
        assert not (work / case.out).exists(), "a failed run left its output folder"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_in_process(name, work, capsys, monkeypatch):
    case = CASES[name]
    kept = _prepare(case, work)
    if case.cwd:
        monkeypatch.chdir(work / case.cwd)
    rc = main(case.args(work))
    captured = capsys.readouterr()
    _check(case, work, rc, captured.out, captured.err, kept)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_through_the_entry_point(name, work):
    case = CASES[name]
    kept = _prepare(case, work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    script = Path(sys.executable).with_name("compress")  # the console script the package installs
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "compress"]
    proc = subprocess.run([*command, *case.args(work)], capture_output=True, text=True,
                          cwd=work / (case.cwd or ""), env=env, timeout=300)
    _check(case, work, proc.returncode, proc.stdout, proc.stderr, kept)


def test_layers_report_states_what_was_removed(work, capsys):
    out = work / "out"
    assert main(["prune", str(work / "bert"), "--out", str(out), "--structures", "layers", "--sparsity", "0.4",
                 *MAGNITUDE]) == 0
    captured = capsys.readouterr()
    assert "removed layers 50% (asked 40%)" in captured.out
    report = json.loads((out / "compress_report.json").read_text(encoding="utf-8"))
    assert report["sparsity"] == {"layers": 0.4} and report["achieved_sparsity"] == {"layers": 0.5}
    assert "| removed | layers 50% (asked 40%) |" in (out / "README.md").read_text(encoding="utf-8")
    assert main(["info", str(out)]) == 0
    assert "layers 50% (asked 40%) removed" in capsys.readouterr().out


def test_overwrite_replaces_a_previous_output(work, capsys):
    out = work / "out"
    assert main(["prune", str(work / "bert"), "--out", str(out), *MAGNITUDE]) == 0
    assert main(["prune", str(work / "bert"), "--out", str(out), "--sparsity", "0.25", "--overwrite", *MAGNITUDE]) == 0
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["intermediate_size"] == 48


def test_empty_existing_folder_is_written_without_overwrite(work, capsys):
    (work / "empty").mkdir()
    assert main(["prune", str(work / "bert"), "--out", str(work / "empty"), *MAGNITUDE]) == 0
    assert (work / "empty" / "model.safetensors").is_file()


def test_unwritable_parent_is_refused_before_loading(work, capsys, monkeypatch):
    import transformers

    def no_write(path, mode, *args, **kwargs):
        return not (mode & os.W_OK and Path(path) == work)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(os, "access", no_write)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", never)
    rc = main(["prune", str(work / "bert"), "--out", str(work / "out"), *MAGNITUDE])
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot write to {work}" in err, err


def test_activation_importance_scores_unlabelled_data(work, capsys):
    (work / "unlabelled.tsv").write_text("sentence\n" + "\n".join(WORDS[:12]) + "\n", encoding="utf-8")
    out = work / "out"
    assert main(["prune", str(work / "bert"), "--out", str(out), "--importance", "activation", "--data",
                 str(work / "unlabelled.tsv"), "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["intermediate_size"] == 32


def test_hidden_size_pruning_is_reported_in_the_table_card_and_report(work, capsys):
    out = work / "out"
    assert main(["prune", str(work / "bert"), "--out", str(out), "--sparsity", "hidden=0.25", "--mode", "global",
                 *MAGNITUDE]) == 0
    printed = capsys.readouterr().out
    assert any(line.startswith("| hidden size") and "32" in line and "24" in line for line in printed.splitlines())
    report = json.loads((out / "compress_report.json").read_text(encoding="utf-8"))
    assert report["widths_before"]["hidden"] == [32] and report["widths_after"]["hidden"] == [24]
    assert "| hidden size | [24] |" in (out / "README.md").read_text(encoding="utf-8")
    assert main(["info", str(out)]) == 0
