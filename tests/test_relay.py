"""worker_health.relay: prefork pool processes hand completions to the main process."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from worker_health.relay import MAX_LINE, Relay, Relayed


@pytest.fixture
def relay() -> Iterator[Relay]:
    r = Relay()
    yield r
    r.close()


def in_child(fn: object) -> None:
    """Run ``fn`` in a forked process (as a pool process would) and wait for it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            code = 0 if fn() else 3  # type: ignore[operator]
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_main_process_itself_does_not_relay(relay: Relay) -> None:
    assert relay.send("t1", 1, "succeeded", "SUCCESS") is False
    assert relay.receive() == []


def test_a_forked_process_relays_completions_in_order(relay: Relay) -> None:
    def child() -> bool:
        return all(relay.send(f"t{i}", i, "succeeded", "SUCCESS") for i in range(100))

    in_child(child)
    odd = ['odd\nid\t"é', "[looks-like-json]", "sep\x1finside", '["t",1,"s","S"]', "", "\ud800"]
    in_child(lambda: all(relay.send(task_id, 7, "failed", "FAILURE") for task_id in odd))
    in_child(lambda: relay.send("t", 8, "failed", "ODD\x1fSTATE\n"))
    got = relay.receive()
    assert got[:100] == [Relayed(f"t{i}", i, "succeeded", "SUCCESS") for i in range(100)]
    assert got[100:-1] == [Relayed(task_id, 7, "failed", "FAILURE") for task_id in odd]
    assert got[-1] == Relayed("t", 8, "failed", "ODD\x1fSTATE\n")
    assert relay.receive() == []  # nothing twice


def test_a_line_too_long_to_be_atomic_is_not_relayed(relay: Relay) -> None:
    in_child(lambda: relay.send("x" * MAX_LINE, 1, "succeeded", "SUCCESS") is False)
    assert relay.receive() == []


def test_a_full_pipe_refuses_instead_of_blocking_the_pool_process(relay: Relay) -> None:
    def child() -> bool:
        started = time.monotonic()
        sent = 0
        while relay.send(f"task-{sent:08d}", 1, "succeeded", "SUCCESS"):
            sent += 1
        return sent > 100 and time.monotonic() - started < 10

    in_child(child)
    got = relay.receive()
    assert len(got) > 100 and got[0].task_id == "task-00000000"


def test_a_partial_line_waits_for_its_end(relay: Relay) -> None:
    os.write(relay.write_fd, b'["t1",1,"succeeded","SUCCESS"]\n["t2",2,')
    assert relay.receive() == [Relayed("t1", 1, "succeeded", "SUCCESS")]
    os.write(relay.write_fd, b'"failed","FAILURE"]\n')
    assert relay.receive() == [Relayed("t2", 2, "failed", "FAILURE")]
