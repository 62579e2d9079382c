"""worker_health.clock: waiting without time.sleep (which libfaketime can break)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from worker_health import clock, loopwriter


def test_pause_waits_without_time_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_sleep(_: float) -> None:  # as under libfaketime with a real monotonic clock
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(time, "sleep", broken_sleep)
    started = time.monotonic()
    clock.pause(0.05)
    clock.pause(0)
    clock.pause(-1)
    assert 0.05 <= time.monotonic() - started < 1.0


class FakeHub:
    def __init__(self) -> None:
        self.soon: list[tuple[Any, tuple[Any, ...]]] = []

    def call_soon(self, fn: Any, *args: Any) -> None:
        self.soon.append((fn, args))


def test_the_loop_writer_connect_thread_reports_any_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever fails while connecting (even the wait before it) reaches the loop as a
    failed attempt: the writer then runs what it holds untracked and tries again. (A
    thread that died there left the gate holding every task it received.)"""

    def broken_pause(_: float) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(loopwriter, "pause", broken_pause)
    hub = FakeHub()
    writer = loopwriter.LoopWriter(gate=None, hub=hub)  # type: ignore[arg-type]
    writer._connect(0.2)
    assert [fn.__name__ for fn, _ in hub.soon] == ["_connect_failed"]
    assert isinstance(hub.soon[0][1][0], OSError)
