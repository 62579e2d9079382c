"""What every benchmark needs: the machine's description, a database of its own on the
PostgreSQL server, real worker processes, medians and Markdown tables, and docs/ updates."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _server_of(url: str) -> str:
    """``scheme://user@host:port`` of a database URL (its path, the database, dropped)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if rest else ""


#: the PostgreSQL server (a database of the benchmark's own is created on it); by default
#: the server of the tests' database (``WORKER_HEALTH_TEST_DATABASE_URL``), as in CI
PG_SERVER = os.environ.get("BENCH_PG_SERVER") or (
    _server_of(os.environ.get("WORKER_HEALTH_TEST_DATABASE_URL", ""))
    or "postgres://root@127.0.0.1:5432"
)
REDIS_SERVER = os.environ.get("BENCH_REDIS_SERVER") or (
    _server_of(os.environ.get("WORKER_HEALTH_TEST_REDIS_URL", "")) or "redis://127.0.0.1:6379"
)
AMQP_URL = os.environ.get("BENCH_AMQP_URL") or os.environ.get(
    "WORKER_HEALTH_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# the machine


def _first_line(path: str, prefix: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return "?"


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    import celery
    import django
    import kombu

    mem_kb = _first_line("/proc/meminfo", "MemTotal")
    mem = f"{int(mem_kb.split()[0]) / 1024 / 1024:.0f} GiB" if mem_kb != "?" else "?"
    info = {
        "cpu": f"{_first_line('/proc/cpuinfo', 'model name')}, {os.cpu_count()} cores",
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "django": django.__version__,
        "celery": celery.__version__,
        "kombu": str(getattr(kombu, "__version__", "?")),
        "psycopg": str(getattr(psycopg, "__version__", "?")),
    }
    with contextlib.suppress(Exception), psycopg.connect(f"{PG_SERVER}/postgres") as conn:
        row = conn.execute("SHOW server_version").fetchone()
        info["postgresql"] = str(row[0]) if row else "?"
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis.from_url(REDIS_SERVER, socket_connect_timeout=3)
        info["redis"] = str(client.info("server")["redis_version"])
    with contextlib.suppress(OSError):
        load = os.getloadavg()
        info["load average at start"] = " ".join(f"{x:.2f}" for x in load)
    return info


def machine_markdown(info: dict[str, str]) -> str:
    return "; ".join(f"{k} {v}" for k, v in info.items())


def print_machine() -> dict[str, str]:
    info = machine()
    print("machine:", machine_markdown(info), flush=True)
    return info


# --------------------------------------------------------------------------------------------
# a database of the benchmark's own


@dataclass
class BenchDatabase:
    """``CREATE DATABASE`` on the server; ``drop()`` removes it."""

    name: str

    @property
    def url(self) -> str:
        return f"{PG_SERVER}/{self.name}"

    @classmethod
    def create(cls, prefix: str, *, migrate: bool = True) -> BenchDatabase:
        name = f"bench_{prefix}_{os.getpid()}"
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        db = cls(name)
        if migrate:
            db.migrate()
        return db

    def migrate(self) -> None:
        run_manage(["migrate", "--noinput", "-v", "0"], database_url=self.url, variant="all")

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, **kwargs)

    def drop(self) -> None:
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [self.name],
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}"')

    def stats(self) -> dict[str, int]:
        """Cumulative counters of this database (pg_stat_database), after a stats flush."""
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_stat_force_next_flush()")
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, "
                "tup_fetched, tup_returned, blks_hit, blks_read "
                "FROM pg_stat_database WHERE datname = %s",
                [self.name],
            ).fetchone()
        keys = (
            "xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted",
            "tup_fetched", "tup_returned", "blks_hit", "blks_read",
        )  # fmt: skip
        return dict(zip(keys, (int(v) for v in row or ()), strict=False))


@contextlib.contextmanager
def bench_database(
    prefix: str, *, keep: bool = False, migrate: bool = True
) -> Iterator[BenchDatabase]:
    db = BenchDatabase.create(prefix, migrate=migrate)
    print(f"database: {db.name}", flush=True)
    try:
        yield db
    finally:
        if keep:
            print(f"kept database {db.name} (drop it with: dropdb -h 127.0.0.1 {db.name})")
        else:
            db.drop()


# --------------------------------------------------------------------------------------------
# a broker of our own


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivateRedis:
    """A ``redis-server`` of our own on a free port (append-only file), that can be
    restarted. A shared server's database index is not ours alone: other jobs on the
    machine may ``FLUSHDB`` it, which looks exactly like lost messages."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.workdir), "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", ""],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        """A graceful restart's first half: SHUTDOWN (the AOF is fsynced on every write)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def close(self) -> None:
        self.stop()


@contextlib.contextmanager
def redis_broker(workdir: Path, db: int) -> Iterator[str]:
    """The Redis URL a benchmark uses: ``BENCH_REDIS_SERVER``'s database ``db`` if that is
    set, else a private ``redis-server`` for the benchmark's duration."""
    if os.environ.get("BENCH_REDIS_SERVER"):
        yield f"{REDIS_SERVER}/{db}"
        return
    server = PrivateRedis(workdir / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.close()


# --------------------------------------------------------------------------------------------
# processes


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark process: nothing inherited that configures the
    project, then ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WORKER_HEALTH_", "CELERY_", "DJANGO_", "EXAMPLE_", "BENCH_"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE="bench.settings",
        C_FORCE_ROOT="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(extra)
    return env


def run_manage(
    args: Sequence[str], *, database_url: str, variant: str, timeout: float = 600, **env: str
) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=clean_env(DATABASE_URL=database_url, BENCH_VARIANT=variant, **env),
        capture_output=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"manage.py {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout.decode()}\n{result.stderr.decode()}"
        )
    return result.stdout.decode()


class Proc:
    """A process of the benchmark's own, in a process group of its own."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str],
        log: Path,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.log_path = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def kill_group(self) -> None:
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def stop(self, timeout: float = 30) -> int | None:
        """Warm shutdown (SIGTERM); SIGKILL the group after ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            return None
        self.signal_group(signal.SIGKILL)  # leftovers of the group, if any
        return code

    def children(self) -> list[int]:
        """PIDs of the direct children (prefork pool processes)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        with contextlib.suppress(OSError):
            return [int(p) for p in path.read_text().split()]
        return []


def worker_argv(
    node: str,
    queue: str,
    *,
    pool: str = "prefork",
    concurrency: int = 2,
    app: str = "bench.celery",
    loglevel: str = "warning",
    extra: Sequence[str] = (),
) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "-n", node, "-P", pool, "-c", str(concurrency), "-Q", queue,
        "--without-mingle", "--without-gossip", "-l", loglevel, *extra,
    ]  # fmt: skip


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for(
    predicate: Callable[[], T | None], timeout: float, interval: float = 0.05, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def delete_queues(broker_url: str, queues: Sequence[str]) -> None:
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(broker_url, connect_timeout=5) as conn:
        for queue in queues:
            channel: Any = conn.channel()
            with contextlib.suppress(Exception):
                channel.queue_delete(queue)
            with contextlib.suppress(Exception):
                channel.close()


# --------------------------------------------------------------------------------------------
# numbers and tables


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation: small samples stay honest)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable as printed text)."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def write_section(doc: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- bench:NAME:start -->`` and ``...:end -->`` in
    ``doc`` (appended at the end if the markers are missing)."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    print(f"wrote the results into {doc.relative_to(ROOT)} ({name})")


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
