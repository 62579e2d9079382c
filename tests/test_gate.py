"""worker_health.gate: received tasks are claimed (in the database) before the pool gets them."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery.worker import state
from django.db import connections
from kombu.asynchronous import Hub

from tests.factories import ALIASES, make_task, make_worker
from worker_health import gate as gate_module
from worker_health.gate import CLAIMED_AT_KEY, TOKEN_KEY, UNTRACKED, Gate, pool_is_gated
from worker_health.heartbeat import WorkerIdentity
from worker_health.loopwriter import LoopWriter
from worker_health.models import EventKind, TaskQueue, WorkerEvent
from worker_health.relay import Relay

pytestmark = pytest.mark.django_db(transaction=True)

#: the PostgreSQL alias alone (skipped, with the reason, without WORKER_HEALTH_TEST_DATABASE_URL)
POSTGRES_ONLY = [param for param in ALIASES if param.id == "postgres"]


class FakeRequest:
    """What the gate reads of a ``celery.worker.request.Request``."""

    def __init__(self, task_id: str, name: str = "demo.tasks.work") -> None:
        self.id = task_id
        self.name = name
        self.eta = None
        self.delivery_info = {"routing_key": "celery", "exchange": ""}
        self.request_dict: dict[str, Any] = {"id": task_id, "task": name}
        self.message = SimpleNamespace(
            delivery_info=self.delivery_info,
            headers={"id": task_id, "task": name},
            properties={"correlation_id": task_id, "delivery_mode": 2},
            body=b"[[], {}, {}]",
            content_type="application/json",
            content_encoding="utf-8",
        )
        self.acked = False
        self.requeued = False

    def acknowledge(self) -> None:
        self.acked = True

    def reject(self, requeue: bool = False) -> None:
        self.requeued = requeue


class Pool:
    """Stands in for ``WorkController.process_task``: records what reaches the pool, and
    what the database said about the task at that moment."""

    def __init__(self) -> None:
        self.received: list[tuple[FakeRequest, str, str | None]] = []
        self.event = threading.Event()

    def __call__(self, req: FakeRequest) -> None:
        row = TaskQueue.objects.filter(task_id=req.id).values("status").first()
        self.received.append((req, threading.current_thread().name, row and row["status"]))
        self.event.set()

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.received) >= count, self.received


@pytest.fixture
def identity() -> WorkerIdentity:
    worker = make_worker("default", "gate@host")
    return WorkerIdentity(
        worker_id=worker.worker_id, incarnation=worker.incarnation, metadata={}, pk=worker.pk
    )


@pytest.fixture
def pool() -> Pool:
    return Pool()


@pytest.fixture
def gate(identity: WorkerIdentity, pool: Pool) -> Iterator[Gate]:
    g = Gate(identity, pool, lambda req: not req.name.startswith("untracked."))
    yield g
    g.stop()


@pytest.fixture
def relay_gate(identity: WorkerIdentity, pool: Pool) -> Iterator[Gate]:
    """A gate whose pool processes relay their completions (thread mode)."""
    g = Gate(identity, pool, lambda req: True)
    g.relay = Relay()
    g.start()
    yield g
    g.stop()


def test_untracked_requests_go_straight_to_the_pool(gate: Gate, pool: Pool) -> None:
    req = FakeRequest("u1", name="untracked.job")
    gate(req)  # type: ignore[arg-type]
    assert [(r.id, status) for r, _, status in pool.received] == [("u1", None)]
    assert TOKEN_KEY not in req.request_dict
    assert not TaskQueue.objects.exists()


def test_without_an_event_loop_the_gate_thread_claims_then_passes_on(
    gate: Gate, pool: Pool, identity: WorkerIdentity
) -> None:
    requests = [FakeRequest(f"t{i}") for i in range(5)]
    for req in requests:
        assert gate(req) is None  # type: ignore[arg-type]
    pool.wait_for(5)
    assert {r.id for r, _, _ in pool.received} == {f"t{i}" for i in range(5)}
    # claimed in the database (by the gate's thread) before the pool got it (from the
    # dispatching thread)
    assert {status for _, _, status in pool.received} == {"claimed"}
    assert {thread for _, thread, _ in pool.received} == {"worker-health-dispatch"}
    for req in requests:
        assert req.request_dict[TOKEN_KEY] == 1
        assert isinstance(req.request_dict[CLAIMED_AT_KEY], float)
    rows = TaskQueue.objects.filter(
        claimed_by=identity.pk, claimed_incarnation=identity.incarnation
    )
    assert rows.filter(status="claimed").count() == 5
    assert gate.held == {}


def test_a_wake_up_during_the_drain_of_the_wake_pipe_is_not_lost(
    gate: Gate, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer's ``_wake`` can run while the gate's thread empties its wake pipe (and
    read the byte it wrote): the thread must still see every later wake-up."""
    real_read = os.read
    injected: list[str] = []

    def read(fd: int, n: int) -> bytes:
        if (
            fd == gate._wake_r
            and not injected
            and threading.current_thread().name == "worker-health-gate"
        ):
            injected.append("t2")
            gate(FakeRequest("t2"))  # type: ignore[arg-type]
        return real_read(fd, n)

    monkeypatch.setattr(gate_module.os, "read", read)
    gate(FakeRequest("t1"))  # type: ignore[arg-type]
    pool.wait_for(2)
    gate(FakeRequest("t3"))  # type: ignore[arg-type]
    pool.wait_for(3)
    assert sorted(r.id for r, _, _ in pool.received) == ["t1", "t2", "t3"]


def test_a_worker_marked_failed_gives_what_it_receives_back_to_the_broker(
    gate: Gate, pool: Pool, identity: WorkerIdentity
) -> None:
    """K2: a zombie that resumed before its heart noticed it was failed neither runs what
    it receives (the reclaimed copies run elsewhere) nor acknowledges it (it may be the
    only copy): it rejects it with requeue."""
    from worker_health.models import WorkerRegistry

    WorkerRegistry.objects.filter(pk=identity.pk).update(status="failed")
    requests = [FakeRequest(f"t{i}") for i in range(3)]
    for req in requests:
        gate(req)  # type: ignore[arg-type]
    assert wait_for_value(lambda: all(r.requeued for r in requests))
    assert not any(r.acked for r in requests)
    assert pool.received == []
    assert not TaskQueue.objects.exists()
    assert gate.held == {}
    # recovered (its heart beat again): it claims and runs as before
    WorkerRegistry.objects.filter(pk=identity.pk).update(status="active")
    gate(FakeRequest("t9"))  # type: ignore[arg-type]
    pool.wait_for(1)
    assert [r.id for r, _, status in pool.received] == ["t9"]


class BusyPool(Pool):
    """A prefork pool without an event loop: passing a request on waits (on Celery's put
    lock) until a pool process is free."""

    def __init__(self) -> None:
        super().__init__()
        self.free = threading.Event()

    def __call__(self, req: FakeRequest) -> None:
        super().__call__(req)
        self.free.wait(10)


def test_without_an_event_loop_claims_go_on_while_the_pool_is_busy(
    identity: WorkerIdentity,
) -> None:
    """What the consumer fetches while every pool process is busy is claimed at once: a
    worker killed meanwhile leaves claims the detector reclaims, not messages that only its
    memory held (kombu's polling transports do not deliver them again)."""
    pool = BusyPool()
    g = Gate(identity, pool, lambda req: True)
    try:
        g(FakeRequest("t0"))  # type: ignore[arg-type]
        pool.wait_for(1)  # passing t0 on waits: the pool is full
        for i in (1, 2, 3):
            g(FakeRequest(f"t{i}"))  # type: ignore[arg-type]
        assert wait_for_value(
            lambda: TaskQueue.objects.filter(status="claimed", claimed_by=identity.pk).count() == 4
        )
        assert [r.id for r, _, _ in pool.received] == ["t0"]
        assert set(g.held) == {"t1", "t2", "t3"}  # claimed, waiting for their turn
        pool.free.set()
        pool.wait_for(4)
        assert [r.id for r, _, _ in pool.received] == ["t0", "t1", "t2", "t3"]
        assert g.held == {}
    finally:
        pool.free.set()
        g.stop()


def test_without_an_event_loop_stop_keeps_what_waits_for_the_pool(
    identity: WorkerIdentity,
) -> None:
    pool = BusyPool()
    g = Gate(identity, pool, lambda req: True)
    try:
        for i in range(3):
            g(FakeRequest(f"t{i}"))  # type: ignore[arg-type]
        assert wait_for_value(lambda: set(g.held) == {"t1", "t2"})  # t0 is being passed on
        g.close_intake()
        pool.free.set()
        held = g.stop()
        assert sorted(held) == ["t1", "t2"]  # handed back at shutdown, never run here
        assert [r.id for r, _, _ in pool.received] == ["t0"]
    finally:
        pool.free.set()
        g.stop()


def test_with_an_event_loop_requests_go_to_the_pool_on_the_loop(gate: Gate, pool: Pool) -> None:
    hub = Hub()
    try:
        gate.register_with_event_loop(hub)
        req = FakeRequest("t1")
        gate(req)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while not pool.received and time.monotonic() < deadline:
            hub.run_once()  # the gate's thread wakes the loop through its pipe
        assert [(r.id, thread, status) for r, thread, status in pool.received] == [
            ("t1", threading.current_thread().name, "claimed")
        ]
        assert req.request_dict[TOKEN_KEY] == 1
    finally:
        hub.close()


def test_a_delivery_that_may_not_run_is_acked_and_dropped(
    gate: Gate, pool: Pool, identity: WorkerIdentity
) -> None:
    make_task("default", "done", status="succeeded")
    done, fresh = FakeRequest("done"), FakeRequest("fresh")
    state.task_reserved(done)  # type: ignore[arg-type]
    try:
        gate(done)  # type: ignore[arg-type]
        gate(fresh)  # type: ignore[arg-type]
        pool.wait_for(1)
        time.sleep(0.2)
        assert [r.id for r, _, _ in pool.received] == ["fresh"]
        assert done.acked and not fresh.acked
        assert "done" not in state.requests
        assert TaskQueue.objects.get(task_id="done").status == "succeeded"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if WorkerEvent.objects.filter(kind=EventKind.DUPLICATE_DELIVERY, task_id="done"):
                break
            time.sleep(0.05)
        assert WorkerEvent.objects.filter(
            kind=EventKind.DUPLICATE_DELIVERY, task_id="done", worker_name=identity.worker_id
        ).exists()
    finally:
        state.requests.pop("done", None)
        state.reserved_requests.discard(done)  # type: ignore[arg-type]


def test_the_same_task_twice_in_one_batch_runs_once(gate: Gate, pool: Pool) -> None:
    first, second = FakeRequest("t1"), FakeRequest("t1")
    gate._pending.extend([first, second])  # type: ignore[list-item]
    gate._wake()
    pool.wait_for(1)
    deadline = time.monotonic() + 5
    while not second.acked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r for r, _, _ in pool.received] == [first]
    assert second.acked  # the second delivery is a duplicate of a run of a live worker


def test_stop_returns_what_was_claimed_and_never_passed_on(
    identity: WorkerIdentity, pool: Pool
) -> None:
    hub = Hub()
    g = Gate(identity, pool, lambda req: True)
    try:
        g.register_with_event_loop(hub)
        g(FakeRequest("t1"))  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while "t1" not in g.held and time.monotonic() < deadline:
            time.sleep(0.01)
        held = g.stop()  # the loop never ran: nothing reached the pool
        assert held == ["t1"]
        assert pool.received == []
        assert TaskQueue.objects.get(task_id="t1").status == "claimed"
    finally:
        hub.close()


def test_without_a_registration_the_tasks_run_untracked(pool: Pool) -> None:
    ghost = WorkerIdentity(worker_id="ghost@host", incarnation=uuid.uuid4(), metadata={})
    g = Gate(ghost, pool, lambda req: True)
    try:
        req = FakeRequest("t1")
        g(req)  # type: ignore[arg-type]
        pool.wait_for(1)
        assert req.request_dict[TOKEN_KEY] == gate_module.UNTRACKED
        assert not TaskQueue.objects.exists()
    finally:
        g.stop()


def test_only_pools_that_run_tasks_elsewhere_are_gated() -> None:
    from celery.concurrency import get_implementation

    assert pool_is_gated(get_implementation("prefork").__new__(get_implementation("prefork")))
    assert pool_is_gated(get_implementation("threads").__new__(get_implementation("threads")))
    assert not pool_is_gated(get_implementation("solo").__new__(get_implementation("solo")))


def test_dropping_a_duplicate_keeps_the_run_it_duplicates_in_the_worker_state(
    gate: Gate, pool: Pool
) -> None:
    # The original delivery runs here; a second copy (a broker's redelivery, our own
    # re-publish) arrives and is dropped: Celery's state must still know the first one,
    # or the heartbeat's audit would take the running task for lost.
    first, copy = FakeRequest("t1"), FakeRequest("t1")
    state.task_reserved(first)  # type: ignore[arg-type]
    try:
        gate(first)  # type: ignore[arg-type]
        pool.wait_for(1)
        state.task_reserved(copy)  # type: ignore[arg-type]  (replaces state.requests["t1"])
        gate(copy)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while not copy.acked and time.monotonic() < deadline:
            time.sleep(0.01)
        assert copy.acked
        assert state.requests.get("t1") is first
        assert first in state.reserved_requests and copy not in state.reserved_requests
    finally:
        state.requests.pop("t1", None)
        state.reserved_requests.discard(first)  # type: ignore[arg-type]
        state.reserved_requests.discard(copy)  # type: ignore[arg-type]


def test_a_message_the_gate_cannot_read_still_runs_untracked(gate: Gate, pool: Pool) -> None:
    broken, fine = FakeRequest("broken"), FakeRequest("fine")
    broken.message = None  # type: ignore[assignment]
    gate(broken)  # type: ignore[arg-type]
    pool.wait_for(1)
    gate(fine)  # type: ignore[arg-type]  (the gate's thread is still there)
    pool.wait_for(2)
    assert broken.request_dict[TOKEN_KEY] == gate_module.UNTRACKED
    assert fine.request_dict[TOKEN_KEY] == 1


# --------------------------------------------------------------------------------------------
# completions relayed by the pool processes


def relayed_from_a_pool_process(relay: Relay, *runs: tuple[str, int, str, str]) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = all(relay.send(*run) for run in runs)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_relayed_completions_are_written_with_the_next_claims(relay_gate: Gate, pool: Pool) -> None:
    g = relay_gate
    assert g.relay is not None
    g(FakeRequest("t1"))  # type: ignore[arg-type]
    pool.wait_for(1)
    token = pool.received[0][0].request_dict[TOKEN_KEY]
    relayed_from_a_pool_process(g.relay, ("t1", token, "succeeded", "SUCCESS"))
    g(FakeRequest("t2"))  # type: ignore[arg-type]
    pool.wait_for(2)
    wait_for_value(lambda: TaskQueue.objects.get(task_id="t1").status == "succeeded", timeout=10)
    statuses = dict(TaskQueue.objects.values_list("task_id", "status"))
    assert statuses == {"t1": "succeeded", "t2": "claimed"}


def test_a_relayed_completion_of_a_reclaimed_run_is_stale_and_changes_nothing(
    relay_gate: Gate,
) -> None:
    make_task("default", "cut", status="claimed", fencing_token=5)
    assert relay_gate.relay is not None
    relayed_from_a_pool_process(relay_gate.relay, ("cut", 4, "succeeded", "SUCCESS"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if WorkerEvent.objects.filter(kind=EventKind.STALE_COMPLETION, task_id="cut"):
            break
        time.sleep(0.02)
    assert WorkerEvent.objects.filter(kind=EventKind.STALE_COMPLETION, task_id="cut").exists()
    assert TaskQueue.objects.get(task_id="cut").status == "claimed"


def test_relayed_completions_wait_out_a_database_error_and_are_written_after(
    relay_gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_task("default", "t1", status="claimed", fencing_token=1)
    failures = fail_first(monkeypatch, "finish_many", 3)
    g = relay_gate
    assert g.relay is not None
    relayed_from_a_pool_process(g.relay, ("t1", 1, "succeeded", "SUCCESS"))
    assert "t1" in wait_for_value(lambda: g.in_flight())  # held while unwritten
    wait_for_value(lambda: TaskQueue.objects.get(task_id="t1").status == "succeeded", timeout=15)
    assert TaskQueue.objects.get(task_id="t1").status == "succeeded"
    assert failures["left"] == 0
    assert "t1" not in g.in_flight()


def test_stop_writes_what_the_pool_relayed_while_it_drained(relay_gate: Gate) -> None:
    make_task("default", "t1", status="claimed", fencing_token=2)
    g = relay_gate
    assert g.relay is not None
    g.close_intake()  # the consumer stopped; the pool still finishes its tasks
    relayed_from_a_pool_process(g.relay, ("t1", 2, "failed", "FAILURE"))
    g.stop()
    assert TaskQueue.objects.get(task_id="t1").status == "failed"


def test_stop_closes_the_gate_pipes_once_its_thread_is_gone(relay_gate: Gate) -> None:
    g = relay_gate
    hub = Hub()
    g.register_with_event_loop(hub)  # the release pipe too
    fds = [g._wake_r, g._wake_w, *(g._pipe or ())]
    g(FakeRequest("t1"))  # type: ignore[arg-type]
    g.stop()
    hub.close()
    assert g._thread is not None and not g._thread.is_alive()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    g._wake()  # after stop: nothing to wake, and no write to a closed (or reused) fd


def fail_first(monkeypatch: pytest.MonkeyPatch, method: str, times: int) -> dict[str, int]:
    """``TaskQuerySet.<method>`` raises a database error ``times`` times, then works;
    returns the count of failures left."""
    from django.db import OperationalError

    from worker_health.querysets import TaskQuerySet

    real = getattr(TaskQuerySet, method)
    failures = {"left": times}

    def flaky(self: TaskQuerySet, *args: Any, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("the database is away")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TaskQuerySet, method, flaky)
    return failures


def wait_for_value(fn: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.005)
    return fn()


# --------------------------------------------------------------------------------------------
# loop mode: the writes are made from the event loop (PostgreSQL)


class LoopThread:
    """A kombu hub running in a thread of its own, as the worker's event loop."""

    def __init__(self) -> None:
        self.hub = Hub()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-loop", daemon=True)

    def _run(self) -> None:
        loop = self.hub.create_loop()
        while not self._stop.is_set():
            next(loop)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.hub.call_soon(lambda: None)  # wake it
        self._thread.join(5)


@pytest.fixture
def pg_identity() -> WorkerIdentity:
    worker = make_worker("postgres", "loop@host")
    return WorkerIdentity(
        worker_id=worker.worker_id, incarnation=worker.incarnation, metadata={}, pk=worker.pk
    )


@pytest.fixture
def loop_gate(pg_identity: WorkerIdentity, pool: Pool) -> Iterator[tuple[Gate, LoopThread]]:
    loop = LoopThread()
    g = Gate(pg_identity, pool, lambda req: True)
    g.relay = Relay()
    g.register_with_event_loop(loop.hub)  # thread mode (SQLite): only the release pipe
    g.writer = LoopWriter(g, loop.hub, alias="postgres")
    loop.hub.add_reader(g.relay.read_fd, g._on_relayed)
    g.writer.start()
    loop.start()
    yield g, loop
    loop.stop()
    g.stop()


def pg_rows() -> dict[str, tuple[str, int]]:
    return {
        t: (status, token)
        for t, status, token in TaskQueue.objects.using("postgres").values_list(
            "task_id", "status", "fencing_token"
        )
    }


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_loop_mode_claims_and_finishes_from_the_loop_without_a_thread(
    alias: str, loop_gate: tuple[Gate, LoopThread], pool: Pool
) -> None:
    g, loop = loop_gate
    for i in range(5):
        loop.hub.call_soon(g, FakeRequest(f"t{i}"))
    pool.wait_for(5)
    assert g._thread is None  # no gate thread: the loop did it all
    assert {name for _, name, _ in pool.received} == {"event-loop"}
    tokens = {r.id: r.request_dict[TOKEN_KEY] for r, _, _ in pool.received}
    assert tokens == {f"t{i}": 1 for i in range(5)}
    assert pg_rows() == {f"t{i}": ("claimed", 1) for i in range(5)}
    relayed_from_a_pool_process(g.relay, *[(f"t{i}", 1, "succeeded", "SUCCESS") for i in range(4)])
    loop.hub.call_soon(g, FakeRequest("t9"))  # written with the completions
    pool.wait_for(6)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pg_rows().get("t3", ("",))[0] != "succeeded":
        time.sleep(0.02)
    rows = pg_rows()
    assert {t: rows[t][0] for t in rows} == {
        **{f"t{i}": "succeeded" for i in range(4)},
        "t4": "claimed",
        "t9": "claimed",
    }
    # a second delivery of a finished task never reaches the pool
    dup = FakeRequest("t0")
    loop.hub.call_soon(g, dup)
    deadline = time.monotonic() + 10
    while not dup.acked and time.monotonic() < deadline:
        time.sleep(0.02)
    assert dup.acked and dup not in [r for r, _, _ in pool.received]


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_loop_mode_runs_untracked_while_the_connection_is_lost_then_claims_again(
    alias: str, loop_gate: tuple[Gate, LoopThread], pool: Pool
) -> None:
    g, loop = loop_gate
    loop.hub.call_soon(g, FakeRequest("before"))
    pool.wait_for(1)
    assert g.writer is not None and g.writer.raw is not None
    backend = g.writer.raw.info.backend_pid
    g.writer.backoff = 2.0  # the first reconnection waits: "during" meets a writer that is down
    with connections["postgres"].cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [backend])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [backend])
            if not cursor.fetchone()[0]:
                break
            time.sleep(0.02)
    loop.hub.call_soon(g, FakeRequest("during"))
    pool.wait_for(2)
    during = next(r for r, _, _ in pool.received if r.id == "during")
    # the connection was found dead: the task ran (untracked) rather than waited
    assert during.request_dict[TOKEN_KEY] == UNTRACKED
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if g.writer.raw is not None and g.writer.raw.info.backend_pid != backend:
            break
        time.sleep(0.02)
    loop.hub.call_soon(g, FakeRequest("after"))
    pool.wait_for(3)
    after = next(r for r, _, _ in pool.received if r.id == "after")
    assert after.request_dict[TOKEN_KEY] == 1
    assert pg_rows()["after"] == ("claimed", 1)


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_loop_mode_hands_over_to_the_thread_at_shutdown(
    alias: str, loop_gate: tuple[Gate, LoopThread], pool: Pool
) -> None:
    """The loop stops before the pool drains: the completions relayed after it are
    written by the gate's thread."""
    g, loop = loop_gate
    loop.hub.call_soon(g, FakeRequest("t1"))
    pool.wait_for(1)
    loop.stop()
    # the gate's thread writes to the default database (SQLite here)
    make_task("default", "t1", status="claimed", fencing_token=1)
    g.close_intake()
    assert g.writer is None
    relayed_from_a_pool_process(g.relay, ("t1", 1, "succeeded", "SUCCESS"))
    g.stop()
    assert TaskQueue.objects.get(task_id="t1").status == "succeeded"
    assert pg_rows()["t1"] == ("claimed", 1)


@pytest.mark.parametrize("use_eventloop", [True, False])
def test_completions_are_relayed_only_with_an_event_loop(
    identity: WorkerIdentity, use_eventloop: bool
) -> None:
    """Without an event loop the gate's thread passes requests to the pool itself and
    waits there while every pool process is busy: completions must not wait behind it."""
    from celery.concurrency.prefork import TaskPool

    from worker_health import relay
    from worker_health.gate import GateStep
    from worker_health.heartbeat import _identities

    w = SimpleNamespace(
        hostname=identity.worker_id,
        pool=TaskPool(limit=1),
        process_task=lambda req: None,
        use_eventloop=use_eventloop,
    )
    _identities[identity.worker_id] = identity
    step = GateStep(w)
    try:
        step.create(w)
        g = gate_module.gate_for(identity)
        assert g is not None
        assert (g.relay is not None) is use_eventloop
        assert (relay.current is not None) is use_eventloop
    finally:
        gate_module.uninstall(identity)
        _identities.pop(identity.worker_id, None)
    assert relay.current is None


def test_the_loop_writer_lingers_only_while_every_pool_process_has_work_waiting(
    identity: WorkerIdentity, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import weakref

    from worker_health.loopwriter import LINGER_BUSY

    monkeypatch.setattr(state, "reserved_requests", weakref.WeakSet())
    monkeypatch.setattr(state, "active_requests", weakref.WeakSet())
    g = Gate(identity, pool, lambda req: True)
    g.concurrency = 2
    writer = LoopWriter(g, Hub())
    reqs = [FakeRequest(f"t{i}") for i in range(3)]
    try:
        state.reserved_requests.add(reqs[0])  # type: ignore[arg-type]
        assert writer._linger() == 0.0  # one waiting for two processes: send at once
        state.reserved_requests.add(reqs[1])  # type: ignore[arg-type]
        assert writer._linger() == LINGER_BUSY
        state.active_requests.add(reqs[1])  # type: ignore[arg-type]  # it started
        assert writer._linger() == 0.0
        state.reserved_requests.add(reqs[2])  # type: ignore[arg-type]
        g._pending.append(reqs[2])  # type: ignore[arg-type]  # still in the gate: not waiting
        assert writer._linger() == 0.0
    finally:
        writer.close()


def test_a_failure_after_the_claims_committed_never_claims_them_twice(
    identity: WorkerIdentity, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runs that started untracked are finished after the claims commit: if that
    write fails, the batch is not claimed again (it would find its own claims and drop
    the tasks as duplicates); the untracked completions are tried again."""
    make_task("default", "was-untracked", status="queued", fencing_token=0)
    failures = fail_first(monkeypatch, "finish_untracked", 1)
    g = Gate(identity, pool, lambda req: True)
    g.relay = Relay()
    try:
        relayed_from_a_pool_process(g.relay, ("was-untracked", UNTRACKED, "succeeded", "SUCCESS"))
        g._done.extend(g.relay.receive())
        g(FakeRequest("t1"))  # type: ignore[arg-type]
        pool.wait_for(1)
        req = pool.received[0][0]
        assert req.request_dict[TOKEN_KEY] == 1  # claimed once, passed on
        assert not req.acked  # not dropped as a duplicate of itself
        wait_for_value(
            lambda: TaskQueue.objects.get(task_id="was-untracked").status == "succeeded", timeout=10
        )
        assert TaskQueue.objects.get(task_id="was-untracked").status == "succeeded"
        assert failures["left"] == 0
    finally:
        g.stop()


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_loop_mode_finishes_untracked_runs_again_after_a_database_error(
    alias: str, loop_gate: tuple[Gate, LoopThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that started untracked (the database was down) ends: its row is finished on
    the database thread, and tried again after a back-off when that fails."""
    g, _ = loop_gate
    assert g.relay is not None
    make_task("default", "u1", status="queued")  # the database thread's (SQLite here)
    failures = fail_first(monkeypatch, "finish_untracked", 2)
    relayed_from_a_pool_process(g.relay, ("u1", UNTRACKED, "succeeded", "SUCCESS"))
    wait_for_value(lambda: TaskQueue.objects.get(task_id="u1").status == "succeeded", timeout=15)
    assert TaskQueue.objects.get(task_id="u1").status == "succeeded"
    assert failures["left"] == 0


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_loop_mode_gives_back_what_a_failed_worker_receives(
    alias: str, loop_gate: tuple[Gate, LoopThread], pool: Pool, pg_identity: WorkerIdentity
) -> None:
    from worker_health.models import WorkerRegistry

    g, loop = loop_gate
    WorkerRegistry.objects.using("postgres").filter(pk=pg_identity.pk).update(status="failed")
    requests = [FakeRequest(f"t{i}") for i in range(3)]
    for req in requests:
        loop.hub.call_soon(g, req)
    assert wait_for_value(lambda: all(r.requeued for r in requests))
    assert not any(r.acked for r in requests)
    assert pool.received == [] and pg_rows() == {}
    # completions still go in with the refused claims
    WorkerRegistry.objects.using("postgres").filter(pk=pg_identity.pk).update(status="active")
    loop.hub.call_soon(g, FakeRequest("t9"))
    pool.wait_for(1)
    WorkerRegistry.objects.using("postgres").filter(pk=pg_identity.pk).update(status="failed")
    assert g.relay is not None
    relayed_from_a_pool_process(g.relay, ("t9", 1, "succeeded", "SUCCESS"))
    late = FakeRequest("t10")
    loop.hub.call_soon(g, late)
    assert wait_for_value(lambda: late.requeued)
    assert wait_for_value(lambda: pg_rows().get("t9") == ("succeeded", 1))


# --------------------------------------------------------------------------------------------
# the prefetch window (worker_health.window)


class WindowPool(Pool):
    """Records the consumer's prefetch count as each request reaches the pool."""

    def __init__(self, qos: Any) -> None:
        super().__init__()
        self.qos = qos
        self.values: list[int] = []

    def __call__(self, req: FakeRequest) -> None:
        self.values.append(self.qos.value)
        super().__call__(req)


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_loop_mode_messages_in_the_gate_do_not_count_against_the_prefetch_window(
    alias: str, pg_identity: WorkerIdentity
) -> None:
    from kombu.common import QoS

    from worker_health.window import HeldWindow

    qos = QoS(lambda prefetch_count: None, 8)
    worker = SimpleNamespace(consumer=SimpleNamespace(qos=qos, initial_prefetch_count=8))
    pool = WindowPool(qos)
    loop = LoopThread()
    g = Gate(pg_identity, pool, lambda req: True)
    g.window = HeldWindow(worker)
    g.register_with_event_loop(loop.hub)
    g.writer = LoopWriter(g, loop.hub, alias="postgres")
    g.writer.start()
    loop.start()
    try:
        loop.hub.call_soon(lambda: [g(FakeRequest(f"t{i}")) for i in range(3)])  # type: ignore[arg-type]
        pool.wait_for(3)
        # in one batch: each left the gate (its hold given back) just before the pool got it
        assert pool.values == [10, 9, 8]
        assert qos.value == 8 and g.window.widened_by == 0
        assert {r.request_dict[TOKEN_KEY] for r, _, _ in pool.received} == {1}
        assert pg_rows() == {f"t{i}": ("claimed", 1) for i in range(3)}
    finally:
        loop.stop()
        g.stop()


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_loop_mode_on_redis_credit_is_taken_back_on_a_turn_without_an_outstanding_brpop(
    alias: str, pg_identity: WorkerIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K6: on Redis, a message that leaves the gate while a BRPOP is outstanding leaves
    its credit in the window (taking it back could strand the message the BRPOP pops);
    the loop takes it back, and applies it, on its first turn with no BRPOP outstanding."""
    from kombu.common import QoS

    from worker_health import loopwriter
    from worker_health.window import HeldWindow

    applied: list[int] = []
    qos = QoS(lambda prefetch_count: applied.append(prefetch_count), 8)
    channel = SimpleNamespace(_in_poll=object())  # a BRPOP is outstanding
    worker = SimpleNamespace(
        consumer=SimpleNamespace(
            qos=qos, initial_prefetch_count=8, task_consumer=SimpleNamespace(channel=channel)
        )
    )
    pool = WindowPool(qos)
    loop = LoopThread()
    g = Gate(pg_identity, pool, lambda req: True)
    g.window = HeldWindow(worker)
    g.writer = LoopWriter(g, loop.hub, alias="postgres")
    monkeypatch.setattr(loopwriter, "usable", lambda alias="default": True)
    g.register_with_event_loop(loop.hub)  # as a consumer (re)starting its loop does
    g.writer.start()
    loop.start()
    try:
        loop.hub.call_soon(lambda: [g(FakeRequest(f"t{i}")) for i in range(3)])  # type: ignore[arg-type]
        pool.wait_for(3)
        assert pool.values == [11, 11, 11]
        time.sleep(0.2)  # turns of the loop, the BRPOP still outstanding
        assert qos.value == 11 and g.window.owed == 3
        channel._in_poll = None  # its reply was read
        deadline = time.monotonic() + 5
        while qos.value != 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert qos.value == 8 and g.window.owed == 0 and g.window.widened_by == 0
        assert applied == [8]  # applied at once, not on Celery's next turn
    finally:
        loop.stop()
        g.stop()


def test_without_an_event_loop_the_gate_does_not_widen_the_window(identity: WorkerIdentity) -> None:
    """The gate's thread waits on the pool's put locks: its holds would last as long as the
    pool is busy, so the window is not widened there."""
    from kombu.common import QoS

    from worker_health.window import HeldWindow

    qos = QoS(lambda prefetch_count: None, 8)
    pool = WindowPool(qos)
    g = Gate(identity, pool, lambda req: True)
    g.window = HeldWindow(
        SimpleNamespace(consumer=SimpleNamespace(qos=qos, initial_prefetch_count=8))
    )
    try:
        for i in range(3):
            g(FakeRequest(f"t{i}"))  # type: ignore[arg-type]
        pool.wait_for(3)
        assert pool.values == [8, 8, 8]
    finally:
        g.stop()


def test_install_gives_the_gate_the_workers_window(identity: WorkerIdentity) -> None:
    w = SimpleNamespace(concurrency=2, process_task=lambda req: None)
    g = gate_module.install(identity, w, lambda req: True)
    try:
        assert w.process_task is g
        assert g.window is not None and g.window.worker is w
    finally:
        gate_module.uninstall(identity)
