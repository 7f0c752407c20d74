"""Benchmark: full fine-tuning vs LoRA vs Pruning-Adapter (oneshot, progressive) on MiniLM-L6 + SST-2.

Same run, identical data, steps, batch size and seed for every configuration:

- ``full``: every parameter trains (lr ``--full-lr``);
- ``lora``: LoRA r=8 on every attention and FFN projection of the dense model, classifier trained;
- ``pa-oneshot``: Pruning-Adapter, FFN 50% + heads 50% (global widths), pruned before training from
  Taylor gate scores on calibration batches (after a head-only warm-up), adapters r=8;
- ``pa-progressive``: the same sparsity reached along a cubic schedule during training.

Columns: test accuracy; training peak memory (RSS high-water mark of ``--mem-steps`` steps at batch
``--batch-size`` x ``--mem-seq-len`` tokens, each configuration in a fresh process; reported as the increase
over the RSS after the model is ready, and absolute; ``pa-progressive`` runs its schedule compressed into
those steps, so dense, pruning and pruned steps all count); training time per step of the accuracy run
(whole run: scoring, pruning and checkpointed steps included); inference latency of
the merged model (CPU, batch 32 x 128 tokens, interleaved rounds); encoder-layer and total parameters;
saved-folder size. Ratios are against ``lora`` / ``full`` / dense measured in this run. Figures are printed
and written as markdown (``--md``), never asserted.

    python recipes/bench_pruning_adapter.py --steps 800     # SST-2: about 15 min on 2 idle CPU cores
    python recipes/bench_pruning_adapter.py --glue-task MRPC --kinds lora pa-oneshot --steps 300 --mem-steps 3 # 13 min

The memory measurement uses SST-2 rows padded to ``--mem-seq-len`` tokens (only shapes matter), with the
task's number of labels; its factory is ``common.pruning_adapter:memory_job``, which the measuring
subprocess imports from the installed package (``pip install -e .``; ``./run.sh`` does).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import compress
from common.latency import interleaved_latency
from common.memory import TrainingJob, peak_training_memory
from common.pruning_adapter import (
    KINDS,
    MIN_PROGRESSIVE_MEM_STEPS,
    SHAPE_ARGS,
    add_arguments,
    build,
    encoder_layer_params,
    lr_for,
    merged,
)
from common.recipe import add_memory_arguments, latency_inputs, load_splits, setup_run, write_report
from common.train import evaluate_accuracy, finetune_classifier
from compress.measure import folder_size, format_table
from compress.pruning.spec import parse_sparsity, sparsity_by_structure

REPO = Path(__file__).resolve().parents[1]


def _configurations(args: argparse.Namespace) -> list[tuple[str, str, argparse.Namespace]]:
    """(row label, kind, arguments) per row: every kind once, every pa-* kind again per ``--also-sparsity``."""
    configs = []
    for kind in args.kinds:
        configs.append((kind, kind, args))
        if kind.startswith("pa-"):
            for sparsity in args.also_sparsity:
                variant = argparse.Namespace(**{**vars(args), "sparsity": sparsity})
                configs.append((f"{kind} ({sparsity})", kind, variant))
    return configs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    add_memory_arguments(p)
    p.add_argument("--checkpointed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure every configuration's memory with activation checkpointing for the whole "
                        "run ('+ckpt' rows; same numbers, so accuracy and latency are not re-run)")
    p.add_argument("--also-sparsity", action="append", default=[], metavar="SPARSITY",
                   help="Pruning-Adapter rows for one more sparsity, e.g. ffn=0.5,heads=0.5,hidden=0.25 "
                        "(repeatable): every pa-* kind in --kinds runs once per sparsity in the same run")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_pruning_adapter"))
    p.add_argument("--md", default=str(REPO / "runs" / "bench_pruning_adapter.md"))
    args = p.parse_args(argv)
    if args.memory_only and not args.memory:
        p.error("--memory-only with --no-memory leaves nothing to measure; drop one of them")
    if "pa-progressive" in args.kinds and args.memory and args.mem_steps < MIN_PROGRESSIVE_MEM_STEPS:
        # checked here, not after the accuracy runs have spent their time
        p.error(f"--mem-steps {args.mem_steps}: pa-progressive's memory run needs at least "
                f"{MIN_PROGRESSIVE_MEM_STEPS} steps (dense, two prunings, pruned); raise it or leave "
                "pa-progressive out of --kinds")
    # dense baselines first: a pruning event switches this process's CPU allocator to per-block mappings
    # (compress._allocator), which would slow a baseline timed after it
    args.kinds = sorted(dict.fromkeys(args.kinds), key=KINDS.index)
    for sparsity in args.also_sparsity:
        try:
            sparsity_by_structure(parse_sparsity(sparsity))
        except ValueError as exc:
            p.error(f"--also-sparsity {sparsity}: {exc}")
    setup_run()
    started = time.time()
    train, test, source = load_splits(args.glue_task, train_rows=args.train_rows, seed=args.seed)
    args.num_labels = len(set(train["label"]))

    configs = _configurations(args)
    results, plains, tokenizer = {}, {}, None
    for label, kind, config_args in [] if args.memory_only else configs:
        t0 = time.time()
        model, tokenizer, callbacks = build(kind, config_args, calibration=train)
        stats = finetune_classifier(model, tokenizer, train, steps=args.steps, batch_size=args.batch_size,
                                    lr=lr_for(kind, args), max_length=args.max_length, seed=args.seed,
                                    callbacks=callbacks)
        accuracy = evaluate_accuracy(model, tokenizer, test, max_length=args.max_length)
        plain = merged(model)
        folder_name = label.replace(" ", "_").replace("=", "").replace(",", "_").strip("()[]")
        folder = compress.save_pretrained(plain, Path(args.out) / folder_name, tokenizer=tokenizer, overwrite=True)
        plains[label] = plain
        results[label] = {"accuracy": accuracy, "encoder_params": encoder_layer_params(plain),
                          "params": plain.num_parameters(), "size": folder_size(folder),
                          "train_s": stats["train_time_s"]}
        print(f"[{label}] {stats['steps']} steps in {time.time() - t0:.0f} s, accuracy {accuracy:.2%}", flush=True)

    latency = {}
    if plains:
        pairs = test["text_pair"] if "text_pair" in test.column_names else None
        timed = interleaved_latency(plains, latency_inputs(tokenizer, test["text"], pairs), rounds=3, repeats=3)
        latency = {label: result.median_s for label, result in timed.items()}

    settings = [(config, False) for config in configs]
    if args.checkpointed_memory and args.memory:
        settings += [(config, True) for config in configs]
    memory = {}
    for (label, kind, config_args), checkpointing in settings if args.memory else []:
        job = TrainingJob("common.pruning_adapter:memory_job", steps=args.mem_steps,
                          kwargs={"kind": kind, "batch_size": args.batch_size, "seq_len": args.mem_seq_len,
                                  "steps": args.mem_steps, "num_labels": args.num_labels,
                                  "activation_checkpointing": checkpointing,
                                  **{name: getattr(config_args, name) for name in SHAPE_ARGS}})
        memory[label, checkpointing] = m = peak_training_memory(job)
        print(f"[{label}{' +ckpt' if checkpointing else ''}] memory: +{m.increase_mb:.0f} MB over "
              f"{m.baseline_rss_mb:.0f} MB", flush=True)

    dense_kind = "lora" if "lora" in results else configs[0][0]

    def times(value: float, kind: str, table: dict) -> str:
        return f"{value / table[kind]:.2f}" if kind in table else ""

    increase = {k: v.increase_mb for (k, ckpt), v in memory.items() if not ckpt}
    step_s = {k: v.step_time_median_s for (k, ckpt), v in memory.items() if not ckpt}
    train_s = {k: v["train_s"] for k, v in results.items()}
    rows = []
    for (label, _, _), checkpointing in settings:
        r, m = results.get(label), memory.get((label, checkpointing))
        same = checkpointing  # checkpointing changes no numbers: accuracy/latency/size are the row above's
        if r is None:  # --memory-only
            rows.append({"config": label + (" +ckpt" if checkpointing else ""),
                         "train mem +MB": round(m.increase_mb), "x LoRA": times(m.increase_mb, "lora", increase),
                         "x full": times(m.increase_mb, "full", increase), "peak RSS MB": round(m.peak_rss_mb),
                         "s/step (mem)": f"{m.step_time_median_s:.2f}",
                         "x LoRA (mem)": times(m.step_time_median_s, "lora", step_s)})
            continue
        rows.append({
            "config": label + (" +ckpt" if checkpointing else ""),
            "test acc": "same" if same else f"{r['accuracy']:.2%}",
            "acc vs LoRA (pt)": "" if same else f"{100 * (r['accuracy'] - results[dense_kind]['accuracy']):+.1f}",
            "train mem +MB": round(m.increase_mb) if m else "",
            "x LoRA": times(m.increase_mb, "lora", increase) if m else "",
            "x full": times(m.increase_mb, "full", increase) if m else "",
            "peak RSS MB": round(m.peak_rss_mb) if m else "",
            "s/step (run)": "" if same else f"{r['train_s'] / args.steps:.2f}",
            "x LoRA (run)": "" if same else times(r["train_s"], "lora", train_s),
            "s/step (mem)": f"{m.step_time_median_s:.2f}" if m else "",
            "x LoRA (mem)": times(m.step_time_median_s, "lora", step_s) if m else "",
            "latency ms": "" if same else round(1000 * latency[label]),
            "latency x dense": "" if same else f"{latency[label] / latency[dense_kind]:.2f}",
            "encoder params": "" if same else r["encoder_params"],
            "enc. x dense": "" if same else f"{r['encoder_params'] / results[dense_kind]['encoder_params']:.2f}",
            "params": "" if same else r["params"],
            "folder MB": "" if same else f"{r['size'] / 2**20:.1f}",
        })
    table = format_table(rows)
    removed = ", ".join(f"{k} {v:.0%}" for k, v in sparsity_by_structure(parse_sparsity(args.sparsity)).items())
    setup = (f"Pruning-Adapter: {removed}, {args.mode} widths, {args.importance} importance, adapter rank {args.r}"
             + ("; rows marked (...) remove what they name instead. " if args.also_sparsity else ". "))
    if not args.memory_only:
        setup = (f"data: {source}; train rows {len(train):,}, test rows {len(test):,}.\nEvery configuration: "
                 f"{args.steps} steps, batch {args.batch_size}, max length {args.max_length}, seed {args.seed}; lr "
                 f"{args.full_lr} (full) / {args.lr} (adapters). " + setup)
    timing = ("'s/step (mem)': median step of the memory job (padded)." if args.memory_only else
              "'s/step (run)': the accuracy run (dynamic padding); 's/step (mem)': median step of the memory job "
              "(padded). Latency: merged models, CPU, batch 32 x 128 tokens.")
    memory_note = (
        f"Memory: {args.mem_steps} steps at batch {args.batch_size} x {args.mem_seq_len} tokens in a fresh process "
        "per configuration; 'train mem' is the RSS high-water mark minus the RSS once the pretrained model is "
        "loaded, so PA-oneshot's scoring and pruning and PA-progressive's dense, gated steps count; ratios are "
        "against the rows without checkpointing. '+ckpt': activation checkpointing for the whole run (same "
        "numbers). " if args.memory else "Memory not measured (--no-memory). ")
    notes = (
        f"all-MiniLM-L6-v2 + seeded head; {'memory only (--memory-only); ' if args.memory_only else ''}{setup}"
        f"{memory_note}{timing} Wall time {(time.time() - started) / 60:.1f} min."
    )
    print(write_report(__file__, argv, f"{table}\n\n{notes}", args.md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
