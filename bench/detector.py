"""Detector scale: one sweep with 1,000 / 10,000 / 100,000 workers and 1,000,000 task rows.

    python -m bench.detector [--tasks 1000000] [--workers 1000,10000,100000] [--write-docs]

A database of its own on the PostgreSQL server, filled on the server (bench/bigdata.py):
every live worker holds two tasks (one running, one prefetched), 1 % of the rows are a
queued backlog, the rest finished over 7 days. For each size the sweep
(``reclaim.sweep(force=True)``, the function beat and the heartbeat threads call) is timed

* when nothing is stale (every heartbeat fresh), median of ``--repeat`` sweeps, and
* when one worker with 10,000 running tasks is stale: it is failed, its tasks reclaimed and
  published again (to an in-memory broker, so the broker's speed is not measured);

with the statements it sent, the time in each phase, and ``EXPLAIN (ANALYZE, BUFFERS)`` of
the detector's queries: ``WorkerRegistry.objects.stale``, ``recently_dead`` (the
orphans' fast path, every sweep), ``TaskQueue.objects.orphaned``
(as the sweep uses it), ``held_by``, and the outbox queries. A first point with 100,000
task rows shows whether a sweep's cost follows the table size.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import bigdata
from .common import (
    DOCS,
    bench_database,
    machine_markdown,
    median,
    print_machine,
    stamp,
    table,
    write_section,
)

STALE_CLAIMED = 10_000


@dataclass
class SweepStats:
    seconds: float
    statements: int
    phases: dict[str, float] = field(default_factory=dict)
    failed: int = 0
    reclaimed: int = 0


@contextmanager
def counting() -> Iterator[list[int]]:
    from django.db import connection

    counter = [0]

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any) -> Any:
        counter[0] += 1
        return execute(sql, params, many, ctx)

    with connection.execute_wrapper(wrapper):
        yield counter


def timed_sweep() -> SweepStats:
    from worker_health import reclaim

    phases: dict[str, float] = {}
    originals = {
        name: getattr(reclaim, name)
        for name in ("fail_stale_workers", "reclaim_orphans", "flush_outbox")
    }

    def timer(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            started = time.perf_counter()
            try:
                return fn()
            finally:
                phases[name] = time.perf_counter() - started

        return run

    for name, fn in originals.items():
        setattr(reclaim, name, timer(name, fn))
    try:
        with counting() as counter:
            started = time.perf_counter()
            result = reclaim.sweep(who="bench", force=True)
            seconds = time.perf_counter() - started
    finally:
        for name, fn in originals.items():
            setattr(reclaim, name, fn)
    return SweepStats(
        seconds=seconds,
        statements=counter[0],
        phases=phases,
        failed=len(result.failed_workers),
        reclaimed=len(result.reclaimed),
    )


def explain(label: str, qs: Any) -> str:
    plan = qs.explain(analyze=True, buffers=True)
    return f"-- {label}\n{plan}"


def plan_summary(plan: str) -> str:
    """The access paths of a plan, e.g. 'Index Only Scan using wh_task_held_idx'."""
    paths = re.findall(
        r"((?:Parallel )?(?:Seq Scan|Index Only Scan|Index Scan|Bitmap Heap Scan|"
        r"Bitmap Index Scan)(?: using \w+)? on \w+)",
        plan,
    )
    total = re.search(r"Execution Time: ([\d.]+) ms", plan)
    seen: list[str] = []
    for path in paths:
        if path not in seen:
            seen.append(path)
    return f"{'; '.join(seen)} ({total.group(1) if total else '?'} ms)"


def detector_queries(worker_pk: int) -> list[tuple[str, Any]]:
    from worker_health.conf import settings
    from worker_health.models import TaskQueue, TaskStatus, WorkerRegistry
    from worker_health.querysets import db_now_minus
    from worker_health.reclaim import FULL_SCAN_EVERY, MAX_PUBLISH_ATTEMPTS, outbox_grace

    grace = outbox_grace()
    unpicked = None
    from django.db.models import Q

    unpicked = Q()
    for attempts in range(1, MAX_PUBLISH_ATTEMPTS):
        unpicked |= Q(publish_attempts=attempts, reclaimed_at__lt=db_now_minus(grace * 2**attempts))
    return [
        (
            "WorkerRegistry.objects.stale(STALE_AFTER)",
            WorkerRegistry.objects.stale(settings.STALE_AFTER).values_list(
                "pk", "worker_id", "last_heartbeat"
            ),
        ),
        (
            "WorkerRegistry.objects.recently_dead().holding_tasks() (reclaim_orphans, every sweep)",
            WorkerRegistry.objects.recently_dead(
                2 * settings.CHECK_INTERVAL * FULL_SCAN_EVERY, settings.STALE_AFTER
            )
            .holding_tasks()
            .values_list("pk", flat=True),
        ),
        (
            "TaskQueue.objects.orphaned() holders (reclaim_orphans' full scan, every "
            f"{FULL_SCAN_EVERY} check intervals)",
            TaskQueue.objects.orphaned().order_by().values_list("claimed_by", flat=True).distinct(),
        ),
        (
            "TaskQueue.objects.orphaned().filter(claimed_by=stale worker)",
            TaskQueue.objects.orphaned().filter(claimed_by=worker_pk).values("pk", "task_id"),
        ),
        (
            "TaskQueue.objects.held_by(stale worker)",
            TaskQueue.objects.held_by(worker_pk).values("pk", "task_id"),
        ),
        (
            "flush_outbox: reclaiming rows past the grace",
            TaskQueue.objects.filter(
                status=TaskStatus.RECLAIMING, reclaimed_at__lt=db_now_minus(grace)
            ).values_list("pk", "status", "reclaim_lease", "reclaimed_at")[:1000],
        ),
        (
            "flush_outbox: reclaimed but not picked up",
            TaskQueue.objects.filter(
                unpicked,
                status=TaskStatus.QUEUED,
                publish_attempts__gt=0,
                reclaimed_at__isnull=False,
                body__isnull=False,
            ).values_list("pk", "status", "reclaim_lease", "reclaimed_at")[:1000],
        ),
    ]


def run_point(conn: Any, workers: int, tasks: int, repeat: int, plans: list[str]) -> list[str]:
    from django.db import connection

    refresh = lambda: bigdata.refresh_heartbeats(conn, workers)  # noqa: E731
    refresh()
    bigdata.detector_watching(conn)
    conn.execute("ANALYZE task_queue")
    conn.execute("ANALYZE worker_registry")
    quiet: list[SweepStats] = []
    for _ in range(repeat):
        refresh()
        bigdata.detector_watching(conn)
        quiet.append(timed_sweep())
    assert all(s.failed == 0 and s.reclaimed == 0 for s in quiet), "a fresh worker was failed"
    # EXPLAIN when nothing is stale
    plans.append(f"### {workers:,} workers, {tasks:,} task rows, nothing stale\n")
    quiet_plans = []
    for label, qs in detector_queries(1):
        text = explain(label, qs)
        quiet_plans.append(text)
        plans.append(f"```\n{text}\n```\n")
    stale: list[SweepStats] = []
    stale_plans: list[str] = []
    for n in range(max(1, repeat // 2)):
        refresh()
        bigdata.make_stale(conn, workers, STALE_CLAIMED)
        bigdata.detector_watching(conn)
        conn.execute("ANALYZE task_queue")
        if n == 0:
            plans.append(f"### {workers:,} workers, one stale with {STALE_CLAIMED:,} claimed\n")
            for label, qs in detector_queries(1):
                text = explain(label, qs)
                stale_plans.append(text)
                plans.append(f"```\n{text}\n```\n")
        stale.append(timed_sweep())
        assert stale[-1].failed == 1, stale[-1]
        bigdata.unmake_stale(conn, workers, STALE_CLAIMED)
        conn.execute("DELETE FROM worker_health_event")
    connection.close()
    s = stale[len(stale) // 2] if stale else None
    return [
        f"{workers:,}",
        f"{tasks:,}",
        f"{median([q.seconds for q in quiet]) * 1000:.1f}",
        str(quiet[0].statements),
        " · ".join(plan_summary(p).split(" (")[-1].rstrip(")") for p in quiet_plans[:3]),
        f"{median([x.seconds for x in stale]):.2f}" if stale else "-",
        str(s.statements) if s else "-",
        (", ".join(f"{k.split('_')[0]} {v:.2f}" for k, v in s.phases.items()) if s else "-"),
        f"{s.reclaimed:,}" if s else "-",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--workers", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=5, help="quiet sweeps per point")
    parser.add_argument("--small-tasks", type=int, default=100_000, help="first point's rows")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--keep-db", action="store_true", help="keep the filled database")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.workers.split(",")]
    info = print_machine()
    rows: list[list[str]] = []
    plans: list[str] = []
    with bench_database("detector", keep=args.keep_db) as db:
        os.environ.update(
            BENCH_VARIANT="worker_health",
            DATABASE_URL=db.url,
            CELERY_BROKER_URL="memory://",
            DJANGO_SETTINGS_MODULE="bench.settings",
        )
        import django

        django.setup()
        import logging

        logging.getLogger("worker_health").setLevel(logging.ERROR)  # 10,000 reclaim lines
        with db.connect(autocommit=True) as conn:
            points: list[tuple[int, int]] = []
            if args.small_tasks and args.small_tasks < args.tasks:
                points.append((sizes[0], args.small_tasks))
            points += [(w, args.tasks) for w in sizes]
            filled = 0
            for workers, tasks in points:
                if tasks != filled:
                    took = bigdata.populate_tasks(conn, tasks)
                    filled = tasks
                    print(f"{tasks:,} task rows inserted in {took:.1f} s", flush=True)
                took = bigdata.populate_workers(conn, workers)
                conn.execute("VACUUM ANALYZE task_queue")
                conn.execute("VACUUM ANALYZE worker_registry")
                print(f"{workers:,} workers (holding 2 tasks each) in {took:.1f} s", flush=True)
                row = run_point(conn, workers, tasks, args.repeat, plans)
                rows.append(row)
                print(" | ".join(row), flush=True)
            size = conn.execute(
                "SELECT pg_size_pretty(pg_total_relation_size('task_queue'))"
            ).fetchone()
            print(f"task_queue with indexes: {size[0] if size else '?'}")
    headers = [
        "workers", "task rows", "sweep, nothing stale (ms, median)", "statements",
        "queries: stale · recently dead holders · full orphan scan (ms)",
        "sweep, 1 stale worker with 10,000 tasks (s)", "statements", "phases (s)",
        "tasks reclaimed",
    ]  # fmt: skip
    text = table(headers, rows)
    print()
    print(text)
    plan_text = "\n".join(plans)
    print()
    print(plan_text)
    if args.write_docs:
        body = (
            f"Measured {stamp()} with `python -m bench.detector` on: {machine_markdown(info)}."
            f"\n\n{text}\n\n<details><summary>Query plans (EXPLAIN ANALYZE, BUFFERS)</summary>"
            f"\n\n{plan_text}\n</details>\n"
        )
        write_section(DOCS / "benchmarks.md", "detector", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
