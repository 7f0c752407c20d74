"""reconstruct='least_squares' fits the output projections' bias where the family can hold one (Llama: through
mlp_bias / attention_bias; BERT: its own biases) and fits without one where it cannot (Qwen2), saying which in the
report notes, so that the same call runs on every decoder family."""

from __future__ import annotations

import copy

import pytest
import torch

import compress
from compress.pruning.arch import arch_spec
from compress.pruning.reconstruct import bias_fit_structures
from tests import tiny


def _last_hidden(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b, output_hidden_states=True).hidden_states[-1] for b in batches])


@pytest.mark.parametrize("sparsity", [{"ffn": 0.5}, {"kv_heads": 0.5}])
def test_qwen2_refits_without_a_bias_and_still_beats_plain_removal(sparsity):
    dense = tiny.make_model("qwen2")
    batches = tiny.make_batches("qwen2", 4, labels=False)
    errors, reports = {}, {}
    for method in ("none", "least_squares"):
        model = copy.deepcopy(dense)
        reports[method] = compress.prune_model(model, sparsity, None, "flap", data=batches, reconstruct=method)
        errors[method] = (_last_hidden(model, batches) - _last_hidden(dense, batches)).pow(2).mean().item()
        layer = model.model.layers[0]
        assert layer.mlp.down_proj.bias is None and layer.self_attn.o_proj.bias is None
    assert errors["least_squares"] < 0.7 * errors["none"], errors
    projection = "mlp.down_proj" if "ffn" in sparsity else "self_attn.o_proj"
    (note,) = reports["least_squares"].notes
    assert note.startswith(f"{projection} kept weights refit by ridge least squares")
    assert note.endswith("without a bias (uncentred: the qwen2 config cannot give these projections one)")


def test_llama_refit_takes_the_bias_along_without_compensate_bias():
    dense = tiny.make_model("llama")
    batches = tiny.make_batches("llama", 4, labels=False)
    model = copy.deepcopy(dense)
    report = compress.prune_model(model, {"ffn": 0.5, "heads": 0.5}, None, "flap", data=batches,
                                  reconstruct="least_squares")
    assert model.config.mlp_bias and model.config.attention_bias
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.bias.abs().sum() > 0 and layer.self_attn.o_proj.bias.abs().sum() > 0
    assert report.notes[-1].startswith("self_attn.o_proj/mlp.down_proj kept weights and biases refit by ridge least "
                                       "squares")
    # the same as asking for compensate_bias explicitly
    explicit = copy.deepcopy(dense)
    compress.prune_model(explicit, {"ffn": 0.5, "heads": 0.5}, None, "flap", data=batches,
                         reconstruct="least_squares", compensate_bias=True)
    for (name, implied), (_, asked) in zip(model.state_dict().items(), explicit.state_dict().items()):
        torch.testing.assert_close(implied, asked, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch,structures,expected", [
    ("llama", ["ffn", "kv_heads"], (["ffn", "kv_heads"], [])),
    ("qwen2", ["ffn", "heads"], ([], ["ffn", "heads"])),
    ("bert", ["ffn", "heads"], (["ffn", "heads"], [])),
])
def test_bias_fit_structures_follow_what_the_config_can_hold(arch, structures, expected):
    assert bias_fit_structures(arch_spec(tiny.make_model(arch)), structures) == expected
