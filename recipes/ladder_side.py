"""Recipe: Ladder Side-Tuning on the packaged MiniLM-L6 and SST-2 (initialise, train, evaluate, save, reload).

    python recipes/ladder_side.py                           # side network 1/8 as wide, fisher init, 1000 steps
    python recipes/ladder_side.py --r 4 --side-layers 1 3 5 --steps 1600
    python recipes/ladder_side.py --quantize 8bit --glue-task MRPC --steps 350

The backbone stays frozen and runs without autograd; a side network of its own block type at 1/r of its width,
initialised from the backbone pruned by fisher importance on calibration rows, learns the task through ladders
from every (or every listed) backbone block. Training is an unchanged ``Trainer``. The adapter folder (side
network, ladders, gates, classifier: a few MB) is saved atomically and reloaded onto a fresh backbone to check
that it gives the same accuracy.

The configuration is built with :mod:`common.ladder_side`, shared with ``recipes/bench_ladder_side.py``.
Run with the package installed (``pip install -e .``; ``./run.sh`` does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peft import PeftModel, get_peft_model

import compress
from common.ladder_side import add_arguments, backbone, init_side
from common.recipe import claim_run_folder, finish_run, load_splits, parse_recipe_args, setup_run
from common.train import evaluate_accuracy, finetune_classifier
from compress.distributed import is_main_process, wait_for_everyone
from compress.export import atomic_directory

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--r", type=int, default=8, help="reduction factor: side width = backbone width / r (8)")
    p.add_argument("--side-layers", type=int, nargs="+", default=None,
                   help="backbone blocks that feed ladders (default: all six)")
    p.add_argument("--side-init", choices=["pruned", "random"], default="pruned")
    p.add_argument("--gate-init", type=float, default=0.0,
                   help="initial gate alpha: sigmoid(alpha / 0.1) of each side block's input is the ladder (0)")
    p.add_argument("--add-backbone-output", action="store_true",
                   help="add the side output to the backbone's final hidden state instead of replacing it")
    p.add_argument("--pooling", choices=["segments", "model"], default=None,
                   help="what the classifier reads: the side states pooled per segment, or BERT's pooler on the "
                        "first token (default: segments, or model with --add-backbone-output)")
    p.add_argument("--quantize", choices=["8bit", "4bit", "int8"], default=None,
                   help="frozen backbone in bitsandbytes 8-bit or nf4 4-bit, or its encoder in torch's dynamic int8")
    p.add_argument("--out", default=str(REPO / "runs" / "ladder_side"), help="output folder")
    args = parse_recipe_args(p, argv)
    claim_run_folder(args, p.description)
    setup_run(verbose=True, log_format="%(message)s")
    print(f"config: {vars(args)}")

    train, test, source = load_splits(args.glue_task, train_rows=args.train_rows, seed=args.seed)
    args.num_labels = len(set(train["label"]))
    config = compress.LadderSideConfig(task_type="SEQ_CLS", r=args.r, side_layers=args.side_layers,
                                       side_init=args.side_init, importance=args.importance,
                                       gate_init=args.gate_init, add_backbone_output=args.add_backbone_output,
                                       pooling=args.pooling)
    model, tokenizer = backbone(args, quantize=args.quantize)
    model = get_peft_model(model, config)
    if args.side_init == "pruned":
        init_side(model, tokenizer, args, calibration=train)
    trainable, total = model.get_nb_trainable_parameters()
    stats = finetune_classifier(model, tokenizer, train, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lst_lr, max_length=args.max_length, seed=args.seed,
                                group_by_length=args.group_by_length)
    accuracy = evaluate_accuracy(model, tokenizer, test, max_length=args.max_length)  # every process takes part
    out = Path(args.out)
    if is_main_process():
        with atomic_directory(out / "adapter", overwrite=True, writes_adapter=True) as tmp:
            model.save_pretrained(tmp)
    wait_for_everyone()  # every process reloads what the main process saved
    reloaded = PeftModel.from_pretrained(backbone(args, quantize=args.quantize)[0], out / "adapter")
    again = evaluate_accuracy(reloaded, tokenizer, test, max_length=args.max_length)
    print(f"data: {source}")
    print(f"trained {stats['steps']} steps on {stats['processes']} process(es) in {stats['train_time_s']:.0f} s; "
          f"test accuracy {accuracy:.2%} "
          f"(reloaded adapter: {again:.2%})")
    print(f"trainable params: {trainable:,} of {total:,} ({trainable / total:.2%})")
    print(f"saved: {out / 'adapter'} (PeftModel.from_pretrained onto MiniLM-L6 after `import compress`)")
    finish_run(out, args, {"test_accuracy": accuracy, "trainable_params": trainable}, model_folder=out / "adapter",
               datasets=["glue"], task="text-classification")
    return 0


if __name__ == "__main__":
    sys.exit(main())
