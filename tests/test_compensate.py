"""Bias compensation: removed channels leave their mean contribution in the output projection's bias."""

from __future__ import annotations

import pytest
import torch

from compress.pruning.arch import arch_spec
from compress.pruning.compensate import add_to_bias, bias_shifts, record_input_means
from compress.pruning.importance import GateStats, record_activations, units_for
from compress.pruning.surgery import apply_removals
from tests import tiny


def _logits(model, batch):
    """The last hidden states (the tiny classifier's logits are too small to tell changes apart)."""
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states[-1]


def _constant_channels_model():
    """Tiny BERT where FFN neuron 5 of layer 0 and head 2 of layer 1 output the same value for every token."""
    model = tiny.make_model("bert")
    layers = model.bert.encoder.layer
    with torch.no_grad():
        # BERT initialises biases to 0; non-zero ones make the constants matter
        layers[0].intermediate.dense.weight[5] = 0  # activation = gelu(bias[5]) whatever the input
        layers[0].intermediate.dense.bias[5] = 1.5
        layers[1].attention.self.value.weight[16:24] = 0  # head 2 (head_dim 8) returns its value bias only
        layers[1].attention.self.value.bias[16:24] = torch.linspace(-1, 1, 8)
    return model


def _prune(model, compensate: bool, batches):
    arch = arch_spec(model)
    units = units_for(arch, ["ffn", "heads"])
    ffn0, heads1 = arch.ffn_sites()[0].name, arch.attention_sites()[1].name
    removals = {ffn0: [5], heads1: [2]}
    with record_input_means(model, units) as recorder:
        for batch in batches:
            _logits(model, batch)
    if compensate:
        shifts, skipped = bias_shifts(units, removals, recorder.means())
        assert sorted(shifts) == sorted(removals) and not skipped
        add_to_bias(units, shifts)
    apply_removals(model, arch, units, removals)
    return model


def test_removing_constant_channels_with_compensation_changes_nothing():
    batches = tiny.make_batches("bert", 2)
    reference = _logits(_constant_channels_model(), batches[0])
    compensated = _prune(_constant_channels_model(), True, batches)
    plain = _prune(_constant_channels_model(), False, batches)
    assert compensated.bert.encoder.layer[0].intermediate.dense.out_features == 63
    assert compensated.bert.encoder.layer[1].attention.output.dense.in_features == 24
    torch.testing.assert_close(_logits(compensated, batches[0]), reference, rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(plain, batches[0]), reference, atol=1e-2)


def test_means_exclude_padding():
    model = tiny.make_model("bert")
    batch = tiny.make_batch("bert", batch_size=3, seq_len=6, labels=False)
    batch["attention_mask"][1, 3:] = 0
    batch["attention_mask"][2, 1:] = 0
    site = arch_spec(model).ffn_sites()[1]
    seen = []
    handle = site.output.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with record_input_means(model, units_for(arch_spec(model), ["ffn"])) as recorder:
            _logits(model, batch)
    finally:
        handle.remove()
    real = seen[0][batch["attention_mask"].bool()]
    assert real.shape[0] == 6 + 3 + 1
    torch.testing.assert_close(recorder.means()[site.name], real.mean(0))


@pytest.mark.parametrize("decoder_mask", [False, True])
def test_t5_decoder_states_use_the_decoder_mask_not_the_encoders(decoder_mask):
    """Encoder and decoder inputs of the same length: the encoder's padding must not mask decoder positions."""
    model = tiny.make_model("t5")
    batch = tiny.make_batch("t5", batch_size=3, seq_len=6, labels=False)
    batch["decoder_input_ids"] = torch.randint(3, tiny.VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    batch["attention_mask"][1, 2:] = 0
    batch["attention_mask"][2, 4:] = 0
    if decoder_mask:
        batch["decoder_attention_mask"] = torch.ones_like(batch["decoder_input_ids"])
        batch["decoder_attention_mask"][0, 3:] = 0
    masks = {"encoder": batch["attention_mask"], "decoder": batch.get("decoder_attention_mask")}
    arch = arch_spec(model)
    units = units_for(arch, ["ffn", "hidden"])
    sites = {site.stack: site for site in arch.ffn_sites() if site.layer == 0}
    seen: dict[str, list[torch.Tensor]] = {stack: [] for stack in sites}
    handles = [site.output.register_forward_pre_hook(lambda module, args, stack=stack: seen[stack].append(args[0]))
               for stack, site in sites.items()]
    stats = GateStats()
    try:
        with record_input_means(model, units) as recorder, record_activations(model, units, stats), torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()

    def real(stack: str, states: torch.Tensor) -> torch.Tensor:
        mask = masks[stack]
        return states.reshape(-1, states.shape[-1]) if mask is None else states[mask.bool()]

    for stack, site in sites.items():
        inputs = real(stack, seen[stack][0])
        assert inputs.shape[0] == (12 if stack == "encoder" else 15 if decoder_mask else 18)
        torch.testing.assert_close(recorder.means()[site.name], inputs.mean(0))
        torch.testing.assert_close(stats.activation_sum[site.name] / stats.activation_count[site.name],
                                   inputs.abs().mean(0))
    decoder = set(model.decoder.modules())
    norms = arch.hidden_site().norms
    n_decoder = sum(norm in decoder for norm, _ in norms)
    assert stats.activation_count["hidden"] == (len(norms) - n_decoder) * 12 + n_decoder * (15 if decoder_mask else 18)


def test_projections_without_bias_are_reported_not_changed():
    model = tiny.make_model("llama")
    units = units_for(arch_spec(model), ["ffn", "heads"])
    with record_input_means(model, units) as recorder:
        _logits(model, tiny.make_batch("llama", labels=False))
    removals = {u.key: [0] for u in units}
    shifts, skipped = bias_shifts(units, removals, recorder.means())
    assert not shifts and sorted(skipped) == sorted(removals)
