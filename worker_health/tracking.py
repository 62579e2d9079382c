"""Celery signal receivers that record a task's life: published, received, claimed, done.

Where each write happens, and why:

* **publish** (``before_task_publish``, in the publisher): one ``INSERT .. ON CONFLICT`` of
  the task's name and queue, deferred to the commit of the publisher's transaction so a
  rolled-back request leaves nothing behind. The payload is not touched.
* **receive and claim** (worker main process): the claim gate (:mod:`.gate`) writes the
  delivered message, the hold and a new fencing token for a batch of requests in one
  statement before passing them to the pool. Requests that wait first (an ETA, a rate
  limit) are recorded as ``reserved`` at receipt by a background thread (the ``Recorder``).
* **start** (``before_start``, just before user code, in the pool process): the token came
  with the request; without a gate (``solo`` and green pools) the pool process claims with a
  conditional UPDATE. A delivery that may not run (finished, or running on a live worker) is
  skipped with ``Ignore``.
* **finish** (``task_postrun``): queued for :mod:`.completions`, written behind the task,
  accepted only with the current token; a late result from a run that was reclaimed is
  recorded as a stale completion and changes nothing.

Database work in pool processes runs on a per-process thread (:mod:`.dbthread`) whose
connection persists, since Celery closes the task thread's connections around every task.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from binascii import b2a_base64
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery import states
from celery.app.trace import task_has_custom
from celery.exceptions import Ignore, WorkerLostError
from django.db import DatabaseError, InterfaceError, close_old_connections, transaction

from . import completions, dbthread
from .clock import pause
from .conf import settings
from .durability import relax_connection
from .gate import CLAIMED_AT_KEY, TOKEN_KEY, gate_for
from .heartbeat import WorkerIdentity, identity_for, in_worker_process
from .querysets import Delivery

if TYPE_CHECKING:
    from celery import Task
    from celery.worker import WorkController
    from celery.worker.request import Request

logger = logging.getLogger("worker_health")

OWN_TASK_PREFIX = "worker_health."

#: fencing tokens of the runs in this process, by task id
_tokens: dict[str, int] = {}
#: task ids this process published again while running them (retry, replace)
_requeued: set[str] = set()


def is_tracked(task_name: str | None, queue: str | None = None) -> bool:
    """Whether ``WORKER_HEALTH_TRACK_TASKS`` covers this task (by name pattern or queue)."""
    if not task_name or task_name.startswith(OWN_TASK_PREFIX):
        return False
    patterns = settings.TRACK_TASKS
    if patterns is None:
        return True
    return any(
        fnmatch.fnmatchcase(task_name, pattern) or (queue is not None and queue == pattern)
        for pattern in patterns
    )


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# publish


def on_before_task_publish(
    sender: str | None = None,
    body: Any = None,
    exchange: str | None = None,
    routing_key: str | None = None,
    headers: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    headers = headers if headers is not None else {}
    _strip_gate_keys(headers)
    task_name = headers.get("task") or sender
    task_id = headers.get("id")
    if not task_id or not is_tracked(task_name, routing_key):
        return
    token = _tokens.get(task_id)
    if token is not None:
        # A running task publishes itself again (retry, Task.replace): it goes back to
        # queued now, before the new message can reach another worker.
        if task_id not in _requeued:  # Task.replace requeued it already (on_replace)
            _requeue_own(task_id, token)
        return
    from .models import TaskQueue

    def record() -> None:
        TaskQueue.objects.record_published(
            task_id=task_id,
            task_name=str(task_name),
            queue=routing_key or "",
            eta=_parse_time(headers.get("eta")),
            expires=_parse_time(headers.get("expires")),
        )

    try:
        if in_worker_process() and not transaction.get_connection().in_atomic_block:
            # A task publishing (a chain's next link, a callback): off the task thread,
            # whose connection Celery closes around every task; before the message leaves,
            # so that a re-opened row is claimable when the message arrives.
            dbthread.call(record)
        else:
            transaction.on_commit(record)
    except Exception:
        # Tracking must never break the user's publish; the worker records it on receipt.
        logger.exception("worker_health: could not record the publish of %s", task_id)


def _strip_gate_keys(headers: dict[str, Any]) -> None:
    """A retry (or ``Task.replace``) builds its message from the running request, custom
    keys included: the gate's token must not travel with it (a pool without a gate would
    take it for its own claim)."""
    for container in (headers, headers.get("headers")):
        if isinstance(container, dict):
            container.pop(TOKEN_KEY, None)
            container.pop(CLAIMED_AT_KEY, None)


def _requeue_own(task_id: str, token: int) -> None:
    from .models import TaskQueue

    _requeued.add(task_id)
    try:
        dbthread.call(lambda: TaskQueue.objects.requeue_own(task_id, token))
    except Exception:
        logger.exception("worker_health: could not requeue %s for its retry", task_id)


# --------------------------------------------------------------------------------------------
# receive (worker main process)


_SCALARS = frozenset((str, int, float, bool, type(None)))
_PROPERTIES = ("correlation_id", "reply_to", "priority", "delivery_mode")


def _message_parts(
    request: Request,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], bytes | None]:
    """A received message's delivery info, headers as JSON values, kept properties and
    body as bytes: what :func:`delivery_from_request` and :func:`claim_row` both store."""
    message = request.message
    headers = message.headers or {}
    safe = {}
    for key, value in headers.items():  # one call per header only where one is needed
        safe[key if type(key) is str else str(key)] = (
            value if type(value) in _SCALARS else _json_safe(value)
        )
    properties = message.properties or {}
    body = message.body
    if isinstance(body, str):
        body = body.encode(message.content_encoding or "utf-8")
    return (
        message.delivery_info or {},
        safe,
        {key: properties[key] for key in _PROPERTIES if key in properties},
        bytes(body) if body is not None else None,
    )


def delivery_from_request(request: Request) -> Delivery:
    message = request.message
    info, headers, properties, body = _message_parts(request)
    queue = info.get("routing_key") or ""
    return Delivery(
        task_id=request.id,
        task_name=request.name,
        queue=queue,
        exchange=info.get("exchange") or "",
        routing_key=info.get("routing_key") or "",
        body=body,
        content_type=message.content_type or "",
        content_encoding=message.content_encoding or "",
        headers=headers,
        properties=properties,
        eta=_parse_time((message.headers or {}).get("eta")),
        expires=_parse_time((message.headers or {}).get("expires")),
    )


def claim_row(request: Request) -> dict[str, Any]:
    """``delivery_from_request(request).json_row()`` without the dataclass: the loop writer
    calls it for every received task on the worker's event loop (``tests/test_tracking.py``
    checks that both agree)."""
    message = request.message
    info, headers, properties, body = _message_parts(request)
    routing_key = info.get("routing_key") or ""
    eta = _parse_time((message.headers or {}).get("eta"))
    expires = _parse_time((message.headers or {}).get("expires"))
    return {
        "i": request.id,
        "n": request.name,
        "q": routing_key,
        "x": info.get("exchange") or "",
        "k": routing_key,
        "b": None if body is None else b2a_base64(body, newline=False).decode(),
        "ct": message.content_type or "",
        "ce": message.content_encoding or "",
        "h": headers,
        "p": properties,
        "eta": None if eta is None else eta.isoformat(),
        "exp": None if expires is None else expires.isoformat(),
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(value)


class Recorder:
    """Writes what the worker's main process learns, in batches, off the event loop."""

    def __init__(self, identity: WorkerIdentity) -> None:
        self.identity = identity
        self._items: deque[Delivery | Callable[[], Any]] = deque()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def add(self, item: Delivery | Callable[[], Any]) -> None:
        self._items.append(item)
        self._wake.set()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="worker-health-recorder", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self) -> None:
        """Write everything queued so far (on the calling thread)."""
        self._write_pending()

    def _run(self) -> None:
        retry = 0.1
        while True:
            self._wake.wait()
            self._wake.clear()
            try:
                self._write_pending()
                retry = 0.1
            except (DatabaseError, InterfaceError) as exc:
                logger.warning("worker_health: recorder cannot write (%s); retrying", exc)
                close_old_connections()
                pause(retry)
                retry = min(retry * 2, 2.0)
                self._wake.set()
            if self._stopped and not self._items:
                return

    def _write_pending(self) -> None:
        from .models import TaskQueue

        if self._items:
            relax_connection()
        while self._items:
            if self.identity.pk is None:
                return  # not registered yet: the heart will; keep the items
            batch: list[Delivery | Callable[[], Any]] = []
            while self._items and len(batch) < 500:
                batch.append(self._items.popleft())
            try:
                deliveries = [item for item in batch if isinstance(item, Delivery)]
                TaskQueue.objects.reserve(deliveries, self.identity.pk, self.identity.incarnation)
                for item in batch:
                    if not isinstance(item, Delivery):
                        item()
            except BaseException:
                self._items.extendleft(reversed(batch))
                raise


_recorders: dict[str, Recorder] = {}


def recorder_for(identity: WorkerIdentity) -> Recorder:
    recorder = _recorders.get(identity.worker_id)
    if recorder is None or recorder.identity is not identity:
        recorder = _recorders[identity.worker_id] = Recorder(identity)
    return recorder


def request_is_tracked(request: Request) -> bool:
    return is_tracked(request.name, (request.delivery_info or {}).get("routing_key"))


def on_task_received(sender: Any = None, request: Request | None = None, **_: Any) -> None:
    if request is None or not request_is_tracked(request):
        return
    identity = identity_for(getattr(sender, "hostname", None) or request.hostname)
    if identity is None:
        return
    if (
        gate_for(identity) is not None
        and _one_write_claims()
        and not request.eta
        and not _rate_limited(request, sender)
    ):
        return  # goes to the gate at once, which records and claims it in one write
    recorder_for(identity).add(delivery_from_request(request))


def _one_write_claims() -> bool:
    """Does the gate record and claim in one statement (PostgreSQL)? Elsewhere (SQLite)
    its claims take a few statements and one writer at a time, so the receipt is written at
    once on its own, as for ETA tasks: on a transport that drops a message once read (the
    filesystem transport), the receipt is all that is left of it if the worker dies."""
    from django.db import connections

    return connections["default"].vendor == "postgresql"


def _rate_limited(request: Request, consumer: Any) -> bool:
    """Will Celery hold this request back for its task's rate limit?"""
    return bool(getattr(request.task, "rate_limit", None)) and not getattr(
        consumer, "disable_rate_limits", False
    )


def on_task_revoked(sender: Task | None = None, request: Any = None, **_: Any) -> None:
    """``task_revoked`` (worker main process; ``request`` is a task ``Context``)."""
    task_id = getattr(request, "id", None)
    if sender is None or not task_id or not is_tracked(sender.name):
        return
    identity = identity_for(getattr(request, "hostname", None))
    from .models import TaskQueue

    if identity is not None:
        recorder_for(identity).add(lambda: TaskQueue.objects.mark_revoked([task_id]))


def on_task_failure(
    sender: Task | None = None, task_id: str | None = None, exception: Any = None, **_: Any
) -> None:
    """A pool process died running the task: reclaim it now rather than at the next sweep."""
    if not isinstance(exception, WorkerLostError) or not task_id or sender is None:
        return
    if not is_tracked(sender.name):
        return
    identity = identity_for(getattr(sender.request, "hostname", None))
    if identity is None:
        return
    from . import reclaim

    recorder_for(identity).add(lambda: reclaim.reclaim_lost_task(task_id, identity))


# --------------------------------------------------------------------------------------------
# claim and finish (pool process)


def claim_before_start(task: Task, task_id: str, args: Any, kwargs: Any) -> None:
    """Installed as ``before_start`` of tracked tasks: claim, or skip this delivery."""
    original = getattr(type(task), "_worker_health_original_before_start", None)
    request = task.request
    queue = (request.delivery_info or {}).get("routing_key") or ""
    if not request.called_directly and is_tracked(task.name, queue):
        identity = identity_for(request.hostname)
        if identity is not None:
            token = _token_from_gate(task, task_id, identity)
            if token in (_NO_GATE, _NOT_OURS):
                # A gate claim that was taken from this worker while the run waited (it
                # was failed meanwhile) is claimed again only while the worker is not
                # failed: otherwise the task was reclaimed and runs elsewhere.
                token = _claim(task, task_id, queue, identity, require_alive=token == _NOT_OURS)
            if token is None:
                logger.info(
                    "worker_health: skipping duplicate delivery of %s[%s]",
                    task.name,
                    task_id,
                    extra={"task_id": task_id, "worker_id": identity.worker_id},
                )
                _record_duplicate(task_id, identity)
                raise Ignore()
    if original is not None:
        original(task, task_id, args, kwargs)


_NO_GATE = -2
#: the gate's claim of this run is not this worker's any more
_NOT_OURS = -4


def _token_from_gate(task: Task, task_id: str, identity: WorkerIdentity) -> int | None:
    """The token the worker's gate claimed this run with (no database round trip), or
    ``_NO_GATE`` when the run came by another way and must claim for itself.

    A run that waited in the pool's queue for longer than a heartbeat interval confirms
    first that its claim still holds: its worker may have been paused and declared failed
    meanwhile, and the task reclaimed (``_NOT_OURS``: the run claims again, unless its
    worker is still failed, or is a duplicate). So does every run that is not the task's
    first (its token is above 1: a reclaimed, redelivered or retried task), and the
    confirmation records that the run started: a reclaim counts against
    ``MAX_RECLAIMS`` only the runs that had started (and a first run, which may have).
    A task's first run, the hot path, makes no round trip.
    """
    token = getattr(task.request, TOKEN_KEY, None)
    if not isinstance(token, int):
        return _NO_GATE
    if token < 0:
        _tokens[task_id] = token  # the gate could not reach the database: untracked
        return token
    claimed_at = getattr(task.request, CLAIMED_AT_KEY, None)
    waited = time.monotonic() - claimed_at if isinstance(claimed_at, float) else float("inf")
    if token > 1 or waited > min(settings.HEARTBEAT_INTERVAL, settings.STALE_AFTER / 2):
        from .models import TaskQueue

        def confirm() -> bool:
            # A pool process forked before its worker registered learns the worker's
            # row here (the gate's claim names it: it exists).
            pk = identity.pk if identity.pk is not None else _registered_pk(identity)
            if pk is None:
                return True  # cannot tell: the gate's claim stands
            return TaskQueue.objects.confirm_claim(task_id, token, pk, identity.incarnation)

        try:
            still_ours = dbthread.call(confirm)
        except Exception:
            logger.warning(
                "worker_health: could not confirm the claim of %s; running it",
                task_id,
                exc_info=True,
            )
            still_ours = True
        if not still_ours:
            return _NOT_OURS
    _tokens[task_id] = token
    return token


def _registered_pk(identity: WorkerIdentity) -> int | None:
    """The primary key of the worker's row (looked up once per process), or None."""
    from .models import WorkerRegistry

    if identity.pk is None:
        identity.pk = (
            WorkerRegistry.objects.filter(worker_id=identity.worker_id)
            .values_list("pk", flat=True)
            .first()
        )
    return identity.pk


def _claim(
    task: Task, task_id: str, queue: str, identity: WorkerIdentity, require_alive: bool = False
) -> int | None:
    from .models import TaskQueue

    def claim() -> int | None:
        if identity.pk is None and _registered_pk(identity) is None:
            return -1  # not registered yet: run untracked rather than not at all
        assert identity.pk is not None
        return TaskQueue.objects.claim(
            task_id=task_id,
            task_name=task.name,
            queue=queue,
            worker_pk=identity.pk,
            incarnation=identity.incarnation,
            require_alive=require_alive,
        )

    try:
        token = dbthread.call(claim)
    except Exception:
        # The database is unreachable: run the task untracked rather than not at all.
        logger.warning(
            "worker_health: could not claim %s; running it untracked", task_id, exc_info=True
        )
        return -1
    if token is not None:
        _tokens[task_id] = token  # -1: untracked (see completions)
    return token


def _record_duplicate(task_id: str, identity: WorkerIdentity) -> None:
    from .models import EventKind, event

    dbthread.submit(
        lambda: event(EventKind.DUPLICATE_DELIVERY, worker_name=identity.worker_id, task_id=task_id)
    )


FINAL_STATUS = {
    states.SUCCESS: "succeeded",
    states.FAILURE: "failed",
    states.REJECTED: "failed",
    states.IGNORED: "succeeded",
}


def on_task_postrun(
    sender: Task | None = None, task_id: str | None = None, state: str | None = None, **_: Any
) -> None:
    if task_id is None:
        return
    token = _tokens.pop(task_id, None)
    if token is None:
        return
    if task_id in _requeued:
        _requeued.discard(task_id)
        return  # retried / replaced: the row is queued for the next run
    status = FINAL_STATUS.get(state or "", "failed")
    request = sender.request if sender is not None else None
    identity = identity_for(getattr(request, "hostname", None))
    completions.add(
        completions.Completion(
            task_id=task_id,
            token=token,
            status=status,
            state=state or "",
            worker_id=identity.worker_id if identity else "",
        )
    )


def on_worker_process_shutdown(**_: Any) -> None:
    """A pool process exits: write the completions it still holds."""
    completions.flush(timeout=10.0)


# --------------------------------------------------------------------------------------------
# wiring


def requeue_on_replace(task: Task, sig: Any) -> Any:
    """Installed as ``on_replace``: ``Task.replace`` hands this task's id to its replacement.

    The replacement runs under the same id, but not necessarily now: when it is a chain (or
    a group, which Celery turns into a chord) the id goes to its *last* task, published
    only when the tasks before it are done. The row goes back to ``queued`` before anything
    is published, so that delivery is claimed as a new run and not skipped as a duplicate
    of this one; ``task_postrun`` then leaves the row alone (``_requeued``).
    """
    request = task.request
    task_id: str | None = request.id
    token = _tokens.get(task_id) if task_id else None
    if task_id and token is not None and not request.is_eager and task_id not in _requeued:
        _requeue_own(task_id, token)
    original = getattr(type(task), "_worker_health_original_on_replace")  # noqa: B009
    return original(task, sig)


def install_claim_hooks(sender: WorkController, **_: Any) -> None:
    """``worker_init``: give every tracked task a ``before_start`` that claims it, and an
    ``on_replace`` that requeues it for its replacement.

    Done on the task classes before the pool starts, so prefork children inherit it and
    Celery builds its tracers with it. A task's own ``before_start`` and ``on_replace``
    still run after.
    """
    for task in sender.app.tasks.values():
        if task.name.startswith(OWN_TASK_PREFIX):
            continue
        cls = type(task)
        if cls.__dict__.get("_worker_health_claims"):
            continue
        current = cls.before_start if task_has_custom(task, "before_start") else None
        if current is claim_before_start:  # inherited from a task class hooked before
            current = cls._worker_health_original_before_start
        cls._worker_health_original_before_start = current
        cls.before_start = claim_before_start
        on_replace = cls.on_replace
        if on_replace is requeue_on_replace:
            on_replace = cls._worker_health_original_on_replace
        cls._worker_health_original_on_replace = on_replace
        cls.on_replace = requeue_on_replace
        cls._worker_health_claims = True
