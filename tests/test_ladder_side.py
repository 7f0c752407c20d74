"""Ladder Side-Tuning on tiny random models: what the method matrix does not cover (tests/methods.py)."""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, BertModel, Trainer, TrainingArguments, pipeline

import compress
from compress.pruning.spec import InvalidOptionError
from tests import tiny
from tests.methods import perturb_adapters
from tests.test_train import make_dataset, make_tokenizer

TASK = {"bert": "SEQ_CLS", "roberta": "SEQ_CLS", "llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


def wrap(arch: str, **kwargs):
    kwargs.setdefault("r", 2)
    kwargs.setdefault("importance", "magnitude")
    return get_peft_model(tiny.make_model(arch), compress.LadderSideConfig(task_type=TASK[arch], **kwargs))


def network(peft_model):
    return peft_model.base_model.lst_side.lst_network["default"]


def train_steps(model, batches: list[dict], lr: float = 1e-2) -> None:
    """One AdamW step per batch on the trainable parameters."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def kept_channels(peft_model) -> list[int]:
    """The backbone channels the first ladder selects (pruned initialisation)."""
    return network(peft_model).down[0][0].weight.argmax(dim=1).tolist()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_backbone_runs_without_gradients_and_is_left_unchanged(arch):
    pristine = tiny.make_model(arch)
    model = wrap(arch)
    grad_modes = []
    block = model.base_model.model.base_model
    first = block.encoder.layer[0] if arch == "bert" else block.layers[0]
    first.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    train_steps(model, tiny.make_batches(arch, 3))
    assert grad_modes == [False] * 3 and torch.is_grad_enabled()
    assert all(p.grad is None for n, p in model.named_parameters()
               if "lst_side" not in n and "modules_to_save" not in n)
    state = model.base_model.model.state_dict()
    for name, tensor in pristine.state_dict().items():
        if "classifier" not in name:
            assert torch.equal(state[name], tensor), name
    batch = tiny.make_batch(arch, labels=False)
    model.eval()
    with model.disable_adapter(), torch.no_grad():
        off = model(**batch).logits
    with torch.no_grad():
        on = model(**batch).logits
    if arch == "llama":  # the head is the backbone's own: with the side network off the logits are the backbone's
        torch.testing.assert_close(off, pristine(**batch).logits, rtol=0, atol=0)
    assert not torch.allclose(on, off)


def test_pruned_initialisation_copies_backbone_weights():
    model = wrap("llama")
    kept = kept_channels(model)
    assert len(kept) == 16 and len(set(kept)) == 16
    backbone = model.base_model.model.model.layers[0].mlp.up_proj.weight[:, kept]
    side = network(model).side.layers[0].mlp.up_proj.weight
    assert side.shape == (32, 16)
    for row in side:  # every side neuron is a backbone neuron, restricted to the kept hidden channels
        assert (backbone == row).all(dim=1).any()
    bert = wrap("bert")
    kept = kept_channels(bert)
    positions = bert.base_model.model.bert.embeddings.position_embeddings.weight
    torch.testing.assert_close(network(bert).side.embeddings.position_embeddings.weight, positions[:, kept],
                               rtol=0, atol=0)
    up = network(bert).up.weight
    assert torch.equal(up[kept], torch.eye(len(kept))) and up.abs().sum() == len(kept)


def test_added_to_the_backbone_output_the_side_network_starts_from_the_backbone():
    pristine = tiny.make_model("llama")
    model = wrap("llama", add_backbone_output=True)
    batch = tiny.make_batch("llama", labels=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, pristine(**batch).logits, rtol=0, atol=0)
    train_steps(model, tiny.make_batches("llama", 2))
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, pristine(**batch).logits)


def _segment_features(states: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[u, v, |u - v|, u * v] of one row's side states, by hand."""
    u = states[first].mean(0)
    v = states[second].mean(0) if second.any() else torch.zeros_like(u)
    return torch.cat([u, v, (u - v).abs(), u * v])


def test_an_encoder_classifier_reads_the_side_states_pooled_per_segment():
    """BERT's classifier reads tanh(up(pool([u, v, |u - v|, u * v]))) of the side network's last states, u and v
    the means over the first and second segment (token_type_ids; padding left out; v = 0 for a single sentence),
    instead of its frozen pooler on the first token."""
    model = wrap("bert")
    assert model.peft_config["default"].pooling == "segments"
    perturb_adapters(model)
    model.eval()
    batch = tiny.make_batch("bert", labels=False)
    batch["attention_mask"][1, 6:] = 0
    batch["token_type_ids"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8])  # a pair; a padded single sentence
    seen = {}
    net = network(model)
    net.side.register_forward_hook(lambda module, args, out: seen.update(side=out.last_hidden_state))
    bert = model.base_model.model.bert
    bert.register_forward_hook(lambda module, args, out: seen.update(pooled=out.pooler_output))
    with torch.no_grad():
        logits = model(**batch).logits
        side = seen["side"]
        rows = [_segment_features(side[0], torch.arange(8) < 3, torch.arange(8) >= 3),
                _segment_features(side[1], torch.arange(8) < 6, torch.zeros(8, dtype=torch.bool))]
        expected = torch.tanh(net.up(net.pool(torch.stack(rows))))
        torch.testing.assert_close(seen["pooled"], expected)
        torch.testing.assert_close(logits, model.base_model.model.classifier(expected))
        assert not torch.allclose(seen["pooled"], bert.pooler(net.up(side)))  # not the first token's pooler
    model.train()
    model(**{**batch, "labels": torch.tensor([0, 1])}).loss.backward()
    assert net.pool.weight.grad is not None and net.pool.weight.grad.abs().sum() > 0


def test_a_roberta_classifier_reads_the_pooled_segments_at_the_first_token():
    """RoBERTa has no token types: its pair "<s> A </s></s> B </s>" is split after the first separator (eos), a
    single sentence is one segment; the pooled features replace the first token the head reads."""
    model = wrap("roberta")
    perturb_adapters(model)
    model.eval()
    net, seen = network(model), {}
    net.side.register_forward_hook(lambda module, args, out: seen.update(side=out.last_hidden_state))
    head = model.base_model.model.classifier
    head.register_forward_pre_hook(lambda module, args: seen.update(features=args[0]))
    input_ids = torch.tensor([[0, 5, 6, 2, 2, 7, 8, 2], [0, 5, 6, 7, 2, 1, 1, 1]])  # a pair; a padded sentence
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask)
        side = seen["side"]
        expected = torch.tanh(net.up(net.pool(torch.stack(
            [_segment_features(side[0], torch.arange(8) < 4, torch.arange(8) >= 4),
             _segment_features(side[1], torch.arange(8) < 5, torch.zeros(8, dtype=torch.bool))]))))
        torch.testing.assert_close(seen["features"][:, 0], expected)
        torch.testing.assert_close(seen["features"][:, 1:], net.up(side)[:, 1:])


@pytest.mark.parametrize(("arch", "kwargs"), [("llama", {}), ("t5", {}), ("bert", {"add_backbone_output": True})])
def test_pooling_is_the_task_models_own_where_segments_do_not_apply(arch, kwargs):
    model = wrap(arch, **kwargs)
    assert model.peft_config["default"].pooling == "model" and network(model).pool is None


def test_an_adapter_saved_before_pooling_existed_loads_as_it_was_trained(tmp_path):
    """An adapter_config.json without `pooling` (saved by an earlier release, whose classifier read BERT's pooler on
    the side network's first token) loads with pooling='model' and gives the same logits."""
    model = wrap("bert", pooling="model")
    perturb_adapters(model)
    model.eval()
    batch = tiny.make_batch("bert", labels=False)
    net, seen = network(model), {}
    assert net.pool is None
    net.side.register_forward_hook(lambda module, args, out: seen.update(side=out.last_hidden_state))
    task_model = model.base_model.model
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(expected, task_model.classifier(task_model.bert.pooler(net.up(seen["side"]))))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["pooling"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    reloaded = PeftModel.from_pretrained(tiny.make_model("bert"), tmp_path).eval()
    assert reloaded.peft_config["default"].pooling == "model"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=0)


def test_the_folder_check_names_an_edited_pooling(saved_bert_adapter, tmp_path):
    from compress.plugins.ladder_side.checks import check_saved_folder
    from peft import PeftConfig
    from safetensors import safe_open

    edited = tmp_path / "edited"
    shutil.copytree(saved_bert_adapter, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "pooling": "model"}))
    with safe_open(edited / "adapter_model.safetensors", "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    assert check_saved_folder(saved_bert_adapter, PeftConfig.from_pretrained(saved_bert_adapter), shapes) == []
    assert check_saved_folder(edited, PeftConfig.from_pretrained(edited), shapes) == [
        "pooling='model', but the weights hold the segment pooling layer (lst_network.pool.*)"]


def test_random_initialisation_copies_nothing():
    model = wrap("llama", side_init="random")
    side = network(model).side.layers[0].mlp.up_proj.weight
    backbone = model.base_model.model.model.layers[0].mlp.up_proj.weight
    assert side.shape == (32, 16)
    assert not any((backbone[:, :16] == row).all(dim=1).any() for row in side)


def test_layer_dropping_keeps_one_side_block_per_listed_layer():
    full, dropped = wrap("bert"), wrap("bert", side_layers=[1])
    assert len(network(full).side.encoder.layer) == 2 and len(network(dropped).side.encoder.layer) == 1
    assert network(dropped).gates.shape == (1, 1) and len(network(dropped).down[0]) == 2
    assert dropped.peft_config["default"].side_config["num_hidden_layers"] == 1
    assert sum(p.numel() for p in network(dropped).parameters()) < sum(p.numel() for p in network(full).parameters())


def test_fisher_initialisation_needs_data_and_uses_it(caplog):
    fallback = wrap("bert", importance="fisher")
    with caplog.at_level(logging.WARNING):
        fallback.train()
        fallback(**tiny.make_batch("bert"))
    assert "initialised by magnitude" in caplog.text
    scored = compress.apply_ladder_side(tiny.make_model("bert"), compress.LadderSideConfig(task_type="SEQ_CLS", r=2),
                               data=tiny.make_batches("bert", 2))
    a, b = network(fallback).state_dict(), network(scored).state_dict()
    assert a.keys() == b.keys()
    assert any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)


def test_trainable_parameters_are_the_side_network_and_head(capsys):
    model = wrap("bert")
    trainable, total = model.get_nb_trainable_parameters()
    side = sum(p.numel() for p in network(model).parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    assert trainable == side + head and head > 0
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "t5"])
def test_generate_with_the_ladder_cache_matches_generate_without_cache(arch):
    model = wrap(arch)
    perturb_adapters(model)
    model.eval()
    batch = tiny.make_batch(arch, labels=False)
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    method = compress.METHODS["LADDER_SIDE"]
    assert isinstance(out.cache, method.LadderEncoderDecoderCache if arch == "t5" else method.LadderCache)
    decoded = batch.get("decoder_input_ids", batch["input_ids"])
    assert out.cache.side.get_seq_length() == decoded.shape[1]
    batch.pop("decoder_input_ids", None)
    for beams in (1, 3):
        cached = model.generate(**batch, max_new_tokens=5, do_sample=False, num_beams=beams)
        uncached = model.generate(**batch, max_new_tokens=5, do_sample=False, num_beams=beams, use_cache=False)
        assert torch.equal(cached, uncached)
    with model.disable_adapter():
        plain = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(plain, tiny.make_model(arch).generate(**batch, max_new_tokens=5, do_sample=False))


def test_feature_extraction_on_a_bare_encoder():
    backbone = tiny.make_model("bert").bert
    features = get_peft_model(BertModel(backbone.config).eval(),
                              compress.LadderSideConfig(task_type="FEATURE_EXTRACTION", r=4, importance="magnitude"))
    perturb_adapters(features)
    batch = tiny.make_batch("bert", labels=False)
    with torch.no_grad():
        out = features(**batch)
        with features.disable_adapter():
            plain = features(**batch)
    assert out.last_hidden_state.shape == plain.last_hidden_state.shape == (2, 8, 32)
    assert not torch.allclose(out.last_hidden_state, plain.last_hidden_state)
    assert not torch.allclose(out.pooler_output, plain.pooler_output)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"r": 0}, "r=0: must be a positive integer"),
    ({"side_layers": []}, "side_layers"),
    ({"side_layers": [0, 0]}, "names a block twice"),
    ({"gate_temperature": 0}, "gate_temperature"),
    ({"side_init": "copy"}, "side_init"),
    ({"importance": "taylor"}, "importance"),
    ({"pooling": "cls"}, "pooling='cls': choose one of segments, model"),
    ({"task_type": "QUESTION_ANS"}, "Ladder Side-Tuning serves SEQ_CLS, CAUSAL_LM, SEQ_2_SEQ_LM"),
])
def test_bad_configs_name_the_field(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        compress.LadderSideConfig(**{"task_type": "SEQ_CLS", **kwargs})


@pytest.mark.parametrize(("arch", "kwargs", "match"), [
    ("bert", {"r": 3}, r"r=3: must divide the backbone's hidden size 32"),
    ("bert", {"side_layers": [0, 5]}, r"blocks \[5\] do not exist: the backbone has 2 blocks"),
    ("bert", {"task_type": "CAUSAL_LM"}, "task_type=CAUSAL_LM needs a \\*ForCausalLM model"),
    ("llama", {"task_type": "SEQ_CLS"}, "ForSequenceClassification model"),
    ("t5", {"side_layers": [1]}, r"must include blocks \[0\]: .* relative position bias"),
    ("t5", {"task_type": "SEQ_CLS"}, "ForSequenceClassification model"),
    ("llama", {"pooling": "segments"}, r"pooling='segments' feeds the classifier of an encoder \(task_type=SEQ_CLS on "
     r"BERT/RoBERTa\), not task_type=CAUSAL_LM on LlamaForCausalLM"),
    ("bert", {"pooling": "segments", "add_backbone_output": True}, "pooling='segments' bypasses it"),
])
def test_configs_the_model_cannot_serve_raise_before_anything_changes(arch, kwargs, match):
    model = tiny.make_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = compress.LadderSideConfig(**{"task_type": TASK.get(arch, "SEQ_CLS"), "importance": "magnitude", **kwargs})
    with pytest.raises(compress.CompressError, match=match):
        get_peft_model(model, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _bert(hidden: int = 32, layers: int = 2, num_labels: int = 2):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=tiny.VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=64, num_labels=num_labels)).eval()


@pytest.fixture(scope="module")
def saved_bert_adapter(tmp_path_factory):
    """A saved adapter of the tiny 2-block BERT (hidden size 32, r=2: a 16-wide side network)."""
    folder = tmp_path_factory.mktemp("lst") / "adapter"
    wrap("bert").save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("base", "fields", "match"), [
    (lambda: tiny.make_model("roberta"), {}, "this Ladder Side-Tuning adapter was built for a bert backbone "
     "(side_config model_type 'compressed_bert'), but the model is RobertaForSequenceClassification (roberta)"),
    (lambda: tiny.make_model("llama-cls"), {}, "was built for a bert backbone (side_config model_type "
     "'compressed_bert'), but the model is LlamaForSequenceClassification (llama)"),
    (lambda: _bert(hidden=64), {}, "was built for a backbone of hidden size 32, but BertForSequenceClassification "
     "has hidden size 64"),
    (lambda: _bert(layers=3), {}, "side network has 2 blocks, one per block of the backbone it was built for, but "
     "BertForSequenceClassification has 3 blocks"),
    (lambda: _bert(num_labels=3), {}, "does not fit this BertForSequenceClassification: "
     "base_model.model.classifier.modules_to_save.default.weight has shape (2, 32) in adapter_model.safetensors but "
     "(3, 32) in the model; it was trained with another number of labels (num_labels)"),
    (_bert, {"r": 4}, "adapter_config.json: r=4 does not match the saved side network (hidden size 16 for a backbone "
     "of 32, r=2)"),
    (_bert, {"side_layers": [1]}, "adapter_config.json: side_layers=[1] names 1 block but side_config describes 2 "
     "side blocks"),
    (_bert, {"side_config": {"hidden_size": 8}}, "adapter_config.json: side_config does not describe the saved side "
     "network (base_model.lst_side.lst_network.default.down.0.0.bias has shape (16,)"),
    (_bert, {"side_layers": [1], "side_config": {"num_hidden_layers": 1}}, "adapter_config.json: side_config does "
     "not build a side network (AttributeError: "),
    (_bert, {"side_config": {"model_type": "compressed_roberta"}}, "built for a roberta backbone"),
    (_bert, {"pooling": "model"}, "adapter_config.json: pooling='model' does not match the saved adapter, which was "
     "trained with pooling='segments' (its weights hold the segment pooling layer): put back pooling='segments'"),
])
def test_a_saved_adapter_that_does_not_fit_names_the_cause(saved_bert_adapter, tmp_path, base, fields, match):
    edited = tmp_path / "edited"
    shutil.copytree(saved_bert_adapter, edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    if "side_config" in fields:
        fields = {**fields, "side_config": {**config["side_config"], **fields["side_config"]}}
    (edited / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(compress.CompressError, match=re.escape(match)):
        PeftModel.from_pretrained(base(), edited)


def test_a_saved_side_network_with_fewer_blocks_than_its_weights_is_refused(tmp_path):
    wrap("bert", side_init="random").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["side_layers"], config["side_config"]["num_hidden_layers"] = [1], 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(compress.CompressError, match=re.escape(
            "adapter_config.json: side_config and side_layers do not describe the saved side network (") +
            r"18 saved tensors unused \(e\.g\. base_model\.lst_side\.lst_network\.default\.down\.0\.2\."):
        PeftModel.from_pretrained(_bert(), tmp_path)


@pytest.mark.parametrize("side_init", ["pruned", "random"])
def test_a_backbone_on_the_meta_device_is_refused(side_init):
    with torch.device("meta"):
        meta = _bert()
    with pytest.raises(compress.CompressError, match=r"the backbone has \d+ tensors on the meta device, which hold no "
                       r"values \(e\.g\. bert\.embeddings\.word_embeddings\.weight.*load its weights first"):
        compress.apply_ladder_side(meta, compress.LadderSideConfig(task_type="SEQ_CLS", r=2, side_init=side_init,
                                                                   importance="magnitude"))
    assert type(meta) is BertForSequenceClassification and not hasattr(meta, "peft_config")


def test_loading_onto_the_meta_device_is_refused(saved_bert_adapter):
    with pytest.raises(compress.CompressError, match="low_cpu_mem_usage=True builds the adapter on the meta device, "
                       "which Ladder Side-Tuning's side network does not support"):
        PeftModel.from_pretrained(_bert(), saved_bert_adapter, low_cpu_mem_usage=True)


@pytest.mark.parametrize("arch", ["llama", "roberta"])  # roberta: a head without weight in modules_to_save
def test_unload_returns_the_plain_backbone(arch):
    pristine = tiny.make_model(arch)
    model = wrap(arch)
    perturb_adapters(model)
    plain = model.unload()
    batch = tiny.make_batch(arch, labels=False)
    assert not any("lst_" in n for n, _ in plain.named_parameters())
    if arch == "roberta":  # peft's unload keeps the trained copy of a modules_to_save head
        pristine.classifier.load_state_dict(plain.classifier.state_dict())
    torch.testing.assert_close(plain(**batch).logits, pristine(**batch).logits, rtol=0, atol=0)


def _tokenized(tokenizer, n: int, seed: int) -> Dataset:
    data = make_dataset(n, seed)
    return data.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=32), batched=True,
                    remove_columns=["text"]).rename_column("label", "labels")


@pytest.mark.slow  # 80 Trainer steps
def test_trainer_with_gradient_accumulation_learns_and_the_pipeline_serves_it(tmp_path):
    tokenizer = make_tokenizer()
    model = compress.apply_ladder_side(tiny.make_model("bert"), compress.LadderSideConfig(task_type="SEQ_CLS", r=2),
                              data=_tokenized(tokenizer, 32, seed=5), tokenizer=tokenizer)
    backbone = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "classifier" not in k}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=80, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, learning_rate=3e-3, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, seed=0)
    Trainer(model=model, args=args, train_dataset=_tokenized(tokenizer, 256, seed=1),
            processing_class=tokenizer).train()
    state = model.base_model.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in backbone.items())
    test = make_dataset(64, seed=2)
    model.eval()  # the Trainer leaves it training (dropout on), and a pipeline does not switch it
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
    predicted = [int(p["label"].rsplit("_", 1)[-1]) for p in classify(list(test["text"]))]
    accuracy = sum(p == y for p, y in zip(predicted, test["label"])) / len(test)
    assert accuracy >= 0.85, accuracy
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny.make_model("bert"), tmp_path / "adapter")
    again = pipeline("text-classification", model=reloaded, tokenizer=tokenizer, device="cpu")
    assert [p["label"] for p in again(list(test["text"]))] == [p["label"] for p in classify(list(test["text"]))]


def _save_bert_for_bitsandbytes(folder) -> None:
    """A tiny BERT whose layers bitsandbytes' CPU 4-bit kernel accepts: on CPUs with avx512_bf16 an eval forward
    repacks the weights in blocks of 64 inputs, which a 32-wide layer does not fill."""
    config = tiny.make_model("bert").config
    config.hidden_size, config.intermediate_size = 64, 128
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)


def _quantized_bert(folder, bits: str):
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    options = ({"load_in_8bit": True} if bits == "8bit" else
               {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32})
    return AutoModelForSequenceClassification.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(llm_int8_skip_modules=["classifier", "pooler"], **options))


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_backbone_trains_the_side_network_and_reloads(bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    _save_bert_for_bitsandbytes(tmp_path / "base")
    model = compress.apply_ladder_side(_quantized_bert(tmp_path / "base", bits),
                                       compress.LadderSideConfig(task_type="SEQ_CLS", r=2),
                                       data=tiny.make_batches("bert", 2))
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert type(query).__name__ == ("Linear8bitLt" if bits == "8bit" else "Linear4bit")
    kept = kept_channels(model)
    side_positions = network(model).side.embeddings.position_embeddings.weight
    backbone_positions = model.base_model.model.bert.embeddings.position_embeddings.weight
    torch.testing.assert_close(side_positions, backbone_positions[:, kept], rtol=0, atol=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    side = {n: p.detach().clone() for n, p in network(model).named_parameters()}
    train_steps(model, tiny.make_batches("bert", 2))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert all(not torch.equal(p, side[n]) for n, p in network(model).named_parameters() if n.startswith("down"))
    expected = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_quantized_bert(tmp_path / "base", bits), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-6)


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tiny.make_batch("bert", labels=False)).logits


def test_a_failed_reinitialisation_leaves_the_adapter_as_it_was(tmp_path):
    model = wrap("bert", importance="fisher")
    recorded = dict(model.peft_config["default"].side_config)
    before = {k: v.clone() for k, v in network(model).state_dict().items()}
    with pytest.raises(compress.CompressError, match="labels"):
        model.base_model.init_side(data=tiny.make_batches("bert", 2, labels=False))  # fisher needs the task loss
    assert model.peft_config["default"].side_config == recorded
    assert all(torch.equal(before[k], v) for k, v in network(model).state_dict().items())
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny.make_model("bert"), tmp_path)
    assert network(reloaded).state_dict().keys() == before.keys()


def test_torch_dynamic_int8_backbone_trains_the_side_network():
    def int8(module):
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)

    config = compress.LadderSideConfig(task_type="SEQ_CLS", r=2, importance="magnitude")
    whole = tiny.make_model("bert")
    whole.bert = int8(whole.bert)  # the pooler too: no gradient would reach the side network
    with pytest.raises(compress.CompressError, match="BertPooler sits between the side network and the loss"):
        get_peft_model(whole, config)
    model = tiny.make_model("bert")
    model.bert.encoder = int8(model.bert.encoder)
    peft_model = get_peft_model(model, config)
    kept = kept_channels(peft_model)
    query = model.bert.encoder.layer[0].attention.self.query.weight().dequantize()[:, kept]
    side = network(peft_model).side.encoder.layer[0].attention.self.query.weight
    assert all((query == row).all(dim=1).any() for row in side)  # the dequantised backbone, pruned
    before = {k: v.clone() for k, v in network(peft_model).state_dict().items()}
    train_steps(peft_model, [tiny.make_batch("bert")])
    assert any(not torch.equal(before[k], v) for k, v in network(peft_model).state_dict().items())


def test_the_text_generation_pipeline_serves_a_decoder():
    tokenizer = make_tokenizer()
    model = wrap("llama")
    perturb_adapters(model)
    model.eval()
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    out = generate("good w1 w2", max_new_tokens=4, do_sample=False, return_tensors=True)
    expected = model.generate(**tokenizer("good w1 w2", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out[0]["generated_token_ids"] == expected[0].tolist()
    with model.disable_adapter():
        plain = model.generate(**tokenizer("good w1 w2", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert plain[0].tolist() != expected[0].tolist()  # the side network decides the tokens


def test_token_classification_trains_the_side_network():
    from transformers import BertForTokenClassification

    model = get_peft_model(BertForTokenClassification(tiny.make_model("bert").config).eval(),
                           compress.LadderSideConfig(task_type="TOKEN_CLS", r=2, importance="magnitude"))
    batch = tiny.make_batch("bert", labels=False)
    batch["labels"] = torch.randint(0, 2, batch["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    model.train()
    model(**batch).loss.backward()
    side = {n: p.grad for n, p in network(model).named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in side.items() if n.startswith(("down", "up")))
    assert all(p.grad is None for n, p in model.named_parameters() if "lst_side" not in n and "classifier" not in n)


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_a_deep_copy_runs_its_own_side_network(arch):
    """copy.deepcopy (as Trainer callbacks and model soups do) gives a model whose hooks drive the copy's side
    network, not the original's."""
    model = wrap(arch)
    perturb_adapters(model)
    model.eval()
    batch = tiny.make_batch(arch)
    with torch.no_grad():
        expected = model(**batch).logits
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in network(model).parameters():
            p.zero_()
        torch.testing.assert_close(twin(**batch).logits, expected, rtol=0, atol=0)
        assert not torch.equal(model(**batch).logits, expected)
    twin.train()
    twin(**batch).loss.backward()
    assert all(p.grad is not None for p in network(twin).parameters() if p.requires_grad)
    assert all(p.grad is None for p in network(model).parameters())
    plain = twin.unload()  # the copy's hook handles remove the copy's hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
