"""Sparse-soup tuner: sparse layers in place of the target linear layers, their masks, saved state, merging."""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Mapping

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from compress.errors import CompressError
from compress.export import TAG, method_tag
from compress.pruning.arch import arch_spec
from compress.tuner import CompressLoraModel, float_linear

from .config import SparseSoupConfig
from .importance import magnitude_scores, wanda_scores
from .layer import SparseLinear, SparseLoraLinear, SparseMask
from .mask import masks_from_scores, removed_count
from .tensors import check_weights_loaded, checksum, pack_bits

logger = logging.getLogger(__name__)

#: state-dict key of the masks' checksums in the adapter weights (a uint8 tensor of zlib-compressed JSON: saved
#: mask key -> :func:`~.tensors.checksum` of its packed bits), like the Pruning-Adapter's plan copy
CHECKSUMS_KEY = "sparse_mask_checksums"
_MASK_SUFFIX = ".sparse_mask"
_SAVED_WEIGHTS = "the saved adapter weights (adapter_model.safetensors)"
_RESAVE = ("Use the adapter folder as it was saved, or save it again from the trained model "
           "(peft_model.save_pretrained)")


def _layer_name(key: str) -> str:
    return key.removeprefix("base_model.model.").removesuffix(_MASK_SUFFIX)


def encode_checksums(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The checksums of saved masks (by saved key) as a uint8 tensor for the adapter's state dict."""
    table = {key: checksum(pack_bits(mask.bool())) for key, mask in sorted(masks.items())}
    data = zlib.compress(json.dumps(table, sort_keys=True, separators=(",", ":")).encode("utf-8"), 9)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_checksums(tensor: torch.Tensor) -> dict[str, str]:
    """The table :func:`encode_checksums` stored."""
    try:
        table = json.loads(zlib.decompress(tensor.detach().cpu().to(torch.uint8).numpy().tobytes()).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise CompressError(f"the mask checksums ({CHECKSUMS_KEY!r}) in {_SAVED_WEIGHTS} are unreadable ({exc}): "
                            f"the file is damaged. {_RESAVE}") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise CompressError(f"the mask checksums ({CHECKSUMS_KEY!r}) in {_SAVED_WEIGHTS} are not a table of "
                            f"checksums: the file is damaged. {_RESAVE}")
    return table


def check_saved_masks(masks: dict[str, torch.Tensor], config: SparseSoupConfig,
                      checksums: dict[str, str] | None) -> None:
    """Check saved masks (by saved key) against the checksums saved with them and against what the config
    promises: per layer or overall, the removed count its ``sparsity`` gives (exactly, as the masks are computed),
    or ``n`` kept in every group of ``m`` (``n:m``)."""
    for key, mask in masks.items():
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise CompressError(f"the mask of {_layer_name(key)} in {_SAVED_WEIGHTS} is {mask.dtype} of shape "
                                f"{tuple(mask.shape)}; a mask is a boolean weight matrix. {_RESAVE}")
    if checksums is not None:
        for key in sorted(set(checksums) | set(masks)):
            if key not in masks:
                raise CompressError(f"the mask of {_layer_name(key)} is missing from {_SAVED_WEIGHTS}, which "
                                    f"lists its checksum. {_RESAVE}")
            if checksums.get(key) != checksum(pack_bits(masks[key])):
                problem = "has no checksum" if key not in checksums else "differs from the checksum saved with it"
                raise CompressError(f"the mask of {_layer_name(key)} in {_SAVED_WEIGHTS} {problem}: the file was "
                                    f"edited or damaged. {_RESAVE}")
    said = f"adapter_config.json says sparsity {config.sparsity:g}"
    if config.n_m is not None:
        n, m = config.n_m
        for key, mask in masks.items():
            kept = mask.reshape(mask.shape[0], -1, m).sum(-1) if mask.shape[1] % m == 0 else None
            if kept is None or bool((kept != n).any()):
                found = "rows that are not whole groups" if kept is None else \
                    f"{int(kept[kept != n][0])} in a group"
                raise CompressError(f"the mask of {_layer_name(key)} in {_SAVED_WEIGHTS} keeps {found}, but "
                                    f"adapter_config.json says pattern {config.pattern!r} ({n} kept in every "
                                    f"group of {m}): the masks or the config were edited. {_RESAVE}")
        return
    if config.scope == "layer":
        for key, mask in masks.items():
            removed, expected = int((~mask).sum()), removed_count(mask.numel(), config.sparsity)
            if removed != expected:
                raise CompressError(f"the mask of {_layer_name(key)} in {_SAVED_WEIGHTS} removes {removed} of "
                                    f"{mask.numel()} weights ({removed / max(mask.numel(), 1):.3g}), but {said} "
                                    f"per layer ({expected}): the masks or the config were edited. {_RESAVE}")
        return
    total = sum(mask.numel() for mask in masks.values())
    removed, expected = sum(int((~mask).sum()) for mask in masks.values()), removed_count(total, config.sparsity)
    if removed != expected:
        raise CompressError(f"the masks in {_SAVED_WEIGHTS} remove {removed} of {total} weights "
                            f"({removed / max(total, 1):.3g}), but {said} overall ({expected}): the masks or the "
                            f"config were edited. {_RESAVE}")


def check_saved_adapter(state_dict: Mapping[str, torch.Tensor], config: SparseSoupConfig) -> None:
    """Check the masks in saved sparse-soup adapter weights (keyed as saved, e.g. read from
    ``adapter_model.safetensors``) with :func:`check_saved_masks`; weights saved without checksums (by an older
    peft-compress) are checked against the config only, with a warning. Needs no base model."""
    saved_checksums = state_dict.get(CHECKSUMS_KEY)
    masks = {k: v for k, v in state_dict.items() if k.endswith(_MASK_SUFFIX)}
    if saved_checksums is None:
        logger.warning("these sparse-soup adapter weights carry no checksums of their masks (saved by an older "
                       "peft-compress): the masks are checked against the config's sparsity only. Save the adapter "
                       "again to add them")
    check_saved_masks(masks, config, None if saved_checksums is None else decode_checksums(saved_checksums))


class SparseSoupModel(CompressLoraModel):
    """Creates a sparse fine-tuning model from a pretrained transformers model (any family with transformer blocks
    that :mod:`compress.pruning.arch` knows: BERT/RoBERTa, Llama/Qwen2, T5).

    Every target linear layer becomes a :class:`~.layer.SparseLinear` (``train="weights"``) or
    :class:`~.layer.SparseLoraLinear` (``train="lora"``) computing with ``(W + update) * mask``. The masks are
    computed when the model is wrapped (``magnitude``) or by :meth:`prune` (``wanda``, on calibration data) and
    saved with the adapter; ``merge_and_unload()`` writes the masked weights into the base model, which then holds
    exact zeros wherever the mask removed a weight. Fine-tunes of one sparse start share the mask, so
    :func:`compress.make_soup` can average them. Saved adapter weights carry a checksum of each mask, and loading
    checks the masks against it and against the config's sparsity and pattern (:func:`check_saved_masks`).

    Example::

        >>> import compress
        >>> from peft import get_peft_model
        >>> config = compress.SparseSoupConfig(task_type="SEQ_CLS", sparsity=0.5)
        >>> model = get_peft_model(base_model, config)  # masks by magnitude; train with Trainer
        >>> sparse = model.merge_and_unload()
    """

    # LoRA's prefix and saved keys (train="lora"), as AdaLoRA keeps them
    tuner_layer_cls = (SparseLinear, LoraLayer)
    legacy_matrix_names = ("sparse_A", "sparse_B")

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        #: whether the masks are computed (prune) or loaded; the config is not the place: users reuse one config
        #: for every ingredient
        self.__dict__["masks_ready"] = False
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    @property
    def active_config(self) -> SparseSoupConfig:
        return self.peft_config[self.active_adapters[0]]

    # -- injection -----------------------------------------------------------------------------------------
    def _check_new_adapter_config(self, config: SparseSoupConfig) -> None:
        super()._check_new_adapter_config(config)
        if len(self.peft_config) > 1:
            raise CompressError("a sparse-soup model holds one adapter (one mask); wrap a fresh base model for "
                                "another fine-tune, and average them with compress.make_soup")

    def _pre_injection_hook(self, model: nn.Module, config: SparseSoupConfig, adapter_name: str) -> None:
        if hasattr(model, "add_model_tags"):
            model.add_model_tags([TAG, method_tag(config.peft_type)])

    def _prepare_adapter_config(self, peft_config: SparseSoupConfig, model_config: dict) -> SparseSoupConfig:
        if peft_config.target_modules is None:
            # every linear layer inside the transformer blocks, by full name (embeddings and heads stay dense)
            names = []
            for stack in arch_spec(self.model).stacks():
                prefix = next(n for n, m in self.model.named_modules() if m is stack.blocks)
                names += [f"{prefix}.{n}" for n, m in stack.blocks.named_modules() if isinstance(m, nn.Linear)]
            peft_config.target_modules = names
        return peft_config

    @staticmethod
    def _create_new_module(lora_config: SparseSoupConfig, adapter_name: str, target: nn.Module,
                           **kwargs) -> SparseMask:
        """The sparse layer around a target (LoRA's ``_create_and_replace`` calls this for a new one)."""
        float_linear(target, kwargs.get("target_name", ""), "sparse soups sparsify float torch.nn.Linear layers; "
                     "adjust target_modules")
        if lora_config.train == "lora":
            return SparseLoraLinear(target, adapter_name, config=lora_config, **kwargs)
        return SparseLinear(target, adapter_name, config=lora_config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # the masks are computed from the weights: refuse before anything is replaced
        check_weights_loaded({**dict(model.named_parameters()), **dict(model.named_buffers())},
                             "the model given to a sparse soup (get_peft_model with SparseSoupConfig)")
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if config.importance == "magnitude" or config.sparsity == 0:
            self.prune()  # (loading a saved adapter then puts its own masks in place)
        else:
            logger.info("sparse soup with wanda importance: call model.base_model.prune(data) before training")

    # -- masks ----------------------------------------------------------------------------------------------
    def sparse_layers(self) -> dict[str, SparseMask]:
        """The sparse layers, by module name."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, SparseMask)}

    def prune(self, data=None, tokenizer=None, num_batches: int = 8, batch_size: int = 8) -> dict[str, float]:
        """Compute the masks of the active adapter from the base weights (``magnitude``) or from the base weights
        and calibration ``data`` (``wanda``: a tokenized Dataset or batches). Returns each layer's sparsity."""
        config = self.active_config
        adapter = self.active_adapters[0]
        layers = self.sparse_layers()
        if config.importance == "wanda":
            scores = wanda_scores(self.model, layers, data, tokenizer, num_batches=num_batches, batch_size=batch_size)
        else:
            scores = magnitude_scores(layers)
        masks = masks_from_scores(scores, config.sparsity, config.n_m, config.scope)
        for name, layer in layers.items():
            layer.set_mask(adapter, masks[name])
        self.__dict__["masks_ready"] = True
        return self.sparsity()

    def sparsity(self) -> dict[str, float]:
        """The fraction of each sparse layer's weights its mask removes."""
        adapter = self.active_adapters[0]
        return {name: 1 - layer.sparse_mask[adapter].float().mean().item()
                for name, layer in self.sparse_layers().items()}

    def forward(self, *args, **kwargs):
        if not self.masks_ready and not self._adapters_off():
            raise CompressError("the masks are not computed yet: importance='wanda' needs "
                                "model.base_model.prune(data=calibration_data) (or compress.apply_sparse_soup(..., "
                                "data=...)) before the first forward")
        return self.model(*args, **kwargs)

    def _adapters_off(self) -> bool:
        return any(m.disable_adapters for m in self.sparse_layers().values())

    # -- saved state: the masks travel with a checksum of each (see check_saved_masks) ----------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: SparseSoupConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor],
                                unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """The adapter's tensors and the checksums of its masks (keyed as the masks are saved)."""
        entries = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        masks = {cls._remove_adapter_name_from_key(k, adapter_name): v for k, v in entries.items()
                 if cls._remove_adapter_name_from_key(k, adapter_name).endswith(_MASK_SUFFIX)}
        entries[CHECKSUMS_KEY] = encode_checksums(masks)
        return entries

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: SparseSoupConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loading saved weights: their masks, checked against the checksums saved with them and the config's
        sparsity and pattern (:func:`check_saved_masks`), take the place of the computed ones."""
        check_saved_adapter(state_dict, config)
        state_dict = {k: v for k, v in state_dict.items() if k != CHECKSUMS_KEY}
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, cls) and any(".sparse_mask." in k for k in state_dict):
            tuner.__dict__["masks_ready"] = True
        return state_dict

    # -- merging ----------------------------------------------------------------------------------------------
    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs):
        if merge and not self.masks_ready:
            raise CompressError("nothing to merge yet: the masks are not computed (call model.base_model.prune)")
        return super()._unload_and_optionally_merge(merge=merge, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        raise CompressError("a sparse-soup model holds one adapter; unload() returns the base model instead")


