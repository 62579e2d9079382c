"""The chaos suite's tasks. Each records its effect in ``chaos_effect`` (unique task id, a
run counter) through a connection of its own straight to PostgreSQL, so the ledger stays
writable while the workers' Django database (behind a proxy) is cut off."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import psycopg
from celery import shared_task

LEDGER_SQL = """
CREATE TABLE IF NOT EXISTS chaos_effect (
    task_id text PRIMARY KEY,
    runs integer NOT NULL,
    first_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    workers text[] NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS chaos_attempt (
    task_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    worker text NOT NULL DEFAULT ''
);
"""

_conn: psycopg.Connection[Any] | None = None
_conn_pid: int | None = None


def ledger() -> psycopg.Connection[Any]:
    global _conn, _conn_pid
    if _conn is None or _conn_pid != os.getpid() or _conn.closed:
        _conn = psycopg.connect(os.environ["CHAOS_LEDGER_URL"], autocommit=True)
        _conn_pid = os.getpid()
    return _conn


def _write(sql: str, params: list[Any]) -> None:
    for attempt in range(20):
        try:
            ledger().execute(sql, params)
            return
        except psycopg.OperationalError:
            global _conn
            _conn = None
            pause(0.1 * (attempt + 1))
    raise RuntimeError("the chaos ledger is unreachable")


def record(task: Any) -> None:
    _write(
        "INSERT INTO chaos_effect (task_id, runs, workers) VALUES (%s, 1, ARRAY[%s]) "
        "ON CONFLICT (task_id) DO UPDATE SET runs = chaos_effect.runs + 1, "
        "last_at = clock_timestamp(), workers = chaos_effect.workers || EXCLUDED.workers",
        [task.request.id, task.request.hostname or ""],
    )


def pause(seconds: float) -> None:
    """``time.sleep`` without ``clock_nanosleep``, which fails under libfaketime when the
    monotonic clock is left alone (the clock-skew scenario)."""
    threading.Event().wait(seconds)


@shared_task(bind=True, name="chaos.effect")
def effect(self: Any, seconds: float = 0.0) -> None:
    """Wait ``seconds`` (I/O-bound work), then record the effect."""
    if seconds:
        pause(seconds)
    record(self)


@shared_task(bind=True, name="chaos.burn")
def burn(self: Any, seconds: float) -> None:
    """Hold the CPU (and the GIL) for ``seconds``, then record the effect."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sum(i * i for i in range(5000))
    record(self)


@shared_task(bind=True, name="chaos.poison")
def poison(self: Any) -> None:
    """Kill the process running it (the pool process; the worker itself with ``solo``)."""
    _write(
        "INSERT INTO chaos_attempt (task_id, worker) VALUES (%s, %s)",
        [self.request.id, self.request.hostname or ""],
    )
    os.kill(os.getpid(), signal.SIGKILL)
