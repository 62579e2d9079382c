"""The claim gate: received tasks are claimed in batches before they reach the pool.

Celery hands every request that is due to run to ``WorkController.process_task``, which
sends it to the pool. The gate sits in front of it (a worker bootstep wraps it before the
consumer starts): a request of a tracked task is queued in memory and the event loop goes
on at once. Everything queued is written in one statement per batch: the message as
delivered (so it can be published again), that this worker holds the task, and a new
fencing token (:meth:`TaskQuerySet.claim_received`), together with the completions the
prefork pool processes relayed meanwhile (:mod:`.relay`,
:meth:`TaskQuerySet.claim_and_finish`). Only after that commit is the request passed on,
with its token in the request the pool process receives, so the claim is durable before
user code runs and the pool process makes no database round trip before the task.

Who writes: on PostgreSQL with psycopg 3 and an event loop (the Redis and AMQP
transports), the loop itself, without ever waiting (:mod:`.loopwriter`). Otherwise a
thread of the worker's main process; with an event loop the requests it released go back
to the loop through a pipe and are sent to the pool on the loop's thread as Celery would;
without one (kombu's polling transports) a second thread sends them to the pool, as
Celery's own timer thread does with ETA tasks there. That thread waits on Celery's put
locks while every pool process is busy; the gate's thread does not, so what the consumer
fetched meanwhile (up to the prefetch window) is claimed within milliseconds, and a worker
killed while it waits leaves claims the detector reclaims, not messages only its memory
held. The loop stops before the pool has drained at shutdown: the gate's thread then takes
over for the last completions.

A delivery that may not run (the task finished, or a live worker runs it) is acknowledged
and dropped here, never reaching the pool. A delivery received while this worker is marked
failed (a zombie that resumed before its heart noticed) is rejected with requeue: it goes
back to the broker, unrun and not lost.

The ``solo``, ``eventlet`` and ``gevent`` pools run tasks on the caller's thread: for them
there is no gate, and the pool process claims each task itself
(:func:`tracking.claim_before_start`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from django.db import DatabaseError, InterfaceError, close_old_connections

from . import completions, loopwriter
from . import relay as relay_module
from .clock import pause
from .durability import relax_connection
from .heartbeat import WorkerIdentity
from .loopwriter import LoopWriter
from .querysets import CLAIMER_FAILED
from .relay import Relay, Relayed
from .window import HeldWindow

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
        #: completions relayed by the pool processes, not yet written
        self.relay: Relay | None = None
        self._done: list[Relayed] = []
        self._done_retry_at = 0.0
        self._done_backoff = completions.RETRY_FIRST
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._awake = False
        self._relay_closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: without an event loop: claimed requests on their way to the pool, and the
        #: thread that passes them on (it waits while every pool process is busy)
        self._handoff: queue.SimpleQueue[tuple[Request, int | None, float] | None] = (
            queue.SimpleQueue()
        )
        self._dispatcher: threading.Thread | None = None
        self._stopped = False
        self._closing = False
        self._hub: Any = None
        self._pipe: tuple[int, int] | None = None
        self._failing_since: float | None = None
        #: with an event loop on PostgreSQL: the writes are made from the loop, no thread
        self.writer: LoopWriter | None = None
        #: the pool's processes (threads), for the loop writer's linger
        self.concurrency = 0
        #: what the gate holds does not count against the consumer's prefetch window
        self.window: HeldWindow | None = None

    # -- on the event loop --------------------------------------------------------------

    def __call__(self, req: Request) -> Any:
        if self._stopped or not self.is_tracked(req):
            return self.process_task(req)
        self._pending.append(req)
        if self.writer is not None:
            if self.window is not None:
                self.window.hold(req)
            self.writer.kick()
        else:
            self._wake()
        return None

    def start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="worker-health-gate", daemon=True
                    )
                    self._thread.start()

    def _wake(self) -> None:
        if self._wake_w < 0:
            return  # stopped for good
        if self._thread is None:
            self.start()
        if not self._awake:
            self._awake = True
            with contextlib.suppress(BlockingIOError):  # full: a wake-up is pending anyway
                os.write(self._wake_w, b"x")

    def register_with_event_loop(self, hub: Any) -> None:
        if self._pipe is None:
            self._pipe = os.pipe()
            os.set_blocking(self._pipe[0], False)
            os.set_blocking(self._pipe[1], False)
        hub.add_reader(self._pipe[0], self._on_wakeup)
        self._hub = hub
        if self._closing or not loopwriter.usable():
            return
        if self.writer is None:
            if self._thread is not None:
                return  # the thread is at work already (the loop came late): it stays
            self.writer = LoopWriter(self, hub)
            self.writer.start()
        else:
            self.writer.attach(hub)
        if self.window is not None:
            self.window.register_with_event_loop(hub)
        if self.relay is not None:
            hub.add_reader(self.relay.read_fd, self._on_relayed)

    def _on_relayed(self, *_: Any) -> None:
        """Completions from the pool processes (loop mode)."""
        if self.relay is not None and self.writer is not None:
            got = self.relay.receive()
            if got:
                self._done.extend(got)
                self.writer.kick()

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
        if self.window is not None:
            self.window.release(req)
        try:
            if token is None:
                self._drop_duplicate(req)
                return
            if token == CLAIMER_FAILED:
                self._give_back(req)
                return
            req.request_dict[TOKEN_KEY] = token
            req.request_dict[CLAIMED_AT_KEY] = claimed_at
            self.process_task(req)
        except Exception:
            logger.exception("worker_health: could not pass %s[%s] on", req.name, req.id)

    def _give_back(self, req: Request) -> None:
        """This worker is marked failed (it was paused, cut off, and resumed before its
        heart noticed): what it received goes back to the broker, unrun, for a live worker
        (or for this one once its heart has recovered it). Never acknowledged and dropped:
        it may be the only copy of the message."""
        logger.warning(
            "worker_health: %s is marked failed; %s[%s] goes back to the broker",
            self.identity.worker_id,
            req.name,
            req.id,
            extra={"task_id": req.id, "worker_id": self.identity.worker_id},
        )
        try:
            req.reject(requeue=True)
        finally:
            _forget(req)

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
                fds = [self._wake_r] if self.relay is None else [self._wake_r, self.relay.read_fd]
                timeout = None
                if self._done:
                    timeout = max(0.0, self._done_retry_at - time.monotonic())
                select.select(fds, [], [], timeout)
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
                # Only once the pipe is empty: a wake-up written during the drain (and
                # read by it) would otherwise leave the flag set with no byte pending, and
                # every later ``_wake`` would skip its write: the thread would sleep for
                # good with requests pending. What arrived before this line is in
                # ``_pending`` already and is taken below.
                self._awake = False
                if not self._stopped:
                    pause(LINGER)
                closing = self._stopped and (self._relay_closed or self.relay is None)
                if self.relay is not None:
                    self._done.extend(self.relay.receive())
                while self._pending or self._done_due(closing):
                    try:
                        self._write_batch()
                    except Exception:  # keep the thread: what follows must still pass
                        logger.exception("worker_health: the claim gate failed a batch")
                    if closing:
                        break
                if closing and not self._pending:
                    if self._done:
                        logger.warning(
                            "worker_health: %d completion(s) could not be written before "
                            "exit; their tasks may run again",
                            len(self._done),
                        )
                    return
        finally:
            close_old_connections()

    # -- on the dispatching thread (no event loop) ---------------------------------------

    def _start_dispatcher(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(
                target=self._run_dispatcher, name="worker-health-dispatch", daemon=True
            )
            self._dispatcher.start()

    def _run_dispatcher(self) -> None:
        while True:
            item = self._handoff.get()
            if item is None:
                return
            if not self._closing:  # at shutdown what is left stays held (handed back)
                self._dispatch(*item)

    def _done_due(self, closing: bool) -> bool:
        return bool(self._done) and (closing or time.monotonic() >= self._done_retry_at)

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

    def _take_due_done(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[Relayed]:
        """Relayed completions to write now (none while waiting to try again after an
        error), leaving those of ``exclude`` for later."""
        if not self._done or time.monotonic() < self._done_retry_at:
            return []
        take: list[Relayed] = []
        keep: list[Relayed] = []
        for c in self._done:
            (keep if c.task_id in exclude or len(take) >= BATCH_SIZE else take).append(c)
        self._done = keep
        return take

    def _requeue_done(self, done: list[Relayed]) -> None:
        """Completions that could not be written: tried again after a back-off."""
        if not done:
            return
        self._done[:0] = done
        delay = self._done_backoff
        self._done_retry_at = time.monotonic() + delay
        self._done_backoff = min(self._done_backoff * 2, completions.RETRY_MAX)
        if self.writer is not None:
            self.writer.hub.call_later(delay, self.writer.kick)

    def _done_written(self) -> None:
        self._done_backoff = completions.RETRY_FIRST
        self._done_retry_at = 0.0

    def _write_batch(self) -> None:
        """Claim what is pending and write the relayed completions, in one statement."""
        batch = self._take_batch()
        self._done_retry_at = 0.0 if self._stopped and self._relay_closed else self._done_retry_at
        done = self._take_due_done()
        for req in batch:
            self.held[req.id] = req
        tokens, unwritten = self._write(batch, done)
        if unwritten:
            self._requeue_done(unwritten)
        else:
            self._done_written()
        if not batch:
            return
        claimed_at = time.monotonic()
        if self._closing:
            return  # shutdown: nothing more goes to the pool; these are handed back
        if self._hub is None:
            self._start_dispatcher()
            for req in batch:
                self._handoff.put((req, tokens.get(req.id, UNTRACKED), claimed_at))
            return
        for req in batch:
            self._released.append((req, tokens.get(req.id, UNTRACKED), claimed_at))
        if self._pipe is not None:
            # a full pipe means the loop has a wake-up pending already
            with contextlib.suppress(BlockingIOError):
                os.write(self._pipe[1], b"x")

    def _write(
        self, batch: list[Request], done: list[Relayed]
    ) -> tuple[dict[str, int | None], list[Relayed]]:
        """Tokens by task id (``None``: must not run; every id ``UNTRACKED`` when the
        database cannot be reached: the tasks run, untracked, rather than not at all), and
        the completions that could not be written."""
        from .models import TaskQueue
        from .tracking import delivery_from_request

        untracked: dict[str, int | None] = {req.id: UNTRACKED for req in batch}
        runs = [(c.task_id, c.token, c.status) for c in done if c.token >= 0]
        for attempt in (1, 2):
            try:
                relax_connection()
                pk = self._worker_pk()
                if pk is None:
                    return untracked, self._finish_alone(done)
                tokens, accepted = TaskQueue.objects.claim_and_finish(
                    [delivery_from_request(req) for req in batch],
                    runs,
                    worker_pk=pk,
                    incarnation=self.identity.incarnation,
                )
                if self._failing_since is not None:
                    logger.warning(
                        "worker_health: claims written again after %.1f s",
                        time.monotonic() - self._failing_since,
                    )
                    self._failing_since = None
                self._report_stale(done, accepted)
                # after the claims committed: a failure here must not claim them again
                return tokens, self._finish_untracked_safely(done)
            except (DatabaseError, InterfaceError) as exc:
                self._drop_connection()
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
                return untracked, self._finish_alone(done)
        return untracked, done

    def _finish_alone(self, done: list[Relayed]) -> list[Relayed]:
        """Write completions without claims (after the claims could not be); returns
        those that could not be written."""
        from .models import TaskQueue

        if not done:
            return []
        try:
            runs = [(c.task_id, c.token, c.status) for c in done if c.token >= 0]
            accepted = TaskQueue.objects.finish_many(runs)
        except (DatabaseError, InterfaceError):
            self._drop_connection()
            return done
        self._report_stale(done, accepted)
        return self._finish_untracked_safely(done)

    def _finish_untracked_safely(self, done: list[Relayed]) -> list[Relayed]:
        """Finish the rows of runs that started untracked; those not written."""
        try:
            self._finish_untracked(done)
        except (DatabaseError, InterfaceError):
            self._drop_connection()
            return [c for c in done if c.token < 0]
        return []

    def _finish_untracked(self, done: list[Relayed]) -> None:
        from .models import TaskQueue

        for status in {c.status for c in done if c.token < 0}:
            TaskQueue.objects.finish_untracked(
                [c.task_id for c in done if c.token < 0 and c.status == status], status
            )

    def _report_stale(self, done: list[Relayed], accepted: set[tuple[str, int]]) -> None:
        for c in done:
            if c.token >= 0 and (c.task_id, c.token) not in accepted:
                try:
                    completions.stale(
                        completions.Completion(
                            task_id=c.task_id,
                            token=c.token,
                            status=c.status,
                            state=c.state,
                            worker_id=self.identity.worker_id,
                        )
                    )
                except Exception:  # the completion was handled: only its record is lost
                    logger.exception("worker_health: could not record a stale completion")

    @staticmethod
    def _drop_connection() -> None:
        close_old_connections()
        from django.db import connections

        connections["default"].close()

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
        writer = self.writer
        inflight = writer.inflight if writer is not None else None
        return (
            {req.id for req in list(self._pending)}
            | set(list(self.held))
            | {c.task_id for c in list(self._done)}
            | ({c.task_id for c in inflight[2]} if inflight is not None else set())
        )

    # -- shutdown -----------------------------------------------------------------------

    def close_intake(self) -> None:
        """Stop passing requests on (the consumer has stopped: nothing new arrives). What
        was received is still claimed, so that it can be handed back; relayed completions
        are still written while the pool drains."""
        self._closing = True
        self._stopped = True
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()  # the loop has stopped: the gate's thread takes over
            if self._hub is not None and self.relay is not None:
                with contextlib.suppress(Exception):
                    self._hub.remove_reader(self.relay.read_fd)
        self._wake()

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Stop for good (the pool has stopped): write the last relayed completions;
        returns the ids claimed but never handed to the pool."""
        self._relay_closed = True
        self.close_intake()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._dispatcher is not None:
            # it may wait on a put lock of a pool that is gone: it is a daemon thread
            self._handoff.put(None)
            self._dispatcher.join(min(timeout, 1.0))
        if self._hub is not None and self._pipe is not None:
            with contextlib.suppress(Exception):  # the loop is gone already
                self._hub.remove_reader(self._pipe[0])
        if self.relay is not None:
            if relay_module.current is self.relay:
                relay_module.close_relay()
            else:
                self.relay.close()
        if self._thread is None or not self._thread.is_alive():
            self._close_pipes()
        return list(self.held)

    def _close_pipes(self) -> None:
        fds = [self._wake_r, self._wake_w, *(self._pipe or ())]
        self._wake_r = self._wake_w = -1
        self._pipe = None
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


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
    gate.concurrency = int(getattr(w, "concurrency", 0) or 0)
    gate.window = HeldWindow(w)
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
            gate = install(identity, w, request_is_tracked)
            if type(w.pool).__module__ == "celery.concurrency.prefork" and getattr(
                w, "use_eventloop", False
            ):
                # Before the pool forks: its processes inherit the pipe. Not without an
                # event loop: the gate's thread then passes requests to the pool itself,
                # and waits there while every pool process is busy (Celery's put locks).
                gate.relay = relay_module.open_relay()
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
            gate.close_intake()  # ``worker_shutdown`` stops it once the pool has drained

    def terminate(self, parent: Any = None) -> None:
        self.stop(parent)
