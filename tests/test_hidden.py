"""Hidden-size (residual-stream) pruning on tiny random BERT, RoBERTa, Llama, Qwen2 and T5 models."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForQuestionAnswering,
    LlamaConfig,
    LlamaForCausalLM,
)

import compress
from compress.errors import CompressError, UnsupportedStructureError
from compress.pruning.arch import arch_spec
from compress.pruning.importance import GateStats, Importance, Unit
from tests import tiny

REPO = Path(__file__).resolve().parents[1]
AUTO = {"bert": AutoModelForSequenceClassification, "roberta": AutoModelForSequenceClassification,
        "llama": AutoModelForCausalLM, "qwen2": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM}
#: the mode each family needs for hidden pruning: BERT's config derives the head size from the hidden size
MODE = {"bert": "global", "roberta": "global", "llama": "uniform", "qwen2": "uniform", "t5": "uniform"}
RMS_FAMILIES = ("llama", "qwen2", "t5")


class _LowestFirst(Importance):
    """Scores that put the given hidden channels lowest (and keep every other structure's order)."""

    def __init__(self, channels: list[int]):
        self.channels = channels

    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        scores = torch.arange(unit.size, dtype=torch.float32) + 10.0
        if unit.structure == "hidden":
            scores[self.channels] = 0.0
        return scores


def _logits(model, arch: str, seed: int = 1) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tiny.make_batch(arch, labels=False, seed=seed)).logits


def _residual_widths(model) -> set[int]:
    site = arch_spec(model).hidden_site()
    widths = {e.weight.shape[1] for e in site.embeddings}
    widths |= {r.weight.shape[1] for r in site.readers} | {w.weight.shape[0] for w in site.writers}
    return widths | {n.weight.shape[0] for n, _ in site.norms}


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
@pytest.mark.parametrize("importance", ["magnitude", "taylor", "activation"])
def test_every_residual_tensor_has_the_new_width(arch, importance):
    model = tiny.make_model(arch)
    report = compress.prune_model(model, {"hidden": 0.25}, None, importance, data=tiny.make_batches(arch, 2),
                                  mode=MODE[arch])
    assert _residual_widths(model) == {24}
    assert report.achieved_sparsity == {"hidden": 0.25}
    width = model.config.d_model if arch == "t5" else model.config.hidden_size
    assert width == 24
    # a model rebuilt from the rewritten config has exactly the pruned shapes
    rebuilt = type(model)(copy.deepcopy(model.config))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert _logits(model, arch).isfinite().all()


@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_reload_gives_the_same_logits(arch, tmp_path):
    model = tiny.make_model(arch)
    compress.prune_model(model, {"hidden": 0.25, "ffn": 0.5}, None, "magnitude", mode=MODE[arch])
    compress.save_pretrained(model, tmp_path / "out")
    reloaded = AUTO[arch].from_pretrained(tmp_path / "out")
    assert reloaded.config.model_type == ("compressed_" + arch if MODE[arch] == "global" else arch)
    torch.testing.assert_close(_logits(reloaded, arch), _logits(model, arch), rtol=0, atol=1e-5)


_FRESH = textwrap.dedent("""
    import sys, torch, transformers
    if sys.argv[3] == "compress":
        import compress  # noqa: F401  (compact classes)
    model = getattr(transformers, sys.argv[2]).from_pretrained(sys.argv[1]).eval()
    batch = torch.load(sys.argv[4])
    with torch.no_grad():
        torch.save(model(**batch).logits, sys.argv[5])
""")


@pytest.mark.slow
@pytest.mark.parametrize("arch", tiny.ARCHITECTURES)
def test_fresh_process_reload(arch, tmp_path):
    """Llama, Qwen2 and T5 reload with plain transformers; BERT and RoBERTa after ``import compress``."""
    model = tiny.make_model(arch)
    compress.prune_model(model, {"hidden": 0.25}, None, "magnitude", mode=MODE[arch])
    compress.save_pretrained(model, tmp_path / "out")
    batch = tiny.make_batch(arch, labels=False)
    torch.save(batch, tmp_path / "batch.pt")
    needs = "compress" if MODE[arch] == "global" else "plain"
    proc = subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path / "out"), AUTO[arch].__name__, needs,
                           str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), _logits(model, arch), rtol=0, atol=1e-5)


def _zero_channels(model, channels: list[int]) -> None:
    """Make hidden ``channels`` zero in every tensor that writes the stream, so the stream never carries them."""
    site = arch_spec(model).hidden_site()
    with torch.no_grad():
        for embedding in site.embeddings:
            embedding.weight[:, channels] = 0.0
        for writer in site.writers:
            writer.weight[channels] = 0.0
            if writer.bias is not None:
                writer.bias[channels] = 0.0


@pytest.mark.parametrize("arch", RMS_FAMILIES)
def test_removing_channels_the_stream_never_carries_changes_nothing(arch):
    """RMS-style norms average over the channels that remain; their weights are rescaled by sqrt(n / kept)."""
    model = tiny.make_model(arch)
    gone = [3, 17, 20, 31]
    _zero_channels(model, gone)
    before = _logits(model, arch)
    report = compress.prune_model(model, {"hidden": 0.125}, None, _LowestFirst(gone))
    assert report.removed["hidden"] == gone
    torch.testing.assert_close(_logits(model, arch), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", RMS_FAMILIES)
def test_without_the_rescale_the_same_removal_changes_the_output(arch, monkeypatch):
    """The exact check above depends on the rescale (so it can fail)."""
    model = tiny.make_model(arch)
    gone = [3, 17, 20, 31]
    _zero_channels(model, gone)
    before = _logits(model, arch)
    site_of = type(arch_spec(model)).hidden_site

    def no_rescale(self):
        site = site_of(self)
        site.norms = [(norm, False) for norm, _ in site.norms]
        return site

    monkeypatch.setattr(type(arch_spec(model)), "hidden_site", no_rescale)
    compress.prune_model(model, {"hidden": 0.125}, None, _LowestFirst(gone))
    assert not torch.allclose(_logits(model, arch), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_bert_recovery_training_closes_the_gap(arch):
    """LayerNorm also subtracts the mean, so no removal is exact for BERT; a few steps of training the pruned
    model towards the original's outputs must shrink the difference."""
    original = tiny.make_model(arch)
    model = copy.deepcopy(original)
    compress.prune_model(model, {"hidden": 0.25}, None, "magnitude", mode="global")
    batches = tiny.make_batches(arch, 4, labels=False)
    targets = [_logits(original, arch, seed=100 + i) for i in range(4)]

    def gap() -> float:
        model.eval()
        with torch.no_grad():
            return sum(float((model(**b).logits - t).pow(2).mean()) for b, t in zip(batches, targets))

    start = gap()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()  # dropout off: the targets are the original's deterministic outputs
    for step in range(100):
        batch, target = batches[step % 4], targets[step % 4]
        loss = (model(**batch).logits - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert gap() < 0.1 * start


def test_tied_embeddings_stay_tied_and_generate_matches_with_and_without_cache():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    compress.prune_model(model, {"hidden": 0.25, "kv_heads": 0.5}, None, "magnitude")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.shape == (tiny.VOCAB, 24)
    ids = tiny.make_batch("llama", batch_size=1, labels=False)["input_ids"]
    model.eval()
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_t5_shared_embedding_stays_shared():
    model = tiny.make_model("t5")
    compress.prune_model(model, {"hidden": 0.25}, None, "magnitude")
    assert model.shared.weight is model.encoder.embed_tokens.weight is model.decoder.embed_tokens.weight
    assert model.shared.weight.shape[1] == 24 and model.model_dim == 24


def test_hidden_and_other_structures_together_match_shapes_and_reload(tmp_path):
    model = tiny.make_model("qwen2")
    compress.prune_model(model, {"hidden": 0.25, "ffn": 0.5, "heads": 0.5, "layers": 0.5}, None, "taylor",
                         data=tiny.make_batches("qwen2", 2))
    assert model.config.hidden_size == 24 and model.config.num_hidden_layers == 1
    compress.save_pretrained(model, tmp_path / "out")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), "qwen2"),
                               _logits(model, "qwen2"), rtol=0, atol=1e-5)


def test_activation_importance_removes_the_quietest_hidden_channels():
    model = tiny.make_model("llama")
    quiet = [0, 5, 9, 30]
    with torch.no_grad():  # those channels carry almost nothing: tiny norm weights
        for norm, _ in arch_spec(model).hidden_site().norms:
            norm.weight[quiet] = 1e-4
    report = compress.prune_model(model, {"hidden": 0.125}, None, "activation", data=tiny.make_batches("llama", 2))
    assert report.removed["hidden"] == quiet


def test_bert_hidden_in_uniform_mode_names_the_mode_that_works():
    with pytest.raises(UnsupportedStructureError, match="pruning 'hidden' in uniform mode.*use global mode"):
        compress.prune_model(tiny.make_model("bert"), {"hidden": 0.25}, None, "magnitude")


def test_an_unknown_task_head_is_refused_before_anything_changes():
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompressError, match="hidden: the dependency graph .* also couples \\['qa_outputs'\\]"):
        compress.prune_model(model, {"hidden": 0.25}, None, "magnitude", mode="global")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_refused_hidden_prune_with_bias_compensation_changes_no_tensor():
    torch.manual_seed(0)
    model = BertForQuestionAnswering(BertConfig(vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(CompressError, match="also couples \\['qa_outputs'\\]"):
        compress.prune_model(model, {"hidden": 0.25, "ffn": 0.5}, None, "magnitude", mode="global",
                             data=tiny.make_batches("bert", 2, labels=False), compensate_bias=True)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    changed = [name for name, p in after.items() if not torch.equal(p, before[name])]
    assert not changed, changed


def test_activation_cannot_score_layers_and_says_so_before_any_calibration(monkeypatch):
    from compress.pruning import engine
    from compress.pruning.importance import available_importances
    from compress.pruning.spec import PruningSpec

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the options were checked")

    monkeypatch.setattr(engine, "collect_gate_stats", no_calibration)
    refusal = r"^importance='activation': .*'layers'"  # the option, its value and the structure
    with pytest.raises(compress.InvalidOptionError, match=refusal) as refused:
        compress.prune_model(tiny.make_model("llama"), {"ffn": 0.5, "layers": 0.5}, None, "activation",
                             data=tiny.make_batches("llama", 2))
    assert "'ffn'" not in str(refused.value)  # only what it cannot score
    fixes = [name for name in available_importances()
             if name != "activation" and re.search(rf"\b{name}\b", str(refused.value))]
    assert fixes, "the error names a criterion to use instead"
    for name in fixes:  # and each one it names does score layers
        PruningSpec(sparsity={"layers": 0.5}, importance=name)
    with pytest.raises(compress.InvalidOptionError, match=refusal):
        PruningSpec(sparsity={"layers": 0.5}, importance="Activation")
    PruningSpec(sparsity={"ffn": 0.5, "heads": 0.5, "hidden": 0.25}, importance="activation")  # channels it scores
