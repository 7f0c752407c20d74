"""Publishing saved folders on the Hugging Face Hub: what a folder's card says, checking a folder, pushing it.

Every folder peft-compress writes (``compress.save_pretrained``, ``compress.save_sparse``, a PEFT model's
``save_pretrained``) has a README.md model card with YAML metadata (library, tags including ``peft-compress``
and the method, base model, pipeline tag). :func:`annotate_card` adds what a run knows (datasets, metrics, base
model) through ``huggingface_hub.ModelCard``; :func:`push_to_hub` checks the folder and uploads it as it is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError

logger = logging.getLogger(__name__)

CARD = "README.md"


@dataclass
class FolderCheck:
    """What :func:`check_folder` found: the folder's kind (``model``, ``adapter`` or ``sparse``) and its card's
    metadata."""

    kind: str
    metadata: dict


def annotate_card(folder: str | os.PathLike, base_model: str | None = None, datasets: list[str] | None = None,
                  metrics: dict[str, float] | None = None, tags: list[str] | None = None,
                  task: str | None = None) -> dict:
    """Add run information to a saved folder's model card (written in place, atomically): ``base_model`` (a
    Hub id), ``datasets`` (Hub ids), ``metrics`` (name -> value, recorded as ``model-index`` results when
    ``task`` names the pipeline tag, e.g. ``text-classification``, and in the card body), extra ``tags``.
    Returns the card's metadata."""
    from huggingface_hub import ModelCard

    path = Path(folder) / CARD
    if not path.is_file():
        raise CompressError(f"{folder} has no {CARD}: save it with compress.save_pretrained / save_sparse or the "
                            "PEFT model's save_pretrained first")
    card = ModelCard.load(path)
    data = card.data
    if base_model:
        data.base_model = base_model
    if datasets:
        data.datasets = sorted(set((data.datasets or []) + list(datasets)))
    if tags:
        data.tags = list(dict.fromkeys((data.tags or []) + list(tags)))
    if task and not data.pipeline_tag:
        data.pipeline_tag = task
    if metrics:
        data.metrics = sorted(set((data.metrics or []) + list(metrics)))
        lines = ["", "## Results", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in metrics.items()]
        card.text = card.text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    tmp = path.with_name(f".{CARD}.tmp-{os.getpid()}")
    tmp.write_text(str(card), encoding="utf-8")
    os.replace(tmp, path)
    return data.to_dict()


def check_folder(folder: str | os.PathLike) -> FolderCheck:
    """Check that a folder can be published: its card parses with metadata naming the library, and its weights
    load (a model through its Auto class, a compact sparse folder through :func:`compress.load_sparse`, a PEFT
    adapter's config and safetensors header).

    Raises:
        CompressError: naming what is missing or broken.
    """
    from huggingface_hub import ModelCard

    folder = Path(folder)
    if not folder.is_dir():
        raise CompressError(f"{folder} is not a folder")
    card_path = folder / CARD
    if not card_path.is_file():
        raise CompressError(f"{folder} has no model card ({CARD}); save it with compress.save_pretrained or the "
                            "PEFT model's save_pretrained")
    try:
        metadata = ModelCard.load(card_path).data.to_dict()
    except Exception as exc:  # the card's YAML: any parse failure means the Hub cannot read it either
        raise CompressError(f"{card_path}: the model card does not parse ({exc})") from None
    if not metadata.get("library_name"):
        raise CompressError(f"{card_path}: the card's metadata names no library_name")
    kind = _load_weights(folder)
    return FolderCheck(kind=kind, metadata=metadata)


def _load_weights(folder: Path) -> str:
    from safetensors import safe_open

    from compress.sparse_format import SPARSE_WEIGHTS, load_sparse

    try:
        if (folder / "adapter_config.json").is_file():
            from peft import PeftConfig

            PeftConfig.from_pretrained(folder)
            weights = folder / "adapter_model.safetensors"
            if not weights.is_file():
                raise CompressError(f"{folder}: adapter_config.json without adapter_model.safetensors")
            with safe_open(str(weights), framework="pt") as f:
                if not list(f.keys()):
                    raise CompressError(f"{weights} holds no tensors")
            return "adapter"
        if (folder / SPARSE_WEIGHTS).is_file():
            load_sparse(folder)
            return "sparse"
        from compress.soup import load_ingredient

        if not list(folder.glob("*.safetensors")):
            raise CompressError(f"{folder} has no safetensors weights")
        load_ingredient(folder)
        return "model"
    except CompressError:
        raise
    except Exception as exc:  # whatever transformers/safetensors raise for a damaged folder
        raise CompressError(f"{folder}: the weights do not load ({type(exc).__name__}: {exc})") from None


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
                token: str | None = None, commit_message: str | None = None, endpoint: str | None = None) -> str:
    """Check ``folder`` (:func:`check_folder`) and upload it as it is to the model repository ``repo_id``
    (created if missing; ``private`` applies to a new repository; ``revision``: a branch, created if missing).
    The token is ``token`` or what ``huggingface_hub`` finds (``HF_TOKEN``, ``hf auth login``); the endpoint is
    ``endpoint`` or ``HF_ENDPOINT``. Nothing local is written. Returns the commit URL.

    Raises:
        CompressError: a folder that does not pass the check (nothing is uploaded), or a Hub that cannot be
            reached or refuses the upload (one line saying which).
    """
    from huggingface_hub import HfApi

    checked = check_folder(folder)
    api = HfApi(token=token, endpoint=endpoint)
    message = commit_message or f"Upload {checked.kind} with peft-compress"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 commit_message=message)
    except Exception as exc:  # httpx / huggingface_hub errors: one line, whatever the transport says
        raise CompressError(f"pushing {folder} to {repo_id} on {api.endpoint} failed: {_reason(exc)}; nothing "
                            "local was changed") from None
    url = str(getattr(info, "commit_url", info))
    logger.info("pushed %s to %s: %s", folder, repo_id, url)
    return url


def _reason(exc: BaseException) -> str:
    """One line for an upload failure."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return f"the Hub refused the token (HTTP {status}): set HF_TOKEN or pass a token with write access"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if status is None and any(word in text.lower() for word in ("connect", "resolve", "network", "timed out")):
        return f"the Hub cannot be reached (no network?): {text}"
    return f"{type(exc).__name__}: {text}"
