"""Real processes for integration tests: celery workers, beat and manage.py commands.

A :class:`Stack` is one database + one broker. The worker processes run the example project
(``example_project.settings``) pointed at the test database of the stack's alias and at a
queue of the test's own, so nothing is shared between tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from django.db import close_old_connections, connections

ROOT = Path(__file__).resolve().parents[2]
HOST = socket.gethostname()

T = TypeVar("T")

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")

FAST = {
    "WORKER_HEALTH_HEARTBEAT_INTERVAL": "1",
    "WORKER_HEALTH_STALE_AFTER": "3",
    "WORKER_HEALTH_CHECK_INTERVAL": "1",
}


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.2, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        close_old_connections()
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what or predicate}: last value {last!r}"
            )
        time.sleep(interval)


def database_url(alias: str, *, host: str | None = None, port: int | None = None) -> str:
    """URL of the *test* database behind ``alias`` (pytest-django has renamed it).

    ``host`` / ``port`` replace the server's address (PostgreSQL only), e.g. to send a
    process's connections through a TCP proxy the test owns.
    """
    s = connections[alias].settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    auth = s["USER"] or ""
    if s.get("PASSWORD"):
        auth += f":{s['PASSWORD']}"
    host = host or s["HOST"] or "127.0.0.1"
    port = port or s["PORT"] or 5432
    return f"postgres://{auth}@{host}:{port}/{s['NAME']}"


def database_address(alias: str) -> tuple[str, int]:
    """(host, port) of the PostgreSQL server behind ``alias``."""
    s = connections[alias].settings_dict
    return s["HOST"] or "127.0.0.1", int(s["PORT"] or 5432)


def db_now(alias: str) -> datetime:
    """The database server's current time (aware, UTC): the clock heartbeats are judged by."""
    conn = connections[alias]
    sql = (
        "SELECT STRFTIME('%Y-%m-%d %H:%M:%f', 'now')"
        if conn.vendor == "sqlite"
        else "SELECT CURRENT_TIMESTAMP"
    )
    with conn.cursor() as cursor:
        cursor.execute(sql)
        value = cursor.fetchone()[0]
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the process and everything it started (e.g. SIGSTOP / SIGCONT)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def count(self, text: str) -> int:
        """How many log records contain ``text``.

        A record printed by two handlers (the project's ``LOGGING`` handler and Celery's
        root handler) is counted once: lines are told apart by their timestamp.
        """
        stamps = set()
        for number, line in enumerate(self.log().splitlines()):
            if text in line:
                match = _TIMESTAMP.search(line)
                stamps.add(match.group(0) if match else f"line {number}")
        return len(stamps)

    def kill_group(self) -> None:
        """SIGKILL the process and everything it started (pool children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        """Warm shutdown (SIGTERM) and wait."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            return None

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Stack:
    """One database alias + one broker, with a queue of the test's own."""

    name: str
    alias: str
    broker_url: str
    workdir: Path
    queue: str = field(default_factory=lambda: f"wh-test-{uuid.uuid4().hex[:10]}")
    procs: list[Proc] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=lambda: dict(FAST))
    #: more queues of the test's own (see :meth:`new_queue`), deleted by :meth:`purge`
    extra_queues: list[str] = field(default_factory=list)

    # -- environment ------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("WORKER_HEALTH_", "CELERY_", "DJANGO_", "EXAMPLE_"))
            or k.startswith("WORKER_HEALTH_TEST_")
        }
        env.update(
            DJANGO_SETTINGS_MODULE="example_project.settings",
            DATABASE_URL=database_url(self.alias),
            CELERY_BROKER_URL=self.broker_url,
            EXAMPLE_BROKER_DIR=str(self.workdir / "broker"),
            EXAMPLE_VAR_DIR=str(self.workdir / "var"),
            EXAMPLE_QUEUE=self.queue,
            EXAMPLE_ACCEPT_PICKLE="1",
            C_FORCE_ROOT="1",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(ROOT),
        )
        env.update(self.settings)
        env.update(extra)
        return env

    def new_queue(self, label: str) -> str:
        """Another queue of the test's own (e.g. one per worker), purged at the end."""
        queue = f"{self.queue}-{label}"
        self.extra_queues.append(queue)
        return queue

    def spawn(self, name: str, argv: list[str], **env: str) -> Proc:
        """Start any command in the stack's environment; killed by :meth:`close`."""
        return self._spawn(name, argv, **env)

    def _spawn(self, name: str, argv: list[str], **env: str) -> Proc:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the process
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill_group() gets the children
        )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    # -- processes --------------------------------------------------------------------------
    def worker(
        self,
        name: str,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        wait: bool = True,
        extra_args: Iterable[str] = (),
        queues: Iterable[str] | None = None,
        **env: str,
    ) -> Proc:
        """Start ``celery worker`` named ``name@host``, consuming the stack's queue (or
        ``queues``); ``env`` overrides environment variables (e.g. ``DATABASE_URL``)."""
        node = f"{name}@{HOST}"
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "example_project",
            "worker",
            "-n",
            node,
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-Q",
            ",".join(queues) if queues is not None else self.queue,
            "--without-mingle",
            "--without-gossip",
            "-l",
            "info",
            *extra_args,
        ]
        proc = self._spawn(name, argv, **env)
        if wait:
            self.wait_registered(node, proc)
        return proc

    def start_workers(self, specs: dict[str, dict[str, Any]]) -> dict[str, Proc]:
        """Start several workers (``{name: worker() keyword arguments}``) and wait until
        each one is registered and consuming.

        They boot at once where the broker allows it; on kombu's filesystem transport one
        after the other, as two workers declaring the same exchange there at the same
        moment can read a half-written exchange table and die (JSONDecodeError).
        """
        parallel = not self.broker_url.startswith("filesystem://")
        procs: dict[str, Proc] = {}
        for name, options in specs.items():
            procs[name] = self.worker(name, **{**options, "wait": False})
            if not parallel:
                self.wait_ready(name, procs[name])
        for name, proc in procs.items():
            self.wait_ready(name, proc)
        return procs

    def wait_ready(self, name: str, proc: Proc, timeout: float = 60) -> None:
        """Wait until worker ``name`` is registered and consuming (its signal handlers are
        installed by then: SIGTERM means a warm shutdown)."""
        node = name if "@" in name else self.node(name)
        self.wait_registered(node, proc, timeout)

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"{node} exited early:\n{proc.log()[-4000:]}")
            return proc.count(f"{node} ready.") > 0

        wait_for(ready, timeout, what=f"{node} to be ready")

    def beat(
        self,
        name: str = "beat",
        *,
        scheduler: str | None = None,
        loglevel: str = "info",
        **env: str,
    ) -> Proc:
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "example_project",
            "beat",
            "-l",
            loglevel,
            "-s",
            str(self.workdir / "celerybeat-schedule"),
        ]
        if scheduler:
            argv += ["--scheduler", scheduler]
        return self._spawn(name, argv, **env)

    def manage(self, *args: str, check: bool = True, timeout: float = 120, **env: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.env(**env),
            capture_output=True,
            timeout=timeout,
        )
        out = result.stdout.decode()
        if check and result.returncode != 0:
            raise AssertionError(
                f"manage.py {' '.join(args)} exited {result.returncode}:\n{out}\n"
                f"{result.stderr.decode()}"
            )
        return out

    def publish(
        self, task: str, count: int = 1, *, queue: str | None = None, **options: Any
    ) -> list[str]:
        """Publish demo tasks (to the stack's queue, or ``queue``); returns their ids."""
        args = ["demo_publish", task, "--count", str(count)]
        kwargs = options.pop("kwargs", None)
        if kwargs is not None:
            args += ["--kwargs", json.dumps(kwargs)]
        for key, value in options.items():
            args += [f"--{key}", str(value)]
        out = self.manage(*args, EXAMPLE_QUEUE=queue) if queue else self.manage(*args)
        return list(json.loads(out.strip().splitlines()[-1]))

    def wait_registered(self, node: str, proc: Proc | None = None, timeout: float = 60) -> None:
        from worker_health.models import WorkerRegistry

        def registered() -> bool:
            if proc is not None and not proc.alive():
                raise AssertionError(f"{node} exited early:\n{proc.log()[-4000:]}")
            return (
                WorkerRegistry.objects.using(self.alias)
                .filter(worker_id=node, status="active")
                .exists()
            )

        wait_for(registered, timeout, what=f"{node} to register")

    def node(self, name: str) -> str:
        return f"{name}@{HOST}"

    def wait_sweep_after(self, seconds: float, timeout: float = 15) -> None:
        """Wait for a detector sweep that starts more than ``seconds`` from now (database
        clock): whatever a sweep would wrongly do by then, it has done."""
        from worker_health.models import DetectorState

        target = db_now(self.alias) + timedelta(seconds=seconds)
        swept = DetectorState.objects.using(self.alias).filter(pk=1, last_sweep_at__gt=target)
        wait_for(swept.exists, seconds + timeout, what=f"a detector sweep {seconds} s from now")

    def row(self, name: str) -> Any:
        """The ``WorkerRegistry`` row of worker ``name`` (a short name or a node name)."""
        from worker_health.models import WorkerRegistry

        node = name if "@" in name else self.node(name)
        return WorkerRegistry.objects.using(self.alias).get(worker_id=node)

    def events(self, kind: object, name: str | None = None) -> Any:
        """``WorkerEvent`` rows of ``kind`` (of worker ``name`` if given), oldest first."""
        from worker_health.models import WorkerEvent

        qs = WorkerEvent.objects.using(self.alias).filter(kind=kind)
        if name is not None:
            qs = qs.filter(worker_name=name if "@" in name else self.node(name))
        return qs.order_by("created_at", "id")

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.kill_group()
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
        close_old_connections()
        for conn in connections.all():
            conn.close()
        self.purge()

    def purge(self) -> None:
        if self.broker_url.startswith(("redis://", "amqp://")):
            from kombu import Connection

            try:
                with Connection(self.broker_url, connect_timeout=5) as conn:
                    for queue in [self.queue, *self.extra_queues]:
                        # A channel per queue: AMQP closes the channel on any error.
                        channel = conn.channel()
                        with contextlib.suppress(Exception):
                            channel.queue_delete(queue)
                        with contextlib.suppress(Exception):
                            channel.close()
            except Exception:
                pass

    def logs(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.log()[-20000:]}" for p in self.procs)
