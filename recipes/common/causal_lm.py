"""Recovery training of a pruned causal LM: what ``recipes/llm_prune.py`` shares with its training-memory jobs, which
:mod:`common.memory` runs in a fresh process.

- :func:`lora_config`: LoRA on every attention and FFN projection of the decoder (its family's
  :attr:`compress.pruning.arch.ArchSpec.projection_names`).
- :func:`distillation_loss` and :class:`DistilledCausalLM`: a student whose loss mixes the language-model loss with
  logit distillation from a frozen teacher (the dense model), as Minitron recovers pruned models.
- :func:`train_causal_lm`: the recovery loop: AdamW on the trainable parameters, linear warm-up then linear decay,
  gradient clipping, a progress bar with the loss and seconds per step, optional evaluations along the way, and the
  RSS high-water mark of the training steps.
- :func:`memory_setup`: the :class:`~common.memory.TrainingSetup` of one recovery configuration (LoRA or full
  fine-tuning) for :func:`common.memory.peak_training_memory`.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["DistilledCausalLM", "TrainingStats", "distillation_loss", "lora_config", "lora_targets", "memory_setup",
           "train_causal_lm", "training_batches"]


def lora_targets(model: nn.Module) -> list[str]:
    """The attention and FFN projections of ``model``'s architecture family (compact classes included), the
    modules LoRA adapts; families compress does not know are refused by :func:`compress.pruning.arch.arch_spec`."""
    from compress.pruning.arch import arch_spec

    return list(arch_spec(model).projection_names)


def lora_config(model: nn.Module, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0):
    """A causal-LM ``LoraConfig`` of rank ``r`` on every projection :func:`lora_targets` names (biases frozen)."""
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=lora_targets(model), bias="none")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
                      ) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` of the next-token distributions softened by ``T``, averaged over every
    position (forward KL, Hinton et al.; the ``T^2`` keeps its gradients on the scale of the unsoftened loss)."""
    vocab = student_logits.shape[-1]
    student = student_logits.float().reshape(-1, vocab)
    soften = temperature != 1.0  # no copies of vocabulary-wide tensors when there is nothing to soften
    if soften:
        student = student / temperature
    with torch.no_grad():
        teacher = teacher_logits.float().reshape(-1, vocab)
        if soften:
            teacher = teacher / temperature
        log_probs = F.log_softmax(teacher, dim=-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs).sum(-1).mean()
        del log_probs
    # KL = H(teacher, student) - H(teacher): the cross-entropy with soft targets keeps one log-softmax for backward
    return (F.cross_entropy(student, probs) - entropy) * temperature ** 2


class DistilledCausalLM(nn.Module):
    """A causal LM trained on ``(1 - weight) * CE + weight * KL``: the language-model loss on the tokens and
    :func:`distillation_loss` against a frozen ``teacher`` run on the same inputs without gradients.

    The teacher is kept out of the module tree: it is never trained, saved or switched to training mode with the
    student. The last step's two terms are kept in :attr:`last_terms` for logging.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float, temperature: float = 1.0):
        super().__init__()
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"distillation weight must be in (0, 1], got {weight}")
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be positive, got {temperature}")
        self.student = student
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)
        self.weight, self.temperature = float(weight), float(temperature)
        self.last_terms: dict[str, float] = {}

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any):
        from transformers.modeling_outputs import CausalLMOutput

        kwargs["use_cache"] = False
        language_model = self.weight < 1.0 and labels is not None
        out = self.student(input_ids=input_ids, labels=labels if language_model else None, **kwargs)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, **kwargs).logits
        kl = distillation_loss(out.logits, teacher_logits, self.temperature)
        loss = (1.0 - self.weight) * out.loss + self.weight * kl if language_model else kl
        self.last_terms = {"kl": float(kl.detach())}
        if language_model:
            self.last_terms["ce"] = float(out.loss.detach())
        return CausalLMOutput(loss=loss, logits=out.logits)


def training_batches(rows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive ``batch_size`` rows of token ids as language-model batches (the labels are the tokens)."""
    return [{"input_ids": chunk, "labels": chunk} for chunk in rows.split(batch_size)]


@dataclass
class TrainingStats:
    """What :func:`train_causal_lm` measured. Step times leave out evaluations; the RSS figures are MB, the
    high-water mark from the first step to the last and the RSS just before the first step."""

    steps: int
    losses: list[float]
    step_seconds: list[float]
    peak_rss_mb: float
    baseline_rss_mb: float
    terms: list[dict[str, float]] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    def seconds_per_step(self) -> dict[str, float]:
        """Mean and median over the steps after the first (which also pays for warming up), and the first."""
        later = self.step_seconds[1:] or self.step_seconds
        return {"mean": statistics.fmean(later), "median": statistics.median(later), "first": self.step_seconds[0]}


def train_causal_lm(model: nn.Module, batches: list[dict[str, torch.Tensor]], *, lr: float, warmup_steps: int = 0,
                    max_grad_norm: float = 1.0, evaluate: Callable[[int], float] | None = None, eval_every: int = 0,
                    progress: bool = True) -> TrainingStats:
    """Train ``model`` in place for one optimizer step per batch.

    AdamW (no weight decay) on the parameters that require gradients, the learning rate rising linearly over
    ``warmup_steps`` to ``lr`` and falling linearly to 0 at the last step (transformers'
    ``get_linear_schedule_with_warmup``), gradients clipped to ``max_grad_norm``. ``evaluate(step)`` (a perplexity)
    runs after every ``eval_every``-th step when both are given; its results go to :attr:`TrainingStats.curve`.
    The model is left in eval mode.
    """
    from transformers import get_linear_schedule_with_warmup

    from common.device import model_device, sync, to_device
    from common.memory import peak_rss_mb, reset_peak_rss, rss_mb

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    steps = len(batches)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup_steps, steps)
    device = model_device(model)
    losses: list[float] = []
    terms: list[dict[str, float]] = []
    step_seconds: list[float] = []
    curve: list[dict[str, float]] = []
    model.train()
    reset_peak_rss()
    baseline = rss_mb()
    with tqdm(total=steps, desc="recovery", unit="step", disable=not progress) as bar:
        for step, batch in enumerate(batches, start=1):
            started = time.perf_counter()
            loss = model(**to_device(batch, device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            step_seconds.append(time.perf_counter() - started)
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"the training loss is {losses[-1]} at step {step}; lower --lr")
            terms.append(dict(getattr(model, "last_terms", {})))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", s_per_step=f"{step_seconds[-1]:.2f}")
            bar.update()
            if evaluate is not None and eval_every and step % eval_every == 0 and step < steps:
                curve.append({"step": step, "perplexity": evaluate(step)})
                model.train()
    peak = peak_rss_mb()
    model.eval()
    return TrainingStats(steps=steps, losses=losses, step_seconds=step_seconds, peak_rss_mb=peak,
                         baseline_rss_mb=baseline, terms=terms, curve=curve)


def memory_setup(model: str, data: str, method: str = "lora", batch_size: int = 4, seq_len: int = 512, seed: int = 1,
                 lr: float = 2e-4, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 teacher: str | None = None, distill_weight: float = 0.0, temperature: float = 1.0,
                 data_config: str | None = None, split: str = "train", text_column: str | None = None):
    """One recovery configuration of the saved model folder ``model`` (its own tokenizer), for
    :func:`common.memory.peak_training_memory`: ``method`` ``"lora"`` (as :func:`lora_config`) or ``"full"`` (every
    parameter), AdamW built after the memory baseline, one batch of ``batch_size`` rows of ``seq_len`` tokens of
    ``data`` (the first rows the recipe trains on with ``seed``), with distillation from ``teacher`` when
    ``distill_weight`` > 0. Every step trains on that batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compress  # noqa: F401 - registers the compact classes a global-mode folder needs
    from common.memory import TrainingSetup
    from compress.data import calibration_rows, load_text

    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
    student = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    corpus = load_text(data, config_name=data_config, split=split, text_column=text_column)
    rows = calibration_rows(corpus, tokenizer, num_rows=batch_size, length=seq_len, seed=seed)
    if method == "lora":
        from peft import get_peft_model

        student = get_peft_model(student, lora_config(student, r, lora_alpha, lora_dropout))
    trained: nn.Module = student
    if distill_weight > 0:
        if teacher is None:
            raise ValueError("distill_weight > 0 needs the teacher model")
        trained = DistilledCausalLM(student, AutoModelForCausalLM.from_pretrained(teacher, local_files_only=True),
                                    distill_weight, temperature)

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    return TrainingSetup(model=trained, batches=training_batches(rows, batch_size), optimizer=optimizer)
