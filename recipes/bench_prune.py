"""Benchmark: FFN pruning of a fine-tuned MiniLM-L6 at several ratios vs. an equally trained dense model.

Protocol (every model ends with the same number of optimizer steps, N + R):

1. load the packaged all-MiniLM-L6-v2 with a seeded classification head; fine-tune it N steps (``--steps``);
2. dense reference: a copy of that model fine-tuned R more steps (``--recovery-steps``);
3. for each ratio: a copy of the N-step model, pruned (``ratio`` of every layer's FFN neurons, Taylor
   importance on calibration batches from the training set), then fine-tuned R steps with the same
   schedule, seed and data order as the dense reference;
4. every model is saved with ``compress.save_pretrained`` and measured in this process: parameters, saved
   folder size, CPU latency (batch 32, sequence 128; median over interleaved rounds, so load changes on the
   machine hit all models alike) and test accuracy.

Data: ``../shared/data/sst2`` (train.tsv / test.tsv = official SST-2 dev set) next to the repository, or
the shipped SST-2 sample when absent; ``--glue-task MRPC`` (CoLA, RTE, SST-2) uses
``../shared/data/glue/<task>`` with dev.tsv as the test set. Prints a table and writes it as markdown
(``--md``). Timings are printed, never asserted.

    python recipes/bench_prune.py                      # SST-2: 10-25 minutes on 2 CPU cores
    python recipes/bench_prune.py --glue-task MRPC --steps 300 --recovery-steps 100   # about 10-25 minutes
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GLUE_TASKS = ("SST-2", "CoLA", "MRPC", "RTE")

sys.path.insert(0, str(REPO))  # run from a checkout without installing

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=800, help="dense fine-tuning steps N before pruning (800)")
    p.add_argument("--recovery-steps", type=int, default=250,
                   help="steps R after pruning; the dense reference also gets R more steps (250)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                   help="FFN pruning ratios (fraction of neurons removed)")
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
    p.add_argument("--data", type=Path, help="explicit data folder (train + test/dev files)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_prune", help="where models are saved")
    p.add_argument("--md", type=Path, help="markdown output (default runs/bench_prune.md, or "
                                           "runs/bench_prune_<task>.md with --glue-task)")
    p.add_argument("--latency-rounds", type=int, default=3, help="interleaved latency rounds (3)")
    p.add_argument("--latency-repeats", type=int, default=3, help="timed calls per model per round (3)")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def load_data(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from compress.data import load_task

    if args.data is not None:
        folder = args.data
    elif args.glue_task:
        folder = SHARED_DATA / "glue" / args.glue_task
    else:
        folder = SHARED_DATA / "sst2"
    if folder.is_dir():
        test_split = "test" if (folder / "test.tsv").is_file() and not args.glue_task else "dev"
        train, test = load_task(folder, "train"), load_task(folder, test_split)
        return train, test, f"{folder} (train.tsv / {test_split}.tsv)"
    if args.glue_task or args.data is not None:
        raise SystemExit(f"data folder {folder} not found")
    print(f"note: {folder} not found; using the SST-2 sample shipped in the package")
    train, test = load_task("sst2-sample", "train"), load_task("sst2-sample", "test")
    return train, test, "shipped SST-2 sample (2,000 train rows; test = 872-row official dev set)"


def latency_batch(tokenizer, texts, pairs=None, batch_size: int = 32, seq_len: int = 128) -> dict:
    rows = [texts[i % len(texts)] for i in range(batch_size)]
    second = [pairs[i % len(pairs)] for i in range(batch_size)] if pairs is not None else None
    return dict(tokenizer(rows, second, padding="max_length", truncation=True, max_length=seq_len,
                          return_tensors="pt"))


def interleaved_latency(models: dict[str, torch.nn.Module], batch: dict, rounds: int, repeats: int) -> dict:
    """Median forward latency per model, rounds interleaved across models to share machine-load drift."""
    from compress.measure import inference_latency

    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name] += inference_latency(model, batch, warmup=1, repeats=repeats).times_s
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import datasets
    import transformers

    if not args.verbose:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel warning on import
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()

    from sklearn.metrics import f1_score, matthews_corrcoef

    from compress.data import tokenize_dataset
    from compress.export import save_pretrained
    from compress.measure import count_parameters, folder_size, format_table
    from compress.pruning.engine import prune_model
    from compress.train import finetune_classifier, load_sequence_classifier, minilm_path, predict_labels

    started = time.perf_counter()
    train, test, source = load_data(args)
    if args.train_rows and len(train) > args.train_rows:
        train = train.shuffle(seed=args.seed).select(range(args.train_rows))
    num_labels = int(max(train["label"])) + 1
    task = args.glue_task or "SST-2"
    md_path = args.md or REPO / "runs" / ("bench_prune.md" if not args.glue_task
                                          else f"bench_prune_{args.glue_task.lower().replace('-', '')}.md")
    print(f"data: {source}; train rows used {len(train):,}, test rows {len(test):,}; "
          f"{torch.get_num_threads()} CPU threads", flush=True)

    model, tok = load_sequence_classifier(minilm_path(), num_labels=num_labels, seed=args.seed)
    fit = dict(batch_size=args.batch_size, lr=args.lr, max_length=args.max_length, seed=args.seed,
               freeze_embeddings=True)
    labels = np.asarray(test["label"])

    def score(m) -> dict[str, float]:
        pred = predict_labels(m, tok, test, max_length=args.max_length)
        out = {"acc": float(np.mean(pred == labels))}
        if task == "CoLA":
            out["mcc"] = float(matthews_corrcoef(labels, pred))
        if task == "MRPC":
            out["f1"] = float(f1_score(labels, pred))
        return out

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
    rows.append({"model": "dense", "ffn": dense.config.intermediate_size, "before": None, **score(dense)})
    print(f"[dense] test acc after {args.steps}+{args.recovery_steps} steps {rows[-1]['acc']:.4f}", flush=True)

    calib = tokenize_dataset(train, tok, max_length=args.max_length)
    reports = {}
    for r in args.ratios:
        name = f"ffn-{r:g}"
        pruned = copy.deepcopy(model)
        t0 = time.perf_counter()
        reports[name] = prune_model(pruned, ratio=r, structures=("ffn",), importance=args.importance,
                                    data=calib, num_batches=args.calib_batches, batch_size=args.batch_size,
                                    tokenizer=tok)
        prune_s = time.perf_counter() - t0
        before = score(pruned)["acc"]
        if args.recovery_steps:
            fit_r = finetune_classifier(pruned, tok, train, steps=args.recovery_steps, **fit)
        models[name] = pruned
        rows.append({"model": name, "ffn": pruned.config.intermediate_size, "before": before, **score(pruned)})
        print(f"[{name}] pruned in {prune_s:.0f} s; acc before recovery {before:.4f}, after "
              f"{rows[-1]['acc']:.4f}", flush=True)

    sizes = {}
    for name, m in models.items():
        out = save_pretrained(m, args.out / task.lower() / name, tokenizer=tok, report=reports.get(name),
                              overwrite=True)
        sizes[name] = folder_size(out)
    pairs = test["text_pair"] if "text_pair" in test.column_names else None
    lat = interleaved_latency(models, latency_batch(tok, test["text"], pairs), args.latency_rounds,
                              args.latency_repeats)

    def non_embedding(m) -> int:
        emb = getattr(m.base_model, "embeddings", None)
        return count_parameters(m) - (count_parameters(emb) if emb is not None else 0)

    p0, s0, l0 = count_parameters(dense), sizes["dense"], lat["dense"]
    e0 = non_embedding(dense)
    table = []
    for row in rows:
        name = row["model"]
        params = count_parameters(models[name])
        entry = {
            "model": name,
            "FFN width": row["ffn"],
            "params": params,
            "params ratio": f"{params / p0:.3f}",
            "non-emb. params ratio": f"{non_embedding(models[name]) / e0:.3f}",
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
    command = "python recipes/bench_prune.py " + " ".join(sys.argv[1:] if argv is None else argv)
    notes = (
        f"all-MiniLM-L6-v2 + seeded head, {task}; data: {source}; train rows used {len(train):,}; "
        f"test rows {len(test):,}.\n"
        f"Protocol: dense fine-tune {args.steps} steps, then +{args.recovery_steps} steps for the dense row and "
        f"{args.recovery_steps} recovery steps after pruning for each ratio (all models: "
        f"{args.steps + args.recovery_steps} steps; batch {args.batch_size}, seq {args.max_length}, "
        f"lr {args.lr:g}, word embeddings frozen, seed {args.seed}). Pruning: {args.importance} importance on "
        f"{args.calib_batches} x {args.batch_size} training rows, uniform FFN widths.\n"
        f"Ratios are vs. the dense row; latency: CPU, batch 32 x seq 128, median of "
        f"{args.latency_rounds} interleaved rounds x {args.latency_repeats} calls, {torch.get_num_threads()} "
        f"threads. Dense accuracy after {args.steps} steps (before the extra steps): {base_scores['acc']:.4f}. "
        f"Wall time {wall / 60:.1f} min."
    )
    print()
    print(text)
    print()
    print(notes)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(f"# bench_prune: {task}\n\n`{command}`\n\n{text}\n\n{notes}\n", encoding="utf-8")
    print(f"\nwrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
