"""example_project.fs_transport: kombu's filesystem transport, with acknowledgements."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue
from kombu.transport.virtual import BrokerState

from example_project.fs_transport import INFLIGHT, recover_orphans

TRANSPORT = "example_project.fs_transport:Transport"
ROOT = Path(__file__).resolve().parent.parent


def options(folder: Path) -> dict[str, object]:
    return {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
    }


@pytest.fixture
def broker(tmp_path: Path) -> Path:
    (tmp_path / "queue").mkdir()
    return tmp_path


def connect(broker: Path) -> Connection:
    c = Connection(transport=TRANSPORT, transport_options=options(broker))
    # kombu keeps the filesystem transport's bindings for the whole process: each test
    # has a broker folder (and bindings) of its own
    c.transport.state = BrokerState()
    return c


@pytest.fixture
def conn(broker: Path) -> Iterator[Connection]:
    with connect(broker) as c:
        yield c


QUEUE = Queue("jobs", Exchange("jobs", type="direct"), routing_key="jobs")


def publish(conn: Connection, *bodies: str) -> None:
    with conn.Producer() as producer:
        for body in bodies:
            producer.publish(body, exchange=QUEUE.exchange, routing_key="jobs", declare=[QUEUE])


def messages(broker: Path) -> list[Path]:
    return sorted(p for p in (broker / "queue").iterdir() if p.is_file())


def inflight(broker: Path) -> list[Path]:
    return sorted((broker / "queue" / INFLIGHT).glob("*/*"))


def test_a_read_message_is_held_until_acknowledged(broker: Path, conn: Connection) -> None:
    publish(conn, "a", "b")
    channel = conn.default_channel
    first = QUEUE(channel).get()
    assert first is not None and first.payload == "a"
    assert len(messages(broker)) == 1 and len(inflight(broker)) == 1
    first.ack()
    assert len(inflight(broker)) == 0
    second = QUEUE(channel).get()
    assert second is not None and second.payload == "b"
    second.ack()
    assert messages(broker) == [] and inflight(broker) == []


def test_a_rejected_message_with_requeue_goes_back_once(broker: Path, conn: Connection) -> None:
    publish(conn, "a")
    msg = QUEUE(conn.default_channel).get()
    assert msg is not None
    msg.reject(requeue=True)
    assert inflight(broker) == [] and len(messages(broker)) == 1
    again = QUEUE(conn.default_channel).get()
    assert again is not None and again.payload == "a"
    again.ack()


def test_closing_the_channel_puts_back_what_was_not_acknowledged(broker: Path) -> None:
    with connect(broker) as c:
        publish(c, "a", "b")
        assert QUEUE(c.default_channel).get() is not None
        assert len(inflight(broker)) == 1
    assert inflight(broker) == []
    assert not list((broker / "queue" / INFLIGHT).iterdir())  # its folder and lock are gone
    with connect(broker) as c:
        got = sorted(m.payload for m in iter(lambda: QUEUE(c.default_channel).get(), None))
    assert got == ["a", "b"]


def test_messages_consumed_without_acknowledgement_are_deleted_when_read(
    broker: Path, conn: Connection
) -> None:
    publish(conn, "a")
    msg = QUEUE(conn.default_channel).get(no_ack=True)
    assert msg is not None and msg.payload == "a"
    assert messages(broker) == [] and inflight(broker) == []


CONSUMER = textwrap.dedent(
    """
    import sys, time
    from kombu import Connection, Exchange, Queue
    queue = Queue("jobs", Exchange("jobs", type="direct"), routing_key="jobs")
    with Connection(transport=%r, transport_options=%r) as c:
        for _ in range(2):
            assert queue(c.default_channel).get() is not None
        print("holding", flush=True)
        time.sleep(60)
    """
)


def held_by_a_child(broker: Path) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CONSUMER % (TRANSPORT, options(broker))],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "holding"
    return child


def test_the_messages_of_a_killed_consumer_go_back_to_the_queue(
    broker: Path, conn: Connection
) -> None:
    publish(conn, "a", "b", "c")
    child = held_by_a_child(broker)
    try:
        assert len(messages(broker)) == 1 and len(inflight(broker)) == 2
        # its owner lives: nothing moves
        assert recover_orphans(broker / "queue") == 0
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        # the next read of a live consumer finds the owner gone and takes the messages back
        got = []
        while (msg := QUEUE(conn.default_channel).get()) is not None:
            got.append(msg.payload)
            msg.ack()
        assert sorted(got) == ["a", "b", "c"]
        assert messages(broker) == [] and inflight(broker) == []
        # only the reader's own folder and lock are left
        left = [p.name for p in (broker / "queue" / INFLIGHT).iterdir()]
        assert all(name.startswith(f"{os.getpid()}-") for name in left), left
    finally:
        child.kill()
        child.wait(10)
