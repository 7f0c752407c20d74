"""Exit heads on a PEFT tuner: what a tuner that carries exits does at injection, forward, pruning and merge.

This is the multi-exit plugin's public API for tuners (exported by the package): :class:`~.model.MultiExitModel`
uses it, and so does Pruning-Adapter's ``exits`` option. A tuner keeps its exit heads in a
:class:`~.layer.MultiExitLayer` at ``tuner.exit_layer``, so that they are saved with the adapter
(``exit_layer.exit_heads.<adapter>.<k>``).

- before injection: :func:`check_exits`; at injection: :func:`~.modeling.build_exit_heads` and
  :func:`attach_exit_heads`;
- forward: :func:`active_exit_heads`, then :func:`call_with_exits`; adapters on and off: :func:`enable_exit_heads`;
- pruning scored on every exit's loss: :func:`scoring_every_exit`;
- merging: :func:`detach_exit_heads`, then :func:`~.modeling.make_multi_exit` on the unloaded model.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Iterator

import torch
from torch import nn

from compress.errors import CompressError
from compress.pruning.arch import arch_spec

from .config import check_exits_fit
from .layer import MultiExitLayer
from .modeling import exit_blocks
from .runner import OUTPUT_EXTRAS, ExitSettings, every_exit_loss, forward_with_exits


def check_exits(model: nn.Module, exit_layers: list[int] | None, loss_weights: str | list[float]) -> None:
    """Refuse a model without a sequence-classification head, exit layers out of range, or a weight list
    that does not give one weight per exit, before anything changes."""
    arch_spec(model).sequence_head()
    check_exits_fit(exit_layers, loss_weights, len(arch_spec(model).stacks()[0].blocks))


def refuse_meta_weights(model: nn.Module, what: str = "the model") -> None:
    """Refuse a model whose tensors are on the meta device (built under ``torch.device("meta")`` or
    ``init_empty_weights``): exit heads start from its own head's weights, and it would run on nothing."""
    meta = [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
            if tensor.is_meta]
    if meta:
        raise CompressError(f"{what} has {len(meta)} tensors on the meta device, which hold no values (e.g. "
                            f"{', '.join(meta[:3])}): load its weights first (from_pretrained without "
                            "init_empty_weights or a meta device, or model.to_empty(device='cpu') and "
                            "load_state_dict), then add the exits")


def check_teacher(model: nn.Module, teacher: nn.Module, config) -> None:
    """Refuse a distillation teacher that cannot be compared with ``model``: other ``num_labels`` when its logits
    are distilled (``distill_weight``), another hidden size when its hidden states are (``distill_hidden_weight``),
    or weights on the meta device."""
    refuse_meta_weights(teacher, "the teacher")
    ours, theirs = getattr(model, "config", None), getattr(teacher, "config", None)
    if ours is None or theirs is None:
        return  # checked at the first training step (see runner.forward_with_exits)
    if config.distill_weight > 0 and getattr(theirs, "num_labels", None) not in (None, ours.num_labels):
        raise CompressError(f"the teacher ({type(teacher).__name__}) predicts {theirs.num_labels} labels but the "
                            f"model {ours.num_labels} (their config.num_labels): distill_weight="
                            f"{config.distill_weight} compares their logits class by class; use a teacher fine-tuned "
                            "on the same labels, or distill_weight=0")
    if config.distill_hidden_weight > 0 and getattr(theirs, "hidden_size", None) not in (None, ours.hidden_size):
        raise CompressError(f"the teacher's hidden size is {theirs.hidden_size} but the model's {ours.hidden_size} "
                            f"(their config.hidden_size): distill_hidden_weight={config.distill_hidden_weight} "
                            "compares their hidden states; use a teacher of the same width, or "
                            "distill_hidden_weight=0 (logit distillation, distill_weight, works across widths)")


def check_saved_exits(model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a saved multi-exit adapter (``state_dict``, keyed as ``model``'s) that does not fit ``model`` and
    its config, naming the cause: exit heads that ``exit_layers`` / ``exit_head`` do not describe (the adapter
    config was edited), or tensors of other shapes (another width or number of labels, or ``slender_shapes``
    edited), or backbone weights for blocks the model lacks."""
    current = model.state_dict()
    base = type(model.get_base_model()).__name__
    heads = f".exit_layer.exit_heads.{adapter_name}."
    unknown = sorted(k for k in state_dict if k not in current and heads not in k)
    if unknown:
        raise CompressError(f"the saved multi-exit adapter holds {len(unknown)} tensors this {base} lacks (e.g. "
                            f"{unknown[0]}): it was trained on another model (another architecture or more blocks); "
                            "load it onto that model")
    expected_heads = {k for k in current if heads in k}
    saved_heads = {k for k in state_dict if heads in k}
    if expected_heads != saved_heads:
        missing, unused = sorted(expected_heads - saved_heads), sorted(saved_heads - expected_heads)
        found = [f"{len(missing)} exit weights missing (e.g. {missing[0]})"] if missing else []
        found += [f"{len(unused)} saved exit weights unused (e.g. {unused[0]})"] if unused else []
        blocks = len(arch_spec(model.get_base_model()).stacks()[0].blocks)
        raise CompressError(f"adapter_config.json: exit_layers={config.exit_layers!r} and exit_head="
                            f"{config.exit_head!r} on this {blocks}-block {base} do not describe the saved exit "
                            f"heads ({'; '.join(found)}): the adapter was saved for another model, or these fields "
                            "were edited; load it onto its model, or put back the values it was saved with")
    for key, saved in state_dict.items():
        if saved.shape != current[key].shape:
            cause = "it was trained on a model of another width or number of labels (num_labels)"
            if heads not in key and getattr(config, "slender_shapes", None):
                cause += ", or slender_shapes in adapter_config.json was edited"
            raise CompressError(f"the saved multi-exit adapter does not fit this {base}"
                                f": {key} has shape {tuple(saved.shape)} in adapter_model.safetensors but "
                                f"{tuple(current[key].shape)} in the model; {cause}: load it onto the model it was "
                                "trained from, with the same num_labels")


def ignore_exit_outputs(config, ignore: bool = True) -> None:
    """Make the Trainer's predictions the logits alone (``keys_to_ignore_at_inference``), or undo it."""
    kept = [k for k in getattr(config, "keys_to_ignore_at_inference", []) if k not in OUTPUT_EXTRAS]
    if ignore:
        config.keys_to_ignore_at_inference = [*kept, *OUTPUT_EXTRAS]
    elif kept:
        config.keys_to_ignore_at_inference = kept
    else:
        config.__dict__.pop("keys_to_ignore_at_inference", None)


def call_with_exits(model: nn.Module, heads: nn.ModuleList, exit_layers: list[int] | None, settings: ExitSettings,
                    args: tuple, kwargs: dict, teacher: nn.Module | None = None):
    """A tuner's forward with exits: ``model``'s arguments as keywords, then
    :func:`~.runner.forward_with_exits`."""
    if args:
        kwargs = dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
        kwargs.update(kwargs.pop("kwargs", {}))
    labels = kwargs.pop("labels", None)
    kwargs.pop("return_dict", None)  # the output is always a ModelOutput (it carries the exits)
    blocks, exits = exit_blocks(model, exit_layers)
    return forward_with_exits(model, blocks, exits, heads, model.config, settings, kwargs, labels,
                              training=model.training, teacher=teacher,
                              final_head=arch_spec(model).sequence_head()[1])


def _exit_layer(tuner: nn.Module) -> MultiExitLayer | None:
    # a child module looked up directly: peft's tuners forward unknown attributes to the wrapped model
    return dict(tuner.named_children()).get("exit_layer")


def attach_exit_heads(tuner: nn.Module, model: nn.Module, adapter_name: str, heads: nn.ModuleList,
                      trainable: bool) -> None:
    """Give ``tuner`` the exit heads of ``adapter_name`` (built from ``model``'s head by
    :func:`~.modeling.build_exit_heads`), trained with the adapter unless not ``trainable``; the Trainer's predictions
    stay the logits alone."""
    tuner.exit_layer = MultiExitLayer()
    tuner.exit_layer.update_layer(adapter_name, heads, trainable=trainable)
    ignore_exit_outputs(model.config)


def active_exit_heads(tuner: nn.Module) -> nn.ModuleList | None:
    """The exit heads ``tuner`` uses now, or ``None`` (no exits, or adapters disabled)."""
    layer = _exit_layer(tuner)
    return layer.active_heads() if layer is not None else None


def enable_exit_heads(tuner: nn.Module, enabled: bool = True) -> None:
    """Turn ``tuner``'s exit heads on or off with its adapters (off: the model runs as it was)."""
    layer = _exit_layer(tuner)
    if layer is not None:
        layer.enable_adapters(enabled)


def detach_exit_heads(tuner: nn.Module) -> nn.ModuleList | None:
    """Remove ``tuner``'s exit heads (before unloading) and return those in use, or ``None`` (no exits, or adapters
    disabled); the model's outputs are its own again."""
    layer = _exit_layer(tuner)
    if layer is None:
        return None
    heads = layer.active_heads()
    del tuner.exit_layer
    ignore_exit_outputs(tuner.model.config, ignore=False)
    return heads


@contextlib.contextmanager
def scoring_every_exit(model: nn.Module, heads: nn.ModuleList, exit_layers: list[int] | None,
                       loss_weights: str | list[float]) -> Iterator[None]:
    """While active, ``model(**batch).loss`` (given labels) is the loss of every exit
    (:func:`~.runner.every_exit_loss`): what pruning importance computed from it then scores, so that each exit
    keeps the structures it needs."""
    blocks, exits = exit_blocks(model, exit_layers)
    with every_exit_loss(model, blocks, exits, heads, loss_weights):
        yield
