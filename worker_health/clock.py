"""Waiting without ``time.sleep``.

``time.sleep`` waits on an absolute deadline of ``CLOCK_MONOTONIC`` (``clock_nanosleep``);
under libfaketime with a real monotonic clock (``FAKETIME_DONT_FAKE_MONOTONIC=1``, how the
chaos suite shifts a worker's wall clock by minutes) that call fails with ``EINVAL``, and a
worker_health thread that slept with it died: the loop writer's connecting thread, and with
it every claim (the gate held what it received, forever). A timed wait on an event uses the
same monotonic clock through the interpreter's lock and is not affected.
"""

from __future__ import annotations

import threading


def pause(seconds: float) -> None:
    """Wait ``seconds`` (nothing for zero or less). A new event each time: one shared by
    threads could be copied into a forked pool process with its lock taken."""
    if seconds > 0:
        threading.Event().wait(seconds)
