"""Exit policies: which examples leave at an exit, given its logits (and, for patience, the earlier exits')."""

from __future__ import annotations

import math

import torch

from compress.pruning.spec import InvalidOptionError, is_number

#: policy -> what its threshold means, for messages
POLICIES = {
    "entropy": "leave when the entropy of the exit's class distribution is below the threshold (>= 0)",
    "max_prob": "leave when the exit's top class probability exceeds the threshold (in [0, 1])",
    "patience": "leave when the prediction is unchanged over `threshold` consecutive exits (whole number >= 0 "
                "or inf)",
}


def check_threshold(policy: str, threshold: object) -> float:
    """``threshold`` as a float if it lies in ``policy``'s domain, else an error naming the domain."""
    if not is_number(threshold) or math.isnan(threshold):
        raise InvalidOptionError("exit_threshold", threshold, f"must be a number ({policy}: {POLICIES[policy]})")
    value = float(threshold)
    if policy == "entropy" and value < 0:
        raise InvalidOptionError("exit_threshold", threshold, f"is outside the domain of {policy}: {POLICIES[policy]}")
    if policy == "max_prob" and not 0 <= value <= 1:
        raise InvalidOptionError("exit_threshold", threshold, f"is outside the domain of {policy}: {POLICIES[policy]}")
    if policy == "patience" and (value < 0 or (math.isfinite(value) and value != int(value))):
        raise InvalidOptionError("exit_threshold", threshold, f"is outside the domain of {policy}: {POLICIES[policy]}")
    return value


class ExitDecision:
    """Decides exit by exit which running examples leave. Call it with each exit's logits for the rows still
    running, in exit order; after removing the rows that left, call :meth:`keep` with the mask of those that
    stayed so that per-example state (patience) follows them."""

    def __init__(self, policy: str, threshold: float) -> None:
        if not isinstance(policy, str) or policy not in POLICIES:  # a config attribute set after validation
            raise InvalidOptionError("exit_policy", policy, f"choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self.threshold = check_threshold(policy, threshold)
        self._previous: torch.Tensor | None = None  # patience: each running row's last prediction
        self._streak: torch.Tensor | None = None  # patience: exits over which it has not changed

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.detach().float()
        if self.policy == "entropy":
            log_probs = torch.log_softmax(logits, dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            return entropy < self.threshold
        if self.policy == "max_prob":
            return torch.softmax(logits, dim=-1).amax(-1) > self.threshold
        prediction = logits.argmax(-1)
        if self._previous is None:
            self._streak = torch.zeros_like(prediction)
        else:
            self._streak = torch.where(prediction == self._previous, self._streak + 1, 0)
        self._previous = prediction
        return self._streak >= self.threshold

    def keep(self, stays: torch.Tensor) -> None:
        if self._previous is not None:
            self._previous, self._streak = self._previous[stays], self._streak[stays]


def simulate_exits(exit_logits: list[torch.Tensor], policy: str, threshold: float) -> torch.Tensor:
    """The exit (index into ``exit_logits``) at which each example leaves, from every exit's logits for every
    example; the last exit takes those that never leave earlier. Equal to running with early exit, since each
    example's decisions depend on its own logits only."""
    decide = ExitDecision(policy, threshold)
    rows = exit_logits[0].shape[0]
    chosen = torch.full((rows,), len(exit_logits) - 1, dtype=torch.long)
    running = torch.ones(rows, dtype=torch.bool)
    for index, logits in enumerate(exit_logits[:-1]):
        leaves = decide(logits) & running
        chosen[leaves] = index
        running &= ~leaves
    return chosen
