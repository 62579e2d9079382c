"""Instruments a benchmark worker, identically in every variant.

* **Completion counter** (``BENCH_PROBE_REDIS`` + ``BENCH_PROBE_KEY``): each process that runs
  tasks counts them in memory and, from a thread of its own every 50 ms, writes
  ``count first_start last_end`` into a Redis hash field named by its pid. No I/O on the
  task's path, so the counter costs the same (next to nothing) in every variant.
* **Profiler** (``BENCH_PROFILE_DIR``, only for profiling runs): every SQL statement is
  timed on the client (by thread and statement shape), and worker_health's tracking steps
  are wrapped with timers (wall time per call). Each process writes its totals to
  ``BENCH_PROFILE_DIR/<pid>.json``. Nothing in worker_health is changed: the wrappers are
  installed from outside, at import time, before the worker forks its pool.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import signals

_lock = threading.Lock()
_count = 0
_first: float | None = None
_last: float | None = None
_flusher_pid: int | None = None

#: (thread kind, label) -> [calls, wall seconds, thread CPU seconds]
_timings: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])


def _thread_kind() -> str:
    name = threading.current_thread().name
    if name.startswith("worker-health-db"):
        return "dbthread"
    if name.startswith("worker-health-recorder"):
        return "recorder"
    if name.startswith("worker-health-heart"):
        return "heart"
    if name.startswith("worker-health-sweep"):
        return "sweep"
    if threading.current_thread() is threading.main_thread():
        return "main"
    return name.split("-")[0] or "thread"


def _add(label: str, seconds: float, cpu: float = 0.0, kind: str | None = None) -> None:
    key = (kind or _thread_kind(), label)
    with _lock:
        entry = _timings[key]
        entry[0] += 1
        entry[1] += seconds
        entry[2] += cpu


def _forget_parent(**_: Any) -> None:
    """A new pool process: what the parent measured is not ours."""
    global _count, _first, _last
    with _lock:
        _timings.clear()
    _count, _first, _last = 0, None, None


# --------------------------------------------------------------------------------------------
# completion counter


def _on_prerun(**_: Any) -> None:
    global _first
    if _first is None:
        _first = time.time()
    _ensure_flusher()


def _on_postrun(**_: Any) -> None:
    global _count, _last
    _count += 1
    _last = time.time()


def _ensure_flusher() -> None:
    global _flusher_pid
    if _flusher_pid == os.getpid():
        return
    _flusher_pid = os.getpid()
    threading.Thread(target=_flush_loop, name="bench-probe", daemon=True).start()


def _flush_loop() -> None:
    url = os.environ.get("BENCH_PROBE_REDIS")
    key = os.environ.get("BENCH_PROBE_KEY")
    profile_dir = os.environ.get("BENCH_PROFILE_DIR")
    client = None
    if url and key:
        import redis

        client = redis.Redis.from_url(url)
    pid = os.getpid()
    reported: tuple[int, float | None] = (-1, None)
    last_profile = 0.0
    while True:
        time.sleep(0.05)
        now = (_count, _last)
        if client is not None and now != reported:
            try:
                client.hset(key, str(pid), f"{_count} {_first or 0} {_last or 0}")  # type: ignore[arg-type]
                reported = now
            except Exception:
                pass
        if profile_dir and time.monotonic() - last_profile > 0.5:
            last_profile = time.monotonic()
            write_profile(Path(profile_dir))


# --------------------------------------------------------------------------------------------
# profiler

_SQL_SHAPE = re.compile(r"^(SELECT|INSERT INTO|UPDATE|DELETE FROM)\s+(.*?)$", re.S | re.I)


def sql_shape(sql: str) -> str:
    """A short, parameter-free name for a statement: verb, table, the first columns set."""
    text = " ".join(sql.split())
    head = text[:12].upper()
    if head.startswith("SELECT"):
        match = re.search(r'FROM\s+("?[\w.]+"?)', text, re.I)
        table = match.group(1) if match else "?"
        what = "EXISTS" if "EXISTS" in text[:40].upper() else "SELECT"
        return f"{what} {table}"
    if head.startswith("INSERT"):
        match = re.match(r'INSERT INTO\s+("?[\w.]+"?)', text, re.I)
        conflict = (
            " ON CONFLICT UPDATE"
            if "DO UPDATE" in text.upper()
            else (" ON CONFLICT NOTHING" if "DO NOTHING" in text.upper() else "")
        )
        return f"INSERT {match.group(1) if match else '?'}{conflict}"
    if head.startswith("UPDATE"):
        match = re.match(r'UPDATE\s+("?[\w.]+"?)\s+SET\s+(.*?)\s+WHERE', text, re.I)
        if match:
            columns = re.findall(r'"(\w+)"\s*=', match.group(2))[:2]
            return f"UPDATE {match.group(1)} SET {','.join(columns)}"
        return "UPDATE ?"
    return text.split(" ", 1)[0].upper()


def _sql_timer(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
    started, cpu = time.perf_counter(), time.thread_time()
    try:
        return execute(sql, params, many, context)
    finally:
        _add("SQL " + sql_shape(sql), time.perf_counter() - started, time.thread_time() - cpu)


def _on_connection_created(sender: Any = None, connection: Any = None, **_: Any) -> None:
    if connection is None:
        return
    _add("connect", 0.0)  # every (re)connection
    if _sql_timer not in connection.execute_wrappers:
        connection.execute_wrappers.append(_sql_timer)


def _timed(label: str, fn: Callable[..., Any], *, by_caller: bool = False) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        name = label
        if by_caller:
            name = f"{label} from {sys._getframe(1).f_code.co_name}"
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(name, time.perf_counter() - started, time.thread_time() - cpu)

    wrapper._bench_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def _wrap(owner: Any, attr: str, label: str, *, by_caller: bool = False) -> None:
    fn = getattr(owner, attr)
    if getattr(fn, "_bench_wrapped", False):
        return
    setattr(owner, attr, _timed(label, fn, by_caller=by_caller))


def install_profiler() -> None:
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection_created, dispatch_uid="bench.probe.sql")
    signals.task_prerun.connect(
        lambda **_: _add("task", 0.0), weak=False, dispatch_uid="bench.probe.tasks"
    )
    try:
        from worker_health import (
            completions,
            dbthread,
            gate,
            heartbeat,
            loopwriter,
            querysets,
            relay,
            tracking,
        )
    except Exception:  # the variant without worker_health
        return
    _wrap(loopwriter.LoopWriter, "_send", "LoopWriter._send (event loop: build, send)")
    _wrap(loopwriter.LoopWriter, "_on_readable", "LoopWriter._on_readable (event loop: answer)")
    _wrap(gate.Gate, "__call__", "Gate.__call__ (event loop)")
    _wrap(gate.Gate, "_on_relayed", "Gate._on_relayed (event loop: read the relay)")
    _wrap(gate.Gate, "_write_batch", "Gate._write_batch (gate thread)")
    _wrap(relay.Relay, "send", "Relay.send (pool process)")
    _wrap(completions, "add", "completions.add (pool process)")
    _wrap(querysets.TaskQuerySet, "claim_and_finish", "TaskQueue.claim_and_finish")
    _wrap(querysets.TaskQuerySet, "finish_many", "TaskQueue.finish_many")
    _wrap(dbthread, "call", "dbthread.call (wall, task thread waits)", by_caller=True)
    _wrap(dbthread, "_guarded", "dbthread job (on the db thread)")
    _wrap(querysets.TaskQuerySet, "claim", "TaskQueue.claim")
    _wrap(querysets.TaskQuerySet, "finish", "TaskQueue.finish")
    _wrap(querysets.TaskQuerySet, "reserve", "TaskQueue.reserve (batch)")
    _wrap(querysets.TaskQuerySet, "record_published", "TaskQueue.record_published")
    _wrap(tracking, "delivery_from_request", "delivery_from_request (gate thread, recorder)")
    _wrap(tracking, "claim_row", "claim_row (event loop: a task's row of the batch)")
    _wrap(tracking, "claim_before_start", "claim_before_start (task thread)")
    _wrap(tracking.Recorder, "add", "Recorder.add (event loop)")
    _wrap(tracking.Recorder, "_write_pending", "Recorder._write_pending")
    _wrap(heartbeat.Heart, "beat_once", "Heart.beat_once")
    _wrap(heartbeat.Heart, "_audit_claims", "Heart._audit_claims")
    _wrap(heartbeat.Heart, "_maybe_sweep", "Heart._maybe_sweep")


def _on_task_received(**_: Any) -> None:
    _add("task_received", 0.0)


def write_profile(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with _lock:
        data = {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "cpu": list(os.times())[:2],
            "timings": [[k, label, n, s, c] for (k, label), (n, s, c) in _timings.items()],
        }
    tmp = directory / f".{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(directory / f"{os.getpid()}.json")


# --------------------------------------------------------------------------------------------
# wiring


def connect() -> None:
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="bench.probe.prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="bench.probe.postrun")
    if os.environ.get("BENCH_PROFILE_DIR"):
        install_profiler()
        signals.worker_process_init.connect(
            _forget_parent, weak=False, dispatch_uid="bench.probe.forget"
        )
        signals.task_received.connect(
            _on_task_received, weak=False, dispatch_uid="bench.probe.received"
        )
        # the main process (receiver, recorder, heart) reports too
        signals.worker_ready.connect(
            lambda **_: _ensure_flusher(), weak=False, dispatch_uid="bench.probe.ready"
        )
