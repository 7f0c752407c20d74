"""Pruning-Adapter specifics: shapes, schedules under the HF Trainer, optimizer state, reloads, errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import compress
from compress.errors import CompressError, UnsupportedStructureError
from compress.pruning.arch import arch_spec
from compress.pruning.importance import units_for
from compress.pruning.optim import remap_optimizer
from compress.pruning.surgery import apply_removals
from tests import tiny
from tests.methods import adapter_parameter_names, perturb_adapters


def _bert_peft(**kwargs):
    config = compress.PruningAdapterConfig(task_type="SEQ_CLS", r=4, **kwargs)
    return get_peft_model(tiny.make_model("bert"), config)


def _replay_on(base, plan):
    for event in plan:
        arch = arch_spec(base)
        apply_removals(base, arch, units_for(arch, event["structures"]), event["removed"])
    return base


def _logits(model, arch="bert"):
    model.eval()
    with torch.no_grad():
        return model(**tiny.make_batch(arch, labels=False)).logits


@pytest.mark.parametrize("arch,kwargs,expected", [
    ("bert", {"sparsity": 0.5, "structures": "ffn,heads", "mode": "global"}, {"ffn": 64, "heads": 4}),
    ("llama", {"sparsity": {"ffn": 0.75, "heads": 0.5, "layers": 0.5}}, {"ffn": [16], "heads": [2]}),
    ("qwen2", {"sparsity": {"ffn": 0.5, "kv_heads": 0.5}}, {"kv_heads": [1, 1]}),
    ("t5", {"sparsity": {"ffn": 0.25, "heads": 0.5, "layers": 0.0}}, {"ffn": [48] * 4, "heads": [2] * 6}),
])
def test_shapes_shrink_by_configured_amounts(arch, kwargs, expected):
    task = {"bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}.get(arch, "CAUSAL_LM")
    model = get_peft_model(tiny.make_model(arch), compress.PruningAdapterConfig(task_type=task, r=4, **kwargs))
    event = model.base_model.prune(data=tiny.make_batches(arch, 2))
    widths = arch_spec(model.base_model.model).widths()
    assert widths == event["widths_after"]
    for key, value in expected.items():
        if isinstance(value, int):  # global mode: the total shrinks, per-layer widths differ
            assert sum(widths[key]) == value
        else:
            assert widths[key] == value
    if "layers" in model.peft_config["default"].spec.sparsity:
        assert widths["layers"] == [1]


@pytest.mark.parametrize("compensate", [False, True])
def test_zero_initialised_adapters_equal_the_pruned_base(compensate):
    model = _bert_peft(sparsity={"ffn": 0.5, "heads": 0.25, "layers": 0.5}, mode="global",
                       compensate_bias=compensate)
    model.base_model.prune(data=tiny.make_batches("bert", 2))
    pruned_base = _replay_on(tiny.make_model("bert"), model.peft_config["default"].pruning_plan)
    shifts = {name.removeprefix("base_model.model."): module.pa_bias["default"]
              for name, module in model.named_modules() if "default" in getattr(module, "pa_bias", {})}
    assert bool(shifts) == compensate  # no buffers (and no per-forward add) unless compensation is configured
    assert any(shift.abs().sum() > 0 for shift in shifts.values()) == compensate
    with torch.no_grad():  # the pruned base with the compensation folded into its biases
        for name, shift in shifts.items():
            pruned_base.get_submodule(name).bias += shift
    # the classifier sits in modules_to_save: same initial weights as the base's
    torch.testing.assert_close(_logits(model), _logits(pruned_base), rtol=0, atol=1e-6)


def test_scoring_needs_no_backbone_gradients_or_optimizer_state():
    model = _bert_peft(sparsity=0.5)
    model.base_model.prune(data=tiny.make_batches("bert", 2))
    adapters = adapter_parameter_names(model)
    backbone = [p for n, p in model.named_parameters() if n not in adapters and "modules_to_save" not in n]
    assert backbone and all(not p.requires_grad and p.grad is None for p in backbone)


def test_head_warmup_trains_only_the_head_before_scoring():
    from compress import warm_up_head

    model = _bert_peft(sparsity=0.5, modules_to_save=["LayerNorm"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    losses = warm_up_head(model, tiny.make_batches("bert", 2), steps=12, lr=1e-2)
    assert len(losses) == 12 and losses[-1] < losses[0]  # the head learns the (memorisable) batches
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("classifier.modules_to_save" in n for n in changed), changed  # not LayerNorms/adapters
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training
    assert all(p.grad is None for p in model.parameters())
    model.base_model.prune(data=tiny.make_batches("bert", 2))  # then scoring, with the warmed-up head
    assert model.base_model.pruning_finished


def test_head_warmup_refuses_what_it_cannot_do():
    from compress import warm_up_head

    with pytest.raises(CompressError, match="needs a trainable task head"):
        warm_up_head(get_peft_model(tiny.make_model("llama"), compress.PruningAdapterConfig(
            task_type="CAUSAL_LM", r=4)), tiny.make_batches("llama", 1), steps=2)
    with pytest.raises(CompressError, match="needs calibration batches"):
        warm_up_head(_bert_peft(), [], steps=2)
    with pytest.raises(CompressError, match="steps=0"):
        warm_up_head(_bert_peft(), tiny.make_batches("bert", 1), steps=0)


def test_optimizer_state_follows_pruned_parameters():
    model = _bert_peft(sparsity={"ffn": 0.5, "layers": 0.5})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for batch in tiny.make_batches("bert", 2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    layers = model.base_model.model.bert.encoder.layer
    before = [opt.state[layer.output.dense.lora_A["default"].weight]["exp_avg"].clone() for layer in layers]
    event = model.base_model.prune(data=tiny.make_batches("bert", 2), optimizer=opt)

    live = {id(p) for p in model.parameters()}
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    assert all(id(p) in live for p in opt_params), "optimizer still holds removed parameters"
    assert {id(p) for p in opt_params} == {id(p) for p in model.parameters() if p.requires_grad}
    for p in opt_params:
        assert opt.state[p]["exp_avg"].shape == p.shape
    (survivor,) = [i for i in range(2) if i not in event["removed"]["encoder"]]
    removed = event["removed"][f"encoder.{survivor}.ffn"]
    keep = [i for i in range(64) if i not in removed]
    new_a = model.base_model.model.bert.encoder.layer[0].output.dense.lora_A["default"].weight
    torch.testing.assert_close(opt.state[new_a]["exp_avg"], before[survivor][:, keep])
    for batch in tiny.make_batches("bert", 2):  # training continues with the same optimizer
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def test_remap_optimizer_follows_chains_and_drops_removed():
    a, b, gone = (torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3))
    opt = torch.optim.SGD([a, b, gone], lr=0.1, momentum=0.9)
    for p in (a, b, gone):
        p.grad = torch.ones_like(p)
    opt.step()
    a1 = torch.nn.Parameter(a.detach()[[0, 2, 3]])
    a2 = torch.nn.Parameter(a1.detach()[:, [1, 2]])
    momentum = opt.state[a]["momentum_buffer"].clone()
    remap_optimizer(opt, {id(a): (a, a1, 0, torch.tensor([0, 2, 3])), id(a1): (a1, a2, 1, torch.tensor([1, 2]))},
                    [a2, b])
    assert opt.param_groups[0]["params"] == [a2, b]
    torch.testing.assert_close(opt.state[a2]["momentum_buffer"], momentum[[0, 2, 3]][:, [1, 2]])
    assert gone not in opt.state


def _trainer(model, steps, callback, tmp_path, **training_args):
    batches = tiny.make_batches("bert", 8, batch_size=4)
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]
    dataset = Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="no", report_to=[], logging_steps=1,
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, **training_args)
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])


def test_progressive_schedule_prunes_at_the_right_steps_under_trainer(tmp_path):
    config = dict(sparsity={"ffn": 0.5, "heads": 0.5}, mode="global", schedule="progressive",
                  scoring_steps=4, pruning_interval=4, pruning_end_step=12, compensate_bias=True)
    model = _bert_peft(**config)
    tuner = model.base_model
    assert tuner.pruning_steps() == [4, 8, 12]

    class WatchCheckpointing(compress.PruningAdapterCallback):
        checkpointing: list[bool] = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.checkpointing.append(tuner.model.is_activation_checkpointing)

    callback = WatchCheckpointing()
    trainer = _trainer(model, 16, callback, tmp_path)
    trainer.train()

    assert [e["step"] for e in callback.events] == [4, 8, 12]
    # dense steps recompute activations (lean memory); once pruned to the end, they no longer do
    assert callback.checkpointing == [True] * 12 + [False] * 4
    # every pruning event left its compensation in the output projections' bias buffers
    assert all(tuner.model.bert.encoder.layer[i].output.dense.pa_bias["default"].abs().sum() > 0 for i in (0, 1))
    ffn_totals = [sum(e["widths_after"]["ffn"]) for e in callback.events]
    assert ffn_totals[0] > ffn_totals[1] > ffn_totals[2] == 64
    # cubic schedule: most of the pruning happens early
    assert 128 - ffn_totals[0] == round(64 * (1 - (1 - 4 / 12) ** 3))
    assert sum(callback.events[-1]["widths_after"]["heads"]) == 4
    assert tuner.pruning_finished
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 16 and all(torch.isfinite(torch.tensor(losses)))
    # pruned parameters kept training after the last pruning step
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("max_keep", [0.5, 0.75])
def test_progressive_max_keep_caps_every_pruning_step(tmp_path, max_keep):
    model = _bert_peft(sparsity={"ffn": 0.5, "heads": 0.5}, mode="global", schedule="progressive",
                       scoring_steps=2, pruning_interval=2, pruning_end_step=6, max_keep=max_keep)
    callback = compress.PruningAdapterCallback()
    _trainer(model, 8, callback, tmp_path).train()
    assert [e["step"] for e in callback.events] == [2, 4, 6]
    for event in callback.events:
        for structure, original in (("ffn", 64), ("heads", 4)):
            widths = event["widths_after"][structure]
            # a step keeping more than max_keep overall caps each layer at what it keeps overall
            overall = sum(widths) / (2 * original)
            assert max(widths) <= max(int(max_keep * original), math.ceil(overall * original)), (structure, widths)
    final = callback.events[-1]["widths_after"]
    assert sum(final["ffn"]) == 64 and sum(final["heads"]) == 4
    assert max(final["ffn"]) <= int(max_keep * 64) and max(final["heads"]) <= int(max_keep * 4)
    if max_keep == 0.5:  # the tightest cap: every step leaves the layers equally wide, give or take a rounding
        assert all(max(e["widths_after"]["ffn"]) - min(e["widths_after"]["ffn"]) <= 1 for e in callback.events)


@pytest.mark.slow  # Trainer runs of more than a second
def test_user_checkpointing_stays_on_through_pruning_and_changes_no_numbers(tmp_path):
    """Trainer(activation_checkpointing=True) checkpoints the whole run, pruned steps included (the leanest
    memory setting); the callback never switches it off, and the trained model is the same as without it."""
    config = dict(sparsity={"ffn": 0.5, "heads": 0.5}, mode="global", schedule="progressive",
                  scoring_steps=2, pruning_interval=2, pruning_end_step=4)
    results = {}
    for checkpointing in (False, True):
        model = _bert_peft(**config)
        tuner = model.base_model

        class WatchCheckpointing(compress.PruningAdapterCallback):
            seen: list[bool] = []

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                self.seen.append(model.base_model.model.is_activation_checkpointing)

        callback = WatchCheckpointing()
        extra = {"activation_checkpointing": True,
                 "activation_checkpointing_kwargs": {"use_reentrant": False}} if checkpointing else {}
        _trainer(model, 6, callback, tmp_path / str(checkpointing), seed=3, **extra).train()
        assert callback.seen == ([True] * 6 if checkpointing else [True] * 4 + [False] * 2)
        assert tuner.model.is_activation_checkpointing == checkpointing  # the user's setting survives
        results[checkpointing] = (callback.events[-1]["widths_after"], _logits(model))
    assert results[True][0] == results[False][0]
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-5, rtol=1e-4)


def test_oneshot_schedule_prunes_once_after_scoring_steps(tmp_path):
    model = _bert_peft(sparsity=0.5, scoring_steps=3)
    callback = compress.PruningAdapterCallback()
    _trainer(model, 6, callback, tmp_path).train()
    assert [e["step"] for e in callback.events] == [3]
    assert callback.events[0]["widths_after"]["ffn"] == [32, 32]


def test_schedule_longer_than_training_fails_clearly(tmp_path):
    model = _bert_peft(sparsity=0.5, schedule="progressive", scoring_steps=4, pruning_end_step=50)
    with pytest.raises(CompressError, match="ends at step 50 but training has only 10 steps"):
        _trainer(model, 10, compress.PruningAdapterCallback(), tmp_path).train()


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.0}, r"sparsity=1.0: .* in \[0, 1\)"),
    ({"sparsity": 0.0}, "nothing to prune"),
    ({"sparsity": {"ffn": 0.0, "heads": 0.0}}, "nothing to prune"),
    ({"sparsity": {"neurons": 0.5}}, "unknown structure 'neurons'"),
    ({"sparsity": {"ffn": 0.5}, "structures": ["heads"]}, "structures=.*disagrees"),
    ({"sparsity": {"ffn": 0.5, "heads": 0.5, "kv_heads": 0.5}}, "not both"),
    ({"importance": "vibes"}, "importance='vibes': choose one of"),
    ({"sparsity": {"ffn": 0.5, "layers": 0.5}, "importance": "activation"},
     r"^importance='activation': cannot score 'layers': use .*taylor.* to prune 'layers'"),
    ({"schedule": "progressive"}, "pruning_end_step=None: schedule='progressive' needs"),
    ({"schedule": "progressive", "scoring_steps": 8, "pruning_end_step": 8}, "must come after scoring_steps=8"),
    ({"schedule": "weekly"}, "schedule='weekly': choose one of"),
    ({"mode": "sideways"}, "mode='sideways': choose one of"),
    ({"normalize": "zscore"}, "normalize='zscore': choose one of none, mean, l2"),
    ({"distill_weight": -1.0}, r"distill_weight=-1.0: must be a finite number >= 0"),
    ({"sparsity": {"ffn": 0.5, "layers": 0.5}, "distill_weight": 1.0}, "leave 'layers' out of sparsity"),
    ({"distill_weight": 1.0, "quantize_backbone": "8bit"}, "use one or the other"),
    ({"max_keep": 0.4, "mode": "global"}, "set it to at least 0.50"),
    ({"max_keep": 0.75}, "caps per-layer widths in global mode"),
    ({"max_keep": 1.5, "mode": "global"}, r"must be in \(0, 1\]"),
    ({"ema_beta": 1.0}, r"ema_beta=1.0: must be a number in \[0, 1\)"),
    ({"lora_dropout": 1.5}, r"lora_dropout=1.5: must be a number in \[0, 1\)"),
])
def test_bad_configs_fail_clearly(kwargs, match):
    with pytest.raises(CompressError, match=match):
        compress.PruningAdapterConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": "0.5"}, r"^sparsity='0.5': "),
    ({"sparsity": {"ffn": "0.5"}}, r"^sparsity\['ffn'\]='0.5': "),
    ({"sparsity": {"ffn": None}}, r"^sparsity\['ffn'\]=None: "),
    ({"structures": 3}, r"^structures=3"),
    ({"mode": None}, r"^mode=None: "),
    ({"importance": 1}, r"^importance=1: "),
    ({"normalize": ["mean"]}, r"^normalize=\['mean'\]: "),
    ({"max_keep": "0.6", "mode": "global"}, r"^max_keep='0.6': "),
    ({"round_to": 8.0}, r"^round_to=8.0: must be a positive integer"),
    ({"round_to": True}, r"^round_to=True: must be a positive integer"),
    ({"compensate_bias": "yes"}, r"^compensate_bias='yes': must be True or False"),
    ({"schedule": 1}, r"^schedule=1: "),
    ({"scoring_steps": "16"}, r"^scoring_steps='16': must be a positive integer"),
    ({"scoring_steps": 0}, r"^scoring_steps=0: must be a positive integer"),
    ({"schedule": "progressive", "pruning_end_step": 40.0}, r"^pruning_end_step=40.0: must be a positive integer"),
    ({"pruning_interval": None}, r"^pruning_interval=None: must be a positive integer"),
    ({"ema_beta": "0.9"}, r"^ema_beta='0.9': "),
    ({"checkpoint_until_pruned": 1}, r"^checkpoint_until_pruned=1: must be True or False"),
    ({"distill_weight": "1"}, r"^distill_weight='1': "),
    ({"r": "8"}, r"^r='8': must be a positive integer"),
    ({"lora_alpha": "16"}, r"^lora_alpha='16': must be a positive number"),
    ({"lora_dropout": "0.1"}, r"^lora_dropout='0.1': "),
    ({"target_modules": ["query", 3]}, r"^target_modules=\['query', 3\]: 3 is not a module name"),
    ({"target_modules": 3}, r"^target_modules=3: "),
    ({"init_weights": "gaussian"}, r"^init_weights='gaussian': must be True or False"),
    ({"modules_to_save": "classifier"}, r"^modules_to_save='classifier': must be a list"),
    ({"quantize_backbone": 8}, r"^quantize_backbone=8: choose one of 8bit, 4bit or None"),
    ({"pruning_plan": {}}, "pruning_plan must be a list of events"),
])
def test_wrong_types_fail_naming_the_field(kwargs, match):
    """A value of the wrong type (e.g. a string from a JSON or CLI edit) raises an error that names the field, not a
    TypeError from deep inside."""
    with pytest.raises(CompressError, match=match):
        compress.PruningAdapterConfig(**kwargs)


def test_config_takes_every_structure_and_criterion_of_the_vocabulary_as_the_spec_does():
    """Each structure with each registered criterion: the config holds it in its spec where PruningSpec accepts it,
    and refuses it with PruningSpec's own error where PruningSpec does (a structure the criterion cannot score, an
    option the criterion needs)."""
    from compress.pruning.importance import available_importances
    from compress.pruning.spec import STRUCTURES, PruningSpec

    accepted = set()
    for importance in available_importances():
        for structure in STRUCTURES:
            try:
                spec = PruningSpec(sparsity={structure: 0.25}, importance=importance)
            except compress.InvalidOptionError as refused:
                with pytest.raises(compress.InvalidOptionError) as also_refused:
                    compress.PruningAdapterConfig(sparsity={structure: 0.25}, importance=importance)
                assert str(also_refused.value) == str(refused), (importance, structure)
                continue
            config = compress.PruningAdapterConfig(sparsity={structure: 0.25}, importance=importance)
            assert (config.spec.sparsity, config.spec.importance) == (spec.sparsity, importance)
            assert config.structures == [structure]
            accepted.update({importance, structure})
    assert set(STRUCTURES) <= accepted and {"taylor", "fisher", "activation", "magnitude"} <= accepted


def test_config_holds_one_spec_and_saves_it_unambiguously(tmp_path):
    from compress.pruning.spec import PruningSpec

    config = compress.PruningAdapterConfig(sparsity=0.5, structures="ffn,heads", mode="global", normalize="mean",
                                           max_keep=0.75, round_to=2, compensate_bias=True)
    assert config.spec == PruningSpec(sparsity={"ffn": 0.5, "heads": 0.5}, mode="global", importance="taylor",
                                      normalize="mean", max_keep=0.75, round_to=2, compensate_bias=True)
    zero = compress.PruningAdapterConfig(sparsity={"ffn": 0.5, "heads": 0.0, "layers": 0.0})
    assert zero.spec.sparsity == {"ffn": 0.5} and zero.structures == ["ffn"]  # zero: not pruned
    assert compress.PruningAdapterConfig().spec.sparsity == {"ffn": 0.5}  # the default
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["sparsity"] == {"ffn": 0.5, "heads": 0.5} and saved["structures"] == ["ffn", "heads"]
    assert PeftConfig.from_pretrained(tmp_path).spec == config.spec


def test_unexpressible_or_missing_targets_fail_clearly():
    with pytest.raises(UnsupportedStructureError, match="use global mode"):
        _bert_peft(sparsity={"heads": 0.5})  # BERT heads need the compact (global) path
    with pytest.raises(ValueError, match="not_a_layer"):
        _bert_peft(target_modules=["not_a_layer"])


def test_the_config_is_a_lora_config_and_the_layers_peft_lora_layers(tmp_path):
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    config = compress.PruningAdapterConfig(task_type="SEQ_CLS", sparsity=0.5, r=4, lora_alpha=8, use_rslora=True,
                                           lora_dropout=0.1, init_lora_weights=False, rank_pattern={"query": 2})
    assert isinstance(config, LoraConfig)
    model = get_peft_model(tiny.make_model("bert"), config)
    model.base_model.prune(data=tiny.make_batches("bert", 2))
    attention = model.base_model.model.bert.encoder.layer[0].attention
    key, query = attention.self.key, attention.self.query
    assert isinstance(key, LoraLayer) and isinstance(query, LoraLayer)
    assert key.scaling["default"] == 8 / math.sqrt(4) and query.r["default"] == 2  # rsLoRA, rank_pattern
    assert isinstance(key.lora_dropout["default"], torch.nn.Dropout) and key.lora_B["default"].weight.abs().sum() > 0
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(".lora_A." in k for k in saved) and not any(".pa_A." in k or ".pa_B." in k for k in saved)
    reloaded = PeftConfig.from_pretrained(tmp_path)
    assert (reloaded.use_rslora, reloaded.lora_dropout, reloaded.init_lora_weights) == (True, 0.1, False)


@pytest.mark.parametrize("kwargs,match", [
    ({"use_dora": True}, r"^use_dora=True: is a LoRA variant Pruning-Adapter does not support"),
    ({"init_lora_weights": "pissa"}, r"^init_lora_weights='pissa': Pruning-Adapter supports True, False"),
    ({"bias": "all"}, r"^bias='all': is not supported by Pruning-Adapter"),
    ({"fan_in_fan_out": True}, r"^fan_in_fan_out=True: is not supported by Pruning-Adapter: it is for Conv1D"),
    ({"use_rslora": "yes"}, r"^use_rslora='yes': must be True or False"),
])
def test_lora_options_it_cannot_prune_are_refused_by_name(kwargs, match):
    with pytest.raises(CompressError, match=match):
        compress.PruningAdapterConfig(**kwargs)


def test_init_weights_still_works_for_a_release_with_a_warning():
    with pytest.warns(FutureWarning, match="init_weights=.*deprecated.*init_lora_weights"):
        config = compress.PruningAdapterConfig(init_weights=False)
    assert config.init_lora_weights is False and "init_weights" not in config.to_dict()


def test_saved_adapter_folder_is_recognised_as_ours(tmp_path):
    from huggingface_hub.repocard import metadata_load

    model = _bert_peft(sparsity=0.5)
    model.base_model.prune(data=tiny.make_batches("bert", 2))
    model.save_pretrained(tmp_path)
    tags = metadata_load(tmp_path / "README.md")["tags"]
    assert compress.export.TAG in tags and "transformers" in tags  # ours beside peft's own tags
    assert compress.export.is_compress_output(tmp_path)  # ours, yet a model save never replaces it


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_global_mode_merge_reloads_with_from_pretrained(arch, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = get_peft_model(tiny.make_model(arch), compress.PruningAdapterConfig(
        task_type="SEQ_CLS", r=4, sparsity=0.5, mode="global"))  # the classifier is trained in full
    model.base_model.prune(data=tiny.make_batches(arch, 2))
    perturb_adapters(model)
    expected = _logits(model, arch)
    compress.save_pretrained(model.merge_and_unload(), tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(reloaded, arch), expected, rtol=1e-4, atol=1e-5)


def test_reload_onto_wrong_base_fails_clearly(tmp_path):
    model = _bert_peft(sparsity=0.5)
    model.base_model.prune(data=tiny.make_batches("bert", 2))
    model.save_pretrained(tmp_path)
    other = tiny.make_model("bert")
    compress.prune_model(other, 0.25, ("ffn",), "magnitude")
    with pytest.raises(CompressError, match="base model it was created from"):
        PeftModel.from_pretrained(other, tmp_path)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_backbone_trains_reloads_and_merges(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import bnb as lora_bnb

    peft_class = {"8bit": lora_bnb.Linear8bitLt, "4bit": lora_bnb.Linear4bit}[bits]
    model = _bert_peft(sparsity=0.5, quantize_backbone=bits)
    model.base_model.prune(data=tiny.make_batches("bert", 2))
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert query.quantized and isinstance(query, peft_class)  # peft's bitsandbytes LoRA layer, pruning added
    _logits(model)  # an eval forward under no_grad first: gradients must still reach early adapters after it
    model.train()
    a0, b0 = query.lora_A["default"].weight, query.lora_B["default"].weight
    before = a0.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in tiny.make_batches("bert", 3):
        model(**batch).loss.backward()
        # the first block's adapter sees the loss only through every quantised layer above it
        assert b0.grad is not None and b0.grad.abs().sum() > 0, "no gradient through the quantised layers"
        opt.step()
        opt.zero_grad()
    assert not torch.equal(a0.detach(), before)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny.make_model("bert"), tmp_path)
    assert isinstance(reloaded.base_model.model.bert.encoder.layer[0].attention.self.query, peft_class)
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-5)
    merged = model.merge_and_unload()
    assert type(merged.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=5e-2)


def test_quantising_after_the_final_event_keeps_the_optimizers_adapter_parameters():
    pytest.importorskip("bitsandbytes")
    model = _bert_peft(sparsity=0.5, quantize_backbone="8bit")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.base_model.prune(data=tiny.make_batches("bert", 2), optimizer=optimizer)
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert query.quantized
    live = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == live
    before = query.lora_A["default"].weight.detach().clone()
    model.train()
    model(**tiny.make_batch("bert")).loss.backward()
    optimizer.step()
    assert not torch.equal(query.lora_A["default"].weight, before)


def test_bad_quantization_setting_fails_clearly():
    with pytest.raises(CompressError, match="quantize_backbone"):
        compress.PruningAdapterConfig(quantize_backbone="3bit")


def test_quantised_base_model_is_refused_with_the_way_out():
    pytest.importorskip("bitsandbytes")
    from compress.plugins.pruning_adapter.layer import quantize_linear

    base = tiny.make_model("bert")
    attention = base.bert.encoder.layer[0].attention.self
    attention.query = quantize_linear(attention.query, "8bit")  # as a model loaded with load_in_8bit has it
    with pytest.raises(CompressError, match="load the base model unquantised"):
        get_peft_model(base, compress.PruningAdapterConfig(task_type="SEQ_CLS", r=4))


def test_quantization_on_unsupported_backend_fails_clearly(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    from compress.plugins.pruning_adapter.layer import quantize_linear

    def no_backend(self, *args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bnb.nn.Linear8bitLt, "to", no_backend)
    with pytest.raises(CompressError, match="cannot quantise to 8bit on cpu.*no kernel"):
        quantize_linear(torch.nn.Linear(8, 4), "8bit")


def test_apply_pruning_adapter_prunes_in_one_call():
    config = compress.PruningAdapterConfig(task_type="SEQ_CLS", sparsity=0.5, r=4)
    model = compress.apply_pruning_adapter(tiny.make_model("bert"), config, data=tiny.make_batches("bert", 2))
    assert model.base_model.pruning_finished
    assert arch_spec(model.base_model.model).widths()["ffn"] == [32, 32]
    lazy = compress.apply_pruning_adapter(tiny.make_model("bert"), compress.PruningAdapterConfig(
        task_type="SEQ_CLS", sparsity=0.5, r=4))  # taylor without data: left to the callback
    assert not lazy.base_model.pruning_finished
    data_free = compress.apply_pruning_adapter(tiny.make_model("bert"), compress.PruningAdapterConfig(
        task_type="SEQ_CLS", sparsity=0.5, importance="l1", r=4))  # magnitude criteria prune at once
    assert data_free.base_model.pruning_finished


def test_layernorms_in_modules_to_save_train_and_merge():
    model = _bert_peft(sparsity={"ffn": 0.5, "heads": 0.5}, mode="global", modules_to_save=["LayerNorm"])
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "LayerNorm" in n and p.requires_grad}
    assert norms  # peft made trainable copies of every LayerNorm
    model.base_model.prune(data=tiny.make_batches("bert", 2))
    assert all(torch.equal(p, norms[n]) for n, p in model.named_parameters() if n in norms)  # scoring: gates only
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**tiny.make_batch("bert")).loss.backward()
    optimizer.step()
    assert any(not torch.equal(p, norms[n]) for n, p in model.named_parameters() if n in norms)
    expected = _logits(model)
    torch.testing.assert_close(_logits(copy.deepcopy(model).merge_and_unload()), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,targets,sparsity", [
    ("llama", ["down_proj"], {"ffn": 0.5}),
    ("bert", ["output.dense"], {"ffn": 0.5}),
    ("bert", ["attention.output.dense"], {"ffn": 0.5, "heads": 0.5}),
])
def test_adapters_on_output_projections_only_prune_train_reload_and_merge(arch, targets, sparsity, tmp_path):
    task = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM"}[arch]
    config = compress.PruningAdapterConfig(task_type=task, r=4, sparsity=sparsity, target_modules=targets,
                                           mode="global" if "heads" in sparsity else "uniform")
    model = get_peft_model(tiny.make_model(arch), config)
    model.base_model.prune(data=tiny.make_batches(arch, 2))
    widths = arch_spec(model.base_model.model).widths()
    assert sum(widths["ffn"]) == 64
    if "heads" in sparsity:
        assert sum(widths["heads"]) == 4
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**tiny.make_batch(arch)).loss.backward()
    optimizer.step()
    expected = _logits(model, arch)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny.make_model(arch), tmp_path)
    torch.testing.assert_close(_logits(reloaded, arch), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model.merge_and_unload(), arch), expected, rtol=0, atol=1e-5)


def _without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_distillation_adds_the_masked_hidden_state_error_against_a_weight_sharing_teacher(tmp_path):
    from safetensors.torch import load_file

    from compress.pruning.distill import hidden_states_of

    base = _without_dropout(tiny.make_model("bert"))
    original = {n: p.data_ptr() for n, p in base.named_parameters()}
    model = get_peft_model(base, compress.PruningAdapterConfig(
        task_type="SEQ_CLS", r=4, sparsity={"ffn": 0.5, "heads": 0.5}, mode="global", distill_weight=100.0))
    tuner = model.base_model
    teacher = tuner.distillation.teacher
    # the teacher is the dense original, in the same memory, and outside the module tree
    assert {n: p.data_ptr() for n, p in teacher.named_parameters()} == original
    assert not any(p.requires_grad for p in teacher.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tuner.model.parameters())
    batch = tiny.make_batch("bert")
    batch["attention_mask"][0, -3:] = 0  # padding must not count

    def train_and_eval_loss():
        model.train()
        trained = model(**batch)
        model.eval()
        with torch.no_grad():
            plain = model(**batch, output_hidden_states=True)
        return trained, plain

    trained, plain = train_and_eval_loss()
    torch.testing.assert_close(trained.loss, plain.loss)  # unpruned, zero-init adapters: student == teacher
    tuner.prune(data=tiny.make_batches("bert", 2))
    perturb_adapters(model)  # trained-looking adapters: larger, position-dependent differences
    trained, plain = train_and_eval_loss()
    with torch.no_grad():
        target = hidden_states_of(teacher(**batch, output_hidden_states=True))
    mask = batch["attention_mask"].float()
    errors = [((s - t).pow(2).mean(-1) * mask).sum() / mask.sum() for s, t in zip(hidden_states_of(plain), target)]
    distill = torch.stack(errors).mean()
    assert distill > 1e-6
    torch.testing.assert_close(trained.loss, plain.loss + 100.0 * distill)
    assert "hidden_states" not in trained  # only returned when asked for

    trained.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
    model.zero_grad()

    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all(".lora_" in k or "pa_" in k or "classifier" in k for k in saved)  # nothing of the teacher
    reloaded = PeftModel.from_pretrained(tiny.make_model("bert"), tmp_path / "adapter")
    assert reloaded.base_model.distillation is None  # inference: no teacher
    model.merge_and_unload()
    assert tuner.distillation.teacher is None  # merging writes into weights the teacher shared


def test_distillation_with_hidden_pruning_compares_the_kept_channels():
    from compress.pruning.distill import hidden_states_of

    kept_hidden_channels = compress.METHODS["PRUNING_ADAPTER"].plan.kept_hidden_channels
    events = [{"removed": {"hidden": [0, 5]}}, {"removed": {"ffn": [1]}}, {"removed": {"hidden": [0, 2]}}]
    assert kept_hidden_channels(events, 8) == [2, 4, 6, 7]  # indices count what the events before left
    base = _without_dropout(tiny.make_model("llama"))
    model = get_peft_model(base, compress.PruningAdapterConfig(
        task_type="CAUSAL_LM", r=4, sparsity={"hidden": 0.25, "ffn": 0.5}, distill_weight=10.0))
    tuner = model.base_model
    teacher = tuner.distillation.teacher
    tuner.prune(data=tiny.make_batches("llama", 2))
    perturb_adapters(model)
    batch = tiny.make_batch("llama")
    model.train()
    trained = model(**batch)
    model.eval()
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True)
        target = hidden_states_of(teacher(**batch, output_hidden_states=True))
    kept = kept_hidden_channels(tuner.active_config.pruning_plan, 32)
    assert len(kept) == 24 and hidden_states_of(plain)[0].shape[-1] == 24
    errors = [(s - t[..., kept]).pow(2).mean() for s, t in zip(hidden_states_of(plain), target)]
    torch.testing.assert_close(trained.loss, plain.loss + 10.0 * torch.stack(errors).mean())


@pytest.mark.slow  # Trainer runs of more than a second
def test_distillation_under_trainer_with_progressive_pruning(tmp_path):
    model = _bert_peft(sparsity={"ffn": 0.5, "heads": 0.5}, mode="global", schedule="progressive",
                       scoring_steps=2, pruning_interval=2, pruning_end_step=4, distill_weight=1.0)
    callback = compress.PruningAdapterCallback()
    trainer = _trainer(model, 6, callback, tmp_path)
    trainer.train()
    assert [e["step"] for e in callback.events] == [2, 4]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert model.base_model.distillation.teacher is not None
    # the same run without distillation: the same task loss at step 1, to which distillation adds (dropout
    # alone makes the training student differ from the eval-mode teacher); different training after that
    plain = _bert_peft(sparsity={"ffn": 0.5, "heads": 0.5}, mode="global", schedule="progressive",
                       scoring_steps=2, pruning_interval=2, pruning_end_step=4)
    plain_trainer = _trainer(plain, 6, compress.PruningAdapterCallback(), tmp_path / "plain")
    plain_trainer.train()
    plain_losses = [h["loss"] for h in plain_trainer.state.log_history if "loss" in h]
    assert losses[0] > plain_losses[0]
    assert losses[2:] != pytest.approx(plain_losses[2:])


def test_distillation_teacher_follows_the_student_without_a_second_copy():
    model = _bert_peft(sparsity={"ffn": 0.5, "heads": 0.5}, mode="global", importance="magnitude",
                       distill_weight=1.0)
    tuner, batch = model.base_model, tiny.make_batch("bert")
    teacher = tuner.distillation.teacher
    model.train()

    def shared() -> int:
        ptrs = {p.data_ptr() for p in model.parameters()}
        return sum(p.data_ptr() in ptrs for p in teacher.parameters())

    everything = len(list(teacher.parameters()))
    assert shared() == everything
    model.to(torch.float64)  # new tensors for the student; the teacher follows at its next forward
    model(**batch).loss.backward()
    assert shared() == everything and {p.dtype for p in teacher.parameters()} == {torch.float64}
    tuner.prune()
    model.to(torch.float32)
    model(**batch).loss.backward()
    # pruned layers: the teacher keeps (and casts) its dense originals; everything else is still shared
    assert 0 < shared() < everything and {p.dtype for p in teacher.parameters()} == {torch.float32}


def test_distillation_that_cannot_apply_warns_once(caplog):
    model = _bert_peft(sparsity=0.5, distill_weight=1.0)
    model.train()
    batch = tiny.make_batch("bert")
    with caplog.at_level("WARNING"):
        out = model(**batch, return_dict=False)
        model(**{k: v for k, v in batch.items() if k != "labels"})
    assert len(out) == 2  # loss and logits: no hidden states forced into the tuple
    warnings = [r.message for r in caplog.records if "distill_weight=1.0 is set" in r.message]
    assert len(warnings) == 1 and "return_dict=False" in warnings[0]


def test_hidden_state_loss_masks_padding_and_checks_alignment():
    from compress.pruning.distill import hidden_state_loss

    teacher = [torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)]
    student = [torch.ones(2, 3, 4), torch.full((2, 3, 4), 3.0)]
    student[0][1, 2] = 100.0  # a padding position: must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(hidden_state_loss(student, teacher, mask), torch.tensor((1.0 + 9.0) / 2))
    assert hidden_state_loss(student, teacher) > 100  # unmasked, the padding position dominates
    decoder = [torch.ones(2, 5, 4)]  # another length than the mask: averaged over every position
    torch.testing.assert_close(hidden_state_loss(decoder, [torch.zeros(2, 5, 4)], mask), torch.tensor(1.0))
    # one mask (or None) per state: a decoder state of the encoder's length without a mask is not masked
    torch.testing.assert_close(hidden_state_loss(student[:1], teacher[:1], [None]), torch.tensor((5 + 1e4) / 6))
    torch.testing.assert_close(hidden_state_loss(student[:1], teacher[:1], [mask]), torch.tensor(1.0))
    with pytest.raises(CompressError, match="got 1 masks for 2 hidden states"):
        hidden_state_loss(student, teacher, [mask])
    with pytest.raises(CompressError, match="same number of hidden states"):
        hidden_state_loss(student, teacher[:1])
    with pytest.raises(CompressError, match="differ in shape"):
        hidden_state_loss([torch.ones(2, 3, 4)], [torch.ones(2, 3, 5)])


def test_the_modules_of_the_method_import_each_other_without_a_cycle():
    """The model applies what the pruning and schedule modules plan: neither imports the model back (not even for
    type checking)."""
    import ast
    from pathlib import Path

    folder = Path(compress.__file__).resolve().parent.parent / "plugins" / "pruning_adapter"
    modules = {path.stem: path for path in folder.glob("*.py") if path.stem != "__init__"}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [alias.name for alias in node.names]
                found.update(target.split(".")[0] for target in targets)
        imports[name] = found & set(modules)

    def cycle_from(name, path):
        for other in sorted(imports[name]):
            if other in path:
                return [*path[path.index(other):], other]
            found = cycle_from(other, [*path, other])
            if found:
                return found
        return None

    cycles = [c for c in (cycle_from(name, [name]) for name in sorted(modules)) if c]
    assert not cycles, cycles[0]
