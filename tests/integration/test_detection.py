"""Failure detection with real worker processes: SIGKILL, SIGTERM, SIGSTOP / SIGCONT,
concurrent detectors, and detection while every slot is busy and the queue is long.

With the fast settings (heartbeat 1 s, stale after 3 s, sweep every 1 s) a dead worker must
be failed within STALE_AFTER + CHECK_INTERVAL = 4 s of its last heartbeat. Deadlines in the
test process are generous (a loaded 2-core machine); the promise itself is checked on the
database's clock: ``status_changed_at - last_heartbeat``.
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from datetime import timedelta

import pytest
from django.db.models import Count

from tests.integration.harness import Proc, Stack, db_now, wait_for
from worker_health.models import DetectorState, EventKind, TaskQueue, WorkerRegistry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True, databases="__all__"),
]

STALE_AFTER = 3.0
CHECK_INTERVAL = 1.0
#: deadline in the test process for what is promised within STALE_AFTER + CHECK_INTERVAL
BOUND = 15.0
#: the promise on the database's clock, plus room for a sweep delayed by a loaded machine
DB_BOUND = STALE_AFTER + CHECK_INTERVAL + 3.0


def status_of(stack: Stack, name: str) -> str:
    return str(stack.row(name).status)


def wait_status(stack: Stack, name: str, status: str, timeout: float = BOUND) -> WorkerRegistry:
    wait_for(lambda: status_of(stack, name) == status, timeout, what=f"{name} to be {status}")
    return stack.row(name)


def assert_failed_in_time(row: WorkerRegistry) -> None:
    """The detector's promise, on the database's clock."""
    assert row.status == "failed"
    assert row.status_changed_at is not None and row.last_heartbeat is not None
    waited = (row.status_changed_at - row.last_heartbeat).total_seconds()
    assert STALE_AFTER <= waited <= DB_BOUND, (
        f"{row.worker_id} failed {waited:.2f} s after its last heartbeat "
        f"(STALE_AFTER={STALE_AFTER}, bound {DB_BOUND})"
    )


# --------------------------------------------------------------------------------------------
# 3. SIGKILL


def test_sigkill_is_detected_within_the_bound(stack: Stack) -> None:
    procs = stack.start_workers(
        {
            "victim": {"pool": "prefork", "concurrency": 2},
            "threads": {"pool": "threads", "concurrency": 2},
            "solo": {"pool": "solo", "concurrency": 1},
        }
    )
    victim = procs.pop("victim")
    others = procs
    # the detector is watching (and a heartbeat was written) before the kill
    stack.wait_sweep_after(0.5)

    victim.kill_group()
    killed_at = time.monotonic()
    row = wait_status(stack, "victim", "failed")
    detected_after = time.monotonic() - killed_at
    assert_failed_in_time(row)
    assert detected_after <= BOUND

    failed = stack.events(EventKind.WORKER_FAILED, "victim")
    assert failed.count() == 1
    event = failed.get()
    assert event.worker_id == row.pk
    assert event.details["stale_after"] == STALE_AFTER
    assert event.details["last_heartbeat"]

    # The others stay active, sweep after sweep.
    stack.wait_sweep_after(STALE_AFTER + CHECK_INTERVAL)
    for name, proc in others.items():
        assert proc.alive()
        assert status_of(stack, name) == "active"
    assert stack.events(EventKind.WORKER_FAILED).count() == 1
    assert status_of(stack, "victim") == "failed"


# --------------------------------------------------------------------------------------------
# 4. warm shutdown


def test_warm_shutdown_goes_offline(stack: Stack) -> None:
    procs = stack.start_workers(
        {"leaving": {"pool": "prefork", "concurrency": 2}, "staying": {"pool": "solo"}}
    )
    leaving, staying = procs["leaving"], procs["staying"]

    assert leaving.stop(timeout=60) == 0, "warm shutdown exits cleanly"
    row = stack.row("leaving")
    assert row.status == "offline"
    offline = stack.events(EventKind.WORKER_OFFLINE, "leaving")
    assert offline.count() == 1
    assert offline.get().details["cold"] is False

    # Offline is final: later sweeps do not turn a worker that left on purpose into failed.
    stack.wait_sweep_after(STALE_AFTER + CHECK_INTERVAL)
    assert status_of(stack, "leaving") == "offline"
    assert stack.events(EventKind.WORKER_FAILED).count() == 0
    assert status_of(stack, "staying") == "active"
    assert staying.alive()


# --------------------------------------------------------------------------------------------
# 5. SIGSTOP / SIGCONT


def test_stopped_worker_is_failed_then_recovers_loudly(db_stack: Stack) -> None:
    stack = db_stack
    procs = stack.start_workers(
        {"paused": {"pool": "prefork", "concurrency": 1}, "watcher": {"pool": "solo"}}
    )
    paused, watcher = procs["paused"], procs["watcher"]
    incarnation = stack.row("paused").incarnation
    stack.wait_sweep_after(0.5)

    paused.signal_group(signal.SIGSTOP)
    try:
        row = wait_status(stack, "paused", "failed")
        assert_failed_in_time(row)
    finally:
        paused.signal_group(signal.SIGCONT)

    row = wait_status(stack, "paused", "active")
    assert row.incarnation == incarnation, "the same process came back"
    failed = stack.events(EventKind.WORKER_FAILED, "paused")
    recovered = stack.events(EventKind.WORKER_RECOVERED, "paused")
    assert failed.count() == 1
    assert recovered.count() == 1, "a worker that comes back is never silently active again"
    assert recovered.get().created_at >= failed.get().created_at
    assert recovered.get().details["previous_status"] == "failed"
    wait_for(
        lambda: paused.count("worker_recovered") >= 1,
        BOUND,
        what="the recovered worker to log it",
    )

    # It keeps beating: not failed a second time.
    stack.wait_sweep_after(STALE_AFTER + CHECK_INTERVAL)
    assert status_of(stack, "paused") == "active"
    assert stack.events(EventKind.WORKER_FAILED).count() == 1
    assert status_of(stack, "watcher") == "active"
    assert paused.alive() and watcher.alive()


# --------------------------------------------------------------------------------------------
# 7. concurrent detectors

#: ``manage.py worker_health detect`` that boots, runs the system checks, says it is ready,
#: and runs the command when the go file appears: the detectors start their sweeps within a
#: millisecond or two of each other.
DETECT_ON_GO = textwrap.dedent(
    """
    import pathlib, sys, time
    import django
    django.setup()
    from django.core import checks
    from django.core.management import execute_from_command_line
    from django.db import connection
    from worker_health.management.commands import worker_health  # noqa: F401
    checks.run_checks()
    connection.ensure_connection()
    ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    ready.touch()
    deadline = time.monotonic() + 120
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit("no go")
        time.sleep(0.0005)
    execute_from_command_line(["manage.py", "worker_health", "--skip-checks", "detect"])
    """
)


def sweep_output(proc: Proc) -> dict[str, object]:
    for line in proc.log().splitlines():
        if line.startswith("{") and '"swept"' in line:
            return dict(json.loads(line))
    raise AssertionError(f"{proc.name} printed no sweep result:\n{proc.log()[-3000:]}")


def test_concurrent_detectors_fail_each_worker_once(db_stack: Stack) -> None:
    stack = db_stack
    names = ["dead1", "dead2", "dead3"]
    workers = stack.start_workers({name: {"pool": "solo"} for name in names})

    # Two detectors, booted and waiting for the go.
    go = stack.workdir / "go"
    detectors = []
    for i in (1, 2):
        ready = stack.workdir / f"ready{i}"
        detectors.append(
            (
                ready,
                stack.spawn(
                    f"detect{i}", [sys.executable, "-c", DETECT_ON_GO, str(ready), str(go)]
                ),
            )
        )
    wait_for(lambda: all(ready.exists() for ready, _ in detectors), 60, what="detectors to boot")

    # Every worker dies at once: nobody else sweeps (no live worker, no beat).
    for proc in workers.values():
        proc.kill_group()
    nodes = [stack.node(name) for name in names]

    def all_stale() -> bool:
        cutoff = db_now(stack.alias) - timedelta(seconds=STALE_AFTER + 0.5)
        stale = WorkerRegistry.objects.using(stack.alias).filter(
            worker_id__in=nodes, status="active", last_heartbeat__lt=cutoff
        )
        return stale.count() == len(nodes)

    wait_for(all_stale, BOUND, what="every worker to be stale")
    # A detector that has been watching all along (its sweeps paused for less than the
    # outage gap): without it the outage guard would rightly hold every failure back.
    now = db_now(stack.alias)
    DetectorState.objects.using(stack.alias).update_or_create(
        pk=1,
        defaults={"observing_since": now - timedelta(hours=1), "last_sweep_at": now},
    )
    go.touch()
    for _, proc in detectors:
        proc.popen.wait(60)
        assert proc.popen.returncode == 0, proc.log()[-3000:]

    outputs = [sweep_output(proc) for _, proc in detectors]
    assert all(out["swept"] for out in outputs), outputs
    failed_by = [set(out["failed_workers"]) for out in outputs]  # type: ignore[call-overload]
    assert failed_by[0] | failed_by[1] == set(nodes), outputs
    assert failed_by[0] & failed_by[1] == set(), f"a worker was failed twice: {outputs}"
    per_worker = dict(
        stack.events(EventKind.WORKER_FAILED)
        .values_list("worker_name")
        .annotate(n=Count("id"))
        .values_list("worker_name", "n")
    )
    assert per_worker == {node: 1 for node in nodes}
    assert set(WorkerRegistry.objects.using(stack.alias).values_list("status", flat=True)) == {
        "failed"
    }


# --------------------------------------------------------------------------------------------
# 8. detection does not wait behind user tasks

BACKLOG = 2000
LONG_TASK = 120.0


def test_detection_does_not_wait_behind_a_backlog(db_stack: Stack) -> None:
    """Every slot runs a long task, thousands of tasks wait in the queue (and beat's
    detector tasks behind them): a killed worker is still failed within the bound."""
    stack = db_stack
    pools = {"victim": ("prefork", 2), "threads": ("threads", 2), "solo": ("solo", 1)}
    # each on its own queue for its long tasks, and on the shared queue with the backlog
    own_queues = {name: stack.new_queue(name) for name in pools}
    procs = stack.start_workers(
        {
            name: {
                "pool": pool,
                "concurrency": concurrency,
                "queues": [own_queues[name], stack.queue],
            }
            for name, (pool, concurrency) in pools.items()
        }
    )

    long_ids: list[str] = []
    for name, (_, concurrency) in pools.items():
        long_ids += stack.publish(
            "work", concurrency, queue=own_queues[name], kwargs={"seconds": LONG_TASK}
        )
    slots = sum(concurrency for _, concurrency in pools.values())
    tracked = TaskQueue.objects.using(stack.alias)
    wait_for(
        lambda: tracked.filter(task_id__in=long_ids, status="claimed").count() == slots,
        60,
        what="every slot to run a long task",
    )
    published_at = time.monotonic()
    backlog = stack.publish("noop", BACKLOG)
    publish_seconds = time.monotonic() - published_at
    beat = stack.beat()
    wait_for(
        lambda: beat.count("Sending due task worker-health-detect-failed-workers") >= 2,
        60,
        what="beat to send the detector task (into the backlog)",
    )
    stack.wait_sweep_after(0.5)

    procs["victim"].kill_group()
    killed_at = time.monotonic()
    row = wait_status(stack, "victim", "failed")
    detected_after = time.monotonic() - killed_at
    assert_failed_in_time(row)
    assert detected_after <= BOUND

    # The backlog was still there: detection did not wait for it, nor for the long tasks.
    done = tracked.filter(task_id__in=backlog, status="succeeded").count()
    assert done == 0, f"{done} backlog tasks ran: the slots were not all busy"
    assert tracked.filter(task_id__in=long_ids, status="succeeded").count() == 0
    for name in ("threads", "solo"):
        assert status_of(stack, name) == "active"
    assert stack.events(EventKind.WORKER_FAILED).count() == 1
    print(
        f"{stack.name}: published {BACKLOG} tasks in {publish_seconds:.1f} s; "
        f"victim failed {detected_after:.1f} s after the kill"
    )
