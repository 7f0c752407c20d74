"""Publishing saved folders on the Hugging Face Hub: what a folder's card says, checking a folder, pushing it.

Every folder peft-compress writes (``compress.save_pretrained``, ``compress.save_sparse``, a PEFT model's
``save_pretrained``) has a README.md model card with YAML metadata (library, tags including ``peft-compress``
and the method, base model, pipeline tag). :func:`annotate_card` adds what a run knows (datasets, metrics, base
model) through ``huggingface_hub.ModelCard``; :func:`push_to_hub` checks the folder (:func:`check_folder`: what
the folder's configs claim against its weights, without the base model) and uploads it as it is. What is
particular to a method is checked by the method's own code, which each plugin registers here
(:func:`register_folder_check`, :func:`register_folder_format`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """Check that a folder can be published as it is, and that what it claims holds, without the base model:

    - no symbolic link leads out of the folder (an upload would send the file it points to);
    - its card parses, with metadata naming the library;
    - a model folder's config loads through its config class (with that class's validation) and its weights
      load with it, every weight the model expects present and in its shape;
    - a folder of a method's own format (:func:`register_folder_format`, e.g. a compact sparse folder) loads;
    - a PEFT adapter's config loads (with its method's validation), its weights file is readable, and the
      method's own check (:func:`register_folder_check`) finds nothing wrong: each method of
      :mod:`compress.plugins` checks tensor shapes against its config (ranks, side network, exit heads, recorded
      projection shapes, masks), a Pruning-Adapter its ``pruning_plan`` against the copy saved with the weights,
      a sparse soup its masks against their saved checksums and the config's sparsity.

    Raises:
        CompressError: naming what is missing or broken.
    """
    from huggingface_hub import ModelCard

    folder = Path(folder)
    if not folder.is_dir():
        raise CompressError(f"{folder} is not a folder")
    _check_links(folder)
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


def _check_links(folder: Path) -> None:
    """Refuse symbolic links that point outside ``folder`` or nowhere: the Hub client uploads what a link points
    to, so a link to a private file elsewhere would publish that file."""
    root = folder.resolve()
    for directory, subfolders, files in os.walk(folder):  # linked folders are listed, not entered
        for name in sorted(subfolders + files):
            path = Path(directory) / name
            if not path.is_symlink():
                continue
            target = path.resolve()
            if not target.exists():
                raise CompressError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: remove "
                                    "the link or put the file itself in the folder")
            if not target.is_relative_to(root):
                raise CompressError(f"{path} is a symbolic link to {target}, outside {folder}: pushing would upload "
                                    "that file; copy the file into the folder if it belongs there, else remove the "
                                    "link")


def _load_weights(folder: Path) -> str:
    if (folder / "adapter_config.json").is_file():
        _check_adapter(folder)
        return "adapter"
    try:
        for marker, (kind, load) in _FOLDER_FORMATS.items():
            if (folder / marker).is_file():
                load(folder)
                return kind
        if not list(folder.glob("*.safetensors")):
            raise CompressError(f"{folder} has no safetensors weights")
        _load_config(folder)
        _load_model(folder)
        return "model"
    except CompressError:
        raise
    except Exception as exc:  # whatever transformers/safetensors raise for a damaged folder
        raise CompressError(f"{folder}: the weights do not load ({type(exc).__name__}: {exc})") from None


def _load_model(folder: Path) -> None:
    """Load the model with the Auto class of the architecture its config names; weights the model expects but the
    folder lacks (which transformers would initialise at random) or holds in another shape are refused."""
    import json

    import transformers

    from compress.tasks import task_of_class

    architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or [""]
    found = task_of_class(architectures[0])
    if found is None:
        raise CompressError(f"{folder / 'config.json'} names no architecture transformers' Auto classes load "
                            f"(architectures: {architectures}); save the model with compress.save_pretrained")
    _, info = getattr(transformers, found[1]).from_pretrained(folder, output_loading_info=True)
    missing, mismatched = info.get("missing_keys") or [], info.get("mismatched_keys") or []
    if missing or mismatched:
        what = (f"{len(missing)} weights of {architectures[0]} are missing (e.g. {sorted(missing)[0]})" if missing
                else f"{len(mismatched)} weights have another shape than the config gives them (e.g. "
                     f"{mismatched[0][0]})")
        raise CompressError(f"{folder}: {what}; loading would initialise them at random: save the model again")


def _load_config(folder: Path) -> None:
    """A model folder's config.json through its config class (``import compress`` registers ours), so that the
    class's own validation of the fields runs."""
    from transformers import AutoConfig

    config_file = folder / "config.json"
    try:
        AutoConfig.from_pretrained(folder)
    except CompressError as exc:
        raise CompressError(str(exc) if str(config_file) in str(exc) else f"{config_file}: {exc}") from None
    except Exception as exc:  # transformers' validation errors have no common base class
        raise CompressError(f"{config_file} does not load ({type(exc).__name__}: {exc}); fix it or save the model "
                            "again") from None


# -- adapters: what the config says against what the weights hold ---------------------------------------------
ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: checks a saved adapter of the method ``peft_type``: (folder, adapter config, tensor name -> shape) -> problems
AdapterCheck = Callable[[Path, Any, dict[str, tuple[int, ...]]], list[str]]
_ADAPTER_CHECKS: dict[str, AdapterCheck] = {}
#: marker file -> (folder kind, loader): folder formats of the methods (e.g. sparse soups' compact file)
_FOLDER_FORMATS: dict[str, tuple[str, Callable[[Path], Any]]] = {}


def register_folder_check(peft_type: str, check: AdapterCheck) -> None:
    """Have :func:`check_folder` (and ``compress push``) check the saved adapters of the PEFT method ``peft_type``
    with ``check(folder, config, shapes)``: ``config`` is the loaded adapter config, ``shapes`` maps each tensor of
    ``adapter_model.safetensors`` to its shape. It returns one line per problem (an empty list when it finds none),
    or raises :class:`~compress.errors.CompressError` for a problem it words itself. Each plugin registers its own
    from its ``__init__`` (the library knows no method); without one, the config and the weights file are still
    checked to load."""
    _ADAPTER_CHECKS[str(peft_type)] = check


def register_folder_format(kind: str, marker: str, load: Callable[[Path], Any]) -> None:
    """Have :func:`check_folder` recognise a folder that holds the file ``marker`` as a folder of ``kind`` (e.g.
    ``"sparse"``) and check it with ``load(folder)``, which raises on a damaged folder."""
    _FOLDER_FORMATS[marker] = (kind, load)


def _check_adapter(folder: Path) -> None:
    from peft import PeftConfig
    from safetensors import safe_open

    try:
        config = PeftConfig.from_pretrained(folder)
    except CompressError as exc:
        config_file = str(folder / "adapter_config.json")
        raise CompressError(str(exc) if config_file in str(exc) else f"{config_file}: {exc}") from None
    except Exception as exc:  # JSON errors, an unknown peft_type, fields the config class rejects
        raise CompressError(f"{folder / 'adapter_config.json'} does not load ({type(exc).__name__}: {exc}); fix it "
                            "or save the adapter again") from None
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CompressError(f"{folder}: adapter_config.json without {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # safetensors' errors for a truncated or damaged file
        raise CompressError(f"{weights} is not a readable safetensors file ({exc}); save the adapter again") from None
    if not shapes:
        raise CompressError(f"{weights} holds no tensors")
    check = _ADAPTER_CHECKS.get(str(config.peft_type))
    problems = check(folder, config, shapes) if check is not None else []
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CompressError(f"{weights} does not match adapter_config.json: {problems[0]}{more}; the adapter would "
                            "not load: save it again from the trained model")


_ADAPTED = re.compile(r"^(?P<module>.+)\.(?P<prefix>pa|sparse|lora)_(?P<part>A\.weight|B\.weight|bias|mask|delta)$")


def low_rank_problems(config, shapes: dict[str, tuple[int, ...]], prefixes: tuple[str, ...] = ("lora",)) -> list[str]:
    """What in saved low-rank adapter weights contradicts the config, one line per problem: ``A.weight`` is
    ``[r, in]``, ``B.weight`` ``[out, r]`` (``r`` from the config, unless a ``rank_pattern`` varies it); a bias is
    ``[out]``; a mask covers the adapted weight (``[out, in]``) and a dense update has the mask's shape.
    ``prefixes``: the method's tensor-name prefixes (``lora`` for ``lora_A``, ``sparse`` for ``sparse_mask``, ...).
    For the checks of :func:`register_folder_check`."""
    rank = None if getattr(config, "rank_pattern", None) else config.r
    modules: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for key, shape in shapes.items():
        found = _ADAPTED.match(key)
        if found and found["prefix"] in prefixes:
            modules.setdefault(found["module"], {})[found["part"]] = (f"{found['module']}.{found['prefix']}_"
                                                                      f"{found['part']}", shape)
    problems = []
    for parts in (modules[name] for name in sorted(modules)):
        (a_name, a), (b_name, b) = parts.get("A.weight", (None, None)), parts.get("B.weight", (None, None))
        if (a is None) != (b is None):
            problems.append(f"{a_name or b_name} has no {'B' if a is not None else 'A'} partner")
        weight = None  # [out, in] of the adapted layer, as the low-rank pair gives it
        if a is not None and b is not None:
            wanted = rank if rank is not None else (a[0] if len(a) == 2 else None)
            if len(a) != 2 or a[0] != wanted:
                problems.append(f"{a_name} is {list(a)}, expected [r={wanted}, in_features]")
            elif len(b) != 2 or b[1] != wanted:
                problems.append(f"{b_name} is {list(b)}, expected [out_features, r={wanted}]")
            else:
                weight = (b[0], a[1])
        bias_name, bias = parts.get("bias", (None, None))
        if bias is not None and weight is not None and bias != weight[:1]:
            problems.append(f"{bias_name} is {list(bias)}, expected [{weight[0]}] ({b_name}'s out_features)")
        (mask_name, mask), (delta_name, delta) = parts.get("mask", (None, None)), parts.get("delta", (None, None))
        if mask is not None and (len(mask) != 2 or (weight is not None and mask != weight)):
            expected = f"{list(weight)} (from the A and B matrices)" if weight else "[out_features, in_features]"
            problems.append(f"{mask_name} is {list(mask)}, expected {expected}")
        if delta is not None and delta != mask:
            problems.append(f"{delta_name} is {list(delta)}, its mask {list(mask) if mask else 'is missing'}")
    return problems


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
