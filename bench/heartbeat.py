"""Heartbeat cost: statements per worker per minute, and database load for 1,000 workers.

    python -m bench.heartbeat [--seconds 60] [--workers 1000] [--write-docs]

1. **One real worker**, idle (prefork, 2 processes), with fast settings (1/3/1 s) for
   ``--seconds`` and with the defaults (30/60/30 s) for ``--default-seconds``: every SQL
   statement of its heartbeat thread and of its sweeping thread is counted by
   :mod:`bench.probe` (and new connections). An idle worker's only database work is its
   heart: the beat, the claim audit and, when one is due, the detector's sweep.
2. **1,000 simulated workers**: real ``Heart`` objects (registered with ``register()``),
   driven by a few threads that call what the heart's loop calls (``beat_once``,
   ``_audit_claims``, ``_maybe_sweep``) when each worker is due, with the default 30 s
   interval and with a 3 s one (10 times the load). Measured: beats/s achieved, statements
   and connections per second, the latency of a heartbeat cycle, commits/s and rows
   written (``pg_stat_database``) and the CPU time of the PostgreSQL backends serving them
   (persistent connections, so the backends can be measured; the "as shipped" row uses
   Django's default ``CONN_MAX_AGE = 0``, where the heart reconnects at every beat).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .common import (
    DOCS,
    BenchDatabase,
    Proc,
    bench_database,
    clean_env,
    delete_queues,
    machine_markdown,
    print_machine,
    quantile,
    redis_broker,
    stamp,
    table,
    unique,
    worker_argv,
    write_section,
)
from .throughput import backend_pids, cpu_seconds

REDIS_DB = 12
FAST = {"HEARTBEAT_INTERVAL": "1", "STALE_AFTER": "3", "CHECK_INTERVAL": "1"}


# --------------------------------------------------------------------------------------------
# 1. one real worker


def real_worker(
    db: BenchDatabase, workdir: Path, broker: str, seconds: float, fast: bool
) -> dict[str, Any]:
    queue = unique("bench-hb")
    profile = workdir / f"profile-{queue}"
    env = clean_env(
        BENCH_VARIANT="worker_health",
        DATABASE_URL=db.url,
        CELERY_BROKER_URL=broker,
        EXAMPLE_QUEUE=queue,
        EXAMPLE_VAR_DIR=str(workdir / "var"),
        BENCH_PROFILE_DIR=str(profile),
        WORKER_HEALTH_BEAT_SCHEDULE="false",
    )
    if fast:
        env.update({f"WORKER_HEALTH_{k}": v for k, v in FAST.items()})
    node = f"{queue}@bench"
    worker = Proc(node, worker_argv(node, queue), env, workdir / f"{queue}.log")
    try:
        # start-up (registration) is not counted: measure a window once the heart runs
        time.sleep(5.0)
        before = heart_totals(profile)
        started = time.monotonic()
        time.sleep(seconds)
        after = heart_totals(profile)
        took = time.monotonic() - started
    finally:
        worker.stop(30)
        delete_queues(broker, [queue])
    counts = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {"seconds": took, "counts": counts}


def heart_totals(profile: Path) -> dict[str, float]:
    """Statements and connections of the heart's thread and of the thread it runs its
    detector sweeps on, so far (the main process's file)."""
    totals: dict[str, float] = defaultdict(float)
    time.sleep(0.6)  # the probe writes every 0.5 s
    for path in profile.glob("*.json"):
        data = json.loads(path.read_text())
        for kind, label, n, _wall, _cpu in data["timings"]:
            if kind not in ("heart", "sweep"):
                continue
            if label.startswith("SQL "):
                totals["statements"] += n
                totals[label] += n
            elif label == "connect":
                totals["connections"] += n
            elif label == "Heart.beat_once":
                totals["beats"] += n
    return dict(totals)


def real_rows(results: list[tuple[str, dict[str, Any]]]) -> tuple[str, str]:
    rows = []
    detail_rows = []
    for label, result in results:
        counts, seconds = result["counts"], result["seconds"]
        beats = max(counts.get("beats", 0), 1)
        per_min = 60.0 / seconds
        rows.append(
            [
                label,
                f"{seconds:.0f}",
                f"{counts.get('beats', 0):.0f}",
                f"{counts.get('statements', 0) / beats:.1f}",
                f"{counts.get('statements', 0) * per_min:.1f}",
                f"{counts.get('connections', 0) * per_min:.1f}",
            ]
        )
        for key, value in sorted(counts.items(), key=lambda kv: -kv[1]):
            if key.startswith("SQL "):
                detail_rows.append([label, key[4:], f"{value / beats:.2f}"])
    headers = [
        "worker (one, idle)", "window s", "heartbeats", "statements per heartbeat",
        "statements per minute", "new connections per minute",
    ]  # fmt: skip
    return table(headers, rows), table(["worker", "statement", "per heartbeat"], detail_rows)


# --------------------------------------------------------------------------------------------
# 2. simulated workers


def simulate(argv: list[str]) -> None:
    """Runs in a subprocess with Django set up: ``--workers N --interval S --seconds T
    --threads K``; prints a JSON line of measurements."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int)
    parser.add_argument("--interval", type=float)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    import django

    django.setup()
    import uuid

    from django.db import connections
    from django.db.backends.signals import connection_created

    from worker_health import heartbeat

    statements = [0]
    connects = [0]
    lock = threading.Lock()

    def counter(execute: Any, sql: str, params: Any, many: bool, ctx: Any) -> Any:
        with lock:
            statements[0] += 1
        return execute(sql, params, many, ctx)

    def on_connect(sender: Any = None, connection: Any = None, **_: Any) -> None:
        with lock:
            connects[0] += 1
        if counter not in connection.execute_wrappers:  # the same wrapper reconnects
            connection.execute_wrappers.append(counter)

    connection_created.connect(on_connect, weak=False)

    hearts: list[heartbeat.Heart] = []
    run_id = uuid.uuid4().hex[:6]
    for i in range(args.workers):
        identity = heartbeat.WorkerIdentity(
            worker_id=f"sim-{run_id}-{i}@bench-host",
            incarnation=uuid.uuid4(),
            metadata={"pool": "prefork", "concurrency": 2},
        )
        heartbeat.register(identity)
        heart = heartbeat.Heart(identity)
        heart.registered = True
        hearts.append(heart)
    connections.close_all()

    stop = threading.Event()
    latencies: list[float] = []
    beats = [0]
    start = time.monotonic() + 0.5
    # spread the workers' phases over one interval, as real workers' are
    due = [start + args.interval * i / args.workers for i in range(args.workers)]

    def drive(index: int) -> None:
        mine = list(range(index, args.workers, args.threads))
        while not stop.is_set():
            now = time.monotonic()
            next_due = min(due[i] for i in mine)
            if next_due > now:
                stop.wait(min(next_due - now, 0.05))
                continue
            for i in mine:
                if due[i] <= time.monotonic() and not stop.is_set():
                    heart = hearts[i]
                    t0 = time.perf_counter()
                    if heart.beat_once():
                        heart._audit_claims()
                        heart._maybe_sweep()
                    latency = time.perf_counter() - t0
                    with lock:
                        latencies.append(latency)
                        beats[0] += 1
                    due[i] += args.interval
        connections.close_all()

    threads = [threading.Thread(target=drive, args=(k,), daemon=True) for k in range(args.threads)]
    for t in threads:
        t.start()
    time.sleep(0.5 + min(args.interval, 5.0))  # warm-up: every thread connected
    with lock:
        s0, c0, b0, n0 = statements[0], connects[0], beats[0], len(latencies)
    print(json.dumps({"event": "window-start"}), flush=True)
    t0 = time.monotonic()
    time.sleep(args.seconds)
    with lock:
        s1, c1, b1 = statements[0], connects[0], beats[0]
        window = latencies[n0:]
    took = time.monotonic() - t0
    print(
        json.dumps(
            {
                "event": "window-end",
                "seconds": took,
                "beats": b1 - b0,
                "statements": s1 - s0,
                "connections": c1 - c0,
                "p50_ms": quantile(window, 0.5) * 1000,
                "p99_ms": quantile(window, 0.99) * 1000,
                "max_ms": max(window) * 1000 if window else 0,
            }
        ),
        flush=True,
    )
    stop.set()
    for t in threads:
        t.join(30)


def run_simulation(
    db: BenchDatabase, workers: int, interval: float, seconds: float, conn_max_age: int
) -> dict[str, Any]:
    env = clean_env(
        BENCH_VARIANT="worker_health",
        DATABASE_URL=db.url,
        CELERY_BROKER_URL="memory://",
        WORKER_HEALTH_HEARTBEAT_INTERVAL=str(interval),
        WORKER_HEALTH_BEAT_SCHEDULE="false",
        BENCH_CONN_MAX_AGE=str(conn_max_age),
    )
    with db.connect(autocommit=True) as conn:
        conn.execute("DELETE FROM task_queue")
        conn.execute("DELETE FROM worker_health_event")
        conn.execute("DELETE FROM worker_registry")
        conn.execute("DELETE FROM worker_health_detector")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.heartbeat", "--simulate", "--workers", str(workers),
         "--interval", str(interval), "--seconds", str(seconds)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    result: dict[str, Any] = {}
    cpu0 = stats0 = None
    pids: list[int] = []
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        data = json.loads(line)
        if data["event"] == "window-start":
            pids = backend_pids(db)
            cpu0 = sum(cpu_seconds(p) for p in pids)
            stats0 = db.stats()
        elif data["event"] == "window-end":
            cpu1 = sum(cpu_seconds(p) for p in pids)
            result = data
            result["backend_cpu"] = cpu1 - (cpu0 or 0)
    proc.wait(120)
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"simulation failed:\n{proc.stderr.read() if proc.stderr else ''}")
    time.sleep(1.0)
    stats1 = db.stats()
    for key in ("xact_commit", "tup_updated", "tup_inserted", "tup_fetched"):
        result[key] = (stats1[key] - (stats0 or {}).get(key, 0)) / result["seconds"]
    return result


def sim_row(label: str, workers: int, interval: float, r: dict[str, Any]) -> list[str]:
    seconds = r["seconds"]
    return [
        label,
        f"{workers:,}",
        f"{interval:g}",
        f"{r['beats'] / seconds:.1f} (expected {workers / interval:.1f})",
        f"{r['statements'] / seconds:.0f}",
        f"{r['statements'] / max(r['beats'], 1):.2f}",
        f"{r['connections'] / seconds:.1f}",
        f"{r['xact_commit']:.0f}",
        f"{r['tup_updated']:.0f}",
        f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}",
        f"{r['backend_cpu'] / seconds * 100:.1f} %" if r["backend_cpu"] else "n/a",
    ]


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] == "--simulate":
        simulate(args_list[1:])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60, help="window, fast settings")
    parser.add_argument("--default-seconds", type=float, default=150, help="window, defaults")
    parser.add_argument("--workers", type=int, default=1000, help="simulated workers")
    parser.add_argument("--sim-seconds", type=float, default=60)
    parser.add_argument(
        "--sims",
        default="30,3,30-as-shipped",
        help="simulations: heartbeat interval, '-as-shipped' for CONN_MAX_AGE=0",
    )
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(args_list)
    info = print_machine()
    workdir = Path(tempfile.mkdtemp(prefix="bench-hb-"))
    try:
        with bench_database("heartbeat") as db, redis_broker(workdir, REDIS_DB) as broker:
            results = []
            if args.seconds:
                results.append(
                    ("1/3/1 s", real_worker(db, workdir, broker, args.seconds, fast=True))
                )
            if args.default_seconds:
                results.append(
                    (
                        "30/60/30 s (defaults)",
                        real_worker(db, workdir, broker, args.default_seconds, False),
                    )
                )
            real_text, detail_text = real_rows(results)
            print(real_text)
            print(detail_text)
            sims = []
            plans = []
            for spec in args.sims.split(","):
                shipped = spec.endswith("-as-shipped")
                interval = float(spec.removesuffix("-as-shipped"))
                label = "as shipped (CONN_MAX_AGE=0)" if shipped else "persistent connections"
                plans.append((label, interval, 0 if shipped else 600))
            for label, interval, max_age in plans:
                r = run_simulation(db, args.workers, interval, args.sim_seconds, max_age)
                sims.append(sim_row(label, args.workers, interval, r))
                print(" | ".join(sims[-1]), flush=True)
            headers = [
                "connections", "workers", "heartbeat interval s", "heartbeat cycles/s",
                "statements/s", "statements per cycle", "new connections/s", "commits/s",
                "rows updated/s", "cycle latency p50 / p99 ms",
                "PostgreSQL backend CPU (% of one core)",
            ]  # fmt: skip
            sim_text = table(headers, sims)
            print()
            print(sim_text)
        if args.write_docs:
            body = (
                f"Measured {stamp()} with `python -m bench.heartbeat` on: "
                f"{machine_markdown(info)}.\n\n{real_text}\n\nStatements of one heartbeat "
                f"cycle:\n\n{detail_text}\n\n{args.workers:,} simulated workers "
                f"({args.sim_seconds:.0f} s windows):\n\n{sim_text}\n"
            )
            write_section(DOCS / "benchmarks.md", "heartbeat", body)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
