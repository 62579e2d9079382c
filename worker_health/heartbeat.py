"""The heartbeat: registration, a thread in the worker's main process, and its bootstep.

The heart runs on a thread of its own with its own database connection, so it keeps beating
while every pool slot runs a long task (prefork, threads and solo alike), while the broker is
unreachable, and while Celery's event loop is blocked. It never touches the broker.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import celery
from celery import bootsteps
from django.db import DatabaseError, InterfaceError, close_old_connections, connections

from . import dbthread
from .conf import settings
from .durability import relax_connection
from .querysets import SWEEP_SPACING, db_now_minus

if TYPE_CHECKING:
    from celery.worker import WorkController

logger = logging.getLogger("worker_health")


@dataclass
class WorkerIdentity:
    """Who this worker is, for this start of its process."""

    worker_id: str
    incarnation: uuid.UUID
    metadata: dict[str, Any]
    pk: int | None = None
    heart: Heart | None = field(default=None, repr=False)


#: identities of the workers running in this process, by node name (one, except in tests
#: that start several in-thread workers). Prefork children inherit it through fork.
_identities: dict[str, WorkerIdentity] = {}


def identity_for(hostname: str | None) -> WorkerIdentity | None:
    if hostname and hostname in _identities:
        return _identities[hostname]
    if len(_identities) == 1:
        return next(iter(_identities.values()))
    return None


def in_worker_process() -> bool:
    """Is this a worker's main or pool process (or a process running an in-thread worker)?"""
    return bool(_identities)


def worker_metadata(worker: WorkController, incarnation: uuid.UUID) -> dict[str, Any]:
    pool = getattr(worker, "pool_cls", None)
    pool_name = pool if isinstance(pool, str) else getattr(pool, "__module__", repr(pool))
    queues = []
    try:
        queues = sorted(q.name for q in worker.app.amqp.queues.consume_from.values())
    except Exception:  # pragma: no cover - queues are informational
        queues = []
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pool": str(pool_name).rsplit(".", 1)[-1],
        "concurrency": getattr(worker, "concurrency", None),
        "queues": queues,
        "celery_version": celery.__version__,
        "python_version": platform.python_version(),
        "incarnation": str(incarnation),
        "argv": sys.argv[:8],
    }


def tasks_processed() -> int:
    """Tasks this process's worker finished, from Celery's own in-memory counters."""
    from celery.worker import state

    return max(0, state.all_total_count[0] - len(state.active_requests))


def measure_clock_skew() -> float | None:
    """This host's clock minus the database's, in seconds (informational)."""
    from django.db import connection

    sql = (
        "SELECT STRFTIME('%Y-%m-%d %H:%M:%f', 'now')"
        if connection.vendor == "sqlite"
        else "SELECT CURRENT_TIMESTAMP"
    )
    before = time.time()
    with connection.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    after = time.time()
    if not row or row[0] is None:
        return None
    db_time = row[0]
    if isinstance(db_time, str):
        db_time = datetime.fromisoformat(db_time)
    if db_time.tzinfo is None:
        db_time = db_time.replace(tzinfo=timezone.utc)
    return round((before + after) / 2 - db_time.timestamp(), 3)


def register(identity: WorkerIdentity) -> None:
    """Write the worker's row; reclaim what a previous incarnation of this name held."""
    from . import reclaim
    from .models import EventKind, WorkerRegistry, event
    from .signals import worker_registered

    skew = measure_clock_skew()
    registration = WorkerRegistry.objects.register(
        identity.worker_id,
        incarnation=identity.incarnation,
        metadata=identity.metadata,
        clock_skew=skew,
    )
    identity.pk = registration.worker.pk
    restarted = registration.previous_incarnation is not None
    event(
        EventKind.WORKER_RESTARTED if restarted else EventKind.WORKER_REGISTERED,
        worker=registration.worker,
        incarnation=str(identity.incarnation),
        previous_incarnation=str(registration.previous_incarnation or ""),
        previous_status=registration.previous_status or "",
        clock_skew=skew,
    )
    logger.info(
        "worker_registered",
        extra={"worker_id": identity.worker_id, "incarnation": str(identity.incarnation)},
    )
    worker_registered.send_robust(
        sender=WorkerRegistry, worker=registration.worker, restarted=restarted
    )
    if restarted:
        # Fast path: the previous start of this node name is gone for sure.
        reclaim.reclaim_tasks_of(registration.worker, reason="restarted")


class Sweeper:
    """Runs this worker's share of the detector's sweeps on a thread of its own, with its own
    database connection (PostgreSQL's own plans: the sweeps are set-based). A sweep can take
    long (a reclaim that publishes thousands of tasks, a slow or starved database); on the
    heart's thread it would delay the worker's own heartbeats past ``STALE_AFTER`` and get
    the worker that sweeps failed by another detector."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._due = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def poke(self) -> None:
        """Sweep soon (at once unless a sweep is running; the sweep's lease in the database
        spaces sweeps across every detector anyway)."""
        if self._stopped:
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"worker-health-sweep[{self.worker_id}]", daemon=True
            )
            self._thread.start()
        self._due.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped = True
        self._due.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        from . import reclaim

        try:
            while True:
                self._due.wait()
                self._due.clear()
                if self._stopped:
                    return
                try:
                    relax_connection(index_plans=False)
                    reclaim.sweep(who=self.worker_id)
                except (DatabaseError, InterfaceError):
                    dbthread.drop_connections()  # the heart reports outages; next poke reconnects
                except Exception:
                    logger.exception("worker_health: detector sweep failed")
        finally:
            connections.close_all()


class Heart:
    """Writes a heartbeat every ``HEARTBEAT_INTERVAL`` and takes part in detection (its
    :class:`Sweeper` sweeps)."""

    def __init__(self, identity: WorkerIdentity) -> None:
        self.identity = identity
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage_started: float | None = None
        self._last_sweep_try = 0.0
        #: the last heartbeat saw no sweep within the sweep spacing (True until it has said)
        self._sweep_due = True
        self.sweeper = Sweeper(identity.worker_id)
        self.registered = identity.pk is not None
        self.beats = 0
        self.draining = False
        #: claimed runs the audit found missing from the worker's memory, and since when
        self._missing_since: dict[str, float] = {}

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"worker-health-heart[{self.identity.worker_id}]", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.sweeper.stop(timeout=min(timeout, 5.0))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        delay = 0.0
        retry = 0.2
        try:
            while not self._stop.wait(delay):
                if self.beat_once():
                    retry = 0.2
                    delay = settings.HEARTBEAT_INTERVAL
                    self._audit_claims()
                    self._maybe_sweep()
                else:
                    delay = min(retry, settings.HEARTBEAT_RETRY_MAX)
                    retry *= 2
        finally:
            connections.close_all()

    def beat_once(self) -> bool:
        """One heartbeat. Never raises: a database error returns False (retried)."""
        try:
            # The heart's connection persists (whatever CONN_MAX_AGE says): a beat is one
            # statement, not a new connection; a database error closes it (_on_db_error).
            # Default plans: this connection also runs the detector's sweeps.
            relax_connection(index_plans=False)
            if not self.registered:
                register(self.identity)
                self.registered = True
            else:
                self._write_heartbeat()
        except (DatabaseError, InterfaceError) as exc:
            self._on_db_error(exc)
            return False
        except Exception:
            logger.exception(
                "worker_health heartbeat failed", extra={"worker_id": self.identity.worker_id}
            )
            return False
        self.beats += 1
        if self._outage_started is not None:
            logger.warning(
                "worker_health: database reachable again after %.1f s; heartbeats resumed",
                time.monotonic() - self._outage_started,
                extra={"worker_id": self.identity.worker_id},
            )
            self._outage_started = None
        return True

    def _write_heartbeat(self) -> None:
        from .models import WorkerRegistry
        from .signals import worker_recovered

        ident = self.identity
        processed = tasks_processed()
        beat = WorkerRegistry.objects.beat(
            ident.worker_id,
            ident.incarnation,
            processed,
            sweep_spacing=settings.CHECK_INTERVAL * SWEEP_SPACING,
        )
        self._sweep_due = beat.sweep_due
        if beat.written:
            return
        row = (
            WorkerRegistry.objects.filter(worker_id=ident.worker_id)
            .values("incarnation", "status")
            .first()
        )
        if row is None:  # deleted by an operator: register again
            register(ident)
            return
        if row["incarnation"] != ident.incarnation:
            # Our node name was taken by a newer start of the worker: we are the old one.
            logger.error(
                "worker_health: node name %s is registered by another incarnation (%s); this "
                "process (%s) keeps running but its claims were handed over",
                ident.worker_id,
                row["incarnation"],
                ident.incarnation,
                extra={"worker_id": ident.worker_id},
            )
            return
        if row["status"] == "offline":
            # An operator drained this worker: keep beating while it finishes, and shut
            # down warmly (once) as if it had been sent SIGTERM.
            WorkerRegistry.objects.beat_draining(ident.worker_id, ident.incarnation, processed)
            if not self.draining:
                self.draining = True
                logger.warning(
                    "worker_health: %s was marked offline; shutting down warmly",
                    ident.worker_id,
                    extra={"worker_id": ident.worker_id},
                )
                request_warm_shutdown()
            return
        worker = WorkerRegistry.objects.recover(ident.worker_id, ident.incarnation, processed)
        if worker is not None:
            logger.warning(
                "worker_recovered: %s heartbeats again after it was marked %s; the tasks it "
                "held were reclaimed and its late results are fenced off",
                ident.worker_id,
                row["status"],
                extra={"worker_id": ident.worker_id, "previous_status": row["status"]},
            )
            worker_recovered.send_robust(sender=WorkerRegistry, worker=worker)

    def _on_db_error(self, exc: BaseException) -> None:
        dbthread.drop_connections()
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            logger.warning(
                "worker_health: cannot write heartbeat (%s); retrying with back-off until the "
                "database answers",
                exc,
                extra={"worker_id": self.identity.worker_id},
            )

    def _audit_claims(self) -> None:
        """Reclaim now the runs of this worker that its pool lost (a pool process killed
        mid-task, also when ``acks_late`` + ``reject_on_worker_lost`` means Celery sends no
        ``task_failure``): claimed in the database, but no longer in the worker's memory."""
        from celery.worker import state

        from . import completions, gate, reclaim
        from .models import TaskQueue

        ident = self.identity
        if ident.pk is None:
            return
        grace = max(2.0, settings.HEARTBEAT_INTERVAL)
        try:
            claimed = set(
                TaskQueue.objects.filter(
                    claimed_by=ident.pk,
                    claimed_incarnation=ident.incarnation,
                    status="claimed",
                    claimed_at__lt=db_now_minus(grace),
                ).values_list("task_id", flat=True)
            )
            if not claimed:
                return
            # Two looks, ``grace`` apart: a run's completion is written behind it (see
            # completions.py), so a run that just ended may still be ``claimed`` for a
            # moment after it left the worker's memory; and a completion that could not be
            # written (database down) is retried meanwhile.
            # Not ``state.requests``: Celery's Consumer.on_close (broker connection lost)
            # clears the reserved requests (the pool drops the ones it had not started)
            # but leaves them in ``requests``, where they would look alive forever.
            gate_ = gate.gate_for(ident)
            in_memory = {
                *(r.id for r in list(state.active_requests)),
                *(r.id for r in list(state.reserved_requests)),
                *(gate_.in_flight() if gate_ is not None else ()),
            }
            missing = claimed - in_memory
            now = time.monotonic()
            patience = max(grace, completions.RETRY_MAX + 2.0)
            lost = {t for t in missing if now - self._missing_since.get(t, now) >= patience}
            self._missing_since = {t: self._missing_since.get(t, now) for t in missing - lost}
            if lost:
                reclaim.reclaim(
                    TaskQueue.objects.filter(
                        task_id__in=lost,
                        claimed_by=ident.pk,
                        claimed_incarnation=ident.incarnation,
                    ),
                    reason="worker process lost",
                    worker_name=ident.worker_id,
                )
        except (DatabaseError, InterfaceError) as exc:
            self._on_db_error(exc)
        except Exception:
            logger.exception("worker_health: claim audit failed")

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if not self._sweep_due or now - self._last_sweep_try < settings.CHECK_INTERVAL * 0.5:
            return
        self._last_sweep_try = now
        self.sweeper.poke()


# --------------------------------------------------------------------------------------------
# wiring into the worker


def on_worker_init(sender: Any, **_: Any) -> None:
    """``worker_init``: identify the worker and add the heartbeat bootstep."""
    incarnation = uuid.uuid4()
    identity = WorkerIdentity(
        worker_id=sender.hostname,
        incarnation=incarnation,
        metadata=worker_metadata(sender, incarnation),
    )
    _identities[sender.hostname] = identity
    identity.heart = Heart(identity)
    sender.app.steps["worker"].add(HeartbeatStep)
    from .gate import GateStep

    sender.app.steps["worker"].add(GateStep)


def register_and_beat(identity: WorkerIdentity) -> None:
    """Register the worker and start its heart, together, once its pool is up (the
    consumer, and with it the first task, comes after). Registering earlier, at
    ``worker_init``, would leave the time the pool takes to start between the registration
    and the first heartbeat: a start slower than ``STALE_AFTER`` got the worker failed
    before it had run anything. If the database is down the heart registers as soon as it
    answers."""
    assert identity.heart is not None
    if not identity.heart.registered:
        try:
            register(identity)
            identity.heart.registered = True
        except Exception as exc:
            logger.warning(
                "worker_health: could not register %s yet (%s); will retry",
                identity.worker_id,
                exc,
            )
        finally:
            # Pool processes forked later (replacements) must not inherit this connection.
            connections.close_all()
    identity.heart.start()


def request_warm_shutdown() -> None:
    """Ask this process's worker to shut down warmly, as its SIGTERM handler does."""
    from celery.worker import state

    state.should_stop = 0  # type: ignore[assignment]


def on_worker_shutdown(sender: Any, **_: Any) -> None:
    """``worker_shutdown`` (warm): running tasks are done; hand back the rest, go offline."""
    identity = _identities.get(getattr(sender, "hostname", ""))
    if identity is not None:
        stop_worker(identity, cold=False)


def stop_worker(identity: WorkerIdentity, *, cold: bool) -> None:
    from celery.worker import state

    from . import completions, drain, gate, reclaim

    if identity.heart is not None:
        identity.heart.stop()
    try:
        close_old_connections()
        # Received and never started: claimed by the gate but not passed on, or left in
        # the pool's queue when it stopped (never the running ones, should this signal come
        # before the pool has drained). Finished runs are written first.
        running = {r.id for r in list(state.active_requests)}
        unfinished = set(gate.uninstall(identity)) | (set(list(state.requests)) - running)
        completions.flush(timeout=10.0)
        reclaim.hand_back(identity, include_running=cold, unfinished=unfinished)
        drain.mark_offline(identity.worker_id, identity.incarnation, cold=cold)
    except Exception:
        logger.exception("worker_health: could not mark %s offline", identity.worker_id)
    finally:
        _identities.pop(identity.worker_id, None)
        close_old_connections()


class HeartbeatStep(bootsteps.StartStopStep):
    """Registers the worker and starts its heart once the pool is up; a cold shutdown
    stops it."""

    label = "worker-health heartbeat"
    requires = ("celery.worker.components:Pool",)

    def create(self, w: Any) -> Any:
        self._identity = _identities.get(w.hostname)
        return self

    # StartStopStep calls these on ``self.obj``, which ``create`` made ``self``.
    def start(self, parent: Any = None) -> None:
        if self._identity is not None and self._identity.heart is not None:
            register_and_beat(self._identity)

    def stop(self, parent: Any = None) -> None:
        # Warm shutdown: keep beating while the pool drains; ``worker_shutdown`` ends it.
        pass

    def terminate(self, parent: Any = None) -> None:
        if self._identity is not None and self._identity.worker_id in _identities:
            stop_worker(self._identity, cold=True)
