"""Decoder-grade pruning: the FLAP / Wanda-sp / LLM-Pruner / ShortGPT criteria, sequential least-squares
reconstruction, biases the standard config can hold, and FLAP-style width allocation, on tiny random models."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.errors import CalibrationError, CompressError, UnsupportedStructureError
from compress.pruning import reconstruct
from compress.pruning.arch import arch_spec
from compress.pruning.engine import score_units
from compress.pruning.importance import InputMoments, get_importance, task_loss, units_for
from compress.pruning.plan import plan_removals, reselect
from compress.pruning.reconstruct import ProjectionStatistics, least_squares_update
from tests import tiny
from tests.test_pruning import _fresh_reload


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _last_hidden(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**_inputs(b), output_hidden_states=True).hidden_states[-1] for b in batches])


def _projection_inputs(model, layer, batches) -> torch.Tensor:
    """Every token's input of ``layer``'s output projection over ``batches`` (tokens x channels)."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**_inputs(batch))
    finally:
        handle.remove()
    return torch.cat(seen).double()


# -- criteria ------------------------------------------------------------------------------------------------------
def test_flap_removes_a_constant_channel_that_wanda_sp_and_activation_keep():
    """A neuron that outputs the same large value for every token, through large weights: its contribution is a
    constant (a bias can carry it), so FLAP's fluctuation ranks it last; magnitude-based criteria rank it first."""
    model = tiny.make_model("bert")
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.intermediate.dense.weight[7] = 0
            layer.intermediate.dense.bias[7] = 3.0
            layer.output.dense.weight[:, 7] *= 50
    batches = tiny.make_batches("bert", 2)
    removed = {}
    for criterion in ("flap", "wanda_sp", "activation"):
        report = compress.prune_model(copy.deepcopy(model), 1 / 64, ("ffn",), criterion, data=batches)
        removed[criterion] = list(report.removed.values())
    assert removed["flap"] == [[7], [7]]
    assert all([7] not in removed[c] for c in ("wanda_sp", "activation")), removed


@pytest.mark.parametrize("structure", ["ffn", "heads"])
def test_flap_and_wanda_sp_follow_their_definitions(structure):
    model = tiny.make_model("llama")
    batches = tiny.make_batches("llama", 2, labels=False)
    unit = units_for(arch_spec(model), [structure])[1]
    layer = unit.site.output if structure == "ffn" else unit.site.o
    x = _projection_inputs(model, layer, batches)
    weight = layer.weight.detach().double()
    flap = x.var(0, unbiased=True) * weight.pow(2).sum(0)
    wanda = weight.abs().mean(0) * x.pow(2).sum(0).sqrt()
    if structure == "heads":  # a head scores the sum over its channels
        flap, wanda = flap.view(unit.size, -1).sum(1), wanda.view(unit.size, -1).sum(1)
    for name, expected in (("flap", flap), ("wanda_sp", wanda)):
        scores = score_units(model, [unit], get_importance(name), batches)[unit.key]
        torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-7)


def _grads(model, batches, tensors):
    """The gradients of the loss with respect to ``tensors``, per batch."""
    return [torch.autograd.grad(task_loss(model, b), tensors) for b in batches]


def test_taylor_is_the_vector_wise_and_taylor_elementwise_the_element_wise_form():
    """taylor (gate gradients) = per batch |<W, dL/dW>| over a neuron's down_proj column (LLM-Pruner's vector-wise
    importance); taylor_elementwise = sum of |w * dL/dw| over the neuron's up, gate and down weights, the gradient
    summed over batches (LLM-Pruner's element-wise importance)."""
    model = tiny.make_model("llama")
    batches = tiny.make_batches("llama", 2)
    unit = units_for(arch_spec(model), ["ffn"])[0]
    mlp = model.model.layers[0].mlp
    weights = [mlp.down_proj.weight, mlp.up_proj.weight, mlp.gate_proj.weight]
    per_batch = _grads(model, batches, weights)
    vector = sum((weights[0] * grads[0]).sum(0).abs() for grads in per_batch)
    summed = [sum(grads[i] for grads in per_batch) for i in range(3)]
    element = (weights[0] * summed[0]).abs().sum(0) + (weights[1] * summed[1]).abs().sum(1) + \
        (weights[2] * summed[2]).abs().sum(1)
    scores = {name: score_units(model, [unit], get_importance(name), batches)[unit.key]
              for name in ("taylor", "taylor_elementwise")}
    torch.testing.assert_close(scores["taylor"], vector.detach(), rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(scores["taylor_elementwise"], element.detach(), rtol=1e-4, atol=1e-8)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # flags restored, no .grad left


def test_taylor_elementwise_scores_heads_layers_and_hidden():
    model = tiny.make_model("llama")
    report = compress.prune_model(model, {"heads": 0.5, "layers": 0.5}, None, "taylor_elementwise",
                                  data=tiny.make_batches("llama", 2))
    assert report.widths_after["layers"] == [1] and report.widths_after["heads"] == [2]
    assert all(p.grad is None for p in model.parameters())
    report = compress.prune_model(tiny.make_model("llama"), {"hidden": 0.25}, None, "taylor_elementwise",
                                  data=tiny.make_batches("llama", 2))
    assert report.widths_after["hidden"] == [24]


def test_block_influence_removes_the_block_that_barely_changes_the_stream():
    model = tiny.make_model("llama")
    with torch.no_grad():  # block 0 adds almost nothing to the residual stream: its output ~ its input
        model.model.layers[0].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[0].mlp.down_proj.weight.mul_(1e-3)
    report = compress.prune_model(model, {"layers": 0.5}, None, "block_influence",
                                  data=tiny.make_batches("llama", 2, labels=False))
    assert report.removed == {"decoder": [0]}
    # the score is 1 - the mean cosine of a block's input and output over real tokens
    dense = tiny.make_model("llama")
    batch = tiny.make_batch("llama", labels=False)
    batch["attention_mask"][1, 5:] = 0
    unit = units_for(arch_spec(dense), ["layers"])[0]
    scores = score_units(dense, [unit], get_importance("block_influence"), [batch])[unit.key]
    with torch.no_grad():
        states = dense(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    expected = [1 - torch.cosine_similarity(states[i][real], states[i + 1][real], dim=-1).mean() for i in range(2)]
    # the last hidden state is normalised: compare block 0 exactly, block 1 by its input only
    torch.testing.assert_close(scores[0], expected[0].float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("importance,sparsity,match", [
    ("block_influence", {"ffn": 0.5}, r"importance='block_influence': cannot score 'ffn': use taylor"),
    ("flap", {"layers": 0.5}, r"importance='flap': cannot score 'layers'"),
    ("wanda_sp", {"hidden": 0.25}, r"importance='wanda_sp': cannot score 'hidden'"),
])
def test_criteria_refuse_what_they_cannot_score(importance, sparsity, match):
    with pytest.raises(CompressError, match=match):
        compress.PruningSpec(sparsity=sparsity, importance=importance)


def test_magnitude_on_a_causal_lm_warns_in_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="compress.pruning.engine"):
        compress.prune_model(tiny.make_model("llama"), 0.5, ("ffn",), "magnitude")
    lines = [r.getMessage() for r in caplog.records if "causal LM" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "flap" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compress.pruning.engine"):
        compress.prune_model(tiny.make_model("bert"), 0.5, ("ffn",), "magnitude")
    assert not [r for r in caplog.records if "causal LM" in r.getMessage()]


# -- least-squares reconstruction ------------------------------------------------------------------------------------
def _statistics(x: torch.Tensor) -> ProjectionStatistics:
    stats = ProjectionStatistics(x.shape[1])
    stats.add(x)
    return stats


def test_least_squares_update_is_exact_without_removals_and_for_redundant_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    x[:, 5] = 2 * x[:, 0] - x[:, 1] + 0.5  # channel 5 is an affine function of channels 0 and 1
    weight, bias = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    stats = _statistics(x)
    same_weight, same_bias = least_squares_update(weight, bias, stats, [], damping=0.01, fit_bias=True)
    assert torch.equal(same_weight, weight) and same_bias is bias
    new_weight, new_bias = least_squares_update(weight, bias, stats, [5], damping=1e-9, fit_bias=True)
    torch.testing.assert_close(x[:, :5] @ new_weight.T + new_bias, x @ weight.T + bias, rtol=1e-4, atol=1e-4)
    # a large ridge leaves the kept weights as they were and the removed channel's mean in the bias (FLAP)
    kept_weight, flap_bias = least_squares_update(weight, bias, stats, [5], damping=1e9, fit_bias=True)
    torch.testing.assert_close(kept_weight, weight[:, :5], rtol=0, atol=1e-6)
    torch.testing.assert_close(flap_bias, bias + weight[:, 5] * x[:, 5].mean(), rtol=1e-5, atol=1e-5)
    # without a bias the fit is uncentred: the mean cannot move into a bias, and the bias stays as it was
    _, untouched = least_squares_update(weight, None, stats, [5], damping=0.01, fit_bias=False)
    assert untouched is None


@pytest.mark.parametrize("arch,sparsity,compensate", [
    ("llama", {"ffn": 0.5}, False),
    ("llama", {"ffn": 0.5, "heads": 0.5}, True),
    ("qwen2", {"kv_heads": 0.5}, False),
    ("bert", {"ffn": 0.5}, True),
])
def test_reconstruction_brings_outputs_closer_to_dense(arch, sparsity, compensate):
    dense = tiny.make_model(arch)
    batches = tiny.make_batches(arch, 4, labels=False)
    errors = {}
    for method in ("none", "least_squares"):
        model = copy.deepcopy(dense)
        compress.prune_model(model, sparsity, None, "flap", data=batches, reconstruct=method,
                             compensate_bias=compensate)
        errors[method] = (_last_hidden(model, batches) - _last_hidden(dense, batches)).pow(2).mean().item()
    assert errors["least_squares"] < 0.7 * errors["none"], errors


def test_sequential_statistics_come_from_the_pruned_stream(monkeypatch):
    """Layer 1's statistics are those of its inputs in the model whose layer 0 is already pruned and refit."""
    dense = tiny.make_model("llama")
    batches = tiny.make_batches("llama", 2, labels=False)
    seen = []
    original = reconstruct.least_squares_update

    def spy(weight, bias, stats, removed, damping, fit_bias):
        seen.append((stats.mean.clone(), removed))
        return original(weight, bias, stats, removed, damping, fit_bias)

    monkeypatch.setattr(reconstruct, "least_squares_update", spy)
    model = copy.deepcopy(dense)
    compress.prune_model(model, {"ffn": 0.5}, None, "flap", data=batches, reconstruct="least_squares")
    assert len(seen) == 2
    mean, removed = seen[1]
    kept = sorted(set(range(64)) - set(removed))
    pruned_inputs = _projection_inputs(model, model.model.layers[1].mlp.down_proj, batches)
    dense_inputs = _projection_inputs(dense, dense.model.layers[1].mlp.down_proj, batches)
    torch.testing.assert_close(mean[kept], pruned_inputs.mean(0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(mean, dense_inputs.mean(0), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("sparsity", [{"ffn": 0.5, "heads": 0.5}, {"heads": 0.5}])
def test_one_pass_for_a_blocks_last_projection_gives_what_running_the_block_again_gives(monkeypatch, sparsity):
    """Pre-norm blocks: the stream after a block is its output without the FFN output projection's term plus the
    refit projection's term; the generic path runs the block again. Both give the same model, also where only heads
    go (the attention's output feeds the FFN, so it cannot be added afterwards)."""
    from compress.pruning.arch import LlamaSpec

    batches = tiny.make_batches("llama", 2, labels=False)
    models = []
    for residual in (True, False):
        monkeypatch.setattr(LlamaSpec, "residual_outputs", residual)
        model = tiny.make_model("llama")
        compress.prune_model(model, sparsity, None, "flap", data=batches,
                             reconstruct="least_squares", compensate_bias=True)
        models.append(model)
    for (name, fused), (_, rerun) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        torch.testing.assert_close(fused, rerun, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("sparsity", [{"heads": 0.5}, {"ffn": 0.5}, {"ffn": 0.5, "heads": 0.5}])
def test_the_stream_after_the_pass_is_what_the_pruned_model_computes(monkeypatch, sparsity):
    """The calibration stream the sequential pass leaves behind is the pruned model's own output of the last block
    (what every later block's statistics are measured on), whichever of a block's projections are refit."""
    streams = []
    capture = reconstruct.BlockStream.capture.__func__

    def keep(cls, *args, **kwargs):
        streams.append(capture(cls, *args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(reconstruct.BlockStream, "capture", classmethod(keep))
    model = tiny.make_model("llama")
    batches = tiny.make_batches("llama", 2, labels=False)
    compress.prune_model(model, sparsity, None, "obs", data=batches, reconstruct="least_squares",
                         compensate_bias=True)
    outputs = []
    handle = model.model.layers[-1].register_forward_hook(
        lambda module, args, output: outputs.append(output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            for batch in batches:
                model(**_inputs(batch))
    finally:
        handle.remove()
    for entry, expected in zip(streams[0].entries, outputs, strict=True):
        torch.testing.assert_close(entry.hidden, expected, rtol=1e-4, atol=1e-5)


def test_flap_chooses_channels_on_the_pruned_stream_and_global_mode_keeps_planned_widths():
    model = tiny.make_model("llama")
    batches = tiny.make_batches("llama", 2, labels=False)
    report = compress.prune_model(model, {"ffn": 0.5}, None, "flap", data=batches, mode="global",
                                  normalize="standardize", reconstruct="least_squares")
    plain = compress.prune_model(tiny.make_model("llama"), {"ffn": 0.5}, None, "flap", data=batches, mode="global",
                                 normalize="standardize")
    assert report.widths_after == plain.widths_after  # widths come from the dense scores
    assert sum(report.widths_after["ffn"]) == 64
    assert [len(v) for v in report.removed.values()] == [len(v) for v in plain.removed.values()]
    batch = tiny.make_batch("llama", labels=False)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.parametrize("structure,heads,kv_heads", [("heads", [2, 2], [2, 2]), ("kv_heads", [2, 2], [1, 1])])
def test_reconstruction_keeps_grouped_query_heads_equal_per_group(structure, heads, kv_heads):
    model = tiny.make_model("llama")
    report = compress.prune_model(model, {structure: 0.5}, None, "flap", data=tiny.make_batches("llama", 2),
                                  reconstruct="least_squares")
    assert report.widths_after["heads"] == heads
    for site, removed in zip(arch_spec(model).attention_sites(), report.removed.values()):
        assert site.num_kv_heads == kv_heads[0]
        assert site.module.num_key_value_groups == site.num_heads // site.num_kv_heads
        groups = [h // 2 for h in removed]
        if structure == "heads":
            assert sorted(groups) == [0, 1]  # one query head from each kv group
        else:
            assert len(set(groups)) == 1 and len(removed) == 2  # one whole kv group
    with torch.no_grad():
        assert torch.isfinite(model(**tiny.make_batch("llama", labels=False)).logits).all()


def test_reselect_keeps_the_shape_of_the_planned_removal():
    unit = units_for(arch_spec(tiny.make_model("llama")), ["heads"])[0]  # 4 query heads over 2 kv groups
    scores = torch.tensor([4.0, 1.0, 3.0, 1.5])
    assert reselect(unit, [0, 2], scores, whole_kv_groups=False) == [1, 3]  # the lowest head of each group
    assert reselect(unit, [0, 1], scores, whole_kv_groups=True) == [2, 3]  # the lowest group: 4.5 < 5


def test_reconstruction_composes_with_depth_pruning():
    model = tiny.make_model("llama")
    report = compress.prune_model(model, {"ffn": 0.5, "layers": 0.5}, None, "taylor",
                                  data=tiny.make_batches("llama", 2), reconstruct="least_squares")
    assert report.widths_after["layers"] == [1] and report.widths_after["ffn"] == [32]
    with torch.no_grad():
        assert torch.isfinite(model(**tiny.make_batch("llama", labels=False)).logits).all()


@pytest.mark.parametrize("arch,kwargs,error,match", [
    ("llama", {"sparsity": {"hidden": 0.25}, "importance": "taylor"}, CompressError,
     "reconstruct='least_squares': refits .* 'hidden'"),
    ("llama", {"sparsity": {"layers": 0.5}, "importance": "taylor"}, CompressError, "has nothing to refit"),
    ("t5", {}, UnsupportedStructureError, "t5: reconstruct='least_squares' runs one stack's blocks"),
    ("llama", {"data": None}, CalibrationError, "needs `data`"),
    ("llama", {"damping": 0.0}, CompressError, "damping=0.0: .*positive"),
    ("llama", {"reconstruct": "none", "damping": 0.1}, CompressError, "damping=0.1: is the ridge of reconstruct"),
    ("llama", {"reconstruct": "obs"}, CompressError, "reconstruct='obs': choose one of none, least_squares"),
    ("llama", {"importance": "obs", "reconstruct": "none"}, CompressError,
     "importance='obs': chooses channels by the error of the least-squares refit of the kept ones: set "
     "reconstruct='least_squares'"),
])
def test_reconstruction_refuses_what_it_cannot_do(arch, kwargs, error, match):
    model = tiny.make_model(arch)
    before = copy.deepcopy(model.state_dict())
    args = {"sparsity": {"ffn": 0.5}, "importance": "flap", "data": tiny.make_batches(arch, 1),
            "reconstruct": "least_squares", **kwargs}
    with pytest.raises(error, match=match):
        compress.prune_model(model, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- optimal brain surgeon selection ----------------------------------------------------------------------------------
def _refit_error(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, removed: list[int],
                 damping: float = 1e-6) -> float:
    """The mean squared output error of the projection after removing ``removed`` and the least-squares refit."""
    stats = _statistics(x)
    new_weight, new_bias = least_squares_update(weight, bias, stats, removed, damping=damping, fit_bias=True)
    kept = [j for j in range(x.shape[1]) if j not in removed]
    return (x[:, kept] @ new_weight.T + new_bias - x @ weight.T - bias).pow(2).mean().item()


def _ffn_unit(width: int):
    from compress.pruning.importance import Unit

    return Unit("ffn", "projection", width, site=None)


def test_obs_removes_the_channel_the_others_predict():
    """Channel 5 is a linear copy of channel 0: removing either costs nothing after the refit, and OBS picks one of
    them; FLAP scores each channel alone and removes the one of least fluctuation, which nothing else predicts."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) * torch.tensor([1.0, 1.0, 1.0, 0.3, 1.0, 1.0])
    x[:, 5] = 2 * x[:, 0]
    weight, bias = torch.randn(4, 6, generator=g), torch.zeros(4)
    stats = _statistics(x)
    chosen = reconstruct.obs_select(_ffn_unit(6), [0], weight, stats, damping=1e-6, centred=True,
                                    whole_kv_groups=False)
    assert chosen in ([0], [5])
    flap = get_importance("flap").channel_scores(stats.moments(), weight)
    assert int(flap.argmin()) == 3
    assert _refit_error(x, weight, bias, chosen) < 1e-6 < _refit_error(x, weight, bias, [3])


def test_obs_block_update_is_the_least_squares_refit():
    """After the greedy steps, the updated weights are those of the ridge least-squares refit of the kept columns
    (the same problem, solved in one go), whatever the order and the blocks of removal."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, generator=g) @ torch.randn(10, 10, generator=g)
    weight = torch.randn(3, 10, generator=g).double()
    moment = _statistics(x).second_moment(centred=True)
    inverse = reconstruct._ridge_inverse(moment, 0.01)
    current = weight.clone()
    for block in ([7], [2, 4], [9]):
        reconstruct._remove_block(current, inverse, torch.tensor(block))
    kept, gone = [0, 1, 3, 5, 6, 8], [2, 4, 7, 9]
    ridge = 0.01 * float(moment.diagonal().mean())
    hessian = moment[kept][:, kept] + ridge * torch.eye(len(kept), dtype=moment.dtype)
    expected = weight[:, kept] + weight[:, gone] @ moment[gone][:, kept] @ torch.linalg.inv(hessian)
    torch.testing.assert_close(current[:, kept], expected, rtol=1e-8, atol=1e-10)
    assert torch.count_nonzero(current[:, gone]) == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_obs_leaves_less_refit_error_than_flap_on_a_block(seed):
    """A tiny random Llama block whose FFN inputs are correlated (gate and up projections of rank 6): half the neurons
    removed, then the refit of the rest; OBS chooses with the covariance the refit exploits, FLAP channel by channel."""
    model = tiny.make_model("llama", seed=seed)
    g = torch.Generator().manual_seed(seed)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for layer in (mlp.up_proj, mlp.gate_proj):
            layer.weight.copy_(torch.randn(64, 6, generator=g) @ torch.randn(6, 32, generator=g) * 0.1)
    batches = tiny.make_batches("llama", 8, labels=False, seq_len=32)  # 512 tokens: more than the 64 channels
    unit = units_for(arch_spec(model), ["ffn"])[0]
    x = _projection_inputs(model, mlp.down_proj, batches).float()
    stats = _statistics(x)
    weight, bias = mlp.down_proj.weight.detach(), torch.zeros(32)
    planned = list(range(32))
    flap = reselect(unit, planned, get_importance("flap").score(unit, stats.moments()), whole_kv_groups=False)
    obs = reconstruct.obs_select(unit, planned, weight, stats, damping=0.01, centred=True, whole_kv_groups=False)
    assert len(obs) == 32 and len(set(obs)) == 32
    errors = [_refit_error(x, weight, bias, removed, damping=0.01) for removed in (obs, flap)]
    assert errors[0] < 0.9 * errors[1], errors


def test_obs_removes_the_head_another_head_repeats():
    """Head 3 of a BERT block computes what head 1 does: removing one of them costs nothing after the refit; FLAP
    removes head 0, whose output projection columns are small but which nothing else predicts."""
    model = tiny.make_model("bert")
    attention = model.bert.encoder.layer[0].attention
    with torch.no_grad():
        for layer in (attention.self.query, attention.self.key, attention.self.value):
            layer.weight[24:32] = layer.weight[8:16]
            layer.bias[24:32] = layer.bias[8:16]
        attention.output.dense.weight[:, :8] *= 0.1
    unit = units_for(arch_spec(model), ["heads"])[0]
    x = _projection_inputs(model, attention.output.dense, tiny.make_batches("bert", 8, seq_len=32)).float()
    stats = _statistics(x)
    weight, bias = attention.output.dense.weight.detach(), attention.output.dense.bias.detach()
    flap = reselect(unit, [0], get_importance("flap").score(unit, stats.moments()), whole_kv_groups=False)
    obs = reconstruct.obs_select(unit, [0], weight, stats, damping=1e-6, centred=True, whole_kv_groups=False)
    assert flap == [0] and obs in ([1], [3])
    channels = [[h * 8 + c for c in range(8)] for h in (obs[0], flap[0])]
    errors = [_refit_error(x, weight, bias, removed) for removed in channels]
    assert errors[0] < 1e-3 * errors[1], errors


@pytest.mark.parametrize("sparsity", [{"ffn": 0.5, "heads": 0.5}, {"kv_heads": 0.5}])
def test_obs_prunes_through_the_sequential_pass(sparsity):
    dense = tiny.make_model("llama")
    batches = tiny.make_batches("llama", 4, labels=False)
    errors = {}
    for criterion in ("flap", "obs"):
        model = copy.deepcopy(dense)
        report = compress.prune_model(model, sparsity, None, criterion, data=batches, reconstruct="least_squares",
                                      compensate_bias=True)
        errors[criterion] = (_last_hidden(model, batches) - _last_hidden(dense, batches)).pow(2).mean().item()
        for removed in report.removed.values():
            if "kv_heads" in sparsity:
                assert len(removed) == 2 and removed[0] // 2 == removed[1] // 2  # one whole kv group
    assert report.importance == "obs" and report.widths_after["heads"] == [2, 2]
    assert errors["obs"] < 1.5 * errors["flap"], errors


# -- biases the config can express ---------------------------------------------------------------------------------
def test_compensated_llama_enables_mlp_and_attention_bias_and_reloads_with_identical_logits(tmp_path):
    dense = tiny.make_model("llama")
    batches = tiny.make_batches("llama", 4, labels=False)
    errors = {}
    for compensate in (False, True):
        model = copy.deepcopy(dense)
        report = compress.prune_model(model, {"ffn": 0.5, "heads": 0.5}, None, "flap", data=batches,
                                      compensate_bias=compensate)
        errors[compensate] = (_last_hidden(model, batches) - _last_hidden(dense, batches)).pow(2).mean().item()
    assert errors[True] < errors[False], errors  # the bias now carries the removed channels' mean
    assert model.config.mlp_bias and model.config.attention_bias
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.bias.abs().sum() > 0 and layer.self_attn.o_proj.bias.abs().sum() > 0
    assert all(torch.equal(b, torch.zeros_like(b)) for b in (layer.mlp.gate_proj.bias, layer.mlp.up_proj.bias,
                                                             layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias))
    assert report.notes[:2] == [
        "mlp_bias enabled: down_proj biases carry the compensation; gate_proj/up_proj biases are zero",
        "attention_bias enabled: o_proj biases carry the compensation; q_proj/k_proj/v_proj biases are zero"]
    out = compress.save_pretrained(model, tmp_path / "out", report=report)
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True
    assert "mlp_bias enabled" in (out / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    batch = tiny.make_batch("llama", labels=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


def test_global_mode_with_biases_reloads_after_import_compress(tmp_path):
    model = tiny.make_model("llama")
    report = compress.prune_model(model, {"ffn": 0.5}, None, "flap", data=tiny.make_batches("llama", 2),
                                  mode="global", compensate_bias=True, reconstruct="least_squares")
    assert model.config.model_type == "compressed_llama" and len(set(report.widths_after["ffn"])) == 2
    out = compress.save_pretrained(model, tmp_path / "out", report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = tiny.make_batch("llama", labels=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    assert reloaded.model.layers[1].mlp.down_proj.bias is not None


@pytest.mark.parametrize("arch,sparsity,match", [
    ("qwen2", {"ffn": 0.5}, "qwen2: the FFN output projections have no bias and the qwen2 config cannot"),
    ("qwen2", {"kv_heads": 0.5}, "qwen2: the attention output projections have no bias"),
    ("t5", {"ffn": 0.5}, "t5: the FFN output projections have no bias"),
])
def test_compensation_the_config_cannot_express_is_refused_before_calibration(arch, sparsity, match, monkeypatch):
    from compress.pruning import engine

    monkeypatch.setattr(engine, "collect_gate_stats", lambda *a, **k: pytest.fail("calibrated before refusing"))
    with pytest.raises(UnsupportedStructureError, match=match):
        compress.prune_model(tiny.make_model(arch), sparsity, None, "flap", data=tiny.make_batches(arch, 1),
                             compensate_bias=True)


@pytest.mark.slow
def test_compensated_and_reconstructed_llama_reloads_in_a_fresh_process_without_compress(tmp_path):
    model = tiny.make_model("llama")
    report = compress.prune_model(model, {"ffn": 0.5, "kv_heads": 0.5}, None, "flap",
                                  data=tiny.make_batches("llama", 2), compensate_bias=True,
                                  reconstruct="least_squares")
    out = compress.save_pretrained(model, tmp_path / "out", report=report)
    batch = tiny.make_batch("llama", labels=False)
    with torch.no_grad():
        expected = model(**batch).logits
    _fresh_reload(out, "AutoModelForCausalLM", batch, expected, tmp_path)


# -- width allocation ----------------------------------------------------------------------------------------------
def test_standardised_scores_rank_each_layer_against_its_own_spread():
    model = tiny.make_model("bert")
    arch = arch_spec(model)
    units = units_for(arch, ["ffn"])
    base = torch.randperm(64, generator=torch.Generator().manual_seed(0)).float()
    # layer 1's scores are layer 0's, shifted and scaled: raw ranking strips layer 0, standardised ranking not
    scores = {units[0].key: base, units[1].key: 1000.0 + 50.0 * base}
    kept = {how: [64 - len(r) for r in plan_removals(arch, units, scores, {"ffn": 0.5}, "global",
                                                      normalize=how).values()] for how in ("none", "standardize")}
    assert kept == {"none": [1, 63], "standardize": [32, 32]}
    # a layer whose scores are all alike keeps more than one whose scores spread from a few strong channels
    spread = torch.cat([torch.zeros(56), torch.full((8,), 100.0)])
    alike = torch.linspace(0.9, 1.1, 64)
    removals = plan_removals(arch, units, {units[0].key: spread, units[1].key: alike}, {"ffn": 0.5}, "global",
                             normalize="standardize")
    assert len(removals[units[0].key]) > len(removals[units[1].key])


@pytest.mark.parametrize("arch_name,structure,ratio,min_keep,floor", [
    ("bert", "ffn", 0.5, 0.4, 26),
    ("llama", "heads", 0.5, 0.5, 2),  # whole rows: one query head per kv group
    ("llama", "kv_heads", 0.5, 0.5, 1),
])
def test_min_keep_is_a_floor_on_every_layer_and_the_total_stays(arch_name, structure, ratio, min_keep, floor):
    model = tiny.make_model(arch_name)
    arch = arch_spec(model)
    units = units_for(arch, [structure])
    # layer 0 scores far below layer 1: without a floor, layer 0 gives up everything it can
    scores = {u.key: torch.arange(1.0, u.size + 1.0) * (1000.0 if i else 1.0) for i, u in enumerate(units)}
    for how in ("none", "standardize"):
        removals = plan_removals(arch, units, scores, {structure: ratio}, "global", normalize=how, min_keep=min_keep)
        kept = [u.size - len(removals[u.key]) for u in units]
        if structure == "kv_heads":
            kept = [k // 2 for k in kept]
        assert min(kept) >= floor, (how, kept)
        total = sum(u.size for u in units) // (2 if structure == "kv_heads" else 1)
        assert sum(kept) == total - round(ratio * total)
    if structure == "ffn":  # without the floor, layer 0 would keep less
        bare = plan_removals(arch, units, scores, {structure: ratio}, "global")
        assert min(u.size - len(bare[u.key]) for u in units) < floor


def test_min_keep_end_to_end_and_its_checks():
    model = tiny.make_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.mul_(1e-3)
    report = compress.prune_model(model, {"ffn": 0.5}, None, "magnitude", mode="global", min_keep=0.25)
    assert report.widths_after["ffn"] == [16, 48]
    for kwargs, match in (({"min_keep": 0.6}, "min_keep=0.6: leaves too little to remove the ffn sparsity 0.5"),
                          ({"min_keep": 0.3, "mode": "uniform"}, "min_keep=0.3: sets a floor on per-layer widths"),
                          ({"min_keep": 0.0}, r"must be in \(0, 1\]")):
        with pytest.raises(CompressError, match=match):
            compress.PruningSpec(**{"sparsity": {"ffn": 0.5}, "mode": "global", **kwargs})


def test_input_moments_give_the_sample_variance():
    moments = InputMoments()
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    moments.add(x.sum(0), (x * x).sum(0), 3)
    torch.testing.assert_close(moments.variance, torch.tensor([4.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(moments.mean, torch.tensor([3.0, 2.0], dtype=torch.float64))
