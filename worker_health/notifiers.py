"""Alerts: tell a person when a worker dies or a task is quarantined.

Configured with ``WORKER_HEALTH_NOTIFIERS``, a list of dotted paths or of dicts with a
``"class"`` key and the notifier's options::

    WORKER_HEALTH_NOTIFIERS = [
        "worker_health.notifiers.EmailNotifier",            # mail_admins()
        {"class": "worker_health.notifiers.WebhookNotifier",
         "url": "https://hooks.example.com/celery", "timeout": 5, "retries": 3},
        {"class": "worker_health.notifiers.LoggingNotifier", "level": "ERROR"},
    ]
    WORKER_HEALTH_ALERT_ON = ["worker_failed", "task_quarantined"]   # the default

The receivers (connected in ``AppConfig.ready()``) only turn a signal into an :class:`Alert`
and queue it: a background thread sends it, so a slow or failing notifier never delays or
breaks detection and reclamation. The signals are sent once per state transition, so there
is one alert per worker failure or quarantine, not one per detector sweep; the thread also
drops an alert it has already sent (same key) and sends at most ``ALERT_RATE_LIMIT`` alerts
per ``ALERT_WINDOW`` seconds: the rest of a mass failure is folded into one summary alert
at the end of the window. Every alert sent is recorded as an ``alert_sent`` event.

A notifier is a class whose constructor takes its options as keyword arguments and whose
``send(alert)`` delivers one alert, raising on failure.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from django.core.mail import mail_admins
from django.db import close_old_connections
from django.dispatch import Signal
from django.utils.module_loading import import_string

from . import signals
from .conf import ALERT_SIGNALS, settings

logger = logging.getLogger("worker_health.alerts")


@dataclass(frozen=True)
class Alert:
    """One thing a person should hear about."""

    #: the signal's name (``worker_failed``, ``task_quarantined``, ...) or ``summary``
    kind: str
    subject: str
    message: str
    worker_id: str = ""
    task_id: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    #: identifies the transition this alert is about; an alert with a key already sent is
    #: dropped (empty: never deduplicated)
    key: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("key")
        return data


# --------------------------------------------------------------------------------------------
# notifiers


class Notifier:
    """Base class: takes no options; subclasses implement :meth:`send`."""

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"unexpected option(s): {', '.join(sorted(options))}")

    def send(self, alert: Alert) -> None:
        raise NotImplementedError

    def __str__(self) -> str:
        return type(self).__name__


class EmailNotifier(Notifier):
    """E-mail to ``settings.ADMINS`` through Django's ``mail_admins``."""

    def send(self, alert: Alert) -> None:
        mail_admins(alert.subject, alert.message, fail_silently=False)


class LoggingNotifier(Notifier):
    """A log record on the ``worker_health.alerts`` logger (or ``logger``)."""

    def __init__(self, logger: str = "worker_health.alerts", level: str | int = "WARNING") -> None:
        self.logger = logging.getLogger(logger)
        self.level = level if isinstance(level, int) else logging.getLevelName(level.upper())
        if not isinstance(self.level, int):
            raise ValueError(f"unknown logging level {level!r}")

    def send(self, alert: Alert) -> None:
        self.logger.log(
            self.level,
            "%s: %s",
            alert.subject,
            alert.message,
            extra={"alert": alert.kind, "worker_id": alert.worker_id, "task_id": alert.task_id},
        )


class WebhookNotifier(Notifier):
    """POSTs the alert as JSON; retries with exponential back-off on network errors, 429 and
    5xx answers, never waiting longer than ``timeout`` for one attempt."""

    sleep: Callable[[float], None] = staticmethod(time.sleep)

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 1.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) URL, got {url!r}")
        if not (isinstance(timeout, (int, float)) and 0 < timeout <= 60):
            raise ValueError(f"timeout must be a number of seconds in (0, 60], got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, got {retries!r}")
        self.url = url
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.headers = {"Content-Type": "application/json", **(headers or {})}

    def send(self, alert: Alert) -> None:
        body = json.dumps(alert.as_dict(), default=str).encode()
        attempt = 0
        while True:
            try:
                self._post(body)
                return
            except Exception as exc:
                if attempt >= self.retries or not self._retryable(exc):
                    raise
                delay = min(self.backoff * 2**attempt, 30.0)
                logger.info("webhook %s failed (%s); retrying in %.1f s", self.url, exc, delay)
                attempt += 1
                self.sleep(delay)

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            response.read(1024)

    @staticmethod
    def _retryable(exc: Exception) -> bool:
        if isinstance(exc, urllib.error.HTTPError):
            return exc.code == 429 or exc.code >= 500
        return isinstance(exc, (urllib.error.URLError, TimeoutError, ConnectionError, OSError))

    def __str__(self) -> str:
        return f"WebhookNotifier({self.url})"


def configured_notifiers() -> list[Notifier]:
    """Instances of ``WORKER_HEALTH_NOTIFIERS``; one that cannot be built is logged and skipped."""
    notifiers = []
    for path, options in settings.NOTIFIERS:
        try:
            notifiers.append(import_string(path)(**options))
        except Exception:
            logger.exception("worker_health: cannot build notifier %s", path)
    return notifiers


# --------------------------------------------------------------------------------------------
# signals -> alerts


def _iso(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value or "")


def _worker_details(worker: Any) -> dict[str, Any]:
    meta = worker.metadata or {}
    return {
        "host": meta.get("host"),
        "pid": meta.get("pid"),
        "status": worker.status,
        "last_heartbeat": _iso(worker.last_heartbeat),
        "status_changed_at": _iso(worker.status_changed_at),
    }


def worker_failed_alert(worker: Any, last_heartbeat: Any = None, **_: Any) -> Alert:
    details = _worker_details(worker)
    return Alert(
        kind="worker_failed",
        subject=f"Celery worker {worker.worker_id} failed",
        message=(
            f"{worker.worker_id} (host {details['host']}, pid {details['pid']}) missed its "
            f"heartbeats: last one at {_iso(last_heartbeat) or 'never'}, stale after "
            f"{settings.STALE_AFTER:g} s. The tasks it held are being reclaimed."
        ),
        worker_id=worker.worker_id,
        details=details,
        key=f"worker_failed:{worker.worker_id}:{details['status_changed_at']}",
    )


def worker_recovered_alert(worker: Any, **_: Any) -> Alert:
    details = _worker_details(worker)
    return Alert(
        kind="worker_recovered",
        subject=f"Celery worker {worker.worker_id} recovered",
        message=f"{worker.worker_id} heartbeats again after it was declared failed or offline.",
        worker_id=worker.worker_id,
        details=details,
        key=f"worker_recovered:{worker.worker_id}:{details['status_changed_at']}",
    )


def worker_offline_alert(worker: Any, **_: Any) -> Alert:
    details = _worker_details(worker)
    return Alert(
        kind="worker_offline",
        subject=f"Celery worker {worker.worker_id} went offline",
        message=f"{worker.worker_id} shut down or was drained.",
        worker_id=worker.worker_id,
        details=details,
        key=f"worker_offline:{worker.worker_id}:{details['status_changed_at']}",
    )


def worker_registered_alert(worker: Any, restarted: bool = False, **_: Any) -> Alert:
    details = {**_worker_details(worker), "restarted": restarted}
    verb = "restarted" if restarted else "started"
    return Alert(
        kind="worker_registered",
        subject=f"Celery worker {worker.worker_id} {verb}",
        message=f"{worker.worker_id} {verb} (incarnation {worker.incarnation}).",
        worker_id=worker.worker_id,
        details=details,
        key=f"worker_registered:{worker.worker_id}:{worker.incarnation}",
    )


def task_quarantined_alert(task: Any, worker_id: str = "", **_: Any) -> Alert:
    from .reclaim import quarantine_message

    if task is None:
        return Alert(
            kind="task_quarantined",
            subject="A task was quarantined",
            message=f"A task lost on {worker_id} was quarantined (its row is gone).",
            worker_id=worker_id,
        )
    return Alert(
        kind="task_quarantined",
        subject=f"Task {task.task_name}[{task.task_id}] quarantined",
        message=quarantine_message(task.task_name, task.lost_on or []),
        worker_id=worker_id,
        task_id=task.task_id,
        details={
            "task_name": task.task_name,
            "reclaim_count": task.reclaim_count,
            "lost_on": list(task.lost_on or []),
        },
        key=f"task_quarantined:{task.task_id}:{task.reclaim_count}:{_iso(task.finished_at)}",
    )


def task_reclaimed_alert(task: Any, worker_id: str = "", reason: str = "", **_: Any) -> Alert:
    return Alert(
        kind="task_reclaimed",
        subject=f"Task {task.task_name}[{task.task_id}] reclaimed from {worker_id}",
        message=f"{task.task_name}[{task.task_id}] was taken from {worker_id} ({reason}) and "
        f"published again (reclaimed {task.reclaim_count} time(s)).",
        worker_id=worker_id,
        task_id=task.task_id,
        details={
            "task_name": task.task_name,
            "reason": reason,
            "reclaim_count": task.reclaim_count,
        },
        key=f"task_reclaimed:{task.task_id}:{_iso(task.reclaimed_at)}",
    )


def stale_completion_alert(
    task_id: str = "", worker_id: str = "", token: Any = None, state: str = "", **_: Any
) -> Alert:
    return Alert(
        kind="stale_completion",
        subject=f"Late completion of {task_id} ignored",
        message=f"{worker_id} finished {task_id} ({state}) with fencing token {token} after the "
        "task had been reclaimed; the result was not recorded.",
        worker_id=worker_id,
        task_id=task_id,
        details={"token": token, "state": state},
        key=f"stale_completion:{task_id}:{token}",
    )


ALERT_BUILDERS: dict[str, Callable[..., Alert]] = {
    "worker_registered": worker_registered_alert,
    "worker_failed": worker_failed_alert,
    "worker_recovered": worker_recovered_alert,
    "worker_offline": worker_offline_alert,
    "task_reclaimed": task_reclaimed_alert,
    "task_quarantined": task_quarantined_alert,
    "stale_completion": stale_completion_alert,
}


def _receiver_for(name: str) -> Callable[..., None]:
    def receive(sender: Any = None, **kwargs: Any) -> None:
        # Runs inside detection / reclamation: never raise, never block.
        try:
            if not settings.NOTIFIERS or name not in settings.ALERT_ON:
                return
            dispatcher.submit(ALERT_BUILDERS[name](**kwargs))
        except Exception:
            logger.exception("worker_health: could not queue the %s alert", name)

    receive.__name__ = f"alert_on_{name}"
    return receive


def signal_receivers() -> list[tuple[Signal, Callable[..., None], str]]:
    """``(signal, receiver, dispatch_uid suffix)`` for every signal that can raise an alert."""
    return [(getattr(signals, name), _receiver_for(name), name) for name in ALERT_SIGNALS]


# --------------------------------------------------------------------------------------------
# delivery


_FLUSH = object()


class AlertDispatcher:
    """Deduplicates, rate-limits and delivers alerts, on a thread of its own by default.

    ``background=False`` delivers in the caller's thread (for tests and for tools that
    want to wait); the rate-limit state is only touched by one thread either way.
    """

    def __init__(
        self, *, background: bool = True, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.background = background
        self.clock = clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._start_lock = threading.Lock()
        self._window_started: float | None = None
        self._sent_in_window = 0
        self._folded: list[Alert] = []
        self._seen: dict[str, float] = {}

    # -- entry points ---------------------------------------------------------------------
    def submit(self, alert: Alert) -> None:
        """Queue ``alert``; returns at once."""
        if not self.background:
            self.process(alert)
            return
        self._ensure_thread()
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            logger.error("worker_health: alert queue full, dropping alert %r", alert.subject)

    def flush(self, timeout: float = 10.0) -> bool:
        """Send any folded summary now and wait for the queue to drain; False on timeout."""
        if not self.background or self._thread is None or self._pid != os.getpid():
            self._send_summary()
            return True
        try:
            self._queue.put_nowait(_FLUSH)
        except queue.Full:
            return False
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    # -- the decisions --------------------------------------------------------------------
    def process(self, alert: Alert) -> None:
        """Dedup, rate limit, deliver. Never raises."""
        try:
            now = self.clock()
            self.tick(now)
            if alert.key:
                if alert.key in self._seen:
                    logger.debug("worker_health: alert %s already sent", alert.key)
                    return
                self._seen[alert.key] = now
            if self._window_started is None:
                self._window_started = now
            if self._sent_in_window < settings.ALERT_RATE_LIMIT:
                self._sent_in_window += 1
                self.deliver(alert)
            else:
                self._folded.append(alert)
        except Exception:
            logger.exception("worker_health: could not process alert %r", alert.subject)

    def tick(self, now: float | None = None) -> None:
        """End the rate-limit window if it is over: send the summary of what was folded."""
        now = self.clock() if now is None else now
        window = settings.ALERT_WINDOW
        if self._window_started is not None and now - self._window_started >= window:
            self._send_summary()
            self._window_started = None
            self._sent_in_window = 0
        horizon = now - max(window, 3600.0)
        if len(self._seen) > 1000 or (self._seen and min(self._seen.values()) < horizon):
            self._seen = {k: t for k, t in self._seen.items() if t >= horizon}

    def seconds_to_window_end(self) -> float | None:
        if self._window_started is None:
            return None
        return max(0.0, self._window_started + settings.ALERT_WINDOW - self.clock())

    def _send_summary(self) -> None:
        folded, self._folded = self._folded, []
        if folded:
            self.deliver(summary_alert(folded))

    def deliver(self, alert: Alert) -> None:
        """Call every notifier (each failure logged), then record an ``alert_sent`` event."""
        delivered: list[str] = []
        failed: dict[str, str] = {}
        for notifier in configured_notifiers():
            try:
                notifier.send(alert)
                delivered.append(str(notifier))
            except Exception as exc:
                failed[str(notifier)] = f"{type(exc).__name__}: {exc}"[:500]
                logger.exception(
                    "worker_health: notifier %s failed for %r", notifier, alert.subject
                )
        record_alert_sent(alert, delivered, failed)

    # -- the thread -----------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if self._thread is not None and self._thread.is_alive() and self._pid == pid:
            return
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive() and self._pid == pid:
                return
            if self._pid != pid:  # forked: the parent's queue and thread are not ours
                self._queue = queue.Queue(maxsize=10_000)
                if not self._pid:
                    atexit.register(self.flush, 5.0)
            self._pid = pid
            self._thread = threading.Thread(
                target=self._run, name="worker-health-alerts", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            wait = self.seconds_to_window_end()
            try:
                item = self._queue.get(timeout=None if wait is None else wait + 0.01)
            except queue.Empty:
                self.tick()
                continue
            # This thread owns its database connection: drop it if stale, close it when idle.
            close_old_connections()
            try:
                if item is _FLUSH:
                    self._send_summary()
                else:
                    self.process(item)
            finally:
                close_old_connections()
                self._queue.task_done()


SUMMARY_LABELS = {
    "worker_registered": "worker starts",
    "worker_failed": "failed workers",
    "worker_recovered": "recovered workers",
    "worker_offline": "workers offline",
    "task_reclaimed": "reclaimed tasks",
    "task_quarantined": "quarantined tasks",
    "stale_completion": "stale completions",
}


def summary_alert(folded: list[Alert]) -> Alert:
    counts = Counter(a.kind for a in folded)
    what = ", ".join(f"{SUMMARY_LABELS.get(kind, kind)}: {n}" for kind, n in sorted(counts.items()))
    lines = [a.subject for a in folded[:50]]
    if len(folded) > 50:
        lines.append(f"... and {len(folded) - 50} more")
    return Alert(
        kind="summary",
        subject=f"{len(folded)} more worker health alerts: {what}",
        message=(
            f"The alert rate limit ({settings.ALERT_RATE_LIMIT} per "
            f"{settings.ALERT_WINDOW:g} s) folded these alerts into one:\n" + "\n".join(lines)
        ),
        details={
            "folded": len(folded),
            "kinds": dict(counts),
            "workers": sorted({a.worker_id for a in folded if a.worker_id})[:200],
            "tasks": [a.task_id for a in folded if a.task_id][:200],
        },
    )


def record_alert_sent(alert: Alert, delivered: list[str], failed: dict[str, str]) -> None:
    from .models import EventKind, event

    try:
        event(
            EventKind.ALERT_SENT,
            worker_name=alert.worker_id,
            task_id=alert.task_id,
            alert=alert.kind,
            subject=alert.subject,
            delivered=delivered,
            failed=failed,
            **({"folded": alert.details.get("folded")} if alert.kind == "summary" else {}),
        )
    except Exception:
        logger.exception("worker_health: could not record the alert_sent event")


#: the process's dispatcher, used by the signal receivers
dispatcher = AlertDispatcher()
