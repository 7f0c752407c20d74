"""Benchmark: structured pruning (FFN, hidden size) of a fine-tuned MiniLM-L6 vs. an equally trained dense model.

Protocol (every model ends with the same number of optimizer steps, N + R):

1. load the packaged all-MiniLM-L6-v2 with a seeded classification head; fine-tune it N steps (``--steps``);
2. dense reference: a copy of that model fine-tuned R more steps (``--recovery-steps``);
3. for each configuration: a copy of the N-step model, pruned (``--sparsities``: a fraction of every layer's
   FFN neurons and/or of the hidden size, Taylor importance on calibration batches from the training set),
   then fine-tuned R steps with the same
   schedule, seed and data order as the dense reference;
4. every model is saved with ``compress.save_pretrained`` and measured in this process: parameters, saved
   folder size, CPU latency (batch 32, sequence 128; median over interleaved rounds, so load changes on the
   machine hit all models alike) and test accuracy.

Data: ``../shared/data/sst2`` (train.tsv / test.tsv = official SST-2 dev set) next to the repository, or
the shipped SST-2 sample when absent; ``--glue-task MRPC`` (CoLA, RTE, SST-2) uses
``../shared/data/glue/<task>`` with dev.tsv as the test set. Prints a table and writes it as markdown
(``--md``). Timings are printed, never asserted. Run it with the package installed (``pip install -e .``;
``./run.sh`` does); data paths, latency batch and offline set-up come from :mod:`common.recipe`.

    python recipes/bench_prune.py                      # SST-2: about an hour on 2 CPU cores
    python recipes/bench_prune.py --glue-task MRPC --steps 300 --recovery-steps 100   # about 15-30 minutes
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common.latency import interleaved_latency
from common.recipe import GLUE_TASKS, latency_inputs, load_splits, setup_run, write_report
from common.train import finetune_classifier, glue_scores, load_sequence_classifier, minilm_path, predict_labels
from compress.data import tokenize_dataset
from compress.export import save_pretrained
from compress.measure import folder_size, format_table
from compress.pruning.arch import arch_spec, spec_class
from compress.pruning.engine import prune_model
from compress.pruning.spec import parse_sparsity, sparsity_by_structure

REPO = Path(__file__).resolve().parents[1]


def _ffn_width(model: torch.nn.Module) -> int | str:
    """The FFN width, or its mean with "(mean)" when global pruning left layers of different widths."""
    widths = arch_spec(model).widths()["ffn"]
    if len(set(widths)) == 1:
        return widths[0]
    return f"{sum(widths) / len(widths):,.0f} (mean)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800, help="dense fine-tuning steps N before pruning (800)")
    p.add_argument("--recovery-steps", type=int, default=250,
                   help="steps R after pruning; the dense reference also gets R more steps (250)")
    p.add_argument("--sparsities", nargs="+", default=["0.25", "0.5", "0.75", "hidden=0.25", "hidden=0.25,ffn=0.5"],
                   help="pruned configurations to compare: a number (that fraction of FFN neurons) or per "
                        "structure, e.g. hidden=0.25,ffn=0.5 (default: FFN 25/50/75%%, hidden 25%%, both)")
    p.add_argument("--importance", default="taylor", help="pruning importance (taylor)")
    p.add_argument("--calib-batches", type=int, default=16,
                   help="calibration batches of --batch-size rows (16)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-rows", type=int, default=0,
                   help="use a seeded random subset of this many training rows (default 0: all)")
    p.add_argument("--glue-task", choices=GLUE_TASKS, help="use ../shared/data/glue/<task> (dev.tsv as test)")
    p.add_argument("--data", type=Path, help="explicit data folder (train + test, else dev, files)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_prune", help="where models are saved")
    p.add_argument("--md", type=Path, help="markdown output (default runs/bench_prune.md, or "
                                           "runs/bench_prune_<task>.md with --glue-task)")
    p.add_argument("--latency-rounds", type=int, default=3, help="interleaved latency rounds (3)")
    p.add_argument("--latency-repeats", type=int, default=3, help="timed calls per model per round (3)")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_run(args.verbose)

    started = time.perf_counter()
    try:
        train, test, source = load_splits(args.glue_task, data=args.data, train_rows=args.train_rows, seed=args.seed)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    num_labels = int(max(train["label"])) + 1
    task = args.glue_task or "SST-2"
    md_path = args.md or REPO / "runs" / ("bench_prune.md" if not args.glue_task
                                          else f"bench_prune_{args.glue_task.lower().replace('-', '')}.md")
    print(f"data: {source}; train rows used {len(train):,}, test rows {len(test):,}; "
          f"{torch.get_num_threads()} CPU threads", flush=True)

    model, tok = load_sequence_classifier(minilm_path(), num_labels=num_labels, seed=args.seed)
    fit = dict(batch_size=args.batch_size, lr=args.lr, max_length=args.max_length, seed=args.seed,
               freeze_embeddings=True)

    def score(m) -> dict[str, float]:
        return glue_scores(test["label"], predict_labels(m, tok, test, max_length=args.max_length), task)

    print(f"[dense] fine-tuning {args.steps} steps (batch {args.batch_size}, seq {args.max_length}, "
          f"lr {args.lr:g}) ...", flush=True)
    fit_n = finetune_classifier(model, tok, train, steps=args.steps, **fit)
    base_scores = score(model)
    print(f"[dense] {fit_n['train_time_s']:.0f} s, loss {fit_n['train_loss']:.3f}, "
          f"test acc after {args.steps} steps {base_scores['acc']:.4f}", flush=True)

    models: dict[str, torch.nn.Module] = {}
    rows: list[dict[str, Any]] = []
    dense = copy.deepcopy(model)
    if args.recovery_steps:
        fit_r = finetune_classifier(dense, tok, train, steps=args.recovery_steps, **fit)
        print(f"[dense] +{args.recovery_steps} steps: {fit_r['train_time_s']:.0f} s", flush=True)
    models["dense"] = dense
    rows.append({"model": "dense", "ffn": _ffn_width(dense), "hidden": dense.config.hidden_size,
                 "before": None, **score(dense)})
    print(f"[dense] test acc after {args.steps}+{args.recovery_steps} steps {rows[-1]['acc']:.4f}", flush=True)

    calib = tokenize_dataset(train, tok, max_length=args.max_length)
    reports = {}
    for text in args.sparsities:
        sparsity = sparsity_by_structure(parse_sparsity(text))
        name = "+".join(f"{k}-{v:g}" for k, v in sparsity.items())
        # BERT's config cannot express a hidden size apart from its head size: compact (global-mode) classes
        mode = "uniform" if set(sparsity) <= set(spec_class(model.config.model_type).uniform_structures) else "global"
        pruned = copy.deepcopy(model)
        t0 = time.perf_counter()
        reports[name] = prune_model(pruned, sparsity=sparsity, importance=args.importance, mode=mode,
                                    data=calib, num_batches=args.calib_batches, batch_size=args.batch_size,
                                    tokenizer=tok)
        prune_s = time.perf_counter() - t0
        before = score(pruned)["acc"]
        if args.recovery_steps:
            fit_r = finetune_classifier(pruned, tok, train, steps=args.recovery_steps, **fit)
        models[name] = pruned
        rows.append({"model": name, "ffn": _ffn_width(pruned), "hidden": pruned.config.hidden_size,
                     "before": before, **score(pruned)})
        print(f"[{name}] pruned in {prune_s:.0f} s; acc before recovery {before:.4f}, after "
              f"{rows[-1]['acc']:.4f}", flush=True)

    sizes = {}
    for name, m in models.items():
        out = save_pretrained(m, args.out / task.lower() / name, tokenizer=tok, report=reports.get(name),
                              overwrite=True)
        sizes[name] = folder_size(out)
    pairs = test["text_pair"] if "text_pair" in test.column_names else None
    timed = interleaved_latency(models, latency_inputs(tok, test["text"], pairs), rounds=args.latency_rounds,
                                repeats=args.latency_repeats)
    lat = {name: result.median_s for name, result in timed.items()}

    p0, s0, l0 = dense.num_parameters(), sizes["dense"], lat["dense"]
    e0 = dense.num_parameters(exclude_embeddings=True)
    table = []
    for row in rows:
        name = row["model"]
        params = models[name].num_parameters()
        entry = {
            "model": name,
            "FFN width": row["ffn"],
            "hidden": row["hidden"],
            "params": params,
            "params ratio": f"{params / p0:.3f}",
            "non-emb. params ratio": f"{models[name].num_parameters(exclude_embeddings=True) / e0:.3f}",
            "size ratio": f"{sizes[name] / s0:.3f}",
            "latency ms": round(lat[name] * 1e3),
            "latency ratio": f"{lat[name] / l0:.3f}",
            "acc before recovery": "" if row["before"] is None else f"{row['before']:.2%}",
            f"{task} test acc": f"{row['acc']:.2%}",
        }
        if "mcc" in row:
            entry["MCC"] = f"{row['mcc']:.3f}"
        if "f1" in row:
            entry["F1"] = f"{row['f1']:.3f}"
        table.append(entry)
    text = format_table(table)
    wall = time.perf_counter() - started
    notes = (
        f"all-MiniLM-L6-v2 + seeded head, {task}; data: {source}; train rows used {len(train):,}; "
        f"test rows {len(test):,}.\n"
        f"Protocol: dense fine-tune {args.steps} steps, then +{args.recovery_steps} steps for the dense row and "
        f"{args.recovery_steps} recovery steps after pruning for each sparsity (all models: "
        f"{args.steps + args.recovery_steps} steps; batch {args.batch_size}, seq {args.max_length}, "
        f"lr {args.lr:g}, word embeddings frozen, seed {args.seed}). Pruning: {args.importance} importance on "
        f"{args.calib_batches} x {args.batch_size} training rows, uniform widths (hidden-size rows: global mode, "
        f"compact class).\n"
        f"Ratios are vs. the dense row; latency: CPU, batch 32 x seq 128, median of "
        f"{args.latency_rounds} interleaved rounds x {args.latency_repeats} calls, {torch.get_num_threads()} "
        f"threads. Dense accuracy after {args.steps} steps (before the extra steps): {base_scores['acc']:.4f}. "
        f"Wall time {wall / 60:.1f} min."
    )
    print(write_report(__file__, argv, f"{text}\n\n{notes}", md_path, title=f"bench_prune: {task}"))
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
