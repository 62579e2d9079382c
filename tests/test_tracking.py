"""worker_health.tracking: which tasks are tracked, and what a publish and a delivery record."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from worker_health import tracking
from worker_health.models import TaskQueue
from worker_health.tracking import is_tracked

#: pytest-django's ``settings`` fixture (its class was renamed between releases)
SettingsWrapper = Any
CaptureCallbacks = Callable[..., Any]


@pytest.fixture
def track(settings: SettingsWrapper) -> Callable[[Any], None]:
    def set_track(value: Any) -> None:
        settings.WORKER_HEALTH_TRACK_TASKS = value

    return set_track


@pytest.mark.parametrize("value", [None, "__all__"])
def test_everything_is_tracked_by_default(track: Callable[[Any], None], value: Any) -> None:
    track(value)
    assert is_tracked("myapp.tasks.add")
    assert is_tracked("other.job", "celery")


def test_unset_means_everything(settings: SettingsWrapper) -> None:
    if hasattr(settings, "WORKER_HEALTH_TRACK_TASKS"):
        del settings.WORKER_HEALTH_TRACK_TASKS
    assert is_tracked("myapp.tasks.add")


@pytest.mark.parametrize("value", [None, ["*"], ["worker_health.*"], ["celery"]])
def test_own_tasks_are_never_tracked(track: Callable[[Any], None], value: Any) -> None:
    track(value)
    assert not is_tracked("worker_health.tasks.detect_failed_workers", "celery")
    assert not is_tracked("worker_health.tasks.prune_finished_tasks")


@pytest.mark.parametrize("name", [None, ""])
def test_a_task_without_a_name_is_not_tracked(track: Callable[[Any], None], name: Any) -> None:
    track(None)
    assert not is_tracked(name, "celery")


def test_name_patterns(track: Callable[[Any], None]) -> None:
    track(["myapp.tasks.*", "billing.charge"])
    assert is_tracked("myapp.tasks.add")
    assert is_tracked("myapp.tasks.sub.deep")
    assert is_tracked("billing.charge")
    assert not is_tracked("billing.charge_later")
    assert not is_tracked("otherapp.tasks.add")
    assert not is_tracked("MyApp.tasks.add")  # case-sensitive, like task names


def test_queue_names(track: Callable[[Any], None]) -> None:
    track(["critical"])
    assert is_tracked("anything.at.all", "critical")
    assert not is_tracked("anything.at.all", "default")
    assert not is_tracked("anything.at.all")
    assert not is_tracked("critical.job", "default")  # a queue name is not a name prefix


def test_patterns_and_queues_together(track: Callable[[Any], None]) -> None:
    track(["myapp.*", "critical"])
    assert is_tracked("myapp.x", "default")
    assert is_tracked("other.x", "critical")
    assert not is_tracked("other.x", "default")


def test_an_empty_list_tracks_nothing(track: Callable[[Any], None]) -> None:
    track([])
    assert not is_tracked("myapp.tasks.add", "celery")


# --------------------------------------------------------------------------------------------
# publish


@pytest.mark.django_db
def test_publish_of_a_tracked_task_records_a_queued_row_on_commit(
    track: Callable[[Any], None], django_capture_on_commit_callbacks: CaptureCallbacks
) -> None:
    track(["myapp.*"])
    eta = "2030-01-01T00:00:00+00:00"
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        tracking.on_before_task_publish(
            sender="myapp.add",
            headers={"id": "t1", "task": "myapp.add", "eta": eta},
            routing_key="celery",
        )
        assert not TaskQueue.objects.exists()  # not before the publisher commits
    assert len(callbacks) == 1
    task = TaskQueue.objects.get(task_id="t1")
    assert (task.status, task.task_name, task.queue) == ("queued", "myapp.add", "celery")
    assert task.eta == datetime(2030, 1, 1, tzinfo=timezone.utc)


@pytest.mark.django_db
def test_publish_of_untracked_or_own_tasks_records_nothing(
    track: Callable[[Any], None], django_capture_on_commit_callbacks: CaptureCallbacks
) -> None:
    track(["myapp.*"])
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        tracking.on_before_task_publish(
            sender="other.job", headers={"id": "t1", "task": "other.job"}, routing_key="celery"
        )
        tracking.on_before_task_publish(
            sender="worker_health.tasks.detect_failed_workers",
            headers={"id": "t2", "task": "worker_health.tasks.detect_failed_workers"},
            routing_key="celery",
        )
        tracking.on_before_task_publish(sender="myapp.add", headers={}, routing_key="celery")
    assert callbacks == []
    assert not TaskQueue.objects.exists()


# --------------------------------------------------------------------------------------------
# delivery


def fake_request(body: Any) -> Any:
    when = datetime(2030, 1, 1, tzinfo=timezone.utc)
    message = SimpleNamespace(
        body=body,
        headers={"id": "t1", "task": "myapp.add", "eta": when.isoformat(), "obj": object()},
        properties={"correlation_id": "t1", "priority": 5, "reply_to": "r", "bogus": "x"},
        delivery_info={"exchange": "ex", "routing_key": "critical"},
        content_type="application/json",
        content_encoding="utf-8",
    )
    return SimpleNamespace(id="t1", name="myapp.add", message=message)


def test_delivery_from_request_keeps_the_message_byte_for_byte() -> None:
    body = b'[[1, 2], {"x": "\\u00e9"}, {}]'
    d = tracking.delivery_from_request(fake_request(body))
    assert d.body == body
    assert (d.task_id, d.task_name, d.queue, d.exchange, d.routing_key) == (
        "t1",
        "myapp.add",
        "critical",
        "ex",
        "critical",
    )
    assert d.properties == {"correlation_id": "t1", "priority": 5, "reply_to": "r"}
    assert d.content_type == "application/json"
    assert d.eta == datetime(2030, 1, 1, tzinfo=timezone.utc)
    # headers are stored as JSON: anything else becomes its repr
    assert d.headers["id"] == "t1"
    assert isinstance(d.headers["obj"], str)


def test_delivery_from_request_encodes_a_text_body() -> None:
    d = tracking.delivery_from_request(fake_request('[[], {"x": "é"}, {}]'))
    assert d.body == '[[], {"x": "é"}, {}]'.encode()


@pytest.mark.parametrize(
    ("body", "headers", "properties", "info"),
    [
        (b'[[1, 2], {"x": "\\u00e9"}, {}]', None, None, None),
        ('[[], {"x": "é"}, {}]', None, None, None),
        (None, {}, {}, {}),
        (
            b"\x80\x04\x95pickled",
            {
                "id": "t1",
                "eta": datetime(2030, 1, 1, tzinfo=timezone.utc),
                "expires": "2030-01-02T00:00:00+00:00",
                "timelimit": (None, 5),
                "nested": {"when": datetime(2030, 1, 1), 3: [object(), (1, 2)]},
                7: "int key",
                "obj": object(),
                "stamps": {},
            },
            {"delivery_mode": 2, "priority": 0, "correlation_id": "t1", "x": 1},
            {"exchange": None, "routing_key": None},
        ),
        (b"{}", {"eta": "not a date", "expires": ""}, None, {"exchange": "ex"}),
    ],
)
def test_claim_row_is_the_json_row_of_the_delivery(
    body: Any, headers: Any, properties: Any, info: Any
) -> None:
    """The loop writer's fast path builds exactly what the gate's thread sends."""
    request = fake_request(body)
    message = request.message
    if headers is not None:
        message.headers = headers
    if properties is not None:
        message.properties = properties
    if info is not None:
        message.delivery_info = info
    assert tracking.claim_row(request) == tracking.delivery_from_request(request).json_row()


# --------------------------------------------------------------------------------------------
# Task.replace


def test_replace_requeues_the_running_task_before_the_replacement_is_published(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replacement chain carries the task's id in its *last* task, published later: the
    row must be queued again at once, or that delivery is skipped as a duplicate."""
    from celery import Celery, Task

    calls: list[tuple[str, Any]] = []

    class Replacing(Task):  # type: ignore[misc]
        def on_replace(self, sig: Any) -> Any:
            calls.append(("original on_replace", sig))
            return "replaced"

    class Host(Replacing):
        name = "replace-test.host"

        def run(self) -> None:  # pragma: no cover - never run
            pass

    class Child(Host):  # a task class derived from another one, both registered
        name = "replace-test.child"

    app = Celery("replace-test", set_as_current=False)
    host, child = app.register_task(Host()), app.register_task(Child())
    tracking.install_claim_hooks(SimpleNamespace(app=app))
    tracking.install_claim_hooks(SimpleNamespace(app=app))  # idempotent
    monkeypatch.setattr(
        tracking, "_requeue_own", lambda task_id, token: calls.append(("requeue", task_id))
    )
    monkeypatch.setitem(tracking._tokens, "t-1", 7)

    host.push_request(id="t-1", is_eager=False)
    try:
        assert host.on_replace("the chain") == "replaced"
    finally:
        host.pop_request()
    assert calls == [("requeue", "t-1"), ("original on_replace", "the chain")]

    # a subclass of a hooked task class calls the originals once, not the hooks again
    assert Child.__dict__["_worker_health_original_before_start"] is None
    assert Child.__dict__["_worker_health_original_on_replace"] is Replacing.on_replace
    calls.clear()
    child.push_request(id="t-2", is_eager=False)
    try:
        assert child.on_replace("sig") == "replaced"
    finally:
        child.pop_request()
    assert calls == [("original on_replace", "sig")]  # t-2 is not running here: no token

    # eager (apply()): Celery runs the replacement inline, nothing is published again
    calls.clear()
    host.push_request(id="t-1", is_eager=True)
    try:
        host.on_replace("sig")
    finally:
        host.pop_request()
    assert calls == [("original on_replace", "sig")]


def test_a_published_message_never_carries_the_gates_token() -> None:
    """A retry builds its message from the running request, whose custom keys include the
    gate's token: it must be stripped, or a pool without a gate would trust a stale claim."""
    from worker_health.gate import CLAIMED_AT_KEY, TOKEN_KEY

    headers: dict[str, Any] = {
        "id": "t-1",
        "task": "worker_health.tasks.detect_failed_workers",  # untracked: no database write
        TOKEN_KEY: 3,
        CLAIMED_AT_KEY: 12.5,
        "headers": {TOKEN_KEY: 3, CLAIMED_AT_KEY: 12.5, "mine": 1},
    }
    tracking.on_before_task_publish(
        sender="worker_health.tasks.detect_failed_workers", headers=headers, routing_key="celery"
    )
    assert TOKEN_KEY not in headers and CLAIMED_AT_KEY not in headers
    assert headers["headers"] == {"mine": 1}


@pytest.mark.django_db(transaction=True)
def test_a_later_run_records_its_start_and_a_first_run_makes_no_round_trip() -> None:
    """Every run but a task's first writes that it starts before its code runs, so that a
    reclaim can tell a run that started from one that only waited (MAX_RECLAIMS)."""
    import time

    from tests.factories import delivery, make_worker
    from worker_health import dbthread
    from worker_health.gate import CLAIMED_AT_KEY, TOKEN_KEY
    from worker_health.heartbeat import WorkerIdentity

    worker = make_worker("default", "w1@host")
    identity = WorkerIdentity(
        worker_id=worker.worker_id, incarnation=worker.incarnation, metadata={}, pk=worker.pk
    )
    assert TaskQueue.objects.claim_received(
        [delivery("first")], worker_pk=worker.pk, incarnation=worker.incarnation
    ) == {"first": 1}
    TaskQueue.objects.filter(task_id="first").update(status="queued")  # reclaimed, say
    calls: list[object] = []
    original = dbthread.call

    def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(fn)
        return original(fn, *args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dbthread, "call", counting)
            fresh = {TOKEN_KEY: 1, CLAIMED_AT_KEY: time.monotonic()}
            task = SimpleNamespace(request=SimpleNamespace(**fresh))
            assert tracking._token_from_gate(task, "t-new", identity) == 1  # type: ignore[arg-type]
            assert calls == []  # the hot path: no database work before the task
            assert TaskQueue.objects.claim_received(
                [delivery("first")], worker_pk=worker.pk, incarnation=worker.incarnation
            ) == {"first": 2}
            again = {TOKEN_KEY: 2, CLAIMED_AT_KEY: time.monotonic()}
            task = SimpleNamespace(request=SimpleNamespace(**again))
            assert tracking._token_from_gate(task, "first", identity) == 2  # type: ignore[arg-type]
            assert len(calls) == 1
        assert TaskQueue.objects.get(task_id="first").started_token == 2
    finally:
        tracking._tokens.pop("t-new", None)
        tracking._tokens.pop("first", None)
        dbthread.shutdown()


@pytest.mark.django_db(transaction=True)
def test_a_pool_process_forked_before_its_worker_registered_confirms_a_long_wait() -> None:
    """Workers register when their pool is up, so prefork processes start without the
    worker's primary key: a run that waited long in the pool's queue looks it up to
    confirm its claim, and is neither skipped nor claimed a second time."""
    import time
    import uuid

    from tests.factories import delivery, make_worker
    from worker_health import dbthread
    from worker_health.gate import CLAIMED_AT_KEY, TOKEN_KEY
    from worker_health.heartbeat import WorkerIdentity
    from worker_health.models import WorkerRegistry

    worker = make_worker("default", "w1@host")
    tokens = TaskQueue.objects.claim_received(
        [delivery("t1"), delivery("t2")], worker_pk=worker.pk, incarnation=worker.incarnation
    )
    assert tokens == {"t1": 1, "t2": 1}
    waited_long = {TOKEN_KEY: 1, CLAIMED_AT_KEY: time.monotonic() - 60}
    task = SimpleNamespace(request=SimpleNamespace(**waited_long))
    try:
        forked_early = WorkerIdentity(
            worker_id=worker.worker_id, incarnation=worker.incarnation, metadata={}
        )
        assert forked_early.pk is None
        assert tracking._token_from_gate(task, "t1", forked_early) == 1  # type: ignore[arg-type]
        assert forked_early.pk == worker.pk
        # the worker was failed and t2 reclaimed meanwhile: the run must claim again
        WorkerRegistry.objects.filter(pk=worker.pk).update(status="failed")
        other = make_worker("default", "w2@host")
        assert TaskQueue.objects.claim_received(
            [delivery("t2")], worker_pk=other.pk, incarnation=other.incarnation
        ) == {"t2": 2}
        again = WorkerIdentity(
            worker_id=worker.worker_id, incarnation=worker.incarnation, metadata={}
        )
        got = tracking._token_from_gate(task, "t2", again)  # type: ignore[arg-type]
        assert got == tracking._NOT_OURS
        # never registered (cannot happen with a gate's token, but must not skip the run)
        ghost = WorkerIdentity(worker_id="ghost@host", incarnation=uuid.uuid4(), metadata={})
        assert tracking._token_from_gate(task, "t1", ghost) == 1  # type: ignore[arg-type]
    finally:
        dbthread.shutdown()
