"""Benchmark: full fine-tuning vs LoRA vs Ladder Side-Tuning on MiniLM-L6 + SST-2 (or a GLUE task).

Same run, identical data, steps, batch size and seed for every configuration:

- ``full``: every parameter trains (lr ``--full-lr``);
- ``lora``: LoRA r=8 on every attention and FFN projection, classifier trained (lr ``--lr``);
- ``lst-r8`` / ``lst-r4``: Ladder Side-Tuning, side network at 1/8 and 1/4 of the backbone's width, initialised
  from the backbone pruned by fisher importance on calibration rows (lr ``--lst-lr``); the classifier reads the
  side states pooled per segment (the default ``pooling="segments"``);
- ``lst-r8-cls``: ``lst-r8`` whose classifier reads BERT's frozen pooler on the side network's first token
  (``pooling="model"``);
- ``lst-r8-drop``: ``lst-r8`` with side blocks only for backbone blocks 1, 3 and 5 (layer dropping);
- ``lst-r8-add``: ``lst-r8`` whose up-projected output is added to the backbone's final hidden state;
- ``lst-r8-8bit``: ``lst-r8`` on a backbone loaded in bitsandbytes 8-bit (the smaller frozen weights show in
  the absolute peak RSS, not in the increase over the loaded model);
- ``lst-r8-int8``: ``lst-r8`` with the encoder's linear layers in torch's dynamic int8 (faster CPU forward).

Columns: test accuracy (the mean over ``--seeds``, each seed's in ``per seed``; the notes give the test set's
majority-class rate); training peak memory (RSS high-water mark of ``--mem-steps`` steps at batch
``--batch-size`` x ``--mem-seq-len`` tokens, each configuration in a fresh process, as the increase over the RSS
once the model is loaded and wrapped; the side network's fisher initialisation counts); time per training step
(accuracy run, and the padded memory job); trainable parameters; the size of what is saved (the adapter folder;
the whole model for ``full``). ``--seq-lens`` adds a table of training memory against sequence length. Ratios
are against ``full`` / ``lora`` measured in this run; figures are printed and written as markdown (``--md``),
never asserted.

    python recipes/bench_ladder_side.py --steps 1600 --seq-lens 64 128 256
    python recipes/bench_ladder_side.py --glue-task MRPC --steps 350 --seeds 0 1 2 --no-memory --kinds full lst-r8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import compress
from common.ladder_side import KINDS, add_arguments, build, lr_for
from common.memory import TrainingJob, peak_training_memory
from common.recipe import add_memory_arguments, load_splits, setup_run, write_report
from common.train import evaluate_accuracy, finetune_classifier
from compress.measure import folder_size, format_table

REPO = Path(__file__).resolve().parents[1]


def _memory(kind: str, args, seq_len: int):
    job = TrainingJob("common.ladder_side:memory_job", steps=args.mem_steps,
                      kwargs={"kind": kind, "batch_size": args.batch_size, "seq_len": seq_len,
                              "num_labels": args.num_labels, "importance": args.importance,
                              "calib_batches": args.calib_batches, "calib_batch_size": args.calib_batch_size,
                              "max_length": args.max_length})
    result = peak_training_memory(job)
    print(f"[{kind} @ {seq_len}] memory: +{result.increase_mb:.0f} MB over {result.baseline_rss_mb:.0f} MB",
          flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train each configuration once per seed; the table gives the mean (default: --seed)")
    add_memory_arguments(p)
    p.add_argument("--seq-lens", type=int, nargs="*", default=[],
                   help="also measure training memory of full, lora and lst-r8 at these sequence lengths")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_ladder_side"))
    p.add_argument("--md", default=str(REPO / "runs" / "bench_ladder_side.md"))
    args = p.parse_args(argv)
    if args.memory_only and not args.memory:
        p.error("--memory-only with --no-memory leaves nothing to measure; drop one of them")
    args.kinds = sorted(dict.fromkeys(args.kinds), key=KINDS.index)
    seeds = list(dict.fromkeys(args.seeds or [args.seed]))
    setup_run()
    started = time.time()
    train, test, source = load_splits(args.glue_task, train_rows=args.train_rows, seed=args.seed)
    args.num_labels = len(set(train["label"]))
    majority = Counter(test["label"]).most_common(1)[0][1] / len(test)

    results = {}
    for kind in [] if args.memory_only else args.kinds:
        runs = []
        for seed in seeds:
            t0 = time.time()
            args.seed = seed  # the classification head's initialisation (build) and the Trainer's seed
            if args.train_rows:
                train = load_splits(args.glue_task, train_rows=args.train_rows, seed=seed)[0]
            model, tokenizer = build(kind, args, calibration=train)
            trainable, _ = (model.get_nb_trainable_parameters() if hasattr(model, "get_nb_trainable_parameters")
                            else (model.num_parameters(only_trainable=True), None))
            stats = finetune_classifier(model, tokenizer, train, steps=args.steps, batch_size=args.batch_size,
                                        lr=lr_for(kind, args), max_length=args.max_length, seed=seed)
            accuracy = evaluate_accuracy(model, tokenizer, test, max_length=args.max_length)
            folder = Path(args.out) / (kind if len(seeds) == 1 else f"{kind}-seed{seed}")
            if hasattr(model, "peft_config"):
                model.save_pretrained(folder)
            else:
                compress.save_pretrained(model, folder, tokenizer=tokenizer, overwrite=True)
            runs.append({"accuracy": accuracy, "trainable": trainable, "size": folder_size(folder),
                         "train_s": stats["train_time_s"]})
            print(f"[{kind} seed {seed}] {stats['steps']} steps in {time.time() - t0:.0f} s, accuracy {accuracy:.2%}",
                  flush=True)
        results[kind] = {**runs[0], "accuracy": statistics.mean(r["accuracy"] for r in runs),
                         "per_seed": [r["accuracy"] for r in runs],
                         "train_s": statistics.mean(r["train_s"] for r in runs)}

    memory = {kind: _memory(kind, args, args.mem_seq_len) for kind in args.kinds} if args.memory else {}

    def times(value: float, base: str, table: dict) -> str:
        return f"{value / table[base]:.2f}" if base in table else ""

    increase = {k: m.increase_mb for k, m in memory.items()}
    step_mem = {k: m.step_time_median_s for k, m in memory.items()}
    step_run = {k: r["train_s"] for k, r in results.items()}
    rows = []
    for kind in args.kinds:
        r, m = results.get(kind), memory.get(kind)
        if r is None:  # --memory-only
            rows.append({"config": kind, "train mem +MB": round(m.increase_mb),
                         "x full": times(m.increase_mb, "full", increase),
                         "x LoRA": times(m.increase_mb, "lora", increase), "peak RSS MB": round(m.peak_rss_mb),
                         "s/step (mem)": f"{m.step_time_median_s:.2f}",
                         "x full (mem)": times(m.step_time_median_s, "full", step_mem)})
            continue
        rows.append({
            "config": kind,
            "test acc": f"{r['accuracy']:.2%}",
            **({"per seed": " / ".join(f"{a:.2%}" for a in r["per_seed"])} if len(seeds) > 1 else {}),
            "acc vs full (pt)": f"{100 * (r['accuracy'] - results['full']['accuracy']):+.1f}" if "full" in results
            else "",
            "train mem +MB": round(m.increase_mb) if m else "",
            "x full": times(m.increase_mb, "full", increase) if m else "",
            "x LoRA": times(m.increase_mb, "lora", increase) if m else "",
            "peak RSS MB": round(m.peak_rss_mb) if m else "",
            "s/step (run)": f"{r['train_s'] / args.steps:.2f}",
            "x full (run)": times(r["train_s"], "full", step_run),
            "s/step (mem)": f"{m.step_time_median_s:.2f}" if m else "",
            "x full (mem)": times(m.step_time_median_s, "full", step_mem) if m else "",
            "trainable params": r["trainable"],
            "saved MB": f"{r['size'] / 2**20:.2f}",
        })
    text_parts = [format_table(rows)]
    if args.seq_lens:
        sweep_rows = []
        for kind in [k for k in ("full", "lora", "lst-r8") if k in args.kinds]:
            row = {"config": kind}
            for seq_len in args.seq_lens:
                row[f"+MB @ {seq_len}"] = round(_memory(kind, args, seq_len).increase_mb)
            sweep_rows.append(row)
        text_parts.append("Training memory against sequence length (batch "
                          f"{args.batch_size}, +MB over the loaded model):\n\n" + format_table(sweep_rows))
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (test acc: mean)"
    training = ("memory only (--memory-only). " if args.memory_only else
                f"data: {source}; train rows {len(train):,}, test rows {len(test):,} (majority class "
                f"{majority:.2%}). Every configuration: {args.steps} steps, batch {args.batch_size}, max length "
                f"{args.max_length}, {seeds_text}; lr {args.full_lr} (full) / {args.lr} (LoRA) / {args.lst_lr} "
                "(LST). ")
    notes = (f"all-MiniLM-L6-v2 + seeded head; {training}LST side networks initialised by {args.importance} on "
             f"{args.calib_batches} x {args.calib_batch_size} rows. "
             + (f"Memory: {args.mem_steps} steps at batch {args.batch_size} x {args.mem_seq_len} tokens in a fresh "
                "process per configuration; 'train mem' is the RSS high-water mark minus the RSS once the model is "
                "loaded and wrapped. " if args.memory else "Memory not measured (--no-memory). ")
             + "'s/step (run)': the accuracy run (dynamic padding); 's/step (mem)': median step of the memory job "
             f"(padded). Wall time {(time.time() - started) / 60:.1f} min.")
    print(write_report(__file__, argv, "\n\n".join([*text_parts, notes]), args.md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
