"""Completions, written behind the task: the pool process does not wait for them.

``task_postrun`` queues the end of a run here and returns; the process's database thread
(:mod:`.dbthread`) writes every completion queued so far in one statement. Each write is
conditional on the run's fencing token, so a completion that arrives late (its run was
reclaimed meanwhile) changes nothing and is recorded as a stale completion.

A run that could not be claimed (the database was down when it started) is untracked: its
completion finishes the row only if nobody claimed it meanwhile.

Completions that queue up while a write is in flight are written together.
A completion that cannot be written (the database is down) stays queued and is tried
again with back-off; the heartbeat's audit of lost runs gives a completion two heartbeats
to land before it reclaims anything (:meth:`heartbeat.Heart._audit_claims`). The queue is
flushed when a pool process exits and when the worker stops.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from django.db import DatabaseError, InterfaceError

from . import dbthread, relay
from .clock import pause
from .durability import relax_connection

logger = logging.getLogger("worker_health")

RETRY_FIRST = 0.2
#: at most this long between tries, so that completions land within a second of the
#: database's return (before the heartbeat's audit looks a second time)
RETRY_MAX = 1.0
#: how long the database thread lets completions gather before writing them together. None:
#: a completion not yet written when its worker is SIGKILLed makes its task run again, and a
#: wait would widen that window; completions still batch whenever they queue up behind a
#: write in flight.
LINGER = 0.0


@dataclass(frozen=True)
class Completion:
    task_id: str
    token: int
    status: str
    #: Celery's state name, for the stale-completion record
    state: str
    worker_id: str


_lock = threading.Lock()
_pending: list[Completion] = []
_scheduled = False
_retry = RETRY_FIRST


def _reset_after_fork() -> None:
    """A forked pool process starts with an empty queue and a fresh lock."""
    global _lock, _pending, _scheduled, _retry
    _lock = threading.Lock()
    _pending = []
    _scheduled = False
    _retry = RETRY_FIRST


os.register_at_fork(after_in_child=_reset_after_fork)


def add(completion: Completion) -> None:
    """Queue a completion; it is written on the database thread without waiting (or, in
    a prefork pool process, relayed to the main process's gate: :mod:`.relay`)."""
    global _scheduled
    pipe = relay.current
    if pipe is not None and pipe.send(
        completion.task_id, completion.token, completion.status, completion.state
    ):
        return
    with _lock:
        _pending.append(completion)
        if _scheduled:
            return
        _scheduled = True
    dbthread.submit_unguarded(_write_pending)


def pending() -> list[Completion]:
    with _lock:
        return list(_pending)


def flush(timeout: float | None = None) -> None:
    """Write what is queued now and wait for it (process exit, worker stop)."""
    with _lock:
        if not _pending:
            return
    try:
        dbthread.submit_unguarded(lambda: _write_pending(linger=0.0)).result(timeout=timeout)
    except Exception:
        logger.warning(
            "worker_health: %d completion(s) could not be written before exit",
            len(pending()),
            exc_info=True,
        )


def _write_pending(linger: float | None = None) -> None:
    global _scheduled, _retry
    wait = LINGER if linger is None else linger
    pause(wait)
    with _lock:
        batch = list(_pending)
        _pending.clear()
        _scheduled = False
    if not batch:
        return
    from .models import TaskQueue

    tracked = [c for c in batch if c.token >= 0]
    try:
        relax_connection()
        accepted = TaskQueue.objects.finish_many([(c.task_id, c.token, c.status) for c in tracked])
        for status in {c.status for c in batch if c.token < 0}:
            TaskQueue.objects.finish_untracked(
                [c.task_id for c in batch if c.token < 0 and c.status == status], status
            )
    except (DatabaseError, InterfaceError) as exc:
        dbthread.drop_connections()  # reconnect on the next try
        with _lock:
            _pending[:0] = batch
            retry, _retry = _retry, min(_retry * 2, RETRY_MAX)
            again = not _scheduled
            _scheduled = True
        logger.warning(
            "worker_health: cannot write %d completion(s) (%s); retrying in %.1f s",
            len(batch),
            exc,
            retry,
        )
        if again:
            timer = threading.Timer(retry, _retry_later)
            timer.daemon = True
            timer.start()
        return
    _retry = RETRY_FIRST
    for completion in tracked:
        if (completion.task_id, completion.token) not in accepted:
            try:
                stale(completion)
            except Exception:  # the completion itself was handled: only its record is lost
                logger.exception("worker_health: could not record a stale completion")


def _retry_later() -> None:
    dbthread.submit_unguarded(_write_pending)


def stale(completion: Completion) -> None:
    from .models import EventKind, TaskQueue, event
    from .signals import stale_completion

    event(
        EventKind.STALE_COMPLETION,
        worker_name=completion.worker_id,
        task_id=completion.task_id,
        token=completion.token,
        state=completion.state,
    )
    logger.warning(
        "worker_health: stale completion of %s (token %s) ignored: the task was reclaimed "
        "while this run was cut off",
        completion.task_id,
        completion.token,
        extra={"task_id": completion.task_id, "token": completion.token},
    )
    stale_completion.send_robust(
        sender=TaskQueue,
        task_id=completion.task_id,
        worker_id=completion.worker_id,
        token=completion.token,
        state=completion.state,
    )
