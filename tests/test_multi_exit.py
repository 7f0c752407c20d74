"""Multi-exit models: exits, joint loss, early exit with a shrinking batch, calibration, saving and serving."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from compress.plugins.multi_exit import MultiExitForSequenceClassification
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    Trainer,
    TrainingArguments,
    pipeline,
)

import compress
from compress.pruning.spec import InvalidOptionError
from tests import tiny
from tests.test_train import make_dataset, make_tokenizer

LAYERS = 4


def make_encoder(arch: str = "bert", seed: int = 0, num_labels: int = 3):
    """A 4-block random classifier (more blocks than tiny.make_model, so exits sit at several depths)."""
    torch.manual_seed(seed)
    common = {"vocab_size": tiny.VOCAB, "hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
              "intermediate_size": 64, "num_labels": num_labels}
    if arch == "bert":
        return BertForSequenceClassification(BertConfig(max_position_embeddings=64, **common)).eval()
    if arch == "llama":  # the decoder's own head reads the last real token (found by pad_token_id)
        return LlamaForSequenceClassification(LlamaConfig(max_position_embeddings=64, num_key_value_heads=2,
                                                          head_dim=8, pad_token_id=0, **common)).eval()
    if arch == "qwen2":
        return Qwen2ForSequenceClassification(Qwen2Config(max_position_embeddings=64, num_key_value_heads=2,
                                                          pad_token_id=0, **common)).eval()
    return RobertaForSequenceClassification(RobertaConfig(max_position_embeddings=70, pad_token_id=1,
                                                          bos_token_id=0, eos_token_id=2, **common)).eval()


def wrap(arch: str = "bert", **kwargs):
    """The wrapped 4-block model with random exit heads (distinct from the model's own head)."""
    model = get_peft_model(make_encoder(arch), compress.MultiExitConfig(task_type="SEQ_CLS", **kwargs))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.base_model.exit_layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def padded_batch(n: int = 6, seed: int = 3, labels: bool = False) -> dict:
    """Rows of different lengths (right padding), so per-example masks matter when rows leave."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tiny.VOCAB, (n, 10), generator=g)
    mask = torch.ones_like(ids)
    for row in range(n):
        mask[row, 10 - row % 5:] = 0
    ids[mask == 0] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels:
        batch["labels"] = torch.randint(0, 3, (n,), generator=g)
    return batch


def config_of(model):
    return model.peft_config["default"]


def every_exit(model, batch) -> list[torch.Tensor]:
    saved, config_of(model).exit_threshold = config_of(model).exit_threshold, None
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    config_of(model).exit_threshold = saved
    return list(out.exit_logits)


def early(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch)


def test_every_exit_produces_logits_and_the_loss_uses_all_of_them():
    model = wrap(exit_layers=[0, 2])
    model.train()
    batch = padded_batch(labels=True)
    out = model(**batch)
    assert len(out.exit_logits) == 3  # blocks 0 and 2, then the model's own head after block 3
    assert all(logits.shape == (6, 3) for logits in out.exit_logits)
    torch.testing.assert_close(out.logits, out.exit_logits[-1])
    ce = [torch.nn.functional.cross_entropy(logits, batch["labels"]) for logits in out.exit_logits]
    expected = (1 * ce[0] + 3 * ce[1] + 4 * ce[2]) / 8  # linear weights: block index + 1
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    heads = model.base_model.exit_layer.exit_heads["default"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    assert model.base_model.model.bert.embeddings.word_embeddings.weight.grad is not None  # joint training


@pytest.mark.parametrize(("policy", "first", "last"), [
    ("entropy", math.inf, 0.0), ("max_prob", 0.0, 1.0), ("patience", 0, math.inf)])
def test_extreme_thresholds_give_first_and_last_exit_exactly(policy, first, last):
    model = wrap(exit_policy=policy)
    batch = padded_batch()
    exits = every_exit(model, batch)
    config_of(model).exit_threshold = first
    out = early(model, batch)
    assert out.exit_layers.tolist() == [0] * 6
    torch.testing.assert_close(out.logits, exits[0], rtol=0, atol=1e-6)
    config_of(model).exit_threshold = last
    out = early(model, batch)
    assert out.exit_layers.tolist() == [LAYERS - 1] * 6
    torch.testing.assert_close(out.logits, exits[-1], rtol=0, atol=1e-6)


def _center_exit_heads(model, batch: dict) -> None:
    """Make each exit head's dense layer read its pooled input minus the batch mean: a random model's pooled
    states share a large common part, which would give every row the same prediction."""
    model.eval()
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
        for k, head in enumerate(model.base_model.exit_layer.exit_heads["default"]):
            pooled = head.pool(hidden[k + 1], batch["attention_mask"])
            first = head.dense if head.dense is not None else head.out  # a decoder's pooled head has no dense
            first.weight.mul_(4 / pooled.std(0).mean())
            if first.bias is not None:
                first.bias.copy_(-(pooled @ first.weight.T).mean(0))


def _splitting_threshold(policy: str, exits: list[torch.Tensor]) -> float:
    """A threshold under which some rows of the batch leave early and others do not."""
    if policy == "entropy":
        return float(torch.quantile(_entropy(torch.cat(exits[:-1])), 0.4))
    simulate = compress.METHODS["MULTI_EXIT"].simulate_exits
    return next(t for t in range(len(exits)) if len(set(simulate(exits, policy, t).tolist())) > 1)


@pytest.mark.parametrize("arch", ["bert", "roberta", "llama"])
@pytest.mark.parametrize("policy", ["entropy", "patience"])
@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_removing_exited_rows_leaves_the_others_predictions_unchanged(arch, policy, pooling):
    model = wrap(arch, exit_policy=policy, exit_pooling=pooling)
    batch = padded_batch(n=8)
    _center_exit_heads(model, batch)
    exits = every_exit(model, batch)
    config_of(model).exit_threshold = _splitting_threshold(policy, exits)
    out = early(model, batch)
    layers = out.exit_layers.tolist()
    assert len(set(layers)) > 1, f"the threshold should split the batch: {layers}"
    for row in range(8):
        alone = early(model, {k: v[row:row + 1] for k, v in batch.items()})
        assert alone.exit_layers.tolist() == [layers[row]]
        torch.testing.assert_close(out.logits[row:row + 1], alone.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits[row], exits[layers[row]][row], rtol=1e-5, atol=1e-5)


def test_mean_pooling_reads_the_real_tokens_only():
    head = compress.METHODS["MULTI_EXIT"].ExitHead(8, 2, "pooled", pooling="mean").eval()
    hidden = torch.randn(1, 5, 8)
    padded = torch.cat([hidden, torch.randn(1, 3, 8)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    torch.testing.assert_close(head(padded, mask), head(hidden))
    assert not torch.allclose(head(padded), head(hidden))


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def test_later_blocks_run_only_on_the_rows_still_running():
    model = wrap(exit_policy="patience", exit_threshold=1)
    seen = []
    blocks = model.base_model.model.bert.encoder.layer
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0])) for b in blocks]
    out = early(model, padded_batch(n=8))
    for handle in handles:
        handle.remove()
    running = [int((out.exit_layers >= b).sum()) for b in range(LAYERS)]
    assert seen == running and running[-1] < running[0]


def test_calibration_meets_its_target_and_matches_running_with_the_threshold():
    model = wrap(exit_layers=[0, 1, 2])
    rows = [padded_batch(n=8, seed=s, labels=True) for s in range(4)]
    data = Dataset.from_dict({k: torch.cat([b[k] for b in rows]).tolist() for k in rows[0]})
    choice = compress.calibrate_exit_threshold(model, data, target_speedup=1.5, batch_size=8)
    assert choice.speedup >= 1.5 and config_of(model).exit_threshold == choice.threshold
    assert any(c["speedup"] >= 1.5 and c["accuracy"] <= choice.accuracy for c in choice.candidates)
    layers = torch.cat([early(model, {k: v for k, v in b.items() if k != "labels"}).exit_layers for b in rows])
    assert (layers + 1).float().mean().item() == pytest.approx(choice.mean_blocks)
    kept = compress.calibrate_exit_threshold(model, data, target_accuracy_drop=0.0, batch_size=8)
    assert kept.accuracy >= kept.full_accuracy
    with pytest.raises(compress.CompressError, match="exactly one"):
        compress.calibrate_exit_threshold(model, data, batch_size=8)
    with pytest.raises(compress.CompressError, match="no threshold reaches"):
        compress.calibrate_exit_threshold(model, data, target_speedup=10.0, batch_size=8)


def test_distillation_needs_a_teacher_and_uses_its_logits_without_training_it():
    model = wrap(distill_weight=0.5, distill_temperature=2.0, distill_hidden_weight=0.1)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # two training forwards below must agree
    batch = padded_batch(labels=True)
    model.train()
    with pytest.raises(compress.CompressError, match="set_teacher"):
        model(**batch)
    teacher = make_encoder(seed=7)
    model.base_model.set_teacher(teacher)
    out = model(**batch)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    with torch.no_grad():
        reference = teacher(**batch, output_hidden_states=True)
    kd = [torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.log_softmax(reference.logits / 2, -1),
                                     reduction="batchmean", log_target=True) * 4 for s in out.exit_logits]
    ce = [torch.nn.functional.cross_entropy(s, batch["labels"]) for s in out.exit_logits]
    weights = [1, 2, 3, 4]
    logits_part = sum(w * (0.5 * c + 0.5 * k) for w, c, k in zip(weights, ce, kd)) / 10
    assert out.loss.item() > logits_part.item()  # plus the hidden-state term
    model.peft_config["default"].distill_hidden_weight = 0.0
    torch.testing.assert_close(model(**batch).loss, logits_part, rtol=1e-5, atol=1e-6)


def test_trained_backbone_saves_and_reloads_with_the_exits(tmp_path):
    model = wrap(exit_policy="patience", exit_threshold=1)
    with torch.no_grad():  # a trained backbone: the reload must take it from the adapter, not the base model
        model.base_model.model.bert.encoder.layer[1].intermediate.dense.weight.mul_(1.5)
    batch = padded_batch()
    expected = early(model, batch)
    model.save_pretrained(tmp_path)
    base = make_encoder()
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, model.base_model.model(**batch).logits)
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    again = early(reloaded, batch)
    torch.testing.assert_close(again.logits, expected.logits, rtol=0, atol=1e-6)
    assert torch.equal(again.exit_layers, expected.exit_layers)


def test_merged_model_reloads_through_the_auto_class_and_serves_a_pipeline(tmp_path):
    model = wrap(exit_policy="patience", exit_threshold=1)
    batch = padded_batch()
    expected = early(model, batch)
    merged = copy.deepcopy(model).merge_and_unload()
    assert isinstance(merged, MultiExitForSequenceClassification)
    assert type(merged.backbone) is BertForSequenceClassification and merged.config.backbone is merged.backbone.config
    tokenizer = make_tokenizer()
    compress.save_pretrained(merged, tmp_path / "merged", tokenizer=tokenizer)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert type(loaded) is type(merged) and loaded.config.exit_threshold == 1
    out = early(loaded, batch)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-6)
    assert torch.equal(out.exit_layers, expected.exit_layers)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "import compress" in card and "multi-exit" in card
    classify = pipeline("text-classification", model=str(tmp_path / "merged"), device="cpu")
    texts = list(make_dataset(6, seed=1)["text"])
    direct = loaded(**tokenizer(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    assert [loaded.config.label2id[p["label"]] for p in classify(texts)] == direct


@pytest.fixture(scope="module")
def merged_folder(tmp_path_factory):
    """A saved merged multi-exit model: an exit after every block, patience 1."""
    folder = tmp_path_factory.mktemp("merged") / "model"
    compress.save_pretrained(wrap(exit_policy="patience", exit_threshold=1).merge_and_unload(), folder)
    return folder


def edited_copy(folder, tmp_path, **fields):
    """A copy of a saved folder with fields of its config.json replaced."""
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, **fields}))
    return edited


@pytest.mark.parametrize(("fields", "match"), [
    ({"exit_policy": "bogus"}, "exit_policy='bogus': choose one of entropy, max_prob, patience"),
    ({"exit_policy": ["entropy"]}, "exit_policy=['entropy']: choose one of entropy"),
    ({"exit_threshold": -3}, "exit_threshold=-3: is outside the domain of patience"),
    ({"exit_layers": [0, 9]}, "exit_layers=[0, 9]: names block 9, but the model has 4 blocks (0..3)"),
    ({"exit_layers": "all"}, "exit_layers='all': must be a non-empty list of block indices"),
    ({"exit_pooling": "max"}, "exit_pooling='max': choose one of mean, first, last"),
    ({"exit_head": "mlp"}, "exit_head='mlp': choose one of pooled, linear"),
    ({"exit_loss_weights": [1, 2]}, "exit_loss_weights=[1, 2]: needs one weight per exit: 4"),
])
def test_a_merged_folder_with_a_bad_exit_field_is_refused_on_load(merged_folder, tmp_path, fields, match):
    edited = edited_copy(merged_folder, tmp_path, **fields)
    expected = re.escape(f"{edited}/config.json: {match}")
    with pytest.raises(InvalidOptionError, match=expected):
        AutoConfig.from_pretrained(edited)  # the config alone, without building the model
    with pytest.raises(InvalidOptionError, match=expected):
        AutoModelForSequenceClassification.from_pretrained(edited)


@pytest.mark.parametrize("fields", [{"exit_layers": [0]}, {"exit_head": "linear"}])
def test_a_merged_folder_whose_exit_fields_disagree_with_its_exit_heads_is_refused(merged_folder, tmp_path, fields):
    edited = edited_copy(merged_folder, tmp_path, **fields)
    with pytest.raises(compress.CompressError, match=re.escape(f"{edited}/config.json: exit_layers=") +
                       ".* do not describe the saved exit heads: .* saved exit weights unused"):
        AutoModelForSequenceClassification.from_pretrained(edited)


def test_exit_fields_set_after_loading_are_checked_before_use(merged_folder):
    loaded = AutoModelForSequenceClassification.from_pretrained(merged_folder)
    loaded.config.exit_policy = "bogus"
    with pytest.raises(InvalidOptionError, match="exit_policy='bogus': choose one of"):
        early(loaded, padded_batch())
    loaded.config.exit_policy, loaded.config.exit_layers = "patience", [7]
    with pytest.raises(InvalidOptionError, match="exit_layers=\\[7\\]: names block 7"):
        type(loaded)(loaded.config)


def test_adapters_off_runs_the_plain_model():
    model = wrap(exit_policy="max_prob", exit_threshold=0.0)
    plain = make_encoder()
    batch = padded_batch()
    with model.disable_adapter():
        out = early(model, batch)
    torch.testing.assert_close(out.logits, plain(**batch).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"exit_layers": [0, 0]}, "twice"),
    ({"exit_layers": [-1]}, "exit_layers"),
    ({"exit_policy": "confidence"}, "exit_policy"),
    ({"exit_policy": "max_prob", "exit_threshold": 1.5}, "domain of max_prob"),
    ({"exit_policy": "entropy", "exit_threshold": -0.1}, "domain of entropy"),
    ({"exit_policy": "patience", "exit_threshold": 1.5}, "domain of patience"),
    ({"exit_threshold": float("nan")}, "exit_threshold"),
    ({"distill_weight": 1.5}, "distill_weight"),
    ({"exit_head": "mlp"}, "exit_head"),
    ({"exit_pooling": "max"}, "exit_pooling"),
    ({"exit_loss_weights": [1, -1]}, "exit_loss_weights"),
    ({"slenderize": {"hidden": 0.25}}, "width only"),
    ({"slenderize": {"ffn": 1.0}}, "slenderize"),
    ({"slenderize_importance": "random"}, "slenderize_importance"),
])
def test_bad_configs_name_the_field(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        compress.MultiExitConfig(task_type="SEQ_CLS", **kwargs)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A saved multi-exit adapter of the 4-block, 3-label encoder: exits after blocks 0 and 1, backbone trained."""
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    wrap(exit_layers=[0, 1]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("fields", "base", "match"), [
    ({"exit_layers": [0]}, make_encoder, "exit_layers=[0] and exit_head='pooled' on this 4-block "
     "BertForSequenceClassification do not describe the saved exit heads (4 saved exit weights unused"),
    ({"exit_layers": [0, 1, 2]}, make_encoder, "do not describe the saved exit heads (4 exit weights missing"),
    ({"exit_head": "linear"}, make_encoder, "exit_head='linear' on this 4-block"),
    ({"exit_layers": [0, 9]}, make_encoder, "exit_layers=[0, 9]: names block 9, but the model has 4 blocks"),
    ({}, lambda: make_encoder(num_labels=2), "does not fit this BertForSequenceClassification: "
     "base_model.exit_layer.exit_heads.default.0.out.bias has shape (3,) in adapter_model.safetensors but (2,)"),
    ({}, lambda: tiny.make_model("bert"), "holds 32 tensors this BertForSequenceClassification lacks (e.g. "
     "base_model.model.bert.encoder.layer.2."),
])
def test_a_saved_adapter_that_does_not_fit_names_the_cause(saved_adapter, tmp_path, fields, base, match):
    edited = tmp_path / "edited"
    shutil.copytree(saved_adapter, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(compress.CompressError, match=re.escape(match)):
        PeftModel.from_pretrained(base(), edited)


def _wide_encoder(hidden: int = 64):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=tiny.VOCAB, hidden_size=hidden, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=64, num_labels=3)).eval()


class _BareTeacher(torch.nn.Module):
    """A teacher without a config: only its outputs tell its widths."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model(**inputs)


@pytest.mark.parametrize(("options", "teacher", "match"), [
    ({"distill_weight": 0.5}, lambda: make_encoder(num_labels=2), "the teacher (BertForSequenceClassification) "
     "predicts 2 labels but the model 3 (their config.num_labels): distill_weight=0.5"),
    ({"distill_hidden_weight": 0.1}, _wide_encoder, "the teacher's hidden size is 64 but the model's 32 (their "
     "config.hidden_size): distill_hidden_weight=0.1"),
])
def test_a_teacher_that_cannot_be_distilled_is_refused_before_wrapping(options, teacher, match):
    model = make_encoder()
    config = compress.MultiExitConfig(task_type="SEQ_CLS", **options)
    with pytest.raises(compress.CompressError, match=re.escape(match)):
        compress.apply_multi_exit(model, config, teacher=teacher())
    assert type(model) is BertForSequenceClassification and not hasattr(model, "peft_config")
    wrapped = compress.apply_multi_exit(model, config)
    with pytest.raises(compress.CompressError, match=re.escape(match)):
        wrapped.base_model.set_teacher(teacher())
    wrapped.base_model.set_teacher(_BareTeacher(teacher()))  # no config to check: the first step checks
    wrapped.train()
    with pytest.raises(compress.CompressError, match="the teacher"):
        wrapped(**padded_batch(labels=True))


def _labelled(labels: list) -> Dataset:
    batch = padded_batch(n=len(labels))
    return Dataset.from_dict({"input_ids": batch["input_ids"].tolist(),
                              "attention_mask": batch["attention_mask"].tolist(), "labels": labels})


@pytest.mark.parametrize(("data", "match"), [
    (lambda: _labelled(["pos", "neg"] * 3), "integer class ids, but the 'labels' column holds strings (e.g. 'pos'): "
     "map them to the model's class ids first, e.g. data.map(lambda row: {'labels': "
     "model.config.label2id[row['labels']]})"),
    (lambda: [{**padded_batch(n=2), "labels": ["pos", "neg"]}], "the batches' labels are strings (e.g. ['pos', "),
    (lambda: _labelled([0.5, 1.0] * 3), "one integer class id per example, but the labels are torch.float32"),
    (lambda: _labelled([0, 7] * 3), "the labels hold class id 7, outside the model's 3 classes (0..2)"),
])
def test_calibration_refuses_labels_that_are_not_class_ids(data, match):
    model = wrap()
    with pytest.raises(compress.CompressError, match=re.escape(match)):
        compress.calibrate_exit_threshold(model, data(), target_speedup=1.2, batch_size=3)
    assert config_of(model).exit_threshold is None


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        meta = make_encoder()
    with pytest.raises(compress.CompressError, match=r"the model has \d+ tensors on the meta device, which hold no "
                       r"values \(e\.g\. bert\.embeddings\.word_embeddings\.weight.*load its weights first"):
        compress.apply_multi_exit(meta, compress.MultiExitConfig(task_type="SEQ_CLS"))
    with pytest.raises(compress.CompressError, match="the teacher has .* tensors on the meta device"):
        compress.apply_multi_exit(make_encoder(), compress.MultiExitConfig(task_type="SEQ_CLS", distill_weight=0.5),
                                  teacher=meta)


def test_loading_onto_the_meta_device_is_refused(saved_adapter):
    with pytest.raises(compress.CompressError, match="low_cpu_mem_usage=True builds the adapter on the meta device, "
                       "which multi-exit models do not support"):
        PeftModel.from_pretrained(make_encoder(), saved_adapter, low_cpu_mem_usage=True)


@pytest.mark.parametrize(("model", "kwargs", "match"), [
    (lambda: make_encoder(), {"exit_layers": [1, 4]}, "names block 4, but the model has 4 blocks"),
    (lambda: make_encoder(), {"exit_loss_weights": [1.0, 2.0]}, "one weight per exit: 4"),
    (lambda: tiny.make_model("llama"), {}, "sequence-classification head"),
])
def test_configs_the_model_cannot_serve_are_refused(model, kwargs, match):
    with pytest.raises(compress.CompressError, match=match):
        get_peft_model(model(), compress.MultiExitConfig(task_type="SEQ_CLS", **kwargs))


def _tokenized(tokenizer, n: int, seed: int) -> Dataset:
    data = make_dataset(n, seed)
    return data.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=32), batched=True,
                    remove_columns=["text"]).rename_column("label", "labels")


@pytest.mark.slow  # 60 Trainer steps and an evaluation
def test_trainer_trains_every_exit_and_evaluates_early_exits(tmp_path):
    tokenizer = make_tokenizer()
    base = tiny.make_model("bert")
    model = get_peft_model(base, compress.MultiExitConfig(task_type="SEQ_CLS", exit_policy="max_prob"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=16,
                             learning_rate=3e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, seed=0)

    def accuracy(prediction) -> dict:
        assert isinstance(prediction.predictions, np.ndarray)  # the exit extras stay out of the predictions
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, args=args, train_dataset=_tokenized(tokenizer, 256, seed=1),
                      eval_dataset=_tokenized(tokenizer, 64, seed=2), processing_class=tokenizer,
                      compute_metrics=accuracy)
    trainer.train()
    full = trainer.evaluate()["eval_accuracy"]
    assert full >= 0.9, full
    choice = compress.calibrate_exit_threshold(model, _tokenized(tokenizer, 64, seed=3), tokenizer=tokenizer,
                                               target_accuracy_drop=2.0)
    early_accuracy = trainer.evaluate()["eval_accuracy"]
    assert early_accuracy >= full - 0.05 and choice.threshold == config_of(model).exit_threshold


@pytest.mark.parametrize("train_backbone", [True, False])
def test_slenderization_scores_every_exit_and_reloads(train_backbone, tmp_path):
    model = wrap(exit_policy="patience", exit_threshold=1, train_backbone=train_backbone,
                 slenderize={"heads": 0.5, "ffn": 0.5})
    calls = []
    heads = model.base_model.exit_layer.exit_heads["default"]
    handles = [h.register_forward_hook(lambda m, a, o: calls.append(1)) for h in heads]
    report = model.base_model.slenderize(data=[padded_batch(n=8, seed=s, labels=True) for s in range(2)])
    for handle in handles:
        handle.remove()
    assert calls, "the importance must come from the exits' losses too"
    assert report.params_after < report.params_before
    widths = compress.pruning.arch.arch_spec(model.base_model.model).widths()
    assert sum(widths["heads"]) == 8 and sum(widths["ffn"]) == 128  # half of 4 x 4 heads, 4 x 64 neurons
    assert model.peft_config["default"].slender_shapes
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("encoder.layer.0.intermediate" in n for n in trainable) == train_backbone
    batch = padded_batch()
    expected = early(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_encoder(), tmp_path / "adapter")
    torch.testing.assert_close(early(reloaded, batch).logits, expected.logits, rtol=0, atol=1e-6)
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged.backbone).__name__ == "CompressedBertForSequenceClassification"
    compress.save_pretrained(merged, tmp_path / "merged")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(early(loaded, batch).logits, expected.logits, rtol=0, atol=1e-6)
    with pytest.raises(compress.CompressError, match="already slenderized"):
        model.base_model.slenderize(data=[padded_batch(labels=True)])


def _pa_with_exits(**exits):
    config = compress.PruningAdapterConfig(task_type="SEQ_CLS", sparsity={"ffn": 0.5, "heads": 0.5}, mode="global",
                                           r=4, exits={"exit_policy": "patience", "exit_threshold": 1, **exits})
    return get_peft_model(make_encoder(), config)


def test_pruning_adapter_with_exits_scores_every_exit_and_merges_to_a_multi_exit_model(tmp_path):
    model = _pa_with_exits()
    heads = model.base_model.exit_layer.exit_heads["default"]
    assert len(heads) == LAYERS - 1 and all(p.requires_grad for p in heads.parameters())
    calls = []
    handles = [h.register_forward_hook(lambda m, a, o: calls.append(1)) for h in heads]
    model.base_model.prune(data=[padded_batch(n=8, seed=s, labels=True) for s in range(2)])
    for handle in handles:
        handle.remove()
    assert calls, "the pruning importance must come from the exits' losses too"
    widths = compress.pruning.arch.arch_spec(model.base_model.model).widths()
    assert sum(widths["heads"]) == 8 and sum(widths["ffn"]) == 128
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))  # trained exits, distinct from the model's head
    model.train()
    out = model(**padded_batch(labels=True))
    assert len(out.exit_logits) == LAYERS and out.loss.requires_grad
    batch = padded_batch(n=8)
    expected = early(model, batch)
    assert len(set(expected.exit_layers.tolist())) > 1
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged.backbone).__name__ == "CompressedBertForSequenceClassification"
    compress.save_pretrained(merged, tmp_path / "merged")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    again = early(loaded, batch)
    torch.testing.assert_close(again.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(again.exit_layers, expected.exit_layers)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_encoder(), tmp_path / "adapter")
    torch.testing.assert_close(early(reloaded, batch).logits, expected.logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sparsity": {"ffn": 0.5, "layers": 0.5}, "exits": {}}, "ffn and heads only"),
    ({"sparsity": 0.5, "exits": {"threshold": 1}}, "must be a dict of exit_layers"),
    ({"sparsity": 0.5, "exits": {"exit_policy": "max_prob", "exit_threshold": 2}}, "domain of max_prob"),
])
def test_pruning_adapter_refuses_exits_it_cannot_serve(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        compress.PruningAdapterConfig(task_type="SEQ_CLS", **kwargs)
