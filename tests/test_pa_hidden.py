"""Pruning-Adapter with hidden-size (residual-stream) pruning: every tensor on the stream shrinks, peft's
modules_to_save copies and the adapters included; the optimizer follows; the adapter reloads and merges."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from compress.plugins.pruning_adapter import PruningAdapterLayer
from compress.plugins.pruning_adapter.plan import check_plan
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForQuestionAnswering,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import compress
from compress.errors import CompressError, UnsupportedStructureError
from compress.pruning.arch import arch_spec
from compress.pruning.importance import units_for
from compress.pruning.surgery import apply_removals
from tests import tiny
from tests.methods import TASK, logits, perturb_adapters

AUTO = {"bert": AutoModelForSequenceClassification, "roberta": AutoModelForSequenceClassification,
        "llama": AutoModelForCausalLM, "qwen2": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM}
#: BERT/RoBERTa derive the head size from the hidden size: hidden pruning needs their compact (global) classes
MODE = {"bert": "global", "roberta": "global", "llama": "uniform", "qwen2": "uniform", "t5": "uniform"}
#: peft's wrappers in parameter names, and what the parameter is called in the plain model
_WRAPPERS = (".base_layer", ".original_module", ".modules_to_save.default")


pytestmark = pytest.mark.usefixtures("one_thread")


def _peft(arch: str, **kwargs):
    # the recipe trains the LayerNorms; SEQ_CLS adds the classifier (RoBERTa's reads the stream) to modules_to_save
    extra = {"modules_to_save": ["LayerNorm"]} if arch in ("bert", "roberta") else {}
    config = compress.PruningAdapterConfig(task_type=TASK[arch], r=4, mode=MODE[arch], **{**extra, **kwargs})
    return get_peft_model(tiny.make_model(arch), config)


def _plain_pruned(arch: str, plan: list[dict]):
    """The base model pruned by the plan's events with the engine alone (no peft)."""
    model = tiny.make_model(arch)
    for event in plan:
        arch_ = arch_spec(model)
        apply_removals(model, arch_, units_for(arch_, event["structures"]), event["removed"])
    return model


def _assert_shapes_follow_the_plain_pruned_model(peft_model, arch: str) -> None:
    """Every parameter of the adapted model (originals and trained copies of modules_to_save, base layers) has the
    shape of the same parameter of the plain model pruned alike; the adapter matrices fit their base layers."""
    plain = _plain_pruned(arch, peft_model.peft_config["default"].pruning_plan)
    expected = {name: p.shape for name, p in plain.named_parameters(remove_duplicate=False)}
    checked = set()
    for name, param in peft_model.named_parameters(remove_duplicate=False):
        if ".lora_" in name:
            continue
        plain_name = name.removeprefix("base_model.model.")
        for wrapper in _WRAPPERS:
            plain_name = plain_name.replace(wrapper, "")
        assert param.shape == expected[plain_name], (name, tuple(param.shape), tuple(expected[plain_name]))
        checked.add(name)
    if arch in ("bert", "roberta"):  # the original LayerNorms and their trained copies were both checked
        assert any(".original_module." in n and "LayerNorm" in n for n in checked)
        assert any(".modules_to_save.default." in n and "LayerNorm" in n for n in checked)
    layers = [m for m in peft_model.modules() if isinstance(m, PruningAdapterLayer)]
    assert layers
    for layer in layers:
        base = layer.get_base_layer()
        assert layer.lora_A["default"].in_features == base.in_features == layer.in_features
        assert layer.lora_B["default"].out_features == base.out_features == layer.out_features


def _hidden_width(model) -> int:
    return arch_spec(model).hidden_site().width


def _train(model, arch: str, optimizer, steps: int = 2) -> None:
    model.train()
    for batch in tiny.make_batches(arch, steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_oneshot_shrinks_every_stream_tensor_trains_reloads_and_merges(arch, tmp_path):
    model = _peft(arch, sparsity={"hidden": 0.25, "ffn": 0.5})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    event = model.base_model.prune(data=tiny.make_batches(arch, 2))
    assert event["widths_after"]["hidden"] == [24] and len(event["removed"]["hidden"]) == 8
    _assert_shapes_follow_the_plain_pruned_model(model, arch)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable  # the backbone stays frozen
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, arch, optimizer)
    perturb_adapters(model)
    expected = logits(model, arch)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny.make_model(arch), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, arch), expected, rtol=0, atol=1e-6)

    merged = model.merge_and_unload()
    assert _hidden_width(merged) == 24
    torch.testing.assert_close(logits(merged, arch), expected, rtol=1e-4, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = AUTO[arch].from_pretrained(tmp_path / "merged")
    if MODE[arch] == "global":  # a compact class, registered by `import compress`
        assert again.config.model_type == f"compressed_{arch}"
    else:  # a plain transformers folder
        assert again.config.model_type == arch and not hasattr(again.config, "compress_shapes")
    torch.testing.assert_close(logits(again, arch), expected, rtol=1e-4, atol=1e-5)


def test_optimizer_state_of_every_pruned_parameter_is_the_sliced_old_state():
    """Adapter matrices (reading and writing the stream) and peft's trained copies of the LayerNorms and of
    RoBERTa's classifier lose the same hidden channels in the optimizer's state."""
    model = _peft("roberta", sparsity={"hidden": 0.25})
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    _train(model, "roberta", optimizer)
    before = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in trainable.items()}
    event = model.base_model.prune(data=tiny.make_batches("roberta", 2), optimizer=optimizer)
    keep = torch.tensor([c for c in range(32) if c not in event["removed"]["hidden"]])
    now = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(now) == set(trainable)
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(now[n]) for n in trainable]
    sliced = {}
    for name, param in now.items():
        old = before[name]
        dims = [d for d in range(param.dim()) if param.shape[d] != old["exp_avg"].shape[d]]
        for key in ("exp_avg", "exp_avg_sq"):
            expected = old[key].index_select(dims[0], keep) if dims else old[key]
            torch.testing.assert_close(optimizer.state[param][key], expected, rtol=0, atol=0)
        assert torch.equal(optimizer.state[param]["step"], old["step"])
        sliced[name] = dims
    prefix = "base_model.model."
    for name, dim in {
        "roberta.embeddings.LayerNorm.modules_to_save.default.weight": 0,
        "roberta.encoder.layer.0.attention.self.query.lora_A.default.weight": 1,
        "roberta.encoder.layer.0.attention.output.dense.lora_B.default.weight": 0,
        "roberta.encoder.layer.1.output.dense.lora_B.default.weight": 0,
        "classifier.modules_to_save.default.dense.weight": 1,
    }.items():
        assert sliced[prefix + name] == [dim], name
    _train(model, "roberta", optimizer)  # training continues with the same optimizer


class _OptimizerStates(TrainerCallback):
    """The optimizer's state by parameter name at the end of every step (before or after the pruning callback)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        self.states[state.global_step] = {n: {k: v.clone() for k, v in inner.state[p].items()}
                                          for n, p in model.named_parameters() if p in inner.state}


def _rows(arch: str) -> Dataset:
    batches = tiny.make_batches(arch, 4, batch_size=4)
    return Dataset.from_list([{k: v[i].tolist() for k, v in b.items()} for b in batches for i in range(4)])


@pytest.mark.parametrize("arch", ["roberta", "llama"])
def test_progressive_hidden_events_under_trainer_keep_the_optimizer(arch, tmp_path):
    model = _peft(arch, sparsity={"hidden": 0.25}, schedule="progressive", scoring_steps=2, pruning_interval=2,
                  pruning_end_step=4)
    before, after = _OptimizerStates(), _OptimizerStates()
    pruning = compress.PruningAdapterCallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="no", report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_rows(arch), callbacks=[before, pruning, after])
    trainer.train()

    assert [e["step"] for e in pruning.events] == [2, 4]
    assert [e["widths_after"]["hidden"] for e in pruning.events] == [[25], [24]]  # the cubic schedule, then final
    assert _hidden_width(model.base_model.model) == 24 and model.base_model.pruning_finished
    _assert_shapes_follow_the_plain_pruned_model(model, arch)
    for event in pruning.events:
        width = event["widths_before"]["hidden"][0]
        keep = torch.tensor([c for c in range(width) if c not in event["removed"]["hidden"]])
        old, new = before.states[event["step"]], after.states[event["step"]]
        assert set(new) == set(old)
        stream = 0
        for name, state in new.items():
            exp_avg, old_exp_avg = state["exp_avg"], old[name]["exp_avg"]
            dims = [d for d in range(exp_avg.dim()) if exp_avg.shape[d] != old_exp_avg.shape[d]]
            stream += bool(dims)
            expected = old_exp_avg.index_select(dims[0], keep) if dims else old_exp_avg
            torch.testing.assert_close(exp_avg, expected, rtol=0, atol=0)
        assert stream >= 14  # at least the 5 reading and 2 writing adapters of each of the 2 layers
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def test_bert_hidden_needs_global_mode_and_a_known_task_head():
    with pytest.raises(UnsupportedStructureError, match="pruning 'hidden' in uniform mode.*use global mode"):
        get_peft_model(tiny.make_model("bert"), compress.PruningAdapterConfig(
            task_type="SEQ_CLS", sparsity={"hidden": 0.25}))
    torch.manual_seed(0)
    qa = BertForQuestionAnswering(BertConfig(vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64))
    # refused when the adapter is created, not at the first pruning event during training
    with pytest.raises(CompressError, match=r"hidden: the dependency graph .* also couples \['qa_outputs'\]"):
        get_peft_model(qa, compress.PruningAdapterConfig(task_type="QUESTION_ANS", sparsity={"hidden": 0.25},
                                                         mode="global"))


# -- the plan: hidden events are checked like the others ------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple:
    """A BERT adapter pruned (hidden 25%, FFN 50%) and saved: its folder and logits."""
    model = _peft("bert", sparsity={"hidden": 0.25, "ffn": 0.5})
    model.base_model.prune(data=tiny.make_batches("bert", 2))
    perturb_adapters(model)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return folder, logits(model, "bert")


def _edited(saved, tmp_path, edit):
    folder = tmp_path / "adapter"
    shutil.copytree(saved[0], folder)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config["pruning_plan"][0])
    path.write_text(json.dumps(config))
    return folder


def _set(field: str, key: str, value):
    def edit(event):
        event[field][key] = value
    return edit


@pytest.mark.parametrize("edit,match", [
    (lambda e: e["removed"]["hidden"].__setitem__(0, 32), r"'removed'\['hidden'\]: index 32 is out of range: the "
                                                          r"unit has 32 hidden channels"),
    (_set("removed", "hidden", list(range(32))), r"'removed'\['hidden'\]: removes all 32 hidden channels"),
    (_set("widths_after", "hidden", [25]), r"field 'widths_after': replaying the event gives widths"),
    (_set("widths_after", "hidden", [24, 24]), r"'widths_after'\['hidden'\]: the hidden size is one number"),
    (lambda e: [e[f].pop("hidden") for f in ("widths_before", "widths_after")],
     r"field 'widths_before': an event that prunes 'hidden' records the hidden size"),
    (lambda e: e["widths_after"].pop("hidden"), r"field 'widths_after': an event that prunes 'hidden' records"),
    (lambda e: e["structures"].remove("hidden"), r"'removed'\['hidden'\]: no unit of \['ffn'\] is called 'hidden'"),
], ids=["out-of-range", "all", "widths_after", "two-sizes", "no-hidden-width",
        "no-hidden-width-after", "structure"])
def test_edited_hidden_event_fails_loading_with_one_clear_error(saved, tmp_path, edit, match):
    folder = _edited(saved, tmp_path, edit)
    with pytest.raises(CompressError, match=match) as info:
        PeftModel.from_pretrained(tiny.make_model("bert"), folder)
    assert "must not be edited" in str(info.value)


def test_untouched_hidden_plan_reloads(saved, tmp_path):
    reloaded = PeftModel.from_pretrained(tiny.make_model("bert"), _edited(saved, tmp_path, lambda e: None))
    torch.testing.assert_close(logits(reloaded, "bert"), saved[1], rtol=0, atol=0)


def test_a_plan_records_the_hidden_size_in_every_event_or_in_none(saved):
    (first,) = json.loads((saved[0] / "adapter_config.json").read_text())["pruning_plan"]
    later = json.loads(json.dumps(first))
    later["structures"] = ["ffn"]
    later["removed"] = {k: v for k, v in later["removed"].items() if k != "hidden"}
    later["widths_before"] = later["widths_after"]
    check_plan([{**first, "final": False}, later])  # an event that prunes only FFN neurons still records the size
    for field in ("widths_before", "widths_after"):
        later[field] = {k: v for k, v in later[field].items() if k != "hidden"}
    with pytest.raises(CompressError, match=r"pruning_plan\[1\], field 'widths_before': every event of a plan "
                                            "records the hidden size, or none does"):
        check_plan([{**first, "final": False}, later])
