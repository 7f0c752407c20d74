"""What the demo and every recipe share: offline and quiet set-up, data paths, the latency batch.

- :func:`setup_run`: call first thing in a ``main()``: offline environment for this process and the
  subprocesses it starts, log level, library progress bars and chatter off.
- :func:`load_splits`: ``(train, test, source)`` from ``../shared/data`` beside the checkout (SST-2, or a GLUE
  task with dev.tsv as the test set), an explicit folder, or the SST-2 sample shipped in the package.
- :func:`latency_inputs`: a fixed batch of real sentences padded to the full sequence length.
- :func:`parse_recipe_args` / :func:`claim_run_folder` / :func:`finish_run`: flags over a YAML/JSON ``--config``
  file, seeding; the run folder (``--out``) checked and prepared before any work; its resolved config, metrics
  and the metrics in the model card.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["GLUE_TASKS", "OFFLINE_ENV", "SHARED_DATA", "add_data_arguments", "add_memory_arguments",
           "claim_run_folder", "default_arguments", "finish_run", "latency_inputs", "load_splits", "padded_batches",
           "parse_recipe_args", "setup_run"]

#: environment that keeps Hugging Face libraries off the network (values the caller exported win)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
#: ``shared/data`` beside the repository the recipes are run from (``../shared/data`` from its root); without
#: it the recipes fall back to the sample shipped in the package
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
GLUE_TASKS = ("SST-2", "CoLA", "MRPC", "RTE")
_SHIPPED = "the SST-2 sample shipped in the package (2,000 train rows; test = the 872-row official dev set)"


def setup_run(verbose: bool = False, log_format: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """Offline, quiet set-up of a demo or recipe run; call it at the start of ``main()``.

    Sets :data:`OFFLINE_ENV` where the caller has not set those variables, for this process and the
    subprocesses it starts (training-memory jobs import the Hugging Face libraries afresh). huggingface_hub
    and datasets read their offline switch once, when first imported, so in this process it takes effect only
    when exported before Python starts (``./run.sh`` does); the recipes load models with ``local_files_only``
    and data from local files either way.

    Logging goes to stderr at INFO with ``verbose``, else WARNING; without ``verbose``, transformers' and
    datasets' progress bars and their and bitsandbytes' info and warning messages are switched off. Under
    several processes (``torchrun``, ``accelerate launch``) only the main process prints and logs below
    WARNING, and the process group is destroyed at exit.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    replica = int(os.environ.get("RANK", "0")) > 0  # torchrun and accelerate launch set RANK before Python starts
    if replica:  # the main process reports; the others would print the same lines again
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - open for the life of the process
        verbose = False
    if "RANK" in os.environ:
        atexit.register(_leave_process_group)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=log_format)
    if verbose:
        return
    # bitsandbytes (imported by peft) warns on import about an optional CPU kernel package
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _leave_process_group() -> None:
    """Destroy the process group the Trainer started: an exit with it alive sometimes aborts."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _has_split(folder: Path, split: str) -> bool:
    return any((folder / f"{split}{ext}").is_file() for ext in (".tsv", ".csv", ".jsonl"))


def load_splits(glue_task: str | None = None, data: str | os.PathLike[str] | None = None,
                train_rows: int | None = None, seed: int = 0) -> tuple[Any, Any, str]:
    """``(train, test, source)``: the training and test split of a task and a line saying where they came from.

    - ``data``: an explicit folder of GLUE-style files (its ``test`` split when it has one, else ``dev``);
    - ``glue_task`` (one of :data:`GLUE_TASKS`): ``SHARED_DATA/glue/<task>``, ``dev`` as the test set;
    - neither: ``SHARED_DATA/sst2`` (``test`` = the official SST-2 dev set), or, when that folder is absent,
      the SST-2 sample shipped in the package (logged as a warning, and said in ``source``).

    ``train_rows`` keeps a random subset of that many training rows, drawn with ``seed``.

    Raises:
        FileNotFoundError: ``data`` or the GLUE task's folder does not exist.
    """
    from compress.data import load_task

    if data is not None or glue_task:
        folder = Path(data) if data is not None else SHARED_DATA / "glue" / str(glue_task)
        if not folder.is_dir():
            raise FileNotFoundError(f"data folder {folder} not found")
        test_split = "test" if data is not None and _has_split(folder, "test") else "dev"
    else:
        folder, test_split = SHARED_DATA / "sst2", "test"
    if folder.is_dir():
        train, test = load_task(folder, "train"), load_task(folder, test_split)
        source = f"{folder} (train / {test_split} files)"
    else:
        logger.warning("%s not found; using the SST-2 sample shipped in the package", folder)
        train, test = load_task("sst2-sample", "train"), load_task("sst2-sample", "test")
        source = f"{_SHIPPED}; {folder} not found"
    if train_rows and len(train) > train_rows:
        train = train.shuffle(seed=seed).select(range(train_rows))
    return train, test, source


def latency_inputs(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None = None,
                   batch_size: int = 32, seq_len: int = 128) -> dict:
    """A fixed ``(batch_size, seq_len)`` batch of real rows padded to ``seq_len``, so every position is
    computed (the first rows of ``texts``, with ``pairs`` as second segments, cycled to fill the batch)."""
    rows = [texts[i % len(texts)] for i in range(batch_size)]
    second = [pairs[i % len(pairs)] for i in range(batch_size)] if pairs is not None else None
    return dict(tokenizer(rows, second, padding="max_length", truncation=True, max_length=seq_len,
                          return_tensors="pt"))


def padded_batches(tokenizer, texts: list[str], labels: list[int], batch_size: int, seq_len: int, n: int):
    """``n`` labelled batches of ``texts`` padded to ``seq_len`` tokens (memory measurements: only shapes matter)."""
    batches = []
    for i in range(n):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        enc = tokenizer(texts[rows], padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor(labels[rows])})
    return batches


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The data and training options every recipe takes: task, rows, steps, batch, length, seed."""
    p.add_argument("--glue-task", choices=GLUE_TASKS, help="use ../shared/data/glue/<task>")
    p.add_argument("--train-rows", type=int, default=None, help="subsample the training set (all rows)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (1000)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="rows per optimizer step, split over the processes when several train (32)")
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="batch rows of similar length (less padding); the batches then depend on the number of "
                        "processes: --no-group-by-length trains on the same batches whatever that number")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """The training-memory options of the benchmarks: steps and tokens per measurement, on/off, alone."""
    p.add_argument("--mem-steps", type=int, default=6, help="training steps per memory measurement (6)")
    p.add_argument("--mem-seq-len", type=int, default=128, help="tokens per row in the memory measurement (128)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure training memory (--no-memory: accuracy, time and latency only, e.g. for more "
                        "seeds of a configuration whose memory is known)")
    p.add_argument("--memory-only", action="store_true",
                   help="only the memory columns (no training for accuracy, no latency)")


def default_arguments(add_arguments: Callable[[argparse.ArgumentParser], None], **overrides) -> argparse.Namespace:
    """A recipe's defaults (what ``add_arguments`` declares) with ``overrides``: how the memory factories, run in
    a fresh process with only keyword arguments, rebuild the configuration the benchmark measured."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args



def write_report(script: str, argv: Sequence[str] | None, body: str, path: str | os.PathLike[str],
                 title: str | None = None) -> str:
    """A benchmark's markdown report: a title (the script's name), the command that made it (``argv``, or the
    process's arguments), then ``body``; written to ``path`` and returned for printing."""
    name = Path(script).stem
    arguments = sys.argv[1:] if argv is None else argv
    command = f"python recipes/{name}.py {' '.join(arguments)}".strip()
    text = f"# {title or name}\n\n`{command}`\n\n{body}\n"
    from compress.export import write_text_atomically

    write_text_atomically(path, text)
    return text


CONFIG_FLAG = "--config"
OVERWRITE_FLAG = "--overwrite"
#: the run folder's card: its tag makes the folder a previous output of peft-compress, which ``--overwrite`` replaces
RUN_CARD = "README.md"
_TYPE_NAMES = {int: "an integer", float: "a number", str: "text", Path: "a path"}


def parse_recipe_args(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a recipe's flags with defaults from ``--config FILE``, check its run folder, seed.

    ``--config`` (added here): YAML or JSON, keys spelled as the flags or with underscores; flags on the command
    line win. Each value of the file is checked as argparse checks the flag's text (type, number of values,
    ``choices``; ``true``/``false`` for on/off flags; ``null`` for an option whose default is none): anything
    else is one error naming the file, the key and what the flag expects.

    ``--out`` (when the recipe has one) is the run folder, checked here, before any work, by the rule of every
    save (:func:`compress.export.check_output_folder`): a new or empty folder, or, with ``--overwrite`` (added
    here), a previous run folder; never one that holds an input of the run or the current directory. Once the
    recipe has checked its own options, :func:`claim_run_folder` prepares it. Python, numpy and torch are seeded
    with ``--seed`` when the recipe has one.
    """
    dests = {action.dest for action in p._actions}
    if "config" not in dests:
        p.add_argument(CONFIG_FLAG, metavar="FILE", help="YAML or JSON file of options (flags given here win)")
    if "out" in dests and "overwrite" not in dests:
        p.add_argument(OVERWRITE_FLAG, action="store_true",
                       help="replace --out when it is the run folder of an earlier run (it is emptied first)")
    known, _ = p.parse_known_args(argv)
    path = getattr(known, "config", None)
    if path:
        values = _read_config_file(p, Path(path))
        actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            p.error(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(actions))}")
        p.set_defaults(**{name: _config_value(p, path, actions[name], name, value) for name, value in values.items()})
    args = p.parse_args(argv)
    if getattr(args, "out", None) is not None and _is_main_rank():
        from compress.errors import OutputFolderError

        try:
            _check_run_folder(args)
        except OutputFolderError as exc:
            p.error(str(exc))
    if getattr(args, "seed", None) is not None:
        from transformers import set_seed

        set_seed(args.seed)
    return args


def _is_main_rank() -> bool:
    """Rank 0 or a single process, before any process group exists (torchrun sets ``RANK`` before Python
    starts): the process that checks and prepares the run folder; the others would find its card."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_run_folder(args: argparse.Namespace) -> Path:
    from compress.export import check_output_folder

    inputs = [value for key, value in vars(args).items()
              if key not in ("out", "md") and isinstance(value, (str, os.PathLike))]
    return check_output_folder(args.out, overwrite=bool(getattr(args, "overwrite", False)), inputs=inputs,
                               option=OVERWRITE_FLAG, name=f"--out {args.out}")


def claim_run_folder(args: argparse.Namespace, about: str = "") -> Path:
    """Prepare the run folder ``args.out`` once the recipe has checked its options, before any work: checked
    again as :func:`parse_recipe_args` did, emptied when it is a previous run folder (``--overwrite``), given its
    card (:data:`RUN_CARD`, whose tag lets a later ``--overwrite`` replace it). Only the main process writes;
    returns the folder.

    Args:
        args: the parsed options (``out``, ``overwrite`` and the inputs to protect).
        about: what the recipe does, for the card (e.g. the parser's description).
    """
    from compress.export import TAG, write_text_atomically

    folder = Path(args.out)
    if not _is_main_rank():
        return folder
    folder = _check_run_folder(args)
    if folder.is_dir():  # empty, or a previous run folder that --overwrite replaces
        import shutil

        for entry in folder.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    card = (f"---\ntags:\n- {TAG}\n---\n\n# Run folder\n\n{about.strip()}\n\n`resolved_config.json`: the run's "
            "options (config file and flags); `metrics.json`: its results, written when it finishes.\n")
    write_text_atomically(folder / RUN_CARD, card)
    return folder


def _config_value(p: argparse.ArgumentParser, path: str, action: argparse.Action, name: str, value: Any) -> Any:
    """The option value ``name: value`` of a config file gives, checked and converted as argparse treats the
    flag's text; otherwise a parser error naming the file, the key and what the flag expects."""
    flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])

    def refuse(expected: str) -> None:
        p.error(f"{path}: {name}={value!r} is not {expected}, as {flag} expects")

    if action.nargs == 0:  # an on/off flag
        if not isinstance(value, bool):
            refuse("true or false")
        return value
    if value is None:
        if action.default is not None:
            refuse(f"null (it has a default: {action.default!r})")
        return None
    several = isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or isinstance(action.nargs, int)
    items = value if several and isinstance(value, list) else [value]
    if not several and isinstance(value, list):
        refuse("a single value")
    if action.nargs == "+" and not items:
        refuse("one value or more")
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        refuse(f"{action.nargs} values")
    convert = action.type or str
    expected = _TYPE_NAMES.get(convert, f"a valid {getattr(convert, '__name__', 'value')}")
    converted = []
    for item in items:
        if isinstance(item, (bool, dict, list)) or item is None:  # no flag's text gives these
            refuse(expected + (" each" if several else ""))
        try:
            item = convert(item if isinstance(item, str) else str(item))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            refuse(expected + (" each" if several else ""))
        if action.choices is not None and item not in action.choices:
            p.error(f"{path}: {name}={value!r} is not one of {', '.join(map(str, action.choices))}")
        converted.append(item)
    return converted if several else converted[0]


def _read_config_file(p: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    import json

    if not path.is_file():
        p.error(f"{CONFIG_FLAG} {path}: no such file")
    import yaml

    text = path.read_text(encoding="utf-8")
    if path.suffix not in (".yaml", ".yml", ".json"):
        p.error(f"{CONFIG_FLAG} {path}: use a .yaml, .yml or .json file")
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text) or {}
    except (ValueError, yaml.YAMLError) as exc:  # json.JSONDecodeError is a ValueError
        p.error(f"{CONFIG_FLAG} {path} does not parse: {' '.join(str(exc).split())}")
    if not isinstance(values, dict):
        p.error(f"{CONFIG_FLAG} {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def finish_run(folder: str | os.PathLike[str], args: argparse.Namespace, metrics: dict[str, float],
               model_folder: str | os.PathLike[str] | None = None, datasets: list[str] | None = None,
               task: str | None = None) -> Path:
    """Complete a run folder: ``resolved_config.json`` (every option, after the config file and flags),
    ``metrics.json`` (each written whole, or not at all), and the metrics in the saved model's card
    (``model_folder``). Returns ``folder``."""
    import json

    from compress.distributed import is_main_process
    from compress.export import write_text_atomically
    from compress.hub import annotate_card

    folder = Path(folder)
    if not is_main_process():  # the main process writes the run folder
        return folder
    resolved = {k: v for k, v in vars(args).items() if k not in ("config", "overwrite")}
    write_text_atomically(folder / "resolved_config.json", json.dumps(resolved, indent=2, default=str) + "\n")
    write_text_atomically(folder / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if model_folder is not None:
        annotate_card(model_folder, datasets=datasets, metrics=metrics, task=task)
    return folder
