"""The claim gate: received tasks are claimed in batches before they reach the pool.

Celery hands every request that is due to run to ``WorkController.process_task``, which
sends it to the pool. The gate sits in front of it (a worker bootstep wraps it before the
consumer starts): a request of a tracked task is queued in memory and the event loop goes
on at once. A thread of the worker's main process writes everything queued in one
statement per batch: the message as delivered (so it can be published again), that this
worker holds the task, and a new fencing token (:meth:`TaskQuerySet.claim_received`).
Only after that commit is the request passed on, with its token in the request the pool
process receives, so the claim is durable before user code runs and the pool process
makes no database round trip before the task.

A delivery that may not run (the task finished, or a live worker runs it) is acknowledged
and dropped here, never reaching the pool.

With an event loop (the Redis and AMQP transports) the released requests go back to the
loop through a pipe, and are sent to the pool on the loop's thread as Celery would. Without
one (kombu's polling transports) the gate's thread sends them to the pool itself, as
Celery's own timer thread does with ETA tasks there. The ``solo``, ``eventlet`` and
``gevent`` pools run tasks on the caller's thread: for them there is no gate, and the pool
process claims each task itself (:func:`tracking.claim_before_start`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from django.db import DatabaseError, InterfaceError, close_old_connections

from .durability import relax_connection
from .heartbeat import WorkerIdentity

if TYPE_CHECKING:
    from celery.worker.request import Request

logger = logging.getLogger("worker_health")

#: keys added to the request the pool process receives
TOKEN_KEY = "worker_health_token"
CLAIMED_AT_KEY = "worker_health_claimed_at"
#: the token of a run that is not tracked (the database was unreachable)
UNTRACKED = -1

GATED_POOLS = ("celery.concurrency.prefork", "celery.concurrency.thread")

BATCH_SIZE = 500
#: how long the gate's thread lets received requests gather before claiming them together
LINGER = 0.001


def pool_is_gated(pool: Any) -> bool:
    """Does this pool run tasks off the consumer's thread (so a gate can hold them)?"""
    return type(pool).__module__ in GATED_POOLS


class Gate:
    """Wraps ``process_task``: claim first (in batches, off the loop), then pass on."""

    def __init__(
        self,
        identity: WorkerIdentity,
        process_task: Callable[[Request], Any],
        is_tracked: Callable[[Request], bool],
    ) -> None:
        self.identity = identity
        self.process_task = process_task
        self.is_tracked = is_tracked
        self._pending: deque[Request] = deque()
        self._released: deque[tuple[Request, int | None, float]] = deque()
        #: task ids claimed and not yet handed to the pool (shutdown hands them back)
        self.held: dict[str, Request] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._closing = False
        self._hub: Any = None
        self._pipe: tuple[int, int] | None = None
        self._failing_since: float | None = None

    # -- on the event loop --------------------------------------------------------------

    def __call__(self, req: Request) -> Any:
        if self._stopped or not self.is_tracked(req):
            return self.process_task(req)
        self._pending.append(req)
        self._wake.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="worker-health-gate", daemon=True
                    )
                    self._thread.start()
        return None

    def register_with_event_loop(self, hub: Any) -> None:
        if self._pipe is None:
            self._pipe = os.pipe()
            os.set_blocking(self._pipe[0], False)
            os.set_blocking(self._pipe[1], False)
        hub.add_reader(self._pipe[0], self._on_wakeup)
        self._hub = hub

    def _on_wakeup(self, *_: Any) -> None:
        assert self._pipe is not None
        with contextlib.suppress(BlockingIOError):
            while os.read(self._pipe[0], 4096):
                pass
        self._dispatch_released()

    def _dispatch_released(self) -> None:
        while self._released and not self._closing:
            req, token, claimed_at = self._released.popleft()
            self._dispatch(req, token, claimed_at)

    def _dispatch(self, req: Request, token: int | None, claimed_at: float) -> None:
        """Pass one request on (or drop it as a duplicate); never raises, so that one bad
        request cannot stop the loop or the gate's thread."""
        self.held.pop(req.id, None)
        try:
            if token is None:
                self._drop_duplicate(req)
                return
            req.request_dict[TOKEN_KEY] = token
            req.request_dict[CLAIMED_AT_KEY] = claimed_at
            self.process_task(req)
        except Exception:
            logger.exception("worker_health: could not pass %s[%s] on", req.name, req.id)

    def _drop_duplicate(self, req: Request) -> None:
        from .models import EventKind, event
        from .tracking import recorder_for

        logger.info(
            "worker_health: skipping duplicate delivery of %s[%s]",
            req.name,
            req.id,
            extra={"task_id": req.id, "worker_id": self.identity.worker_id},
        )
        try:
            req.acknowledge()
        finally:
            _forget(req)
        worker_id, task_id = self.identity.worker_id, req.id
        recorder_for(self.identity).add(
            lambda: event(EventKind.DUPLICATE_DELIVERY, worker_name=worker_id, task_id=task_id)
        )

    # -- on the gate's thread -----------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if not self._stopped:
                    time.sleep(LINGER)
                while self._pending:
                    try:
                        self._claim_batch()
                    except Exception:  # keep the thread: what follows must still pass
                        logger.exception("worker_health: the claim gate failed a batch")
                if self._stopped and not self._pending:
                    return
        finally:
            close_old_connections()

    def _take_batch(self) -> list[Request]:
        batch: list[Request] = []
        seen: set[str] = set()
        later: list[Request] = []
        while self._pending and len(batch) < BATCH_SIZE:
            req = self._pending.popleft()
            if req.id in seen:  # the same task delivered twice: decided by the next batch
                later.append(req)
            else:
                seen.add(req.id)
                batch.append(req)
        self._pending.extendleft(reversed(later))
        return batch

    def _claim_batch(self) -> None:
        batch = self._take_batch()
        if not batch:
            return
        for req in batch:
            self.held[req.id] = req
        tokens = self._claim(batch)
        claimed_at = time.monotonic()
        if self._closing:
            return  # shutdown: nothing more goes to the pool; these are handed back
        if self._hub is None:
            for req in batch:
                self._dispatch(req, tokens.get(req.id, UNTRACKED), claimed_at)
            return
        for req in batch:
            self._released.append((req, tokens.get(req.id, UNTRACKED), claimed_at))
        if self._pipe is not None:
            # a full pipe means the loop has a wake-up pending already
            with contextlib.suppress(BlockingIOError):
                os.write(self._pipe[1], b"x")

    def _claim(self, batch: list[Request]) -> dict[str, int | None]:
        """Tokens by task id (``None``: must not run); every id ``UNTRACKED`` when the
        database cannot be reached (the tasks run, untracked, rather than not at all)."""
        from .models import TaskQueue
        from .tracking import delivery_from_request

        for attempt in (1, 2):
            try:
                relax_connection()
                pk = self._worker_pk()
                if pk is None:
                    return {req.id: UNTRACKED for req in batch}
                tokens = TaskQueue.objects.claim_received(
                    [delivery_from_request(req) for req in batch],
                    worker_pk=pk,
                    incarnation=self.identity.incarnation,
                )
                if self._failing_since is not None:
                    logger.warning(
                        "worker_health: claims written again after %.1f s",
                        time.monotonic() - self._failing_since,
                    )
                    self._failing_since = None
                return tokens
            except (DatabaseError, InterfaceError) as exc:
                close_old_connections()
                from django.db import connections

                connections["default"].close()
                if attempt == 2 and self._failing_since is None:
                    self._failing_since = time.monotonic()
                    logger.warning(
                        "worker_health: cannot claim received tasks (%s); running them "
                        "untracked until the database answers",
                        exc,
                    )
            except Exception:
                # A bug, or a message we cannot read: run the batch untracked rather than
                # hold it (or lose the gate's thread).
                logger.exception("worker_health: could not claim %d received task(s)", len(batch))
                break
        return {req.id: UNTRACKED for req in batch}

    def _worker_pk(self) -> int | None:
        if self.identity.pk is None:
            from .models import WorkerRegistry

            self.identity.pk = (
                WorkerRegistry.objects.filter(worker_id=self.identity.worker_id)
                .values_list("pk", flat=True)
                .first()
            )
        return self.identity.pk

    def in_flight(self) -> set[str]:
        """Ids of the requests the gate holds now (waiting for their claim, or claimed and
        not yet passed to the pool)."""
        return {req.id for req in list(self._pending)} | set(list(self.held))

    # -- shutdown -----------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Stop passing requests on (the consumer has stopped: nothing new arrives).
        What was received is still claimed, so that it can be handed back; returns the
        ids claimed but never handed to the pool."""
        self._closing = True
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._hub is not None and self._pipe is not None:
            with contextlib.suppress(Exception):  # the loop is gone already
                self._hub.remove_reader(self._pipe[0])
        return list(self.held)


def _forget(req: Request) -> None:
    """Remove a dropped duplicate from Celery's worker state, and only it.

    ``state.requests`` is keyed by task id: the duplicate's ``task_reserved`` replaced the
    entry of the run it duplicates (which may be running here); put that one back.
    """
    from celery.worker import state

    state.reserved_requests.discard(req)
    state.active_requests.discard(req)
    if state.requests.get(req.id) is req:
        same = [
            r
            for r in (*state.active_requests, *state.reserved_requests)
            if r.id == req.id and r is not req
        ]
        if same:
            state.requests[req.id] = same[0]
        else:
            del state.requests[req.id]


_gates: dict[str, Gate] = {}


def gate_for(identity: WorkerIdentity | None) -> Gate | None:
    if identity is None:
        return None
    gate = _gates.get(identity.worker_id)
    if gate is not None and gate.identity is identity:
        return gate
    return None


def install(identity: WorkerIdentity, w: Any, is_tracked: Callable[[Request], bool]) -> Gate:
    gate = Gate(identity, w.process_task, is_tracked)
    w.process_task = gate
    _gates[identity.worker_id] = gate
    return gate


def uninstall(identity: WorkerIdentity) -> list[str]:
    """Stop the worker's gate; the ids it claimed but never passed on."""
    gate = _gates.pop(identity.worker_id, None)
    return gate.stop() if gate is not None else []


class GateStep(bootsteps.StartStopStep):
    """Puts the gate in front of ``process_task`` before the consumer is built."""

    label = "worker-health claim gate"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._identity: WorkerIdentity | None = None

    def create(self, w: Any) -> Any:
        from .heartbeat import _identities
        from .tracking import request_is_tracked

        identity = _identities.get(w.hostname)
        if identity is not None and pool_is_gated(w.pool):
            install(identity, w, request_is_tracked)
            self._identity = identity
        return self

    def register_with_event_loop(self, w: Any, hub: Any) -> None:
        gate = gate_for(self._identity)
        if gate is not None:
            gate.register_with_event_loop(hub)

    # StartStopStep calls these on ``self.obj``, which ``create`` made ``self``.
    def start(self, parent: Any = None) -> None:
        pass

    def stop(self, parent: Any = None) -> None:
        gate = gate_for(self._identity)
        if gate is not None:
            gate.stop()

    def terminate(self, parent: Any = None) -> None:
        self.stop(parent)
