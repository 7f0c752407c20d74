"""Multi-exit folders saved in the earlier per-family format, loaded into
:class:`~.modeling.MultiExitForSequenceClassification`.

That format had one config class per family (``model_type`` ``multi_exit_bert``, ``multi_exit_compressed_llama``,
...): the family's config fields and the exit fields side by side, and the weights under the family's own names
(``bert.encoder...``, ``classifier...``) beside ``exits.<k>...``. Such a folder loads with a FutureWarning: its
config is converted (the family's fields become the ``backbone`` sub-config) and its weights are renamed in memory
(``backbone.bert.encoder...``) and loaded by transformers' own ``from_pretrained``. Saving the model again writes
the current format.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import CONFIG_MAPPING, PreTrainedConfig
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from .config import EXIT_FIELDS

LEGACY_PREFIX = "multi_exit_"
#: from_pretrained arguments that say where the files are
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


class LegacyMultiExitConfig(PreTrainedConfig):
    """Reads a multi-exit ``config.json`` of the earlier per-family format: ``AutoConfig`` finds it by its
    ``model_type``, and it builds the current :class:`~.modeling.MultiExitClassifierConfig` (never an instance of
    its own class)."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        return CONFIG_MAPPING["multi_exit"].from_dict(config_dict, **kwargs)


# the earlier format's model types, one per supported family and its compact (pruned) form
class MultiExitBertConfig(LegacyMultiExitConfig):
    model_type = "multi_exit_bert"


class MultiExitRobertaConfig(LegacyMultiExitConfig):
    model_type = "multi_exit_roberta"


class MultiExitLlamaConfig(LegacyMultiExitConfig):
    model_type = "multi_exit_llama"


class MultiExitQwen2Config(LegacyMultiExitConfig):
    model_type = "multi_exit_qwen2"


class MultiExitCompressedBertConfig(LegacyMultiExitConfig):
    model_type = "multi_exit_compressed_bert"


class MultiExitCompressedRobertaConfig(LegacyMultiExitConfig):
    model_type = "multi_exit_compressed_roberta"


class MultiExitCompressedLlamaConfig(LegacyMultiExitConfig):
    model_type = "multi_exit_compressed_llama"


class MultiExitCompressedQwen2Config(LegacyMultiExitConfig):
    model_type = "multi_exit_compressed_qwen2"


LEGACY_CONFIGS: tuple[type[LegacyMultiExitConfig], ...] = (
    MultiExitBertConfig, MultiExitRobertaConfig, MultiExitLlamaConfig, MultiExitQwen2Config,
    MultiExitCompressedBertConfig, MultiExitCompressedRobertaConfig, MultiExitCompressedLlamaConfig,
    MultiExitCompressedQwen2Config)


def is_legacy_config(config_dict: dict[str, Any]) -> bool:
    return str(config_dict.get("model_type", "")).startswith(LEGACY_PREFIX)


def convert_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The current format's config dict for one of the earlier format (with a FutureWarning): the family's fields
    become the ``backbone`` sub-config; the exit and label fields stay at the top."""
    legacy_type = str(config_dict["model_type"])
    warnings.warn(f"this multi-exit model was saved in the earlier per-family format (model_type {legacy_type!r}); "
                  "it loads as a MultiExitForSequenceClassification, but later releases will not read that "
                  "format: save it again with compress.save_pretrained (or save_pretrained) to write the current "
                  "one", FutureWarning, stacklevel=2)
    backbone = {k: v for k, v in config_dict.items()
                if k not in EXIT_FIELDS and k not in ("model_type", "architectures", "transformers_version")}
    backbone["model_type"] = legacy_type.removeprefix(LEGACY_PREFIX)
    architectures = config_dict.get("architectures")
    if isinstance(architectures, list):
        backbone["architectures"] = [str(name).removeprefix("MultiExit") for name in architectures]
    converted = {"backbone": backbone, **{k: config_dict[k] for k in EXIT_FIELDS if k in config_dict}}
    converted.update({k: config_dict[k] for k in ("id2label", "label2id", "problem_type", "dtype")
                      if k in config_dict})
    return converted


def holds_legacy_model(pretrained_model_name_or_path, kwargs: dict[str, Any]) -> bool:
    """Whether a folder (or Hub repository) holds a multi-exit model of the earlier format, by its config.json."""
    if pretrained_model_name_or_path is None:
        return False
    download = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs}
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **download)
    except OSError:
        return False  # transformers' own loading reports what is missing
    return is_legacy_config(config_dict)


def loading_arguments(config_cls: type[PreTrainedConfig], pretrained_model_name_or_path,
                      kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``from_pretrained`` arguments that load a multi-exit model of the earlier format from memory: its
    config converted (unless one is given) and its weights under the current names (``backbone.`` before the
    family's own names; ``exits.`` unchanged), as ``state_dict``."""
    download = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs}
    config = kwargs.get("config")
    if not isinstance(config, config_cls):
        config = config_cls.from_pretrained(pretrained_model_name_or_path, **download)
    tensors = _saved_tensors(pretrained_model_name_or_path, download)
    state_dict = {key if key.startswith("exits.") else f"backbone.{key}": tensor for key, tensor in tensors.items()}
    return {**kwargs, "config": config, "state_dict": state_dict}


def _saved_tensors(pretrained_model_name_or_path, download: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors weights (one file or shards)."""
    try:
        files = [cached_file(pretrained_model_name_or_path, SAFE_WEIGHTS_NAME, **download)]
    except OSError:
        index_file = cached_file(pretrained_model_name_or_path, SAFE_WEIGHTS_INDEX_NAME, **download)
        with open(index_file, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [cached_file(pretrained_model_name_or_path, shard, **download) for shard in shards]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors
