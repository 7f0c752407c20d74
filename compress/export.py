"""Saving artifacts: compact safetensors folders with a model card, written atomically; the overwrite rule.

The rules every save of peft-compress follows (models, PEFT adapters, compact sparse files, recipe run folders)
are stated once in docs/internals.md, "Saving and overwriting". Here: :func:`check_output_folder` (the overwrite
rule), :func:`atomic_directory` (a new artifact, swapped into place), :func:`atomic_update` (files written into an
existing folder, as peft's ``PeftModel.save_pretrained`` does, swapped in together), :func:`write_text_atomically`
(one file), :func:`apply_umask` / :func:`current_umask` (permissions), :func:`clean_stale_temporaries` (what killed
saves left behind), :func:`save_pretrained` (a model with its card and report).
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
#: the model_type of multi-exit models (``multi_exit``; ``multi_exit_<family>`` in folders of the earlier format)
MULTI_EXIT = "multi_exit"
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


def current_umask() -> int:
    """The process's umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions the umask gives new files and
    folders: ``mkdtemp``/``mkstemp`` make 0o700/0o600 entries and some writers (safetensors files) 0o600 files,
    which other users then cannot read."""
    path = Path(path)
    mask = current_umask()
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            os.chmod(Path(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            os.chmod(Path(dirpath, name), 0o666 & ~mask)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it and one rename: a reader (or a process killed
    meanwhile) sees the previous file or the new one, never part of it. The file gets the umask's permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def clean_stale_temporaries(out: Path) -> None:
    """Remove the hidden temporaries that saves to ``out`` left behind when their process died.

    ``.<name>.tmp-<pid>-*`` is a half-written artifact (a folder, or a file of :func:`write_text_atomically`):
    deleted. ``.<name>.old-<pid>-*`` holds the previous artifact set aside during a replacement: put back when
    ``out`` is missing (the process died between the two renames), deleted otherwise. Temporaries of processes
    that are still running are left alone.
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-")
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        if not match or _process_alive(int(match.group(2))):
            continue
        if not entry.is_dir():
            if match.group(1) == "tmp":
                entry.unlink(missing_ok=True)
                logger.info("removed %s, left by an interrupted save", entry)
            continue
        previous = entry / out.name
        if match.group(1) == "old" and previous.is_dir() and not out.exists():
            os.replace(previous, out)
            logger.warning("restored %s from %s, left by an interrupted save", out, entry)
        shutil.rmtree(entry, ignore_errors=True)
        logger.info("removed %s, left by an interrupted save", entry)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where the
    system or the filesystem cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without renameat2
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _swap_into_place(tmp: Path, out: Path, race: str) -> None:
    """Put the finished folder ``tmp`` at ``out``: one rename when ``out`` is absent, else one exchange of the two
    (the previous folder, then at ``tmp``, is deleted). Where the system cannot exchange, the previous folder is
    moved aside first and deleted afterwards; a process killed between those two renames gets it back from
    :func:`clean_stale_temporaries`, an exception puts it back at once. ``race``: the error when another process
    created ``out`` meanwhile."""
    if not out.exists():
        try:
            os.replace(tmp, out)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise OutputFolderError(race) from None
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    try:
        os.replace(out, backup / out.name)
        os.replace(tmp, out)
    except BaseException:
        if (backup / out.name).is_dir() and not out.exists():
            os.replace(backup / out.name, out)
        raise
    finally:
        if out.exists():  # kept when nothing is in place (putting it back failed): a later save restores it
            shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike | None] = (),
                     option: str = _API_OVERWRITE, writes_adapter: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir`` in one step.

    The destination is checked with :func:`check_output_folder` before and again just before the swap (a
    concurrent run may have written it meanwhile). An interrupted write leaves only a hidden
    ``.<name>.tmp-<pid>-*`` folder, never a half-written ``out_dir``; the next save to the same place
    removes it. The folder and its files get the permissions the process's umask gives new ones.
    """
    checks = {"overwrite": overwrite, "inputs": inputs, "option": option, "writes_adapter": writes_adapter}
    out = check_output_folder(out_dir, **checks)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        check_output_folder(out, name=str(out_dir), **checks)
        _swap_into_place(tmp, out, f"{out_dir} was written by another process while this one was saving; choose "
                                   f"another folder or pass {option}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _in_place_reason(out: Path) -> str | None:
    """Why ``out`` cannot be replaced by a folder written beside it, or None."""
    if _inside(Path.cwd().resolve(), out):
        return "it holds the current directory"
    if out.exists() and os.path.ismount(out):
        return "it is a mount point"
    parent = next(p for p in out.parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no new folder can be made in {parent}"
    return None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed there
        shutil.copy2(src, dst)


def _keep_unwritten(previous: Path, new: Path) -> None:
    """Add to ``new`` everything of ``previous`` that ``new`` does not hold (hard links where possible); folders
    present in both are merged and keep ``previous``'s permissions."""
    def written(folder: str, names: list[str]) -> list[str]:
        target = new / Path(folder).relative_to(previous)
        return [name for name in names if os.path.lexists(target / name)
                and not (os.path.isdir(Path(folder, name)) and not os.path.islink(Path(folder, name))
                         and (target / name).is_dir() and not (target / name).is_symlink())]

    shutil.copytree(previous, new, symlinks=True, ignore=written, copy_function=_link_or_copy, dirs_exist_ok=True)


@contextlib.contextmanager
def atomic_update(folder: str | os.PathLike, carry: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``folder``; on success, what was written there replaces the same
    paths in ``folder`` in one step, and everything else ``folder`` held stays (hard links, not copies).

    For writers that add to a folder in place, as peft's ``PeftModel.save_pretrained`` does: an interrupted
    write leaves ``folder`` as it was, and a hidden ``.<name>.tmp-<pid>-*`` folder that the next save to the same
    place removes. ``carry``: files of ``folder`` the writer reads and updates (peft's model card), copied into
    the temporary folder first. Written files get the umask's permissions; kept ones keep theirs. A folder that
    cannot be swapped (it holds the current directory, is a mount point, or no folder can be made beside it) is
    written in place, with a warning saying why.
    """
    out = Path(os.fspath(folder)).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{folder} is a file, not a folder; choose a folder to write to")
    clean_stale_temporaries(out)
    obstacle = _in_place_reason(out)
    if obstacle:
        logger.warning("writing into %s in place, not atomically: %s", folder, obstacle)
        out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        for name in carry:
            if (out / name).is_file():
                shutil.copy2(out / name, tmp / name)
        yield tmp
        apply_umask(tmp)  # what was written; the files kept below keep their own permissions
        if out.is_dir():
            _keep_unwritten(out, tmp)
        _swap_into_place(tmp, out, f"{folder} was created by another process while this one was saving; save "
                                   "again")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def method_tag(peft_type: str) -> str:
    """The Hub tag of a PEFT method of ours, e.g. ``sparse-soup`` for ``SPARSE_SOUP``."""
    return str(peft_type).lower().replace("_", "-")


# -- model card -----------------------------------------------------------------------------------------
def needs_compress_to_load(model: nn.Module) -> bool:
    """True when the model's config is a type registered by ``import compress``: compact (per-layer widths) or
    multi-exit."""
    return str(getattr(model.config, "model_type", "")).startswith((PREFIX, MULTI_EXIT))


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
    tags = [TAG, "multi-exit" if model_type.startswith(MULTI_EXIT) else "pruning"]
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
        backbone = getattr(getattr(model.config, "backbone", None), "model_type", None)  # a multi-exit model's
        default_title = (f"Multi-exit {backbone or model_type}" if model_type.startswith(MULTI_EXIT)
                         else f"Structurally pruned {model_type}")
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
        lines += [f"| note | {note} |" for note in report.get("notes", [])]
        lines.append("")
    lines += ["## Loading", ""]
    if str(model.config.model_type).startswith(MULTI_EXIT):
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
