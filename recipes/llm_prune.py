"""Recipe: prune a decoder LLM, measure its perplexity, recover it with LoRA, measure again, save the merged model.

    python recipes/llm_prune.py --model smollm2 --sparsity 0.3 --structures ffn --importance flap \\
        --reconstruct least_squares --data valid.tokens.txt --eval-data wiki.test.raw --eval-max-tokens 8192
    python recipes/llm_prune.py --model smollm2 --pruned smollm2-ffn30 --data valid.tokens.txt \\
        --eval-data wiki.test.raw --eval-max-tokens 8192 --steps 300 --distill-weight 0.5 --measure-full-ft

Phases: (1) prune ``--model`` with :func:`compress.prune_model` (the options of ``compress prune``; calibration
rows of ``--data``), or load ``--pruned``, a folder ``compress prune`` wrote; (2) perplexity of the dense
(unless ``--skip-dense-eval``) and the pruned model on ``--eval-data`` (:func:`compress.evaluate_perplexity`);
(3) recovery: LoRA on every attention and FFN projection, trained on rows of ``--data`` drawn at seeded offsets
(``--recovery-seed``, another seed than calibration's), optionally distilling the dense model's logits
(``--distill-weight``); (4) perplexity again; (5) the adapters merged into the weights and the model saved with
:func:`compress.save_pretrained` (a uniform folder loads in stock transformers, a global one after
``import compress``); (6) the run folder ``--out``: ``metrics.json``, ``resolved_config.json``, the model in
``model/``.

The evaluation text is never trained or calibrated on: ``--eval-data`` that equals ``--data``, or is contained in
it (or it in ``--eval-data``), is refused. Threads: torch's default, or ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import compress
from common.causal_lm import DistilledCausalLM, lora_config, train_causal_lm, training_batches
from common.recipe import claim_run_folder, finish_run, parse_recipe_args, setup_run
from compress.cli import UsageError
from compress.cli.parser import EVAL_DATASET, EVAL_DATASET_CONFIG, EVAL_SPLIT, add_prune_options
from compress.errors import CompressError

if TYPE_CHECKING:
    from compress.cli.evaluate import LocalCausalLM

REPO = Path(__file__).resolve().parents[1]
PROG = "llm_prune.py"
#: the options of `compress prune` this recipe takes (argparse destinations): that command's flags, help, choices and
#: defaults, from :func:`compress.cli.parser.add_prune_options`
PRUNE_OPTIONS = tuple(action.dest for action in add_prune_options(argparse.ArgumentParser()))
#: calibration rows per forward pass while pruning (memory only: the scores do not depend on it)
CALIB_BATCH_SIZE = 16
RECOVERY_METHODS = ("lora", "none")
logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR_OR_HUB_ID", help="the dense causal LM: a save_pretrained folder or Hub id")
    p.add_argument("--data", metavar="FILE_OR_DATASET",
                   help="calibration and recovery text: a text file (.raw: WikiText's raw files), a .jsonl/.json/"
                        ".csv/.tsv file or save_to_disk folder with a text column, or a Hub dataset id")
    p.add_argument("--data-config", default=None, help="configuration of a Hub dataset given as --data")
    p.add_argument("--split", default="train", help="split of --data, a saved DatasetDict or Hub dataset (%(default)s)")
    p.add_argument("--text-column", default=None, help="column of --data / --eval-data holding the text")
    p.add_argument("--out", default=str(REPO / "runs" / "llm_prune"), help="run folder (%(default)s)")

    prune = p.add_argument_group("pruning (the options of `compress prune`), or --pruned")
    add_prune_options(prune)
    prune.add_argument("--calib-rows", type=int, default=128, help="calibration rows of --data (%(default)s)")
    prune.add_argument("--calib-length", type=int, default=512, help="tokens per calibration row (%(default)s)")
    prune.add_argument("--seed", type=int, default=0,
                       help="offsets of the calibration rows, as compress prune's --seed (%(default)s)")
    prune.add_argument("--pruned", default=None, metavar="DIR",
                       help="a folder written by `compress prune` from --model, recovered instead of pruning again")

    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument("--eval-data", default=None, metavar="FILE_OR_DATASET",
                            help=f"evaluation text (default: the Hub's {EVAL_DATASET} {EVAL_DATASET_CONFIG}, "
                                 f"{EVAL_SPLIT} split); never --data")
    evaluation.add_argument("--eval-config", default=None, help="configuration of a Hub dataset given as --eval-data")
    evaluation.add_argument("--eval-split", default=EVAL_SPLIT, help="split of --eval-data (%(default)s)")
    evaluation.add_argument("--eval-max-tokens", type=int, default=None, help="score the first N tokens (all)")
    evaluation.add_argument("--window", type=int, default=512,
                            help="tokens per evaluation window, no overlap (%(default)s)")
    evaluation.add_argument("--eval-every", type=int, default=0, help="also evaluate every N recovery steps (0: no)")
    evaluation.add_argument("--skip-dense-eval", action="store_true", help="do not evaluate the dense model")

    recovery = p.add_argument_group("recovery")
    recovery.add_argument("--recover", choices=RECOVERY_METHODS, default="lora",
                          help="lora: rank --r adapters on every attention and FFN projection, merged when done; "
                               "none: evaluate and save the pruned model (%(default)s)")
    recovery.add_argument("--steps", type=int, default=300,
                          help="optimizer steps, one batch of new rows each (%(default)s)")
    recovery.add_argument("--batch-size", type=int, default=4, help="rows per step (%(default)s)")
    recovery.add_argument("--seq-len", type=int, default=512, help="tokens per row (%(default)s)")
    recovery.add_argument("--lr", type=float, default=2e-4,
                          help="peak learning rate, AdamW without weight decay (%(default)s)")
    recovery.add_argument("--warmup-steps", type=int, default=None,
                          help="linear warm-up steps, then linear decay to 0 (default: 10%% of --steps)")
    recovery.add_argument("--r", type=int, default=8, help="LoRA rank (%(default)s)")
    recovery.add_argument("--lora-alpha", type=float, default=16,
                          help="LoRA scale numerator: scale = alpha / r (%(default)s)")
    recovery.add_argument("--lora-dropout", type=float, default=0.0,
                          help="dropout on the LoRA path; above 0 each adapted projection keeps its own dropped copy "
                               "of its input for the backward pass, more memory than full fine-tuning's activations "
                               "(%(default)s)")
    recovery.add_argument("--distill-weight", type=float, default=0.0,
                          help="W in (1 - W) * CE + W * KL(dense || pruned): logit distillation from the dense model "
                               "(%(default)s: off)")
    recovery.add_argument("--distill-temperature", type=float, default=1.0,
                          help="temperature T of the KL term (%(default)s)")
    recovery.add_argument("--recovery-seed", type=int, default=None,
                          help="offsets of the recovery rows and LoRA's initialisation (default: --seed + 1)")
    recovery.add_argument("--measure-full-ft", action="store_true",
                          help="also measure the peak memory of 2 steps of LoRA and of full fine-tuning (AdamW on "
                               "every parameter) on the same batch, each in a fresh process")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... (%(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


@dataclass
class Inputs:
    """What the checks before any work found: the pruning spec (``None`` with ``--pruned``), the local folders
    (:class:`compress.cli.evaluate.LocalCausalLM`, ``None`` for a Hub id), the pruned folder's report, both texts."""

    spec: Any
    model_local: LocalCausalLM | None
    pruned_local: LocalCausalLM | None
    pruned_report: dict | None
    corpus: Any
    eval_corpus: Any


@dataclass
class RecoveryResult:
    """A finished run: the merged (or pruned, with ``--recover none``) model as saved, its tokenizer, the metrics
    written to ``metrics.json`` and the run folder."""

    model: Any
    tokenizer: Any
    metrics: dict[str, Any]
    folder: Path
    saved: Path = field(init=False)

    def __post_init__(self) -> None:
        self.saved = self.folder / "model"


def _positive(name: str, value: float | None, minimum: float = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum:g}, got {value}")


def _same_local_file(a: str, b: str) -> bool:
    first, second = Path(a).expanduser(), Path(b).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def check_inputs(args: argparse.Namespace, defaults: dict[str, Any]) -> Inputs:
    """Every refusal that needs no model weights, each a :class:`UsageError` or :class:`CompressError` of one line:
    option values, the model and pruned folders, both texts (read here) and that they differ."""
    from compress.cli.evaluate import check_local_causal_lm, is_local_model
    from compress.cli.prune import criterion_name
    from compress.data import load_text
    from compress.export import REPORT_FILE
    from compress.pruning.spec import PruningSpec, parse_sparsity

    if not args.model:
        raise UsageError("--model is required: the dense causal LM (a save_pretrained folder or Hub id)")
    if not args.data:
        raise UsageError("--data is required: the calibration and recovery text (a text file or dataset), e.g. "
                         "--data valid.tokens.txt; never the text you evaluate on")
    for name in ("steps", "batch_size", "seq_len", "calib_rows", "calib_length", "r", "eval_max_tokens"):
        _positive(name, getattr(args, name))
    _positive("window", args.window, 2)
    for name in ("eval_every", "warmup_steps", "seed", "recovery_seed"):
        _positive(name, getattr(args, name), 0)
    if args.lr <= 0 or args.distill_temperature <= 0:
        raise UsageError(f"--lr and --distill-temperature must be positive, got {args.lr} and "
                         f"{args.distill_temperature}")
    if not 0 <= args.distill_weight <= 1 or not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--distill-weight must be in [0, 1] and --lora-dropout in [0, 1), got {args.distill_weight}"
                         f" and {args.lora_dropout}")
    if args.warmup_steps is not None and args.warmup_steps > args.steps:
        raise UsageError(f"--warmup-steps {args.warmup_steps} exceeds --steps {args.steps}")
    if args.recover == "none":
        for flag, given in (("--distill-weight", args.distill_weight > 0), ("--measure-full-ft", args.measure_full_ft),
                            ("--eval-every", args.eval_every > 0)):
            if given:
                raise UsageError(f"{flag} applies to recovery training, and --recover is none")

    spec = None
    pruned_local = pruned_report = None
    if args.pruned is not None:
        changed = [name for name in (*PRUNE_OPTIONS, "calib_rows", "calib_length") if getattr(args, name) !=
                   defaults[name]]
        if changed:
            flags = ", ".join("--" + name.replace("_", "-") for name in changed)
            raise UsageError(f"--pruned {args.pruned} is a pruned folder; {flags} would prune again: give --pruned "
                             "or pruning options, not both")
        pruned_local = check_local_causal_lm(args.pruned)
        report_file = pruned_local[0] / REPORT_FILE
        if not report_file.is_file():
            raise UsageError(f"--pruned {args.pruned} has no {REPORT_FILE}: pass a folder written by `compress "
                             "prune` (or compress.save_pretrained with its report)")
        pruned_report = json.loads(report_file.read_text(encoding="utf-8"))
    else:
        sparsity = parse_sparsity(args.sparsity) if args.sparsity is not None else None
        damping = {} if args.damping is None else {"damping": args.damping}
        spec = PruningSpec.from_options(sparsity, args.structures, mode=args.mode, param_sparsity=args.param_sparsity,
                                        importance=criterion_name(args.importance), normalize=args.normalize,
                                        max_keep=args.max_keep, min_keep=args.min_keep, round_to=args.round_to,
                                        compensate_bias=args.compensate_bias, reconstruct=args.reconstruct,
                                        **damping)
    model_local = check_local_causal_lm(args.model) if is_local_model(args.model) else None
    for local in (model_local, pruned_local):
        if local is not None:
            _check_positions(args, local[1], local[0])

    corpus = load_text(args.data, config_name=args.data_config, split=args.split, text_column=args.text_column)
    if args.eval_data is None:
        eval_corpus = load_text(EVAL_DATASET, config_name=args.eval_config or EVAL_DATASET_CONFIG,
                                split=args.eval_split, text_column=args.text_column)
    else:
        eval_corpus = load_text(args.eval_data, config_name=args.eval_config, split=args.eval_split,
                                text_column=args.text_column)
    same = (args.eval_data is not None and _same_local_file(args.data, args.eval_data)) or \
        eval_corpus.text in corpus.text or corpus.text in eval_corpus.text
    if same:
        raise UsageError(f"--eval-data {eval_corpus.source} and --data {corpus.source} hold the same text (or one "
                         "holds the other); never train or calibrate on the evaluation text: pass other text as --data "
                         "(e.g. valid.tokens.txt) and the evaluation text as --eval-data (e.g. wiki.test.raw)")
    return Inputs(spec, model_local, pruned_local, pruned_report, corpus, eval_corpus)


def _check_positions(args: argparse.Namespace, config: Any, where: Any) -> None:
    """Rows and windows longer than the model's positions are refused."""
    from compress.evaluate import position_limit

    limit = position_limit(config)
    if limit is None:
        return
    lengths = [("--seq-len", args.seq_len), ("--window", args.window)]
    if args.pruned is None:
        lengths.append(("--calib-length", args.calib_length))
    for flag, value in lengths:
        if value > limit:
            raise UsageError(f"{flag} {value} exceeds the {limit} positions of {where}; use at most {limit}")


def _load(name: str, local: LocalCausalLM | None, tokenizer_from: str | None = None, option: str = "--model"):
    """``(model, tokenizer)`` of a local folder or Hub id, fp32, as ``compress eval`` loads them."""
    from compress.cli.evaluate import load_causal_lm

    return load_causal_lm(name, local, "float32", tokenizer_from, option=option)


def _evaluate(label: str, model, tokenizer, corpus, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    result = compress.evaluate_perplexity(model, tokenizer, corpus, max_tokens=args.eval_max_tokens,
                                          window=args.window, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    print(f"perplexity {label}: {result.perplexity:.2f} (loss {result.loss:.4f}; {seconds:.1f} s)")
    return {**result.to_dict(), "seconds": round(seconds, 1)}


def _prune(args: argparse.Namespace, inputs: Inputs, model, tokenizer) -> dict[str, Any]:
    """Phase 1: prune ``model`` in place as ``compress prune`` does; the report as a dict, calibration noted."""
    from compress.cli.inputs import build_text_calibration
    from compress.export import removed_summary
    from compress.pruning.importance import get_importance

    spec = inputs.spec
    criterion = get_importance(spec.importance)
    batches = None
    calibration = "no calibration data"
    if criterion.needs_calibration or spec.compensate_bias or spec.reconstruct != "none":
        task_loss = criterion.needs_calibration and getattr(criterion, "needs_gradients", True)
        batches = build_text_calibration(inputs.corpus, tokenizer, model, num_rows=args.calib_rows,
                                         length=args.calib_length, batch_size=CALIB_BATCH_SIZE, seed=args.seed,
                                         task_loss=task_loss)
        calibration = (f"calibration: {args.calib_rows} rows x {args.calib_length} tokens from "
                       f"{inputs.corpus.describe()}, seed {args.seed}")
    started = time.perf_counter()
    report = compress.prune_model(model, data=batches, num_batches=len(batches or ()), batch_size=CALIB_BATCH_SIZE,
                                  tokenizer=tokenizer, progress=not args.no_progress, spec=spec).to_dict()
    seconds = time.perf_counter() - started
    print(f"pruned: removed {removed_summary(report)}; {spec.mode} mode, {spec.importance_name} importance, "
          f"{spec.reconstruct} reconstruction; {seconds:.1f} s")
    print(calibration)
    for note in report["notes"]:
        print(f"note: {note}")
    report["seconds"] = round(seconds, 1)
    report["calibration"] = calibration
    return report


def _recovery_note(args: argparse.Namespace, corpus, warmup: int, targets: list[str]) -> str:
    distill = (f", loss (1 - {args.distill_weight:g}) x CE + {args.distill_weight:g} x KL from the dense model at "
               f"temperature {args.distill_temperature:g}" if args.distill_weight > 0 else "")
    return (f"recovered: LoRA r={args.r} (alpha {args.lora_alpha:g}, dropout {args.lora_dropout:g}) on "
            f"{', '.join(targets)}, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens of "
            f"{corpus.source} (seed {_recovery_seed(args)}), AdamW lr {args.lr:g}, {warmup} warm-up steps then linear "
            f"decay{distill}; adapters merged into the weights")


def _recovery_seed(args: argparse.Namespace) -> int:
    return args.seed + 1 if args.recovery_seed is None else args.recovery_seed


def recovery_rows(args: argparse.Namespace, corpus, tokenizer) -> torch.Tensor:
    """The recovery training rows: ``--steps x --batch-size`` rows of ``--seq-len`` tokens of ``--data``, each at an
    offset drawn with the recovery seed (:func:`compress.data.calibration_rows`, the sampling of calibration).

    Rows that need more tokens than the text has repeat parts of it; one warning says so in the terms of this recipe
    (the library's own, which speaks of calibration, is held back for this call). The evaluation text is never among
    them: :func:`check_inputs` refused it as ``--data``."""
    from compress.data import calibration_rows, tokenize_text

    num_rows = args.steps * args.batch_size
    total = tokenize_text(corpus, tokenizer).numel()
    if total < args.seq_len:
        raise UsageError(f"--data {corpus.source} has {total:,} tokens, fewer than one recovery row of --seq-len "
                         f"{args.seq_len}: give more text or a smaller --seq-len")
    needed = num_rows * args.seq_len
    if needed > total:
        logger.warning("the recovery rows overlap: %s steps x %s rows x %s tokens = %s training tokens, drawn at "
                       "random offsets of the %s tokens of --data %s, so training sees parts of that text more than "
                       "once (each token %.1f times on average); for more varied training give a longer --data text, "
                       "or fewer --steps, --batch-size or --seq-len", args.steps, args.batch_size, args.seq_len,
                       f"{needed:,}", f"{total:,}", corpus.source, needed / total)
    library = logging.getLogger("compress.data")
    level = library.level
    library.setLevel(logging.ERROR)
    try:
        return calibration_rows(corpus, tokenizer, num_rows=num_rows, length=args.seq_len, seed=_recovery_seed(args))
    finally:
        library.setLevel(level)


def _measure_memory(args: argparse.Namespace, saved: Path) -> dict[str, Any]:
    """Peak training memory of 2 steps of LoRA and of full fine-tuning on the recipe's first batch, each in a fresh
    process (the saved model has the pruned shapes)."""
    from common.memory import TrainingJob, peak_training_memory

    common = {"model": str(saved), "data": args.data, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "seed": _recovery_seed(args), "lr": args.lr, "r": args.r, "lora_alpha": args.lora_alpha,
              "lora_dropout": args.lora_dropout, "teacher": args.model if args.distill_weight > 0 else None,
              "distill_weight": args.distill_weight, "temperature": args.distill_temperature,
              "data_config": args.data_config, "split": args.split, "text_column": args.text_column}
    figures = {}
    for method in ("lora", "full"):
        job = TrainingJob(factory="common.causal_lm:memory_setup", kwargs={**common, "method": method}, steps=2)
        result = peak_training_memory(job)
        figures[method] = {"increase_mb": round(result.increase_mb, 1), "peak_rss_mb": round(result.peak_rss_mb, 1),
                           "baseline_rss_mb": round(result.baseline_rss_mb, 1),
                           "trainable_params": result.trainable_params,
                           "seconds_per_step": round(result.step_time_mean_s, 3)}
    figures["lora_vs_full"] = figures["lora"]["increase_mb"] / figures["full"]["increase_mb"]
    teacher = ", both distilling from the dense model" if args.distill_weight > 0 else ""
    figures["protocol"] = (f"2 steps of {args.batch_size} x {args.seq_len} tokens on one batch{teacher}, each "
                           "configuration in a fresh process; increase = peak RSS - RSS once the models and batch are "
                           "loaded")
    return figures


def recover(args: argparse.Namespace, inputs: Inputs) -> RecoveryResult:
    """Phases 1-6 (module docstring) once the inputs are checked and the run folder claimed."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from compress.cli.inputs import has_tokenizer, resolve_device
    from compress.evaluate import position_limit
    from compress.export import needs_compress_to_load, removed_summary

    device = resolve_device(args.device)
    out = Path(args.out)
    metrics: dict[str, Any] = {"model": args.model, "pruned_from": args.pruned}
    dense_model = teacher = None
    dense_result = None
    need_dense = inputs.pruned_local is None or not args.skip_dense_eval or args.distill_weight > 0
    if need_dense:
        dense_model, tokenizer = _load(args.model, inputs.model_local)
        if inputs.model_local is None:  # a Hub id: its positions are known now
            _check_positions(args, dense_model.config, args.model)
        dense_model.to(device)
        if not args.skip_dense_eval:
            dense_result = _evaluate("dense", dense_model, tokenizer, inputs.eval_corpus, args)
    if inputs.pruned_local is None:
        if args.distill_weight > 0:
            teacher = copy.deepcopy(dense_model)
        model, report = dense_model, _prune(args, inputs, dense_model, tokenizer)
    else:
        folder = str(inputs.pruned_local[0])
        model, tokenizer = _load(folder, inputs.pruned_local, None if has_tokenizer(inputs.pruned_local[0])
                                 else args.model)
        model.to(device)
        teacher, report = dense_model, dict(inputs.pruned_report)
        print(f"pruned: {folder} (removed {removed_summary(report)}; {report.get('mode')} mode, "
              f"{report.get('importance')} importance)")
    del dense_model
    limit = position_limit(model.config)
    if limit is not None and args.seq_len > limit:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's {limit} positions")
    pruned_result = _evaluate("pruned", model, tokenizer, inputs.eval_corpus, args)
    curve = [{"step": 0, "perplexity": pruned_result["perplexity"]}]

    stats = None
    notes = list(report.get("notes", []))
    if args.recover == "lora":
        warmup = round(0.1 * args.steps) if args.warmup_steps is None else args.warmup_steps
        rows = recovery_rows(args, inputs.corpus, tokenizer)
        vocabulary = model.get_input_embeddings().num_embeddings
        if int(rows.max()) >= vocabulary:
            raise UsageError(f"the tokenizer produces token id {int(rows.max())}, but the model's embedding has "
                             f"{vocabulary} rows: the tokenizer belongs to another model")
        torch.manual_seed(_recovery_seed(args))  # LoRA's initialisation and dropout
        config = lora_config(model, args.r, args.lora_alpha, args.lora_dropout)
        peft_model = get_peft_model(model, config)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        trained = peft_model
        if args.distill_weight > 0:
            trained = DistilledCausalLM(peft_model, teacher.to(device), args.distill_weight, args.distill_temperature)

        def evaluate_during(step: int) -> float:
            return _evaluate(f"after step {step}", peft_model, tokenizer, inputs.eval_corpus, args)["perplexity"]

        print(f"recovery: LoRA r={args.r} on {', '.join(sorted(config.target_modules))}, {trainable:,} trainable "
              f"parameters; {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, lr {args.lr:g}, "
              f"{warmup} warm-up steps" + (f", distillation weight {args.distill_weight:g} (T="
                                           f"{args.distill_temperature:g})" if args.distill_weight > 0 else ""))
        stats = train_causal_lm(trained, training_batches(rows, args.batch_size), lr=args.lr, warmup_steps=warmup,
                                evaluate=evaluate_during, eval_every=args.eval_every, progress=not args.no_progress)
        teacher = trained = None
        curve += stats.curve
        per_step = stats.seconds_per_step()
        print(f"trained {stats.steps} steps in {stats.seconds:.1f} s: {per_step['mean']:.2f} s/step (first "
              f"{per_step['first']:.2f} s); training peak RSS {stats.peak_rss_mb:,.0f} MB, "
              f"+{stats.peak_rss_mb - stats.baseline_rss_mb:,.0f} MB over the RSS before the first step; "
              f"loss {stats.losses[0]:.4f} -> {stats.losses[-1]:.4f}")
        recovered_result = _evaluate("recovered", peft_model, tokenizer, inputs.eval_corpus, args)
        curve.append({"step": stats.steps, "perplexity": recovered_result["perplexity"]})
        model = peft_model.merge_and_unload()
        notes.append(_recovery_note(args, inputs.corpus, warmup, sorted(config.target_modules)))
        metrics["recovery"] = {
            "method": "lora", "r": args.r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "target_modules": sorted(config.target_modules), "trainable_params": trainable, "steps": stats.steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "warmup_steps": warmup,
            "distill_weight": args.distill_weight, "distill_temperature": args.distill_temperature,
            "seed": _recovery_seed(args), "data": inputs.corpus.to_dict(), "losses": stats.losses,
            "loss_terms": stats.terms if args.distill_weight > 0 else [],
        }
        metrics["train_seconds"] = round(stats.seconds, 2)
        metrics["seconds_per_step"] = per_step
        metrics["train_peak_rss_mb"] = round(stats.peak_rss_mb, 1)
        metrics["train_rss_increase_mb"] = round(stats.peak_rss_mb - stats.baseline_rss_mb, 1)
    else:
        recovered_result = None
        notes.append("not recovered: the pruned weights as they are")
    teacher = None

    model.to("cpu").eval()
    title = (f"{model.config.model_type} pruned ({removed_summary(report)})"
             + (" and recovered with LoRA" if args.recover == "lora" else ""))
    card_report = {k: v for k, v in report.items() if k not in ("seconds", "calibration")}
    saved = compress.save_pretrained(model, out / "model", tokenizer=tokenizer, report={**card_report, "notes": notes},
                                     title=title, inputs=[args.model, args.pruned, args.data])
    reloaded = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True)
    probe = torch.arange(min(args.window, 16)).unsqueeze(0) % model.get_input_embeddings().num_embeddings
    with torch.inference_mode():
        difference = float((reloaded(probe).logits - model(probe).logits).abs().max())
    del reloaded
    loading = "after `import compress`" if needs_compress_to_load(model) else "in stock transformers"
    print(f"saved: {saved} (reloads {loading}; largest logit difference after reloading {difference:g})")

    dense_ppl = dense_result["perplexity"] if dense_result else None
    after = recovered_result or pruned_result
    metrics.update({
        "perplexity_dense": dense_ppl, "perplexity_pruned": pruned_result["perplexity"],
        "perplexity_recovered": recovered_result["perplexity"] if recovered_result else None,
        "pruned_vs_dense": pruned_result["perplexity"] / dense_ppl if dense_ppl else None,
        "recovered_vs_dense": after["perplexity"] / dense_ppl if dense_ppl and recovered_result else None,
        "params_dense": report.get("params_before"), "params_pruned": report.get("params_after"),
        "params_ratio": report["params_after"] / report["params_before"] if report.get("params_before") else None,
        "param_sparsity": 1 - report["params_after"] / report["params_before"] if report.get("params_before") else None,
        "eval": {"dense": dense_result, "pruned": pruned_result, "recovered": recovered_result},
        "curve": curve, "prune": report, "saved": str(saved), "loads": loading, "reload_max_abs_diff": difference,
    })
    if args.measure_full_ft:
        memory = _measure_memory(args, saved)
        metrics["memory"] = memory
        print(f"training memory, {memory['protocol']}: LoRA +{memory['lora']['increase_mb']:,.0f} MB, full "
              f"fine-tuning +{memory['full']['increase_mb']:,.0f} MB: {memory['lora_vs_full']:.2f}x")
    figures = (("dense", dense_ppl), ("pruned", pruned_result["perplexity"]),
               ("recovered", recovered_result["perplexity"] if recovered_result else None))
    summary = ", ".join(f"{label} {value:.2f}" for label, value in figures if value is not None)
    print(f"perplexity: {summary}" + (f" ({after['perplexity'] / dense_ppl:.2f}x dense)" if dense_ppl else "")
          + f"; parameters {report['params_after']:,} of {report['params_before']:,}")
    finish_run(out, args, metrics)
    from compress.hub import annotate_card

    annotate_card(saved, task="text-generation", metrics={
        name: metrics[name] for name in ("perplexity_dense", "perplexity_pruned", "perplexity_recovered")
        if metrics[name] is not None})
    return RecoveryResult(model=model, tokenizer=tokenizer, metrics=metrics, folder=out)


def run(argv: list[str] | None = None) -> RecoveryResult:
    """Parse, check, claim the run folder, run. Refusals exit with status 2 and one ``llm_prune.py: error:`` line."""
    p = build_parser()
    defaults = {name: p.get_default(name) for name in (*PRUNE_OPTIONS, "calib_rows", "calib_length")}
    args = parse_recipe_args(p, argv)
    try:
        inputs = check_inputs(args, defaults)
    except (UsageError, CompressError) as exc:
        p.error(_one_line(exc))
    claim_run_folder(args, p.description)
    setup_run(verbose=True, log_format="%(message)s")  # the library's INFO lines narrate pruning
    print(f"config: {vars(args)}")
    from compress.cli.prune import progress_bars

    try:
        with progress_bars(not args.no_progress):
            return recover(args, inputs)
    except (UsageError, CompressError) as exc:
        p.error(_one_line(exc))


def _one_line(exc: BaseException) -> str:
    from compress.cli import spell_option

    spelled = getattr(exc, "spelled", None)  # an InvalidOptionError names the option as the library spells it
    return " ".join((spelled(spell_option(exc.option)) if callable(spelled) else str(exc)).split())


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
