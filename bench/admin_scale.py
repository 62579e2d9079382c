"""Admin at scale: render time and query count of the dashboard's pages with 10,000
workers, 1,000,000 task rows and 100,000 events.

    python -m bench.admin_scale [--write-docs]
    python -m bench.admin_scale --database-url postgres://.../bench_detector_123   # reuse

Django's test client in this process, logged in as a superuser, against a database of the
benchmark's own filled on the server (bench/bigdata.py). Each page is requested
``--repeat`` times; the table shows the median time and the queries of one request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from . import bigdata
from .common import (
    DOCS,
    BenchDatabase,
    machine_markdown,
    print_machine,
    stamp,
    table,
    write_section,
)


def pages(workers: int) -> list[tuple[str, str]]:
    from django.urls import reverse

    overview = reverse("admin:worker_health_healthoverview_changelist")
    workers_url = reverse("admin:worker_health_workerregistry_changelist")
    tasks_url = reverse("admin:worker_health_taskqueue_changelist")
    events_url = reverse("admin:worker_health_workerevent_changelist")
    return [
        ("health overview", overview),
        ("workers", workers_url),
        ("workers, status=active", f"{workers_url}?status__exact=active"),
        ("workers, sorted by heartbeat age", f"{workers_url}?o=3"),
        ("workers, search 'celery-77'", f"{workers_url}?q=celery-77"),
        ("workers, page 50", f"{workers_url}?p=50"),
        ("one worker", reverse("admin:worker_health_workerregistry_change", args=[workers // 2])),
        ("tasks", tasks_url),
        ("tasks, status=claimed", f"{tasks_url}?status__exact=claimed"),
        ("tasks, status=succeeded", f"{tasks_url}?status__exact=succeeded"),
        ("tasks, task name", f"{tasks_url}?task_name=app.tasks.t7"),
        ("tasks, worker", f"{tasks_url}?worker=celery-{workers // 3}@worker-host-"
                          f"{(workers // 3) % 1000}"),
        ("tasks, search by task id", f"{tasks_url}?q=bench-500000"),
        ("tasks, page 90", f"{tasks_url}?p=90"),
        ("one task", reverse("admin:worker_health_taskqueue_change", args=[500_000])),
        ("events", events_url),
        ("events, kind=worker_failed", f"{events_url}?kind__exact=worker_failed"),
        ("JSON summary endpoint", reverse("worker_health:summary")),
        ("metrics endpoint", reverse("worker_health:metrics")),
    ]  # fmt: skip


def measure(repeat: int, workers: int, slow: list[str]) -> list[list[str]]:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    user_model = get_user_model()
    user = user_model.objects.filter(username="bench").first()
    if user is None:
        user = user_model.objects.create_superuser("bench", "bench@example.com", "bench")
    client = Client()
    client.force_login(user)
    rows = []
    for label, url in pages(workers):
        times: list[float] = []
        queries = 0
        slowest_sql = 0.0
        status = 0
        for n in range(repeat):
            with CaptureQueriesContext(connection) as ctx:
                started = time.perf_counter()
                response = client.get(url)
                times.append(time.perf_counter() - started)
            status = response.status_code
            if n == 0:
                queries = len(ctx.captured_queries)
                slowest = max(ctx.captured_queries, key=lambda q: float(q["time"]), default=None)
                slowest_sql = float(slowest["time"]) if slowest else 0.0
                if slowest is not None and slowest_sql > 0.05:
                    slow.append(explain_slow(label, slowest["sql"]))
        rows.append(
            [
                label,
                f"`{url}`",
                str(status),
                f"{statistics.median(times) * 1000:.0f}",
                f"{max(times) * 1000:.0f}",
                str(queries),
                f"{slowest_sql * 1000:.0f}",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    return rows


def explain_slow(label: str, sql: str) -> str:
    """EXPLAIN ANALYZE of a page's slowest query (the SQL as logged, parameters inlined)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    return f"-- {label}\n{sql}\n{plan}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--database-url", help="an already migrated database to fill and use")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    info = print_machine()
    db: BenchDatabase | None = None
    if args.database_url:
        url = args.database_url
    else:
        db = BenchDatabase.create("admin")
        url = db.url
        print(f"database: {db.name}", flush=True)
    try:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            started = time.monotonic()
            count = conn.execute("SELECT count(*) FROM task_queue").fetchone()
            if not count or count[0] != args.tasks:
                bigdata.populate_tasks(conn, args.tasks)
            bigdata.populate_workers(conn, args.workers)
            bigdata.populate_events(conn, args.events)
            bigdata.make_stale(conn, args.workers, 100, worker_pk=2)  # something to show
            conn.execute("UPDATE worker_registry SET status = 'failed' WHERE id % 97 = 5")
            conn.execute("VACUUM ANALYZE")
            print(f"filled in {time.monotonic() - started:.0f} s", flush=True)
        os.environ.update(
            BENCH_VARIANT="all",
            DATABASE_URL=url,
            CELERY_BROKER_URL="memory://",
            DJANGO_SETTINGS_MODULE="bench.settings",
        )
        import django

        django.setup()
        from django.conf import settings

        settings.ALLOWED_HOSTS.append("testserver")
        slow: list[str] = []
        rows = measure(args.repeat, args.workers, slow)
        from django.db import connections

        connections.close_all()
    finally:
        if db is not None:
            db.drop()
    headers = [
        "page", "URL", "HTTP", "median ms", "max ms", "queries", "slowest query ms",
    ]  # fmt: skip
    text = table(headers, rows)
    print()
    print(text)
    slow_text = "\n\n".join(f"```\n{plan}\n```" for plan in slow)
    print()
    print(slow_text)
    if args.write_docs:
        body = (
            f"Measured {stamp()} with `python -m bench.admin_scale` ({args.workers:,} workers, "
            f"{args.tasks:,} task rows, {args.events:,} events, {args.repeat} requests per "
            f"page) on: {machine_markdown(info)}.\n\n{text}\n\n<details><summary>Plans of the "
            f"queries slower than 50 ms</summary>\n\n{slow_text}\n</details>\n"
        )
        write_section(DOCS / "benchmarks.md", "admin", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
