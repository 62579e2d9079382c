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

_never = threading.Event()


def pause(seconds: float) -> None:
    """Wait ``seconds`` (nothing for zero or less)."""
    if seconds > 0:
        _never.wait(seconds)
