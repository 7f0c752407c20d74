"""Saving pruned models: compact safetensors folders, written atomically, with a model card."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from compress.pruning.compact import PREFIX

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it replaces ``out_dir`` in one rename.

    An interrupted write leaves only a hidden ``.<name>.tmp-*`` folder, never a half-written ``out_dir``.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another folder or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, backup / out.name)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def needs_compress_to_load(model: nn.Module) -> bool:
    """True when the model's config is a compact (per-layer width) type registered by ``import compress``."""
    return str(getattr(model.config, "model_type", "")).startswith(PREFIX)


def model_card(model: nn.Module, report: dict | None = None, title: str | None = None) -> str:
    """A README.md for a pruned model: method, ratios, parameters before/after and how to load it."""
    cls = type(model).__name__
    auto = _auto_class_name(model)
    lines = [
        "---",
        "library_name: transformers",
        "tags: [peft-compress, pruning, structured-pruning]",
        "---",
        "",
        f"# {title or 'Structurally pruned ' + str(model.config.model_type)}",
        "",
        "Pruned with [peft-compress](https://pypi.org/project/peft-compress/): parameters are physically "
        "removed, so this folder is smaller and inference is cheaper than the original model.",
        "",
    ]
    if report:
        ratios = ", ".join(f"{k} {v:.0%}" for k, v in report.get("ratios", {}).items())
        before, after = report.get("params_before"), report.get("params_after")
        lines += [
            "| | |",
            "|---|---|",
            f"| method | structured pruning ({report.get('mode', '?')} mode, "
            f"{report.get('importance', '?')} importance) |",
            f"| removed | {ratios} |",
        ]
        if before and after:
            lines.append(f"| parameters | {before:,} -> {after:,} ({after / before:.1%}) |")
        labels = {"ffn": "FFN width per layer", "heads": "attention heads per layer",
                  "kv_heads": "kv heads per layer", "layers": "layers per stack"}
        for name, widths in report.get("widths_after", {}).items():
            lines.append(f"| {labels.get(name, name)} | {widths} |")
        lines.append("")
    if needs_compress_to_load(model):
        lines += [
            "## Loading",
            "",
            "Layers have different widths, which the standard config cannot express: "
            "**`import compress` is needed** before loading (it registers the compact classes; no remote "
            "code).",
            "",
            "```python",
            "import compress  # registers the compact model classes",
            f"from transformers import {auto}",
            f'model = {auto}.from_pretrained("path/to/this/folder")',
            "```",
        ]
    else:
        lines += [
            "## Loading",
            "",
            "A standard transformers folder: no extra package is needed.",
            "",
            "```python",
            f"from transformers import {auto}",
            f'model = {auto}.from_pretrained("path/to/this/folder")',
            "```",
        ]
    lines += ["", f"Architecture: `{cls}`.", ""]
    return "\n".join(lines)


def _auto_class_name(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, auto in (("ForSequenceClassification", "AutoModelForSequenceClassification"),
                         ("ForCausalLM", "AutoModelForCausalLM"),
                         ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
                         ("ForMaskedLM", "AutoModelForMaskedLM"),
                         ("ForTokenClassification", "AutoModelForTokenClassification"),
                         ("ForQuestionAnswering", "AutoModelForQuestionAnswering")):
        if name.endswith(suffix):
            return auto
    return "AutoModel"


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, report=None,
                    overwrite: bool = False, title: str | None = None) -> Path:
    """Save a (pruned) model as a compact safetensors folder with config, tokenizer and model card.

    The folder is written to a temporary sibling and renamed into place, so an interrupted save never
    leaves a folder that looks valid. Only safetensors are written.

    Args:
        model: the model to save (a pruned or compact model, or any transformers model).
        out_dir: destination folder.
        tokenizer: saved alongside when given (``pipeline(...)`` then works from the folder alone).
        report: a :class:`~compress.PruneReport` (or its ``to_dict()``) summarised in the model card and
            written to ``compress_report.json``.
        overwrite: replace an existing folder (atomically).
        title: model card title.
    """
    report_dict = report.to_dict() if hasattr(report, "to_dict") else report
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(model, report_dict, title), encoding="utf-8")
        if report_dict is not None:
            (tmp / "compress_report.json").write_text(json.dumps(report_dict, indent=2), encoding="utf-8")
    logger.info("saved %s to %s", type(model).__name__, out_dir)
    return Path(out_dir)
