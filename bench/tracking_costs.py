"""What each tracking write costs on its own.

    python -m bench.tracking_costs            # creates (and drops) a database of its own
    python -m bench.throughput --profile      # runs this too, after the profiled runs

One process, one connection, no contention: each step is run ``--n`` times in a row (the
gate's steps over at least 2,000 tasks) and reported as the median wall time per call, the
CPU time of the calling thread (Django's ORM and psycopg), the SQL statements it sends, the
time spent waiting for them, and the CPU time of the PostgreSQL backend serving it (read
from /proc: only when the server runs on this host). The gate's steps run on a connection
tuned as worker_health's own (:func:`worker_health.durability.relax_connection`), once more
with PostgreSQL's default planner settings to show what :data:`INDEX_PLANS` is for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import bench_database, clean_env, print_machine, table

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Meter:
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    statements: int = 0
    sql_seconds: float = 0.0
    calls: int = 0


@contextmanager
def sql_counter(meter: Meter) -> Iterator[None]:
    from django.db import connection

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, ctx)
        finally:
            meter.statements += 1
            meter.sql_seconds += time.perf_counter() - started

    with connection.execute_wrapper(wrapper):
        yield


def measure(fn: Callable[[int], Any], n: int, per: int = 1) -> Meter:
    """Run ``fn(i)`` for i < n; ``per`` tasks are handled by one call (batches)."""
    meter = Meter()
    with sql_counter(meter):
        for i in range(n):
            cpu, wall = time.thread_time(), time.perf_counter()
            fn(i)
            meter.walls.append((time.perf_counter() - wall) / per)
            meter.cpus.append((time.thread_time() - cpu) / per)
            meter.calls += 1
    return meter


def row(name: str, meter: Meter, per: int = 1, note: str = "") -> list[str]:
    calls = max(meter.calls, 1)
    return [
        name,
        f"{statistics.median(meter.walls) * 1e6:.0f}",
        f"{statistics.mean(meter.cpus) * 1e6:.0f}",
        f"{meter.statements / calls / per:.2f}",
        f"{meter.sql_seconds / calls / per * 1e6:.0f}",
        note,
    ]


def sample_delivery(task_id: str) -> Any:
    from worker_health.querysets import Delivery

    headers: dict[str, Any] = {
        "lang": "py", "task": "example_project.demo.tasks.noop", "id": task_id,
        "shadow": None, "eta": None, "expires": None, "group": None, "group_index": None,
        "retries": 0, "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": "()", "kwargsrepr": "{}", "origin": "gen1234@bench-host",
        "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None,
        "stamps": {},
    }  # fmt: skip
    body = b'[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    return Delivery(
        task_id=task_id,
        task_name="example_project.demo.tasks.noop",
        queue="celery",
        exchange="",
        routing_key="celery",
        body=body,
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        properties={"correlation_id": task_id, "delivery_mode": 2, "priority": 0},
        eta=None,
        expires=None,
    )


def backend_cpu_seconds() -> float | None:
    """CPU time of the PostgreSQL backend serving Django's connection (``None`` when the
    server is not on this host)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def with_backend_cpu(fn: Callable[[], list[str]], tasks: int) -> list[str]:
    """``fn``'s row, with the PostgreSQL CPU per task spent meanwhile."""
    before = backend_cpu_seconds()
    result = fn()
    after = backend_cpu_seconds()
    cpu = "n/a" if before is None or after is None else f"{(after - before) / tasks * 1e6:.0f}"
    return [*result[:-1], cpu, result[-1]]


def run_costs(n: int) -> str:
    from django.db import connection

    from worker_health import dbthread
    from worker_health.durability import INDEX_PLANS, relax_connection
    from worker_health.models import TaskQueue, WorkerRegistry

    inc = uuid.uuid4()
    worker = WorkerRegistry.objects.register(
        "costs@bench", incarnation=inc, metadata={}, clock_skew=None
    ).worker
    rows: list[list[str]] = []
    prefix = uuid.uuid4().hex[:6]
    #: enough tasks for PostgreSQL's CPU (read in 10 ms ticks) to mean something
    many = max(n, 2000)

    def publish_rows(tag: str, count: int) -> list[str]:
        task_ids = [f"{prefix}-{tag}-{i}" for i in range(count)]
        for task_id in task_ids:
            TaskQueue.objects.record_published(
                task_id=task_id, task_name="noop", queue="celery", eta=None, expires=None
            )
        return task_ids

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS bench_commit (id int PRIMARY KEY, n int)")
        cursor.execute("INSERT INTO bench_commit VALUES (1, 0) ON CONFLICT DO NOTHING")

    def bump(_: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute("UPDATE bench_commit SET n = n + 1 WHERE id = 1")

    def select_one(_: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT n FROM bench_commit WHERE id = 1")
            cursor.fetchone()

    def timed(
        name: str,
        fn: Callable[[int], Any],
        calls: int,
        per: int = 1,
        note: str = "",
        statements: int = 0,
    ) -> None:
        """``statements``: per call, when they bypass Django's cursor (the gate's
        prepared statements go through psycopg directly)."""

        def measured() -> list[str]:
            meter = measure(fn, calls, per=per)
            meter.statements += statements * calls
            return row(name, meter, per, note)

        rows.append(with_backend_cpu(measured, calls * per))

    timed("round trip: SELECT by primary key", select_one, n)
    timed("commit: 1-row UPDATE in autocommit (WAL flush)", bump, n)
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO off")
    timed("commit: same, synchronous_commit=off", bump, n, note="worker_health's own connections")
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO on")

    # -- publisher ------------------------------------------------------------------------
    pub_ids = [f"{prefix}-pub-{i}" for i in range(n)]
    timed(
        "publish: record_published (1 statement, its own relaxed commit)",
        lambda i: TaskQueue.objects.record_published(
            task_id=pub_ids[i], task_name="noop", queue="celery", eta=None, expires=None
        ),
        n,
    )

    # -- the gate: claims of a batch with the completions of the one before ---------------
    def gate_step(tag: str, size: int, note: str = "") -> None:
        task_ids = publish_rows(f"{tag}{size}", many)
        batches = len(task_ids) // size
        done: list[tuple[str, int, str]] = []

        def step(b: int) -> None:
            nonlocal done
            batch = task_ids[b * size : (b + 1) * size]
            tokens, _ = TaskQueue.objects.claim_and_finish(
                [sample_delivery(t) for t in batch], done, worker_pk=worker.pk, incarnation=inc
            )
            done = [(t, tokens[t] or 0, "succeeded") for t in batch]

        timed(
            f"gate: claim_and_finish, batch of {size} (per task: its claim and its finish)",
            step,
            batches,
            per=size,
            note=note,
            statements=1,
        )
        TaskQueue.objects.finish_many(done)

    connection.close()
    relax_connection()  # as on the gate's thread: prepared, index plans, relaxed commits
    for size in (1, 4, 8):
        gate_step("gate", size)
    with connection.cursor() as cursor:
        for statement in INDEX_PLANS:
            cursor.execute(statement.replace(" off", " on"))
    gate_step(
        "planner", 4, note="Django's default planner settings: a hash join (of the batch's rows)"
    )
    connection.close()

    # -- a pool process that claims for itself (solo, eventlet and gevent pools) ------------
    claim_ids = publish_rows("claim", n)
    tokens: dict[str, int | None] = {}

    def claim_and_finish_alone(i: int) -> None:
        task_id = claim_ids[i]
        tokens[task_id] = TaskQueue.objects.claim(
            task_id=task_id, task_name="noop", queue="celery", worker_pk=worker.pk,
            incarnation=inc,
        )  # fmt: skip
        TaskQueue.objects.finish_many([(task_id, tokens[task_id] or 0, "succeeded")])

    relax_connection()
    timed(
        "solo pool: TaskQueue.claim, then finish_many of one (per task)",
        claim_and_finish_alone,
        n,
        note="no gate: the pool process claims each task itself",
    )

    # -- the hand-off to the db thread ----------------------------------------------------------
    timed(
        "dbthread.call(lambda: None): hand-off round trip",
        lambda i: dbthread.call(lambda: None),
        n,
    )
    dbthread.shutdown()
    headers = [
        "step", "wall µs (median)", "CPU µs of the caller (mean)", "statements",
        "time in SQL µs", "PostgreSQL CPU µs/task", "note",
    ]  # fmt: skip
    return table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="calls per step (default 2000)")
    parser.add_argument("--database-url", help="use this (migrated) database; else create one")
    args = parser.parse_args(argv)
    if args.database_url is None:
        print_machine()
        with bench_database("costs") as db:
            import subprocess

            return subprocess.call(
                [sys.executable, "-m", "bench.tracking_costs", "--n", str(args.n),
                 "--database-url", db.url],
                env=clean_env(BENCH_VARIANT="all", DATABASE_URL=db.url),
            )  # fmt: skip
    os.environ["DATABASE_URL"] = args.database_url
    os.environ.setdefault("BENCH_VARIANT", "all")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    print(f"\nTracking writes one at a time ({args.n} calls each, one connection, no contention):")
    print(run_costs(args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
