"""Perplexity of a causal language model on a text, with the protocol that produced it.

:func:`evaluate_perplexity` tokenises the whole text once (:func:`compress.data.tokenize_text`), keeps the first
``max_tokens`` tokens, and slides a window of ``window`` tokens over them in steps of ``stride``, as in
transformers' "Perplexity of fixed-length models" guide. Every token is predicted once: a window scores the tokens
that no earlier window scored, each from the tokens before it inside the window. With ``stride == window`` (the
default) the windows do not overlap and the first token of each has no context, so it is not scored; with a smaller
stride every scored token after the first window has at least ``window - stride`` tokens of context. The last window
may be shorter. Perplexity is ``exp`` of the mean negative log-likelihood over the scored tokens (float32 logits,
float64 sums).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.data.text import Corpus, tokenize_text
from compress.errors import DataError
from compress.pruning.spec import InvalidOptionError, positive_int

__all__ = ["PerplexityResult", "evaluate_perplexity", "position_limit"]


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity and its protocol.

    Attributes:
        perplexity: ``exp(loss)``.
        loss: mean negative log-likelihood of the scored tokens, in nats.
        tokens: tokens evaluated (the first ``max_tokens`` of the text, or all of it).
        text_tokens: tokens in the whole text.
        scored_tokens: tokens predicted and counted in the loss.
        windows: forward passes of at most ``window`` tokens.
        window, stride, max_tokens: as passed (``stride`` resolved).
        dtype: the model's parameter dtype.
        source, handling: where the text came from and how it was read and joined (a :class:`Corpus`'s; ``None``
            for a plain string).
    """

    perplexity: float
    loss: float
    tokens: int
    text_tokens: int
    scored_tokens: int
    windows: int
    window: int
    stride: int
    max_tokens: int | None
    dtype: str
    source: str | None = None
    handling: str | None = None

    def protocol(self) -> dict[str, Any]:
        """Everything but the figures: what another run must match to be comparable."""
        return {key: value for key, value in asdict(self).items() if key not in ("perplexity", "loss")}

    def to_dict(self) -> dict[str, Any]:
        """``{"perplexity", "loss", "protocol": {...}}``, JSON-able."""
        return {"perplexity": self.perplexity, "loss": self.loss, "protocol": self.protocol()}

    def describe_protocol(self) -> str:
        """The protocol in one line."""
        text = f"of {self.source} ({self.handling})" if self.source else "of the text"
        first = f"first {self.tokens:,} tokens" if self.tokens < self.text_tokens else f"all {self.tokens:,} tokens"
        overlap = "non-overlapping" if self.stride == self.window else f"stride {self.stride}"
        return (f"{first} {text}, {self.windows:,} windows of {self.window} ({overlap}), {self.scored_tokens:,} "
                f"tokens scored, {self.dtype}")


def position_limit(config: Any) -> int | None:
    """The most positions a model of ``config`` takes (``max_position_embeddings``, GPT-2's ``n_positions``), or
    ``None`` when the config states none."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _windows(total: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first scored position)`` of every window that scores at least one token."""
    spans = []
    begin, scored_to = 0, 0
    while True:
        end = min(begin + window, total)
        first = max(scored_to, begin + 1)
        if end > first:
            spans.append((begin, end, first))
        scored_to = end
        if end == total:
            return spans
        begin += stride


def evaluate_perplexity(model: nn.Module, tokenizer: Any, text: str | Corpus, *, max_tokens: int | None = None,
                        window: int = 512, stride: int | None = None, batch_size: int = 1,
                        progress: bool = False) -> PerplexityResult:
    """Perplexity of the causal LM ``model`` on ``text`` (see the module docstring for the protocol).

    Args:
        model: a transformers causal LM (its logits predict the next token), on any device; its train/eval mode is
            restored afterwards.
        tokenizer: the model's tokenizer.
        text: a string, or a :class:`~compress.data.Corpus` from :func:`compress.data.load_text` (its source and
            handling are recorded in the result).
        max_tokens: evaluate the first this many tokens (``None``: all).
        window: tokens per forward pass; at most the model's position limit.
        stride: tokens between window starts, ``1 <= stride <= window`` (``None``: ``window``, no overlap).
        batch_size: windows of equal length per forward pass.
        progress: show a progress bar over the windows.

    Returns:
        A :class:`PerplexityResult`.

    Raises:
        InvalidOptionError: a bad ``max_tokens``, ``window``, ``stride`` or ``batch_size`` (the error names it).
        DataError: the text has fewer than two tokens.
    """
    positive_int("window", window)
    if window < 2:
        raise InvalidOptionError("window", window, "a window must hold at least 2 tokens (one predicts the next)")
    stride = window if stride is None else positive_int("stride", stride)
    if stride > window:
        raise InvalidOptionError("stride", stride, f"must be at most the window ({window}): a larger stride would "
                                 "skip tokens")
    if max_tokens is not None:
        positive_int("max_tokens", max_tokens)
    positive_int("batch_size", batch_size)
    limit = position_limit(getattr(model, "config", None))
    if limit is not None and window > limit:
        raise InvalidOptionError("window", window, f"exceeds the model's {limit} positions: use at most {limit}")

    ids = tokenize_text(text, tokenizer)
    text_tokens = ids.numel()
    ids = ids[:max_tokens] if max_tokens is not None else ids
    if ids.numel() < 2:
        raise DataError(f"{text.source if isinstance(text, Corpus) else 'the text'} has {ids.numel()} token(s); "
                        "perplexity needs at least 2")
    spans = _windows(ids.numel(), window, stride)
    parameter = next(model.parameters())
    batches: list[list[tuple[int, int, int]]] = []
    for span in spans:  # consecutive windows of equal length share a forward pass
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0][1] - last[0][0] == span[1] - span[0]:
            last.append(span)
        else:
            batches.append([span])

    total_nll, scored = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(spans), desc="perplexity", unit="window",
                                          disable=not progress) as bar:
            for batch in batches:
                inputs = torch.stack([ids[begin:end] for begin, end, _ in batch]).to(parameter.device)
                logits = model(input_ids=inputs, use_cache=False).logits
                for row, (begin, end, first) in enumerate(batch):
                    targets = inputs[row, first - begin:end - begin]
                    predictions = logits[row, first - begin - 1:end - begin - 1].float()
                    total_nll += float(torch.nn.functional.cross_entropy(predictions, targets, reduction="sum"))
                    scored += targets.numel()
                bar.update(len(batch))
    finally:
        model.train(was_training)
    loss = total_nll / scored
    return PerplexityResult(
        perplexity=math.exp(loss), loss=loss, tokens=ids.numel(), text_tokens=text_tokens, scored_tokens=scored,
        windows=len(spans), window=window, stride=stride, max_tokens=max_tokens,
        dtype=str(parameter.dtype).removeprefix("torch."),
        source=text.source if isinstance(text, Corpus) else None,
        handling=text.handling if isinstance(text, Corpus) else None,
    )
