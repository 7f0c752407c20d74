"""Importance scores of the weights of sparse layers: ``magnitude`` and ``wanda``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from compress.data import calibration_batches
from compress.errors import CompressError


def magnitude_scores(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``|W|`` of every layer's base weight."""
    return {name: layer.get_base_layer().weight.detach().abs() for name, layer in layers.items()}


@torch.no_grad()
def wanda_scores(model: nn.Module, layers: dict[str, nn.Module], data, tokenizer=None, num_batches: int = 8,
                 batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``|W_ij| * ||x_j||``: each weight times the L2 norm of its input feature over every token of the
    calibration batches (Wanda, Sun et al. 2023), with the model computing as its dense base (adapters off)."""
    if data is None:
        raise CompressError("importance='wanda' scores weights by their inputs: pass calibration data (a tokenized "
                            "Dataset or batches), or use importance='magnitude'")
    squares: dict[str, torch.Tensor] = {}

    def record(name: str, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        total = squares.get(name)
        squares[name] = x.pow(2).sum(0) + (0 if total is None else total)

    handles = [layer.get_base_layer().register_forward_pre_hook(lambda m, a, n=name: record(n, m, a))
               for name, layer in layers.items()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _adapters_disabled(layers):
            for batch in calibration_batches(data, batch_size=batch_size, num_batches=num_batches, seed=0,
                                             tokenizer=tokenizer, include_labels=True):  # seq2seq: decoder inputs
                model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = sorted(set(layers) - set(squares))
    if missing:
        raise CompressError(f"the calibration batches never reached {missing[0]} (and {len(missing) - 1} more "
                            "layers): wanda needs every target layer to run")
    return {name: layer.get_base_layer().weight.detach().abs() * squares[name].sqrt().to(
        layer.get_base_layer().weight.device)[None, :] for name, layer in layers.items()}


@contextmanager
def _adapters_disabled(layers: dict[str, nn.Module]) -> Iterator[None]:
    """Run the layers as their base layers (``(W + update) * mask`` would hide pruned inputs' weights).

    peft's ``enable_adapters`` switches them; switching back marks the active adapter's parameters trainable,
    so which parameters train (a frozen or inference-mode model stays frozen) is put back as it was.
    """
    modules = list(layers.values())
    disabled = [layer.disable_adapters for layer in modules]
    trainable = [(parameter, parameter.requires_grad) for layer in modules for parameter in layer.parameters()]
    for layer in modules:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, was_disabled in zip(modules, disabled, strict=True):
            layer.enable_adapters(not was_disabled)
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)
