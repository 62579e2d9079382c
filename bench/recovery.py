"""Recovery latency: SIGKILL a worker running a task → the task runs again on another worker.

    python -m bench.recovery --trials 10 --default-trials 2 [--write-docs]

Two prefork workers (concurrency 1) consume one queue on Redis (db 12) and PostgreSQL (a
database of the benchmark's own); no celery beat: the survivors' heartbeat threads run the
detector, as in a deployment without beat. Each trial publishes one task (``work``,
3 s), waits until a worker has claimed it, SIGKILLs that worker's whole process group, and
waits until the task is claimed by the other worker. The killed worker is replaced by a new
one (a new node name, so the restart fast path does not take part) before the next trial.

Times are on the database's clock: the kill (``clock_timestamp()`` read just before it),
the victim's last heartbeat, its ``status_changed_at`` (failed by the detector), the task's
``reclaimed_at`` (moved to ``reclaiming`` and published again) and its new ``claimed_at``
(user code about to start on the survivor). Promised: detection within ``STALE_AFTER +
CHECK_INTERVAL`` of the last heartbeat; from the kill, at most that too (the kill is after
the last heartbeat).

``--mode pool``: SIGKILL only the pool process running the task (the worker survives): the
fast path (``WorkerLostError`` / the heartbeat's claim audit), no detector involved.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .common import (
    DOCS,
    Proc,
    bench_database,
    clean_env,
    delete_queues,
    machine_markdown,
    median,
    print_machine,
    quantile,
    redis_broker,
    stamp,
    table,
    unique,
    wait_for,
    worker_argv,
    write_section,
)

REDIS_DB = 12
TASK_SECONDS = 3.0

FAST = {"HEARTBEAT_INTERVAL": 1.0, "STALE_AFTER": 3.0, "CHECK_INTERVAL": 1.0}
DEFAULT = {"HEARTBEAT_INTERVAL": 30.0, "STALE_AFTER": 60.0, "CHECK_INTERVAL": 30.0}


@dataclass
class Trial:
    settings: str
    mode: str
    kill_to_detected: float | None
    kill_to_reclaimed: float
    kill_to_running: float
    heartbeat_to_detected: float | None
    bound: float

    @property
    def within_bound(self) -> bool:
        return self.kill_to_running <= self.bound


class Cluster:
    """Workers on one queue, with the driver's Django pointed at the same database."""

    def __init__(self, db_url: str, workdir: Path, settings: dict[str, float], broker: str) -> None:
        self.db_url = db_url
        self.workdir = workdir
        self.settings = settings
        self.queue = unique("bench-rec")
        self.broker = broker
        self.workers: dict[str, Proc] = {}
        self.serial = 0

    def env(self) -> dict[str, str]:
        env = clean_env(
            BENCH_VARIANT="worker_health",
            DATABASE_URL=self.db_url,
            CELERY_BROKER_URL=self.broker,
            EXAMPLE_QUEUE=self.queue,
            EXAMPLE_VAR_DIR=str(self.workdir / "var"),
            WORKER_HEALTH_BEAT_SCHEDULE="false",
        )
        for name, value in self.settings.items():
            env[f"WORKER_HEALTH_{name}"] = str(value)
        return env

    def start_worker(self) -> str:
        from worker_health.models import WorkerRegistry

        self.serial += 1
        node = f"rec{self.serial}-{self.queue[-8:]}@bench"
        proc = Proc(
            node,
            worker_argv(node, self.queue, concurrency=1, loglevel="info"),
            self.env(),
            self.workdir / f"{node}.log",
        )
        self.workers[node] = proc

        def registered() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{node} exited:\n{proc.log()[-3000:]}")
            return WorkerRegistry.objects.filter(worker_id=node, status="active").exists()

        wait_for(registered, 90, 0.1, f"{node} to register")
        return node

    def close(self) -> None:
        for proc in self.workers.values():
            proc.kill_group()
        delete_queues(self.broker, [self.queue])


def db_clock() -> datetime:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]


def one_trial(cluster: Cluster, label: str, mode: str, n: int) -> Trial:
    from django.db import close_old_connections

    from example_project.demo.tasks import work
    from worker_health.models import TaskQueue, WorkerRegistry

    settings = cluster.settings
    bound = settings["STALE_AFTER"] + settings["CHECK_INTERVAL"]
    task_id = f"{cluster.queue}-{label}-{n}"
    work.apply_async(
        kwargs={"seconds": TASK_SECONDS, "label": task_id}, task_id=task_id, queue=cluster.queue
    )

    def claimed() -> Any:
        close_old_connections()
        return (
            TaskQueue.objects.filter(task_id=task_id, status="claimed")
            .values("claimed_by__worker_id", "fencing_token", "claimed_at")
            .first()
        )

    first = wait_for(claimed, 60, 0.02, f"{task_id} to be claimed")
    victim = first["claimed_by__worker_id"]
    proc = cluster.workers[victim]
    killed_at = db_clock()
    if mode == "worker":
        proc.kill_group()
    else:
        children = proc.children()
        if not children:
            raise RuntimeError(f"{victim} has no pool process")
        os.kill(children[0], signal.SIGKILL)

    def running_elsewhere() -> Any:
        close_old_connections()
        row = (
            TaskQueue.objects.filter(task_id=task_id, status="claimed")
            .exclude(fencing_token=first["fencing_token"])
            .values("claimed_by__worker_id", "claimed_at", "reclaimed_at")
            .first()
        )
        return row

    timeout = bound * 3 + 60
    again = wait_for(running_elsewhere, timeout, 0.05, f"{task_id} to run again")
    detected_at = None
    heartbeat_to_detected = None
    if mode == "worker":
        row = WorkerRegistry.objects.filter(worker_id=victim).values(
            "status", "status_changed_at", "last_heartbeat"
        )[0]
        if row["status"] == "failed" and row["status_changed_at"] and row["last_heartbeat"]:
            detected_at = row["status_changed_at"]
            heartbeat_to_detected = (
                row["status_changed_at"] - row["last_heartbeat"]
            ).total_seconds()
    trial = Trial(
        settings=label,
        mode=mode,
        kill_to_detected=(detected_at - killed_at).total_seconds() if detected_at else None,
        kill_to_reclaimed=(again["reclaimed_at"] - killed_at).total_seconds(),
        kill_to_running=(again["claimed_at"] - killed_at).total_seconds(),
        heartbeat_to_detected=heartbeat_to_detected,
        bound=bound,
    )
    # let the copy finish, so the next trial's task finds an idle worker
    from example_project.demo.models import Effect

    wait_for(
        lambda: Effect.objects.filter(task_id=task_id).exists(), 60, 0.1, f"{task_id} to finish"
    )
    runs = Effect.objects.get(task_id=task_id).runs
    if runs != 1:
        print(f"  !! {task_id} ran {runs} times")
    if mode == "worker":
        cluster.workers.pop(victim)
        cluster.start_worker()
    return trial


def run_series(db_url: str, workdir: Path, label: str, settings: dict[str, float], trials: int,
               mode: str) -> list[Trial]:  # fmt: skip
    cluster = Cluster(db_url, workdir, settings, os.environ["CELERY_BROKER_URL"])
    results: list[Trial] = []
    try:
        cluster.start_worker()
        cluster.start_worker()
        # one heartbeat and one sweep before the first kill
        time.sleep(settings["HEARTBEAT_INTERVAL"] + 0.5 if label == "fast" else 2.0)
        for n in range(trials):
            trial = one_trial(cluster, label, mode, n)
            results.append(trial)
            detected = (
                f"detected {trial.kill_to_detected:5.2f} s, "
                if trial.kill_to_detected is not None
                else ""
            )
            print(
                f"{label} {mode} trial {n + 1}: {detected}reclaimed {trial.kill_to_reclaimed:5.2f}"
                f" s, running again {trial.kill_to_running:5.2f} s after the kill "
                f"(bound {trial.bound:.0f} s)",
                flush=True,
            )
    finally:
        cluster.close()
    return results


def summarize(trials: list[Trial]) -> list[str]:
    first = trials[0]
    runs = [t.kill_to_running for t in trials]
    detected = [t.kill_to_detected for t in trials if t.kill_to_detected is not None]
    reclaimed = [t.kill_to_reclaimed for t in trials]
    hb = [t.heartbeat_to_detected for t in trials if t.heartbeat_to_detected is not None]

    def f(values: list[float], q: float) -> str:
        return f"{quantile(values, q):.2f}" if values else "-"

    return [
        first.settings,
        "whole worker" if first.mode == "worker" else "pool process",
        str(len(trials)),
        f"{median(detected):.2f}" if detected else "-",
        f"{median(reclaimed):.2f}",
        f"{min(runs):.2f} / {median(runs):.2f} / {f(runs, 0.9)} / {max(runs):.2f}",
        f"{max(hb):.2f}" if hb else "-",
        f"{first.bound:.0f}",
        f"{sum(t.within_bound for t in trials)}/{len(trials)}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=10, help="trials with 1/3/1 s settings")
    parser.add_argument("--default-trials", type=int, default=2, help="trials with 30/60/30 s")
    parser.add_argument("--pool-trials", type=int, default=5, help="trials killing a pool process")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    info = print_machine()
    workdir = Path(tempfile.mkdtemp(prefix="bench-rec-"))
    try:
        with bench_database("recovery") as db, redis_broker(workdir, REDIS_DB) as broker:
            os.environ.update(
                BENCH_VARIANT="worker_health",
                DATABASE_URL=db.url,
                CELERY_BROKER_URL=broker,
                EXAMPLE_VAR_DIR=str(workdir / "var"),
                DJANGO_SETTINGS_MODULE="bench.settings",
                WORKER_HEALTH_BEAT_SCHEDULE="false",
            )
            import django

            django.setup()
            series: list[list[Trial]] = []
            if args.trials:
                series.append(run_series(db.url, workdir, "fast", FAST, args.trials, "worker"))
            if args.pool_trials:
                series.append(run_series(db.url, workdir, "fast", FAST, args.pool_trials, "pool"))
            if args.default_trials:
                series.append(
                    run_series(db.url, workdir, "default", DEFAULT, args.default_trials, "worker")
                )
            from django.db import connections

            connections.close_all()
        headers = [
            "settings (heartbeat/stale/check)", "SIGKILL of", "trials",
            "kill → failed, median s", "kill → re-published, median s",
            "kill → running elsewhere: min / median / p90 / max s",
            "last heartbeat → failed, max s", "bound STALE_AFTER + CHECK_INTERVAL s",
            "within bound",
        ]  # fmt: skip
        rows = [summarize(s) for s in series if s]
        for r in rows:
            r[0] = "1/3/1 s" if r[0] == "fast" else "30/60/30 s (defaults)"
        text = table(headers, rows)
        print()
        print(text)
        if args.write_docs:
            body = (
                f"Measured {stamp()} with `python -m bench.recovery --trials {args.trials} "
                f"--default-trials {args.default_trials} --pool-trials {args.pool_trials}` on: "
                f"{machine_markdown(info)}.\n\n{text}\n"
            )
            write_section(DOCS / "benchmarks.md", "recovery", body)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
