"""Diagnosis: Ladder Side-Tuning of a BERT classifier trained on cached backbone states, epoch by epoch.

The backbone is frozen and the side network never feeds into it, so the backbone's hidden states (its embedding
output and every block's output, computed once in eval mode) are cached; the side network, ladders, gates,
pooling and classifier then train on them through the method's own forward after the backbone
(``LadderSideModel._run_side``), in minutes per configuration instead of hours. Each epoch prints, as one JSON
line, the mean training loss, the accuracy on the first ``--train-eval-rows`` training rows and on the test
split, the share of rows predicted as class 1, the gates, and each side block's mean attention entropy in nats
over the test rows' real tokens (``entropy_uniform``: the entropy of attention spread evenly over a row).

    python recipes/diagnose_ladder_side.py --glue-task MRPC --epochs 10 --lr 3e-3 --pooling model
    python recipes/diagnose_ladder_side.py --glue-task MRPC --epochs 5 --seed 1
    python recipes/diagnose_ladder_side.py --glue-task MRPC --probe --epochs 30

``--probe`` measures what the frozen backbone's features allow at all, without a side network: for each of its
hidden states (embedding output, then every block), a classifier (one tanh layer of 256, dropout 0.1) trains on
the pair features ``[u, v, |u - v|, u * v, cos(u, v)]`` of the two segments' mean states at the backbone's full
width, one JSON line per hidden state (training and test accuracy after the last epoch, and the best test
accuracy of any epoch).

Differences from a real run (``recipes/bench_ladder_side.py``): the backbone's dropout is off (its states are
cached once), and rows are batched in random order without grouping by length.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

import compress
from common.ladder_side import init_side
from common.recipe import GLUE_TASKS, load_splits, setup_run
from common.train import load_sequence_classifier, minilm_path
from compress.export import write_text_atomically

REPO = Path(__file__).resolve().parents[1]


def _save_atomically(value, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        torch.save(value, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def cached_states(model, tokenizer, dataset, path: Path, max_length: int, batch_size: int = 32) -> list[dict]:
    """Per row: the backbone's hidden states (embedding output, then each block's output; float16,
    ``[blocks + 1, tokens, width]``), ``token_type_ids`` and ``label``; computed in eval mode, saved at ``path``."""
    if path.is_file():
        return torch.load(path)
    bert = model.base_model.eval()
    pairs = "text_pair" in dataset.column_names
    rows = []
    for start in range(0, len(dataset), batch_size):
        part = dataset[start:start + batch_size]
        encoded = tokenizer(part["text"], part["text_pair"] if pairs else None, padding=True, truncation=True,
                            max_length=max_length, return_token_type_ids=True, return_tensors="pt")
        with torch.no_grad():
            states = torch.stack(bert(**encoded, output_hidden_states=True).hidden_states, dim=1).half()
        for k, label in enumerate(part["label"]):
            length = int(encoded["attention_mask"][k].sum())
            rows.append({"states": states[k, :, :length].clone(), "label": int(label),
                         "token_type_ids": encoded["token_type_ids"][k, :length].clone()})
    _save_atomically(rows, path)
    return rows


def collate(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states ``[batch, blocks + 1, tokens, width]``, attention mask, token type ids, labels), right-padded."""
    blocks, _, width = rows[0]["states"].shape
    length = max(r["states"].shape[1] for r in rows)
    states = torch.zeros(len(rows), blocks, length, width)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    types = torch.zeros_like(mask)
    for k, row in enumerate(rows):
        n = row["states"].shape[1]
        states[k, :, :n], mask[k, :n], types[k, :n] = row["states"].float(), 1, row["token_type_ids"]
    return states, mask, types, torch.tensor([r["label"] for r in rows])


def classify_cached(peft_model, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, attention mask) of a Ladder Side-Tuning BERT classifier on cached backbone states: the
    method's own forward after the backbone (``LadderSideModel._run_side``) and the task model's classifier, on
    the states instead of a backbone run."""
    tuner = peft_model.base_model
    task_model = tuner.model
    config = tuner.active_config
    states, mask, types, labels = collate(rows)
    blocks = config.side_layers or range(states.shape[1] - 1)
    ladders = [states[:, 0], *(states[:, i + 1] for i in blocks)]
    outputs = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=states[:, -1],
                                                           pooler_output=states[:, -1, 0])
    outputs = tuner._run_side(0, task_model.bert, (), {"attention_mask": mask, "token_type_ids": types}, outputs,
                              ladders)
    return task_model.classifier(task_model.dropout(outputs.pooler_output)), labels, mask


def pair_features(rows: list[dict], layer: int) -> torch.Tensor:
    """``[u, v, |u - v|, u * v, cos(u, v)]`` per row, ``u`` / ``v`` the mean of hidden state ``layer`` over the
    first / second segment's tokens (``v`` over the whole row when it has one segment)."""
    features = []
    for row in rows:
        states, types = row["states"][layer].float(), row["token_type_ids"]
        u = states[types == 0].mean(0)
        v = states[types != 0].mean(0) if bool((types != 0).any()) else states.mean(0)
        features.append(torch.cat([u, v, (u - v).abs(), u * v, torch.cosine_similarity(u, v, dim=0)[None]]))
    return torch.stack(features)


def probe_layer(train_rows: list[dict], test_rows: list[dict], layer: int, args) -> dict:
    """Train a one-hidden-layer classifier on :func:`pair_features` of hidden state ``layer``; its accuracies."""
    train_x, test_x = pair_features(train_rows, layer), pair_features(test_rows, layer)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_y = torch.tensor([r["label"] for r in train_rows])
    test_y = torch.tensor([r["label"] for r in test_rows])
    torch.manual_seed(args.seed)
    classifier = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(train_x.shape[1], 256), torch.nn.Tanh(),
                                     torch.nn.Dropout(0.1), torch.nn.Linear(256, int(train_y.max()) + 1))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    best = 0.0
    for _ in range(max(1, round(args.epochs))):
        classifier.train()
        for batch in torch.randperm(len(train_x)).split(args.batch_size):
            loss = torch.nn.functional.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        classifier.eval()
        with torch.no_grad():
            test_acc = (classifier(test_x).argmax(-1) == test_y).float().mean().item()
            train_acc = (classifier(train_x).argmax(-1) == train_y).float().mean().item()
        best = max(best, test_acc)
    return {"hidden_state": layer, "train_acc": round(train_acc, 4), "test_acc": round(test_acc, 4),
            "best_test_acc": round(best, 4)}


def pool_as_one_segment(network) -> None:
    """Make a side network's segment pooling take every row as one segment (mean pooling over its tokens)."""
    pool_segments = network.pool_segments
    network.pool_segments = lambda states, mask, types: pool_segments(states, mask, None)


class AttentionEntropy:
    """Each side block's mean attention entropy, from its query and key projections' outputs (BERT blocks)."""

    def __init__(self, side) -> None:
        self.blocks = list(side.encoder.layer)
        self.seen: dict[tuple[str, int], torch.Tensor] = {}
        for j, block in enumerate(self.blocks):
            for name in ("query", "key"):
                getattr(block.attention.self, name).register_forward_hook(self._keep(name, j))

    def _keep(self, name: str, j: int):
        def hook(module, args, output) -> None:
            self.seen[name, j] = output.detach()
        return hook

    def __call__(self, mask: torch.Tensor) -> list[float]:
        """Entropies of the last forward, averaged over heads and the real query tokens of ``mask``'s rows."""
        entropies = []
        keep = mask.float()
        for j, block in enumerate(self.blocks):
            heads, size = block.attention.self.num_attention_heads, block.attention.self.attention_head_size
            q, k = (self.seen[name, j].unflatten(-1, (heads, size)).transpose(1, 2) for name in ("query", "key"))
            scores = q @ k.transpose(-1, -2) / math.sqrt(size) + (1 - keep[:, None, None, :]) * -1e9
            p = scores.softmax(-1)
            entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)  # [batch, heads, tokens]
            weights = keep[:, None, :].expand_as(entropy)
            entropies.append(round(((entropy * weights).sum() / weights.sum()).item(), 2))
        return entropies


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--glue-task", choices=GLUE_TASKS, default="MRPC", help="../shared/data/glue/<task> (MRPC)")
    p.add_argument("--model", default=None, help="a BERT checkpoint folder (default: the packaged MiniLM-L6)")
    p.add_argument("--epochs", type=float, default=10, help="epochs over the training rows (10)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, linear warm-up 10%% then decay (1e-3)")
    p.add_argument("--r", type=int, default=8, help="reduction factor of the side network (8)")
    p.add_argument("--pooling", choices=["segments", "model"], default="segments",
                   help="what the classifier reads (segments)")
    p.add_argument("--pool-one-segment", action="store_true",
                   help="with pooling=segments: pool the whole input as one segment (mean pooling; the side network "
                        "still reads the token types)")
    p.add_argument("--side-init", choices=["pruned", "random"], default="pruned")
    p.add_argument("--importance", choices=["fisher", "magnitude"], default="fisher")
    p.add_argument("--gate-temperature", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--train-eval-rows", type=int, default=408, help="training rows whose accuracy is reported (408)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=str(REPO / "runs" / "lst_states"), help="where the backbone states go")
    p.add_argument("--probe", action="store_true",
                   help="no side network: a classifier on the frozen backbone's own pair features per hidden state")
    p.add_argument("--out", default=None, help="also write the epochs' lines to this JSON file")
    args = p.parse_args(argv)
    setup_run()
    torch.manual_seed(args.seed)
    train, test, source = load_splits(args.glue_task)
    num_labels = len(set(train["label"]))
    path = args.model or minilm_path()
    model, tokenizer = load_sequence_classifier(path, num_labels=num_labels, seed=args.seed)
    key = hashlib.sha1(f"{Path(path).resolve()}|{args.glue_task}|{args.max_length}".encode()).hexdigest()[:12]
    cache = Path(args.cache_dir)
    train_rows = cached_states(model, tokenizer, train, cache / f"{args.glue_task}-train-{key}.pt", args.max_length)
    test_rows = cached_states(model, tokenizer, test, cache / f"{args.glue_task}-test-{key}.pt", args.max_length)
    if args.probe:
        lines = []
        for layer in range(train_rows[0]["states"].shape[0]):
            lines.append(probe_layer(train_rows, test_rows, layer, args))
            print(json.dumps(lines[-1]), flush=True)
        if args.out:
            write_text_atomically(args.out, json.dumps({"config": vars(args), "probe": lines}, indent=1))
        return 0

    config = compress.LadderSideConfig(task_type="SEQ_CLS", r=args.r, pooling=args.pooling, side_init=args.side_init,
                                       importance=args.importance, gate_temperature=args.gate_temperature)
    peft_model = get_peft_model(model, config)
    if args.side_init == "pruned":
        init_side(peft_model, tokenizer, argparse.Namespace(max_length=args.max_length, calib_batches=8,
                                                            calib_batch_size=8), train)
    network = peft_model.base_model.lst_side.lst_network["default"]
    entropy = AttentionEntropy(network.side)
    if args.pool_one_segment:
        pool_as_one_segment(network)

    def accuracy(rows: list[dict]) -> tuple[float, float, list[float]]:
        peft_model.eval()
        correct, positive = 0, 0
        with torch.no_grad():
            for start in range(0, len(rows), 64):
                logits, labels, _ = classify_cached(peft_model, rows[start:start + 64])
                correct += int((logits.argmax(-1) == labels).sum())
                positive += int((logits.argmax(-1) == 1).sum())
            _, _, mask = classify_cached(peft_model, rows[:64])
            entropies = entropy(mask)
        peft_model.train()
        return correct / len(rows), positive / len(rows), entropies

    trainable = [q for q in peft_model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    per_epoch = len(train_rows) // args.batch_size
    total = max(1, round(args.epochs * per_epoch))
    warmup = int(0.1 * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup
                                                 else max(0.0, (total - s) / max(1, total - warmup)))
    lengths = [r["states"].shape[1] for r in test_rows[:64]]  # (averaged over real tokens, as the entropies)
    uniform = round(sum(n * math.log(n) for n in lengths) / sum(lengths), 2)
    print(json.dumps({"config": vars(args), "data": source, "trainable": sum(q.numel() for q in trainable),
                      "entropy_uniform": uniform}), flush=True)
    order_rng = torch.Generator().manual_seed(args.seed)
    lines, losses, step, started = [], [], 0, time.time()
    peft_model.train()
    while step < total:
        order = torch.randperm(len(train_rows), generator=order_rng).tolist()
        for start in range(0, per_epoch * args.batch_size, args.batch_size):
            logits, labels, _ = classify_cached(peft_model, [train_rows[i] for i in
                                                              order[start:start + args.batch_size]])
            loss = torch.nn.functional.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            if step % per_epoch == 0 or step == total:
                train_acc, _, _ = accuracy(train_rows[:args.train_eval_rows])
                test_acc, positive, entropies = accuracy(test_rows)
                line = {"epoch": round(step / per_epoch, 2), "step": step, "loss": round(sum(losses) / len(losses), 4),
                        "train_acc": round(train_acc, 4), "test_acc": round(test_acc, 4),
                        "predicted_1": round(positive, 3),
                        "gates": [round(g, 2) for g in network.gate_values()[0].tolist()],
                        "entropy": entropies, "seconds": round(time.time() - started)}
                print(json.dumps(line), flush=True)
                lines.append(line)
                losses = []
            if step >= total:
                break
    if args.out:
        write_text_atomically(args.out, json.dumps({"config": vars(args), "epochs": lines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
