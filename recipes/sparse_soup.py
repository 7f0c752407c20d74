"""Sparse model soups on MiniLM-L6 + SST-2 (or a GLUE task): prune-retrain cycles whose retraining averages
several fine-tunes, against plain iterative magnitude pruning (IMP) with the same training steps.

1. ``dense``: MiniLM-L6 fine-tuned for ``--steps`` (the start of every sparse run, and the dense baseline), saved
   as ``<out>/dense``; ``--start FOLDER`` prunes an already fine-tuned classifier instead (e.g. that folder).
2. Unstructured cycles at ``--sparsities`` (e.g. 50% -> 70% -> 90%): each cycle prunes the previous soup by
   magnitude, fine-tunes ``--ingredients`` copies of it for ``--cycle-steps`` each (seeds differ), and averages
   them (``soup``, the next cycle's start); the ``greedy`` soup of the same ingredients is reported beside it.
   ``--cycle-lrs`` gives each ingredient its own learning rate (the seeds differ either way).
3. ``IMP``: the same cycles with one fine-tune of ``--ingredients x --cycle-steps`` steps each at ``--cycle-lr``:
   the same compute.
4. Each ``--patterns`` (e.g. 2:4): one cycle from the dense model, soup against one fine-tune of the same steps.

Test accuracy of every ingredient, both soups, IMP and the dense model; validation (``--val-rows`` held-out
training rows) chooses the greedy soup. Also the size of the final soups as a plain transformers folder (dense
tensors with zeros) and as the compact sparse file (values + bitmask, ``compress.load_sparse``). Figures are
printed and written as markdown (``--md``), never asserted. With no ``--sparsities`` and no ``--patterns`` the
recipe only fine-tunes and saves the dense start.

    python recipes/sparse_soup.py --steps 1000 --cycle-steps 150 --sparsities 0.5 0.7 0.9 --patterns 2:4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from compress.plugins.sparse_soup.soup import load_ingredient

import compress
from common.recipe import (
    add_data_arguments,
    claim_run_folder,
    finish_run,
    load_splits,
    parse_recipe_args,
    setup_run,
    write_report,
)
from common.train import evaluate_accuracy, finetune_classifier, load_sequence_classifier, minilm_path
from compress.distributed import is_main_process, wait_for_everyone
from compress.measure import format_table

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(p)
    p.add_argument("--cycle-steps", type=int, default=150, help="training steps of each ingredient per cycle (150)")
    p.add_argument("--ingredients", type=int, default=3, help="fine-tunes averaged per cycle (3)")
    p.add_argument("--sparsities", type=float, nargs="*", default=[0.5, 0.7, 0.9],
                   help="unstructured sparsity of each cycle, non-decreasing (0.5 0.7 0.9)")
    p.add_argument("--patterns", nargs="*", default=["2:4"], help="n:m patterns, one cycle each (2:4)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the dense fine-tune (1e-4)")
    p.add_argument("--cycle-lr", type=float, default=5e-5, help="learning rate of IMP's retraining, and of each "
                   "ingredient's unless --cycle-lrs (5e-5)")
    p.add_argument("--cycle-lrs", type=float, nargs="+", default=None,
                   help="one learning rate per ingredient (default: --cycle-lr for every ingredient)")
    p.add_argument("--start", help="a fine-tuned sequence classifier folder to prune instead of fine-tuning MiniLM "
                   "(--steps and --lr are then unused)")
    p.add_argument("--val-rows", type=int, default=500, help="training rows held out to score the greedy soup")
    p.add_argument("--out", default=str(REPO / "runs" / "sparse_soup"))
    p.add_argument("--md", default=str(REPO / "runs" / "sparse_soup.md"))
    args = parse_recipe_args(p, argv)
    if args.cycle_lrs is not None and len(args.cycle_lrs) != args.ingredients:
        p.error(f"--cycle-lrs has {len(args.cycle_lrs)} learning rates for --ingredients {args.ingredients}: give one "
                "per ingredient")
    if args.start is not None and not (Path(args.start) / "config.json").is_file():
        p.error(f"--start {args.start} is not a model folder (no config.json): give a fine-tuned classifier saved "
                "with save_pretrained, e.g. <out>/dense of an earlier run")
    claim_run_folder(args, p.description)
    setup_run()
    print(f"config: {vars(args)}")
    started = time.time()
    train, test, source = load_splits(args.glue_task, train_rows=args.train_rows, seed=args.seed)
    shuffled = train.shuffle(seed=args.seed)
    validation = shuffled.select(range(args.val_rows))
    train = shuffled.select(range(args.val_rows, len(shuffled)))
    num_labels = len(set(train["label"]))
    out = Path(args.out)

    if args.start is not None:
        dense, tokenizer = load_sequence_classifier(args.start, num_labels=num_labels, seed=args.seed)
    else:
        dense, tokenizer = load_sequence_classifier(minilm_path(), num_labels=num_labels, seed=args.seed)
        finetune_classifier(dense, tokenizer, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            max_length=args.max_length, seed=args.seed, group_by_length=args.group_by_length)
        if is_main_process():
            compress.save_pretrained(dense, out / "dense", tokenizer=tokenizer, overwrite=True,
                                     title="MiniLM-L6 fine-tuned: the dense start of the sparse soups")
        wait_for_everyone()

    def accuracy(model, ds=test) -> float:
        return evaluate_accuracy(model, tokenizer, ds, max_length=args.max_length)

    def val_score(model) -> float:
        return accuracy(model, validation)

    def retrain(steps: int):
        def train_fn(peft_model, seed: int = 0, lr: float = args.cycle_lr) -> None:
            finetune_classifier(peft_model, tokenizer, train, steps=steps, batch_size=args.batch_size,
                                lr=lr, max_length=args.max_length, seed=args.seed * 100 + seed,
                                group_by_length=args.group_by_length)
        return train_fn

    dense_acc = accuracy(dense)
    print(f"[dense] test accuracy {dense_acc:.2%}", flush=True)
    rows = [{"config": "dense", "sparsity": "0%", "ingredients (test acc)": "", "uniform soup": "",
             "greedy soup": "", "IMP (same steps)": "", "best ingredient": f"{dense_acc:.2%}", "soup - IMP (pt)": ""}]
    lrs = args.cycle_lrs or [args.cycle_lr] * args.ingredients
    vary = [{"seed": i, "lr": lr} for i, lr in enumerate(lrs)]
    schedules = []
    if args.sparsities:
        schedules.append(("unstructured", args.sparsities, compress.SparseSoupConfig(
            task_type="SEQ_CLS", sparsity=args.sparsities[0])))
    sizes, metrics = [], {"dense_test_accuracy": dense_acc}
    for pattern in args.patterns:
        schedules.append((pattern, [None], compress.SparseSoupConfig(task_type="SEQ_CLS", pattern=pattern)))
    for name, sparsities, config in schedules:
        workdir = out / name.replace(":", "-")
        if sparsities == [None]:  # an n:m pattern: one cycle
            soup_run = _one_cycle(dense, config, retrain(args.cycle_steps), vary, val_score, workdir / "soup",
                                  tokenizer)
            imp_run = _one_cycle(dense, config, retrain(args.ingredients * args.cycle_steps), [{"seed": 0}],
                                 None, workdir / "imp", tokenizer)
            sparsities = [config.sparsity]
        else:
            soup_run = compress.run_sparse_soup(dense, sparsities, retrain(args.cycle_steps), args.ingredients,
                                                eval_fn=val_score, vary=vary, config=config,
                                                workdir=workdir / "soup", tokenizer=tokenizer)
            imp_run = compress.run_sparse_soup(dense, sparsities, retrain(args.ingredients * args.cycle_steps), 1,
                                               config=config, workdir=workdir / "imp", tokenizer=tokenizer)
        for c, sparsity in enumerate(sparsities):
            cycle = workdir / "soup" / f"cycle{c}"
            ingredients = [cycle / f"ingredient{i}" for i in range(args.ingredients)]
            scores = [accuracy(load_ingredient(f)) for f in ingredients]
            uniform = load_ingredient(cycle / "soup")
            greedy = compress.make_soup(ingredients, strategy="greedy", eval_fn=val_score)
            imp = load_ingredient(workdir / "imp" / f"cycle{c}" / "soup")
            uniform_acc, greedy_acc, imp_acc = accuracy(uniform), accuracy(greedy), accuracy(imp)
            label = f"{sparsity:.0%}" if name == "unstructured" else name
            rows.append({"config": f"{name} cycle {c + 1}" if name == "unstructured" else name, "sparsity": label,
                         "ingredients (test acc)": " / ".join(f"{s:.2%}" for s in scores),
                         "uniform soup": f"{uniform_acc:.2%}",
                         "greedy soup": f"{greedy_acc:.2%} ({len(greedy.config.soup['kept'])} kept)",
                         "IMP (same steps)": f"{imp_acc:.2%}", "best ingredient": f"{max(scores):.2%}",
                         "soup - IMP (pt)": f"{100 * (uniform_acc - imp_acc):+.1f}"})
            metrics[f"{label}_uniform_soup_test_accuracy"] = uniform_acc
            metrics[f"{label}_imp_test_accuracy"] = imp_acc
            print(f"[{label}] ingredients {scores}, uniform {uniform_acc:.2%}, greedy {greedy_acc:.2%}, "
                  f"IMP {imp_acc:.2%}", flush=True)
        final = load_ingredient(workdir / "soup" / f"cycle{len(sparsities) - 1}" / "soup")
        if is_main_process():
            compress.save_sparse(final, workdir / "compact", tokenizer=tokenizer, overwrite=True)
        wait_for_everyone()
        dense_folder = workdir / "soup" / f"cycle{len(sparsities) - 1}" / "soup"
        hf_mb, compact_mb = _weights_mb(dense_folder), _weights_mb(workdir / "compact")
        sizes.append({"soup": f"{name} at {sparsities[-1]:.0%}", "HF folder (zeros) MB": f"{hf_mb:.1f}",
                      "compact sparse MB": f"{compact_mb:.1f}", "compact / HF": f"{compact_mb / hf_mb:.2f}"})
        del soup_run, imp_run
    start = (f"Dense start: {args.start}" if args.start is not None
             else f"Dense start: {args.steps} steps at lr {args.lr} (saved in {out / 'dense'})")
    lr_text = " / ".join(f"{lr:g}" for lr in lrs) if args.cycle_lrs else f"{args.cycle_lr:g}"
    notes = (f"all-MiniLM-L6-v2 + seeded head; data: {source}; train rows {len(train):,} (+{args.val_rows} held out "
             f"for the greedy soup), test rows {len(test):,}. {start}. Each cycle: magnitude masks on the previous "
             f"soup (per layer, every linear layer of the blocks), {args.ingredients} ingredients x "
             f"{args.cycle_steps} steps at lr {lr_text} (seeds differ), uniform soup as the next start; IMP: one run "
             f"of {args.ingredients * args.cycle_steps} steps per cycle at lr {args.cycle_lr:g}. Batch "
             f"{args.batch_size}, max length {args.max_length}, seed {args.seed}. Sizes: the weights file of the "
             f"final soup. Wall time {(time.time() - started) / 60:.1f} min.")
    tables = [format_table(rows)] + ([format_table(sizes)] if sizes else [])
    if is_main_process():
        print(write_report(__file__, argv, "\n\n".join([*tables, notes]), args.md))
    finish_run(out, args, metrics)
    return 0


def _weights_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def _one_cycle(start, config, train_fn, vary, eval_fn, workdir: Path, tokenizer):
    """One cycle at a fixed pattern, saved like run_sparse_soup's first cycle."""
    return compress.run_sparse_soup(start, [config.sparsity], train_fn, len(vary), eval_fn=eval_fn, vary=vary,
                                    config=config, workdir=workdir, tokenizer=tokenizer)


if __name__ == "__main__":
    sys.exit(main())
