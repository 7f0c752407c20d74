"""The command line on decoder LLMs: `compress prune` calibrating on text with the decoder options (--reconstruct,
--damping, --min-keep, --seed), then `compress eval`, the same commands on a tiny Llama and a tiny Qwen2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compress
from compress.cli import main
from tests import tiny
from tests.test_text import counting_text, word_tokenizer

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def char_tokenizer():
    """A byte-level Qwen2 tokenizer whose tokens are single characters of the counting text (AutoTokenizer gives a
    Qwen2 folder a Qwen2Tokenizer whatever tokenizer was saved with it)."""
    from transformers import Qwen2Tokenizer

    chars = ["<|endoftext|>", "\u0120", "\u010a", "t", *"0123456789"]  # \u0120: space, \u010a: newline
    return Qwen2Tokenizer(vocab={c: i for i, c in enumerate(chars)}, merges=[])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("decoders")
    for name, tokenizer in (("llama", word_tokenizer()), ("qwen2", char_tokenizer()), ("bert", word_tokenizer()),
                            ("t5", word_tokenizer())):
        tiny.make_model(name).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "text.txt").write_text(counting_text(12_000), encoding="utf-8")
    return root


def _run(argv: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(argv: list, capsys) -> str:
    rc, out, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("compress: error: "), err
    assert out == ""
    return lines[0]


@pytest.mark.parametrize("arch,notes", [
    ("llama", ["note: mlp_bias enabled: down_proj biases carry the compensation; gate_proj/up_proj biases are zero",
               "note: mlp.down_proj kept weights and biases refit by ridge least squares (damping 0.05) on 256 "
               "calibration tokens, block by block on the pruned stream"]),
    ("qwen2", ["note: mlp.down_proj kept weights refit by ridge least squares (damping 0.05) on 256 calibration "
               "tokens, block by block on the pruned stream, without a bias (uncentred: the qwen2 config cannot give "
               "these projections one)"]),
])
def test_prune_on_text_then_eval_run_unchanged_on_llama_and_qwen2(work, capsys, arch, notes):
    pruned, result_file = work / f"{arch}-ffn50", work / f"{arch}-ppl.json"
    text = work / "text.txt"
    rc, out, err = _run(["prune", work / arch, "--out", pruned, "--sparsity", "0.5", "--importance", "flap",
                         "--reconstruct", "least_squares", "--damping", "0.05", "--data", text, "--num-batches", "2",
                         "--batch-size", "4", "--max-length", "32", "--seed", "1", "--no-progress"], capsys)
    assert rc == 0, err
    assert (f"calibration: 8 rows x 32 tokens from {text} (the whole file, line endings normalised to \\n), "
            "seed 1") in out
    assert [line for line in out.splitlines() if line.startswith("note: ")] == notes
    assert "flap importance, least_squares reconstruction" in out

    rc, out, err = _run(["eval", pruned, "--data", text, "--max-tokens", "600", "--window", "32", "--out",
                         result_file, "--no-progress"], capsys)
    assert rc == 0, err
    saved = json.loads(result_file.read_text(encoding="utf-8"))
    assert saved["protocol"] == {"tokens": 600, "text_tokens": saved["protocol"]["text_tokens"],
                                 "scored_tokens": 600 - 19, "windows": 19, "window": 32, "stride": 32,
                                 "max_tokens": 600, "dtype": "float32", "source": str(text),
                                 "handling": "the whole file, line endings normalised to \\n"}
    assert saved["model"] == str(pruned) and saved["model_class"].endswith("ForCausalLM")
    assert out.splitlines()[0] == f"perplexity: {saved['perplexity']:.2f} (loss {saved['loss']:.4f} nats per token)"
    assert out.splitlines()[1] == ("protocol:   first 600 tokens of " f"{text} (the whole file, line endings "
                                   "normalised to \\n), 19 windows of 32 (non-overlapping), 581 tokens scored, float32")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pruned)
    expected = compress.evaluate_perplexity(model, AutoTokenizer.from_pretrained(pruned), compress.data.load_text(text),
                                            max_tokens=600, window=32)
    assert saved["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)


def test_text_calibration_defaults_to_128_rows_of_512_capped_at_the_positions(work, capsys):
    rc, out, err = _run(["prune", work / "llama", "--out", work / "llama-default", "--sparsity", "0.25",
                         "--importance", "wanda_sp", "--data", work / "text.txt", "--no-progress"], capsys)
    assert rc == 0, err
    assert "calibration: 128 rows x 64 tokens from" in out  # 512 asked by default, 64 positions
    assert err == ""  # the default length is capped without a warning; 12,000 tokens hold the rows without overlap


def test_eval_loads_a_compact_global_folder(work, capsys):
    rc, out, err = _run(["prune", work / "llama", "--out", work / "llama-global", "--sparsity", "0.5", "--mode",
                         "global", "--min-keep", "0.25", "--importance", "flap", "--data", work / "text.txt",
                         "--max-length", "16", "--num-batches", "1", "--no-progress"], capsys)
    assert rc == 0, err
    assert json.loads((work / "llama-global" / "config.json").read_text())["model_type"] == "compressed_llama"
    rc, out, err = _run(["eval", work / "llama-global", "--data", work / "text.txt", "--window", "64",
                         "--max-tokens", "256", "--no-progress"], capsys)
    assert rc == 0, err
    assert "(CompressedLlamaForCausalLM" in out


def test_param_sparsity_lets_the_ranking_share_a_parameter_budget(work, capsys):
    rc, out, err = _run(["prune", work / "llama", "--out", work / "llama-budget", "--param-sparsity", "0.2",
                         "--structures", "ffn,heads", "--mode", "global", "--normalize", "standardize", "--importance",
                         "flap", "--data", work / "text.txt", "--num-batches", "1", "--batch-size", "4",
                         "--max-length", "32", "--no-progress"], capsys)
    assert rc == 0, err
    saved = json.loads((work / "llama-budget" / "compress_report.json").read_text())
    assert saved["param_sparsity"] == 0.2
    assert f"parameters removed: {saved['achieved_param_sparsity']:.1%} (asked 20.0%" in out
    assert not err  # no warning about a sparsity the allocation chose


def test_eval_out_is_new_or_an_earlier_result(work, capsys):
    result = work / "result.json"
    argv = ["eval", work / "llama", "--data", work / "text.txt", "--window", "16", "--max-tokens", "64", "--out",
            result, "--no-progress"]
    assert _run(argv, capsys)[0] == 0
    first = json.loads(result.read_text())
    assert "already exists; choose another file or pass --overwrite" in _one_line_error(argv, capsys)
    assert _run([*argv[:-1], "--stride", "8", "--overwrite", "--no-progress"], capsys)[0] == 0
    assert json.loads(result.read_text())["protocol"]["stride"] == 8 != first["protocol"]["stride"]
    notes = work / "notes.json"
    notes.write_text('{"mine": 1}', encoding="utf-8")
    message = _one_line_error([*argv[:6], "--out", notes, "--overwrite"], capsys)
    assert "exists and is not a result of compress eval" in message
    assert notes.read_text(encoding="utf-8") == '{"mine": 1}'


EVAL_ERRORS = {
    "stride-above-window": (["--data", "{w}/text.txt", "--window", "16", "--stride", "32"],
                            "--stride 32 is larger than --window 16"),
    "window-above-positions": (["--data", "{w}/text.txt", "--window", "100"],
                               "--window 100 exceeds the model's 64 positions; use at most 64"),
    "zero-max-tokens": (["--data", "{w}/text.txt", "--max-tokens", "0"], "--max-tokens must be a positive integer"),
    "bad-dtype": (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    "missing-text": (["--data", "{w}/nowhere.txt", "--window", "16"], "'{w}/nowhere.txt' does not exist"),
    "out-is-the-text": (["--data", "{w}/text.txt", "--window", "16", "--out", "{w}/text.txt", "--overwrite"],
                        "is one of the inputs"),
}


@pytest.mark.parametrize("case", sorted(EVAL_ERRORS))
def test_eval_bad_arguments_give_one_line(work, capsys, case):
    extra, expected = EVAL_ERRORS[case]
    message = _one_line_error(["eval", work / "llama", *(a.format(w=work) for a in extra)], capsys)
    assert expected.format(w=work) in message


def test_eval_without_data_reads_wikitext_from_the_hub_and_says_what_to_do_offline(work, capsys, monkeypatch):
    import datasets

    asked = []

    def offline(name, config_name, split):
        asked.append((name, config_name, split))
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = _one_line_error(["eval", work / "llama", "--window", "64"], capsys)
    assert asked == [("wikitext", "wikitext-2-raw-v1", "test")]
    assert "cannot load the Hub dataset wikitext, wikitext-2-raw-v1, split test" in message
    assert "pass a local text file or save_to_disk folder instead (--data FILE on the command line)" in message


def test_eval_refuses_what_is_not_a_causal_lm_and_an_unreachable_hub_model(work, capsys, monkeypatch):
    message = _one_line_error(["eval", work / "bert", "--data", work / "text.txt"], capsys)
    assert "holds a BertForSequenceClassification (sequence-classification): compress eval measures the " \
           "perplexity of causal LMs" in message
    import transformers

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreachable)
    message = _one_line_error(["eval", "some-user/some-model", "--data", work / "text.txt"], capsys)
    assert "MODEL 'some-user/some-model' is no local folder, and loading it from the Hub failed" in message


PRUNE_ERRORS = {
    "unknown-reconstruction": (["--reconstruct", "obs"], "argument --reconstruct: invalid choice: 'obs' (choose from"),
    "damping-without-reconstruct": (["--damping", "0.1"], "--damping 0.1: is the ridge of reconstruct"),
    "zero-damping": (["--reconstruct", "least_squares", "--damping", "0"], "--damping 0.0: the ridge of least-squares "
                     "reconstruction must be a positive number"),
    "min-keep-in-uniform-mode": (["--min-keep", "0.2"], "--min-keep 0.2: sets a floor on per-layer widths in global"),
    "min-keep-above-the-kept-share": (["--mode", "global", "--min-keep", "0.8"],
                                      "--min-keep 0.8: leaves too little to remove the ffn sparsity 0.5"),
    "negative-seed": (["--seed", "-1"], "--seed must be a non-negative integer"),
    "reconstruct-without-data": (["--importance", "magnitude", "--reconstruct", "least_squares"],
                                 "--reconstruct least_squares refits the kept weights on calibration activations "
                                 "and needs --data (a text file, e.g. --data valid.tokens.txt)"),
    "text-column-missing": (["--data", "{w}/rows.jsonl", "--text-column", "body"],
                            "has no column 'body' (columns: text)"),
    "empty-text": (["--data", "{w}/empty.txt"], "empty.txt holds no text"),
    "param-sparsity-with-sparsity": (["--param-sparsity", "0.2", "--sparsity", "0.3"],
                                     "--param-sparsity 0.2: replaces sparsity"),
}


@pytest.mark.parametrize("case", sorted(PRUNE_ERRORS))
def test_prune_decoder_flags_are_validated_before_loading(work, capsys, monkeypatch, case):
    import transformers

    (work / "rows.jsonl").write_text('{"text": "t1 t2"}\n', encoding="utf-8")
    (work / "empty.txt").write_text("", encoding="utf-8")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("loaded the model"))
    extra, expected = PRUNE_ERRORS[case]
    data = [] if "--data" in extra or case.endswith("without-data") else ["--data", "{w}/text.txt"]
    argv = ["prune", work / "llama", "--out", work / "never", "--importance", "flap", *data, *extra]
    assert expected.format(w=work) in _one_line_error([str(a).format(w=work) for a in argv], capsys)


@pytest.mark.parametrize("model,extra,expected", [
    ("qwen2", ["--compensate-bias", "--reconstruct", "least_squares"],
     "qwen2: the FFN output projections have no bias and the qwen2 config cannot give them one"),
    ("t5", ["--reconstruct", "least_squares"], "t5: reconstruct='least_squares' runs one stack's blocks one at a time"),
])
def test_what_a_family_cannot_do_is_refused_before_loading(work, capsys, monkeypatch, model, extra, expected):
    import transformers

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM):
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    message = _one_line_error(["prune", work / model, "--out", work / "never", "--importance", "flap", "--data",
                               work / "text.txt", *extra], capsys)
    assert expected in message


def test_info_says_which_decoder_options_apply(work, capsys):
    assert main(["info", str(work / "llama")]) == 0
    out = capsys.readouterr().out
    assert "  --reconstruct least_squares  refits kept weights and biases (sets mlp_bias / attention_bias)" in out
    assert "  --data                       text, 128 rows x 512 tokens by default" in out
    assert main(["info", str(work / "qwen2")]) == 0
    out = capsys.readouterr().out
    assert "  --reconstruct least_squares  refits kept weights, without a bias (the qwen2 config cannot hold one" in out
    assert "  --compensate-bias            not available (the qwen2 config cannot give" in out


# -- slow: the installed entry point, and a real model ----------------------------------------------------------------
def _compress(*argv, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "compress", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prune_and_eval_through_the_entry_point(work, arch):
    pruned, result = work / f"{arch}-subprocess", work / f"{arch}-subprocess.json"
    proc = _compress("prune", work / arch, "--out", pruned, "--sparsity", "0.5", "--structures", "ffn,kv_heads",
                     "--importance", "flap", "--reconstruct", "least_squares", "--data", work / "text.txt",
                     "--num-batches", "2", "--batch-size", "4", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "calibration: 8 rows x 64 tokens from" in proc.stdout
    proc = _compress("eval", pruned, "--data", work / "text.txt", "--window", "64", "--stride", "32", "--out", result,
                     "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(result.read_text())["protocol"]["stride"] == 32
    proc = _compress("eval", pruned, "--window", "64")  # no network here: the default text names the fix
    assert proc.returncode == 2 and "pass a local text file" in proc.stderr


def smollm2_folder() -> Path:
    """The SmolLM2-135M folder of the slow tests on a real model: COMPRESS_TEST_SMOLLM2 (COMPRESS_SMOLLM2 is read
    too), else ../scratch/smollm2; the test is skipped when it holds no model."""
    folder = Path(os.environ.get("COMPRESS_TEST_SMOLLM2") or os.environ.get("COMPRESS_SMOLLM2")
                  or REPO.parent / "scratch" / "smollm2")
    if not (folder / "config.json").is_file():
        pytest.skip(f"no SmolLM2-135M folder at {folder} (set COMPRESS_TEST_SMOLLM2 to one written by "
                    "../shared/tools/smollm2_to_hf.py)")
    return folder


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity_matches_a_hand_computation(tmp_path):
    """The documented protocol (docs/decoders.md) on the real model: `compress eval` against the plain recipe
    written out here (raw test file, CRLF -> LF, lines joined with blank lines, 16 windows of 512)."""
    folder = smollm2_folder()
    raw = SHARED_DATA / "wikitext2" / "wiki.test.raw"
    if not raw.is_file():
        pytest.skip(f"no WikiText-2 test file at {raw}")
    result = tmp_path / "dense.json"
    proc = _compress("eval", folder, "--data", raw, "--max-tokens", "8192", "--window", "512", "--out", result,
                     "--no-progress", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(result.read_text())
    assert (saved["protocol"]["windows"], saved["protocol"]["scored_tokens"]) == (16, 16 * 511)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with raw.open(encoding="utf-8", newline="") as handle:  # newline="": the line endings as written
        lines = handle.read().replace("\r\n", "\n").split("\n")
    ids = AutoTokenizer.from_pretrained(folder)("\n\n".join(lines).rstrip("\n"))["input_ids"][:8192]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    nll = 0.0
    with torch.no_grad():
        for start in range(0, 8192, 512):
            window = torch.tensor([ids[start:start + 512]])
            logits = model(input_ids=window).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
    expected = float(torch.exp(torch.tensor(nll / (16 * 511), dtype=torch.float64)))
    print(f"SmolLM2-135M dense WikiText-2 perplexity: {saved['perplexity']:.2f}")
    assert saved["perplexity"] == pytest.approx(expected, rel=1e-5)
