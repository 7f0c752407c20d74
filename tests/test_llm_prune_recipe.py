"""recipes/llm_prune.py: prune a decoder, evaluate, recover with LoRA (optionally distilling the dense model's
logits), evaluate again, merge and save, on a tiny Llama and a tiny Qwen2 with tiny tokenizers and texts written here;
its refusals; the recovery loop's pieces (common.causal_lm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import compress
from common.causal_lm import DistilledCausalLM, distillation_loss, lora_config, train_causal_lm, training_batches
from compress.cli import UsageError
from recipes import llm_prune
from tests import tiny
from tests.test_cli_decoders import char_tokenizer, smollm2_folder
from tests.test_text import counting_text, word_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _lines(words: list[str]) -> str:
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)) + "\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llm_prune")
    for name, tokenizer in (("llama", word_tokenizer()), ("qwen2", char_tokenizer())):
        tiny.make_model(name).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "train.txt").write_text(counting_text(4_000), encoding="utf-8")
    # the evaluation text: other sequences of the same words, in no part of the training text
    (root / "eval.txt").write_text(_lines([f"t{(7 * i) % 100}" for i in range(600)]), encoding="utf-8")
    return root


def _argv(work: Path, arch: str, out: Path, *extra: str, calibration: bool = True) -> list[str]:
    calibrate = ["--calib-rows", "8", "--calib-length", "32"] if calibration else []
    return ["--model", str(work / arch), "--data", str(work / "train.txt"), "--eval-data", str(work / "eval.txt"),
            *calibrate, "--window", "32", "--eval-max-tokens", "256", "--batch-size", "2", "--seq-len", "32", "--out",
            str(out), "--no-progress", *extra]


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.inference_mode():
        return model.eval()(input_ids=ids).logits


def _lora_parameters(model: nn.Module, r: int) -> int:
    """What rank-``r`` LoRA on every attention and FFN projection of ``model`` trains."""
    from compress.pruning.arch import arch_spec

    names = arch_spec(model).projection_names
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in names)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prune_recover_with_distilled_lora_and_save_a_folder_stock_transformers_reloads(work, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"steps": 9, "lr": 0.01, "eval_every": 2, "r": 4}), encoding="utf-8")
    out = tmp_path / "run"
    result = llm_prune.run(_argv(work, arch, out, "--config", str(config), "--steps", "3", "--sparsity", "0.5",
                                 "--structures", "ffn", "--importance", "flap", "--reconstruct", "least_squares",
                                 "--distill-weight", "0.5", "--distill-temperature", "2"))
    metrics = result.metrics
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8")) == json.loads(json.dumps(metrics))
    resolved = json.loads((out / "resolved_config.json").read_text(encoding="utf-8"))
    assert (resolved["steps"], resolved["lr"], resolved["r"]) == (3, 0.01, 4)  # the flag wins over the file
    recovery = metrics["recovery"]
    assert recovery["steps"] == 3 and len(recovery["losses"]) == 3
    assert all(set(terms) == {"ce", "kl"} for terms in recovery["loss_terms"])
    assert recovery["trainable_params"] == _lora_parameters(result.model, 4)  # gradients reach the adapters only
    assert [point["step"] for point in metrics["curve"]] == [0, 2, 3]
    assert metrics["perplexity_dense"] > 1 and metrics["perplexity_recovered"] != metrics["perplexity_pruned"]
    assert metrics["params_pruned"] < metrics["params_dense"] == tiny.make_model(arch).num_parameters()
    assert metrics["prune"]["widths_after"]["ffn"] == [32, 32] and metrics["loads"] == "in stock transformers"
    assert metrics["seconds_per_step"]["mean"] > 0 and metrics["train_peak_rss_mb"] > 0

    saved = AutoModelForCausalLM.from_pretrained(result.saved)
    assert saved.config.model_type == arch and type(saved).__module__.startswith("transformers.models.")
    assert torch.equal(_logits(saved), _logits(result.model))
    card = (result.saved / "README.md").read_text(encoding="utf-8")
    assert "recovered with LoRA" in card and "recovered: LoRA r=4" in card and "KL from the dense model" in card


def test_a_global_folder_is_recovered_and_reloads_after_import_compress(work, tmp_path):
    from transformers import AutoModelForCausalLM

    result = llm_prune.run(_argv(work, "llama", tmp_path / "run", "--steps", "1", "--sparsity", "0.5", "--mode",
                                 "global", "--min-keep", "0.25", "--importance", "flap", "--skip-dense-eval"))
    assert result.metrics["loads"] == "after `import compress`" and result.metrics["perplexity_dense"] is None
    saved = AutoModelForCausalLM.from_pretrained(result.saved)  # compress is imported: its compact classes load
    assert saved.config.model_type == "compressed_llama"
    assert torch.equal(_logits(saved), _logits(result.model))


def test_a_folder_from_compress_prune_is_recovered_without_pruning_again(work, tmp_path, monkeypatch, capsys):
    from compress.cli import main

    pruned = tmp_path / "pruned"
    assert main(["prune", str(work / "qwen2"), "--out", str(pruned), "--sparsity", "0.5", "--importance", "wanda_sp",
                 "--data", str(work / "train.txt"), "--num-batches", "1", "--batch-size", "4", "--max-length", "32",
                 "--no-progress"]) == 0

    def prune_again(*args, **kwargs):
        raise AssertionError("--pruned must not prune again")

    monkeypatch.setattr(compress, "prune_model", prune_again)
    result = llm_prune.run(_argv(work, "qwen2", tmp_path / "run", "--pruned", str(pruned), "--steps", "2",
                                 calibration=False))
    report = json.loads((pruned / "compress_report.json").read_text(encoding="utf-8"))
    assert result.metrics["pruned_from"] == str(pruned)
    assert (result.metrics["params_dense"], result.metrics["params_pruned"]) == (report["params_before"],
                                                                                 report["params_after"])
    assert result.metrics["prune"]["widths_after"] == report["widths_after"]
    assert result.metrics["perplexity_dense"] > 1  # the dense model, loaded from --model for its evaluation
    assert f"pruned: {pruned} (removed ffn 50%" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (("--eval-data", "{work}/train.txt"), "hold the same text (or one holds the other); never train or calibrate on "
                                          "the evaluation text"),
    (("--eval-data", "{tmp}/copy.txt"), "hold the same text"),
    (("--out", "{tmp}/file"), "--out {tmp}/file is a file, not a folder"),
    (("--bogus", "1"), "unrecognized arguments: --bogus 1"),
    (("--pruned", "{work}/llama", "--sparsity", "0.3"),
     "is a pruned folder; --sparsity would prune again: give --pruned or pruning options, not both"),
    (("--pruned", "{work}/llama"), "has no compress_report.json: pass a folder written by `compress prune`"),
    (("--recover", "none", "--distill-weight", "0.5"), "--distill-weight applies to recovery training"),
    (("--seq-len", "128"), "--seq-len 128 exceeds the 64 positions of"),
    (("--sparsity", "2"), "--sparsity 2.0: a sparsity is the fraction removed"),
])
def test_a_bad_run_is_refused_in_one_line_before_any_work(work, tmp_path, capsys, extra, message):
    (tmp_path / "copy.txt").write_text((work / "train.txt").read_text(encoding="utf-8")[:5000], encoding="utf-8")
    (tmp_path / "file").write_text("", encoding="utf-8")
    argv = [a.format(work=work, tmp=tmp_path) for a in _argv(work, "llama", tmp_path / "run",
                                                             calibration="--pruned" not in extra)]
    extra = [a.format(work=work, tmp=tmp_path) for a in extra]
    if "--eval-data" in extra:  # replaces the default one
        del argv[argv.index("--eval-data"):argv.index("--eval-data") + 2]
    if "--out" in extra:
        del argv[argv.index("--out"):argv.index("--out") + 2]
    with pytest.raises(SystemExit) as exit_info:
        llm_prune.run([*argv, *extra])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and last.startswith("llm_prune.py: error: ")
    assert message.format(work=work, tmp=tmp_path) in last, last
    assert not (tmp_path / "run").exists()


def test_a_run_needs_its_recovery_text(work, tmp_path, capsys):
    with pytest.raises(SystemExit):
        llm_prune.run(["--model", str(work / "llama"), "--out", str(tmp_path / "run")])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "llm_prune.py: error: --data is required: the calibration and recovery text (a text file or dataset), e.g. "
        "--data valid.tokens.txt; never the text you evaluate on")


def _help_section(text: str, title: str) -> str:
    """The lines of a --help text's group ``title``, up to the next group, whitespace folded (wrapping differs)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
    return " ".join(" ".join(lines[start + 1:end]).split())


def test_the_recipe_takes_every_pruning_option_of_compress_prune_with_its_help(capsys):
    import argparse

    from compress.cli import main
    from compress.cli.parser import add_prune_options

    assert main(["prune", "--help"]) == 0
    command = _help_section(capsys.readouterr().out, "what to prune:")
    recipe = _help_section(llm_prune.build_parser().format_help(), "pruning (the options of `compress prune`)")
    assert recipe.startswith(command)  # the same flags, metavars, help and defaults, then the recipe's own
    flags = [flag for action in add_prune_options(argparse.ArgumentParser()) for flag in action.option_strings]
    assert len(flags) == len(llm_prune.PRUNE_OPTIONS) == 12 and all(flag in command for flag in flags)


def test_the_recipes_use_no_private_names_of_other_modules():
    import ast

    recipes = REPO / "recipes"
    for path in [recipes / "llm_prune.py", recipes / "benchmark.py", *sorted((recipes / "bench").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                assert owner == "self", f"{path.name}:{node.lineno} reads {ast.unparse(node)}"


def test_recovery_rows_that_repeat_the_text_are_named_as_such(caplog):
    import argparse
    import logging

    from compress.data import Corpus, calibration_rows

    tokenizer = word_tokenizer()
    corpus = Corpus(text=counting_text(300), source="short.txt", handling="as is")
    args = argparse.Namespace(steps=20, batch_size=4, seq_len=32, seed=0, recovery_seed=None)
    expected = calibration_rows(corpus, tokenizer, num_rows=80, length=32, seed=1)  # the rows drawn before
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rows = llm_prune.recovery_rows(args, corpus, tokenizer)
    assert torch.equal(rows, expected)
    assert "the recovery rows overlap: 20 steps x 4 rows x 32 tokens = 2,560 training tokens, drawn at random " \
           "offsets of the" in caplog.text and "tokens of --data short.txt" in caplog.text
    assert "fewer --steps, --batch-size or --seq-len" in caplog.text
    assert "calibration" not in caplog.text and logging.getLogger("compress.data").level == logging.NOTSET
    caplog.clear()
    llm_prune.recovery_rows(argparse.Namespace(**{**vars(args), "steps": 1}), corpus, tokenizer)
    assert not caplog.text  # enough text: nothing to say
    with pytest.raises(UsageError, match="--data short.txt has .* tokens, fewer than one recovery row of --seq-len "
                                         "100000: give more text or a smaller --seq-len"):
        llm_prune.recovery_rows(argparse.Namespace(**{**vars(args), "seq_len": 100_000}), corpus, tokenizer)


# -- the recovery loop ------------------------------------------------------------------------------------------------
def test_distillation_loss_is_the_softened_kl_and_mixes_with_the_language_model_loss():
    student, teacher = torch.randn(2, 5, 11, requires_grad=True), torch.randn(2, 5, 11)
    for temperature in (1.0, 2.0):
        p = torch.softmax(teacher / temperature, -1)
        expected = (p * (p.log() - torch.log_softmax(student / temperature, -1))).sum(-1).mean() * temperature ** 2
        loss = distillation_loss(student, teacher, temperature)
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        assert torch.allclose(*(torch.autograd.grad(value, student)[0] for value in (loss, expected)), atol=1e-6)
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)

    model, dense = tiny.make_model("llama", seed=0), tiny.make_model("llama", seed=1)
    batch = training_batches(torch.randint(2, 100, (2, 16)), 2)[0]
    out = DistilledCausalLM(model, dense, weight=0.25, temperature=temperature)(**batch)
    with torch.no_grad():
        ce = model(**batch).loss
        kl = distillation_loss(model(input_ids=batch["input_ids"]).logits, dense(input_ids=batch["input_ids"]).logits,
                               temperature)
    assert float(out.loss) == pytest.approx(float(0.75 * ce + 0.25 * kl), rel=1e-5)
    assert "teacher" not in dict(DistilledCausalLM(model, dense, 1.0).named_modules())  # never trained or saved


def test_recovery_trains_the_adapters_only():
    from peft import get_peft_model

    model = get_peft_model(tiny.make_model("llama"), lora_config(tiny.make_model("llama"), r=4))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    stats = train_causal_lm(model, training_batches(torch.randint(2, 100, (4, 16)), 2), lr=1e-2, warmup_steps=1,
                            progress=False)
    assert stats.steps == 2 and len(stats.step_seconds) == 2 and all(name.count("lora_") for name in adapters)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert any(not torch.equal(p, adapters[name]) for name, p in model.named_parameters() if name in adapters)


# -- slow: fresh processes, a real model --------------------------------------------------------------------------
def _python(code: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
if sys.argv[3] == "compress":
    import compress
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.inference_mode():
    logits = model(input_ids=torch.arange(2, 34).reshape(2, 16)).logits
assert torch.equal(logits, torch.load(sys.argv[2])), (logits - torch.load(sys.argv[2])).abs().max()
print(type(model).__name__, "compress" in sys.modules)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "expected"), [("uniform", "LlamaForCausalLM False"),
                                                ("global", "CompressedLlamaForCausalLM True")])
def test_the_saved_folder_reloads_in_a_fresh_process_with_identical_logits(work, tmp_path, mode, expected):
    extra = ("--mode", "global", "--min-keep", "0.25") if mode == "global" else ()
    result = llm_prune.run(_argv(work, "llama", tmp_path / "run", "--steps", "2", "--sparsity", "0.5", "--importance",
                                 "flap", "--reconstruct", "least_squares", "--skip-dense-eval", *extra))
    torch.save(_logits(result.model), tmp_path / "logits.pt")
    done = _python(_RELOAD, str(result.saved), str(tmp_path / "logits.pt"), "compress" if mode == "global" else "-")
    assert done.returncode == 0 and done.stdout.split("\n")[0] == expected, done.stderr[-2000:]


@pytest.mark.slow
def test_measure_full_ft_compares_lora_with_full_fine_tuning_in_fresh_processes(work, tmp_path):
    result = llm_prune.run(_argv(work, "llama", tmp_path / "run", "--steps", "1", "--sparsity", "0.5", "--importance",
                                 "wanda_sp", "--distill-weight", "0.5", "--measure-full-ft"))
    memory = result.metrics["memory"]
    assert memory["lora"]["trainable_params"] == result.metrics["recovery"]["trainable_params"]
    assert memory["full"]["trainable_params"] == result.metrics["params_pruned"]
    assert memory["full"]["increase_mb"] > 0 and memory["lora_vs_full"] == pytest.approx(
        memory["lora"]["increase_mb"] / memory["full"]["increase_mb"])


@pytest.mark.slow
def test_smollm2_recovery_runs_on_the_real_model(tmp_path):
    """A few steps on SmolLM2-135M (COMPRESS_TEST_SMOLLM2: a folder written by ../shared/tools/smollm2_to_hf.py) with
    the WikiText-2 files of ../shared/data: the pipeline holds on a real model; the figures are the docs' business."""
    folder = str(smollm2_folder())
    text = SHARED_DATA / "wikitext2"
    if not (text / "valid.tokens.txt").is_file() or not (text / "wiki.test.raw").is_file():
        pytest.skip(f"no WikiText-2 files in {text}")
    result = llm_prune.run(["--model", folder, "--data", str(text / "valid.tokens.txt"), "--eval-data",
                            str(text / "wiki.test.raw"), "--eval-max-tokens", "1024", "--window", "256",
                            "--sparsity", "0.3", "--structures", "ffn", "--importance", "flap", "--reconstruct",
                            "least_squares", "--calib-rows", "8", "--calib-length", "128", "--steps", "2",
                            "--batch-size", "1", "--seq-len", "128", "--distill-weight", "0.5",
                            "--out", str(tmp_path / "run"), "--no-progress"])
    metrics = result.metrics
    assert metrics["perplexity_dense"] < metrics["perplexity_pruned"] < 10 * metrics["perplexity_dense"]
    assert metrics["reload_max_abs_diff"] == 0 and metrics["loads"] == "in stock transformers"
