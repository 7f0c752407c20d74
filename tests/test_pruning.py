"""The structured pruning engine on tiny random models of every supported family."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, GPT2Config, GPT2LMHeadModel

import compress
import compress.export
import compress.pruning.compact
from compress.errors import CalibrationError, CompressError, UnsupportedModelError, UnsupportedStructureError
from compress.pruning.arch import arch_spec
from compress.pruning.importance import attach_gates, units_for
from compress.pruning.plan import plan_removals
from tests import tiny

REPO = Path(__file__).resolve().parents[1]

# (arch, ratios, mode): every structure each family supports, in both modes where it makes sense.
CASES = [
    ("bert", {"ffn": 0.5}, "uniform"),
    ("bert", {"layers": 0.5}, "uniform"),
    ("bert", {"ffn": 0.5, "heads": 0.5}, "global"),
    ("roberta", {"ffn": 0.25}, "uniform"),
    ("roberta", {"heads": 0.25, "layers": 0.5}, "global"),
    ("llama", {"ffn": 0.5}, "uniform"),
    ("llama", {"heads": 0.5}, "uniform"),
    ("llama", {"kv_heads": 0.5}, "uniform"),
    ("llama", {"layers": 0.5}, "uniform"),
    ("llama", {"ffn": 0.5, "heads": 0.5}, "global"),
    ("qwen2", {"ffn": 0.5, "kv_heads": 0.5}, "uniform"),
    ("qwen2", {"ffn": 0.75, "heads": 0.5}, "global"),
    ("t5", {"ffn": 0.5}, "uniform"),
    ("t5", {"heads": 0.5}, "uniform"),
    ("t5", {"ffn": 0.5, "heads": 0.25}, "global"),
]
IDS = [f"{a}-{'+'.join(r)}-{m}" for a, r, m in CASES]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _masked_reference(original, ratios, removed):
    """The unpruned model with the removed channels/heads/blocks gated to zero."""
    units = units_for(arch_spec(original), ratios)
    ctx = attach_gates(units)
    gates = ctx.__enter__()
    with torch.no_grad():
        for key, idxs in removed.items():
            gates[key][idxs] = 0.0
    return ctx


@pytest.mark.parametrize("arch,ratios,mode", CASES, ids=IDS)
def test_pruned_model_equals_masked_original(arch, ratios, mode):
    model = tiny.make_model(arch)
    original = copy.deepcopy(model)
    batch = tiny.make_batch(arch, labels=False)
    report = compress.prune_model(model, ratios, None, "taylor", data=tiny.make_batches(arch, 2), mode=mode)

    assert report.params_after < report.params_before
    assert sum(p.numel() for p in model.parameters()) == report.params_after
    assert report.removed, "nothing was removed"
    ctx = _masked_reference(original, ratios, report.removed)
    try:
        expected = _logits(original, batch)
    finally:
        ctx.__exit__(None, None, None)
    torch.testing.assert_close(_logits(model, batch), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,ratios,mode", CASES, ids=IDS)
def test_shapes_and_config_follow_ratios(arch, ratios, mode):
    model = tiny.make_model(arch)
    before = arch_spec(model).widths()
    compress.prune_model(model, ratios, None, "magnitude", mode=mode)
    after = arch_spec(model).widths()
    cfg = model.config
    if "ffn" in ratios:
        assert sum(after["ffn"]) == pytest.approx(sum(before["ffn"]) * (1 - ratios["ffn"]), abs=len(before["ffn"]))
        if mode == "uniform":
            assert cfg.to_dict().get("intermediate_size", cfg.to_dict().get("d_ff")) == after["ffn"][0]
    if "heads" in ratios:
        assert sum(after["heads"]) < sum(before["heads"])
    if "kv_heads" in ratios:
        assert after["kv_heads"] == [k // 2 for k in before["kv_heads"]]
        assert cfg.num_key_value_heads == after["kv_heads"][0]
        assert cfg.num_attention_heads == after["heads"][0]
    if "layers" in ratios:
        assert sum(after["layers"]) < sum(before["layers"])
        assert cfg.num_hidden_layers == after["layers"][0]
    if mode == "uniform":
        assert not cfg.model_type.startswith("compressed_")
    # a fresh model built from the rewritten config has exactly the pruned shapes
    rebuilt = type(model)(copy.deepcopy(cfg))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_gqa_heads_prune_per_kv_group():
    model = tiny.make_model("llama")  # 4 query heads, 2 kv heads
    report = compress.prune_model(model, {"heads": 0.5}, None, "random")
    for idxs in report.removed.values():
        assert sorted(h // 2 for h in idxs) == [0, 1], "one query head from each kv group"
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) == (16, 16, 1)


def test_decoder_generate_after_pruning_matches_without_cache():
    model = tiny.make_model("qwen2")
    compress.prune_model(model, {"kv_heads": 0.5, "layers": 0.5}, None, "magnitude")
    ids = tiny.make_batch("qwen2", batch_size=1, labels=False)["input_ids"]
    cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert model.model.layers[0].self_attn.layer_idx == 0


def test_t5_generate_after_head_pruning_matches_the_masked_original():
    model = tiny.make_model("t5")
    original = copy.deepcopy(model)
    sparsity = {"heads": 0.5, "ffn": 0.5}
    report = compress.prune_model(model, sparsity, None, "magnitude")
    ids = tiny.make_batch("t5", labels=False)["input_ids"]
    options = {"max_new_tokens": 6, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    out = model.generate(ids, **options)
    ctx = _masked_reference(original, sparsity, report.removed)
    try:
        expected = original.generate(ids, **options)
    finally:
        ctx.__exit__(None, None, None)
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-5)
    assert model.config.num_heads == 2
    assert model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.shape[1] == 2


def test_importance_criteria_find_dead_neurons():
    """Neurons whose output weights are zero cannot matter: every criterion but random removes them."""
    model = tiny.make_model("bert")
    dead = [1, 5, 9, 13, 17, 21, 25, 29]
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.output.dense.weight[:, dead] = 0
            layer.intermediate.dense.weight[dead] = 0
    for criterion in ("taylor", "taylor_elementwise", "fisher", "activation", "flap", "wanda_sp", "magnitude", "l1",
                      "l2"):
        m = copy.deepcopy(model)
        report = compress.prune_model(m, 0.125, ("ffn",), criterion, data=tiny.make_batches("bert", 2))
        assert all(idxs == dead for idxs in report.removed.values()), criterion
    r1 = compress.prune_model(copy.deepcopy(model), 0.125, ("ffn",), "random")
    assert any(idxs != dead for idxs in r1.removed.values())


def test_scoring_keeps_backbone_frozen_and_restores_flags():
    model = tiny.make_model("bert")
    model.classifier.weight.requires_grad_(False)
    compress.prune_model(model, 0.5, ("ffn",), "taylor", data=tiny.make_batches("bert", 2))
    assert all(p.grad is None for p in model.parameters()), "scoring must not create weight gradients"
    assert model.classifier.weight.requires_grad is False
    assert model.bert.embeddings.word_embeddings.weight.requires_grad is True


def test_custom_importance_interface():
    class LastChannels(compress.Importance):
        def __call__(self, unit, stats):
            return -torch.arange(unit.size, dtype=torch.float)

    model = tiny.make_model("bert")
    report = compress.prune_model(model, 0.25, ("ffn",), LastChannels())
    assert all(idxs == list(range(48, 64)) for idxs in report.removed.values())


def test_global_mode_allocates_by_importance():
    model = tiny.make_model("bert")
    with torch.no_grad():  # make layer 1's FFN nearly irrelevant: global pruning should take it first
        model.bert.encoder.layer[1].output.dense.weight.mul_(1e-3)
    compress.prune_model(model, 0.5, ("ffn",), "magnitude", mode="global")
    widths = arch_spec(model).widths()["ffn"]
    assert widths[1] < widths[0] and sum(widths) == 64
    assert type(model).__name__ == "CompressedBertForSequenceClassification"


def test_bias_compensation_brings_pruned_outputs_closer_to_dense():
    batches = tiny.make_batches("bert", 4)
    dense = tiny.make_model("bert")
    with torch.no_grad():  # BERT initialises biases to 0; give the FFN non-zero mean activations
        for layer in dense.bert.encoder.layer:
            layer.intermediate.dense.bias.uniform_(-1, 1)

    def hidden(model):
        with torch.no_grad():
            return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"},
                                    output_hidden_states=True).hidden_states[-1] for b in batches])

    errors = {}
    for compensate in (False, True):
        model = copy.deepcopy(dense)
        compress.prune_model(model, 0.5, ("ffn",), "taylor", data=batches, compensate_bias=compensate)
        errors[compensate] = (hidden(model) - hidden(dense)).pow(2).mean().item()
    assert errors[True] < 0.7 * errors[False], errors
    with pytest.raises(CalibrationError, match="compensate_bias=True measures mean activations"):
        compress.prune_model(copy.deepcopy(dense), 0.5, ("ffn",), "magnitude", compensate_bias=True)


@pytest.mark.parametrize("normalize,expected", [("none", [1, 63]), ("mean", [32, 32]), ("l2", [32, 32])])
def test_global_ranking_can_normalise_scores_per_layer(normalize, expected):
    model = tiny.make_model("bert")
    arch = arch_spec(model)
    units = units_for(arch, ["ffn"])
    # same ranking inside each layer, but layer 1's scores are 100x larger (as gradients near the loss are)
    scores = {u.key: torch.arange(1.0, 65.0) * (100.0 if i else 1.0) for i, u in enumerate(units)}
    removals = plan_removals(arch, units, scores, {"ffn": 0.5}, "global", normalize=normalize)
    assert [64 - len(removals[u.key]) for u in units] == expected
    # normalisation is a global-mode matter: uniform mode is unaffected
    assert plan_removals(arch, units, scores, {"ffn": 0.5}, "uniform", normalize=normalize) == \
        plan_removals(arch, units, scores, {"ffn": 0.5}, "uniform")
    with pytest.raises(CompressError, match="choose one of"):
        plan_removals(arch, units, scores, {"ffn": 0.5}, "global", normalize="zscore")


def _skewed_scores(units):
    # the same ranking inside each layer, but the last layer's scores are 100x larger (as near the loss)
    return {u.key: torch.arange(1.0, u.size + 1.0) * (100.0 if i == len(units) - 1 else 1.0)
            for i, u in enumerate(units)}


@pytest.mark.parametrize("arch,structure,ratio,max_keep,uncapped,capped", [
    ("bert", "ffn", 0.5, 0.75, [1, 63], [16, 48]),
    ("bert", "ffn", 0.5, 0.5, [1, 63], [32, 32]),
    ("bert", "ffn", 0.3, 0.7, [26, 64], [45, 45]),  # 0.7 x 64 = 44.8: a cap of 44 would remove more than 30%
    ("bert", "heads", 0.5, 0.75, [1, 3], [1, 3]),  # 3 of 4 heads is the cap already
    ("bert", "heads", 0.5, 0.5, [1, 3], [2, 2]),
    ("llama", "heads", 0.5, 0.5, [2, 2], [2, 2]),  # GQA: one query head per kv group, a cap cannot bind
    ("llama", "heads", 0.25, 0.75, [2, 4], [2, 4]),  # 3 of 4 heads rounds up to whole rows (2 per kv group)
    ("llama", "kv_heads", 0.5, 0.5, [1, 1], [1, 1]),
])
def test_global_max_keep_caps_every_layer_and_keeps_the_total(arch, structure, ratio, max_keep, uncapped, capped):
    model = tiny.make_model(arch)
    arch = arch_spec(model)
    units = units_for(arch, [structure])
    scores = _skewed_scores(units)
    sizes = {u.key: u.size for u in units}
    for cap, expected in ((None, uncapped), (max_keep, capped)):
        removals = plan_removals(arch, units, scores, {structure: ratio}, "global", max_keep=cap)
        kept = [sizes[u.key] - len(removals[u.key]) for u in units]
        if structure == "kv_heads":
            kept = [k // 2 for k in kept]  # two query heads per kv head
        assert kept == expected, (cap, kept)
        assert all(removals[u.key] == sorted(removals[u.key]) for u in units)


def test_global_max_keep_removes_each_layers_lowest_channels():
    model = tiny.make_model("bert")
    arch = arch_spec(model)
    units = units_for(arch, ["ffn"])
    scores = {u.key: torch.randperm(64, generator=torch.Generator().manual_seed(i)).float()
              for i, u in enumerate(units)}
    scores[units[1].key] = scores[units[1].key] * 100
    removals = plan_removals(arch, units, scores, {"ffn": 0.5}, "global", max_keep=0.6)
    for u in units:
        kept = set(range(64)) - set(removals[u.key])
        assert len(kept) <= int(0.6 * 64)
        assert min(scores[u.key][sorted(kept)]) >= max(scores[u.key][removals[u.key]])
    assert sum(len(r) for r in removals.values()) == 64


def test_prune_model_max_keep_end_to_end():
    model = tiny.make_model("bert")
    report = compress.prune_model(model, {"ffn": 0.5, "heads": 0.5}, structures=None, importance="taylor",
                                  data=tiny.make_batches("bert", 2), mode="global", max_keep=0.5)
    assert report.widths_after["ffn"] == [32, 32] and report.widths_after["heads"] == [2, 2]


@pytest.mark.parametrize("kwargs,match", [
    ({"max_keep": 0.0}, r"must be in \(0, 1\]"),
    ({"max_keep": 1.5}, r"must be in \(0, 1\]"),
    ({"max_keep": 0.4}, "max_keep=0.4: would remove more than the ffn sparsity 0.5: set it to at least 0.50"),
    ({"max_keep": 0.75, "mode": "uniform"}, "max_keep=0.75: caps per-layer widths in global mode"),
])
def test_bad_max_keep_fails_clearly(kwargs, match):
    with pytest.raises(CompressError, match=match):
        compress.prune_model(tiny.make_model("bert"), {"ffn": 0.5}, importance="magnitude",
                             **{"mode": "global", **kwargs})


@pytest.mark.parametrize("kwargs,error,match", [
    ({"sparsity": 1.0}, CompressError, r"\(0, 1\)"),
    ({"sparsity": 0.0}, CompressError, r"\(0, 1\)"),
    ({"structures": ("neurons",)}, CompressError, "unknown structure 'neurons'; choose from"),
    ({"structures": ("heads",)}, UnsupportedStructureError, "in uniform mode cannot be expressed.*use global mode"),
    ({"structures": ("kv_heads",), "mode": "global"}, UnsupportedStructureError, "supported structures"),
    ({"mode": "sideways"}, CompressError, "mode='sideways': choose one of uniform, global"),
    ({"importance": "vibes"}, CompressError, "choose one of"),
    ({"importance": "taylor"}, CalibrationError, "needs `data`"),
])
def test_bad_requests_fail_clearly(kwargs, error, match):
    args = {"sparsity": 0.5, "structures": ("ffn",), "importance": "magnitude", **kwargs}
    with pytest.raises(error, match=match):
        compress.prune_model(tiny.make_model("bert"), **args)


def test_unsupported_architecture_names_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="bert.*llama.*qwen2.*t5"):
        compress.prune_model(model, 0.5, ("ffn",), "magnitude")


def test_calibration_without_labels_fails_clearly():
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in tiny.make_batches("bert", 2)]
    with pytest.raises(CalibrationError, match="labels"):
        compress.prune_model(tiny.make_model("bert"), 0.5, ("ffn",), "taylor", data=batches)


# -- export -------------------------------------------------------------------------------------------
def _save(model, tmp_path, report, name="out"):
    return compress.save_pretrained(model, tmp_path / name, report=report)


def test_saved_folder_is_compact_safetensors_with_card(tmp_path):
    dense = tiny.make_model("llama")
    dense_dir = _save(dense, tmp_path, None, "dense")
    model = tiny.make_model("llama")
    report = compress.prune_model(model, {"ffn": 0.5, "kv_heads": 0.5}, None, "magnitude")
    out = _save(model, tmp_path, report)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files and "README.md" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    tensors = load_file(out / "model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == report.params_after
    ratio = (out / "model.safetensors").stat().st_size / (dense_dir / "model.safetensors").stat().st_size
    assert ratio == pytest.approx(report.params_after / report.params_before, abs=0.02)
    card = (out / "README.md").read_text()
    assert f"{report.params_before:,}" in card and f"{report.params_after:,}" in card
    assert "no extra package is needed" in card
    assert json.loads((out / "compress_report.json").read_text())["params_after"] == report.params_after


def test_save_is_atomic(tmp_path, monkeypatch):
    model = tiny.make_model("bert")
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        compress.save_pretrained(model, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "temporary folder left behind"
    monkeypatch.undo()
    compress.save_pretrained(model, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        compress.save_pretrained(model, out)
    compress.save_pretrained(model, out, overwrite=True)
    assert (out / "model.safetensors").exists() and len(list(tmp_path.iterdir())) == 1


def test_global_model_reloads_with_import_compress(tmp_path):
    model = tiny.make_model("bert")
    report = compress.prune_model(model, {"ffn": 0.5, "heads": 0.5}, None, "magnitude", mode="global")
    out = _save(model, tmp_path, report)
    assert json.loads((out / "config.json").read_text())["model_type"] == "compressed_bert"
    assert "import compress" in (out / "README.md").read_text()
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    batch = tiny.make_batch("bert", labels=False)
    torch.testing.assert_close(_logits(reloaded.eval(), batch), _logits(model, batch), rtol=0, atol=1e-6)


def test_loaded_model_made_compact_reports_compact_type(tmp_path):
    """from_pretrained stores model_type on the config instance; making it compact must not keep it."""
    compress.save_pretrained(tiny.make_model("bert"), tmp_path / "dense")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense")
    compress.prune_model(model, {"ffn": 0.5, "heads": 0.5}, None, "magnitude", mode="global")
    assert model.config.model_type == "compressed_bert"
    assert compress.export.needs_compress_to_load(model)


def test_compact_model_from_a_checkpoint_saves_its_adapter_without_type_warnings(tmp_path):
    """peft's save_pretrained re-reads the base checkpoint's config through the model's (now compact) config
    class; a plain base config must read as a compact one with uniform widths, silently."""
    from peft import get_peft_model
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    compress.save_pretrained(tiny.make_model("bert"), tmp_path / "dense")
    compact_cls = compress.pruning.compact.compact_config_class(BertConfig)
    capture = CaptureLogger(hf_logging.get_logger("transformers.configuration_utils"))
    with capture:
        config = compact_cls.from_pretrained(tmp_path / "dense")
        base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense")
        pa_config = compress.PruningAdapterConfig(task_type="SEQ_CLS", r=4, sparsity={"ffn": 0.5, "heads": 0.5},
                                                  mode="global", importance="magnitude")
        model = get_peft_model(base, pa_config)
        model.base_model.prune()
        assert model.get_base_model().config.model_type == "compressed_bert"
        model.save_pretrained(tmp_path / "adapter")
    assert "to instantiate a model of type" not in capture.out, capture.out
    assert config.model_type == "compressed_bert" and config.vocab_size == tiny.VOCAB
    assert not getattr(config, "compress_shapes", None)  # uniform widths: nothing to shrink

    class ProjectConfig(compact_cls):  # a user's subclass reads checkpoints the same way
        pass

    assert ProjectConfig.from_pretrained(tmp_path / "dense").vocab_size == tiny.VOCAB


_FRESH = textwrap.dedent("""
    import json, sys, torch
    from transformers import {auto}, pipeline
    out, batch_file, expected_file = sys.argv[1:4]
    model = {auto}.from_pretrained(out).eval()
    assert "compress" not in sys.modules, "plain transformers must not import compress"
    batch = torch.load(batch_file)
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(logits, torch.load(expected_file), rtol=0, atol=1e-5)
    {extra}
    print("FRESH-OK")
""")


def _fresh_reload(out, auto, batch, expected, tmp_path, extra=""):
    torch.save(batch, tmp_path / "batch.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = _FRESH.format(auto=auto, extra=extra)
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "batch.pt"),
                           str(tmp_path / "expected.pt")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert "FRESH-OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("arch,ratios,auto", [
    ("bert", {"ffn": 0.5, "layers": 0.5}, "AutoModelForSequenceClassification"),
    ("qwen2", {"ffn": 0.5, "kv_heads": 0.5, "layers": 0.5}, "AutoModelForCausalLM"),
    ("t5", {"ffn": 0.5, "heads": 0.5}, "AutoModelForSeq2SeqLM"),
])
def test_uniform_model_reloads_in_fresh_process_without_compress(tmp_path, arch, ratios, auto):
    model = tiny.make_model(arch)
    report = compress.prune_model(model, ratios, None, "taylor", data=tiny.make_batches(arch, 2))
    out = _save(model, tmp_path, report)
    batch = tiny.make_batch(arch, labels=False)
    _fresh_reload(out, auto, batch, _logits(model, batch), tmp_path)


@pytest.mark.slow
def test_uniform_bert_pipeline_in_fresh_process(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "movie", "very"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    model = tiny.make_model("bert")
    report = compress.prune_model(model, 0.5, ("ffn",), "magnitude")
    out = compress.save_pretrained(model, tmp_path / "out", tokenizer=tokenizer, report=report)
    batch = dict(tokenizer(["very good movie"], return_tensors="pt"))
    extra = ("clf = pipeline('text-classification', model=out, device='cpu');"
             " res = clf('very good movie'); assert res[0]['label'].startswith('LABEL_'), res")
    _fresh_reload(out, "AutoModelForSequenceClassification", batch, _logits(model, batch), tmp_path, extra)


# -- what the caller gets back ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_prune_model_keeps_every_module_in_its_train_or_eval_mode(arch):
    model = tiny.make_model(arch)
    model.train()
    head = model.classifier if arch == "bert" else model.lm_head
    head.eval()  # a mixed state, e.g. a frozen head
    before = {name: m.training for name, m in model.named_modules()}
    compress.prune_model(model, 0.5, ("ffn",), "magnitude")
    assert {name: m.training for name, m in model.named_modules()} == before
    model.eval()
    compress.prune_model(model, 0.5, ("ffn",), "taylor", data=tiny.make_batches(arch, 2))
    assert not any(m.training for m in model.modules())


def test_report_states_the_ratio_achieved():
    model = tiny.make_model("llama")  # 4 query heads in 2 kv groups, 2 layers
    report = compress.prune_model(model, {"heads": 0.3, "ffn": 0.5}, None, "magnitude")
    assert report.sparsity == {"heads": 0.3, "ffn": 0.5}
    assert report.achieved_sparsity == {"heads": 0.5, "ffn": 0.5}  # one head per kv group is the smallest step
    report = compress.prune_model(tiny.make_model("llama"), {"layers": 0.4}, None, "magnitude")
    assert report.achieved_sparsity == {"layers": 0.5}


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 0.5, "round_to": 1000}, "ffn: sparsity 0.5 removes nothing .*round_to=1000"),
    ({"sparsity": 0.001}, "ffn: sparsity 0.001 removes nothing"),
])
def test_a_ratio_that_removes_nothing_is_an_error_and_changes_nothing(kwargs, match):
    model = tiny.make_model("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(compress.NothingToPruneError, match=match):
        compress.prune_model(model, structures=("ffn",), importance="magnitude", **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_layers_wrapped_by_adapters_that_cannot_shrink_are_refused_by_name_before_anything_changes():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny.make_model("bert"), LoraConfig(task_type="SEQ_CLS", r=4,
                                                               target_modules=["output.dense"])).base_model.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompressError, match="bert.encoder.layer.0.output.dense is a peft.tuners.lora.layer.Linear, "
                                            "whose adapters cannot lose channels: prune the base model before"):
        compress.prune_model(model, {"ffn": 0.5}, None, "magnitude")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_structures_given_as_a_string():
    report = compress.prune_model(tiny.make_model("llama"), 0.5, "ffn", "magnitude")
    assert report.sparsity == {"ffn": 0.5}
    report = compress.prune_model(tiny.make_model("llama"), 0.5, "ffn,kv_heads", "magnitude")
    assert report.sparsity == {"ffn": 0.5, "kv_heads": 0.5}


@pytest.mark.parametrize("kwargs,match", [
    ({"round_to": 0}, "round_to=0: must be a positive integer"),
    ({"round_to": 2.5}, "round_to=2.5: must be a positive integer"),
    ({"num_batches": -1}, "num_batches=-1: must be a positive integer"),
    ({"sparsity": "0.5"}, "sparsity='0.5': a sparsity is the fraction removed: a number in \\(0, 1\\)"),
    ({"sparsity": {"ffn": None}}, "sparsity\\['ffn'\\]=None: a sparsity is the fraction removed"),
    ({"structures": ("ffn", "ffn")}, "names a structure twice"),
    ({"structures": (1,)}, "unknown structure 1"),
    ({"normalize": "max"}, "normalize='max'"),
])
def test_bad_arguments_name_the_field(kwargs, match):
    args = {"sparsity": 0.5, "structures": ("ffn",), "importance": "magnitude", **kwargs}
    with pytest.raises(compress.CompressError, match=match):
        compress.prune_model(tiny.make_model("bert"), **args)


def test_structures_that_are_not_names_are_refused_with_the_option_named():
    with pytest.raises(compress.InvalidOptionError, match="structures=3: give structure names"):
        compress.prune_model(tiny.make_model("bert"), 0.5, 3, "magnitude")
