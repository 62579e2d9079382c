"""What each tracking write costs on its own, and what the proposed alternatives would cost.

    python -m bench.tracking_costs            # creates (and drops) a database of its own
    python -m bench.throughput --profile      # runs this too, after the profiled runs

One process, one connection, no contention: each step is run ``--n`` times in a row and
reported as the median wall time per call, the CPU time of the calling thread (Django's
ORM and psycopg), the SQL statements it sends and the time spent waiting for them.
The "proposal" rows are prototypes written here in SQL, to size the gains; worker_health
itself is not changed.
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
from typing import Any

from .common import bench_database, clean_env, print_machine, table


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


CLAIM_SQL = """
UPDATE task_queue SET status = 'claimed', claimed_by_id = %(worker)s,
    claimed_incarnation = %(inc)s, claimed_at = now(), fencing_token = fencing_token + 1,
    reclaim_lease = NULL, updated_at = now()
WHERE task_id = %(task_id)s AND (
    status IN ('queued', 'reserved', 'reclaiming')
    OR (status = 'claimed' AND NOT EXISTS (
        SELECT 1 FROM worker_registry w
        WHERE w.id = task_queue.claimed_by_id AND w.incarnation = task_queue.claimed_incarnation
          AND (w.status = 'active' OR (w.status = 'offline'
               AND w.last_heartbeat >= now() - interval '60 seconds')))))
RETURNING fencing_token
"""

FINISH_BATCH_SQL = """
UPDATE task_queue AS t SET status = v.status, finished_at = now(), updated_at = now()
FROM (VALUES {values}) AS v(task_id, token, status)
WHERE t.task_id = v.task_id AND t.status = 'claimed' AND t.fencing_token = v.token
RETURNING t.task_id
"""

RESERVE_ONE_STATEMENT_SQL = """
INSERT INTO task_queue (task_id, task_name, status, queue, exchange, routing_key, body,
    content_type, content_encoding, headers, properties, claimed_by_id, claimed_incarnation,
    claimed_at, fencing_token, reclaim_count, publish_attempts, lost_on, created_at,
    updated_at)
SELECT v.task_id, v.task_name, 'reserved', v.queue, '', v.queue, v.body, 'application/json',
    'utf-8', v.headers::jsonb, '{{}}'::jsonb, %s, %s, now(), 0, 0, 0, '[]'::jsonb, now(), now()
FROM (VALUES {values}) AS v(task_id, task_name, queue, body, headers)
ON CONFLICT (task_id) DO UPDATE SET
    body = EXCLUDED.body, headers = EXCLUDED.headers, updated_at = now(),
    status = CASE WHEN task_queue.status IN ('queued', 'reclaiming') THEN 'reserved'
                  ELSE task_queue.status END,
    claimed_by_id = CASE WHEN task_queue.status IN ('queued', 'reclaiming')
                  THEN EXCLUDED.claimed_by_id ELSE task_queue.claimed_by_id END,
    claimed_incarnation = CASE WHEN task_queue.status IN ('queued', 'reclaiming')
                  THEN EXCLUDED.claimed_incarnation ELSE task_queue.claimed_incarnation END,
    claimed_at = CASE WHEN task_queue.status IN ('queued', 'reclaiming')
                  THEN now() ELSE task_queue.claimed_at END
"""


def run_costs(n: int) -> str:
    import json

    from django.db import connection

    from worker_health import dbthread
    from worker_health.models import TaskQueue, WorkerRegistry

    inc = uuid.uuid4()
    worker = WorkerRegistry.objects.register(
        "costs@bench", incarnation=inc, metadata={}, clock_skew=None
    ).worker
    rows: list[list[str]] = []
    prefix = uuid.uuid4().hex[:6]

    def ids(tag: str) -> list[str]:
        return [f"{prefix}-{tag}-{i}" for i in range(n)]

    def publish_rows(tag: str) -> list[str]:
        task_ids = ids(tag)
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

    rows.append(row("round trip: SELECT by primary key", measure(select_one, n)))
    rows.append(row("commit: 1-row UPDATE in autocommit (WAL flush)", measure(bump, n)))
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO off")
    rows.append(row("commit: same, synchronous_commit=off", measure(bump, n), note="proposal P2"))
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO on")

    # -- publisher ------------------------------------------------------------------------
    pub_ids = ids("pub")
    rows.append(
        row(
            "publish: record_published (1 INSERT, own commit)",
            measure(
                lambda i: TaskQueue.objects.record_published(
                    task_id=pub_ids[i], task_name="noop", queue="celery", eta=None, expires=None
                ),
                n,
            ),
        )
    )

    # -- main process: reserve ----------------------------------------------------------------
    for size in (1, 8, 64):
        batches = max(4, n // size) if size > 1 else n
        task_ids = [f"{prefix}-res{size}-{i}" for i in range(batches * size)]
        for task_id in task_ids:  # as after the publisher's insert
            TaskQueue.objects.record_published(
                task_id=task_id, task_name="noop", queue="celery", eta=None, expires=None
            )

        def reserve(b: int, size: int = size, task_ids: list[str] = task_ids) -> None:
            batch = task_ids[b * size : (b + 1) * size]
            TaskQueue.objects.reserve([sample_delivery(t) for t in batch], worker.pk, inc)

        meter = measure(reserve, batches, per=size)
        rows.append(row(f"receive: reserve, batch of {size} (per task)", meter, per=size))

    for size in (1, 8):
        batches = max(4, n // size) if size > 1 else n
        task_ids = [f"{prefix}-res1s{size}-{i}" for i in range(batches * size)]
        for task_id in task_ids:
            TaskQueue.objects.record_published(
                task_id=task_id, task_name="noop", queue="celery", eta=None, expires=None
            )

        def reserve_one_statement(b: int, size: int = size, task_ids: list[str] = task_ids) -> None:
            batch = task_ids[b * size : (b + 1) * size]
            values = ", ".join(["(%s, %s, %s, %s::bytea, %s)"] * len(batch))
            params: list[Any] = [worker.pk, inc]
            for t in batch:
                d = sample_delivery(t)
                params += [t, d.task_name, d.queue, d.body, json.dumps(d.headers)]
            with connection.cursor() as cursor:
                cursor.execute(RESERVE_ONE_STATEMENT_SQL.format(values=values), params)

        rows.append(
            row(
                f"receive: one upsert statement, batch of {size} (per task)",
                measure(reserve_one_statement, batches, per=size),
                per=size,
                note="proposal P3",
            )
        )

    # -- pool process: claim and finish ----------------------------------------------------------
    claim_ids = publish_rows("claim")
    tokens: dict[str, int | None] = {}

    def claim(i: int) -> None:
        tokens[claim_ids[i]] = TaskQueue.objects.claim(
            task_id=claim_ids[i], task_name="noop", queue="celery", worker_pk=worker.pk,
            incarnation=inc,
        )  # fmt: skip

    rows.append(row("claim: TaskQueue.claim (UPDATE + SELECT)", measure(claim, n)))
    finish_ids = claim_ids
    rows.append(
        row(
            "finish: TaskQueue.finish (UPDATE)",
            measure(
                lambda i: TaskQueue.objects.finish(
                    finish_ids[i], tokens[finish_ids[i]] or 0, "succeeded"
                ),
                n,
            ),
        )
    )

    raw_ids = publish_rows("rawclaim")

    def raw_claim(i: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute(CLAIM_SQL, {"worker": worker.pk, "inc": inc, "task_id": raw_ids[i]})
            cursor.fetchone()

    rows.append(
        row(
            "claim: one UPDATE .. RETURNING fencing_token",
            measure(raw_claim, n),
            note="proposal P1",
        )
    )
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO off")
    raw_ids2 = publish_rows("rawclaim2")

    def raw_claim2(i: int) -> None:
        with connection.cursor() as cursor:
            cursor.execute(CLAIM_SQL, {"worker": worker.pk, "inc": inc, "task_id": raw_ids2[i]})
            cursor.fetchone()

    rows.append(
        row(
            "claim: UPDATE .. RETURNING, synchronous_commit=off",
            measure(raw_claim2, n),
            note="proposals P1+P2",
        )
    )
    rows.append(
        row(
            "finish: TaskQueue.finish, synchronous_commit=off",
            measure(lambda i: TaskQueue.objects.finish(raw_ids2[i], 1, "succeeded"), n),
            note="proposal P2",
        )
    )
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO on")

    batch_ids = publish_rows("batchfinish")
    for i in range(n):
        with connection.cursor() as cursor:
            cursor.execute(CLAIM_SQL, {"worker": worker.pk, "inc": inc, "task_id": batch_ids[i]})
    size = 8

    def finish_batch(b: int) -> None:
        batch = batch_ids[b * size : (b + 1) * size]
        values = ", ".join(["(%s, %s::int, %s)"] * len(batch))
        params: list[Any] = []
        for t in batch:
            params += [t, 1, "succeeded"]
        with connection.cursor() as cursor:
            cursor.execute(FINISH_BATCH_SQL.format(values=values), params)
            cursor.fetchall()

    rows.append(
        row(
            f"finish: batch of {size} in one UPDATE .. FROM VALUES (per task)",
            measure(finish_batch, n // size, per=size),
            per=size,
            note="proposal P4",
        )
    )

    # -- index maintenance: the same writes on a copy of the table with fewer indexes -------------
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS task_queue_lean")
        cursor.execute("CREATE TABLE task_queue_lean (LIKE task_queue INCLUDING DEFAULTS)")
        cursor.execute("ALTER TABLE task_queue_lean ADD PRIMARY KEY (id)")
        cursor.execute("ALTER TABLE task_queue_lean ADD UNIQUE (task_id)")
        cursor.execute(
            "CREATE INDEX ON task_queue_lean (claimed_by_id, status) "
            "WHERE status IN ('reserved', 'claimed')"
        )
        cursor.execute("CREATE INDEX ON task_queue_lean (status, finished_at)")
        cursor.execute("INSERT INTO task_queue_lean SELECT * FROM task_queue")
        cursor.execute("ANALYZE task_queue_lean")
    lean_ids = publish_rows("lean")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO task_queue_lean SELECT * FROM task_queue WHERE task_id LIKE %s",
            [f"{prefix}-lean-%"],
        )

    def claim_finish(table_name: str, task_ids: list[str]) -> Callable[[int], None]:
        claim_sql = CLAIM_SQL.replace("UPDATE task_queue", f"UPDATE {table_name}").replace(
            "task_queue.", f"{table_name}."
        )
        finish_sql = (
            f"UPDATE {table_name} SET status = 'succeeded', finished_at = now(), "
            "updated_at = now() WHERE task_id = %s AND status = 'claimed' AND fencing_token = %s"
        )

        def run(i: int) -> None:
            with connection.cursor() as cursor:
                cursor.execute(claim_sql, {"worker": worker.pk, "inc": inc, "task_id": task_ids[i]})
                token = cursor.fetchone()
                cursor.execute(finish_sql, [task_ids[i], token[0] if token else 0])

        return run

    full_ids = publish_rows("full")
    rows.append(
        row(
            "claim + finish in SQL, task_queue as migrated (8 indexes)",
            measure(claim_finish("task_queue", full_ids), n),
        )
    )
    rows.append(
        row(
            "claim + finish in SQL, without the _like, task_name and (status, updated_at) "
            "indexes (4 left)",
            measure(claim_finish("task_queue_lean", lean_ids), n),
            note="proposal P5",
        )
    )
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE task_queue_lean")

    # -- the hand-off to the db thread ----------------------------------------------------------
    rows.append(
        row(
            "dbthread.call(lambda: None): hand-off round trip",
            measure(lambda i: dbthread.call(lambda: None), n),
        )
    )
    hand_ids = publish_rows("handoff")

    def claim_via_thread(i: int) -> None:
        dbthread.call(
            lambda: TaskQueue.objects.claim(
                task_id=hand_ids[i],
                task_name="noop",
                queue="celery",
                worker_pk=worker.pk,
                incarnation=inc,
            )
        )

    rows.append(
        row(
            "claim via dbthread.call (as in the pool process)",
            measure(claim_via_thread, n),
            note="SQL counted on the other thread",
        )
    )
    dbthread.shutdown()
    headers = [
        "step", "wall µs (median)", "CPU µs of the caller (mean)", "statements",
        "time in SQL µs", "note",
    ]  # fmt: skip
    return table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300, help="calls per step (default 300)")
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
