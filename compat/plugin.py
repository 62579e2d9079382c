"""pytest plugin of the gate's second run (``-p compat.plugin``): Celery's suite with
worker_health installed.

Before the session (``pytest_configure``, long before Celery's session worker starts) it

* creates a PostgreSQL database of its own (``wh_compat`` by default; dropped and created
  afresh), configures Django with ``worker_health`` (and ``django_celery_results`` when it is
  installed) and migrates it;
* calls ``django.setup()``, whose ``AppConfig.ready()`` connects worker_health's receivers
  to Celery's signals: every publish, receipt, run and failure of the suite goes through
  them, with tracking on for every task and heartbeats every second.

During the run it notes, per test, what worker_health decided that could change what
Celery does (a delivery skipped as a duplicate, a reclaim, a fenced completion, a worker
declared failed), and at the end a summary of the tracking tables. The report (written by
:mod:`compat.harness`) thus says *why* a test behaves differently, not only *that* it does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pytest

from .harness import annotate, session_extra

T = TypeVar("T")

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/wh_compat"

#: worker_health settings of the run: every task tracked, short intervals
WORKER_HEALTH_SETTINGS: dict[str, Any] = {
    "WORKER_HEALTH_TRACK_TASKS": None,
    "WORKER_HEALTH_HEARTBEAT_INTERVAL": 1,
    "WORKER_HEALTH_STALE_AFTER": 3,
    "WORKER_HEALTH_CHECK_INTERVAL": 1,
}

#: events that mean worker_health changed (or could have changed) what Celery does
NOTABLE_EVENTS = (
    "duplicate_delivery",
    "stale_completion",
    "task_reclaimed",
    "task_quarantined",
    "worker_failed",
    "worker_recovered",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("compat-worker-health", "compatibility gate: worker_health run")
    group.addoption(
        "--wh-database-url",
        default=os.environ.get("COMPAT_DATABASE_URL", DEFAULT_DATABASE_URL),
        help=f"PostgreSQL database created afresh for the run (default {DEFAULT_DATABASE_URL})",
    )


def database_settings(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise pytest.UsageError(f"--wh-database-url must be a PostgreSQL URL, got {url!r}")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


def recreate_database(db: dict[str, Any]) -> None:
    """Drop and create the run's database (from the server's ``postgres`` database)."""
    import psycopg
    from psycopg import sql

    params = {
        "dbname": "postgres",
        "user": db["USER"],
        "password": db["PASSWORD"],
        "host": db["HOST"],
        "port": db["PORT"],
        "connect_timeout": "10",
    }
    conninfo = psycopg.conninfo.make_conninfo(**{k: v for k, v in params.items() if v})
    with psycopg.connect(conninfo, autocommit=True) as conn:
        name = sql.Identifier(db["NAME"])
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(name))


def installed_apps() -> list[str]:
    apps = ["django.contrib.contenttypes", "django.contrib.auth", "worker_health"]
    try:
        import django_celery_results  # noqa: F401
    except ImportError:
        pass
    else:
        apps.append("django_celery_results")
    return apps


def configure_django(database_url: str) -> None:
    import django
    from django.conf import settings
    from django.core.management import call_command

    db = database_settings(database_url)
    recreate_database(db)
    settings.configure(
        SECRET_KEY="worker-health-compat",
        USE_TZ=True,
        TIME_ZONE="UTC",
        INSTALLED_APPS=installed_apps(),
        DATABASES={"default": db},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        **WORKER_HEALTH_SETTINGS,
    )
    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    call_command("check", fail_level="ERROR")


def assert_receivers_connected() -> None:
    """The run is pointless unless worker_health listens to every signal it hooks into."""
    from celery import signals

    expected = {
        "before_task_publish": "worker_health.publish",
        "task_received": "worker_health.received",
        "task_postrun": "worker_health.postrun",
        "task_failure": "worker_health.failure",
        "worker_init": "worker_health.tracking.worker_init",
    }
    missing = []
    for name, uid in expected.items():
        signal = getattr(signals, name)
        if not any(key[0] == uid for key, _ in signal.receivers):
            missing.append(f"{name} ({uid})")
    if missing:
        raise pytest.UsageError(
            "worker_health's receivers are not connected: " + ", ".join(missing)
        )


class Observer:
    """Notes per test the worker_health events that could change Celery's behaviour."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.watermark = 0
        self.worker_inits: list[str] = []
        #: notable events by test, over all its attempts (Celery's reruns)
        self.events: dict[str, list[dict[str, Any]]] = {}

    def last_event_id(self) -> int:
        from worker_health.models import WorkerEvent

        return WorkerEvent.objects.order_by("-pk").values_list("pk", flat=True).first() or 0

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        hooked = sorted(
            name
            for name, task in sender.app.tasks.items()
            if type(task).__dict__.get("_worker_health_claims")
        )
        self.worker_inits.append(sender.hostname)
        session_extra(self.config).setdefault("worker_inits", []).append(
            {"hostname": sender.hostname, "tasks_hooked": len(hooked)}
        )

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        try:
            self.watermark = with_connection(self.last_event_id)
        except Exception as exc:  # diagnostics only: never fail a test for them
            annotate(self.config, nodeid, worker_health_error=repr(exc))

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        from worker_health.models import WorkerEvent

        def notable() -> list[dict[str, Any]]:
            rows = (
                WorkerEvent.objects.filter(pk__gt=self.watermark, kind__in=NOTABLE_EVENTS)
                .order_by("pk")
                .values("kind", "task_id", "worker_name", "details")
            )
            return [dict(row) for row in rows]

        try:
            events = with_connection(notable)
        except Exception as exc:
            annotate(self.config, nodeid, worker_health_error=repr(exc))
            return
        if events:
            self.events.setdefault(nodeid, []).extend(events)
            annotate(self.config, nodeid, worker_health_events=self.events[nodeid])

    def pytest_unconfigure(self) -> None:
        try:
            session_extra(self.config)["worker_health"] = with_connection(summary)
        except Exception as exc:
            session_extra(self.config)["worker_health"] = {"error": repr(exc)}


def with_connection(query: Callable[[], T]) -> T:
    """Run a query on this thread's connection; reconnect once if it was closed meanwhile
    (the worker's shutdown closes connections on its way out)."""
    from django.db import InterfaceError, OperationalError, connections

    try:
        return query()
    except (OperationalError, InterfaceError):
        connections.close_all()
        return query()


def summary() -> dict[str, Any]:
    """What worker_health recorded over the whole run."""
    from django.db.models import Count

    from worker_health.models import TaskQueue, WorkerEvent, WorkerRegistry

    def by(qs: Any, field: str) -> dict[str, int]:
        rows = qs.values(field).annotate(n=Count("pk")).order_by(field)
        return {str(row[field]): row["n"] for row in rows}

    return {
        "settings": {k: v for k, v in WORKER_HEALTH_SETTINGS.items()},
        "workers": by(WorkerRegistry.objects.all(), "status"),
        "tasks": by(TaskQueue.objects.all(), "status"),
        "tasks_total": TaskQueue.objects.count(),
        "task_names": len(set(TaskQueue.objects.values_list("task_name", flat=True))),
        "claims": sum(TaskQueue.objects.values_list("fencing_token", flat=True)),
        "events": by(WorkerEvent.objects.all(), "kind"),
        "notable_events": list(
            WorkerEvent.objects.filter(kind__in=NOTABLE_EVENTS)
            .order_by("pk")
            .values("kind", "task_id", "worker_name", "details")[:200]
        ),
    }


def pytest_configure(config: pytest.Config) -> None:
    from celery import signals

    configure_django(config.getoption("wh_database_url"))
    assert_receivers_connected()
    observer = Observer(config)
    config.pluginmanager.register(observer, "compat-worker-health-observer")
    signals.worker_init.connect(observer.on_worker_init, weak=False)
    session_extra(config)["django_apps"] = installed_apps()
