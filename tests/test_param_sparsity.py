"""param_sparsity: a fraction of all the model's parameters removed from FFN neurons and heads / kv heads, the
structures' shares decided by one ranking across structures and layers weighted by the parameters each removal frees;
on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.errors import CompressError, NothingToPruneError, UnsupportedStructureError
from compress.pruning.arch import arch_spec
from compress.pruning.engine import score_units
from compress.pruning.importance import get_importance, units_for
from compress.pruning.plan import channel_parameters, normalize_scores, plan_parameter_budget
from tests import tiny

# tiny Llama: hidden 32, FFN 64, 4 query heads of 8 over 2 kv heads, 2 layers, untied embeddings of 128 x 32
NEURON = 3 * 32  # a row of gate_proj and up_proj, a column of down_proj
QUERY_HEAD = 8 * (32 + 32)  # 8 rows of q_proj, 8 columns of o_proj
KV_ROWS = 8 * (32 + 32)  # 8 rows of k_proj and of v_proj


def _llama_units(structures=("ffn", "heads")):
    return units_for(arch_spec(tiny.make_model("llama")), structures)


def test_channel_parameters_count_what_a_removal_frees():
    ffn, heads = _llama_units()[0], _llama_units()[2]
    assert ffn.structure == "ffn" and heads.structure == "heads"
    assert channel_parameters(ffn) == (NEURON, 0)
    assert channel_parameters(ffn, with_bias=True) == (NEURON + 2, 0)  # mlp_bias: gate/up bias entries go too
    assert channel_parameters(heads) == (QUERY_HEAD, KV_ROWS)
    assert channel_parameters(heads, with_bias=True) == (QUERY_HEAD + 8, KV_ROWS + 16)  # attention_bias: q, k, v
    # without grouped-query attention every head is its own kv group (BERT: biases everywhere already)
    bert_heads = units_for(arch_spec(tiny.make_model("bert")), ["heads"])[0]
    assert sum(channel_parameters(bert_heads)) == 3 * 8 * (32 + 1) + 8 * 32  # q, k, v rows and o columns


def _scores(units, **by_key):
    return {u.key: by_key[u.key.replace(".", "_")] for u in units}


def test_one_ranking_across_structures_takes_candidates_by_score_while_they_fit():
    units = _llama_units()  # ffn 0, ffn 1, heads 0, heads 1
    costs = {u.key: channel_parameters(u) for u in units}
    scores = _scores(units, decoder_0_ffn=torch.arange(64.0), decoder_1_ffn=torch.arange(64.0) + 100,
                     decoder_0_attention=torch.tensor([-5.0, 50.0, -5.0, 50.0]),
                     decoder_1_attention=torch.full((4,), 1000.0))
    slot = 2 * QUERY_HEAD  # one query head from each of the 2 kv groups
    plan = plan_parameter_budget(units, scores, slot + 10 * NEURON, costs=costs, whole_kv_groups=False)
    assert plan.freed == slot + 10 * NEURON
    assert plan.removals == {"decoder.0.ffn": list(range(10)), "decoder.1.ffn": [], "decoder.0.attention": [0, 2],
                             "decoder.1.attention": []}
    # the row of heads does not fit in 500 parameters: neurons further down the ranking fill what they can
    plan = plan_parameter_budget(units, scores, 500, costs=costs, whole_kv_groups=False)
    assert plan.removals["decoder.0.ffn"] == list(range(5)) and plan.removals["decoder.0.attention"] == []
    assert plan.freed == 5 * NEURON <= 500 < plan.freed + NEURON
    # every layer keeps one query head per kv group: 2 rows of heads could go, 1 of them is above the floor
    assert plan.available == 2 * 64 * NEURON - 2 * NEURON + 2 * slot


def test_kv_groups_and_min_keep_floors():
    units = _llama_units(("ffn", "kv_heads"))
    costs = {u.key: channel_parameters(u) for u in units}
    scores = _scores(units, decoder_0_ffn=torch.arange(64.0) - 1000, decoder_1_ffn=torch.arange(64.0),
                     decoder_0_attention=torch.tensor([1.0, 1.0, -3.0, -2.0]),
                     decoder_1_attention=torch.full((4,), 500.0))
    group = 2 * QUERY_HEAD + KV_ROWS
    plan = plan_parameter_budget(units, scores, group, costs=costs, whole_kv_groups=True)
    assert plan.removals["decoder.0.attention"] == [] and len(plan.removals["decoder.0.ffn"]) == group // NEURON
    plan = plan_parameter_budget(units, scores, 10 ** 6, costs=costs, whole_kv_groups=True, min_keep=0.5)
    # a huge budget: everything above the floors goes, the weakest kv group (heads 2, 3) of each layer first
    assert [len(v) for v in plan.removals.values()] == [32, 32, 2, 2]
    assert plan.removals["decoder.0.attention"] == [2, 3]
    assert plan.available == plan.freed == 64 * NEURON + 2 * group


def test_round_to_makes_chunks_of_neurons():
    units = _llama_units(("ffn",))
    costs = {u.key: channel_parameters(u) for u in units}
    scores = {units[0].key: torch.arange(64.0), units[1].key: torch.arange(64.0) + 0.5}
    plan = plan_parameter_budget(units, scores, 20 * NEURON, costs=costs, whole_kv_groups=False, round_to=8)
    assert [len(v) for v in plan.removals.values()] == [8, 8]  # 16 neurons in 2 chunks; a third does not fit


def test_heads_standardise_against_their_channels_with_channel_criteria():
    """FLAP's attention standardisation: each channel's score standardised among the layer's channels, averaged over
    a head's channels; what normalize='standardize' gives a heads unit scored by flap."""
    model = tiny.make_model("llama")
    batches = tiny.make_batches("llama", 2, labels=False)
    unit = units_for(arch_spec(model), ["heads"])[0]
    seen = []
    handle = unit.site.o.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 32)))
    scores = score_units(model, [unit], get_importance("flap"), batches)
    handle.remove()
    x = torch.cat(seen).double()
    channels = x.var(0) * unit.site.o.weight.detach().double().pow(2).sum(0)
    expected = ((channels - channels.mean()) / channels.std()).view(4, 8).mean(1)
    from compress.pruning.importance import GateStats, collect_gate_stats

    stats: GateStats = collect_gate_stats(model, [unit], batches, gradients=False)
    spread = get_importance("flap").channel_spread(unit, stats.inputs[unit.key])
    standardised = normalize_scores([unit], scores, "standardize", {unit.key: spread})[unit.key]
    torch.testing.assert_close(standardised.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("structures,kwargs", [
    (("ffn", "heads"), {"importance": "flap"}),
    (("ffn", "kv_heads"), {"importance": "flap", "compensate_bias": True, "reconstruct": "least_squares"}),
    (("ffn", "heads"), {"importance": "taylor", "min_keep": 0.5}),
])
def test_global_param_sparsity_reaches_the_budget_end_to_end(structures, kwargs):
    model = tiny.make_model("llama")
    report = compress.prune_model(model, structures=structures, param_sparsity=0.3, mode="global",
                                  normalize="standardize", data=tiny.make_batches("llama", 2), **kwargs)
    smallest = NEURON + (2 if kwargs.get("compensate_bias") else 0)
    assert report.param_sparsity == 0.3 and report.sparsity == {}
    assert report.achieved_param_sparsity == 1 - report.params_after / report.params_before
    # at most the budget (added biases included), short of it by less than one neuron
    assert 0.3 - smallest / report.params_before < report.achieved_param_sparsity <= 0.3
    assert set(report.achieved_sparsity) == set(structures)
    if "min_keep" in kwargs:
        assert min(report.widths_after["ffn"]) >= 32 and min(report.widths_after["heads"]) >= 2
    with torch.no_grad():
        assert torch.isfinite(model(**tiny.make_batch("llama", labels=False)).logits).all()


def test_scores_decide_the_split_between_structures():
    """Heads that carry nothing go before neurons: the same budget, taken from heads when their outputs are
    negligible, from neurons when the heads matter."""
    dense = tiny.make_model("llama")
    batches = tiny.make_batches("llama", 2, labels=False)
    removed_heads = {}
    for weak in (True, False):
        model = copy.deepcopy(dense)
        if weak:
            with torch.no_grad():  # query heads 1 and 3 of every layer (one per kv group) write almost nothing
                for layer in model.model.layers:
                    layer.self_attn.o_proj.weight[:, 8:16] *= 1e-4
                    layer.self_attn.o_proj.weight[:, 24:32] *= 1e-4
        report = compress.prune_model(model, structures=("ffn", "heads"), param_sparsity=0.25, mode="global",
                                      normalize="standardize", importance="flap", data=batches)
        removed_heads[weak] = [report.removed.get(f"decoder.{i}.attention", []) for i in range(2)]
    assert removed_heads == {True: [[1, 3], [1, 3]], False: [[], []]}


def test_uniform_param_sparsity_sets_one_fraction_of_one_structure():
    model = tiny.make_model("llama")
    report = compress.prune_model(model, structures="ffn", param_sparsity=0.2, importance="flap",
                                  data=tiny.make_batches("llama", 2, labels=False))
    assert len(set(report.widths_after["ffn"])) == 1 and model.config.model_type == "llama"
    # the per-layer width rounds to a whole neuron: within half a neuron per layer of the budget
    assert abs(report.achieved_param_sparsity - 0.2) <= 2 * 0.5 * NEURON / report.params_before


def test_global_param_sparsity_reloads_after_import_compress(tmp_path):
    model = tiny.make_model("llama")
    report = compress.prune_model(model, structures=("ffn", "heads"), param_sparsity=0.25, mode="global",
                                  normalize="standardize", importance="flap", compensate_bias=True,
                                  data=tiny.make_batches("llama", 2, labels=False))
    out = compress.save_pretrained(model, tmp_path / "out", report=report)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = tiny.make_batch("llama", labels=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    assert reloaded.num_parameters() == report.params_after


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 0.3}, "param_sparsity=0.2: replaces sparsity"),
    ({"mode": "uniform"}, "param_sparsity=0.2: in uniform mode cannot split the parameters between ffn and heads"),
    ({"normalize": "none"}, "normalize='none': param_sparsity ranks ffn and heads in one list"),
    ({"structures": ("ffn", "layers")}, "param_sparsity=0.2: takes parameters from ffn, heads, kv_heads, not layers"),
    ({"param_sparsity": 1.0}, r"param_sparsity=1.0: .* must be a number in \(0, 1\)"),
    ({"max_keep": 0.9}, "max_keep=0.9: is not combined with param_sparsity"),
    ({"importance": "obs"}, "importance='obs': chooses channels by the error of the least-squares refit"),
    ({"structures": ("ffn", "heads", "kv_heads")},
     "structures='ffn,heads,kv_heads': param_sparsity takes parameters from either 'heads' .* or 'kv_heads'"),
])
def test_param_sparsity_options_are_checked(kwargs, match):
    args = {"structures": ("ffn", "heads"), "param_sparsity": 0.2, "mode": "global", "normalize": "standardize",
            "importance": "flap", **kwargs}
    with pytest.raises(compress.InvalidOptionError, match=match):
        compress.PruningSpec.from_options(**args)
    with pytest.raises(compress.InvalidOptionError, match=match):
        compress.prune_model(tiny.make_model("llama"), **args)


def test_heads_with_kv_heads_under_param_sparsity_names_the_structures_on_the_command_line():
    """The command line gives structures and a budget, no per-structure fractions: the error names --structures."""
    from compress.cli import error_line

    with pytest.raises(compress.InvalidOptionError) as caught:
        compress.PruningSpec.from_options(structures="ffn,heads,kv_heads", param_sparsity=0.2, mode="global",
                                          normalize="standardize", importance="flap")
    line = error_line(caught.value)
    assert line.startswith("compress: error: --structures ffn,heads,kv_heads: param_sparsity takes parameters from "
                           "either 'heads'"), line
    assert "None" not in line


@pytest.mark.parametrize("arch,kwargs,error,match", [
    ("llama", {"param_sparsity": 0.9, "min_keep": 0.5}, CompressError,
     r"param_sparsity=0.9: asks for .* parameters .* and ffn, heads can free at most .* above the min_keep floors"),
    ("llama", {"param_sparsity": 0.001}, NothingToPruneError, "fewer than the smallest removal"),
    ("t5", {"param_sparsity": 0.2}, UnsupportedStructureError, "t5: heads go with the same indices"),
])
def test_budgets_the_model_cannot_meet_are_refused_before_it_changes(arch, kwargs, error, match):
    model = tiny.make_model(arch)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        compress.prune_model(model, structures=("ffn", "heads"), mode="global", normalize="standardize",
                             importance="taylor", data=tiny.make_batches(arch, 1), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
