"""The chaos suite's accounting of double runs in the SIGKILL storm and three detectors +
SIGKILL (chaos/scenarios.py): only a run whose worker was killed right after its effect,
before its completion could be written, is the documented at-least-once case; every other
double run fails the scenario."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any

from chaos.scenarios import EFFECT_TO_COMPLETION, explained_doubles, killed_after_effect
from chaos.tasks import LEDGER_SQL
from tests.factories import needs_postgres

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


class _LedgerStack:
    """As much of ``chaos.stack.Stack`` as ``killed_after_effect`` reads: its ledger, here
    a table of a schema of the test's own on the test server."""

    def __init__(self, url: str, schema: str) -> None:
        self.url, self.schema = url, schema
        self.opened = 0

    def ledger(self) -> Any:
        import psycopg

        self.opened += 1
        conn = psycopg.connect(self.url, autocommit=True)
        conn.execute(f"SET search_path TO {self.schema}")
        return conn


@needs_postgres
def test_the_storm_reads_every_double_run_from_the_ledger_in_one_query() -> None:
    import uuid

    import psycopg

    url = os.environ["WORKER_HEALTH_TEST_DATABASE_URL"]
    schema = f"chaos_accounting_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        try:
            conn.execute(f"SET search_path TO {schema}")
            conn.execute(LEDGER_SQL)
            conn.cursor().executemany(
                "INSERT INTO chaos_effect (task_id, runs, workers, first_at) "
                "VALUES (%s, %s, %s, %s)",
                [
                    ("a", 2, ["w1@host", "w2@host"], T0),  # killed 0.1 s after: explained
                    ("b", 2, ["w3@host", "w1@host"], T0),  # w3 was not killed
                    ("c", 1, ["w1@host"], T0),  # ran once: not a double
                    ("d", 3, ["w1@host"] * 3, T0),  # three runs: never explained
                ],
            )
            stack = _LedgerStack(url, schema)
            runs = {"a": 2, "b": 2, "c": 1, "d": 3, "e": 2}  # "e": no ledger row
            kills = [("w1@host", T0 + timedelta(seconds=0.1))]
            assert killed_after_effect(stack, runs, kills) == [0.1]  # type: ignore[arg-type]
            assert stack.opened == 1
            assert killed_after_effect(stack, {"c": 1}, kills) == []  # type: ignore[arg-type]
            assert stack.opened == 1  # no doubles: no query
        finally:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
