"""Recipe: Pruning-Adapter on the packaged MiniLM-L6 and SST-2 (train, prune, evaluate, merge, save, report).

    python recipes/pruning_adapter.py                        # progressive, FFN 50% + heads 50% (global), 1000 steps
    python recipes/pruning_adapter.py --steps 1600 --activation-checkpointing   # leanest memory, same numbers
    python recipes/pruning_adapter.py --schedule oneshot --glue-task RTE --steps 300

The backbone's weights stay frozen throughout (its LayerNorms train, unless ``--no-train-norms``).
``progressive`` (the default) scores on the training batches and prunes along a cubic schedule while the
adapters train (``PruningAdapterCallback`` in an unchanged ``Trainer``; activations are recomputed until the
final prune). ``oneshot`` first fits the classification head on frozen features (head-only gradients),
scores FFN neurons and heads with gate gradients of the task loss on calibration batches, prunes, then
trains adapters on the smaller model. The merged model is saved as a compact safetensors folder
(``global`` mode: load it after ``import compress``) next to the adapter checkpoint.

The configurations are built by :mod:`common.pruning_adapter`, shared with
``recipes/bench_pruning_adapter.py``. Run with the package installed (``pip install -e .``; ``./run.sh`` does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import compress
from common.pruning_adapter import add_arguments, build, encoder_layer_params, lr_for, merged
from common.recipe import claim_run_folder, finish_run, load_splits, parse_recipe_args, setup_run
from common.train import evaluate_accuracy, finetune_classifier, load_sequence_classifier, minilm_path
from compress.distributed import is_main_process
from compress.export import atomic_directory
from compress.hub import annotate_card

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--schedule", choices=["oneshot", "progressive"], default="progressive")
    p.add_argument("--out", default=str(REPO / "runs" / "pruning_adapter"), help="output folder")
    args = parse_recipe_args(p, argv)
    claim_run_folder(args, p.description)
    setup_run(verbose=True, log_format="%(message)s")  # the library's INFO lines narrate pruning
    print(f"config: {vars(args)}")

    train, test, source = load_splits(args.glue_task, train_rows=args.train_rows, seed=args.seed)
    args.num_labels = len(set(train["label"]))
    kind = f"pa-{args.schedule}"
    model, tokenizer, callbacks = build(kind, args, calibration=train)
    dense_encoder = encoder_layer_params(load_sequence_classifier(minilm_path(), num_labels=args.num_labels)[0])
    stats = finetune_classifier(model, tokenizer, train, steps=args.steps, batch_size=args.batch_size,
                                lr=lr_for(kind, args), max_length=args.max_length, seed=args.seed,
                                callbacks=callbacks, activation_checkpointing=args.activation_checkpointing,
                                group_by_length=args.group_by_length)
    accuracy = evaluate_accuracy(model, tokenizer, test, max_length=args.max_length)  # every process takes part
    if not is_main_process():  # the main process saves and reports; the others are done
        return 0
    out = Path(args.out)
    with atomic_directory(out / "adapter", overwrite=True, writes_adapter=True) as tmp:
        model.save_pretrained(tmp)
    plain = merged(model)
    compress.save_pretrained(plain, out / "merged", tokenizer=tokenizer, overwrite=True,
                             title="MiniLM-L6 pruned with Pruning-Adapter")
    print(f"data: {source}")
    print(f"trained {stats['steps']} steps on {stats['processes']} process(es) in {stats['train_time_s']:.0f} s; "
          f"test accuracy {accuracy:.2%}")
    print(f"encoder-layer params: {encoder_layer_params(plain):,} ({encoder_layer_params(plain) / dense_encoder:.1%}"
          " of dense)")
    print(f"widths: {model.peft_config['default'].pruning_plan[-1]['widths_after']}")
    print(f"saved: {out / 'adapter'} (PeftModel.from_pretrained after `import compress`), {out / 'merged'}")
    metrics = {"test_accuracy": accuracy, "encoder_params_vs_dense": encoder_layer_params(plain) / dense_encoder}
    finish_run(out, args, metrics, model_folder=out / "merged", datasets=["glue"], task="text-classification")
    annotate_card(out / "adapter", datasets=["glue"], metrics=metrics, task="text-classification")
    return 0


if __name__ == "__main__":
    sys.exit(main())
