"""What the sparse-soup adapter, the compact sparse file and soups share about tensors: masks packed to bits, the
checksums stored beside them, and the refusal of tensors that hold no weights."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np
import torch

from compress.errors import CompressError

__all__ = ["check_weights_loaded", "checksum", "pack_bits", "unpack_bits"]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as bytes, eight entries per byte (row-major, least significant bit first, the last byte
    padded with zeros)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy(), bitorder="little"))


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` bits of :func:`pack_bits`'s bytes, as a flat boolean tensor."""
    bits = np.unpackbits(packed.detach().cpu().reshape(-1).numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def checksum(*tensors: torch.Tensor) -> str:
    """The CRC-32 of the tensors' bytes, in order (8 hex digits): what the compact file and sparse-soup adapters
    store beside their masks to detect edits and damage."""
    crc = 0
    for tensor in tensors:
        crc = zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def check_weights_loaded(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse tensors on the meta device (a model built under ``torch.device("meta")`` or ``init_empty_weights``,
    or offloaded by ``device_map``), which hold no values, naming ``what`` holds them and the first one."""
    meta = [name for name, tensor in tensors.items() if tensor.is_meta]
    if meta:
        raise CompressError(f"{what} has {len(meta)} tensors on the meta device (e.g. {meta[0]}), which hold no "
                            "weights: load the weights first (from_pretrained onto one device, or to_empty() and "
                            "load_state_dict)")
