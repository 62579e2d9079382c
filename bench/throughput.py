"""Throughput overhead: no-op tasks through a prefork worker with 2 processes.

    python -m bench.throughput --tasks 2000 --rounds 3 [--write-docs]
    python -m bench.throughput --profile            # where worker_health's time goes

Variants (see bench/settings.py), all on PostgreSQL (a database of the benchmark's own)
and Redis (db 11):

* ``plain``: Celery + Django, no worker_health, no result backend;
* ``worker_health``: plain + worker_health tracking every task;
* ``events``: plain, worker started with ``-E`` (task events, what Flower needs);
* ``results``: plain + django-celery-results' ``django-db`` result backend;
* ``candidate`` (with ``--candidate PATH``): worker_health as in another checkout, e.g. a
  ``git worktree`` of a change to the hot path, measured side by side with this one
  (its schema must match this checkout's: the benchmark migrates with this one).

Each run publishes ``--tasks`` no-op tasks into a fresh queue (timed: the publisher's cost
per ``delay()``), then starts the worker and times it from the start of its first task to
the end of its last (:mod:`bench.probe` counts them in each pool process). Variants
alternate within a round, the order rotates between rounds, and the table shows medians.
CPU per task is read from /proc for the worker's processes and for the PostgreSQL
backends serving them; transactions and rows per task from ``pg_stat_database``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from .common import (
    DOCS,
    ROOT,
    BenchDatabase,
    Proc,
    bench_database,
    clean_env,
    delete_queues,
    machine_markdown,
    median,
    print_machine,
    redis_broker,
    stamp,
    table,
    unique,
    worker_argv,
    write_section,
)

VARIANTS = ("plain", "worker_health", "events", "results")
#: worker_health from the checkout given with ``--candidate``
CANDIDATE = "candidate"
REDIS_DB = 11
CLK_TCK = os.sysconf("SC_CLK_TCK")

TABLES = (
    "task_queue",
    "worker_health_event",
    "worker_registry",
    "worker_health_detector",
    "django_celery_results_taskresult",
)


def _stat_seconds(pid: int, *indexes: int) -> float:
    """The sum of clock-tick fields of /proc/<pid>/stat (after the command), in seconds
    (0 if the process is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(fields[i]) for i in indexes) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    return _stat_seconds(pid, 11, 12)


def sys_seconds(pid: int) -> float:
    """stime of one process: its CPU time in the kernel (0 if it is gone)."""
    return _stat_seconds(pid, 12)


def run_delay_seconds(pid: int) -> float:
    """Time the process's main thread spent runnable but waiting for a CPU (0 if gone)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def backend_pids(db: BenchDatabase) -> list[int]:
    with psycopg.connect(db.url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [db.name],
        ).fetchall()
    return [int(r[0]) for r in rows]


@dataclass
class CpuSample:
    main: float
    children: float
    postgres: float
    main_waiting: float
    main_sys: float

    @classmethod
    def take(cls, worker: Proc, db: BenchDatabase) -> CpuSample:
        return cls(
            main_waiting=run_delay_seconds(worker.pid),
            main_sys=sys_seconds(worker.pid),
            main=cpu_seconds(worker.pid),
            children=sum(cpu_seconds(p) for p in worker.children()),
            postgres=sum(cpu_seconds(p) for p in backend_pids(db)),
        )


@dataclass
class Run:
    variant: str
    tasks: int
    seconds: float
    publish_seconds: float
    cpu_main_us: float
    cpu_children_us: float
    cpu_postgres_us: float
    #: the main thread runnable but not running (another process had the CPU)
    main_waiting_us: float = 0.0
    #: of ``cpu_main_us``, the time in the kernel (system calls)
    main_sys_us: float = 0.0
    db: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else 0.0

    @property
    def db_rows_written(self) -> float:
        return self.db.get("tup_inserted", 0) + self.db.get("tup_updated", 0)

    @property
    def publish_us(self) -> float:
        return self.publish_seconds / self.tasks * 1e6


class Bench:
    def __init__(
        self,
        db: BenchDatabase,
        workdir: Path,
        broker: str,
        *,
        profile_dir: Path | None = None,
        candidate: Path | None = None,
    ):
        self.candidate = candidate
        self.db = db
        self.workdir = workdir
        self.broker = broker
        self.redis = redis.Redis.from_url(self.broker)
        self.profile_dir = profile_dir

    def reset_tables(self) -> None:
        with psycopg.connect(self.db.url, autocommit=True) as conn:
            conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")

    def env(self, variant: str, queue: str, **extra: str) -> dict[str, str]:
        env = clean_env(
            BENCH_VARIANT="worker_health" if variant == CANDIDATE else variant,
            DATABASE_URL=self.db.url,
            CELERY_BROKER_URL=self.broker,
            EXAMPLE_QUEUE=queue,
            EXAMPLE_VAR_DIR=str(self.workdir / "var"),
            BENCH_PROBE_REDIS=self.broker,
            BENCH_PROBE_KEY=f"bench:probe:{queue}",
        )
        if self.profile_dir is not None:
            env["BENCH_PROFILE_DIR"] = str(self.profile_dir / variant)
        if variant == CANDIDATE:
            assert self.candidate is not None
            env["PYTHONPATH"] = str(self.candidate)
        env.update(extra)
        return env

    def cwd(self, variant: str) -> Path:
        """Where the variant's processes start (``python -m`` puts it first on the path)."""
        return self.candidate if variant == CANDIDATE and self.candidate else ROOT

    def publish(self, variant: str, queue: str, count: int) -> float:
        result = subprocess.run(
            [sys.executable, "-m", "bench.publish", "--count", str(count)],
            env=self.env(variant, queue),
            cwd=self.cwd(variant),
            capture_output=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise RuntimeError(f"publish failed:\n{result.stdout.decode()}{result.stderr.decode()}")
        return float(json.loads(result.stdout.decode().strip().splitlines()[-1])["seconds"])

    def progress(self, key: str) -> tuple[int, float, float]:
        """(tasks done, first start, last end) over the worker's processes."""
        values: dict[bytes, bytes] = self.redis.hgetall(key)  # type: ignore[assignment]
        done, first, last = 0, float("inf"), 0.0
        for raw in values.values():
            count, start, end = raw.decode().split()
            done += int(count)
            if float(start):
                first = min(first, float(start))
            last = max(last, float(end))
        return done, first, last

    def run(self, variant: str, tasks: int, *, pyspy: Path | None = None) -> Run:
        queue = unique(f"bench-tp-{variant}")
        key = f"bench:probe:{queue}"
        self.reset_tables()
        publish_seconds = self.publish(variant, queue, tasks)
        stats_before = self.db.stats()
        extra = ["-E"] if variant == "events" else []
        worker = Proc(
            variant,
            worker_argv(f"{queue}@bench", queue, extra=extra),
            self.env(variant, queue),
            self.workdir / f"{queue}.log",
            cwd=self.cwd(variant),
        )
        spy: subprocess.Popen[bytes] | None = None
        try:
            deadline = time.monotonic() + max(120.0, tasks / 20)
            cpu_start: CpuSample | None = None
            done_start = 0
            while True:
                if not worker.alive():
                    raise RuntimeError(f"worker exited:\n{worker.log()[-4000:]}")
                done, first, last = self.progress(key)
                if cpu_start is None and done > 0:
                    cpu_start, done_start = CpuSample.take(worker, self.db), done
                    if pyspy is not None:
                        spy = start_pyspy(worker.pid, pyspy)
                if done >= tasks:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{variant}: {done}/{tasks} done at the deadline")
                time.sleep(0.02)
            cpu_end = CpuSample.take(worker, self.db)
            if spy is not None:
                stop_pyspy(spy)
            if self.profile_dir is not None:
                time.sleep(1.5)  # the processes write their profiles every 0.5 s
        finally:
            worker.stop(timeout=60)
            delete_queues(self.broker, [queue])
            self.redis.delete(key)
        assert cpu_start is not None
        counted = max(1, done - done_start)
        time.sleep(1.0)  # pg_stat_database is flushed by the backends within ~1 s
        stats_after = self.db.stats()
        db = {k: (stats_after[k] - stats_before.get(k, 0)) / tasks for k in stats_after}
        return Run(
            variant=variant,
            tasks=tasks,
            seconds=last - first,
            publish_seconds=publish_seconds,
            cpu_main_us=(cpu_end.main - cpu_start.main) / counted * 1e6,
            cpu_children_us=(cpu_end.children - cpu_start.children) / counted * 1e6,
            cpu_postgres_us=(cpu_end.postgres - cpu_start.postgres) / counted * 1e6,
            main_waiting_us=(cpu_end.main_waiting - cpu_start.main_waiting) / counted * 1e6,
            main_sys_us=(cpu_end.main_sys - cpu_start.main_sys) / counted * 1e6,
            db=db,
        )


# --------------------------------------------------------------------------------------------
# py-spy (optional)


def start_pyspy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not installed (pip install py-spy): no sampling profile")
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--subprocesses", "--threads", "--idle",
         "--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def stop_pyspy(spy: subprocess.Popen[bytes]) -> None:
    import signal

    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()


# --------------------------------------------------------------------------------------------
# reports


def summary(runs: list[Run], variants: tuple[str, ...]) -> tuple[str, dict[str, float]]:
    by_variant: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_variant[run.variant].append(run)
    plain = median([r.rate for r in by_variant.get("plain", [])])
    rows = []
    rates: dict[str, float] = {}
    for variant in variants:
        vruns = by_variant.get(variant, [])
        if not vruns:
            continue
        rate = median([r.rate for r in vruns])
        rates[variant] = rate
        per_round_ratio = [
            r.rate / p.rate
            for r, p in zip(vruns, by_variant.get("plain", []), strict=False)
            if p.rate
        ]
        rows.append(
            [
                variant,
                " ".join(f"{r.rate:.0f}" for r in vruns),
                f"{rate:.0f}",
                f"{rate / plain:.2f}" if plain == plain and plain else "-",
                f"{min(per_round_ratio):.2f} to {max(per_round_ratio):.2f}"
                if per_round_ratio
                else "-",
                f"{median([r.publish_us for r in vruns]):.0f}",
                f"{median([r.cpu_main_us for r in vruns]):.0f}",
                f"{median([r.main_waiting_us for r in vruns]):.0f}",
                f"{median([r.cpu_children_us for r in vruns]):.0f}",
                f"{median([r.cpu_postgres_us for r in vruns]):.0f}",
                f"{median([r.db.get('xact_commit', 0) for r in vruns]):.2f}",
                f"{median([r.db_rows_written for r in vruns]):.2f}",
            ]
        )
    headers = [
        "variant", "tasks/s per round", "median tasks/s", "ratio to plain",
        "ratio range (per round)", "publish µs/task", "worker main CPU µs/task",
        "main thread waiting for a CPU µs/task", "pool CPU µs/task", "PostgreSQL CPU µs/task",
        "commits/task", "rows written/task",
    ]  # fmt: skip
    return table(headers, rows), rates


def aggregate_profile(directory: Path, tasks_run: int) -> str:
    """Totals of the profiler's timings per process role, per task, in µs."""
    totals: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    files = list(directory.glob("*.json"))
    pids = {json.loads(f.read_text())["pid"] for f in files}
    for path in files:
        data = json.loads(path.read_text())
        role = "pool process" if data["ppid"] in pids else "main process"
        for kind, label, n, seconds, cpu in data["timings"]:
            entry = totals[(role, kind, label)]
            entry[0] += n
            entry[1] += seconds
            entry[2] += cpu
    rows = []
    for (role, kind, label), (n, seconds, cpu) in sorted(
        totals.items(), key=lambda item: (item[0][0], -item[1][1])
    ):
        if n < tasks_run / 100 and not label.startswith("connect"):
            continue  # start-up and heartbeat statements: not per task
        rows.append(
            [
                role,
                kind,
                label,
                f"{int(n)}",
                f"{n / tasks_run:.3f}",
                f"{seconds / max(n, 1) * 1e6:.0f}",
                f"{seconds / tasks_run * 1e6:.1f}",
                f"{cpu / max(n, 1) * 1e6:.0f}",
                f"{cpu / tasks_run * 1e6:.1f}",
            ]
        )
    headers = [
        "process", "thread", "what", "calls", "calls/task", "wall µs/call", "wall µs/task",
        "CPU µs/call", "CPU µs/task",
    ]  # fmt: skip
    return table(headers, rows)


def collapse_pyspy(path: Path, top: int = 25) -> str:
    """Self and inclusive sample shares of the busiest frames in a py-spy raw profile."""
    if not path.exists():
        return "(no py-spy profile)"
    inclusive: dict[str, int] = defaultdict(int)
    own: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        process = frames[0].split(" ")[0] if frames else "?"
        idle = any(
            marker in stack
            for marker in (
                "wait (threading",
                "select (selectors",
                "poll (",
                "_wait_for_tstate_lock",
                "epoll",
            )
        )
        if idle:
            continue
        total += count
        seen = set()
        for frame in frames[1:]:
            name = frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0] + ")"
            if name not in seen:
                inclusive[name] += count
                seen.add(name)
        own[frames[-1].split(" (")[0]] += count
        del process
    rows = [
        [name, f"{n / total * 100:.1f}%"]
        for name, n in sorted(inclusive.items(), key=lambda i: -i[1])[:top]
    ]
    return f"busy samples: {total}\n" + table(["frame (inclusive)", "share of busy samples"], rows)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per run (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (default 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--profile", action="store_true", help="profile worker_health (timers + SQL)"
    )
    parser.add_argument(
        "--py-spy", action="store_true", help="with --profile: also sample with py-spy"
    )
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument(
        "--candidate",
        type=Path,
        help="another checkout of the project (a git worktree of a change): adds the "
        "variant 'candidate', worker_health imported from there",
    )
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if args.candidate is not None:
        if not (args.candidate / "worker_health" / "__init__.py").is_file():
            parser.error(f"--candidate {args.candidate}: no worker_health package there")
        if CANDIDATE not in variants:
            variants += (CANDIDATE,)
    unknown = set(variants) - set(VARIANTS) - ({CANDIDATE} if args.candidate else set())
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if args.candidate is not None and (args.profile or args.write_docs):
        parser.error("--candidate is for side-by-side comparisons: no --profile, --write-docs")

    info = print_machine()
    workdir = Path(tempfile.mkdtemp(prefix="bench-tp-"))
    try:
        with (
            bench_database("throughput", keep=args.keep_db) as db,
            redis_broker(workdir, REDIS_DB) as broker,
        ):
            if args.profile:
                docs = machine_markdown(info) if args.write_docs else None
                return profile(db, workdir, broker, args.tasks, args.py_spy, variants, docs)
            bench = Bench(db, workdir, broker, candidate=args.candidate)
            # warm-up (imports, page cache, first connections), not counted
            for variant in variants:
                bench.run(variant, min(200, args.tasks))
            runs: list[Run] = []
            for round_no in range(args.rounds):
                order = variants[round_no % len(variants) :] + variants[: round_no % len(variants)]
                for variant in order:
                    run = bench.run(variant, args.tasks)
                    runs.append(run)
                    print(
                        f"round {round_no + 1} {variant:14s} {run.rate:7.0f} tasks/s  "
                        f"publish {run.publish_us:5.0f} µs/task  cpu main {run.cpu_main_us:4.0f} "
                        f"(sys {run.main_sys_us:4.0f}, waiting {run.main_waiting_us:4.0f}) "
                        f"pool {run.cpu_children_us:4.0f} "
                        f"pg {run.cpu_postgres_us:4.0f} µs/task  "
                        f"commits/task {run.db.get('xact_commit', 0):.2f}",
                        flush=True,
                    )
            text, _ = summary(runs, variants)
            print()
            print(text)
            if args.write_docs:
                body = (
                    f"Measured {stamp()} with `python -m bench.throughput --tasks {args.tasks} "
                    f"--rounds {args.rounds}` on: {machine_markdown(info)}.\n\n{text}\n"
                )
                write_section(DOCS / "benchmarks.md", "throughput", body)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def profile(
    db: BenchDatabase,
    workdir: Path,
    broker: str,
    tasks: int,
    pyspy: bool,
    variants: tuple[str, ...],
    write_docs: str | None = None,
) -> int:
    """Profiled runs (timers and SQL in every process), then the isolated costs."""
    profile_dir = workdir / "profile"
    bench = Bench(db, workdir, broker, profile_dir=profile_dir)
    out: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        out.append(text)

    for variant in [v for v in ("plain", "worker_health") if v in variants]:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(profile_dir / variant)
        bench.run(variant, min(200, tasks))  # warm-up
        shutil.rmtree(profile_dir / variant, ignore_errors=True)
        spy_out = workdir / f"pyspy-{variant}.txt" if pyspy else None
        run = bench.run(variant, tasks, pyspy=spy_out)
        time.sleep(1.0)
        say(f"\n#### {variant}: {run.rate:.0f} tasks/s (profiled: timers on)\n")
        say(
            f"Publish {run.publish_us:.0f} µs/task; CPU per task: worker main process "
            f"{run.cpu_main_us:.0f} µs, pool processes {run.cpu_children_us:.0f} µs, PostgreSQL "
            f"backends {run.cpu_postgres_us:.0f} µs; per task: "
            + ", ".join(f"{k} {v:.2f}" for k, v in run.db.items() if v)
            + "\n"
        )
        say(aggregate_profile(profile_dir / variant, tasks))
        if spy_out is not None:
            print(collapse_pyspy(spy_out))
            keep = Path(os.environ.get("BENCH_PYSPY_KEEP", "/tmp")) / spy_out.name
            if spy_out.exists():
                shutil.copy(spy_out, keep)
            print(f"(raw py-spy profile copied to {keep})")
    result = subprocess.run(
        [sys.executable, "-m", "bench.tracking_costs", "--database-url", db.url],
        env=clean_env(BENCH_VARIANT="all", DATABASE_URL=db.url),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    say("\n#### Each tracking write on its own\n")
    say(result.stdout.strip().split("\n", 1)[-1])
    if write_docs:
        body = (
            f"Measured {stamp()} with `python -m bench.throughput --profile --tasks {tasks}` "
            f"on: {write_docs}.\n" + "\n".join(out) + "\n"
        )
        write_section(DOCS / "benchmarks.md", "profile", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
