"""A per-process thread that owns a persistent database connection for tracking writes.

Celery's Django fix-up closes the task thread's connections before and after every task
(unless ``CELERY_DB_REUSE_MAX`` is set), so tracking writes made on the task thread would
open a new connection per task. Django connections are per thread: writes submitted here
run on a thread whose connection nothing else closes. The thread is re-created after a fork.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from django.db import InterfaceError, OperationalError, close_old_connections, connections

from .durability import relax_connection

logger = logging.getLogger("worker_health")

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_pid: int | None = None


def _executor_for_this_process() -> ThreadPoolExecutor:
    global _executor, _executor_pid
    pid = os.getpid()
    if _executor is None or _executor_pid != pid:
        with _lock:
            if _executor is None or _executor_pid != pid:
                # After a fork the parent's thread does not exist here: start our own.
                _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-health-db")
                _executor_pid = pid
    return _executor


def drop_connections() -> None:
    """Close this thread's connections (broken ones too): the next query reconnects."""
    for conn in connections.all(initialized_only=True):
        with contextlib.suppress(Exception):  # it is broken anyway
            conn.close()


def _guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; if the connection turns out to be dead (the database restarted or
    dropped it while idle), reconnect and run it once more."""
    try:
        relax_connection()
        return fn()
    except (OperationalError, InterfaceError):
        if any(conn.in_atomic_block for conn in connections.all(initialized_only=True)):
            raise
        drop_connections()
        relax_connection()
        return fn()
    except Exception:
        close_old_connections()
        raise


def submit(fn: Callable[[], T]) -> Future[T]:
    """Run ``fn`` on this process's tracking thread."""
    return _executor_for_this_process().submit(_guarded, fn)


def submit_unguarded(fn: Callable[[], T]) -> Future[T]:
    """Run ``fn`` on this process's tracking thread as it is: ``fn`` handles database
    errors (and reconnects) itself."""
    return _executor_for_this_process().submit(fn)


def call(fn: Callable[[], T], timeout: float | None = None) -> T:
    """Run ``fn`` on this process's tracking thread and wait for its result."""
    return submit(fn).result(timeout=timeout)


def shutdown() -> None:
    global _executor
    with _lock:
        if _executor is not None and _executor_pid == os.getpid():
            _executor.submit(connections.close_all)
            _executor.shutdown(wait=True)
        _executor = None
