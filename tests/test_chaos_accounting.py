"""The chaos suite's accounting of double runs in the SIGKILL storm (chaos/scenarios.py):
only a run whose worker was killed right after its effect, before its completion could be
written, is the documented at-least-once case; every other double run fails the storm."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from chaos.scenarios import EFFECT_TO_COMPLETION, explained_doubles

T0 = datetime(2026, 12, 6, 10, 0, 0, tzinfo=timezone.utc)


def test_a_double_run_killed_just_after_its_effect_is_explained() -> None:
    effects = {"a": ("w1@host", T0)}
    kills = [("w2@host", T0 + timedelta(seconds=0.01)), ("w1@host", T0 + timedelta(seconds=0.02))]
    assert explained_doubles(effects, kills) == [0.02]


def test_a_double_run_whose_worker_was_killed_long_after_the_effect_is_not_explained() -> None:
    effects = {"a": ("w1@host", T0)}
    kills = [("w1@host", T0 + timedelta(seconds=EFFECT_TO_COMPLETION + 0.1))]
    assert explained_doubles(effects, kills) == []


def test_a_double_run_on_a_worker_that_was_not_killed_is_not_explained() -> None:
    effects = {"a": ("w1@host", T0)}
    kills = [("w2@host", T0 + timedelta(seconds=0.01))]
    assert explained_doubles(effects, kills) == []


def test_a_kill_before_the_effect_does_not_explain_it() -> None:
    effects = {"a": ("w1@host", T0)}
    kills = [("w1@host", T0 - timedelta(seconds=0.01))]
    assert explained_doubles(effects, kills) == []


def test_each_double_run_is_matched_on_its_own() -> None:
    effects = {"a": ("w1@host", T0), "b": ("w3@host", T0), "c": ("w1@host", T0)}
    kills = [("w1@host", T0 + timedelta(seconds=0.1))]
    assert explained_doubles(effects, kills) == [0.1, 0.1]
