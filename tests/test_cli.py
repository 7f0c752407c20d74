"""The ``compress`` command line: prune/info end to end on tiny saved models, and its error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compress  # noqa: F401  (compact Auto classes)
from compress.cli import main
from compress.cli.inputs import build_calibration
from compress.cli.summary import format_widths, summary_rows
from tests import tiny

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the a movie film good bad great awful fun boring plot actor was is very not and it "
         "story music scene long short").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    assert max(vocab.values()) < tiny.VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    tokenizer = make_tokenizer()
    for name, arch, with_tokenizer in (("bert", "bert", True), ("llama", "llama", False),
                                       ("llama-tok", "llama", True), ("t5", "t5", True)):
        tiny.make_model(arch).save_pretrained(root / name)
        if with_tokenizer:
            tokenizer.save_pretrained(root / name)
    gen = torch.Generator().manual_seed(0)
    lines = ["sentence\tlabel"]
    for i in range(20):
        idx = torch.randint(0, len(WORDS), (6,), generator=gen).tolist()
        lines.append(" ".join(WORDS[j] for j in idx) + f"\t{i % 2}")
    (root / "data.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "no-config").mkdir()
    (root / "gpt2").mkdir()
    (root / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    (root / "existing").mkdir()
    (root / "existing" / "notes.txt").write_text("mine", encoding="utf-8")
    return root


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def test_prune_bert_ffn_taylor(work, capsys):
    out = work / "bert-ffn"
    rc = main(["prune", str(work / "bert"), "--out", str(out), "--sparsity", "0.5", "--structures", "ffn",
               "--importance", "taylor", "--data", str(work / "data.tsv"), "--max-length", "32",
               "--num-batches", "2", "--batch-size", "8"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("model.safetensors", "config.json", "README.md", "compress_report.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert _config(out)["intermediate_size"] == 32
    assert _config(out)["model_type"] == "bert"
    stdout = captured.out
    assert "parameters" in stdout and "24,482" in stdout
    assert "FLOPs, one 1x32 forward" in stdout
    assert "64 (all 2)" in stdout and "32 (all 2)" in stdout  # FFN widths before/after
    assert "without `import compress`" in stdout
    assert "calibration: 16 rows of up to 32 tokens from " in stdout
    report = json.loads((out / "compress_report.json").read_text())
    assert report["params_after"] < report["params_before"] == 24482

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
    batch = AutoTokenizer.from_pretrained(out, local_files_only=True)(["the movie was good"], return_tensors="pt")
    assert model(**batch).logits.shape == (1, 2)

    # an existing --out is replaced with --overwrite
    rc = main(["prune", str(work / "bert"), "--out", str(out), "--sparsity", "0.25", "--importance", "magnitude",
               "--overwrite", "--no-progress", "--max-length", "32"])
    assert rc == 0, capsys.readouterr().err
    assert _config(out)["intermediate_size"] == 48


def test_prune_bert_global_heads_is_compact(work, capsys):
    out = work / "bert-global"
    rc = main(["prune", str(work / "bert"), "--out", str(out), "--sparsity", "0.5", "--structures", "ffn,heads",
               "--mode", "global", "--data", str(work / "data.tsv"), "--max-length", "32", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert _config(out)["model_type"].startswith("compressed_")
    assert "run `import compress`" in captured.out
    assert "import compress" in (out / "README.md").read_text()
    assert "global mode" in captured.out

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
    assert model(**tiny.make_batch("bert")).logits.shape == (2, 2)

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "compressed_bert" in info and "needs `import compress`" in info
    assert "global mode, taylor importance" in info  # the pruning record


def test_prune_with_normalised_scores_and_bias_compensation(work, capsys):
    from safetensors.torch import load_file

    common = ["--sparsity", "0.5", "--structures", "ffn", "--mode", "global", "--normalize", "mean", "--importance",
              "magnitude", "--data", str(work / "data.tsv"), "--max-length", "32", "--no-progress"]
    for name, extra in (("plain", []), ("compensated", ["--compensate-bias"])):
        rc = main(["prune", str(work / "bert"), "--out", str(work / name), *common, *extra])
        assert rc == 0, capsys.readouterr().err
    plain, compensated = (load_file(work / n / "model.safetensors") for n in ("plain", "compensated"))
    rc = main(["prune", str(work / "bert"), "--out", str(work / "capped"), *common, "--max-keep", "0.5"])
    assert rc == 0, capsys.readouterr().err
    assert _config(work / "capped")["intermediate_size"] == 32  # every layer at the cap: a plain config
    key = "bert.encoder.layer.0.output.dense.bias"
    assert torch.equal(plain[key.replace("bias", "weight")], compensated[key.replace("bias", "weight")])
    assert not torch.allclose(plain[key], compensated[key])


def test_prune_llama_magnitude_needs_no_data(work, capsys):
    out = work / "llama-out"
    rc = main(["prune", str(work / "llama"), "--out", str(out), "--sparsity", "0.5", "--structures",
               "ffn,kv_heads", "--importance", "magnitude", "--max-length", "128", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    cfg = _config(out)
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (32, 2, 1)
    assert not (out / "tokenizer.json").exists()
    assert "kv heads per layer" in captured.out and "no tokenizer" in captured.out
    # a max length beyond the model's 64 positions is capped, with a warning
    assert "using 64" in captured.err and "FLOPs, one 1x64 forward" in captured.out
    # magnitude on a causal LM: allowed, with one warning line
    warnings = [line for line in captured.err.splitlines() if "magnitude" in line]
    assert warnings == ["compress: WARNING: importance='magnitude' on a causal LM: weight norms miss the activation "
                        "outliers of real LLMs and can break the model; flap or wanda_sp score with activations"]


@pytest.mark.parametrize("name,calibration", [
    ("llama-tok", "calibration: 32 rows x 16 tokens from {data} (column 'sentence', 20 rows joined with"),
    ("t5", "calibration: 20 rows of up to 16 tokens from {data}, seed 0"),
])
def test_prune_lm_with_data(work, capsys, name, calibration):
    """Causal and seq2seq LMs score on the text itself, whatever labels the classification data has: a causal LM
    on rows of the text column's rows joined, T5 on the rows themselves."""
    src = work / name
    out = work / f"{name}-fisher"
    rc = main(["prune", str(src), "--out", str(out), "--sparsity", "0.5", "--structures", "ffn,heads",
               "--importance", "fisher", "--data", str(work / "data.tsv"), "--max-length", "16",
               "--num-batches", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "fisher importance;" in captured.out
    assert calibration.format(data=work / "data.tsv") in captured.out


def test_build_calibration_labels(work):
    from transformers import AutoModelForCausalLM

    from compress.data import load_task

    ds = load_task(work / "data.tsv", split="train")
    model = AutoModelForCausalLM.from_pretrained(work / "llama", local_files_only=True)
    batches = build_calibration(ds, make_tokenizer(), model, "causal-lm", max_length=16, batch_size=8,
                                num_batches=2)
    batch = batches[0]
    assert batch["labels"].shape == batch["input_ids"].shape
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)


def test_info(work, capsys):
    assert main(["info", str(work / "bert")]) == 0
    out = capsys.readouterr().out
    assert "BertForSequenceClassification" in out and "24,482" in out
    assert "--mode uniform: ffn, layers" in out and "--mode global:  ffn, heads, layers" in out
    assert main(["info", str(work / "gpt2")]) == 0
    assert "not supported for structured pruning" in capsys.readouterr().out


def _prune_args(work: Path, *extra: str, model: str = "bert") -> list[str]:
    return ["prune", str(work / model), "--out", str(work / "never-written"), *extra]


BAD_ARGUMENTS = {
    "sparsity-too-big": (["--sparsity", "1.5", "--importance", "magnitude"],
                         "--sparsity 1.5: a sparsity is the fraction removed: a number in (0, 1)"),
    "sparsity-zero": (["--sparsity", "0", "--importance", "magnitude"], "--sparsity 0.0: a sparsity is the fraction"),
    "sparsity-per-structure": (["--sparsity", "ffn=1", "--importance", "magnitude"],
                               "--sparsity ffn=1.0: a sparsity is the fraction removed"),
    "sparsity-not-a-number": (["--sparsity", "half"], "--sparsity half: must be a number in (0, 1)"),
    "sparsity-repeated-key": (["--sparsity", "ffn=0.5,ffn=0.3"], "names 'ffn' twice"),
    "unknown-structure": (["--structures", "ffn,neurons", "--importance", "magnitude"],
                          "--structures ffn,neurons: unknown structure 'neurons'"),
    "unknown-importance": (["--importance", "entropy"], "--importance entropy: unknown criterion; choose one of "),
    "importance-module-missing": (["--importance", "no_such_module_here:entropy"],
                                  "--importance no_such_module_here:entropy: there is no module 'no_such_module_here'"),
    "importance-without-name": (["--importance", "my_criteria:"], "expected NAME or MODULE:NAME"),
    "taylor-without-data": ([], "needs --data"),
    "compensation-without-data": (["--importance", "magnitude", "--compensate-bias"],
                                  "--compensate-bias measures mean activations and needs --data"),
    "data-missing": (["--data", "nowhere.tsv"], "--data: 'nowhere.tsv' is not a known dataset name"),
    "heads-uniform-bert": (["--structures", "heads", "--importance", "magnitude"], "use global mode"),
    "bad-mode": (["--mode", "sideways"], "invalid choice: 'sideways'"),
    "zero-batches": (["--num-batches", "0"], "--num-batches must be a positive integer"),
    "zero-round-to": (["--round-to", "0", "--importance", "magnitude"], "--round-to 0: must be a positive integer"),
    "max-keep-uniform": (["--max-keep", "0.75", "--importance", "magnitude"],
                         "--max-keep 0.75: caps per-layer widths in global mode"),
    "max-keep-below-sparsity": (["--max-keep", "0.3", "--mode", "global", "--importance", "magnitude"],
                                "--max-keep 0.3: would remove more than the ffn sparsity 0.5: set it to at least 0.50"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_give_one_line(work, capsys, case):
    extra, expected = BAD_ARGUMENTS[case]
    _assert_one_line_error(main(_prune_args(work, *extra)), capsys, expected)


@pytest.mark.parametrize("argv,expected", [
    (["prune", "{w}/missing-model", "--out", "{w}/x"], "MODEL_DIR '{w}/missing-model' does not exist"),
    (["prune", "{w}/no-config", "--out", "{w}/x"], "has no config.json"),
    (["prune", "{w}/gpt2", "--out", "{w}/x", "--importance", "magnitude"],
     "model_type 'gpt2' is not supported for structured pruning; supported model types: bert, llama"),
    (["prune", "{w}/bert", "--out", "{w}/existing", "--importance", "magnitude"],
     "already exists; choose another folder or pass --overwrite"),
    (["prune", "{w}/bert", "--sparsity", "0.5"], "the following arguments are required: --out"),
    (["prune", "{w}/bert", "--out", "{w}/data.tsv/sub", "--importance", "magnitude"], "is a file, not a folder"),
    (["info", "{w}/missing-model"], "does not exist"),
    (["shrink"], "invalid choice: 'shrink'"),
])
def test_bad_paths_and_commands(work, capsys, argv, expected):
    argv = [a.format(w=work) for a in argv]
    _assert_one_line_error(main(argv), capsys, expected.format(w=work))


def _assert_one_line_error(rc: int, capsys, expected: str) -> None:
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("compress: error: ")
    assert expected in lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_runtime_failure_exits_1(work, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("compress.export.save_pretrained", disk_full)
    rc = main(_prune_args(work, "--importance", "magnitude", "--no-progress", "--max-length", "32"))
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.err.strip() == "compress: error: No space left on device"
    assert not (work / "never-written").exists()


def test_debug_reraises(work):
    from compress.pruning.spec import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="a sparsity is the fraction removed"):
        main(_prune_args(work, "--sparsity", "2", "--debug"))


def test_parse_sparsity():
    from compress.pruning.spec import InvalidOptionError, parse_sparsity

    assert parse_sparsity("0.25") == 0.25
    assert parse_sparsity("ffn=0.5, layers=0.25") == {"ffn": 0.5, "layers": 0.25}
    with pytest.raises(InvalidOptionError, match="names 'ffn' twice"):
        parse_sparsity("ffn=0.5,ffn=0.3")
    with pytest.raises(InvalidOptionError, match="the value for 'ffn' must be a number"):
        parse_sparsity("ffn=half")


def test_help_exits_zero_on_stdout_and_no_command_is_an_error(capsys):
    for command in ([], ["prune"], ["info"]):
        assert main([*command, "--help"]) == 0, command
        out, err = capsys.readouterr()
        assert out and not err, command
    assert main([]) == 2  # no command: the usage on stderr, nothing on stdout
    out, err = capsys.readouterr()
    assert err and not out


@pytest.mark.slow
def test_python_m_compress_subprocess(work):
    out = work / "bert-subprocess"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "compress", "prune", str(work / "bert"), "--out", str(out), "--sparsity", "0.5",
         "--structures", "ffn", "--importance", "taylor", "--data", str(work / "data.tsv"), "--max-length",
         "32", "--num-batches", "2", "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "parameters" in proc.stdout and (out / "model.safetensors").is_file()


def test_summary_rows_and_widths():
    from compress.pruning.engine import PruneReport

    report = PruneReport(model_type="llama", mode="global", importance="l1", sparsity={"heads": 0.5},
                         params_before=100, params_after=60,
                         widths_before={"ffn": [8, 8], "heads": [4, 4], "kv_heads": [2, 2], "layers": [2]},
                         widths_after={"ffn": [8, 8], "heads": [2, 2], "layers": [2]})
    rows = {row[""]: row for row in summary_rows(report, 1000, 500, 16)}
    assert rows["parameters"]["kept"] == "60.0%"
    assert rows["FLOPs, one 1x16 forward"]["after"] == 500
    # kv heads equal to the query heads after pruning are not listed separately by the adapter
    assert rows["kv heads per layer"]["after"] == "2 (all 2)"
    assert format_widths([30, 34]) == "[30, 34]"
    assert format_widths(list(range(1, 33))).startswith("1..32, mean 16.5")


CRITERION_MODULE = """
import compress
from compress.pruning.importance import MagnitudeImportance


class Reversed(MagnitudeImportance):
    def __call__(self, unit, stats):
        return -super().__call__(unit, stats)


compress.register_importance("reversed_magnitude", Reversed)
"""


@pytest.fixture
def criteria_module(tmp_path, monkeypatch):
    """A module of the user's, ``my_criteria.py`` in the current folder, that registers ``reversed_magnitude``; the
    criteria registered during the test are forgotten afterwards."""
    from compress.pruning import importance

    monkeypatch.setattr(importance, "_IMPORTANCES", dict(importance._IMPORTANCES))
    (tmp_path / "my_criteria.py").write_text(CRITERION_MODULE, encoding="utf-8")
    (tmp_path / "registers_nothing.py").write_text("VALUE = 1\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in ("my_criteria", "registers_nothing"):
        sys.modules.pop(name, None)


def test_importance_takes_a_criterion_that_a_module_registers(work, criteria_module, capsys):
    out = criteria_module / "reversed"
    assert main(["prune", str(work / "bert"), "--out", str(out), "--sparsity", "0.25", "--importance",
                 "my_criteria:reversed_magnitude", "--no-progress"]) == 0
    assert json.loads((out / "compress_report.json").read_text())["importance"] == "reversed_magnitude"
    assert "reversed_magnitude importance" in capsys.readouterr().out
    assert str(criteria_module) not in sys.path  # the current folder was on the path for the import only
    # once registered (here by the import above), the plain name works as well
    assert main(["prune", str(work / "bert"), "--out", str(criteria_module / "again"), "--sparsity", "0.25",
                 "--importance", "reversed_magnitude", "--no-progress"]) == 0


def test_importance_refuses_a_module_that_registers_no_such_criterion(work, criteria_module, capsys):
    _assert_one_line_error(main(_prune_args(work, "--importance", "registers_nothing:entropy")), capsys,
                           "--importance registers_nothing:entropy: registers_nothing registers no criterion "
                           "'entropy'")


@pytest.mark.slow
def test_help_and_argument_errors_import_no_torch():
    script = ("import sys; from compress.cli import main; codes = [main(['--help']), main(['prune', '--help']), "
              "main(['prune', 'm', '--out', 'o', '--mode', 'sideways'])]; "
              "assert codes == [0, 0, 2], codes; "
              "heavy = {'torch', 'transformers', 'peft', 'datasets'} & set(sys.modules); assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "invalid choice: 'sideways'" in proc.stderr
