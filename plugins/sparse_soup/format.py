"""A compact file for sparse models: each sparse tensor as its kept values plus a bit-packed mask.

``save_sparse`` writes a folder like :func:`compress.save_pretrained` (config, tokenizer, model card), with the
weights in ``model.sparse.safetensors``: a tensor with zeros is stored as ``<name>.__values__`` (the nonzero
entries in row-major order) and ``<name>.__mask__`` (one bit per entry, packed eight to a byte); other tensors
are stored as they are. The file's metadata holds each sparse tensor's shape (``shapes``) and a CRC-32 of its
mask and values (``checksums``), so that an edited or damaged mask (a kept bit swapped with a removed one keeps
every count) is refused on load. ``load_sparse`` rebuilds the model exactly (``import compress`` is needed:
transformers does not read this file, and ``from_pretrained`` on the folder fails naming the missing weights file).

Not compressed-tensors' ``sparse-bitmask`` / ``sparse-24-bitmask``: no reader of those formats works with
transformers 5. compressed-tensors removed its sparse compressors in 0.15, the first release that accepts
transformers 5; transformers 5 ignores a checkpoint's ``sparsity_config`` and loads such a folder with its sparse
weights newly initialised; vLLM no longer serves sparse compressed-tensors checkpoints. To serve a sparse model
with transformers or vLLM, save it dense (:func:`compress.save_pretrained`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from compress.errors import CompressError

from .tensors import check_weights_loaded, checksum, pack_bits, unpack_bits

logger = logging.getLogger(__name__)

SPARSE_WEIGHTS = "model.sparse.safetensors"
FORMAT = "compress-sparse-bitmask-v1"
_VALUES, _MASK = ".__values__", ".__mask__"


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state tensors on CPU, tied ones (the same storage under two names) once."""
    state, seen, out = model.state_dict(), {}, {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue  # tied (e.g. input and output embeddings): transformers re-ties it on load
        seen[key] = name
        out[name] = tensor.detach().cpu().contiguous()
    return out


def save_sparse(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``model`` as a compact sparse folder (see the module docstring); atomic like
    :func:`compress.save_pretrained` (a temporary sibling renamed into place, the umask's permissions), with the
    same rule for replacing an existing folder (``overwrite``). Returns the folder.

    Raises:
        CompressError: the model has tensors on the meta device (no weights to save); the destination cannot be
            written or replaced (:class:`~compress.OutputFolderError`).
    """
    from compress.export import atomic_directory, model_card

    check_weights_loaded(model.state_dict(), f"the model given to save_sparse ({type(model).__name__})")
    tensors, shapes, checksums = {}, {}, {}
    for name, tensor in _unique_tensors(model).items():
        if tensor.is_floating_point() and tensor.dim() >= 2 and bool((tensor == 0).any()):
            mask = tensor != 0
            tensors[name + _VALUES] = tensor[mask].contiguous()
            tensors[name + _MASK] = pack_bits(mask)
            shapes[name] = list(tensor.shape)
            checksums[name] = checksum(tensors[name + _MASK], tensors[name + _VALUES])
        else:
            tensors[name] = tensor
    sources = [getattr(model, "name_or_path", None), getattr(tokenizer, "name_or_path", None)]
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # which class load_sparse builds
    with atomic_directory(out_dir, overwrite=overwrite, inputs=sources) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, tmp / SPARSE_WEIGHTS, metadata={"format": FORMAT, "shapes": json.dumps(shapes),
                                                           "checksums": json.dumps(checksums)})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(model), encoding="utf-8")
    return Path(out_dir)


def _metadata_json(path: str | os.PathLike, metadata: dict, field: str, what: str) -> dict:
    """A JSON object of the file's metadata (``{}`` when absent), or a CompressError naming the field."""
    try:
        value = json.loads(metadata.get(field, "{}"))
    except ValueError as exc:
        raise CompressError(f"{path}: the metadata field {field!r} is not valid JSON ({exc}); {_DAMAGED}") from None
    if not isinstance(value, dict):
        raise CompressError(f"{path}: the metadata field {field!r} must map each sparse tensor to {what}, got "
                            f"{type(value).__name__}; {_DAMAGED}")
    return value


_DAMAGED = "the file is damaged or was edited: save the model again with compress.save_sparse"


def read_sparse_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full tensors stored in a ``model.sparse.safetensors`` file.

    Raises:
        CompressError: a file safetensors cannot read (e.g. truncated), not this format, metadata that is not
            valid (``shapes`` not a mapping of names to non-negative sizes), a mask that is not packed bytes or
            whose length does not fit its shape, a mask whose kept count differs from its values' length, or a
            mask or values that differ from the checksum saved with them; each naming the file and the tensor.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CompressError(f"{path} is not a compact sparse file ({FORMAT}); it says format "
                                    f"{metadata.get('format')!r}")
            stored = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError) as exc:
        raise CompressError(f"{path} cannot be read as a safetensors file ({exc}): it is truncated or damaged; save "
                            "the model again with compress.save_sparse") from None
    shapes = _metadata_json(path, metadata, "shapes", "its shape (a list of sizes)")
    if "checksums" in metadata:
        checksums = _metadata_json(path, metadata, "checksums", "a checksum")
    else:
        checksums = None
        logger.warning("%s carries no checksums (written by an older peft-compress): its masks' positions cannot be "
                       "verified. Save it again with compress.save_sparse to add them", path)
    state = {k: v for k, v in stored.items() if not k.endswith((_VALUES, _MASK))}
    for name, shape in shapes.items():
        if not isinstance(shape, list) or any(type(size) is not int or size < 0 for size in shape):
            raise CompressError(f"{path}: the shape of {name} in the metadata is {shape!r}, not a list of "
                                f"non-negative whole numbers; {_DAMAGED}")
        values, packed = stored.get(name + _VALUES), stored.get(name + _MASK)
        if values is None or packed is None:
            raise CompressError(f"{path}: tensor {name} lacks its {'values' if values is None else 'mask'}")
        if packed.dtype != torch.uint8 or packed.dim() != 1:
            raise CompressError(f"{path}: the mask of {name} is {packed.dtype} of shape {tuple(packed.shape)}; a mask "
                                f"is packed bits (uint8, one dimension); {_DAMAGED}")
        if not values.is_floating_point() or values.dim() != 1:
            raise CompressError(f"{path}: the values of {name} are {values.dtype} of shape {tuple(values.shape)}; "
                                f"they are a one-dimensional float tensor; {_DAMAGED}")
        numel = int(torch.Size(shape).numel())
        if packed.numel() != (numel + 7) // 8:
            raise CompressError(f"{path}: the mask of {name} holds {packed.numel() * 8} bits for {numel} entries "
                                f"(shape {shape}); {_DAMAGED}")
        mask = unpack_bits(packed, numel)
        kept = int(mask.sum())
        if kept != values.numel():
            raise CompressError(f"{path}: the mask of {name} keeps {kept} entries but {values.numel()} values are "
                                "stored; the file is damaged or was edited")
        if checksums is not None and checksums.get(name) != checksum(packed, values):
            problem = "has no checksum" if name not in checksums else "differ from the checksum saved with them"
            raise CompressError(f"{path}: the mask and values of {name} {problem}; {_DAMAGED}")
        full = torch.zeros(numel, dtype=values.dtype)
        full[mask] = values
        state[name] = full.reshape(shape)
    if checksums is not None and set(checksums) - set(shapes):
        extra = sorted(set(checksums) - set(shapes))
        raise CompressError(f"{path}: {extra[0]} has a checksum but no shape: its sparse tensor is missing; {_DAMAGED}")
    return state


def load_sparse(folder: str | os.PathLike, auto_class: str | None = None) -> nn.Module:
    """Rebuild the model saved by :func:`save_sparse`, with the Auto class its config names (or ``auto_class``).

    Raises:
        CompressError: the folder is not a compact sparse folder, its config or weights file cannot be read or
            fails the checks of :func:`read_sparse_state`, or its tensors do not fit the model its config builds
            (naming the first mismatching tensor).
    """
    import transformers
    from transformers import AutoConfig

    from compress.tasks import task_of_class

    folder = Path(folder)
    if not (folder / SPARSE_WEIGHTS).exists():
        raise CompressError(f"{folder} has no {SPARSE_WEIGHTS}: not a compact sparse folder (save_sparse writes one)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise CompressError(f"{folder / 'config.json'} cannot be read as a transformers config ({exc}); save the "
                            "model again with compress.save_sparse") from None
    if auto_class is None:
        found = task_of_class((getattr(config, "architectures", None) or [""])[0])
        auto_class = found[1] if found else "AutoModel"
    model = getattr(transformers, auto_class).from_config(config)
    state = read_sparse_state(folder / SPARSE_WEIGHTS)
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise CompressError(f"{folder}: {name} has shape {tuple(tensor.shape)} in the file, but the config builds "
                                f"{tuple(expected[name].shape)}; the weights and config.json do not belong together")
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.missing_keys if _is_tied(model, k, state)}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        what = f"missing {missing[0]}" if missing else f"unexpected {result.unexpected_keys[0]}"
        raise CompressError(f"{folder}: the stored tensors do not match the model its config builds ({what}; "
                            f"{len(missing)} missing, {len(result.unexpected_keys)} unexpected)")
    model.tie_weights()
    return model.eval()


def _is_tied(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether a missing key is a tied copy of a stored tensor (saved once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(key)
    return target is not None and any(p is target and n in state for n, p in params.items() if n != key)
