"""What Ladder Side-Tuning checks before it builds or loads a side network: a backbone with weights, and a saved
adapter that fits the backbone (family, width, number of labels) and its own ``adapter_config.json``; and, for
``compress push`` (:func:`compress.hub.check_folder`), a saved adapter folder without the backbone
(:func:`check_saved_folder`)."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError
from compress.pruning.arch import arch_spec, base_model_type

from .config import LadderSideConfig


def refuse_meta_weights(model: nn.Module) -> None:
    """Refuse a backbone whose tensors are on the meta device (built under ``torch.device("meta")`` or
    ``init_empty_weights``): the side network is pruned from its weights and reads its hidden states."""
    meta = [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
            if tensor.is_meta]
    if meta:
        raise CompressError(f"the backbone has {len(meta)} tensors on the meta device, which hold no values (e.g. "
                            f"{', '.join(meta[:3])}): load its weights first (from_pretrained without "
                            "init_empty_weights or a meta device, or model.to_empty(device='cpu') and "
                            "load_state_dict), then add the side network")


def refuse_low_cpu_mem_usage(low_cpu_mem_usage: bool, what: str) -> None:
    """peft's ``low_cpu_mem_usage`` builds adapter modules on the meta device (``PeftModel.from_pretrained`` creates
    the tuner under accelerate's ``init_empty_weights``, where new parameters are meta) and fills them from the
    checkpoint, which leaves what the checkpoint does not hold (e.g. non-persistent buffers) without values."""
    if low_cpu_mem_usage or nn.Linear(1, 1).weight.is_meta:
        raise CompressError(f"low_cpu_mem_usage=True builds the adapter on the meta device, which {what} does not "
                            "support (the parts its checkpoint does not hold would have no values); load it without "
                            "low_cpu_mem_usage: the adapter is small")


def check_side_family(model: nn.Module, side_config: dict) -> None:
    """A saved side network is of its backbone's family: refuse loading it onto another one."""
    built_for = base_model_type(str(side_config.get("model_type", "")))
    family = base_model_type(str(getattr(model.config, "model_type", "")))
    if built_for != family:
        raise CompressError(f"this Ladder Side-Tuning adapter was built for a {built_for} backbone (side_config "
                            f"model_type {side_config.get('model_type')!r}), but the model is "
                            f"{type(model).__name__} ({family}): load it onto the {built_for} model it was "
                            "trained with")


def check_saved_side(model: nn.Module, config: LadderSideConfig, adapter_name: str,
                     state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a saved adapter (``state_dict``, keyed as the PEFT ``model``'s) that does not fit, naming the cause:
    a backbone of another width (the ladders' input size), an ``r`` or ``side_config`` edited in
    ``adapter_config.json``, or a task head of another number of labels."""
    backbone = model.get_base_model()
    width = arch_spec(backbone).hidden_site().width
    current = model.state_dict()
    network = f".lst_side.lst_network.{adapter_name}."
    ladder = next((v for k, v in state_dict.items() if k.endswith(f"{network}down.0.0.weight")), None)
    if ladder is not None and ladder.dim() == 2:
        side_width, built_for = ladder.shape
        if built_for != width:
            raise CompressError(f"this Ladder Side-Tuning adapter was built for a backbone of hidden size "
                                f"{built_for}, but {type(backbone).__name__} has hidden size {width}: load it onto "
                                "the model it was trained with")
        if side_width * config.r != built_for:
            raise CompressError(f"adapter_config.json: r={config.r} does not match the saved side network (hidden "
                                f"size {side_width} for a backbone of {built_for}, r={built_for // side_width}): put "
                                "back the r the adapter was saved with")
    missing = sorted(k for k in current if network in k and k not in state_dict)
    unused = sorted(k for k in state_dict if k not in current)
    pool = f"{network}pool."
    if (missing or unused) and all(pool in k for k in missing + unused):
        saved = "model" if missing else "segments"
        raise CompressError(f"adapter_config.json: pooling={config.pooling!r} does not match the saved adapter, "
                            f"which was trained with pooling={saved!r} (its weights {'lack' if missing else 'hold'} "
                            f"the segment pooling layer): put back pooling={saved!r}")
    if missing or unused:
        found = [f"{len(missing)} side weights missing (e.g. {missing[0]})"] if missing else []
        found += [f"{len(unused)} saved tensors unused (e.g. {unused[0]})"] if unused else []
        raise CompressError(f"adapter_config.json: side_config and side_layers do not describe the saved side "
                            f"network ({'; '.join(found)}): put back the values the adapter was saved with")
    for key, saved in state_dict.items():
        if saved.shape == current[key].shape:
            continue
        where = f"{key} has shape {tuple(saved.shape)} in adapter_model.safetensors but {tuple(current[key].shape)}"
        if network in key:
            raise CompressError(f"adapter_config.json: side_config does not describe the saved side network ({where} "
                                "as built from it): put back the side_config the adapter was saved with")
        raise CompressError(f"the saved Ladder Side-Tuning adapter does not fit this {type(backbone).__name__}: "
                            f"{where} in the model; it was trained with another number of labels (num_labels) or "
                            "another model: load it onto that model, with the same num_labels")


# -- a saved adapter folder, without the backbone (compress.hub.check_folder) ------------------------------
_SIDE_PARTS = ("down", "up", "side", "gates")


def side_network_problems(config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
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
        expected, blocks = side_network_shapes(config, widths.most_common(1)[0][0])
    except Exception as exc:  # transformers' errors for a config that builds no model
        return [f"side_config does not build a side network ({type(exc).__name__}: {exc})"]
    problems = []
    pooled = {name for name in set(ours) ^ set(expected) if name.startswith("pool.")}
    if pooled:
        problems.append(f"pooling={config.pooling!r}, but the weights {'hold' if pooled & set(ours) else 'lack'} the "
                        "segment pooling layer (lst_network.pool.*)")
        ours = {name: shape for name, shape in ours.items() if name not in pooled}
        expected = {name: shape for name, shape in expected.items() if name not in pooled}
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


def side_network_shapes(config, width: int) -> tuple[dict[str, tuple[int, ...]], int]:
    """Tensor shapes of the side network ``config.side_config`` describes, built on the meta device, and its
    number of blocks."""
    from transformers import AutoConfig, AutoModel

    from .layer import LadderSide
    from .side import strip_side

    values = dict(config.side_config)
    model_type = values.pop("model_type")
    with torch.device("meta"):  # (side_from_config builds on the CPU: loading needs the weights there)
        side = strip_side(AutoModel.from_config(AutoConfig.for_model(model_type, **values)))
        network = LadderSide(side, width, config.gate_temperature, config.gate_init,
                             segment_pooling=config.pooling == "segments")
    return {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}, network.num_blocks



def check_saved_folder(folder: Path, config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The problems of a saved Ladder Side-Tuning adapter (``config``: its :class:`~.config.LadderSideConfig`;
    ``shapes``: each saved tensor's shape), one line each."""
    return side_network_problems(config, shapes)
