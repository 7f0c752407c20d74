"""Publishing saved folders on the Hugging Face Hub: what a folder's card says, checking a folder, pushing it.

Every folder peft-compress writes (``compress.save_pretrained``, ``compress.save_sparse``, a PEFT model's
``save_pretrained``) has a README.md model card with YAML metadata (library, tags including ``peft-compress``
and the method, base model, pipeline tag). :func:`annotate_card` adds what a run knows (datasets, metrics, base
model) through ``huggingface_hub.ModelCard``; :func:`push_to_hub` checks the folder (:func:`check_folder`: what
the folder's configs claim against its weights, without the base model) and uploads it as it is.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
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
    """Check that a folder can be published as it is, and that what it claims holds, without the base model:

    - no symbolic link leads out of the folder (an upload would send the file it points to);
    - its card parses, with metadata naming the library;
    - a model folder's config loads through its config class (with that class's validation) and its weights
      load with it (shapes included);
    - a compact sparse folder loads through :func:`compress.load_sparse`;
    - a PEFT adapter's config loads (with its method's validation), its weights file is readable and each
      tensor has the shape the adapter config gives it (ranks, side-network config, exit heads, recorded
      projection shapes, masks), and a Pruning-Adapter's ``pruning_plan`` equals the copy saved with the weights.

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
    from compress.plugins.sparse_soup.format import SPARSE_WEIGHTS, load_sparse

    if (folder / "adapter_config.json").is_file():
        _check_adapter(folder)
        return "adapter"
    try:
        if (folder / SPARSE_WEIGHTS).is_file():
            load_sparse(folder)
            return "sparse"
        if not list(folder.glob("*.safetensors")):
            raise CompressError(f"{folder} has no safetensors weights")
        _load_config(folder)
        from compress.plugins.sparse_soup.soup import load_ingredient

        load_ingredient(folder)
        return "model"
    except CompressError:
        raise
    except Exception as exc:  # whatever transformers/safetensors raise for a damaged folder
        raise CompressError(f"{folder}: the weights do not load ({type(exc).__name__}: {exc})") from None


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


def _check_adapter(folder: Path) -> None:
    from peft import PeftConfig
    from safetensors import safe_open

    from compress.plugins.pruning_adapter.plan import PLAN_KEY

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
            plan = f.get_tensor(PLAN_KEY) if PLAN_KEY in shapes and _is_pruning_adapter(config) else None
    except Exception as exc:  # safetensors' errors for a truncated or damaged file
        raise CompressError(f"{weights} is not a readable safetensors file ({exc}); save the adapter again") from None
    if not shapes:
        raise CompressError(f"{weights} holds no tensors")
    problems = adapter_shape_problems(config, shapes)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CompressError(f"{weights} does not match adapter_config.json: {problems[0]}{more}; the adapter would "
                            "not load: save it again from the trained model")
    if _is_pruning_adapter(config):
        _check_saved_plan(config.pruning_plan, plan, folder)


def _is_pruning_adapter(config) -> bool:
    return str(config.peft_type) == "PRUNING_ADAPTER"


def _check_saved_plan(plan: list[dict], saved_copy, folder: Path) -> None:
    """The config's ``pruning_plan`` must equal the copy saved in the weights file (what loading replays is
    checked against it, so an edited plan would not load)."""
    from compress.plugins.pruning_adapter.plan import ADVICE, decode_plan, describe_difference, same_events

    config_file = folder / "adapter_config.json"
    if saved_copy is None:
        if plan:
            logger.warning("%s carries no copy of the pruning plan (saved by an older peft-compress): pruning_plan "
                           "cannot be checked against it; save the adapter again to add it", folder / ADAPTER_WEIGHTS)
        return
    saved = decode_plan(saved_copy)
    for index, (ours, theirs) in enumerate(zip(plan, saved)):
        if not same_events(ours, theirs):
            raise CompressError(f"{config_file}: pruning_plan[{index}] differs from the copy saved with the adapter "
                                f"weights ({ADAPTER_WEIGHTS}) in {describe_difference(ours, theirs)}. {ADVICE}")
    if len(plan) != len(saved):
        raise CompressError(f"{config_file}: pruning_plan has {len(plan)} events, the copy saved with the adapter "
                            f"weights ({ADAPTER_WEIGHTS}) {len(saved)}. {ADVICE}")


def adapter_shape_problems(config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """What in an adapter's weights contradicts its config, checked without the base model: one line per
    problem (empty when none is found).

    ``config`` is the adapter's :class:`peft.PeftConfig`; ``shapes`` maps each tensor of its weights file to its
    shape. Checked for our methods: low-rank pairs against ``r`` and each other (Pruning-Adapter, sparse-soup
    LoRA), masks against the weights they mask, exit heads against each other, ``exit_layers`` and the model's own
    head, recorded projection shapes (``slender_shapes``), and a Ladder Side-Tuning side network against the
    network ``side_config`` builds.
    """
    method = str(config.peft_type)
    if method == "PRUNING_ADAPTER":
        exits = config.exits
        return _low_rank_problems(("pa", "lora"), config, shapes) + (
            _exit_problems(exits.get("exit_layers"), exits.get("exit_head", "pooled"), shapes) if exits else [])
    if method == "SPARSE_SOUP":
        return _low_rank_problems(("sparse", "lora"), config, shapes)
    if method == "MULTI_EXIT":
        return _exit_problems(config.exit_layers, config.exit_head, shapes) + _slender_problems(config, shapes)
    if method == "LADDER_SIDE":
        return _side_problems(config, shapes)
    return []


_ADAPTED = re.compile(r"^(?P<module>.+)\.(?P<prefix>pa|sparse|lora)_(?P<part>A\.weight|B\.weight|bias|mask|delta)$")


def _low_rank_problems(prefixes: tuple[str, ...], config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """``A.weight`` is ``[r, in]``, ``B.weight`` ``[out, r]`` (``r`` from the config, unless a ``rank_pattern``
    varies it); a bias is ``[out]``; a mask covers the adapted weight (``[out, in]``) and a dense update has the
    mask's shape. ``prefixes``: the method's tensor-name prefixes (``pa_A``, ``lora_A``, ``sparse_mask``, ...)."""
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


_EXIT_HEAD = re.compile(r"\.exit_heads\.(?:[^.]+\.)?(?P<index>\d+)\.(?P<part>(?:dense|out)\.(?:weight|bias))$")
#: the model's own classification head, whose classes the exit heads predict (BERT, RoBERTa, Llama/Qwen2)
_OWN_HEADS = (".classifier.weight", ".classifier.out_proj.weight", ".score.weight")


def _exit_problems(exit_layers: list[int] | None, design: str, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Exit heads: numbered 0..n-1, one per listed block before the last, all of one shape (``dense`` only for the
    ``pooled`` design), predicting as many classes as the model's own head."""
    heads: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        found = _EXIT_HEAD.search(key)
        if found:
            heads.setdefault(int(found["index"]), {})[found["part"]] = shape
    if not heads:
        return []
    problems = []
    indices = sorted(heads)
    if indices != list(range(len(indices))):
        problems.append(f"the exit heads are numbered {indices}, expected 0..{len(indices) - 1}")
    if exit_layers is not None and len(heads) not in (len(exit_layers), len(exit_layers) - 1):
        problems.append(f"{len(heads)} exit heads, but exit_layers={exit_layers} gives one per listed block (the "
                        "last block's exit is the model's own head)")
    first = heads[indices[0]]
    for index in indices[1:]:
        for part in sorted(set(first) | set(heads[index])):
            if heads[index].get(part) != first.get(part):
                problems.append(f"exit head {index}: {part} is {_listed(heads[index].get(part))}, exit head "
                                f"{indices[0]}'s is {_listed(first.get(part))}; every exit head has one shape")
                break
    dense, dense_bias = first.get("dense.weight"), first.get("dense.bias")
    out, out_bias = first.get("out.weight"), first.get("out.bias")
    if out is None or len(out) != 2:
        return problems + [f"exit head {indices[0]}: out.weight is {_listed(out)}, expected [num_labels, width]"]
    if design == "linear" and dense is not None:
        problems.append("exit_head='linear' heads have no dense layer, but the weights hold exit_heads.*.dense")
    if dense is not None and (len(dense) != 2 or out[1] != dense[0]):
        problems.append(f"exit heads: dense.weight is {list(dense)} but out.weight {list(out)} (out reads what dense "
                        "writes)")
    if dense is not None and dense_bias is not None and dense_bias != dense[:1]:
        problems.append(f"exit heads: dense.bias is {list(dense_bias)}, dense.weight {list(dense)}")
    if out_bias is not None and out_bias != out[:1]:
        problems.append(f"exit heads: out.bias is {list(out_bias)}, out.weight {list(out)}")
    own = next(((key, shape) for key, shape in sorted(shapes.items()) if key.endswith(_OWN_HEADS) and len(shape) == 2),
               None)
    if own is not None and own[1][0] != out[0]:
        problems.append(f"the exit heads predict {out[0]} classes, the model's own head ({own[0]}) {own[1][0]}")
    return problems


def _listed(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else str(list(shape))


def _slender_problems(config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Saved backbone projections have the ``[out, in]`` shapes ``slender_shapes`` records."""
    problems = []
    for path, (out_features, in_features) in sorted((config.slender_shapes or {}).items()):
        for key, shape in shapes.items():
            if key.endswith(f".{path}.weight") and shape != (out_features, in_features):
                problems.append(f"{key} is {list(shape)}, slender_shapes records [{out_features}, {in_features}]")
            elif key.endswith(f".{path}.bias") and shape != (out_features,):
                problems.append(f"{key} is {list(shape)}, slender_shapes records [{out_features}] outputs")
    return problems


_SIDE_PARTS = ("down", "up", "side", "gates")


def _side_problems(config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The side network, ladders, up-projection and gates have the shapes of the network ``side_config``
    describes (at the backbone width the ladders read)."""
    ours: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        _, found, rest = key.partition(".lst_network.")
        if found:
            head, _, tail = rest.partition(".")
            ours[rest if head in _SIDE_PARTS else tail] = shape  # (an adapter name before the part)
    if not ours or config.side_config is None:
        return []
    widths = Counter(shape[1] for name, shape in ours.items()
                     if name.startswith("down.") and name.endswith(".weight") and len(shape) == 2)
    widths.update(shape[0] for name, shape in ours.items() if name == "up.weight" and len(shape) == 2)
    if not widths:
        return ["the weights hold no ladder (lst_network.down.*.weight) or up-projection (lst_network.up.weight)"]
    try:
        expected, blocks = _side_shapes(config, widths.most_common(1)[0][0])
    except Exception as exc:  # transformers' errors for a config that builds no model
        return [f"side_config does not build a side network ({type(exc).__name__}: {exc})"]
    problems = []
    if config.side_layers is not None and blocks != len(config.side_layers):
        problems.append(f"side_config describes {blocks} side blocks, side_layers names {len(config.side_layers)}")
    for name, shape in sorted(ours.items()):
        if name not in expected:
            problems.append(f"lst_network.{name} is not part of the side network side_config describes")
        elif expected[name] != shape:
            problems.append(f"lst_network.{name} is {list(shape)}, side_config gives {list(expected[name])}")
    missing = sorted(set(expected) - set(ours))
    if missing:
        problems.append(f"{len(missing)} tensors of the side network are missing, e.g. lst_network.{missing[0]}")
    return problems


def _side_shapes(config, width: int) -> tuple[dict[str, tuple[int, ...]], int]:
    """Tensor shapes of the side network ``config.side_config`` describes, built on the meta device, and its
    number of blocks."""
    import torch
    from transformers import AutoConfig, AutoModel

    from compress.plugins.ladder_side.layer import LadderSide
    from compress.plugins.ladder_side.side import strip_side

    values = dict(config.side_config)
    model_type = values.pop("model_type")
    with torch.device("meta"):  # (side_from_config builds on the CPU: loading needs the weights there)
        side = strip_side(AutoModel.from_config(AutoConfig.for_model(model_type, **values)))
        network = LadderSide(side, width, config.gate_temperature, config.gate_init)
    return {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}, network.num_blocks


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
