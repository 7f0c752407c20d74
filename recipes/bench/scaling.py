"""The scaling section: time and peak memory of ``compress prune`` (the command line, in its own process) on random
Llama-shaped models of about 0.1B, 0.4B and 1B parameters, with a data-free criterion (``magnitude``) and a
calibrated one (``flap`` on a text file), removing 30% of every FFN layer's neurons.

Each row builds its random model (float32, seeded) in the row's process, saves it with a word-level tokenizer built
from the calibration text, runs ``compress prune`` on it and reads the command's peak RSS from
``getrusage(RUSAGE_CHILDREN)``: what pruning that model costs, loading and saving included, against the size of its
weights (the engine should need about one copy of the model, not two).
"""

from __future__ import annotations

import collections
import gc
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import Row, RowSkipped

FUNCTION = "bench.scaling:run_row"
TITLE = "Scaling"
#: Llama shapes: (hidden, layers, heads, kv heads, FFN width); vocabulary 32,000
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (32, 2, 4, 2, 64),
    "0.1b": (768, 12, 12, 4, 2048),
    "0.4b": (1024, 24, 16, 8, 3072),
    "1b": (2048, 16, 32, 8, 8192),
}
VOCAB = 32000
CRITERIA = ("magnitude", "flap")
FULL = {"sizes": ["0.1b", "0.4b", "1b"], "sparsity": 0.3, "calib_rows": 32, "calib_length": 256, "calib_batch": 8}
QUICK = {**FULL, "sizes": ["0.1b"], "calib_rows": 8, "calib_length": 128, "calib_batch": 4}


def rows(settings: dict[str, Any]) -> list[Row]:
    """Every size x criterion, in one exclusive lane: the large models' memory and the timings are the point, so
    no other row runs beside them."""
    group = f"Llama-shaped random models, FFN {settings['sparsity']:.0%} uniform, compress prune"
    return [Row(track="scaling", group=group, method=f"{size}, {criterion}", function=FUNCTION,
                kwargs={"size": size, "criterion": criterion, "settings": settings}, lane="scaling", exclusive=True)
            for size in settings["sizes"] for criterion in CRITERIA]


def config_for(size: str):
    from transformers import LlamaConfig

    hidden, layers, heads, kv_heads, ffn = SIZES[size]
    vocab = 128 if size == "tiny" else VOCAB
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def word_tokenizer(text: str, vocab_size: int):
    """A word-level tokenizer over ``text``'s most frequent words (``vocab_size`` ids in all, ``[UNK]`` first): the
    random models have no tokenizer of their own, and calibration needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = collections.Counter(re.findall(r"\w+|[^\w\s]", text))
    vocab = {"[UNK]": 0}
    for word, _ in counts.most_common(vocab_size - 1):
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def run_row(size: str, criterion: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Build, save and prune one random model with the CLI; its time and peak memory."""
    import torch
    from transformers import LlamaForCausalLM

    text_path = Path(settings.get("calibration_text") or _default_text())
    if criterion != "magnitude" and not text_path.is_file():
        raise RowSkipped(f"no calibration text at {text_path}: give --calibration-text")
    config = config_for(size)
    with tempfile.TemporaryDirectory(prefix="scaling-", dir=settings["workdir"]) as tmp:
        folder, out = Path(tmp) / "model", Path(tmp) / "pruned"
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        params = model.num_parameters()
        model.save_pretrained(folder)
        del model
        gc.collect()
        if text_path.is_file():
            text = text_path.read_text(encoding="utf-8", errors="replace")
            word_tokenizer(text, config.vocab_size).save_pretrained(folder)
        command = [*_cli(), "prune", str(folder), "--out", str(out), "--sparsity", str(settings["sparsity"]),
                   "--structures", "ffn", "--importance", criterion, "--no-progress"]
        if criterion != "magnitude":
            rows_, batch = settings["calib_rows"], settings["calib_batch"]
            command += ["--data", str(text_path), "--num-batches", str(max(1, rows_ // batch)), "--batch-size",
                        str(batch), "--max-length", str(settings["calib_length"])]
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"compress prune failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        report = json.loads((out / "compress_report.json").read_text(encoding="utf-8"))
    model_mb = params * 4 / 2**20
    shown = [c if not c.startswith(tmp) else c.replace(tmp, "<tmp>") for c in command[len(_cli()):]]
    return {"params": params, "model_mb": model_mb, "prune_wall_s": wall, "prune_peak_rss_mb": peak_mb,
            "peak_over_model": peak_mb / model_mb, "params_after": report.get("params_after"),
            "command": "compress " + " ".join(shown),
            "note": "data-free" if criterion == "magnitude" else
                    f"{settings['calib_rows']} rows x {settings['calib_length']} tokens of {text_path.name}"}


def _cli() -> list[str]:
    """The ``compress`` command of this interpreter's environment (``python -m compress`` where it is not
    installed as a script)."""
    script = Path(sys.executable).with_name("compress")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "compress"]


def _default_text() -> Path:
    from bench.decoder import DEFAULT_CALIBRATION_TEXT

    return DEFAULT_CALIBRATION_TEXT


def note(settings: dict[str, Any]) -> str:
    return (f"Random Llama-shaped models (vocabulary {VOCAB:,}, untied embeddings, float32), shapes (hidden, layers, "
            f"heads, kv heads, FFN): " + "; ".join(f"{s}: {SIZES[s]}" for s in settings["sizes"]) + ". "
            f"`compress prune --sparsity {settings['sparsity']} --structures ffn` with `--importance magnitude` "
            f"(no data) and `--importance flap` on {settings['calib_rows']} rows x {settings['calib_length']} tokens "
            "of the calibration text. Wall time and peak RSS of the whole command (Python start, loading, scoring, "
            "pruning, saving); 'peak / weights': that peak over the size of the float32 weights.")
