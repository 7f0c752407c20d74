"""compress.evaluate_perplexity: windows, strides and the recorded protocol, against a hand computation of the loss on
a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

import compress
from compress.data import Corpus
from compress.errors import DataError
from compress.pruning.spec import InvalidOptionError
from tests import tiny
from tests.test_text import counting_text, word_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny.make_model("llama")  # 64 positions


def _hand_nll(model, ids: torch.Tensor, context_from: int, scored: range) -> float:
    """Sum of -log p(ids[t] | ids[context_from:t]) over ``scored``, one forward per token: no shortcut shared with
    the code under test."""
    total = 0.0
    with torch.no_grad():
        for t in scored:
            logits = model(input_ids=ids[None, context_from:t]).logits[0, -1]
            total -= float(torch.log_softmax(logits.double(), -1)[ids[t]])
    return total


def test_non_overlapping_windows_score_all_but_each_windows_first_token(model, tokenizer):
    corpus = Corpus(counting_text(50), "counting", "as is")
    result = compress.evaluate_perplexity(model, tokenizer, corpus, window=16)
    ids = torch.tensor([2 + i for i in range(50)])
    nll = sum(_hand_nll(model, ids, begin, range(begin + 1, min(begin + 16, 50))) for begin in (0, 16, 32, 48))
    assert (result.windows, result.scored_tokens, result.tokens, result.stride) == (4, 15 + 15 + 15 + 1, 50, 16)
    assert result.loss == pytest.approx(nll / 46, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll / 46), rel=1e-5)
    assert (result.source, result.handling, result.dtype) == ("counting", "as is", "float32")


def test_a_smaller_stride_scores_every_token_once_with_more_context(model, tokenizer):
    result = compress.evaluate_perplexity(model, tokenizer, counting_text(40), window=16, stride=8, max_tokens=36)
    ids = torch.tensor([2 + i for i in range(36)])
    # windows [0, 16), [8, 24), [16, 32), [24, 36): tokens 1-15, then 16-23, 24-31, 32-35
    nll = (_hand_nll(model, ids, 0, range(1, 16)) + _hand_nll(model, ids, 8, range(16, 24))
           + _hand_nll(model, ids, 16, range(24, 32)) + _hand_nll(model, ids, 24, range(32, 36)))
    assert (result.windows, result.scored_tokens, result.tokens, result.text_tokens) == (4, 35, 36, 40)
    assert result.loss == pytest.approx(nll / 35, rel=1e-5)
    assert result.source is None


def test_batched_windows_give_the_same_result_and_the_model_keeps_its_mode(model, tokenizer):
    text = counting_text(70)
    one = compress.evaluate_perplexity(model, tokenizer, text, window=16)
    model.train()
    try:
        batched = compress.evaluate_perplexity(model, tokenizer, text, window=16, batch_size=3)
        assert model.training
    finally:
        model.eval()
    assert batched.loss == pytest.approx(one.loss, rel=1e-6) and batched.windows == one.windows == 5


def test_the_result_carries_its_protocol(model, tokenizer):
    result = compress.evaluate_perplexity(model, tokenizer, Corpus(counting_text(100), "file.txt", "the whole file"),
                                          window=32, max_tokens=64)
    saved = json.loads(json.dumps(result.to_dict()))
    assert saved["perplexity"] == result.perplexity and saved["loss"] == result.loss
    assert saved["protocol"] == {"tokens": 64, "text_tokens": 100, "scored_tokens": 62, "windows": 2, "window": 32,
                                 "stride": 32, "max_tokens": 64, "dtype": "float32", "source": "file.txt",
                                 "handling": "the whole file"}
    assert result.describe_protocol() == ("first 64 tokens of file.txt (the whole file), 2 windows of 32 "
                                          "(non-overlapping), 62 tokens scored, float32")
    assert isinstance(result, compress.PerplexityResult)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"window": 65}, InvalidOptionError, "window=65: exceeds the model's 64 positions: use at most 64"),
    ({"window": 1}, InvalidOptionError, "window=1: a window must hold at least 2 tokens"),
    ({"window": 16, "stride": 17}, InvalidOptionError, r"stride=17: must be at most the window \(16\)"),
    ({"stride": 0}, InvalidOptionError, "stride=0: must be a positive integer"),
    ({"max_tokens": 0}, InvalidOptionError, "max_tokens=0: must be a positive integer"),
    ({"batch_size": 0}, InvalidOptionError, "batch_size=0: must be a positive integer"),
    ({"window": 16, "max_tokens": 1}, DataError, r"has 1 token\(s\); perplexity needs at least 2"),
])
def test_bad_options_are_refused_before_any_forward(model, tokenizer, monkeypatch, kwargs, error, match):
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("ran the model"))
    with pytest.raises(error, match=match):
        compress.evaluate_perplexity(model, tokenizer, counting_text(50), **{"window": 16, **kwargs})
