"""Tiny random models and inputs for every supported architecture family.

Each factory builds a model from a config with a fixed seed, so tests never touch the network.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 128
ARCHITECTURES = ("bert", "roberta", "llama", "qwen2", "t5")


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, num_labels=2)
        model = BertForSequenceClassification(cfg)
    elif arch == "roberta":
        cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=70, num_labels=2,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2)
        model = RobertaForSequenceClassification(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=64,
                          max_position_embeddings=64, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif arch == "llama-cls":  # a decoder classifier: its head reads the last token that is not padding
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=64,
                          max_position_embeddings=64, num_labels=2, pad_token_id=0)
        model = LlamaForSequenceClassification(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                          tie_word_embeddings=False)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "t5":
        cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                       num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                       pad_token_id=0, eos_token_id=1)
        model = T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    return model


def make_batch(arch: str, batch_size: int = 2, seq_len: int = 8, seed: int = 1, labels: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch in ("bert", "roberta", "llama-cls"):
        if labels:
            batch["labels"] = torch.randint(0, 2, (batch_size,), generator=g)
    elif arch == "t5":
        batch["labels"] = torch.randint(3, VOCAB, (batch_size, 4), generator=g)
        if not labels:
            batch["decoder_input_ids"] = batch.pop("labels")
    elif labels:
        batch["labels"] = ids.clone()
    return batch


def make_batches(arch: str, n: int = 4, **kw) -> list[dict]:
    return [make_batch(arch, seed=100 + i, **kw) for i in range(n)]
