"""How durable a tracking write must be before it returns.

On PostgreSQL a commit waits for its WAL record to be flushed to disk (about 2 ms on the
benchmark machine, more than the rest of a no-op task). Tracking writes do not need that:
with ``synchronous_commit = off`` a committed change is visible to every other session at
once, and only a crash of the PostgreSQL server itself can lose the last fraction of a second
of them. What such a loss can do is move a task back to an earlier state (``succeeded`` back
to ``claimed``, ``claimed`` back to ``queued``), which can make a task run again, never get
lost. ``WORKER_HEALTH_SYNCHRONOUS_COMMIT = True`` keeps PostgreSQL's default instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connections, transaction

from .conf import settings

_tuned = threading.local()

#: psycopg prepares a statement it is asked to only when its connection's threshold is
#: not ``None``; this one never prepares a statement by itself
ONLY_WHEN_ASKED = 2**31 - 1

#: aliases whose server refused a prepared statement (a pooler in transaction mode): their
#: hot-path statements run unprepared from then on
unprepared: set[str] = set()


def prepares(using: str) -> bool:
    """Do worker_health's hot-path statements run prepared on this database?

    Yes, unless ``OPTIONS`` sets ``prepare_threshold`` to ``None`` itself (behind PgBouncer
    in transaction mode before 1.21) or the server refused one. Django's own default (no
    prepared statements) does not count: the statements are few, fixed and run on
    worker_health's own connections, and parsing and planning them anew costs the database
    more than running them.
    """
    if using in unprepared:
        return False
    options = connections[using].settings_dict.get("OPTIONS") or {}
    return not ("prepare_threshold" in options and options["prepare_threshold"] is None)


#: planner settings of worker_health's own connections on PostgreSQL. The hot-path
#: statements join a batch (``json_to_recordset``, which the planner always estimates at 100
#: rows) to ``task_queue`` by task id; on a table of a few thousand rows, or one analysed
#: while small, the planner prefers a sequential scan and a hash join, whose cost grows with
#: the table (PostgreSQL CPU per claimed and finished task at 4,000 rows: 170 µs with it,
#: 100 µs with index lookups). Index lookups cost the same at any size. (The finish also
#: bounds its rows by an index condition on the batch's task ids, which holds whatever the
#: plan: ``FINISH_MANY_SQL``.) Not applied when
#: the server may be a pooler in transaction mode (:func:`prepares` is false): session
#: settings would leak there to other clients' transactions. Nor on the connections of the
#: heart and of the thread that runs the detector's sweeps: set-based queries planned as
#: PostgreSQL sees fit (``docs/benchmarks.md``, detector scale).
INDEX_PLANS = (
    "SET enable_seqscan TO off",
    "SET enable_hashjoin TO off",
    "SET enable_mergejoin TO off",
)


def session_settings(using: str = "default", *, index_plans: bool = True) -> list[str]:
    """The ``SET`` statements for a connection that only worker_health uses."""
    statements = ["SET plan_cache_mode TO force_generic_plan"]
    if not settings.SYNCHRONOUS_COMMIT:
        statements.append("SET synchronous_commit TO OFF")
    if index_plans and prepares(using):
        statements.extend(INDEX_PLANS)
    return statements


def relax_connection(using: str = "default", *, index_plans: bool = True) -> None:
    """For a connection that only worker_health uses (its own threads): commit without
    waiting for the WAL flush, unless the user asked for synchronous commits; plan the
    hot-path prepared statements once (``plan_cache_mode``), as index lookups by task id
    (:data:`INDEX_PLANS`): planning them anew would cost more than running them."""
    conn = connections[using]
    if conn.vendor != "postgresql":
        return
    conn.ensure_connection()
    raw = conn.connection
    if getattr(_tuned, using, None) is raw:
        return
    if getattr(raw, "prepare_threshold", 0) is None and prepares(using):
        raw.prepare_threshold = ONLY_WHEN_ASKED  # Django's default turns preparing off
    with conn.cursor() as cursor:
        for statement in session_settings(using, index_plans=index_plans):
            cursor.execute(statement)
    setattr(_tuned, using, raw)


@contextmanager
def relaxed_write(using: str = "default") -> Iterator[None]:
    """A write on a connection shared with user code (the publisher's): its own short
    transaction with ``SET LOCAL synchronous_commit`` (nothing leaks past the commit)."""
    conn = connections[using]
    if settings.SYNCHRONOUS_COMMIT or conn.vendor != "postgresql" or conn.in_atomic_block:
        yield
        return
    with transaction.atomic(using=using):
        with conn.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")
        yield
