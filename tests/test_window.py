"""worker_health.window: what the gate holds does not count against the prefetch window."""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from kombu import Connection, Queue
from kombu.common import QoS
from kombu.message import Message

from tests.conftest import REDIS_URL
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


class FakeChannel:
    """A Redis channel's BRPOP state, as :func:`brpop_outstanding` reads it."""

    def __init__(self) -> None:
        self._in_poll: object = None


def redis_consumer(prefetch: int) -> Any:
    made = consumer(prefetch)
    made.task_consumer = SimpleNamespace(channel=FakeChannel())
    return made


def test_on_redis_credit_is_owed_while_a_brpop_is_outstanding() -> None:
    worker = SimpleNamespace(consumer=redis_consumer(2))
    qos, channel = worker.consumer.qos, worker.consumer.task_consumer.channel
    window = HeldWindow(worker)
    first, second = object(), object()
    assert window.hold(first)
    qos.update()  # Celery's loop applies the wider window
    channel._in_poll = object()  # ... and kombu sends a BRPOP against it
    window.release(first)
    # taking the credit back now could strand the message that BRPOP pops (K6)
    assert qos.value == 3 and window.owed == 1 and window.widened_by == 1
    window.settle()  # a turn of the loop with the BRPOP still outstanding
    assert qos.value == 3 and worker.consumer.applied == [3]
    # the next held message takes the owed credit over: the window does not move
    assert window.hold(second)
    assert qos.value == 3 and window.owed == 0 and window.widened_by == 1
    window.release(second)
    assert window.owed == 1
    channel._in_poll = None  # the reply was read
    window.settle()
    # taken back, and applied at once: kombu's next poll sees the narrower window
    assert qos.value == 2 and window.owed == 0 and window.widened_by == 0
    assert worker.consumer.applied == [3, 2]


def test_on_redis_credit_is_taken_back_at_once_without_an_outstanding_brpop() -> None:
    worker = SimpleNamespace(consumer=redis_consumer(2))
    window = HeldWindow(worker)
    req = object()
    assert window.hold(req)
    worker.consumer.qos.update()
    window.release(req)
    assert worker.consumer.qos.value == 2 and window.owed == 0
    assert worker.consumer.applied == [3, 2]


def test_owed_credit_counts_against_the_bound() -> None:
    worker = SimpleNamespace(consumer=redis_consumer(2))
    window = HeldWindow(worker)
    worker.consumer.task_consumer.channel._in_poll = object()
    a, b, c = object(), object(), object()
    assert window.hold(a) and window.hold(b)
    window.release(a)
    assert window.hold(c)  # takes a's owed credit
    assert not window.hold(object())  # two holds: the bound
    assert worker.consumer.qos.value == 4


def test_owed_credit_is_dropped_on_a_reconnection() -> None:
    worker = SimpleNamespace(consumer=redis_consumer(2))
    window = HeldWindow(worker)
    worker.consumer.task_consumer.channel._in_poll = object()
    req = object()
    assert window.hold(req)
    window.release(req)
    assert window.owed == 1
    worker.consumer = redis_consumer(2)  # a new QoS: it never counted the credit
    assert window.owed == 0
    window.settle()
    assert worker.consumer.qos.value == 2 and worker.consumer.applied == []


@pytest.mark.skipif(not REDIS_URL, reason="service test: WORKER_HEALTH_TEST_REDIS_URL not set")
def test_a_message_popped_while_the_gate_releases_is_delivered_not_stranded() -> None:
    """K6 against kombu's real Redis transport: a BRPOP sent while the window is wide, a
    held message leaves the gate, then a message arrives. Narrowing the window then leaves
    that message unread in the socket, out of Redis's list and its ``unacked`` hash: a
    worker killed now would lose it."""
    name = f"wh-window-{uuid.uuid4().hex[:10]}"
    queue = Queue(name, routing_key=name)
    received: list[Message] = []
    with Connection(REDIS_URL) as conn, Connection(REDIS_URL) as publisher:
        producer = publisher.Producer(serializer="json")
        kombu_consumer = conn.Consumer(queue, callbacks=[lambda _body, msg: received.append(msg)])
        kombu_consumer.consume()
        channel = kombu_consumer.channel
        try:
            qos = QoS(kombu_consumer.qos, 1)
            qos.update()
            worker = SimpleNamespace(
                consumer=SimpleNamespace(
                    qos=qos, initial_prefetch_count=1, task_consumer=kombu_consumer
                )
            )
            window = HeldWindow(worker)

            def loop_turn() -> None:  # what Celery's event loop does between turns
                if qos.prev != qos.value:
                    qos.update()
                window.settle()

            producer.publish({"n": 1}, routing_key=name, declare=[queue])
            conn.drain_events(timeout=5)
            assert len(received) == 1  # unacknowledged: the window (1) is full
            held = received[0]
            assert window.hold(held)  # the gate holds it: the window widens to 2
            loop_turn()
            conn.transport.cycle.on_poll_start()  # kombu sends a BRPOP against it
            assert channel._in_poll
            window.release(held)  # its claim is written: it goes on to the pool
            loop_turn()
            producer.publish({"n": 2}, routing_key=name)
            # Redis popped it into the BRPOP's reply; it must be read, not left unread
            deadline = time.monotonic() + 10
            while len(received) < 2 and time.monotonic() < deadline:
                with contextlib.suppress(socket.timeout):
                    conn.drain_events(timeout=1)
            assert [m.payload for m in received] == [{"n": 1}, {"n": 2}]
            # and recorded as unacknowledged: a worker killed now loses nothing
            assert channel.client.hexists(channel.unacked_key, received[1].delivery_tag)
            loop_turn()  # the reply was read: the owed credit is taken back
            assert qos.value == 1 and channel.qos.prefetch_count == 1 and window.owed == 0
            for message in received:
                message.ack()
        finally:
            with contextlib.suppress(Exception):
                channel.queue_delete(name)
    with Connection(REDIS_URL) as conn:  # closing restored what was unacknowledged
        conn.default_channel.client.delete(name)
