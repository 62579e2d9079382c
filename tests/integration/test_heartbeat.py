"""Heartbeats of real workers: registration, liveness under load, database outages.

Workers run as real ``celery worker`` processes (see :mod:`tests.integration.harness`) with
the fast settings: heartbeat 1 s, stale after 3 s, detector sweep every 1 s. Every wait is a
deadline loop (``wait_for``); times are read from the database's clock.
"""

from __future__ import annotations

import itertools
import os
import platform
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import celery
import pytest
from celery import Celery
from celery.concurrency import get_implementation
from celery.contrib.testing.worker import start_worker
from django.db.models import Count

from example_project.demo.models import Effect
from tests.integration.harness import (
    HOST,
    Proc,
    Stack,
    database_address,
    database_url,
    db_now,
    wait_for,
)
from tests.integration.tcp_proxy import TcpProxy
from worker_health.models import EventKind, TaskQueue, WorkerRegistry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True, databases="__all__"),
]

HEARTBEAT = 1.0
STALE_AFTER = 3.0
CHECK_INTERVAL = 1.0
#: generous deadline for things promised within STALE_AFTER + CHECK_INTERVAL (< 5 s)
BOUND = 15.0

#: (pool, concurrency) of the pools a worker_health worker must support
POOLS = [("prefork", 2), ("threads", 3), ("solo", 1)]

HEARTBEAT_DOWN = "cannot write heartbeat"
HEARTBEAT_BACK = "database reachable again"


def start_pool_workers(stack: Stack, **env: str) -> dict[str, tuple[Proc, str]]:
    """One worker per pool, each on a queue of its own; named after its pool."""
    queues = {pool: stack.new_queue(pool) for pool, _ in POOLS}
    procs = stack.start_workers(
        {
            pool: {"pool": pool, "concurrency": concurrency, "queues": [queues[pool]], **env}
            for pool, concurrency in POOLS
        }
    )
    return {pool: (procs[pool], queues[pool]) for pool, _ in POOLS}


class HeartbeatLog:
    """The distinct ``last_heartbeat`` values seen per worker, sampled by the test."""

    def __init__(self, stack: Stack, names: list[str]) -> None:
        self.stack = stack
        self.nodes = [stack.node(name) for name in names]
        self.seen: dict[str, list[datetime]] = {node: [] for node in self.nodes}

    def sample(self) -> dict[str, WorkerRegistry]:
        rows = {
            row.worker_id: row
            for row in WorkerRegistry.objects.using(self.stack.alias).filter(
                worker_id__in=self.nodes
            )
        }
        for node, row in rows.items():
            beats = self.seen[node]
            if row.last_heartbeat is not None and (not beats or row.last_heartbeat != beats[-1]):
                beats.append(row.last_heartbeat)
        return rows

    def advanced(self, times: int) -> bool:
        self.sample()
        return all(len(beats) > times for beats in self.seen.values())


# --------------------------------------------------------------------------------------------
# 1. registration


def test_registration_metadata_and_heartbeats(stack: Stack) -> None:
    """Every pool registers with its metadata; heartbeats advance by the database's clock
    and carry the number of tasks processed."""
    workers = start_pool_workers(stack)

    for pool, concurrency in POOLS:
        proc, queue = workers[pool]
        row = stack.row(pool)
        assert row.status == "active"
        assert row.tasks_processed == 0
        assert row.started_at is not None
        meta = row.metadata
        assert meta["host"] == HOST
        assert meta["pid"] == proc.pid, "the worker's main process registers"
        # the -P name ("threads") or, as Celery's banner shows it, the module ("thread")
        assert meta["pool"] in {pool, get_implementation(pool).__module__.rsplit(".", 1)[-1]}
        assert meta["concurrency"] == concurrency
        assert meta["queues"] == [queue]
        assert meta["celery_version"] == celery.__version__
        assert meta["python_version"] == platform.python_version()
        assert meta["incarnation"] == str(row.incarnation)
        registered = stack.events(EventKind.WORKER_REGISTERED, pool)
        assert registered.count() == 1
        assert registered.get().details["incarnation"] == str(row.incarnation)
    incarnations = {stack.row(pool).incarnation for pool, _ in POOLS}
    assert len(incarnations) == len(POOLS), "each start of a worker has its own incarnation"

    # Heartbeats advance, written with the database's clock (never ahead of it).
    log = HeartbeatLog(stack, [pool for pool, _ in POOLS])
    wait_for(lambda: log.advanced(3), BOUND, what="three more heartbeats of every worker")
    now = db_now(stack.alias)
    for node, beats in log.seen.items():
        assert beats == sorted(beats), f"{node}: heartbeats went backwards: {beats}"
        assert beats[-1] <= now + timedelta(seconds=0.01), f"{node}: heartbeat in the future"
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(beats)]
        assert all(0 < gap < STALE_AFTER for gap in gaps), f"{node}: heartbeat gaps {gaps}"

    # tasks_processed catches up with what each worker ran.
    counts = {"prefork": 5, "threads": 4, "solo": 3}
    for pool, count in counts.items():
        stack.publish("work", count, queue=workers[pool][1])

    def effects_by_worker() -> dict[str, int]:
        return dict(
            Effect.objects.using(stack.alias)
            .values_list("worker")
            .annotate(n=Count("id"))
            .values_list("worker", "n")
        )

    expected = {stack.node(pool): n for pool, n in counts.items()}
    wait_for(lambda: effects_by_worker() == expected, 60, what="every task to run")

    def processed() -> dict[str, int]:
        return dict(
            WorkerRegistry.objects.using(stack.alias).values_list("worker_id", "tasks_processed")
        )

    wait_for(lambda: processed() == expected, BOUND, what=f"tasks_processed == {expected}")
    assert set(WorkerRegistry.objects.using(stack.alias).values_list("status", flat=True)) == {
        "active"
    }


def test_a_worker_slower_to_start_than_stale_after_is_not_failed(stack: Stack) -> None:
    """A worker whose start takes longer than STALE_AFTER (here its application's own
    ``worker_init`` handler sleeps) registers when its heart starts: a detector sweeping
    meanwhile (the other worker's heart) has nothing to fail."""
    stack.start_workers({"steady": {}})
    slow = stack.worker("slow", wait=False, EXAMPLE_SLOW_START=str(STALE_AFTER + 2))
    stack.wait_ready("slow", slow, timeout=90)
    log = HeartbeatLog(stack, ["slow"])
    wait_for(lambda: log.advanced(2), BOUND, what="heartbeats of the slow worker")
    assert stack.row("slow").status == "active"
    assert not stack.events(EventKind.WORKER_FAILED, "slow").exists()
    assert not stack.events(EventKind.WORKER_RECOVERED, "slow").exists()
    assert stack.events(EventKind.WORKER_REGISTERED, "slow").count() == 1


# --------------------------------------------------------------------------------------------
# 2. busy workers


def test_busy_workers_stay_active(stack: Stack) -> None:
    """Every slot of every pool runs a CPU-bound task for 3 x STALE_AFTER: nobody is
    failed and heartbeats keep coming while the tasks run."""
    workers = start_pool_workers(stack)
    burn_seconds = 3 * STALE_AFTER
    # Published at once (one manage.py each, in threads), watched from the start.
    with ThreadPoolExecutor(len(POOLS)) as executor:
        published = [
            executor.submit(
                stack.publish,
                "burn",
                concurrency,
                queue=workers[pool][1],
                kwargs={"seconds": burn_seconds},
            )
            for pool, concurrency in POOLS
        ]
    ids = [task_id for future in published for task_id in future.result()]
    tracked = TaskQueue.objects.using(stack.alias).filter(task_id__in=ids)
    log = HeartbeatLog(stack, [pool for pool, _ in POOLS])
    # For each worker, the heartbeats seen while every one of its slots runs a task (from
    # the moment the last slot started to the moment the first task ended).
    busy_since: dict[str, float] = {}
    busy_until: dict[str, float] = {}
    beats_while_busy: dict[str, set[datetime]] = {pool: set() for pool, _ in POOLS}
    deadline = time.monotonic() + 90
    while len(busy_until) < len(POOLS):
        assert time.monotonic() < deadline, f"burn tasks still running: {busy_since} {busy_until}"
        rows = log.sample()
        running = dict(
            tracked.filter(status="claimed")
            .values_list("claimed_by__worker_id")
            .annotate(n=Count("id"))
            .values_list("claimed_by__worker_id", "n")
        )
        now = time.monotonic()
        for pool, concurrency in POOLS:
            node = stack.node(pool)
            if pool in busy_until:
                continue
            if running.get(node, 0) == concurrency:
                busy_since.setdefault(pool, now)
                last_heartbeat = rows[node].last_heartbeat
                assert last_heartbeat is not None
                beats_while_busy[pool].add(last_heartbeat)
            elif pool in busy_since:
                busy_until[pool] = now
        time.sleep(0.2)
    for pool, _ in POOLS:
        busy_for = busy_until[pool] - busy_since[pool]
        assert busy_for > STALE_AFTER, f"{pool}: every slot was busy for only {busy_for:.1f} s"
        # a heart that stopped would show one value (or two, one written just before)
        beats = len(beats_while_busy[pool])
        assert beats >= 3, f"{pool} beat {beats} times in {busy_for:.1f} s of full load"
        print(f"{stack.name} {pool}: {beats} heartbeats in {busy_for:.1f} s of full load")

    wait_for(
        lambda: tracked.filter(status="succeeded").count() == len(ids),
        60,
        what="every burn task to succeed",
    )
    assert stack.events(EventKind.WORKER_FAILED).count() == 0
    assert stack.events(EventKind.WORKER_RECOVERED).count() == 0
    statuses = dict(WorkerRegistry.objects.using(stack.alias).values_list("worker_id", "status"))
    assert statuses == {stack.node(pool): "active" for pool, _ in POOLS}
    for proc, _ in workers.values():
        assert proc.alive()


# --------------------------------------------------------------------------------------------
# 6. database outage


@pytest.fixture
def db_proxies(pg_stack: Stack) -> Iterator[tuple[TcpProxy, TcpProxy]]:
    host, port = database_address(pg_stack.alias)
    with TcpProxy(host, port) as first, TcpProxy(host, port) as second:
        yield first, second


def test_database_outage_is_survived(
    pg_stack: Stack, db_proxies: tuple[TcpProxy, TcpProxy]
) -> None:
    """Workers whose database goes away for 3 x STALE_AFTER (twice) keep running, warn once
    per outage, beat again afterwards and are not declared failed.

    Every process that could sweep (the workers' heartbeat threads) goes through a proxy, so
    during the outage no detector can see the database. ``late`` gets its database back a
    second after the others: without the outage guard, the first sweep after the outage
    would fail it at once (its last heartbeat is 9 s old).
    """
    stack = pg_stack
    main, late_proxy = db_proxies
    names = ["prefork", "threads", "late"]
    procs = stack.start_workers(
        {
            "prefork": {
                "pool": "prefork",
                "DATABASE_URL": database_url(stack.alias, port=main.port),
            },
            "threads": {
                "pool": "threads",
                "DATABASE_URL": database_url(stack.alias, port=main.port),
            },
            "late": {
                "pool": "solo",
                "DATABASE_URL": database_url(stack.alias, port=late_proxy.port),
            },
        }
    )
    assert main.accepted > 0 and late_proxy.accepted > 0, "the workers use the proxies"
    # Tasks before the outage: the pool processes hold database connections through it.
    ids = stack.publish("work", 6)
    succeeded = TaskQueue.objects.using(stack.alias).filter(status="succeeded")
    wait_for(lambda: succeeded.count() == 6, 60, what="tasks before the outage to succeed")
    log = HeartbeatLog(stack, names)
    wait_for(lambda: log.advanced(1), BOUND, what="heartbeats before the outage")
    # a detector has been watching for a while: failures would be possible right away
    wait_for(
        lambda: stack.events(EventKind.WORKER_REGISTERED).count() == 3,
        BOUND,
        what="registrations",
    )

    for outage in (1, 2):
        log.sample()
        before = {node: beats[-1] for node, beats in log.seen.items()}
        main.cut()
        late_proxy.cut()
        cut_at = time.monotonic()

        def warned(outage: int = outage) -> bool:
            return all(procs[n].count(HEARTBEAT_DOWN) >= outage for n in names)

        wait_for(warned, BOUND, what=f"every worker to notice outage {outage}")
        # the outage lasts 3 x STALE_AFTER: heartbeats are stale by any measure
        while time.monotonic() - cut_at < 3 * STALE_AFTER:
            assert all(p.alive() for p in procs.values())
            time.sleep(0.2)
        assert main.refused > 0, "the workers kept trying during the outage"
        main.restore()
        # the late worker gets its database back 1 s after the detectors (< STALE_AFTER)
        time.sleep(1.0)
        late_proxy.restore()

        def resumed(before: dict[str, datetime] = before) -> bool:
            rows = log.sample()
            return all(
                rows[node].status == "active" and log.seen[node][-1] > before[node]
                for node in log.nodes
            )

        wait_for(resumed, BOUND, what=f"heartbeats to resume after outage {outage}")
        # The guard holds until the detector has watched for STALE_AFTER again; by then a
        # wrongly failed worker would be visible.
        stack.wait_sweep_after(STALE_AFTER + 1)
        assert stack.events(EventKind.WORKER_FAILED).count() == 0
        assert stack.events(EventKind.WORKER_RECOVERED).count() == 0
        for name in names:
            proc = procs[name]
            assert proc.alive()
            # once per outage, not once per attempt (attempts are every <= 0.5 s)
            assert proc.count(HEARTBEAT_DOWN) == outage, name

        def logged_back(outage: int = outage) -> bool:
            return all(procs[name].count(HEARTBEAT_BACK) == outage for name in names)

        wait_for(logged_back, BOUND, what="every worker to log that the database is back")

    # The workers still do their job (tracking after an outage: see the next test).
    ids = stack.publish("work", 6)
    wait_for(
        lambda: Effect.objects.using(stack.alias).filter(task_id__in=ids).count() == len(ids),
        60,
        what="tasks published after the outages to run",
    )
    statuses = set(WorkerRegistry.objects.using(stack.alias).values_list("status", flat=True))
    assert statuses == {"active"}


def test_tracking_resumes_after_database_outage(
    pg_stack: Stack, db_proxies: tuple[TcpProxy, TcpProxy]
) -> None:
    """After the database comes back, the next tasks are claimed and finished as usual."""
    stack = pg_stack
    proxy, _ = db_proxies
    via_proxy = database_url(stack.alias, port=proxy.port)
    stack.start_workers(
        {
            "prefork": {"pool": "prefork", "concurrency": 1, "DATABASE_URL": via_proxy},
            "threads": {"pool": "threads", "concurrency": 1, "DATABASE_URL": via_proxy},
        }
    )
    tracked = TaskQueue.objects.using(stack.alias)
    # Both workers run tasks first, so their tracking threads hold connections.
    before = stack.publish("work", 8, kwargs={"seconds": 0.2})
    wait_for(
        lambda: tracked.filter(task_id__in=before, status="succeeded").count() == len(before),
        60,
        what="tasks before the outage to succeed",
    )
    assert len(set(Effect.objects.using(stack.alias).values_list("worker", flat=True))) == 2

    proxy.cut()
    wait_for(
        lambda: all(p.count(HEARTBEAT_DOWN) == 1 for p in stack.procs),
        BOUND,
        what="the workers to notice the outage",
    )
    proxy.restore()
    wait_for(
        lambda: all(p.count(HEARTBEAT_BACK) == 1 for p in stack.procs),
        BOUND,
        what="the heartbeats to resume",
    )

    after = stack.publish("work", 8, kwargs={"seconds": 0.2})
    wait_for(
        lambda: Effect.objects.using(stack.alias).filter(task_id__in=after).count() == len(after),
        60,
        what="tasks after the outage to run",
    )
    wait_for(
        lambda: tracked.filter(task_id__in=after, status="succeeded").count() == len(after),
        BOUND,
        what="tasks after the outage to be tracked as succeeded",
    )


# --------------------------------------------------------------------------------------------
# 10. in-thread workers (celery.contrib.testing), where ``worker_ready`` is never sent


@pytest.fixture
def in_memory_app(settings: Any) -> Iterator[Celery]:
    """The example project's Celery app on the in-memory broker, with fast heartbeats;
    its configuration and task classes are restored afterwards."""
    from example_project.celery import app

    settings.WORKER_HEALTH_HEARTBEAT_INTERVAL = 0.3
    settings.WORKER_HEALTH_STALE_AFTER = 2.0
    settings.WORKER_HEALTH_CHECK_INTERVAL = 0.5
    overrides = {"broker_url": "memory://", "task_default_queue": "wh-in-thread"}
    saved_conf = {key: app.conf[key] for key in overrides}
    # the worker installs its claim hook on the task classes of this process: undo it
    patched = ("before_start", "_worker_health_original_before_start", "_worker_health_claims")
    saved_classes = {
        type(task): {
            name: type(task).__dict__[name] for name in patched if name in type(task).__dict__
        }
        for task in app.tasks.values()
    }
    app.conf.update(overrides)
    try:
        yield app
    finally:
        app.conf.update(saved_conf)
        for cls, attributes in saved_classes.items():
            for name in patched:
                if name in attributes:
                    setattr(cls, name, attributes[name])
                elif name in cls.__dict__:
                    delattr(cls, name)


def test_in_thread_worker_registers(in_memory_app: Celery) -> None:
    """``start_worker`` never sends ``worker_ready``: the worker registers all the same,
    beats while it runs, and goes offline when it stops."""
    node = f"in-thread-{uuid.uuid4().hex[:8]}@{HOST}"
    workers = WorkerRegistry.objects.using("default")
    beats: list[datetime] = []

    def beat_seen() -> bool:
        value = workers.filter(worker_id=node).values_list("last_heartbeat", flat=True).first()
        if value is not None and (not beats or value != beats[-1]):
            beats.append(value)
        return len(beats) >= 4

    with start_worker(
        in_memory_app, pool="solo", hostname=node, perform_ping_check=False, shutdown_timeout=30
    ):
        row = wait_for(
            lambda: workers.filter(worker_id=node, status="active").first(),
            BOUND,
            what=f"{node} to register",
        )
        assert row is not None
        assert row.metadata["pid"] == os.getpid()
        assert row.metadata["pool"] == "solo"
        assert row.metadata["incarnation"] == str(row.incarnation)
        assert row.metadata["queues"] == ["wh-in-thread"]
        wait_for(beat_seen, BOUND, what="the in-thread worker's heartbeats")
        assert beats == sorted(beats)
    wait_for(
        lambda: workers.filter(worker_id=node, status="offline").exists(),
        BOUND,
        what=f"{node} to go offline when it stops",
    )
