"""The saved multi-exit model: one transformers class for every family, its config holding the backbone's, loading
through the Auto classes, and folders of the earlier per-family format."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from compress.plugins.multi_exit import (
    EXIT_FIELDS,
    MultiExitClassifierConfig,
    MultiExitForSequenceClassification,
    multi_exit_model_class,
)
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, pipeline

import compress
from compress.hub import check_folder
from compress.pruning.spec import InvalidOptionError
from tests.test_multi_exit import early, make_encoder, padded_batch, wrap
from tests.test_train import make_dataset, make_tokenizer

EARLIER_FORMAT = "earlier per-family format"


def merged_model(arch: str = "bert", **options) -> MultiExitForSequenceClassification:
    return wrap(arch, exit_policy="patience", exit_threshold=1, **options).merge_and_unload()


def same_outputs(model, expected) -> None:
    out = early(model, padded_batch())
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    assert torch.equal(out.exit_layers, expected.exit_layers)


def save_in_earlier_format(model: MultiExitForSequenceClassification, folder) -> None:
    """What peft-compress wrote for a merged multi-exit model before MultiExitForSequenceClassification (checked
    field by field and tensor by tensor against folders that code saved): the backbone's config fields and the exit
    fields side by side under model_type ``multi_exit_<type>``, the weights under the backbone's own names beside
    ``exits.<k>``."""
    backbone = model.backbone
    config = {**backbone.config.to_diff_dict(), **{name: getattr(model.config, name) for name in EXIT_FIELDS},
              "model_type": "multi_exit_" + backbone.config.model_type,
              "architectures": ["MultiExit" + type(backbone).__name__]}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {key.removeprefix("backbone."): tensor.contiguous() for key, tensor in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_quietly(folder):
    """The model of ``folder``, and the earlier-format warnings its loading gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    return model, [w for w in caught if EARLIER_FORMAT in str(w.message)]


# -- one class --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "roberta", "llama", "qwen2"])
def test_every_family_merges_into_one_class_holding_its_classifier_and_reloads_identically(arch, tmp_path):
    model = wrap(arch, exit_policy="patience", exit_threshold=1, exit_pooling="last" if arch in ("llama", "qwen2")
                 else "mean")
    expected = early(model, padded_batch())
    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged) is MultiExitForSequenceClassification and type(merged.config) is MultiExitClassifierConfig
    assert type(merged.backbone) is type(make_encoder(arch))  # the family's own transformers class
    assert merged.config.backbone is merged.backbone.config and merged.config.num_hidden_layers == 4
    same_outputs(merged, expected)
    compress.save_pretrained(merged, tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert saved["model_type"] == "multi_exit" and saved["backbone"]["model_type"] == arch
    assert saved["architectures"] == ["MultiExitForSequenceClassification"]
    assert {name: saved[name] for name in EXIT_FIELDS} == {name: getattr(merged.config, name) for name in EXIT_FIELDS}
    assert type(AutoConfig.from_pretrained(tmp_path / "merged")) is MultiExitClassifierConfig
    loaded, warned = load_quietly(tmp_path / "merged")
    assert type(loaded) is MultiExitForSequenceClassification and not warned
    same_outputs(loaded, expected)


def test_the_model_card_names_the_auto_class_and_the_pipeline_task(tmp_path):
    compress.save_pretrained(merged_model(), tmp_path / "merged")
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "# Multi-exit bert" in card
    assert "AutoModelForSequenceClassification.from_pretrained" in card and "import compress" in card


def test_the_labels_are_the_backbones_and_edits_reach_both_configs():
    taken = MultiExitClassifierConfig(backbone=BertConfig(num_labels=3, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64))
    assert taken.num_labels == 3 and taken.id2label == taken.backbone.id2label
    given = MultiExitClassifierConfig(backbone=taken.backbone.to_dict(), id2label={0: "neg", 1: "pos"},
                                      problem_type="single_label_classification")
    assert given.backbone.id2label == {0: "neg", 1: "pos"} and given.backbone.label2id == {"neg": 0, "pos": 1}
    assert given.backbone.problem_type == "single_label_classification"
    model = MultiExitForSequenceClassification(given)
    assert model.backbone.classifier.out_features == 2 and all(head.out.out_features == 2 for head in model.exits)


def test_a_pipeline_uses_the_labels_of_the_saved_config(tmp_path):
    folder = tmp_path / "merged"
    compress.save_pretrained(merged_model(), folder, tokenizer=make_tokenizer())
    config = json.loads((folder / "config.json").read_text())
    names = {"0": "red", "1": "green", "2": "blue"}
    config.update(id2label=names, label2id={v: int(k) for k, v in names.items()})
    (folder / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    assert loaded.backbone.config.id2label == {0: "red", 1: "green", 2: "blue"}
    classify = pipeline("text-classification", model=str(folder), device="cpu")
    assert {row["label"] for row in classify(list(make_dataset(6, seed=1)["text"]))} <= set(names.values())


def test_exit_heads_of_another_number_are_refused():
    model = merged_model()
    with pytest.raises(compress.CompressError, match="2 exit heads given, but exit_layers=None .* needs one per exit "
                                                     r"before the last block \(3\)"):
        MultiExitForSequenceClassification(model.config, backbone=model.backbone, exits=model.exits[:2])


def test_inside_every_exit_loss_the_backbone_returns_the_loss_of_every_exit():
    merged = merged_model().eval()
    batch = padded_batch(labels=True)
    with torch.no_grad():
        with merged.every_exit_loss() as backbone:
            assert backbone is merged.backbone
            scored = backbone(**batch).loss
        merged.config.exit_threshold = None  # every exit runs, and the loss combines them
        combined = merged(**batch).loss
        own = merged.backbone(**batch).loss
    torch.testing.assert_close(scored, combined)
    assert not torch.allclose(own, combined)  # outside, the backbone's loss is its own head's again


def test_removing_blocks_under_the_exits_is_refused():
    merged = merged_model()
    with pytest.raises(compress.CompressError, match=r"the backbone changed under its exits \(blocks 4 -> 3\).*"
                                                     "prune only within blocks"):
        with merged.every_exit_loss() as backbone:
            del backbone.bert.encoder.layer[2]


def test_pruning_the_backbone_scores_every_exit_and_the_compact_result_saves_and_reloads(tmp_path):
    merged = merged_model()
    calls = []
    handles = [head.register_forward_hook(lambda *_: calls.append(1)) for head in merged.exits]
    with merged.every_exit_loss() as backbone:
        report = compress.prune_model(backbone, sparsity={"ffn": 0.5, "heads": 0.5}, structures=["ffn", "heads"],
                                      importance="taylor", mode="global",
                                      data=[padded_batch(n=8, labels=True)])
    for handle in handles:
        handle.remove()
    assert calls, "the importance must come from the exits' losses too"
    assert report.params_after < report.params_before
    assert type(merged.backbone).__name__ == "CompressedBertForSequenceClassification"
    assert merged.config.backbone is merged.backbone.config and merged.config.backbone.model_type == "compressed_bert"
    expected = early(merged, padded_batch())
    compress.save_pretrained(merged, tmp_path / "pruned")
    same_outputs(AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned"), expected)


def test_the_per_family_class_function_is_deprecated():
    with pytest.warns(FutureWarning, match="MultiExitForSequenceClassification"):
        assert multi_exit_model_class(type(make_encoder())) is MultiExitForSequenceClassification


# -- folders of the earlier format ------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "options"), [
    ("bert", {}),
    ("roberta", {"exit_layers": [0, 2], "exit_head": "linear"}),
    ("llama", {"exit_pooling": "last"}),
])
def test_a_folder_of_the_earlier_format_loads_with_a_warning_and_saves_in_the_current_one(arch, options, tmp_path):
    merged = merged_model(arch, **options)
    expected = early(merged, padded_batch())
    old = tmp_path / "old"
    save_in_earlier_format(merged, old)
    with pytest.warns(FutureWarning, match=f"{EARLIER_FORMAT} \\(model_type 'multi_exit_{arch}'\\).*save it again"):
        config = AutoConfig.from_pretrained(old)
    assert type(config) is MultiExitClassifierConfig and config.backbone.model_type == arch
    assert {name: getattr(config, name) for name in EXIT_FIELDS} == \
        {name: getattr(merged.config, name) for name in EXIT_FIELDS}
    loaded, warned = load_quietly(old)
    assert type(loaded) is MultiExitForSequenceClassification and warned
    same_outputs(loaded, expected)
    compress.save_pretrained(loaded, tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == "multi_exit"
    again, warned = load_quietly(tmp_path / "new")
    assert not warned
    same_outputs(again, expected)


def test_a_slenderized_folder_of_the_earlier_format_loads_its_compact_backbone_and_passes_the_hub_check(tmp_path):
    model = wrap(exit_policy="patience", exit_threshold=1, slenderize={"heads": 0.5, "ffn": 0.5},
                 slenderize_importance="magnitude")
    model.base_model.slenderize()
    merged = model.merge_and_unload()
    expected = early(merged, padded_batch())
    old = tmp_path / "old"
    save_in_earlier_format(merged, old)
    (old / "README.md").write_text("---\nlibrary_name: transformers\ntags:\n- peft-compress\n---\n")
    assert json.loads((old / "config.json").read_text())["model_type"] == "multi_exit_compressed_bert"
    loaded, warned = load_quietly(old)
    assert warned and type(loaded.backbone).__name__ == "CompressedBertForSequenceClassification"
    same_outputs(loaded, expected)
    assert check_folder(old).kind == "model"


def test_a_folder_of_the_earlier_format_serves_a_pipeline(tmp_path):
    merged = merged_model()
    tokenizer = make_tokenizer()
    save_in_earlier_format(merged, tmp_path / "old")
    tokenizer.save_pretrained(tmp_path / "old")
    texts = list(make_dataset(6, seed=1)["text"])
    merged.eval()
    with torch.no_grad():
        direct = merged(**tokenizer(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    with pytest.warns(FutureWarning, match=EARLIER_FORMAT):
        classify = pipeline("text-classification", model=str(tmp_path / "old"), device="cpu")
    assert [merged.config.label2id[row["label"]] for row in classify(texts)] == direct


@pytest.mark.parametrize(("fields", "error", "match"), [
    ({"exit_policy": "bogus"}, InvalidOptionError, "config.json: exit_policy='bogus': choose one of entropy"),
    ({"exit_layers": [0, 9]}, InvalidOptionError, "config.json: exit_layers=[0, 9]: names block 9, but the model "
                                                  "has 4 blocks"),
    ({"exit_layers": [0]}, compress.CompressError, "config.json: exit_layers=[0] and exit_head='pooled' do not "
                                                   "describe the saved exit heads"),
])
def test_a_folder_of_the_earlier_format_with_bad_exit_fields_is_refused_naming_the_field(fields, error, match,
                                                                                         tmp_path):
    old = tmp_path / "old"
    save_in_earlier_format(merged_model(), old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, **fields}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(error, match=re.escape(f"{old}/{match}")):
            AutoModelForSequenceClassification.from_pretrained(old)


_FRESH = textwrap.dedent("""
    import sys, warnings, torch
    import compress  # registers the multi-exit classes
    from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline
    expected = torch.load(sys.argv[1])
    warnings.simplefilter("ignore", FutureWarning)
    for name in ("new", "old"):
        folder = sys.argv[2] + "/" + name
        assert type(AutoConfig.from_pretrained(folder)).__name__ == "MultiExitClassifierConfig"
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            out = model(**expected["batch"])
        torch.testing.assert_close(out.logits, expected["logits"], rtol=0, atol=0)
        assert torch.equal(out.exit_layers, expected["exit_layers"])
        classify = pipeline("text-classification", model=folder, device="cpu")
        labels = [row["label"] for row in classify(expected["texts"])]
        assert labels == expected["labels"], (name, labels)
""")


@pytest.mark.slow
def test_saved_folders_of_both_formats_load_identically_in_a_fresh_process(tmp_path):
    merged = merged_model().eval()
    tokenizer = make_tokenizer()
    batch = padded_batch()
    texts = list(make_dataset(6, seed=1)["text"])
    with torch.no_grad():
        out = merged(**batch)
        predicted = merged(**tokenizer(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    compress.save_pretrained(merged, tmp_path / "new", tokenizer=tokenizer)
    save_in_earlier_format(merged, tmp_path / "old")
    tokenizer.save_pretrained(tmp_path / "old")
    torch.save({"batch": batch, "logits": out.logits, "exit_layers": out.exit_layers, "texts": texts,
                "labels": [merged.config.id2label[i] for i in predicted]}, tmp_path / "expected.pt")
    subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path / "expected.pt"), str(tmp_path)], check=True,
                   timeout=300)
