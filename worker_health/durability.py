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


def relax_connection(using: str = "default") -> None:
    """For a connection that only worker_health uses (its own threads): commit without
    waiting for the WAL flush, unless the user asked for synchronous commits; and plan the
    hot-path prepared statements once (``plan_cache_mode``: their generic plans are
    index lookups by task id, and planning them anew would cost more than running them)."""
    conn = connections[using]
    if conn.vendor != "postgresql":
        return
    conn.ensure_connection()
    raw = conn.connection
    if getattr(_tuned, using, None) is raw:
        return
    with conn.cursor() as cursor:
        cursor.execute("SET plan_cache_mode TO force_generic_plan")
        if not settings.SYNCHRONOUS_COMMIT:
            cursor.execute("SET synchronous_commit TO OFF")
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
