"""Saving pruned models: compact safetensors folders, written atomically, with a model card.

Output folders follow one rule wherever peft-compress writes (``compress prune --out``,
:func:`save_pretrained`, the recipes): a new folder is written beside the destination and renamed into place,
so a crash never leaves a half-written artifact; an existing destination is replaced only with
``overwrite`` and only when it is a previous output of peft-compress (it holds ``compress_report.json``
or a model card tagged ``peft-compress``) of the same kind (a model never replaces a PEFT adapter), that
holds no training state and contains none of the run's inputs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from torch import nn

from compress.errors import OutputFolderError
from compress.pruning.compact import PREFIX
from compress.pruning.spec import STRUCTURE_LABELS

logger = logging.getLogger(__name__)

#: the tag every model card we write carries; it marks a folder as an output of peft-compress
TAG = "peft-compress"
REPORT_FILE = "compress_report.json"
_API_OVERWRITE = "overwrite=True"


# -- output folders -------------------------------------------------------------------------------------
def is_compress_output(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was written by peft-compress: it holds ``compress_report.json`` or a model card
    (README.md) whose metadata tags include ``peft-compress``."""
    folder = Path(folder)
    if (folder / REPORT_FILE).is_file():
        return True
    card = folder / "README.md"
    if not card.is_file():
        return False
    from huggingface_hub.repocard import metadata_load

    try:
        metadata = metadata_load(card) or {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # yaml errors are ValueErrors too
        logger.debug("cannot read the model card metadata of %s: %s", card, exc)
        return False
    tags = metadata.get("tags") or []
    return isinstance(tags, list) and TAG in tags


def _irreplaceable_content(folder: Path, writes_adapter: bool) -> str | None:
    """What in ``folder`` a save must not replace even with ``overwrite``, described for the error, or None.

    Training state (a ``Trainer`` output folder, checkpoints) is never ours to replace; a PEFT adapter is
    replaced only by another adapter, since its model card carries our tag too.
    """
    if (folder / "trainer_state.json").is_file() or any(folder.glob("checkpoint-*")):
        return "training state (trainer_state.json or checkpoint-* folders)"
    if not writes_adapter and (folder / "adapter_config.json").is_file():
        return "a PEFT adapter (adapter_config.json)"
    return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _local_paths(candidates: Iterable[object]) -> list[Path]:
    """The existing filesystem paths among ``candidates`` (hub ids and ``None`` are skipped), resolved."""
    paths = []
    for candidate in candidates:
        if candidate is None or candidate == "":
            continue
        path = Path(os.fspath(candidate)).expanduser()
        if path.exists():
            paths.append(path.resolve())
    return paths


def check_output_folder(out_dir: str | os.PathLike, *, overwrite: bool = False,
                        inputs: Iterable[str | os.PathLike | None] = (), option: str = _API_OVERWRITE,
                        name: str | None = None, writes_adapter: bool = False) -> Path:
    """Check that ``out_dir`` can receive a new artifact, before any expensive work; returns it resolved.

    Refused, with one :class:`~compress.OutputFolderError` naming the folder: a destination that is a file;
    an existing, non-empty folder without ``overwrite``; with ``overwrite``, a folder that is not a previous
    output of peft-compress (:func:`is_compress_output`), that holds training state or (unless
    ``writes_adapter``) a PEFT adapter, or that contains one of ``inputs`` or the current working directory
    (replacing it would delete them); a parent folder that cannot be written. Temporary
    folders that dead saves to the same place left behind are cleaned first (:func:`clean_stale_temporaries`).

    Args:
        out_dir: the destination folder.
        overwrite: whether an existing output of ours may be replaced.
        inputs: paths the run reads (model folder, tokenizer, data); hub ids and ``None`` are ignored.
        option: how the caller spells "overwrite" in messages (``--overwrite`` on the command line).
        name: how messages call the destination (default: its path).
        writes_adapter: the new artifact is a PEFT adapter, so it may replace a previous adapter of ours.
    """
    raw = Path(os.fspath(out_dir)).expanduser()
    out = raw.resolve()
    label = name or str(raw)
    clean_stale_temporaries(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{label} is a file, not a folder; choose a folder to write to")
    if out.is_dir() and any(out.iterdir()):
        protected = [*_local_paths(inputs), Path.cwd().resolve()]
        held = [p for p in protected if _inside(p, out)]
        if held:
            what = "the current directory" if held[0] == Path.cwd().resolve() else str(held[0])
            raise OutputFolderError(f"{label} contains {what}, an input of this run; replacing it would delete "
                                    "it: choose a new folder")
        if not overwrite:
            raise OutputFolderError(f"{label} already exists; choose another folder or pass {option} (which "
                                    "replaces only a folder written by peft-compress)")
        if not is_compress_output(out):
            raise OutputFolderError(f"{label} exists and was not written by peft-compress (no {REPORT_FILE} or "
                                    f"model card tagged {TAG!r}); {option} replaces only our own outputs: choose "
                                    "a new folder, or empty or delete it yourself")
        kept = _irreplaceable_content(out, writes_adapter)
        if kept:
            raise OutputFolderError(f"{label} holds {kept}, which {option} does not replace: choose a new folder")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if parent == out:
        parent = out.parent
    if not parent.is_dir():
        raise OutputFolderError(f"{label}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{label}: cannot write to {parent} (permission denied); choose a folder you can "
                                "write to")
    return out


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions the umask gives new files: ``mkdtemp`` makes
    0o700 folders and some writers (safetensors files) 0o600 files, which other users then cannot read."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            os.chmod(Path(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            os.chmod(Path(dirpath, name), 0o666 & ~mask)


def clean_stale_temporaries(out: Path) -> None:
    """Remove the hidden temporary folders that saves to ``out`` left behind when their process died.

    ``.<name>.tmp-<pid>-*`` is a half-written artifact: deleted. ``.<name>.old-<pid>-*`` holds the previous
    artifact set aside during a replacement: put back when ``out`` is missing (the process died between
    the two renames), deleted otherwise. Folders of processes that are still running are left alone.
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-")
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        if not match or not entry.is_dir() or _process_alive(int(match.group(2))):
            continue
        previous = entry / out.name
        if match.group(1) == "old" and previous.is_dir() and not out.exists():
            os.replace(previous, out)
            logger.warning("restored %s from %s, left by an interrupted save", out, entry)
        shutil.rmtree(entry, ignore_errors=True)
        logger.info("removed %s, left by an interrupted save", entry)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike | None] = (),
                     option: str = _API_OVERWRITE, writes_adapter: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir`` in one rename.

    The destination is checked with :func:`check_output_folder` before and again just before the rename (a
    concurrent run may have written it meanwhile). An interrupted write leaves only a hidden
    ``.<name>.tmp-<pid>-*`` folder, never a half-written ``out_dir``; the next save to the same place
    removes it. An exception while the previous artifact is set aside puts it back. The folder and its
    files get the permissions the process's umask gives new ones.
    """
    checks = {"overwrite": overwrite, "inputs": inputs, "option": option, "writes_adapter": writes_adapter}
    out = check_output_folder(out_dir, **checks)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    backup: Path | None = None
    try:
        yield tmp
        _apply_umask(tmp)
        check_output_folder(out, name=str(out_dir), **checks)
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, backup / out.name)
            os.replace(tmp, out)
        else:
            try:
                os.replace(tmp, out)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise OutputFolderError(f"{out_dir} was written by another process while this one was saving; "
                                        f"choose another folder or pass {option}") from None
    except BaseException:
        if backup is not None and (backup / out.name).is_dir() and not out.exists():
            os.replace(backup / out.name, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        # kept when nothing is in place (putting it back failed): a later save restores it
        if backup is not None and out.exists():
            shutil.rmtree(backup, ignore_errors=True)


def method_tag(peft_type: str) -> str:
    """The Hub tag of a PEFT method of ours, e.g. ``sparse-soup`` for ``SPARSE_SOUP``."""
    return str(peft_type).lower().replace("_", "-")


# -- model card -----------------------------------------------------------------------------------------
def needs_compress_to_load(model: nn.Module) -> bool:
    """True when the model's config is a type registered by ``import compress``: compact (per-layer widths) or
    multi-exit."""
    return str(getattr(model.config, "model_type", "")).startswith((PREFIX, "multi_exit_"))


def removed_summary(report: dict) -> str:
    """``"ffn 50%, heads 25%"``: what was actually removed per structure, with the request where it differs."""
    # `ratios`: what older reports call the request
    asked = report.get("sparsity") or report.get("ratios") or {}
    achieved = report.get("achieved_sparsity") or report.get("achieved_ratios") or asked
    parts = []
    for structure, value in achieved.items():
        text = f"{structure} {value:.0%}"
        if structure in asked and f"{asked[structure]:.0%}" != f"{value:.0%}":
            text += f" (asked {asked[structure]:.0%})"
        parts.append(text)
    return ", ".join(parts)


#: transformers task -> the Hub's pipeline tag
PIPELINE_TAGS = {"sequence-classification": "text-classification", "causal-lm": "text-generation",
                 "seq2seq": "text2text-generation", "masked-lm": "fill-mask",
                 "token-classification": "token-classification", "question-answering": "question-answering",
                 None: "feature-extraction"}


def _tags(model: nn.Module) -> list[str]:
    """The card's tags: ours, what the model is, and the tags the model carries (e.g. a PEFT method's)."""
    model_type = str(getattr(model.config, "model_type", ""))
    tags = [TAG, "multi-exit" if model_type.startswith("multi_exit_") else "pruning"]
    if getattr(model.config, "soup", None):
        tags.append("sparse-soup")
    tags += [t for t in (getattr(model, "model_tags", None) or []) if t not in tags]
    return tags


def model_card(model: nn.Module, report: dict | None = None, title: str | None = None) -> str:
    """A README.md for a saved model: metadata (library, pipeline tag, tags), what was removed, parameters
    before/after, how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    from compress.tasks import task_of_class

    auto = _auto_class_name(model)
    found = task_of_class(type(model).__name__)
    data = ModelCardData(library_name="transformers", tags=_tags(model),
                         pipeline_tag=PIPELINE_TAGS.get(found[0] if found else None))
    model_type = str(model.config.model_type)
    soup = getattr(model.config, "soup", None)
    if soup:
        default_title = f"Sparse model soup ({model_type})"
        summary = (f"Made with [peft-compress](https://pypi.org/project/peft-compress/): the {soup['strategy']} "
                   f"average of {soup['ingredients']} fine-tunes that share one sparsity mask; the zeros are "
                   "stored as dense tensors.")
    else:
        default_title = ("Multi-exit " if model_type.startswith("multi_exit_") else "Structurally pruned ") + model_type
        summary = ("Made with [peft-compress](https://pypi.org/project/peft-compress/): parameters are physically "
                   "removed or exits let examples stop early, so inference is cheaper than the original model's.")
    lines = [f"# {title or default_title}", "", summary, ""]
    if report:
        before, after = report.get("params_before"), report.get("params_after")
        lines += [
            "| | |",
            "|---|---|",
            f"| method | structured pruning ({report.get('mode', '?')} mode, "
            f"{report.get('importance', '?')} importance) |",
            f"| removed | {removed_summary(report)} |",
        ]
        if before and after:
            lines.append(f"| parameters | {before:,} -> {after:,} ({after / before:.1%}) |")
        for structure, widths in report.get("widths_after", {}).items():
            lines.append(f"| {STRUCTURE_LABELS.get(structure, structure)} | {widths} |")
        lines.append("")
    lines += ["## Loading", ""]
    if str(model.config.model_type).startswith("multi_exit_"):
        lines += ["A multi-exit model (exits after blocks "
                  f"{getattr(model.config, 'exit_layers', None) or 'all'}, policy {model.config.exit_policy}, "
                  f"threshold {model.config.exit_threshold}): **`import compress` is needed** before loading (it "
                  "registers the multi-exit classes; no remote code).", "", "```python",
                  "import compress  # registers the multi-exit model classes"]
    elif needs_compress_to_load(model):
        lines += ["Layers have different widths, which the standard config cannot express: "
                  "**`import compress` is needed** before loading (it registers the compact classes; no remote "
                  "code).", "", "```python", "import compress  # registers the compact model classes"]
    else:
        lines += ["A standard transformers folder: no extra package is needed.", "", "```python"]
    lines += [f"from transformers import {auto}", f'model = {auto}.from_pretrained("path/to/this/folder")', "```",
              "", f"Architecture: `{type(model).__name__}`.", ""]
    template = "---\n{{ card_data }}\n---\n\n" + "\n".join(lines)
    return str(ModelCard.from_template(data, template_str=template))


def _auto_class_name(model: nn.Module) -> str:
    from compress.tasks import task_of_class

    found = task_of_class(type(model).__name__)
    return found[1] if found else "AutoModel"


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, report=None,
                    overwrite: bool = False, title: str | None = None,
                    inputs: Iterable[str | os.PathLike | None] = (), option: str = _API_OVERWRITE) -> Path:
    """Save a (pruned) model as a compact safetensors folder with config, tokenizer and model card.

    The folder is written to a temporary sibling and renamed into place, so an interrupted save never
    leaves a folder that looks valid. Only safetensors are written.

    Args:
        model: the model to save (a pruned or compact model, or any transformers model).
        out_dir: destination folder.
        tokenizer: saved alongside when given (``pipeline(...)`` then works from the folder alone).
        report: a :class:`~compress.PruneReport` (or its ``to_dict()``) summarised in the model card and
            written to ``compress_report.json``.
        overwrite: replace an existing folder (atomically) when it is a previous output of peft-compress
            that holds none of the inputs (the folders the model and tokenizer were loaded from, ``inputs``,
            the current directory); anything else is refused (:func:`check_output_folder`).
        title: model card title.
        inputs: further paths the caller read from, which the destination must not contain.
        option: how the caller spells "overwrite" in error messages.
    """
    report_dict = report.to_dict() if hasattr(report, "to_dict") else report
    sources = [getattr(model, "name_or_path", None), getattr(tokenizer, "name_or_path", None), *inputs]
    with atomic_directory(out_dir, overwrite=overwrite, inputs=sources, option=option) as tmp:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(model, report_dict, title), encoding="utf-8")
        if report_dict is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report_dict, indent=2), encoding="utf-8")
    logger.info("saved %s to %s", type(model).__name__, out_dir)
    return Path(out_dir)
