"""No task lost when a worker dies: real workers, killed for real, effects counted.

Every task records its effect in ``demo.Effect`` (unique on task id, with a run counter),
so "ran exactly once" is checked on what the tasks did, not on what worker_health says.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from django.db.models import Count, Q

from example_project.demo.models import Effect
from tests.integration.harness import Stack, wait_for
from worker_health.models import EventKind, TaskQueue, WorkerEvent, WorkerRegistry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True, databases="__all__"),
]

#: STALE_AFTER + CHECK_INTERVAL with the fast settings, plus room for a loaded 2-core machine
BOUND = 4.0
MARGIN = 20.0


def tasks(stack: Stack):  # type: ignore[no-untyped-def]
    return TaskQueue.objects.using(stack.alias)


def effects(stack: Stack):  # type: ignore[no-untyped-def]
    return Effect.objects.using(stack.alias)


def events(stack: Stack):  # type: ignore[no-untyped-def]
    return WorkerEvent.objects.using(stack.alias)


def wait_held(stack: Stack, node: str, running: int = 1, reserved: int = 1) -> None:
    """Wait until ``node`` holds ``running + reserved`` tasks: with ``running`` its
    concurrency, the rest were received and are waiting (claimed by the gate and queued for
    the pool, or reserved for an ETA)."""

    def held() -> bool:
        qs = tasks(stack).filter(claimed_by__worker_id=node, status__in=("claimed", "reserved"))
        return qs.count() >= running + reserved

    wait_for(held, 60, what=f"{node} to hold {running} running and {reserved} waiting tasks")


def wait_recorded(stack: Stack, node: str, received: int) -> None:
    """Wait until the first ``received`` deliveries to ``node`` are all recorded: held by it
    (claimed or reserved) or finished there. (On the filesystem transport a message exists
    nowhere else once read: a kill before its record would lose it, a documented limit
    that these tests do not measure.)"""

    def recorded() -> bool:
        qs = tasks(stack).filter(
            claimed_by__worker_id=node, status__in=("claimed", "reserved", "succeeded")
        )
        return qs.count() >= received

    wait_for(recorded, 60, what=f"{node}'s first {received} deliveries to be recorded")


def assert_each_ran_once(stack: Stack, ids: list[str], timeout: float) -> None:
    def all_done() -> bool:
        return effects(stack).filter(task_id__in=ids).count() == len(ids)

    wait_for(all_done, timeout, what=f"all {len(ids)} tasks to take effect")
    # let late duplicates (broker redeliveries, a second publish) show up if there were any
    time.sleep(3)
    runs = dict(effects(stack).filter(task_id__in=ids).values_list("task_id", "runs"))
    assert {task_id: n for task_id, n in runs.items() if n != 1} == {}
    wait_for(
        lambda: tasks(stack).filter(task_id__in=ids, status="succeeded").count() == len(ids),
        30,
        what="every row succeeded",
    )


def history(stack: Stack, ids: set[str]) -> str:
    """What the database says of ``ids``: rows, events and effects (for a failure)."""
    rows = list(
        tasks(stack)
        .filter(task_id__in=ids)
        .values("task_id", "status", "fencing_token", "started_token", "reclaim_count")
    )
    kinds = list(
        events(stack)
        .filter(task_id__in=ids)
        .order_by("pk")
        .values_list("task_id", "kind", "worker_name", "details")
    )
    runs = list(effects(stack).filter(task_id__in=ids).values_list("task_id", "worker", "runs"))
    return f"not reclaimed: {sorted(ids)}; rows {rows}; events {kinds}; effects {runs}"


def test_sigkill_running_and_prefetched_tasks_run_exactly_once(stack: Stack) -> None:
    victim = stack.worker("victim", concurrency=2)
    ids = stack.publish("work", 16, kwargs={"seconds": 2.5})
    # its whole prefetch window (2 processes x prefetch multiplier 4) recorded, some of it
    # waiting behind the two running tasks
    wait_recorded(stack, stack.node("victim"), 8)
    wait_held(stack, stack.node("victim"), running=2, reserved=1)
    survivor = stack.worker("survivor", concurrency=2, pool="threads")
    victim.kill_group()
    killed_at = time.monotonic()
    held = dict(
        tasks(stack)
        .filter(claimed_by__worker_id=stack.node("victim"), status__in=("claimed", "reserved"))
        .values_list("task_id", "status")
    )

    wait_for(
        lambda: (
            WorkerRegistry.objects.using(stack.alias)
            .filter(worker_id=stack.node("victim"), status="failed")
            .exists()
        ),
        BOUND + MARGIN,
        what="victim failed",
    )
    detected_after = time.monotonic() - killed_at
    assert_each_ran_once(stack, ids, timeout=120)
    reclaimed = set(
        events(stack).filter(kind=EventKind.TASK_RECLAIMED).values_list("task_id", flat=True)
    )
    assert held, "the victim held nothing: the scenario did not test reclamation"
    finished_on_victim = set(
        effects(stack).filter(worker=stack.node("victim")).values_list("task_id", flat=True)
    )
    running = {t for t, status in held.items() if status == "claimed"} - finished_on_victim
    waiting = {t for t, status in held.items() if status == "reserved"} - finished_on_victim
    # What it was running (acked early: no broker gives it back) was reclaimed by us.
    assert running <= reclaimed, history(stack, running - reclaimed)
    if not stack.broker_url.startswith("amqp"):
        # What it had prefetched too. (RabbitMQ requeues unacked messages itself when the
        # connection drops; then the survivor takes them before any sweep: also fine.)
        assert waiting <= reclaimed, history(stack, waiting - reclaimed)
    # and all of it ran on the survivor, once (checked above)
    assert set(
        effects(stack).filter(task_id__in=running | waiting).values_list("worker", flat=True)
    ) <= {stack.node("survivor")}
    assert survivor.alive()
    print(f"[{stack.name}] detected after {detected_after:.1f} s")


def test_restart_under_same_name_reclaims_at_once(stack: Stack) -> None:
    # A long STALE_AFTER: only the restart fast path can explain a quick recovery.
    stack.settings.update(WORKER_HEALTH_STALE_AFTER="60", WORKER_HEALTH_CHECK_INTERVAL="1")
    victim = stack.worker("phoenix", concurrency=1)
    ids = stack.publish("work", 3, kwargs={"seconds": 2})
    wait_held(stack, stack.node("phoenix"), running=1, reserved=1)
    victim.kill_group()
    restarted_at = time.monotonic()
    stack.worker("phoenix", concurrency=2)
    assert_each_ran_once(stack, ids, timeout=40)
    assert time.monotonic() - restarted_at < 40
    assert events(stack).filter(kind=EventKind.WORKER_RESTARTED).exists()
    assert events(stack).filter(kind=EventKind.TASK_RECLAIMED, details__reason="restarted").exists()
    assert not events(stack).filter(kind=EventKind.WORKER_FAILED).exists()


def test_poison_pill_is_quarantined_after_the_cap(stack: Stack) -> None:
    stack.settings.update(WORKER_HEALTH_MAX_RECLAIMS="2")
    stack.worker("p1", concurrency=2)
    stack.worker("p2", concurrency=2)
    poison = stack.publish("poison", 1)[0]
    good = stack.publish("work", 6, kwargs={"seconds": 0.2})
    wait_for(
        lambda: tasks(stack).filter(task_id=poison, status="quarantined").exists(),
        120,
        what="the poison pill to be quarantined",
    )
    row = tasks(stack).get(task_id=poison)
    assert row.reclaim_count == 3
    assert len(row.lost_on) == 3
    assert_each_ran_once(stack, good, timeout=60)
    quarantined = events(stack).filter(kind=EventKind.TASK_QUARANTINED, task_id=poison)
    assert quarantined.count() == 1
    # it does not run again
    attempts = effects(stack).filter(label="poison").count()
    time.sleep(4)
    assert effects(stack).filter(label="poison").count() == attempts == 3
    from django_celery_results.models import TaskResult

    result = wait_for(
        lambda: (
            TaskResult.objects.using(stack.alias).filter(task_id=poison, status="FAILURE").first()
        ),
        20,
        what="TaskResult FAILURE",
    )
    assert "quarantined" in result.result and "died while running it 3 times" in result.result


def test_poison_pill_with_acks_late_and_reject_on_worker_lost(stack: Stack) -> None:
    # With reject_on_worker_lost Celery requeues the message itself and sends no
    # task_failure: a poison pill would loop forever. The claim audit reclaims it and the
    # cap stops it; Celery's own requeued copies are skipped at claim time.
    stack.settings.update(WORKER_HEALTH_MAX_RECLAIMS="1", EXAMPLE_ACKS_LATE="1")
    stack.worker("late", concurrency=2)
    poison = stack.publish("poison", 1)[0]
    good = stack.publish("work", 4, kwargs={"seconds": 0.2})
    wait_for(
        lambda: tasks(stack).filter(task_id=poison, status="quarantined").exists(),
        90,
        what="the poison pill to be quarantined",
    )
    assert_each_ran_once(stack, good, timeout=60)
    attempts = effects(stack).filter(label="poison").count()
    time.sleep(5)
    assert effects(stack).filter(label="poison").count() == attempts <= 3


def test_a_task_that_only_waited_on_killed_workers_is_not_quarantined(db_stack: Stack) -> None:
    """K5: a task that two killed workers held in a row while it waited in their prefetch
    buffers is reclaimed twice but counted once (its first run is presumed started), so
    with MAX_RECLAIMS=1 it runs, once, instead of being quarantined as a poison pill."""
    stack = db_stack
    stack.settings.update(WORKER_HEALTH_MAX_RECLAIMS="1")
    b_queue = stack.new_queue("b")
    a = stack.worker("a", concurrency=1)
    long_a = stack.publish("work", 1, kwargs={"seconds": 12})[0]
    wait_held(stack, stack.node("a"), running=1, reserved=0)
    waiting = stack.publish("work", 1, kwargs={"seconds": 0.2})[0]
    wait_held(stack, stack.node("a"), running=1, reserved=1)
    b = stack.worker("b", concurrency=1, queues=[stack.queue, b_queue])
    long_b = stack.publish("work", 1, queue=b_queue, kwargs={"seconds": 12})[0]
    wait_held(stack, stack.node("b"), running=1, reserved=0)
    a.kill_group()

    def held_by_b() -> bool:
        qs = tasks(stack).filter(task_id__in=[long_a, waiting], status="claimed")
        return qs.filter(claimed_by__worker_id=stack.node("b")).count() == 2

    # B, busy with long_b, received both reclaimed tasks and holds them unstarted
    wait_for(held_by_b, BOUND + MARGIN, what="b to hold a's reclaimed tasks")
    rows = tasks(stack).filter(task_id__in=[long_a, waiting])
    tokens = rows.values_list("fencing_token", "started_token", "reclaim_count")
    assert set(tokens) == {(2, None, 1)}
    b.kill_group()
    stack.worker("c", concurrency=2, queues=[stack.queue, b_queue])
    assert_each_ran_once(stack, [long_a, waiting, long_b], timeout=90)

    assert not events(stack).filter(kind=EventKind.TASK_QUARANTINED).exists()
    final = {
        row.task_id: (row.reclaim_count, row.lost_on)
        for row in tasks(stack).filter(task_id__in=[long_a, waiting, long_b])
    }
    a_node, b_node = stack.node("a"), stack.node("b")
    assert final == {long_a: (1, [a_node]), waiting: (1, [a_node]), long_b: (1, [b_node])}
    ran_on = effects(stack).filter(task_id__in=[long_a, waiting, long_b])
    assert set(ran_on.values_list("worker", flat=True)) == {stack.node("c")}
    reclaims = events(stack).filter(kind=EventKind.TASK_RECLAIMED, task_id=waiting)
    assert reclaims.count() == 2


def test_a_task_that_kills_its_whole_worker_is_quarantined_after_the_cap(db_stack: Stack) -> None:
    """No WorkerLostError when the whole worker dies (the OOM killer, a lost host): the
    first death is presumed the task's, and the later run records its start, so the
    second death counts too and the task is quarantined, not run a third time."""
    stack = db_stack
    stack.settings.update(WORKER_HEALTH_MAX_RECLAIMS="1")
    poison = stack.publish("poison_worker", 1)[0]
    for name in ("v0", "v1"):
        victim = stack.worker(name, concurrency=1, wait=False)
        wait_for(lambda: not victim.alive(), 90, what=f"{name} to be killed by the task")  # noqa: B023
    survivor = stack.worker("v2", concurrency=1)
    wait_for(
        lambda: tasks(stack).filter(task_id=poison, status="quarantined").exists(),
        BOUND + MARGIN + 30,
        what="the poison pill to be quarantined",
    )
    row = tasks(stack).get(task_id=poison)
    assert (row.reclaim_count, row.lost_on) == (2, [stack.node("v0"), stack.node("v1")])
    assert row.fencing_token == row.started_token == 2
    time.sleep(4)
    assert survivor.alive()
    assert effects(stack).filter(label="poison").count() == 2


def test_zombie_completion_is_fenced(stack: Stack) -> None:
    zombie = stack.worker("zombie", concurrency=1)
    ids = stack.publish("work", 1, kwargs={"seconds": 8})
    wait_for(
        lambda: tasks(stack).filter(task_id=ids[0], status="claimed").exists(), 60, what="claim"
    )
    zombie.signal_group(signal.SIGSTOP)
    stack.worker("healthy", concurrency=1)
    try:
        wait_for(
            lambda: tasks(stack).filter(task_id=ids[0], status="succeeded").exists(),
            60,
            what="the reclaimed run to succeed on the healthy worker",
        )
    finally:
        zombie.signal_group(signal.SIGCONT)
    wait_for(
        lambda: events(stack).filter(kind=EventKind.STALE_COMPLETION, task_id=ids[0]).exists(),
        40,
        what="the zombie's late completion to be fenced",
    )
    wait_for(
        lambda: events(stack).filter(kind=EventKind.WORKER_RECOVERED).exists(), 20, what="recovery"
    )
    row = tasks(stack).get(task_id=ids[0])
    assert row.status == "succeeded" and row.fencing_token == 2
    assert row.claimed_by.worker_id == stack.node("healthy")


def test_three_detectors_publish_each_task_once(db_stack: Stack) -> None:
    """The race is decided in the database (one stack per database: the broker only
    receives what the winner publishes)."""
    stack = db_stack
    # No heartbeat-thread sweeps from live workers here: only the three detectors race.
    stack.settings.update(WORKER_HEALTH_STALE_AFTER="6", WORKER_HEALTH_CHECK_INTERVAL="1")
    victim = stack.worker("held", concurrency=2)
    ids = stack.publish("work", 8, kwargs={"seconds": 5})
    wait_recorded(stack, stack.node("held"), 8)  # all 8 received and recorded
    wait_held(stack, stack.node("held"), running=2, reserved=1)
    victim.kill_group()
    held = tasks(stack).filter(status__in=("claimed", "reserved")).count()
    # Nobody sweeps now (no live worker, no beat). The outage guard does not trust a pause in
    # sweeps longer than STALE_AFTER, so sweeps keep coming (as beat would send them) until
    # the victim is stale; then three detectors race to fail it and reclaim its tasks.
    workers = WorkerRegistry.objects.using(stack.alias).filter(worker_id=stack.node("held"))
    while not workers.stale(3.5).exists():  # sweeps no more than STALE_AFTER apart
        assert '"failed_workers": []' in stack.manage("worker_health", "detect")
    wait_for(lambda: workers.stale(6.2).exists(), 10, what="the victim to be stale")
    outputs: list[str] = []

    def detect() -> None:
        outputs.append(stack.manage("worker_health", "detect"))

    threads = [threading.Thread(target=detect) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_task = (
        events(stack)
        .filter(kind=EventKind.TASK_RECLAIMED)
        .values("task_id")
        .annotate(n=Count("id"))
    )
    assert per_task.count() == held
    assert {row["n"] for row in per_task} == {1}
    assert events(stack).filter(kind=EventKind.WORKER_FAILED).count() == 1
    stack.worker("after", concurrency=2, pool="threads")
    assert_each_ran_once(stack, ids, timeout=90)


def test_eta_and_serializers_survive_reclaim(stack: Stack) -> None:
    """ETA tasks held by a worker that dies run on the survivor, not before their ETA, with
    their own serializer (json and pickle, whose bodies the web process never decodes)."""
    victim = stack.worker("etaholder", concurrency=1)
    by_serializer = {
        serializer: stack.publish(
            "work", 3, kwargs={"seconds": 0.1}, countdown=8, serializer=serializer
        )
        for serializer in ("json", "pickle")
    }
    ids = [task_id for batch in by_serializer.values() for task_id in batch]
    wait_for(
        lambda: tasks(stack).filter(task_id__in=ids, status="reserved").count() == len(ids),
        30,
        what="ETA tasks reserved by the victim",
    )
    content_types = {
        serializer: set(
            tasks(stack).filter(task_id__in=batch).values_list("content_type", flat=True)
        )
        for serializer, batch in by_serializer.items()
    }
    assert content_types == {
        "json": {"application/json"},
        "pickle": {"application/x-python-serialize"},
    }
    etas = dict(tasks(stack).filter(task_id__in=ids).values_list("task_id", "eta"))
    assert None not in etas.values()
    victim.kill_group()
    stack.worker("etasurvivor", concurrency=1)
    assert_each_ran_once(stack, ids, timeout=60)
    ran = dict(effects(stack).filter(task_id__in=ids).values_list("task_id", "created_at"))
    assert [task_id for task_id in ids if ran[task_id] < etas[task_id]] == [], "ran before its ETA"


def test_untracked_tasks_cost_no_write(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    stack.settings["WORKER_HEALTH_TRACK_TASKS"] = "example_project.demo.tasks.burn"
    stack.worker("untracked", concurrency=1)
    ids = stack.publish("work", 3, kwargs={"seconds": 0})
    wait_for(lambda: effects(stack).filter(task_id__in=ids).count() == 3, 30, what="effects")
    assert not tasks(stack).filter(Q(task_id__in=ids)).exists()


def test_database_outage_causes_no_false_reclaims(pg_stack: Stack) -> None:
    """Workers running tasks through a database outage of 3 x STALE_AFTER: once it is back,
    nothing is reclaimed from them and every task ran once."""
    from tests.integration.harness import database_address, database_url
    from tests.integration.tcp_proxy import TcpProxy

    stack = pg_stack
    host, port = database_address(stack.alias)
    with TcpProxy(host, port) as proxy:
        url = database_url(stack.alias, port=proxy.port)
        stack.start_workers(
            {
                "busy1": {"pool": "prefork", "concurrency": 2, "DATABASE_URL": url},
                "busy2": {"pool": "threads", "concurrency": 2, "DATABASE_URL": url},
            }
        )
        # the tasks touch the database only when they end, long after the outage
        ids = stack.publish("work", 4, kwargs={"seconds": 20, "label": "outage"})
        wait_for(
            lambda: tasks(stack).filter(task_id__in=ids, status="claimed").count() >= 3,
            60,
            what="the workers running tasks",
        )
        proxy.cut()
        time.sleep(9)  # 3 x STALE_AFTER: no heartbeat, no sweep gets through
        proxy.restore()
        assert_each_ran_once(stack, ids, timeout=90)
    assert not events(stack).filter(kind=EventKind.TASK_RECLAIMED).exists()
    assert not events(stack).filter(kind=EventKind.WORKER_FAILED).exists()
