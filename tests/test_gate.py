"""worker_health.gate: received tasks are claimed (in the database) before the pool gets them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery.worker import state
from kombu.asynchronous import Hub

from tests.factories import make_task, make_worker
from worker_health import gate as gate_module
from worker_health.gate import CLAIMED_AT_KEY, TOKEN_KEY, Gate, pool_is_gated
from worker_health.heartbeat import WorkerIdentity
from worker_health.models import EventKind, TaskQueue, WorkerEvent

pytestmark = pytest.mark.django_db(transaction=True)


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

    def acknowledge(self) -> None:
        self.acked = True


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
    # claimed in the database before the pool got it, by the gate's thread
    assert {status for _, _, status in pool.received} == {"claimed"}
    assert {thread for _, thread, _ in pool.received} == {"worker-health-gate"}
    for req in requests:
        assert req.request_dict[TOKEN_KEY] == 1
        assert isinstance(req.request_dict[CLAIMED_AT_KEY], float)
    rows = TaskQueue.objects.filter(
        claimed_by=identity.pk, claimed_incarnation=identity.incarnation
    )
    assert rows.filter(status="claimed").count() == 5
    assert gate.held == {}


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
    gate._wake.set()
    gate._thread = threading.Thread(target=gate._run, daemon=True)
    gate._thread.start()
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
