"""The pruning plan of a Pruning-Adapter: its checks, its replay, and the copy saved with the adapter weights.

``PruningAdapterConfig.pruning_plan`` lists every pruning event, and replaying it on the original base model
is how a saved adapter gets its pruned shapes back. An edited plan would rebuild other shapes, or the same
shapes with other channels, under weights trained for the recorded ones. So the plan's fields are checked when
the config is built, each event is checked against the model before and after it is replayed, and a copy of
the plan travels in the adapter weights file, where loading compares it with the config's.

That copy is also what lets a training checkpoint resume on a freshly built model: the HF ``Trainer`` gives the
model the adapter weights before it builds the optimizer, and nothing else from the checkpoint, so the plan
that rebuilds the checkpoint's shapes has to come with those weights.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping

import torch
from torch import nn

from compress.errors import CompressError
from compress.pruning.arch import ArchSpec, arch_spec
from compress.pruning.importance import Unit, units_for
from compress.pruning.spec import STRUCTURES
from compress.pruning.surgery import apply_removals

#: fields every event has, and their types
EVENT_FIELDS: dict[str, type] = {
    "structures": list, "removed": dict, "widths_before": dict, "widths_after": dict, "final": bool}
#: fields only some events have (``step``: the training step of events pruned by the schedule)
OPTIONAL_FIELDS: dict[str, type] = {"step": int}
#: state-dict key of the plan's copy in the adapter weights (a uint8 tensor of zlib-compressed JSON)
PLAN_KEY = "pa_plan"

ADVICE = ("pruning_plan is written by training and must not be edited: use adapter_config.json as training saved it, "
          "or save it again from the trained model (peft_model.save_pretrained)")
#: how errors name the copy in the weights file, and what to do about it
SAVED_COPY = "the pruning plan saved with the adapter weights"
_SAVED_COPY_ADVICE = ("adapter_model.safetensors was changed after it was saved: save the adapter again from the "
                      "trained model (peft_model.save_pretrained)")


def recorded_widths(arch: ArchSpec, hidden: bool) -> dict[str, list[int]]:
    """The widths an event records: :meth:`~compress.pruning.arch.ArchSpec.widths`, plus ``"hidden": [size]`` when
    the configuration prunes the hidden size (plans without it keep the form they were saved in)."""
    widths = arch.widths()
    if hidden:
        widths["hidden"] = [arch.hidden_site().width]
    return widths


def plan_error(index: int, event: object, field: str | None, problem: str,
               source: str = "pruning_plan") -> CompressError:
    """A :class:`CompressError` naming the event (index and step), the field, the problem and what to do."""
    step = event.get("step") if isinstance(event, dict) else None
    step = f" (step {step})" if _is_int(step) else ""
    where = f"{source}[{index}]{step}" if source == "pruning_plan" else f"event {index}{step} of {source}"
    if field:
        where += f", field {field}"
    return CompressError(f"{where}: {problem}. {ADVICE if source == 'pruning_plan' else _SAVED_COPY_ADVICE}")


def _is_int(value: object) -> bool:
    return type(value) is int  # JSON ints only: bool is an int subclass, 1.0 is a float


def _check_int_list(values: object, index: int, event: dict, field: str, source: str, unique: bool) -> None:
    if not isinstance(values, list):
        raise plan_error(index, event, field, f"expected a list of integers, got {type(values).__name__}", source)
    for value in values:
        if not _is_int(value):
            raise plan_error(index, event, field, f"{value!r} ({type(value).__name__}) is not an integer", source)
        if value < 0:
            raise plan_error(index, event, field, f"{value} is negative", source)
    if unique and len(set(values)) != len(values):
        twice = sorted({v for v in values if values.count(v) > 1})
        raise plan_error(index, event, field, f"{twice} listed more than once", source)


def check_event(event: object, index: int, source: str = "pruning_plan") -> None:
    """Check one event's fields and types (no model needed): the checks a JSON edit can fail."""
    if not isinstance(event, dict):
        raise plan_error(index, event, None, f"an event is a dict, got {type(event).__name__}", source)
    missing = [name for name in EVENT_FIELDS if name not in event]
    unknown = sorted(set(event) - set(EVENT_FIELDS) - set(OPTIONAL_FIELDS), key=str)
    if missing or unknown:
        problem = "; ".join(([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else []))
        raise plan_error(index, event, None, f"{problem} (an event has {sorted(EVENT_FIELDS)}, optionally "
                         f"{sorted(OPTIONAL_FIELDS)})", source)
    for name, kind in {**EVENT_FIELDS, **OPTIONAL_FIELDS}.items():
        if name in event and (type(event[name]) is not kind):
            raise plan_error(index, event, f"'{name}'", f"expected {kind.__name__}, got {event[name]!r}", source)
    if "step" in event and event["step"] < 0:
        raise plan_error(index, event, "'step'", f"{event['step']} is negative", source)
    structures = event["structures"]
    if not structures or any(s not in STRUCTURES for s in structures) or len(set(structures)) != len(structures):
        raise plan_error(index, event, "'structures'", f"{structures!r} is not a list of distinct names from "
                         f"{', '.join(STRUCTURES)}", source)
    for key, removed in event["removed"].items():
        if not isinstance(key, str) or not key:
            raise plan_error(index, event, "'removed'", f"unit key {key!r} is not a name", source)
        _check_int_list(removed, index, event, f"'removed'[{key!r}]", source, unique=True)
    for name in ("widths_before", "widths_after"):
        for key, widths in event[name].items():
            _check_int_list(widths, index, event, f"'{name}'[{key!r}]", source, unique=False)
        hidden = event[name].get("hidden")
        if "hidden" in structures and hidden is None:
            raise plan_error(index, event, f"'{name}'", "an event that prunes 'hidden' records the hidden size as "
                             "'hidden': [size]", source)
        if hidden is not None and len(hidden) != 1:
            raise plan_error(index, event, f"'{name}'['hidden']", f"the hidden size is one number, got {hidden}",
                             source)
    if ("hidden" in event["widths_before"]) != ("hidden" in event["widths_after"]):
        raise plan_error(index, event, "'widths_after'", "records the hidden size where 'widths_before' does not, "
                         "or the other way round", source)


def check_plan(plan: object, source: str = "pruning_plan") -> None:
    """Check every event's fields (:func:`check_event`) and their order: only the last may be ``final``, steps rise."""
    if not isinstance(plan, list):
        raise CompressError(f"{source} must be a list of events, got {type(plan).__name__}. {ADVICE}")
    previous_step = -1
    for index, event in enumerate(plan):
        check_event(event, index, source)
        if index and ("hidden" in event["widths_before"]) != ("hidden" in plan[0]["widths_before"]):
            raise plan_error(index, event, "'widths_before'", "every event of a plan records the hidden size, or "
                             "none does", source)
        if event["final"] and index != len(plan) - 1:
            raise plan_error(index, event, "'final'", f"only the last event is final, and {len(plan) - 1 - index} "
                             "follow this one", source)
        if "step" in event:
            if event["step"] <= previous_step:
                raise plan_error(index, event, "'step'", f"steps must rise from event to event; the one before is "
                                 f"at step {previous_step}", source)
            previous_step = event["step"]


def _check_against_model(arch: ArchSpec, event: dict, index: int, source: str) -> list[Unit]:
    """The event's units, after checking that its widths and removed indices fit the model as it is now."""
    widths = recorded_widths(arch, "hidden" in event["widths_before"])
    if widths != event["widths_before"]:
        raise plan_error(index, event, "'widths_before'", f"the model's widths at this point are {widths}, the "
                         f"event records {event['widths_before']}", source)
    units = units_for(arch, event["structures"])
    by_key = {u.key: u for u in units}
    for key, removed in event["removed"].items():
        unit = by_key.get(key)
        if unit is None:
            raise plan_error(index, event, f"'removed'[{key!r}]", f"no unit of {event['structures']} is called "
                             f"{key!r}; this model's are {sorted(by_key)}", source)
        wrong = [i for i in removed if i >= unit.size]
        if wrong:
            raise plan_error(index, event, f"'removed'[{key!r}]", f"index {wrong[0]} is out of range: the unit has "
                             f"{unit.size} {_what(unit)} at this point (0..{unit.size - 1})", source)
        if len(removed) >= unit.size:
            raise plan_error(index, event, f"'removed'[{key!r}]", f"removes all {unit.size} {_what(unit)} of the "
                             "unit; pruning always keeps some", source)
        protected = sorted(set(removed) & unit.site.protected) if unit.structure == "layers" else []
        if protected:
            raise plan_error(index, event, f"'removed'[{key!r}]", f"block(s) {protected} cannot be removed", source)
    return units


def _what(unit: Unit) -> str:
    return {"ffn": "neurons", "heads": "heads", "layers": "blocks", "hidden": "hidden channels"}[unit.structure]


def replay_events(model: nn.Module, events: list[dict], start: int = 0, source: str = "pruning_plan") -> None:
    """Prune ``model`` as ``events`` record (they are ``plan[start:]``), checking each event against the model
    before it is applied (widths, unit keys, index ranges) and after (the widths it records).

    Works on a plain base model and on one wrapped with Pruning-Adapter layers (whose adapters shrink too).
    A failing event leaves the events before it applied.
    """
    for index, event in enumerate(events, start):
        check_event(event, index, source)
        arch = arch_spec(model)
        units = _check_against_model(arch, event, index, source)
        try:
            apply_removals(model, arch, units, {k: list(v) for k, v in event["removed"].items()})
        except CompressError as exc:  # e.g. query heads not removed equally from every kv group
            raise plan_error(index, event, "'removed'", str(exc), source) from exc
        for module in model.modules():
            if hasattr(module, "pruned_params"):
                module.pruned_params.clear()  # no optimizer to remap: drop the references to the old tensors
        widths = recorded_widths(arch_spec(model), "hidden" in event["widths_after"])
        if widths != event["widths_after"]:
            raise plan_error(index, event, "'widths_after'", f"replaying the event gives widths {widths}, the event "
                             f"records {event['widths_after']}", source)


def kept_hidden_channels(plan: list[dict], width: int) -> list[int]:
    """The original hidden channels a model pruned by ``plan`` still carries, in order (all ``width`` of them
    when no event removed any). Each event's indices count the channels left by the events before it."""
    kept = list(range(width))
    for event in plan:
        removed = set(event["removed"].get("hidden", ()))
        kept = [channel for index, channel in enumerate(kept) if index not in removed]
    return kept


# -- the copy saved with the adapter weights -------------------------------------------------------------
def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def encode_plan(plan: list[dict]) -> torch.Tensor:
    """``plan`` as a uint8 tensor (zlib-compressed canonical JSON) for the adapter's state dict."""
    data = zlib.compress(_canonical(plan).encode("utf-8"), 9)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_plan(tensor: torch.Tensor) -> list[dict]:
    """The plan :func:`encode_plan` stored, checked with :func:`check_plan`."""
    source = SAVED_COPY
    try:
        plan = json.loads(zlib.decompress(tensor.detach().cpu().to(torch.uint8).numpy().tobytes()).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise CompressError(f"{source} ({PLAN_KEY!r} in adapter_model.safetensors) is unreadable ({exc}): the file "
                            "is damaged: save the adapter again from the trained model") from exc
    check_plan(plan, source)
    return plan


def same_events(a: Mapping, b: Mapping) -> bool:
    """Whether two events are equal as saved (JSON), whatever the containers they are held in."""
    return _canonical(a) == _canonical(b)


def describe_difference(ours: dict, saved: dict) -> str:
    """Where an event of the config's plan differs from the saved copy's: field, unit and values."""
    for name in sorted(set(ours) | set(saved)):
        if name not in ours or name not in saved:
            return f"field '{name}' is only in the {'config' if name in ours else 'saved copy'}"
        if _canonical(ours[name]) == _canonical(saved[name]):
            continue
        if isinstance(ours[name], dict) and isinstance(saved[name], dict):
            for key in sorted(set(ours[name]) | set(saved[name])):
                a, b = ours[name].get(key), saved[name].get(key)
                if _canonical(a) != _canonical(b):
                    if isinstance(a, list) and isinstance(b, list) and name == "removed":
                        only_a = sorted(set(a) - set(b), key=str)
                        only_b = sorted(set(b) - set(a), key=str)
                        return (f"field 'removed'[{key!r}]: the config removes {only_a} where the saved copy "
                                f"removes {only_b}")
                    return f"field '{name}'[{key!r}]: the config has {_short(a)}, the saved copy {_short(b)}"
        return f"field '{name}': the config has {_short(ours[name])}, the saved copy {_short(saved[name])}"
    return "the events differ"


def _short(value: object, limit: int = 120) -> str:
    text = _canonical(value)
    return text if len(text) <= limit else text[:limit] + "..."
