"""worker_health.durability: the settings of worker_health's own database connections."""

from __future__ import annotations

import pytest
from django.db import connections

from tests.factories import ALIASES
from worker_health import durability
from worker_health.loopwriter import _dollar
from worker_health.querysets import CLAIM_AND_FINISH_SQL, FINISH_MANY_SQL

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

POSTGRES_ONLY = [param for param in ALIASES if param.id == "postgres"]


def _fill(alias: str, rows: int) -> None:
    """``rows`` finished tasks, analysed: a table small enough that the planner, left to
    itself, scans it whole for every batch."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "INSERT INTO task_queue (task_id, task_name, status, queue, exchange, routing_key,"
            " content_type, content_encoding, headers, properties, fencing_token,"
            " reclaim_count, publish_attempts, lost_on, created_at, updated_at)"
            " SELECT 'fill-' || n, 'demo.tasks.work', 'succeeded', 'q', '', 'q', '', '',"
            " '{}', '{}', 1, 0, 0, '[]', now(), now() FROM generate_series(1, %s) AS n",
            [rows],
        )
        cursor.execute("ANALYZE task_queue")


def _generic_plan(alias: str, sql: str, types: str, args: str) -> str:
    with connections[alias].cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
        cursor.execute(f"PREPARE wh_plan({types}) AS " + _dollar(sql).decode())
        cursor.execute(f"EXPLAIN EXECUTE wh_plan({args})")
        return "\n".join(row[0] for row in cursor.fetchall())


def _looks_up_by_task_id(plan: str) -> None:
    """Every access to task_queue in ``plan`` is bounded by the batch's task ids."""
    assert "Seq Scan on task_queue" not in plan, plan
    assert "Hash Join" not in plan, plan
    lines = plan.splitlines()
    for n, line in enumerate(lines):
        if "on task_queue" in line and "Scan" in line:
            # its Index Cond (or Recheck Cond) follows, at most a few lines below
            below = "\n".join(lines[n : n + 4])
            assert "task_id)::text = ANY" in below or "task_id)::text = v.i" in below, plan


@pytest.mark.parametrize("alias", POSTGRES_ONLY)
@pytest.mark.parametrize("rows", [0, 3000])
def test_hot_path_statements_look_tasks_up_by_task_id_whatever_the_table(
    alias: str, rows: int
) -> None:
    """worker_health's connections keep one generic plan per statement for their life. Made
    on an empty table, or on one of a few thousand rows, it must still look each task up
    by its id: a sequential scan, a hash join or a full scan of an index costs more with
    every row the table gains (measured before the ``= ANY`` condition: PostgreSQL CPU per
    finished task grew from 0.4 to 1 ms as such a table went from 3,000 to 12,000 rows)."""
    connections[alias].close()
    if rows:
        _fill(alias, rows)
    connections[alias].close()
    durability.relax_connection(alias)
    finish = _generic_plan(alias, FINISH_MANY_SQL, "json", "'[]'")
    both = _generic_plan(
        alias,
        CLAIM_AND_FINISH_SQL,
        "json, bigint, uuid, json, float8",
        "'[]', 1, '00000000-0000-0000-0000-000000000000', '[]', 60",
    )
    for plan in (finish, both):
        assert "wh_task_id_uniq" in plan, plan
        _looks_up_by_task_id(plan)


@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_planner_settings_stay_off_behind_a_transaction_pooler(alias: str) -> None:
    """``prepare_threshold: None`` says a pooler in transaction mode may be in between:
    session settings would reach other clients' transactions there."""
    options = connections[alias].settings_dict.setdefault("OPTIONS", {})
    options["prepare_threshold"] = None
    try:
        assert not any("enable_" in s for s in durability.session_settings(alias))
        connections[alias].close()
        durability.relax_connection(alias)
        with connections[alias].cursor() as cursor:
            cursor.execute("SHOW enable_seqscan")
            assert cursor.fetchone()[0] == "on"
    finally:
        del options["prepare_threshold"]
        connections[alias].close()
    durability.relax_connection(alias)
    with connections[alias].cursor() as cursor:
        cursor.execute("SHOW enable_seqscan")
        assert cursor.fetchone()[0] == "off"


@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_the_loop_writer_connection_gets_the_same_settings(alias: str) -> None:
    from worker_health.loopwriter import _open_connection

    raw = _open_connection(alias)
    try:
        shown = {
            name: raw.execute(f"SHOW {name}").fetchone()[0]
            for name in ("enable_seqscan", "enable_hashjoin", "plan_cache_mode")
        }
    finally:
        raw.close()
    assert shown == {
        "enable_seqscan": "off",
        "enable_hashjoin": "off",
        "plan_cache_mode": "force_generic_plan",
    }


@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_the_heartbeat_connection_keeps_the_default_plans(
    alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat thread's connection runs the detector's sweeps: set-based queries
    that keep PostgreSQL's own planner settings."""
    from tests.factories import make_worker
    from worker_health import heartbeat
    from worker_health.heartbeat import Heart, WorkerIdentity

    worker = make_worker(alias, "heart@host")
    identity = WorkerIdentity(
        worker_id=worker.worker_id, incarnation=worker.incarnation, metadata={}, pk=worker.pk
    )
    real = durability.relax_connection
    monkeypatch.setattr(heartbeat, "relax_connection", lambda **kw: real(alias, **kw), raising=True)
    connections[alias].close()
    heart = Heart(identity)
    heart.registered = True
    heart._write_heartbeat = lambda: None  # type: ignore[method-assign]
    assert heart.beat_once()
    with connections[alias].cursor() as cursor:
        cursor.execute("SHOW enable_seqscan")
        assert cursor.fetchone()[0] == "on"
        cursor.execute("SHOW plan_cache_mode")
        assert cursor.fetchone()[0] == "force_generic_plan"  # relaxed all the same
