"""The decoder track: pruning a causal LM with our engine and with Torch-Pruning, recovering it, training it with
LoRA or Ladder Side-Tuning, and a 2:4 / 50% sparse model; perplexity with :func:`compress.evaluate_perplexity`.

Rows (:data:`METHODS`): the dense model (the baseline); FFN 30% with FLAP's criterion and least-squares
reconstruction (our implementation) at uniform and at global widths; FFN 30% with Torch-Pruning's ``MetaPruner`` and
``GroupMagnitudeImportance`` as its library runs (rotary embeddings replaced by an identity while it traces, as its
LLM example does); the uniform model recovered with LoRA (``recipes/llm_prune.py``) and with Pruning-Adapter (when
that recipe offers it); LoRA and Ladder Side-Tuning trained on the dense model (memory and time per step, then
perplexity); 2:4 and 50% unstructured sparsity with Wanda's masks (sparse-soup plugin, merged).

"train peak MB" is the memory of a row's own work after loading the model: pruning (calibration, scoring, surgery,
refit) for the pruning rows, pruning + recovery for the recovery rows, training for LoRA / LST, mask computation for
the sparse rows.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from bench.harness import Row, RowSkipped, TrainingPeak, latency_figures

logger = logging.getLogger(__name__)

FUNCTION = "bench.decoder:run_row"
TITLE = "Decoder track"
_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2"
DEFAULT_EVAL_TEXT = _SHARED / "wiki.test.raw"
DEFAULT_CALIBRATION_TEXT = _SHARED / "valid.tokens.txt"
METHODS = (
    ("dense", "dense"),
    ("FFN 30%: FLAP criterion + least squares, uniform (our implementation)", "ours-uniform"),
    ("FFN 30%: FLAP criterion + least squares, global widths (our implementation)", "ours-global"),
    ("FFN 30%: Torch-Pruning MetaPruner, GroupMagnitudeImportance", "tp"),
    ("FFN 30% uniform + LoRA recovery (llm_prune.py)", "recover-lora"),
    ("FFN 30%: Pruning-Adapter (FLAP criterion, oneshot) + adapter recovery", "recover-pa"),
    ("LoRA r=8 on the dense model", "lora-train"),
    ("LST r=8 on the dense model", "lst-train"),
    ("2:4 sparse, Wanda masks", "sparse-2:4"),
    ("50% unstructured, Wanda masks", "sparse-50"),
)
METHOD_KEYS = {key: label for label, key in METHODS}
#: rows that read the uniform row's pruned model from the run's cache when it ran: they share its lane, after it.
#: Pruning-Adapter's recovery prunes on its own (:func:`_pruning_adapter`) while ``llm_prune.py`` offers no
#: Pruning-Adapter recovery, so it is a lane of its own (a test ties the two).
UNIFORM_LANE = ("ours-uniform", "recover-lora")
FULL = {"sparsity": 0.3, "calib_rows": 128, "calib_length": 512, "calib_batch": 16, "eval_tokens": 8192,
        "window": 512, "train_steps": 100, "train_batch": 4, "train_seq": 256, "recovery_steps": 300,
        "recovery_batch": 4, "recovery_seq": 512, "latency_seq": 128, "latency_rows": 4, "latency_rounds": 3,
        "lr": 2e-4, "lst_lr": 3e-3}
QUICK = {**FULL, "calib_rows": 8, "calib_length": 128, "calib_batch": 4, "eval_tokens": 2048, "window": 256,
         "train_steps": 4, "train_batch": 2, "train_seq": 128, "recovery_steps": 4, "recovery_batch": 2,
         "recovery_seq": 128, "latency_seq": 32, "latency_rows": 2, "latency_rounds": 1}
#: what issue 34 measured with the peers' own code on SmolLM2-135M (docs/decoders.md): cited, not re-run
PEER_RESULTS = (
    ("FLAP's code, uniform widths, 1,024 x 128 calibration tokens", "74.05"),
    ("FLAP's code, adaptive widths (AL-AM)", "74.87"),
    ("Wanda-sp (FLAP's repository), uniform, 128 x 128 / 64 x 256 calibration tokens", "76.80 / 74.01"),
    ("LLM-Pruner's code, Taylor (param_first / param_mix / vectorize), no recovery", "105.3 / 105.4 / 143.5"),
    ("SliceGPT's code, hidden 576 -> 324 (the same parameter count)", "302"),
    ("magnitude (FLAP's mag-sp)", "5.4 million"),
)


def rows(settings: dict[str, Any]) -> list[Row]:
    """The track's rows; none without a model (:func:`skip_reason` says why). The uniform row and the recovery
    rows that start from its model share one lane (:data:`UNIFORM_LANE`); every other row is a lane of its own."""
    if skip_reason(settings):
        return []
    name = Path(settings["model"]).name
    return [Row(track="decoder", group=f"{name}, WikiText-2 perplexity", method=label, function=FUNCTION,
                kwargs={"method": key, "settings": settings}, baseline=key == "dense", timeout_s=12 * 3600.0,
                lane=f"decoder/{name}/" + ("uniform" if key in UNIFORM_LANE else key))
            for label, key in METHODS]


def skip_reason(settings: dict[str, Any]) -> str | None:
    """Why the track cannot run with these settings (no model given, a folder without config.json, a Hub id the
    rows cannot load offline, no text), or ``None``."""
    from compress.cli.evaluate import is_local_model

    model = settings.get("model")
    if not model:
        return ("no decoder model: give --decoder-model FOLDER or HUB_ID (e.g. the SmolLM2-135M folder written by "
                "../shared/tools/smollm2_to_hf.py, or HuggingFaceTB/SmolLM2-135M)")
    if is_local_model(model):
        if not (Path(model) / "config.json").is_file():
            return f"--decoder-model {model} is not a model folder (no config.json)"
    else:
        reason = _hub_id_unavailable(model)
        if reason:
            return reason
    for name, flag in (("eval_text", "--decoder-data"), ("calibration_text", "--calibration-text")):
        if not Path(settings[name]).is_file():
            return f"{name.replace('_', ' ')} {settings[name]} not found: give {flag} FILE"
    return None


def _hub_id_unavailable(model_id: str) -> str | None:
    """Why the rows cannot load the Hub id ``model_id``, as far as is known without the network: it is no valid id,
    or the rows run offline (the recipes' default, :data:`common.recipe.OFFLINE_ENV`, unless the caller exported
    ``HF_HUB_OFFLINE=0``) and its config is not in the Hugging Face cache; ``None`` otherwise."""
    from huggingface_hub import try_to_load_from_cache

    from common.recipe import OFFLINE_ENV

    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except ValueError as exc:  # huggingface_hub's HFValidationError
        return f"--decoder-model {model_id} is neither a local folder nor a Hub model id ({exc})"
    env = {**OFFLINE_ENV, **os.environ}  # what a row's process sees (common.recipe.setup_run)
    switch = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""  # huggingface_hub's own rule
    if isinstance(cached, str) or switch.strip().upper() not in {"1", "ON", "YES", "TRUE"}:
        return None
    return (f"--decoder-model {model_id} is no local folder, and no Hub model of that id is in the Hugging Face cache "
            f"while the rows run offline: give a model folder, download it once (`hf download {model_id}`), or "
            "export HF_HUB_OFFLINE=0 so that the rows download it")


class DecoderRun:
    """What a decoder row needs: the model (a folder, or a Hub id and its snapshot folder in the Hugging Face
    cache), its texts, calibration rows, perplexity and latency."""

    def __init__(self, method: str, settings: dict[str, Any]) -> None:
        from transformers import AutoConfig

        from compress.cli.evaluate import check_local_causal_lm, is_local_model

        self.method, self.s = method, settings
        reason = skip_reason(settings)
        if reason:
            raise RowSkipped(reason)
        #: the model as given: a folder or a Hub id (what recipes/llm_prune.py is given too)
        self.model_name = settings["model"]
        self.local = check_local_causal_lm(self.model_name) if is_local_model(self.model_name) else None
        #: the folder the model is read from: the local folder, or the Hub id's snapshot in the cache
        self.model_path = self.local.folder if self.local is not None else _hub_snapshot(self.model_name)
        positions = getattr(AutoConfig.from_pretrained(str(self.model_path), local_files_only=True),
                            "max_position_embeddings", None)
        if positions:  # a small model's position limit caps every length of the protocol
            self.s = {**settings, **{key: min(settings[key], positions) for key in
                                     ("window", "calib_length", "train_seq", "recovery_seq", "latency_seq")}}
        self.workdir = Path(settings["workdir"]) / "decoder" / method.replace(":", "-")
        self.cache = Path(settings["workdir"]) / "cache" / "decoder"

    def load(self):
        """The model (float32, in eval mode, no KV cache) and its tokenizer, loaded as ``compress eval`` loads a model
        (:func:`compress.cli.evaluate.load_causal_lm`: a folder, or a Hub id through ``from_pretrained``)."""
        import compress  # noqa: F401 - compact classes of global-width folders
        from compress.cli.evaluate import load_causal_lm

        model, tokenizer = load_causal_lm(self.model_name, self.local, "float32", option="--decoder-model")
        model.config.use_cache = False
        model.eval()
        return model, tokenizer

    def corpus(self, which: str):
        from compress.data import load_text

        return load_text(self.s["eval_text" if which == "eval" else "calibration_text"],
                         text_column=self.s.get("text_column"))

    def calibration(self, tokenizer, rows: int | None = None, length: int | None = None, seed: int = 0,
                    batch: int | None = None) -> list[dict[str, torch.Tensor]]:
        from compress.data import calibration_rows

        ids = calibration_rows(self.corpus("calibration"), tokenizer, num_rows=rows or self.s["calib_rows"],
                               length=length or self.s["calib_length"], seed=seed)
        return [{"input_ids": chunk} for chunk in ids.split(batch or self.s["calib_batch"])]

    def perplexity(self, model, tokenizer) -> dict[str, Any]:
        import compress

        result = compress.evaluate_perplexity(model, tokenizer, self.corpus("eval"), max_tokens=self.s["eval_tokens"],
                                              window=self.s["window"], progress=True)
        return {"quality": result.perplexity, "quality_name": "perplexity", "higher_is_better": False,
                "eval_scored_tokens": result.scored_tokens, "eval_windows": result.windows}

    def latency(self, model, tokenizer, reference=None) -> dict[str, float]:
        from compress.data import tokenize_text

        seq = self.s["latency_seq"]
        ids = tokenize_text(self.corpus("eval"), tokenizer)[: 32 * seq].reshape(32, seq)
        batch = {"input_ids": ids}
        rows = [{"input_ids": ids[i:i + 1]} for i in range(self.s["latency_rows"])]
        if reference is None:
            reference, _ = self.load()
        return latency_figures(model, batch, rows, reference=reference, rounds=self.s["latency_rounds"])

    def save(self, model, tokenizer, folder: Path, report=None) -> float:
        import compress
        from compress.measure import folder_size

        saved = compress.save_pretrained(model, folder, tokenizer=tokenizer, report=report, overwrite=True)
        return folder_size(saved) / 2**20


def _hub_snapshot(model_id: str) -> Path:
    """The folder of the Hub model ``model_id`` in the Hugging Face cache, its config fetched there first when the
    row may use the network (transformers' ``cached_file``, as ``from_pretrained`` finds it)."""
    from transformers.utils import cached_file

    from compress.cli import UsageError

    try:
        config = cached_file(model_id, "config.json")
    except OSError as exc:
        reason = " ".join(str(exc).split())
        raise UsageError(f"--decoder-model {model_id!r} is no local folder, and loading it from the Hub failed "
                         f"({reason}); give a model folder, or a Hub id in the Hugging Face cache") from None
    return Path(config).parent


def _params(model) -> dict[str, int]:
    from compress.measure import count_parameters

    return {"params": count_parameters(model), "trainable_params": count_parameters(model, trainable_only=True)}


def run_row(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One decoder row in this process."""
    if method not in METHOD_KEYS:
        raise ValueError(f"unknown decoder method {method!r}; known: {', '.join(METHOD_KEYS)}")
    run = DecoderRun(method, settings)
    return _ROWS[method](run)


def _dense(run: DecoderRun) -> dict[str, Any]:
    from compress.measure import folder_size

    model, tokenizer = run.load()
    return {**run.perplexity(model, tokenizer), **_params(model), "trainable_params": 0,
            "artifact_mb": folder_size(run.model_path) / 2**20, **run.latency(model, tokenizer, reference=model)}


def _ours(run: DecoderRun) -> dict[str, Any]:
    import compress

    model, tokenizer = run.load()
    batches = run.calibration(tokenizer)
    mode = "uniform" if run.method == "ours-uniform" else "global"
    extra = {"normalize": "standardize"} if mode == "global" else {}
    with TrainingPeak() as peak:
        report = compress.prune_model(model, {"ffn": run.s["sparsity"]}, importance="flap", mode=mode,
                                      reconstruct="least_squares", data=batches, num_batches=len(batches),
                                      progress=True, **extra)
    folder = run.cache / run.method if mode == "uniform" else run.workdir / "model"
    size = run.save(model, tokenizer, folder, report=report)
    figures = {**run.perplexity(model, tokenizer), **peak.figures(), "prune_s": peak.seconds, **_params(model),
               "trainable_params": 0, "artifact_mb": size,
               "note": f"{run.s['calib_rows']} x {run.s['calib_length']} calibration tokens"
                       + (", normalize standardize" if extra else "")}
    return {**figures, **run.latency(model, tokenizer)}


def _torch_pruning(run: DecoderRun) -> dict[str, Any]:
    """Torch-Pruning on the FFN, as its LLM example runs it: ``MetaPruner`` with ``GroupMagnitudeImportance``,
    ``apply_rotary_pos_emb`` replaced by an identity while the graph is traced, the config's width set after."""
    import importlib
    from importlib.metadata import version

    from bench.encoder import torch_pruning_ffn

    model, tokenizer = run.load()
    family = model.config.model_type
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    example = {"input_ids": run.calibration(tokenizer, rows=1, length=64, batch=1)[0]["input_ids"]}
    original = modeling.apply_rotary_pos_emb
    with TrainingPeak() as peak:
        modeling.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
        try:
            widths = torch_pruning_ffn(model, run.s["sparsity"], example)
        finally:
            modeling.apply_rotary_pos_emb = original
    size = run.save(model, tokenizer, run.workdir / "model")
    figures = {**run.perplexity(model, tokenizer), **peak.figures(), "prune_s": peak.seconds, **_params(model),
               "trainable_params": 0, "artifact_mb": size,
               "note": f"torch-pruning {version('torch-pruning')}, widths {sorted(set(widths))}, no data"}
    return {**figures, **run.latency(model, tokenizer)}


def _recover(run: DecoderRun) -> dict[str, Any]:
    """The uniform FLAP model (the ``ours-uniform`` row's folder, or pruned here) recovered by
    ``recipes/llm_prune.py``; Pruning-Adapter's row runs here while that recipe does not offer it."""
    try:
        import llm_prune
    except ImportError as exc:
        raise RowSkipped(f"recipes/llm_prune.py is not importable here ({exc})") from exc
    kind = "lora" if run.method == "recover-lora" else "pruning-adapter"
    methods = getattr(llm_prune, "RECOVERY_METHODS", ())
    if kind not in methods:
        if kind == "pruning-adapter":
            return _pruning_adapter(run)
        raise RowSkipped(f"recipes/llm_prune.py offers no {kind} recovery (its --recover: {', '.join(methods)})")
    pruned = run.cache / "ours-uniform"
    argv = ["--model", run.model_name, "--data", run.s["calibration_text"], "--eval-data", run.s["eval_text"],
            "--eval-max-tokens", str(run.s["eval_tokens"]), "--window", str(run.s["window"]), "--skip-dense-eval",
            "--recover", kind, "--steps", str(run.s["recovery_steps"]), "--batch-size", str(run.s["recovery_batch"]),
            "--seq-len", str(run.s["recovery_seq"]), "--out", str(run.workdir / "llm_prune"), "--overwrite"]
    if (pruned / "compress_report.json").is_file():
        argv += ["--pruned", str(pruned)]
    else:
        argv += ["--sparsity", str(run.s["sparsity"]), "--structures", "ffn", "--importance", "flap",
                 "--reconstruct", "least_squares", "--calib-rows", str(run.s["calib_rows"]), "--calib-length",
                 str(run.s["calib_length"])]
    with TrainingPeak() as peak:
        try:
            result = llm_prune.run(argv)
        except SystemExit as exc:  # its parser's refusal: one line on stderr, recorded with the row
            raise RuntimeError(f"recipes/llm_prune.py refused the options (exit status {exc.code}); see its "
                               "stderr in the row's record") from None
    metrics = result.metrics
    per_step = metrics.get("seconds_per_step")
    model, tokenizer = result.model, result.tokenizer
    from compress.measure import folder_size

    figures = {"quality": metrics["perplexity_recovered"], "quality_name": "perplexity", "higher_is_better": False,
               "perplexity_before_recovery": metrics.get("perplexity_pruned"), **peak.figures(run.s["recovery_steps"]),
               "step_time_s": per_step.get("median") if isinstance(per_step, dict) else per_step, **_params(model),
               "trainable_params": metrics.get("recovery", {}).get("trainable_params"),
               "artifact_mb": folder_size(result.saved) / 2**20,
               "note": f"{run.s['recovery_steps']} steps x {run.s['recovery_batch']} x {run.s['recovery_seq']} tokens "
                       "of the calibration text; merged",
               "command": "python recipes/llm_prune.py " + " ".join(argv)}
    if metrics.get("train_rss_increase_mb") is not None:
        figures["recovery_train_peak_mb"] = metrics["train_rss_increase_mb"]
    return {**figures, **run.latency(model, tokenizer)}


def _pruning_adapter(run: DecoderRun) -> dict[str, Any]:
    """Pruning-Adapter on the causal LM: rank-8 adapters on every projection, FFN 30% pruned oneshot by FLAP's
    criterion with bias compensation on the calibration rows, then the adapters (and nothing else) trained
    ``recovery_steps`` on other rows of the calibration text, as ``llm_prune.py`` trains LoRA; merged."""
    from peft import get_peft_model

    import compress
    from compress.pruning.arch import arch_spec

    model, tokenizer = run.load()
    calibration = run.calibration(tokenizer)
    rows = run.calibration(tokenizer, rows=run.s["recovery_steps"] * run.s["recovery_batch"],
                           length=run.s["recovery_seq"], seed=1, batch=run.s["recovery_batch"])
    config = compress.PruningAdapterConfig(task_type="CAUSAL_LM", sparsity={"ffn": run.s["sparsity"]},
                                           schedule="oneshot", importance="flap", compensate_bias=True, r=8,
                                           lora_alpha=16, target_modules=list(arch_spec(model).projection_names))
    with TrainingPeak() as peak:
        peft_model = get_peft_model(model, config)
        peft_model.base_model.prune(data=calibration, num_batches=len(calibration))
        before = run.perplexity(peft_model, tokenizer)["quality"]
        trainable = _params(peft_model)["trainable_params"]
        seconds, _ = _lm_steps(peft_model, rows, run.s["lr"])
    plain = peft_model.merge_and_unload()
    size = run.save(plain, tokenizer, run.workdir / "model")
    figures = {**run.perplexity(plain, tokenizer), **peak.figures(), "step_time_s": seconds / len(rows),
               "perplexity_before_recovery": before, **_params(plain), "trainable_params": trainable,
               "artifact_mb": size,
               "note": f"{run.s['calib_rows']} x {run.s['calib_length']} calibration tokens, bias compensation; "
                       f"{len(rows)} steps x {run.s['recovery_batch']} x {run.s['recovery_seq']} tokens, lr "
                       f"{run.s['lr']:g}; merged"}
    return {**figures, **run.latency(plain, tokenizer)}


def _lm_steps(model, batches: list[dict[str, torch.Tensor]], lr: float) -> tuple[float, list[float]]:
    """One AdamW step per batch on the language-model loss of the trainable parameters: (seconds, losses)."""
    import time

    from tqdm.auto import tqdm

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    started = time.perf_counter()
    for batch in tqdm(batches, desc="training", unit="step"):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return time.perf_counter() - started, losses


def _train(run: DecoderRun) -> dict[str, Any]:
    """LoRA (peft, rank 8 on every projection) or Ladder Side-Tuning (r=8, side network pruned from the backbone)
    trained ``train_steps`` on calibration-text rows: memory and time per step, then perplexity."""
    from peft import LoraConfig, get_peft_model

    import compress
    from compress.pruning.arch import arch_spec

    model, tokenizer = run.load()
    batches = run.calibration(tokenizer, rows=run.s["train_steps"] * run.s["train_batch"], length=run.s["train_seq"],
                              seed=1, batch=run.s["train_batch"])
    with TrainingPeak() as peak:
        if run.method == "lora-train":
            targets = list(arch_spec(model).projection_names)
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=targets))
            lr = run.s["lr"]
        else:
            config = compress.LadderSideConfig(task_type="CAUSAL_LM", r=8, importance="magnitude")
            model = compress.apply_ladder_side(model, config)
            lr = run.s["lst_lr"]
        trainable = _params(model)["trainable_params"]
        seconds, losses = _lm_steps(model, batches, lr)
    figures = {**run.perplexity(model, tokenizer), **peak.figures(), "step_time_s": seconds / len(batches),
               "first_loss": losses[0], "last_loss": losses[-1],
               "note": f"{len(batches)} steps x {run.s['train_batch']} x {run.s['train_seq']} tokens, lr {lr:g}"
                       + ("; side network initialised by magnitude (no data)" if run.method == "lst-train" else "")}
    from compress.export import atomic_directory
    from compress.measure import folder_size

    with atomic_directory(run.workdir / "adapter", overwrite=True, writes_adapter=True) as tmp:
        model.save_pretrained(tmp)
    figures["artifact_mb"] = folder_size(run.workdir / "adapter") / 2**20
    deployed = model.merge_and_unload() if run.method == "lora-train" else model  # LST runs backbone + side network
    return {**figures, **_params(deployed), "trainable_params": trainable, **run.latency(deployed, tokenizer)}


def _sparse(run: DecoderRun) -> dict[str, Any]:
    """Wanda masks (``|W| * ||x||`` on the calibration rows) at 2:4 or 50% unstructured in every linear layer of the
    blocks (sparse-soup plugin), merged into the weights; the compact sparse file as the artifact."""
    import compress

    model, tokenizer = run.load()
    batches = run.calibration(tokenizer)
    pattern = {"pattern": "2:4"} if run.method == "sparse-2:4" else {"sparsity": 0.5}
    with TrainingPeak() as peak:
        config = compress.SparseSoupConfig(task_type="CAUSAL_LM", importance="wanda", **pattern)
        peft_model = compress.apply_sparse_soup(model, config, data=batches, num_batches=len(batches),
                                                batch_size=run.s["calib_batch"])
    compress.save_sparse(peft_model, run.workdir / "compact", tokenizer=tokenizer, overwrite=True)
    from compress.measure import folder_size

    model = peft_model.merge_and_unload()
    figures = {**run.perplexity(model, tokenizer), **peak.figures(), **_params(model), "trainable_params": 0,
               "artifact_mb": folder_size(run.workdir / "compact") / 2**20,
               "note": "dense kernels (no sparse speed-up on CPU); artifact: the compact sparse file"}
    return {**figures, **run.latency(model, tokenizer)}


_ROWS = {"dense": _dense, "ours-uniform": _ours, "ours-global": _ours, "tp": _torch_pruning,
         "recover-lora": _recover, "recover-pa": _recover, "lora-train": _train, "lst-train": _train,
         "sparse-2:4": _sparse, "sparse-50": _sparse}


def note(settings: dict[str, Any]) -> str:
    reason = skip_reason(settings)
    if reason:
        return f"Not run: {reason}."
    peers = "\n".join(f"| {what} | {ppl} |" for what, ppl in PEER_RESULTS)
    return (f"Perplexity: `compress.evaluate_perplexity`, the first {settings['eval_tokens']:,} tokens of "
            f"{Path(settings['eval_text']).name}, windows of {settings['window']}, float32. Calibration: "
            f"{settings['calib_rows']} rows x {settings['calib_length']} tokens of "
            f"{Path(settings['calibration_text']).name}, seed 0. 'train peak MB': the memory of the row's own work "
            "after loading (pruning, recovery, training or masks; the dense row has none); 'x': ratio to the dense "
            f"row. Latency: batch of 32 x {settings['latency_seq']} tokens and rows of {settings['latency_seq']} "
            "tokens one at a time, the dense model timed alternately in the same process.\n\n"
            "The peers' own code on SmolLM2-135M, FFN 30% unless stated (issue 34, protocol of "
            "[docs/decoders.md](decoders.md): 8,192 tokens, windows of 512; cited, not re-run; comparable with this "
            "table only at the full size):\n\n| setting | perplexity |\n|---|---:|\n" + peers)
