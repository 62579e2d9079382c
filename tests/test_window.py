"""worker_health.window: what the gate holds does not count against the prefetch window."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kombu.common import QoS

from worker_health.window import HeldWindow


def consumer(prefetch: int, max_prefetch: int | None = None) -> Any:
    applied: list[int] = []
    qos = QoS(
        lambda prefetch_count: applied.append(prefetch_count), prefetch, max_prefetch=max_prefetch
    )
    return SimpleNamespace(qos=qos, initial_prefetch_count=prefetch, applied=applied)


def test_a_held_message_widens_the_window_until_it_leaves_the_gate() -> None:
    worker = SimpleNamespace(consumer=consumer(8))
    window = HeldWindow(worker)
    first, second = object(), object()
    assert window.hold(first) and window.hold(second)
    assert worker.consumer.qos.value == 10 and window.widened_by == 2
    assert not window.hold(first)  # counted once
    window.release(first)
    window.release(first)  # released once
    assert worker.consumer.qos.value == 9
    window.release(second)
    assert worker.consumer.qos.value == 8 and window.widened_by == 0
    # the consumer applies it on its next turn, as with Celery's ETA tasks
    worker.consumer.qos.update()
    assert worker.consumer.applied == [8]


def test_the_window_is_at_most_doubled() -> None:
    worker = SimpleNamespace(consumer=consumer(4))
    window = HeldWindow(worker)
    reqs = [object() for _ in range(10)]
    held = [window.hold(req) for req in reqs]
    assert held == [True] * 4 + [False] * 6
    assert worker.consumer.qos.value == 8
    for req in reqs[4:]:
        window.release(req)  # never counted: nothing given back
    assert worker.consumer.qos.value == 8
    window.release(reqs[0])
    assert window.hold(reqs[5])  # room again
    assert worker.consumer.qos.value == 8


def test_an_unlimited_window_stays_unlimited() -> None:
    worker = SimpleNamespace(consumer=consumer(0))
    window = HeldWindow(worker)
    req = object()
    assert not window.hold(req)
    window.release(req)
    assert worker.consumer.qos.value == 0


def test_a_hold_clamped_by_the_eta_task_limit_is_not_counted() -> None:
    worker = SimpleNamespace(consumer=consumer(4, max_prefetch=5))
    window = HeldWindow(worker)
    a, b = object(), object()
    assert window.hold(a)
    assert not window.hold(b)  # worker_eta_task_limit: the value stays at 5
    window.release(b)
    assert worker.consumer.qos.value == 5
    window.release(a)
    assert worker.consumer.qos.value == 4


def test_after_a_reconnection_old_holds_leave_the_new_window_alone() -> None:
    worker = SimpleNamespace(consumer=consumer(4))
    window = HeldWindow(worker)
    old = [object() for _ in range(4)]
    for req in old:
        assert window.hold(req)
    worker.consumer = consumer(4)  # the consumer reconnected: a new QoS, never widened
    assert window.widened_by == 0
    fresh = object()
    assert window.hold(fresh)  # counted anew, up to the bound
    for req in old:
        window.release(req)
    assert worker.consumer.qos.value == 5
    window.release(fresh)
    assert worker.consumer.qos.value == 4


def test_without_a_consumer_nothing_is_held() -> None:
    window = HeldWindow(SimpleNamespace())
    req = object()
    assert not window.hold(req)
    window.release(req)
    assert window.widened_by == 0
