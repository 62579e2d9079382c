"""The consumer's prefetch window, widened by what the claim gate holds (up to a bound).

Celery stops fetching once ``prefetch_count`` messages are unacknowledged. A message the
gate holds while its claim is written (a round trip, and while the pool is busy a batch
that gathers for a few milliseconds: :mod:`.loopwriter`) is unacknowledged too, so without
this the window left for the pool shrinks by what is in the gate, the consumer pauses, and
on Redis, whose consumer fetches one message per round trip, that pause is throughput lost
(measured: docs/benchmarks.md). Celery does the same for a task held for its ETA
(``consumer.qos.increment_eventually()`` in ``celery.worker.strategy``).

Bounded: at most the consumer's initial prefetch count is added (the window is at most
doubled), so a database that stalls cannot make a worker take the whole queue. Only with
the loop writer (the gate's thread, without an event loop, can be held up by the pool's put
locks: its holds would last as long as the pool is busy). Nothing changes with an
unlimited window (``worker_prefetch_multiplier = 0``), and a hold clamped by Celery's
``worker_eta_task_limit`` is not counted.

Narrowing the window again must not strand a message (K6 in docs/reliability.md). On
Redis a ``BRPOP`` pops its message the moment Redis answers, and kombu leaves a reply
unread in the socket while the channel has no credit; a worker killed then loses that
message (it is in neither the list nor ``unacked``). So on Redis the credit of a message
that leaves the gate is *owed*, not taken back, while a ``BRPOP`` is outstanding: the next
held message takes it over (no change to the window at all), and what is still owed is
taken back at the first turn of the loop with no ``BRPOP`` outstanding, applied at once so
that kombu sends none against the wider window. On other transports (AMQP: the broker
holds every unacknowledged message; kombu's virtual transports fetch synchronously) the
credit is given back at once, as before.
"""

from __future__ import annotations

from typing import Any


class HeldWindow:
    """Counts the gate's messages out of the consumer's prefetch window, up to a bound.

    ``hold``, ``release`` and ``settle`` are called on the event loop's thread (``settle``
    on every turn: :meth:`register_with_event_loop`); the consumer applies a wider
    prefetch count on its next turn (``QoS.update`` in Celery's loop).
    """

    def __init__(self, worker: Any) -> None:
        #: the ``WorkController``: its consumer (and that consumer's QoS) is created after
        #: the gate and replaced on a reconnection
        self.worker = worker
        #: the QoS each held request's hold was counted in, by ``id(request)``
        self._holds: dict[int, Any] = {}
        #: the QoS of the credit counted in ``_count`` and ``_owed`` (a reconnection
        #: starts anew)
        self._current: Any = None
        #: credit added to ``_current``: one per hold, plus what is owed
        self._count = 0
        #: credit of released holds not yet taken back (a ``BRPOP`` was outstanding)
        self._owed = 0

    def _consumer(self) -> tuple[Any, Any, int]:
        consumer = getattr(self.worker, "consumer", None)
        qos = getattr(consumer, "qos", None)
        return consumer, qos, int(getattr(consumer, "initial_prefetch_count", 0) or 0)

    def _qos(self) -> tuple[Any, int]:
        _, qos, bound = self._consumer()
        return qos, bound

    @property
    def widened_by(self) -> int:
        """How much the current consumer's window is widened now (holds and owed)."""
        return self._count if self._current is self._qos()[0] else 0

    @property
    def owed(self) -> int:
        """Credit of messages that left the gate, not yet taken back."""
        return self._owed if self._current is self._qos()[0] else 0

    def register_with_event_loop(self, hub: Any) -> None:
        hub.on_tick.add(self.settle)

    def hold(self, req: Any) -> bool:
        """Widen the window by one for ``req`` (now in the gate); whether it was."""
        qos, bound = self._qos()
        if qos is None or bound <= 0 or id(req) in self._holds:
            return False
        if qos is not self._current:
            self._current, self._count, self._owed = qos, 0, 0
        if self._owed:
            self._owed -= 1  # takes over credit given to a message that left the gate
        else:
            if self._count >= bound:
                return False
            before = qos.value
            if not before or qos.increment_eventually() <= before:
                return False  # unlimited, or clamped by worker_eta_task_limit
            self._count += 1
        self._holds[id(req)] = qos
        return True

    def release(self, req: Any) -> None:
        """``req`` leaves the gate (to the pool, or dropped): its credit is given back
        (now, or once no ``BRPOP`` is outstanding), unless the consumer reconnected
        meanwhile (the new QoS never counted it)."""
        qos = self._holds.pop(id(req), None)
        if qos is not None and qos is self._current:
            self._owed += 1
            self.settle()

    def settle(self) -> None:
        """Take back the owed credit if no message can be stranded by it."""
        if not self._owed:
            return
        consumer, qos, _ = self._consumer()
        if qos is not self._current:
            self._owed = 0  # reconnected: the new QoS never counted it
            return
        pending = brpop_outstanding(consumer)
        if pending:
            return
        owed, self._owed = self._owed, 0
        self._count -= owed
        qos.decrement_eventually(owed)
        if pending is not None:
            # Redis, no BRPOP outstanding: applied now, so that kombu's next poll (on
            # this very turn, maybe) sends none against the wider window.
            qos.update()


def brpop_outstanding(consumer: Any) -> bool | None:
    """Whether the task consumer's Redis channel has a ``BRPOP`` whose reply is unread;
    ``None`` if its transport has no such state (not Redis)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    channel = getattr(task_consumer, "channel", None)
    if channel is None or not hasattr(channel, "_in_poll"):
        return None
    return bool(channel._in_poll)
