"""The compatibility gate's verdict (compat/run.py): which outcome differences fail it."""

from __future__ import annotations

from typing import Any

import pytest

from compat import known
from compat.run import compare, markdown

RACE = (
    "t/integration/test_canvas.py::test_chord::"
    "test_chord_error_propagation_with_different_body_types[body is a group]"
)
OTHER = "t/integration/test_canvas.py::test_chord::test_simple_chord"


def report(**outcomes: str) -> dict[str, Any]:
    return {"tests": {nodeid: {"outcome": o} for nodeid, o in outcomes.items()}}


def run(plain: dict[str, str], wh: dict[str, str]) -> Any:
    wh_report = report(**wh)
    # a worker_health run the gate can trust: its worker was hooked and tracked tasks
    wh_report["worker_inits"] = [{"tasks_hooked": True}]
    wh_report["worker_health"] = {"tasks_total": 1, "tasks": {"succeeded": 1}, "claims": 1}
    return compare(report(**plain), wh_report)


def test_a_test_that_passes_plain_and_fails_with_worker_health_turns_the_gate_red() -> None:
    result = run({OTHER: "passed"}, {OTHER: "failed"})
    assert result.regressions == [OTHER]
    assert not result.green


def test_a_race_inside_celery_lost_by_the_worker_health_run_is_reported_not_failed() -> None:
    result = run({RACE: "passed", OTHER: "passed"}, {RACE: "failed", OTHER: "passed"})
    assert result.regressions == []
    assert result.green
    assert RACE in result.celery_races
    assert "_handle_group_chord_error" in result.celery_races[RACE]
    text = markdown(result, "python -m compat.run", "sel", {})
    assert "Decided by a race inside Celery (1)" in text


def test_a_race_lost_by_the_plain_run_is_reported_there_too() -> None:
    result = run({RACE: "failed"}, {RACE: "passed"})
    assert result.other_differences == []
    assert RACE in result.celery_races


def test_a_race_entry_covers_only_its_own_test() -> None:
    # the entry names one parametrization: its siblings are judged as usual
    sibling = RACE.replace("body is a group", "body is a chain")
    result = run({sibling: "passed"}, {sibling: "failed"})
    assert result.regressions == [sibling]
    assert not result.green


@pytest.mark.parametrize("nodeid", sorted(known.CELERY_RACES))
def test_every_race_entry_says_where_the_race_is_and_where_it_was_seen(nodeid: str) -> None:
    reason = known.CELERY_RACES[nodeid]
    assert "Seen failing plain" in reason
    assert known.race_reason(nodeid) == reason
