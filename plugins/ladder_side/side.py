"""The side network: the backbone's own block type at ``1/r`` of its width, built from the backbone.

``pruned`` initialisation copies the backbone and removes hidden channels, FFN neurons and heads with
:func:`compress.prune_model` (the engine, its importance criteria and architecture specs), then keeps the blocks
listed in ``side_layers``. ``random`` builds the same block type from a shrunk copy of the backbone's config.
Either way the result is a bare transformers model (``BertModel``, ``LlamaModel``, or their compact classes)
without input embeddings or pooler: its input comes through the first ladder.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from peft.utils.integrations import dequantize_module_weight, get_bnb_param_type
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from compress.errors import CompressError, UnsupportedModelError
from compress.pruning.arch import ArchSpec, LayerStack, arch_spec
from compress.pruning.compact import PREFIX as COMPACT_PREFIX
from compress.pruning.compact import make_compact
from compress.pruning.engine import prune_model
from compress.pruning.spec import InvalidOptionError

from .config import LadderSideConfig

logger = logging.getLogger(__name__)


@dataclass
class SideNetwork:
    """A freshly built side network and, for the pruned initialisation, the backbone's kept hidden channels."""

    model: PreTrainedModel
    kept_hidden: list[int] | None
    importance: str | None


def backbone_stacks(model: nn.Module) -> list[LayerStack]:
    """The backbone's stacks of blocks: one (encoder-only, decoder-only) or two (T5: encoder, decoder)."""
    return arch_spec(model).stacks()


def side_layer_indices(model: nn.Module, config: LadderSideConfig) -> list[int]:
    """``config.side_layers``, checked against every stack of the backbone (default: every block)."""
    stacks = backbone_stacks(model)
    count = min(len(stack.blocks) for stack in stacks)
    if len({len(stack.blocks) for stack in stacks}) > 1:
        raise UnsupportedModelError(f"{type(model).__name__}: Ladder Side-Tuning needs stacks of equal depth, got "
                                    f"{[len(stack.blocks) for stack in stacks]} blocks")
    if config.side_layers is None:
        return list(range(count))
    unknown = [i for i in config.side_layers if i >= count]
    if unknown:
        raise InvalidOptionError("side_layers", config.side_layers, f"blocks {unknown} do not exist: the backbone "
                                 f"has {count} blocks (0..{count - 1})")
    protected = sorted(set().union(*(stack.protected for stack in stacks)) - set(config.side_layers))
    if protected:
        raise InvalidOptionError("side_layers", config.side_layers, f"must include blocks {protected}: in this "
                                 "family they own what every later block uses (T5: the relative position bias)")
    return list(config.side_layers)


def side_widths(arch: ArchSpec, r: int) -> dict[str, int]:
    """The side network's widths for reduction factor ``r``: hidden size, FFN width, heads and kv heads."""
    hidden = arch.hidden_site().width
    if hidden % r:
        raise InvalidOptionError("r", r, f"must divide the backbone's hidden size {hidden} (the side network is "
                                 f"hidden_size / r wide); e.g. r={_divisor_near(hidden, r)}")
    widths = arch.widths()
    if len(set(widths["ffn"])) > 1 or len(set(widths["heads"])) > 1:
        raise UnsupportedModelError("Ladder Side-Tuning needs a backbone with the same width in every layer; this "
                                    f"one has per-layer widths {widths}")
    heads = widths["heads"][0]
    kv_heads = widths.get("kv_heads", widths["heads"])[0]
    kept_kv = max(1, kv_heads // r) if kv_heads < heads else None
    return {
        "hidden": hidden // r,
        "ffn": max(1, widths["ffn"][0] // r),
        "heads": kept_kv * (heads // kv_heads) if kept_kv is not None else max(1, heads // r),
        "kv_heads": kept_kv if kept_kv is not None else max(1, heads // r),
    }


def _divisor_near(n: int, r: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - r), d))


def _engine_sparsity(arch: ArchSpec, r: int) -> dict[str, float]:
    """The fractions :func:`compress.prune_model` removes to reach :func:`side_widths` exactly."""
    target = side_widths(arch, r)
    widths = arch.widths()
    current = {"hidden": arch.hidden_site().width, "ffn": widths["ffn"][0], "heads": widths["heads"][0],
               "kv_heads": widths.get("kv_heads", widths["heads"])[0]}
    grouped = current["kv_heads"] < current["heads"]
    sparsity = {}
    for name in ("hidden", "ffn", "kv_heads" if grouped else "heads"):
        if target[name] < current[name]:
            sparsity[name] = (current[name] - target[name]) / current[name]
    return sparsity


def float_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` the engine can prune: peft's ``modules_to_save`` wrappers replaced by the modules
    they wrap, quantised linear layers (bitsandbytes 8/4-bit, dequantised by peft's helper; torch dynamic int8)
    by float ``nn.Linear`` layers."""
    model = copy.deepcopy(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not get_bnb_param_type(p)),
                 torch.float32)
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in replaced):
            continue
        replacement = None
        if isinstance(module, AuxiliaryTrainingWrapper):
            replacement = module.original_module
        else:
            replacement = _float_linear(module, dtype)
        if replacement is not None:
            replaced.append(name)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the copy is float: its config must not ask for quantisation
    return model


def _float_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear | None:
    """A float ``nn.Linear`` equal to a quantised linear layer (bitsandbytes 8/4-bit, torch dynamic int8), or
    ``None`` for any other module."""
    if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
        weight, bias = module.weight().dequantize(), module.bias()
    elif isinstance(getattr(module, "weight", None), torch.Tensor) and get_bnb_param_type(module.weight):
        weight, bias = dequantize_module_weight(module), module.bias
    else:
        return None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if bias is not None:
            linear.bias.copy_(bias.to(dtype))
    return linear


def strip_side(side: PreTrainedModel) -> PreTrainedModel:
    """Drop what the side network does not use: the token embeddings (its input comes through the first
    ladder) and a pooler."""
    side.set_input_embeddings(None)
    for stack in ("encoder", "decoder"):  # T5's stacks hold their own reference to the shared embeddings
        if hasattr(getattr(side, stack, None), "embed_tokens"):
            getattr(side, stack).embed_tokens = None
    if getattr(side, "pooler", None) is not None:
        side.pooler = None
    return side


def build_pruned_side(model: PreTrainedModel, config: LadderSideConfig, data=None, tokenizer=None,
                      num_batches: int = 8, batch_size: int = 16) -> SideNetwork:
    """Prune a copy of ``model`` to ``1/r`` width with the engine and keep the blocks in ``side_layers``.

    ``fisher`` scores the whole task model on ``data`` (its loss needs the head); without data, or with
    ``magnitude``, the bare base model is scored by weight magnitude.
    """
    layers = side_layer_indices(model, config)
    importance = config.importance if data is not None else "magnitude"
    source = float_copy(model if importance == "fisher" else model.base_model)
    source.requires_grad_(False)
    if source is source.base_model and getattr(source, "pooler", None) is not None:
        source.pooler = None  # the side network has none; pruning the bare model need not reach it
    arch = arch_spec(source)
    width = arch.hidden_site().width
    sparsity = _engine_sparsity(arch, config.r)
    mode = "uniform" if all(s in arch.uniform_structures for s in sparsity) else "global"
    try:
        report = prune_model(source, sparsity=sparsity, importance=importance, data=data, mode=mode,
                             tokenizer=tokenizer, num_batches=num_batches, batch_size=batch_size)
    except CompressError as exc:
        if importance == "fisher":
            raise CompressError(f"the fisher initialisation of the side network could not score this model ({exc}); "
                                "use importance='magnitude'") from exc
        raise
    side = source.base_model
    for stack in arch_spec(side).stacks():
        if len(layers) < len(stack.blocks):
            arch_spec(side).remove_blocks(stack, layers)
    if getattr(side, "pooler", None) is not None:
        side.pooler = None
    if len(arch_spec(side).stacks()) > 1:  # encoder-decoder: the bare model class holds just the two stacks
        bare = side_from_config(side_config_dict(side))
        own = {k: v for k, v in side.state_dict().items() if k in bare.state_dict()}
        bare.load_state_dict(own, strict=True)
        side = bare
    if side.config.model_type.startswith(COMPACT_PREFIX):
        make_compact(side)  # record the side network's own projection shapes, at their paths after layer dropping
    removed = set(report.removed.get("hidden", []))
    kept = [c for c in range(width) if c not in removed]
    logger.info("side network: %s blocks, hidden %d (pruned by %s)", len(layers), len(kept), importance)
    return SideNetwork(strip_side(side), kept, importance)


def build_random_side(model: PreTrainedModel, config: LadderSideConfig) -> SideNetwork:
    """The same block type at ``1/r`` width with random weights (a standard config of the family)."""
    layers = side_layer_indices(model, config)
    widths = side_widths(arch_spec(model), config.r)
    side_cfg = copy.deepcopy(model.config)
    for names, value in ((("hidden_size", "d_model"), widths["hidden"]), (("intermediate_size", "d_ff"), widths["ffn"]),
                         (("num_attention_heads", "num_heads"), widths["heads"]),
                         (("num_key_value_heads",), widths["kv_heads"]),
                         (("num_hidden_layers", "num_layers", "num_decoder_layers"), len(layers))):
        for name in names:  # the family's own field names (BERT/Llama, T5)
            if name in side_cfg.to_dict():
                setattr(side_cfg, name, value)
    if getattr(side_cfg, "head_dim", None) is None and widths["hidden"] % widths["heads"]:
        side_cfg.num_attention_heads = 1  # the family derives the head size from hidden_size / heads
    if getattr(side_cfg, "layer_types", None):
        side_cfg.layer_types = [side_cfg.layer_types[i] for i in layers]
    return SideNetwork(strip_side(side_from_config(side_cfg.to_dict())), None, None)


def side_from_config(side_config: dict) -> PreTrainedModel:
    """Rebuild a side network (random weights, the recorded shapes) from its saved config."""
    values = dict(side_config)
    model_type = values.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **values)
    with torch.device("cpu"):
        side = AutoModel.from_config(cfg)
    return strip_side(side)


def side_config_dict(side: PreTrainedModel) -> dict:
    """The side network's config as saved in ``LadderSideConfig.side_config``."""
    values = side.config.to_dict()
    for key in ("architectures", "_name_or_path", "transformers_version", "id2label", "label2id",
                "quantization_config"):
        values.pop(key, None)
    return values
