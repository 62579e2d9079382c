"""celery beat runs the detector with no user code, with Celery's default scheduler and with
django-celery-beat's ``DatabaseScheduler``; ``WORKER_HEALTH_BEAT_SCHEDULE = False`` opts out.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from datetime import datetime

import pytest

from tests.integration.harness import Proc, Stack, wait_for
from worker_health.beat import DETECT_ENTRY, PRUNE_ENTRY
from worker_health.models import DetectorState
from worker_health.tasks import DETECT_TASK

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True, databases="__all__"),
]

CHECK_INTERVAL = 1.0
DATABASE_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
SCHEDULERS = [
    pytest.param(None, id="default-scheduler"),
    pytest.param(DATABASE_SCHEDULER, id="database-scheduler"),
]
SENDING = f"Sending due task {DETECT_ENTRY}"
BEAT_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def send_times(beat: Proc) -> list[datetime]:
    """When beat sent the detector task, from its log."""
    times = []
    for line in beat.log().splitlines():
        match = BEAT_STAMP.match(line)
        if match and SENDING in line:
            times.append(datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f"))
    return times


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_beat_runs_the_detector_every_check_interval(
    db_stack: Stack, scheduler: str | None
) -> None:
    stack = db_stack
    # The only worker beats (and sweeps) once when it starts, then not for ten minutes:
    # every later sweep is one that beat scheduled.
    consumer = stack.worker(
        "consumer",
        pool="solo",
        WORKER_HEALTH_HEARTBEAT_INTERVAL="600",
        WORKER_HEALTH_STALE_AFTER="1200",
    )
    beat = stack.beat(scheduler=scheduler)

    wait_for(lambda: beat.count(SENDING) >= 5, 60, what="beat to send the detector 5 times")
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(send_times(beat))]
    assert 0.5 * CHECK_INTERVAL <= statistics.median(gaps) <= 2 * CHECK_INTERVAL, gaps
    assert beat.count(f"({DETECT_TASK})") >= 5, "the entry runs the detector task"

    # The worker runs the tasks beat sent, and they sweep.
    wait_for(
        lambda: consumer.count(f"Task {DETECT_TASK}[") >= 6,
        30,
        what="the worker to receive and run the detector tasks",
    )
    assert consumer.count(" succeeded in ") >= 3
    sweeps: set[datetime] = set()

    def beat_swept() -> bool:
        state = DetectorState.objects.using(stack.alias).filter(pk=1).first()
        if state is not None and state.last_sweep_by.startswith("beat@"):
            assert state.last_sweep_at is not None
            sweeps.add(state.last_sweep_at)
        return len(sweeps) >= 3

    wait_for(beat_swept, 30, what="three sweeps by beat's detector task")

    if scheduler == DATABASE_SCHEDULER:
        from django_celery_beat.models import PeriodicTask

        entry = PeriodicTask.objects.using(stack.alias).get(name=DETECT_ENTRY)
        assert entry.task == DETECT_TASK
        assert entry.enabled
        assert entry.interval is not None
        assert entry.interval.every == CHECK_INTERVAL and entry.interval.period == "seconds"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_beat_schedule_opt_out(sqlite_stack: Stack, scheduler: str | None) -> None:
    stack = sqlite_stack
    beat = stack.beat(scheduler=scheduler, loglevel="debug", WORKER_HEALTH_BEAT_SCHEDULE="False")
    # Wait until beat has loaded its schedule and started ticking (positive signals), then
    # look for the entries: Celery's own entry is there, ours are not.
    wait_for(lambda: beat.count("beat: Waking up") >= 1, 60, what="beat to tick")
    if scheduler == DATABASE_SCHEDULER:
        from django_celery_beat.models import PeriodicTask

        names = set(PeriodicTask.objects.using(stack.alias).values_list("name", flat=True))
        assert "celery.backend_cleanup" in names
        assert not {DETECT_ENTRY, PRUNE_ENTRY} & names
    else:
        log = beat.log()
        assert "Current schedule:" in log and "celery.backend_cleanup" in log
        assert DETECT_ENTRY not in log and PRUNE_ENTRY not in log
    assert beat.count("Sending due task") == 0
    assert beat.alive()


def queued_detector_messages(stack: Stack) -> list[dict[str, object]]:
    """The detector task messages waiting in the stack's queue (kombu's filesystem broker
    keeps one JSON file per message)."""
    messages = []
    for path in sorted((stack.workdir / "broker" / "queue").glob(f"*.{stack.queue}.msg")):
        try:
            message = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written
        if message.get("headers", {}).get("task") == DETECT_TASK:
            messages.append(message)
    return messages


@pytest.mark.parametrize(
    "scheduler",
    [
        pytest.param(None, id="default-scheduler"),
        pytest.param(DATABASE_SCHEDULER, id="database-scheduler"),
    ],
)
def test_detector_tasks_expire(sqlite_stack: Stack, scheduler: str | None) -> None:
    """A detector task that waits in the queue is pointless once the next one is due: beat
    sends it with an expiry, so a backlog does not fill up with sweeps."""
    stack = sqlite_stack
    beat = stack.beat(scheduler=scheduler)  # no worker: the messages stay in the queue
    wait_for(lambda: len(queued_detector_messages(stack)) >= 2, 60, what="queued detector tasks")
    for message in queued_detector_messages(stack):
        headers = message["headers"]
        assert isinstance(headers, dict)
        assert headers.get("expires"), f"no expiry: {headers}"
    assert beat.alive()
