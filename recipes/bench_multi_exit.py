"""Benchmark: multi-exit MiniLM-L6 with early exit against the dense fine-tuned model, on SST-2 (or a GLUE task).

Same run, same data and seed:

- ``dense``: MiniLM-L6 fully fine-tuned (``--steps`` at ``--full-lr``); it is also the teacher;
- ``me``: a copy of it with an exit after every block, trained on every exit's loss plus distillation from the
  teacher's logits (``--student-steps`` at ``--exit-lr``);
- ``me-slim50``: the same after removing half of the heads and FFN neurons (importance from every exit's loss);
- ``pa-exits``: Pruning-Adapter with an exit after every block on the frozen pretrained backbone (progressive
  FFN and heads 50%, scored on every exit's loss; adapters and exits trained together for ``--steps``).

The held-out ``--calib-rows`` training rows choose the thresholds (for accuracy drops ``--drops`` and speedups
``--speedups`` on those rows); each threshold then runs on the test set: accuracy, mean blocks run per example,
and measured CPU time of a pass over the first ``--latency-rows`` test rows in batches of 32 and one at a time
(dynamic padding, the same batches for every model; median of ``--repeats`` passes, each model's passes
alternating with the dense model's, so that speedups compare passes made under the same machine load). Writes
a markdown table (``--md``) and an accuracy-vs-time plot (``--plot``, PNG); figures are printed, never
asserted.

    python recipes/bench_multi_exit.py --steps 1600 --student-steps 800
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import compress
from common.multi_exit import (
    KINDS,
    add_arguments,
    build_pa_exits,
    build_student,
    outcome,
    params_without_word_embeddings,
    test_batches,
    threshold_label,
    timed_against,
)
from common.recipe import load_splits, setup_run, write_report
from common.train import finetune_classifier, load_sequence_classifier, minilm_path
from compress.data import tokenize_dataset
from compress.measure import format_table

REPO = Path(__file__).resolve().parents[1]
multi_exit = compress.METHODS["MULTI_EXIT"]


def plot(points: dict[str, list[tuple[float, float]]], dense: tuple[float, float], path: Path, title: str) -> None:
    """Accuracy against batch-32 time relative to the dense model: one line per configuration, the dense model
    as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, values in points.items():
        values = sorted(values)
        ax.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=kind)
    ax.plot([dense[0]], [dense[1]], marker="*", markersize=14, linestyle="", label="dense")
    ax.set_xlabel("CPU time per batch of 32, relative to the dense model")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--drops", type=float, nargs="*", default=[0.5, 1.0, 1.5],
                   help="accuracy drops (points, on the held-out rows) to choose thresholds for")
    p.add_argument("--speedups", type=float, nargs="*", default=[2.0, 3.0, 4.0],
                   help="speedups (blocks, on the held-out rows) to choose thresholds for")
    p.add_argument("--latency-rows", type=int, default=320,
                   help="test rows timed, in batches of 32 and one at a time (320)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (3)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_multi_exit"))
    p.add_argument("--md", default=str(REPO / "runs" / "bench_multi_exit.md"))
    p.add_argument("--plot", default=str(REPO / "runs" / "bench_multi_exit.png"))
    args = p.parse_args(argv)
    args.kinds = sorted(dict.fromkeys(args.kinds), key=KINDS.index)
    student_steps = args.student_steps or args.steps
    setup_run()
    started = time.time()
    train, test, source = load_splits(args.glue_task, train_rows=args.train_rows, seed=args.seed)
    shuffled = train.shuffle(seed=args.seed)
    calibration = shuffled.select(range(args.calib_rows))
    train = shuffled.select(range(args.calib_rows, len(shuffled)))
    args.num_labels = len(set(train["label"]))
    labels = np.asarray(test["label"])

    teacher, tokenizer = load_sequence_classifier(minilm_path(), num_labels=args.num_labels, seed=args.seed)
    t0 = time.time()
    finetune_classifier(teacher, tokenizer, train, steps=args.steps, batch_size=args.batch_size, lr=args.full_lr,
                        max_length=args.max_length, seed=args.seed)
    print(f"[dense] {args.steps} steps in {time.time() - t0:.0f} s", flush=True)
    batches = test_batches(tokenizer, test, 32, args.max_length)
    timed_rows = test.select(range(min(args.latency_rows, len(test))))
    timed_32 = test_batches(tokenizer, timed_rows, 32, args.max_length)
    single_rows = test_batches(tokenizer, timed_rows, 1, args.max_length)
    dense = {**outcome(teacher, batches, labels), **timed_against(teacher, teacher, timed_32, single_rows, 1)}
    dense_params = params_without_word_embeddings(teacher)
    print(f"[dense] accuracy {dense['accuracy']:.2%}, {dense['b32_s']:.2f} s per batch-32 pass", flush=True)
    rows = [{"config": "dense", "chosen for": "", "threshold": "", "test acc": f"{dense['accuracy']:.2%}",
             "acc vs dense (pt)": "+0.0", "mean blocks": f"{dense['mean_blocks']:.2f}",
             "s per pass b32": f"{dense['b32_s']:.2f}", "speedup b32": "1.00",
             "ms per row b1": f"{1000 * dense['b1_s'] / len(single_rows):.1f}", "speedup b1": "1.00",
             "params (no emb.)": dense_params}]
    points: dict[str, list[tuple[float, float]]] = {}
    best: dict[str, float] = {}
    calibration_data = tokenize_dataset(calibration, tokenizer, max_length=args.max_length)
    for kind in args.kinds:
        t0 = time.time()
        if kind == "pa-exits":
            student, callbacks, lr = build_pa_exits(args)
            steps = args.steps
        else:
            student = build_student(kind, teacher, tokenizer, args, calibration=train)
            callbacks, lr, steps = [], args.exit_lr, student_steps
        finetune_classifier(student, tokenizer, train, steps=steps, batch_size=args.batch_size, lr=lr,
                            max_length=args.max_length, seed=args.seed, callbacks=callbacks)
        model = student.merge_and_unload()
        compress.save_pretrained(model, Path(args.out) / kind, tokenizer=tokenizer, overwrite=True)
        print(f"[{kind}] {steps} steps in {time.time() - t0:.0f} s", flush=True)
        exit_logits, held_labels = multi_exit.collect_exit_logits(model, calibration_data, tokenizer=tokenizer,
                                                                  batch_size=64)
        exit_blocks, num_blocks = multi_exit.exit_block_indices(model)
        chosen: dict[float | None, list[str]] = {None: ["every block"]}
        targets = [("target_accuracy_drop", d, f"drop <= {d:g} pt") for d in args.drops]
        targets += [("target_speedup", s, f"speedup >= {s:g}x") for s in args.speedups]
        for name, value, label in targets:
            try:
                choice = multi_exit.choose_exit_threshold(exit_logits, held_labels, exit_blocks, num_blocks,
                                                          args.policy, **{name: value})
            except compress.CompressError as exc:
                print(f"[{kind}] {label}: {exc}", flush=True)
                continue
            chosen.setdefault(choice.threshold, []).append(label)
        params = params_without_word_embeddings(model)
        for threshold, reasons in chosen.items():
            model.config.exit_threshold = threshold
            result = {**outcome(model, batches, labels),
                      **timed_against(teacher, model, timed_32, single_rows, args.repeats)}
            speedup = result["dense_b32_s"] / result["b32_s"]
            points.setdefault(kind, []).append((1 / speedup, 100 * result["accuracy"]))
            drop = 100 * (result["accuracy"] - dense["accuracy"])
            if drop >= -1.5:
                best[kind] = max(best.get(kind, 0.0), speedup)
            rows.append({"config": kind, "chosen for": ", ".join(reasons), "threshold": threshold_label(threshold),
                         "test acc": f"{result['accuracy']:.2%}", "acc vs dense (pt)": f"{drop:+.1f}",
                         "mean blocks": f"{result['mean_blocks']:.2f}", "s per pass b32": f"{result['b32_s']:.2f}",
                         "speedup b32": f"{speedup:.2f}",
                         "ms per row b1": f"{1000 * result['b1_s'] / len(single_rows):.1f}",
                         "speedup b1": f"{result['dense_b1_s'] / result['b1_s']:.2f}",
                         "params (no emb.)": params})
            print(f"[{kind} @ {threshold_label(threshold)}] accuracy {result['accuracy']:.2%}, "
                  f"{result['mean_blocks']:.2f} blocks, {speedup:.2f}x (batch 32)", flush=True)
    task = args.glue_task or "SST-2"
    plot(points, (1.0, 100 * dense["accuracy"]), Path(args.plot),
         f"MiniLM-L6 multi-exit on {task} (seed {args.seed})")
    goal = "; ".join(f"{kind}: {best.get(kind, 0):.2f}x" for kind in args.kinds)
    notes = (f"all-MiniLM-L6-v2 + seeded head; data: {source}; train rows {len(train):,} (+{args.calib_rows:,} held "
             f"out to choose thresholds), test rows {len(test):,}. Dense: {args.steps} steps at lr {args.full_lr}; "
             f"students: copies of it, {student_steps} steps at lr {args.exit_lr}, distillation weight "
             f"{args.distill_weight} at T={args.temperature}; batch {args.batch_size}, max length "
             f"{args.max_length}, seed {args.seed}; exit policy {args.policy}. Time: median of {args.repeats} passes "
             f"over the first {len(single_rows)} test rows (batches of 32, and one at a time; dynamic padding), "
             "alternating with the dense model's passes (its times in the dense row: one pass), torch threads "
             f"{torch.get_num_threads()}. 'params (no emb.)': parameters without "
             f"the word embeddings. Best measured batch-32 speedup within 1.5 points of dense: {goal}. Wall time "
             f"{(time.time() - started) / 60:.1f} min.")
    print(write_report(__file__, argv, f"{format_table(rows)}\n\n{notes}", args.md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
