"""One scenario's world: a database, a broker, worker and beat processes, the faults.

* The database is a PostgreSQL database of the suite's own; workers and beat reach it
  through a TCP proxy the suite owns (``db_proxy``), so an outage can be simulated without
  touching the server. The tasks' ledger (``chaos_effect``) is written straight to the
  server: it stays writable during the outage.
* The broker is a private ``redis-server`` of the scenario's own (append-only file, can be
  restarted), or RabbitMQ behind a TCP proxy that can be cut.
* ``broker="embedded"`` is the embedded default instead: worker_health's tables in a SQLite
  file and kombu's filesystem transport (the example project's, which acknowledges), both
  in the scenario's folder; the ledger stays on PostgreSQL.
* ``variant`` picks the settings: ``worker_health`` (fast settings 1/3/1 s), ``celery``
  (Celery alone, default settings) or ``celery_acks_late`` (``acks_late`` +
  ``task_reject_on_worker_lost``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from bench.common import (
    AMQP_URL,
    PG_SERVER,
    PrivateRedis,
    Proc,
    clean_env,
    delete_queues,
    run_manage,
)
from tests.integration.tcp_proxy import TcpProxy

from .tasks import LEDGER_SQL

VARIANTS = ("worker_health", "celery", "celery_acks_late")
BROKERS = ("redis", "amqp", "embedded")
FAST = {"HEARTBEAT_INTERVAL": 1.0, "STALE_AFTER": 3.0, "CHECK_INTERVAL": 1.0}


class Stack:
    def __init__(
        self,
        name: str,
        variant: str,
        *,
        broker: str = "redis",
        settings: dict[str, float] | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(variant)
        if broker not in BROKERS:
            raise ValueError(broker)
        self.name = name
        self.variant = variant
        self.broker_kind = broker
        self.settings = dict(FAST if settings is None else settings)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{name}-"))
        self.db_name = f"chaos_{name.replace('-', '_')}_{variant}_{os.getpid()}"
        self.queue = f"chaos-{name}-{uuid.uuid4().hex[:6]}"
        self.prefix = f"{name}-{variant}-{uuid.uuid4().hex[:4]}-"
        self.procs: dict[str, Proc] = {}
        self.extra_env: dict[str, str] = {}
        self.redis: PrivateRedis | None = None
        self.broker_proxy: TcpProxy | None = None
        self.db_proxy: TcpProxy | None = None
        self.published = 0

    # -- set-up and tear-down ----------------------------------------------------------------
    def __enter__(self) -> Stack:
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}"')
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        run_manage(
            ["migrate", "--noinput", "-v", "0"],
            database_url=self.db_url,
            variant="all",
            EXAMPLE_VAR_DIR=str(self.workdir / "var"),
        )
        with self.ledger() as conn:
            conn.execute(LEDGER_SQL)
        if not self.embedded:
            pg = urlsplit(PG_SERVER)
            self.db_proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432).start()
        if self.broker_kind == "redis":
            self.redis = PrivateRedis(self.workdir / "redis")
            self.redis.start()
        elif self.broker_kind == "amqp":
            amqp = urlsplit(AMQP_URL)
            self.broker_proxy = TcpProxy(amqp.hostname or "127.0.0.1", amqp.port or 5672).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill_group()
        if not self.embedded:
            with contextlib.suppress(Exception):
                delete_queues(self.broker_url_direct, [self.queue])
        if self.db_proxy is not None:
            self.db_proxy.close()
        if self.broker_proxy is not None:
            self.broker_proxy.close()
        if self.redis is not None:
            self.redis.close()
        with (
            contextlib.suppress(Exception),
            psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn,
        ):
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [self.db_name],
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}"')
        if os.environ.get("CHAOS_KEEP_LOGS"):
            print(f"  logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- addresses ---------------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        return self.broker_kind == "embedded"

    @property
    def ledger_url(self) -> str:
        return f"{PG_SERVER}/{self.db_name}"

    @property
    def sqlite_path(self) -> Path:
        return self.workdir / "worker_health.sqlite3"

    @property
    def db_url(self) -> str:
        """worker_health's database."""
        return f"sqlite:///{self.sqlite_path}" if self.embedded else self.ledger_url

    @property
    def proxied_db_url(self) -> str:
        if self.embedded:
            return self.db_url  # a file: no connection to cut
        assert self.db_proxy is not None
        pg = urlsplit(PG_SERVER)
        auth = pg.netloc.rsplit("@", 1)[0] + "@" if "@" in pg.netloc else ""
        return f"postgres://{auth}127.0.0.1:{self.db_proxy.port}/{self.db_name}"

    @property
    def broker_url(self) -> str:
        if self.embedded:
            return "filesystem://"
        if self.redis is not None:
            return self.redis.url
        if self.broker_proxy is not None:
            amqp = urlsplit(AMQP_URL)
            auth = amqp.netloc.rsplit("@", 1)[0] + "@" if "@" in amqp.netloc else ""
            return f"amqp://{auth}127.0.0.1:{self.broker_proxy.port}{amqp.path or '/'}"
        raise ValueError(f"unknown broker {self.broker_kind!r}")

    @property
    def broker_url_direct(self) -> str:
        if self.broker_kind == "amqp":
            return AMQP_URL
        return self.broker_url

    def ledger(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.ledger_url, autocommit=True)

    # -- processes ---------------------------------------------------------------------------
    def env(self, proxied: str = "yes", **extra: str) -> dict[str, str]:
        env = clean_env(
            DJANGO_SETTINGS_MODULE="chaos.settings",
            BENCH_VARIANT="worker_health" if self.variant == "worker_health" else "plain",
            DATABASE_URL=self.proxied_db_url if proxied == "yes" else self.db_url,
            CHAOS_LEDGER_URL=self.ledger_url,
            CELERY_BROKER_URL=self.broker_url,
            EXAMPLE_QUEUE=self.queue,
            EXAMPLE_VAR_DIR=str(self.workdir / "var"),
            WORKER_HEALTH_BEAT_SCHEDULE="true",
        )
        if self.variant == "celery_acks_late":
            env["EXAMPLE_ACKS_LATE"] = "1"
        for key, value in self.settings.items():
            env[f"WORKER_HEALTH_{key}"] = str(value)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def node(self, name: str) -> str:
        return f"{name}@{self.name}"

    def worker(
        self,
        name: str,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        faketime: str | None = None,
        wait: bool = True,
        **env: str,
    ) -> Proc:
        node = self.node(name)
        argv = [
            sys.executable, "-m", "celery", "-A", "chaos.celery", "worker", "-n", node,
            "-P", pool, "-c", str(concurrency), "-Q", self.queue, "--without-mingle",
            "--without-gossip", "-l", "info",
        ]  # fmt: skip
        proc_env = self.env(**env)
        if faketime:
            # Only the wall clock is shifted: with a faked monotonic clock, Python's timed
            # waits (threading.Event.wait, the heart's loop) hang under libfaketime. With a
            # real one, time.sleep fails with EINVAL, so the chaos tasks do not use it.
            argv = ["faketime", "-f", faketime, *argv]
            proc_env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        log = self.workdir / f"{name}.log"
        proc = Proc(node, argv, proc_env, log)
        self.procs[name] = proc
        if wait:
            self.wait_ready(name)
        return proc

    def wait_ready(self, name: str, timeout: float = 90) -> None:
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{name} exited early:\n{proc.log()[-3000:]}")
            if " ready." in proc.log():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready after {timeout} s:\n{proc.log()[-3000:]}")

    def beat(self, name: str = "beat") -> Proc:
        argv = [
            sys.executable, "-m", "celery", "-A", "chaos.celery", "beat", "-l", "info",
            "-s", str(self.workdir / f"{name}-schedule"),
        ]  # fmt: skip
        proc = Proc(name, argv, self.env(), self.workdir / f"{name}.log")
        self.procs[name] = proc
        return proc

    def publish(self, count: int, task: str = "effect", **kwargs: Any) -> list[str]:
        """Publish ``count`` tasks (as a web process would: straight to the database)."""
        start = self.published
        result = subprocess.run(
            [sys.executable, "-m", "chaos.publish", "--task", task, "--count", str(count),
             "--prefix", self.prefix, "--start", str(start), "--kwargs", json.dumps(kwargs)],
            env=self.env(proxied="no"), capture_output=True, timeout=300,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"publish failed:\n{result.stderr.decode()[-3000:]}")
        self.published += count
        return [f"{self.prefix}{i}" for i in range(start, start + count)]

    # -- the ledger ----------------------------------------------------------------------------
    def runs(self) -> dict[str, int]:
        with self.ledger() as conn:
            rows = conn.execute(
                "SELECT task_id, runs FROM chaos_effect WHERE task_id LIKE %s",
                [self.prefix + "%"],
            ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def attempts(self) -> int:
        with self.ledger() as conn:
            row = conn.execute(
                "SELECT count(*) FROM chaos_attempt WHERE task_id LIKE %s", [self.prefix + "%"]
            ).fetchone()
        return int(row[0]) if row else 0

    def wait_done(
        self, ids: Sequence[str], *, timeout: float, quiet: float = 15.0
    ) -> dict[str, int]:
        """Wait until every task ran, or nothing ran for ``quiet`` s, or ``timeout``."""
        deadline = time.monotonic() + timeout
        last_progress, last_total = time.monotonic(), -1
        wanted = set(ids)
        while True:
            runs = self.runs()
            done = sum(1 for t in wanted if runs.get(t, 0) >= 1)
            total = sum(runs.values())
            if done == len(wanted):
                time.sleep(2.0)  # late duplicates
                return self.runs()
            if total != last_total:
                last_total, last_progress = total, time.monotonic()
            if time.monotonic() - last_progress > quiet or time.monotonic() > deadline:
                return runs
            time.sleep(0.25)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Read worker_health's tables (SQL with ``%s`` parameters, portable to SQLite)."""
        if self.embedded:
            conn = sqlite3.connect(self.sqlite_path, timeout=30)
            try:
                sql = sql.replace("%s", "?").replace("%%", "%")
                return [tuple(r) for r in conn.execute(sql, list(params)).fetchall()]
            finally:
                conn.close()
        with self.ledger() as pg:
            return [tuple(r) for r in pg.execute(sql, list(params)).fetchall()]

    # -- helpers -------------------------------------------------------------------------------
    def every(self, seconds: float, duration: float, action: Callable[[int], None]) -> None:
        """Call ``action(i)`` every ``seconds`` for ``duration``."""
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < duration:
            action(i)
            i += 1
            time.sleep(max(0.0, started + (i * seconds) - time.monotonic()))


@contextlib.contextmanager
def stack(name: str, variant: str, **kwargs: Any) -> Iterator[Stack]:
    with Stack(name, variant, **kwargs) as s:
        yield s
