"""Recipe: a multi-exit MiniLM-L6 on SST-2 (fine-tune the teacher, train the exits with distillation, choose the
exit threshold, save, reload with the Auto class and serve it with a pipeline).

    python recipes/multi_exit.py                                   # exits after every block, 1000 steps each
    python recipes/multi_exit.py --slim --target-speedup 3         # half the heads and FFN; 3x fewer blocks
    python recipes/multi_exit.py --glue-task MRPC --steps 350 --target-drop 1.0

The teacher is MiniLM-L6 fully fine-tuned on the task; the student starts as its copy with an exit after every
block and trains on every exit's loss plus the teacher's softened logits, in an unchanged ``Trainer``. The
threshold is chosen on held-out training rows for ``--target-drop`` accuracy points (or ``--target-speedup``)
and saved in the model's config. The merged model is written atomically as safetensors with a model card and
reloaded through ``AutoModelForSequenceClassification`` (after ``import compress``) to check it.

Configurations are built with :mod:`common.multi_exit`, shared with ``recipes/bench_multi_exit.py``.
Run with the package installed (``pip install -e .``; ``./run.sh`` does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from transformers import AutoModelForSequenceClassification, pipeline

import compress
from common.multi_exit import add_arguments, build_student, outcome, test_batches
from common.recipe import claim_run_folder, finish_run, load_splits, parse_recipe_args, setup_run
from common.train import finetune_classifier, load_sequence_classifier, minilm_path
from compress.data import tokenize_dataset
from compress.distributed import is_main_process

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--slim", action="store_true", help="remove half of the heads and FFN neurons first")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-drop", type=float, default=None,
                        help="accuracy points the exits may lose on held-out rows (default 1.0)")
    target.add_argument("--target-speedup", type=float, default=None, help="fewer blocks per example, e.g. 3")
    p.add_argument("--out", default=str(REPO / "runs" / "multi_exit"), help="output folder")
    args = parse_recipe_args(p, argv)
    if args.target_speedup is None and args.target_drop is None:
        args.target_drop = 1.0
    claim_run_folder(args, p.description)
    setup_run(verbose=True, log_format="%(message)s")
    print(f"config: {vars(args)}")

    train, test, source = load_splits(args.glue_task, train_rows=args.train_rows, seed=args.seed)
    shuffled = train.shuffle(seed=args.seed)
    held_out, train = shuffled.select(range(args.calib_rows)), shuffled.select(range(args.calib_rows, len(shuffled)))
    args.num_labels = len(set(train["label"]))
    teacher, tokenizer = load_sequence_classifier(minilm_path(), num_labels=args.num_labels, seed=args.seed)
    finetune_classifier(teacher, tokenizer, train, steps=args.steps, batch_size=args.batch_size, lr=args.full_lr,
                        max_length=args.max_length, seed=args.seed, group_by_length=args.group_by_length)
    student = build_student("me-slim50" if args.slim else "me", teacher, tokenizer, args, calibration=train)
    finetune_classifier(student, tokenizer, train, steps=args.student_steps or args.steps,
                        batch_size=args.batch_size, lr=args.exit_lr, max_length=args.max_length, seed=args.seed,
                        group_by_length=args.group_by_length)
    if not is_main_process():  # the main process calibrates, saves and reports; the others are done
        return 0
    choice = compress.calibrate_exit_threshold(
        student, tokenize_dataset(held_out, tokenizer, max_length=args.max_length), tokenizer=tokenizer,
        target_accuracy_drop=args.target_drop, target_speedup=args.target_speedup)
    merged = student.merge_and_unload()
    folder = compress.save_pretrained(merged, Path(args.out) / "model", tokenizer=tokenizer, overwrite=True)

    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)
    labels = np.asarray(test["label"])
    batches = test_batches(tokenizer, test, 32, args.max_length)
    dense, exits = outcome(teacher, batches, labels), outcome(reloaded, batches, labels)
    classify = pipeline("text-classification", model=str(folder), device="cpu")
    sample = test.select(range(min(64, len(test))))
    inputs = ([{"text": t, "text_pair": q} for t, q in zip(sample["text"], sample["text_pair"])]
              if "text_pair" in sample.column_names else list(sample["text"]))
    served = [reloaded.config.label2id[r["label"]] for r in classify(inputs)]
    print(f"data: {source}")
    print(f"threshold ({choice.policy}) {choice.threshold:.4g}: held-out accuracy {choice.accuracy:.2f}% "
          f"(every block {choice.full_accuracy:.2f}%), {choice.mean_blocks:.2f} of {merged.config.num_hidden_layers} "
          "blocks per example")
    print(f"test accuracy: dense {dense['accuracy']:.2%}; multi-exit {exits['accuracy']:.2%} with "
          f"{exits['mean_blocks']:.2f} blocks per example")
    print(f"pipeline from {folder}: {sum(int(a == b) for a, b in zip(served, labels))} of {len(served)} rows right")
    print(f"saved: {folder} (AutoModelForSequenceClassification after `import compress`)")
    finish_run(args.out, args, {"test_accuracy": exits["accuracy"], "dense_test_accuracy": dense["accuracy"],
                                "mean_blocks": exits["mean_blocks"], "exit_threshold": choice.threshold},
               model_folder=folder, datasets=["glue"], task="text-classification")
    return 0


if __name__ == "__main__":
    sys.exit(main())
