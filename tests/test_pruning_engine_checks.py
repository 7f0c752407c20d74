"""The pruning engine's edges: criteria registered by name, refusals made before the model changes, compact classes
for every task head of a family, and Pruning-Adapter's bias compensation on decoders."""

from __future__ import annotations

import pytest

import compress
from compress.errors import CompressError
from compress.pruning import importance
from compress.pruning.importance import MagnitudeImportance, available_importances, get_importance
from compress.pruning.spec import PruningSpec
from tests import tiny


@pytest.fixture
def registry(monkeypatch):
    """The criteria registered during a test are forgotten afterwards."""
    monkeypatch.setattr(importance, "_IMPORTANCES", dict(importance._IMPORTANCES))


class ReversedMagnitude(MagnitudeImportance):
    def __call__(self, unit, stats):
        return -super().__call__(unit, stats)


def test_a_criterion_registered_with_capitals_is_found_in_any_case(registry):
    compress.register_importance("MyCrit", ReversedMagnitude)
    assert "mycrit" in available_importances()
    assert isinstance(get_importance("MYCRIT"), ReversedMagnitude)
    assert PruningSpec(importance="MyCrit").importance == "mycrit"
    report = compress.prune_model(tiny.make_model("llama"), 0.5, importance="MyCrit")
    assert report.importance == "mycrit"


def test_registering_a_taken_name_in_another_case_is_refused(registry):
    with pytest.raises(CompressError, match="'Magnitude' is taken by MagnitudeImportance"):
        compress.register_importance("Magnitude", ReversedMagnitude)
    assert type(get_importance("magnitude")) is MagnitudeImportance
    compress.register_importance("Taylor", importance.TaylorImportance)  # the same criterion again: nothing to do
    compress.register_importance("mycrit", ReversedMagnitude)
    with pytest.raises(CompressError, match="taken by ReversedMagnitude"):
        compress.register_importance("MYCRIT", MagnitudeImportance(p=1))


@pytest.mark.parametrize("name, entry", [("", ReversedMagnitude), (3, ReversedMagnitude), ("mine", len)])
def test_registering_a_bad_name_or_criterion_is_refused(registry, name, entry):
    with pytest.raises(CompressError, match="register_importance"):
        compress.register_importance(name, entry)
    assert "mine" not in available_importances()


def test_invalid_option_error_is_one_class_under_its_old_and_new_names():
    from compress.errors import InvalidOptionError
    from compress.pruning.spec import InvalidOptionError as from_spec

    assert from_spec is InvalidOptionError and compress.InvalidOptionError is InvalidOptionError
    with pytest.raises(InvalidOptionError, match="importance='no_such'") as raised:
        PruningSpec(importance="no_such")
    assert raised.value.spelled("--importance").startswith("--importance no_such: choose one of")
