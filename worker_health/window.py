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
"""

from __future__ import annotations

from typing import Any


class HeldWindow:
    """Counts the gate's messages out of the consumer's prefetch window, up to a bound.

    ``hold`` and ``release`` are called on the event loop's thread; the consumer applies
    the new prefetch count on its next turn (``QoS.update`` in Celery's loop).
    """

    def __init__(self, worker: Any) -> None:
        #: the ``WorkController``: its consumer (and that consumer's QoS) is created after
        #: the gate and replaced on a reconnection
        self.worker = worker
        #: the QoS each held request's hold was counted in, by ``id(request)``
        self._holds: dict[int, Any] = {}
        #: the QoS of the holds counted in ``_count`` (a reconnection starts anew)
        self._current: Any = None
        self._count = 0

    def _qos(self) -> tuple[Any, int]:
        consumer = getattr(self.worker, "consumer", None)
        qos = getattr(consumer, "qos", None)
        return qos, int(getattr(consumer, "initial_prefetch_count", 0) or 0)

    @property
    def widened_by(self) -> int:
        """How much the current consumer's window is widened now."""
        return self._count if self._current is self._qos()[0] else 0

    def hold(self, req: Any) -> bool:
        """Widen the window by one for ``req`` (now in the gate); whether it was."""
        qos, bound = self._qos()
        if qos is None or bound <= 0 or id(req) in self._holds:
            return False
        if qos is not self._current:
            self._current, self._count = qos, 0
        if self._count >= bound:
            return False
        before = qos.value
        if not before or qos.increment_eventually() <= before:
            return False  # unlimited, or clamped by worker_eta_task_limit
        self._holds[id(req)] = qos
        self._count += 1
        return True

    def release(self, req: Any) -> None:
        """``req`` leaves the gate (to the pool, or dropped): its hold is given back, unless
        the consumer reconnected meanwhile (the new QoS never counted it)."""
        qos = self._holds.pop(id(req), None)
        if qos is not None and qos is self._current:
            self._count -= 1
            if qos is self._qos()[0]:
                qos.decrement_eventually()
