"""The scenarios. Each runs one variant on one broker and returns a :class:`Result`.

Counting, for every variant, from the ledger (``chaos_effect``, one row per task id with
its run count): **lost** = published tasks that never ran, **ran twice** = tasks whose
effect happened more than once. For worker_health also: workers failed that were alive
(false failures), detection time against the bound, quarantines and alerts.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .stack import FAST, Stack, stack


@dataclass(frozen=True)
class Scale:
    short: bool

    def pick(self, short: float, full: float) -> float:
        return short if self.short else full

    def count(self, short: int, full: int) -> int:
        return short if self.short else full


@dataclass
class Result:
    scenario: str
    variant: str
    broker: str
    published: int = 0
    lost: int = 0
    #: of the lost: never received by any worker (worker_health's row has no message)
    never_received: int = 0
    twice: int = 0
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: the scenario's name in ``SCENARIOS``
    key: str = ""

    @property
    def passed(self) -> bool:
        return not self.problems


def as_utc(value: Any) -> datetime:
    """A timestamp read from PostgreSQL (aware) or SQLite (an ISO string, naive UTC)."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def account(s: Stack, result: Result, ids: list[str], runs: dict[str, int]) -> None:
    result.published = len(ids)
    result.lost = sum(1 for t in ids if runs.get(t, 0) == 0)
    result.twice = sum(1 for t in ids if runs.get(t, 0) > 1)


def wh_checks(
    s: Stack,
    result: Result,
    *,
    failed_ok: set[str] = frozenset(),  # type: ignore[assignment]
    allowed_twice: int = 0,
    expect_no_loss: bool = True,
) -> None:
    """worker_health's promises, for the worker_health variant only."""
    if s.variant != "worker_health":
        return
    failed = s.query(
        "SELECT worker_name, created_at, details->>'last_heartbeat' FROM worker_health_event "
        "WHERE kind = 'worker_failed'"
    )
    false = sorted({str(name) for name, *_ in failed if str(name) not in failed_ok})
    if false:
        result.problems.append(f"live workers failed: {', '.join(false)}")
    bound = s.settings["STALE_AFTER"] + s.settings["CHECK_INTERVAL"]
    slowest = 0.0
    for _name, created_at, last_heartbeat in failed:
        if last_heartbeat:
            waited = (as_utc(created_at) - as_utc(last_heartbeat)).total_seconds()
            slowest = max(slowest, waited)
    if failed:
        result.notes.append(
            f"{len(failed)} failed, detected ≤ {slowest:.1f} s after the last heartbeat "
            f"(bound {bound:.0f} s)"
        )
        if slowest > bound + 2.0:  # a sweep delayed by a loaded 2-core machine
            result.problems.append(f"detection took {slowest:.1f} s > bound {bound:.0f} s + 2 s")
    never = s.query(
        "SELECT task_id FROM task_queue WHERE task_id LIKE %s AND body IS NULL "
        "AND status = 'queued'",
        [s.prefix + "%"],
    )
    runs = s.runs()
    result.never_received = sum(1 for (task_id,) in never if runs.get(str(task_id), 0) == 0)
    if result.never_received:
        result.notes.append(
            f"{result.never_received} lost by the broker before any worker received them"
        )
    if expect_no_loss and result.lost > result.never_received:
        result.problems.append(
            f"{result.lost - result.never_received} received task(s) lost: "
            + "; ".join(lost_rows(s, runs, {str(t) for (t,) in never}))
        )
    if result.twice > allowed_twice:
        result.problems.append(
            f"{result.twice} task(s) ran twice (allowed {allowed_twice}): "
            + "; ".join(twice_rows(s, runs))
        )
    fenced = s.query("SELECT count(*) FROM worker_health_event WHERE kind = 'stale_completion'")
    if fenced and fenced[0][0]:
        result.notes.append(f"{fenced[0][0]} stale completion(s) fenced")
    unfinished = s.query(
        "SELECT status, count(*) FROM task_queue WHERE task_id LIKE %s AND body IS NOT NULL "
        "AND status NOT IN ('succeeded', 'failed', 'quarantined', 'revoked') GROUP BY status",
        [s.prefix + "%"],
    )
    if unfinished:
        summary = ", ".join(f"{n} {status}" for status, n in unfinished)
        result.problems.append(f"rows not finished: {summary}")


def lost_rows(s: Stack, runs: dict[str, int], never: set[str], limit: int = 5) -> list[str]:
    """What worker_health's tables say of tasks that never ran though a worker received
    them (their row, their events): enough to tell why from the run's output alone."""
    ids = [
        f"{s.prefix}{i}"
        for i in range(s.published)
        if runs.get(f"{s.prefix}{i}", 0) == 0 and f"{s.prefix}{i}" not in never
    ]
    described = []
    for task_id in ids[:limit]:
        row = s.query(
            "SELECT status, fencing_token, reclaim_count, publish_attempts, body IS NULL, "
            "claimed_by_id FROM task_queue WHERE task_id = %s",
            [task_id],
        )
        events = s.query(
            "SELECT kind, worker_name FROM worker_health_event WHERE task_id = %s ORDER BY id",
            [task_id],
        )
        state = (
            "no row"
            if not row
            else "status {}, token {}, reclaims {}, publishes {}, no body {}, holder {}".format(
                *row[0]
            )
        )
        kinds = ", ".join(f"{kind}@{worker}" for kind, worker in events) or "no events"
        described.append(f"{task_id}: {state}; {kinds}")
    return described


def ledger_rows(s: Stack, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """Read the chaos ledger (always PostgreSQL, also beside the embedded stack's SQLite)."""
    with s.ledger() as conn:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]


def twice_rows(s: Stack, runs: dict[str, int], limit: int = 5) -> list[str]:
    """What the ledger and worker_health's tables say of tasks whose effect happened more
    than once: on which workers and when it ran, the row, its events."""
    described = []
    for task_id in sorted(t for t, n in runs.items() if n > 1)[:limit]:
        effect = ledger_rows(
            s, "SELECT workers, first_at, last_at FROM chaos_effect WHERE task_id = %s", [task_id]
        )
        row = s.query(
            "SELECT status, fencing_token, reclaim_count FROM task_queue WHERE task_id = %s",
            [task_id],
        )
        events = s.query(
            "SELECT kind, worker_name, created_at FROM worker_health_event WHERE task_id = %s "
            "ORDER BY id",
            [task_id],
        )
        ran = (
            "ran on {} ({:%H:%M:%S.%f} .. {:%H:%M:%S.%f})".format(
                ",".join(effect[0][0]), as_utc(effect[0][1]), as_utc(effect[0][2])
            )
            if effect
            else "no effect row"
        )
        state = "no row" if not row else "status {}, token {}, reclaims {}".format(*row[0])
        kinds = (
            ", ".join(f"{kind}@{worker} {as_utc(at):%H:%M:%S.%f}" for kind, worker, at in events)
            or "no events"
        )
        described.append(f"{task_id}: {ran}; {state}; {kinds}")
    return described


def start_workers(s: Stack, names: list[str], **kwargs: Any) -> None:
    for name in names:
        s.worker(name, wait=False, **kwargs)
    for name in names:
        s.wait_ready(name)


def settle_timeout(s: Stack) -> float:
    return s.settings["STALE_AFTER"] + s.settings["CHECK_INTERVAL"] + 60.0


# --------------------------------------------------------------------------------------------


def sigkill_storm(variant: str, broker: str, scale: Scale) -> Result:
    """4 workers; every few seconds one is SIGKILLed (with its pool) and restarted under the
    same name, while tasks flow."""
    result = Result("SIGKILL storm", variant, broker)
    duration = scale.pick(20, 60)
    every = scale.pick(4, 5)
    # The default reclaim cap (3): only runs that had started, or may have (a task's first),
    # count against it, so tasks the killed workers only held in their prefetch buffers are
    # not quarantined (K5 in docs/reliability.md).
    settings = dict(FAST)
    with stack("storm", variant, broker=broker, settings=settings) as s:
        names = ["w1", "w2", "w3", "w4"]
        start_workers(s, names)
        ids = s.publish(int(duration * 6), seconds=1.0)
        kills: list[tuple[str, datetime]] = []

        def kill(i: int) -> None:
            name = names[i % len(names)]
            s.procs[name].kill_group()
            kills.append((s.node(name), datetime.now(timezone.utc)))
            s.worker(name, wait=False)

        time.sleep(1.0)
        s.every(every, duration, kill)
        runs = s.wait_done(ids, timeout=settle_timeout(s) + duration)
        account(s, result, ids, runs)
        result.notes.append(f"{len(kills)} kills")
        explained = note_killed_after_effect(s, result, runs, kills)
        wh_checks(s, result, failed_ok={node for node, _ in kills}, allowed_twice=explained)
    return result


#: a run's completion is written within milliseconds of its end (relayed to the gate, sent
#: with its next batch); a kill this soon after a run's effect may come before that write
EFFECT_TO_COMPLETION = 0.5


def killed_after_effect(
    s: Stack, runs: dict[str, int], kills: list[tuple[str, datetime]]
) -> list[float]:
    """The tasks that ran twice because their first run's worker was killed after the run's
    effect and before its completion could be written (what README's limits call at least
    once). Returns each one's gap in seconds; any other task that ran twice still counts
    against the scenario."""
    doubles = sorted(t for t, n in runs.items() if n == 2)
    if not doubles:
        return []
    rows = ledger_rows(
        s,
        "SELECT task_id, workers, first_at FROM chaos_effect WHERE task_id = ANY(%s)",
        [doubles],
    )
    effects = {
        task_id: (str(workers[0]), as_utc(first_at))
        for task_id, workers, first_at in rows
        if workers
    }
    return explained_doubles(effects, kills)


def note_killed_after_effect(
    s: Stack, result: Result, runs: dict[str, int], kills: list[tuple[str, datetime]]
) -> int:
    """How many double runs :func:`killed_after_effect` explains, noted on ``result``."""
    explained = killed_after_effect(s, runs, kills)
    if explained:
        result.notes.append(
            f"{len(explained)} ran again: killed {max(explained) * 1000:.0f} ms or less "
            "after the effect, before the completion was written (at least once)"
        )
    return len(explained)


def explained_doubles(
    effects: dict[str, tuple[str, datetime]],
    kills: list[tuple[str, datetime]],
    within: float = EFFECT_TO_COMPLETION,
) -> list[float]:
    """Of the tasks that ran twice (task id -> the worker and time of the first effect), the
    gaps of those whose first worker was killed at most ``within`` seconds after the effect."""
    gaps = []
    for first_worker, first_at in effects.values():
        for node, at in kills:
            gap = (at - first_at).total_seconds()
            if node == first_worker and 0.0 <= gap <= within:
                gaps.append(gap)
                break
    return gaps


def zombie(variant: str, broker: str, scale: Scale) -> Result:
    """A worker SIGSTOPped for 3 x STALE_AFTER while it runs and holds tasks, then SIGCONT."""
    result = Result("zombie (SIGSTOP, SIGCONT)", variant, broker)
    with stack("zombie", variant, broker=broker) as s:
        start_workers(s, ["zombie", "alive"])
        ids = s.publish(scale.count(40, 80), seconds=1.0)
        time.sleep(3.0)
        pause = 3 * s.settings["STALE_AFTER"]
        s.procs["zombie"].signal_group(signal.SIGSTOP)
        time.sleep(pause)
        s.procs["zombie"].signal_group(signal.SIGCONT)
        runs = s.wait_done(ids, timeout=settle_timeout(s))
        account(s, result, ids, runs)
        result.notes.append(f"paused {pause:.0f} s")
        if variant == "worker_health":
            recovered = s.query(
                "SELECT count(*) FROM worker_health_event WHERE kind = 'worker_recovered'"
            )[0][0]
            result.notes.append(f"zombie recovered: {recovered}")
            skipped = s.query(
                "SELECT count(*) FROM worker_health_event WHERE kind = 'duplicate_delivery'"
            )[0][0]
            result.notes.append(f"{skipped} duplicate deliveries skipped at claim")
        # The zombie's running tasks (≤ its concurrency) resume after SIGCONT while their
        # reclaimed copies ran elsewhere: fencing keeps the records straight, not the
        # user's side effects.
        wh_checks(s, result, failed_ok={s.node("zombie")}, allowed_twice=2)
    return result


def db_outage(variant: str, broker: str, scale: Scale) -> Result:
    """The database refuses connections (TCP proxy cut) for 4 x STALE_AFTER, then is back."""
    result = Result("database outage", variant, broker)
    with stack("dbout", variant, broker=broker) as s:
        start_workers(s, ["w1", "w2"])
        s.beat()
        ids = s.publish(scale.count(60, 120), seconds=0.5)
        time.sleep(2.0)
        outage = 4 * s.settings["STALE_AFTER"] + scale.pick(0, 8)
        assert s.db_proxy is not None
        s.db_proxy.cut()
        time.sleep(outage)
        s.db_proxy.restore()
        runs = s.wait_done(ids, timeout=settle_timeout(s))
        # then a deploy: whatever the outage left behind in the workers' hands shows now
        for name in ("w1", "w2"):
            s.procs[name].stop(timeout=60)
            s.worker(name)
        time.sleep(s.settings["STALE_AFTER"] + 5.0)
        runs = s.wait_done(ids, timeout=settle_timeout(s))
        account(s, result, ids, runs)
        result.notes.append(f"outage {outage:.0f} s, then a warm restart of both workers")
        wh_checks(s, result)
    return result


def clock_skew(variant: str, broker: str, scale: Scale) -> Result:
    """Workers whose clocks are 5 minutes ahead and behind (libfaketime)."""
    result = Result("clock skew ±5 min", variant, broker)
    with stack("skew", variant, broker=broker) as s:
        s.worker("ahead", faketime="+5m", wait=False)
        s.worker("behind", faketime="-5m", wait=False)
        s.worker("exact", wait=False)
        for name in ("ahead", "behind", "exact"):
            s.wait_ready(name)
        ids = s.publish(scale.count(60, 150), seconds=0.3)
        time.sleep(scale.pick(8, 20))
        runs = s.wait_done(ids, timeout=settle_timeout(s))
        account(s, result, ids, runs)
        if variant == "worker_health":
            skews = s.query("SELECT worker_id, clock_skew FROM worker_registry ORDER BY 1")
            result.notes.append(
                "measured skew: " + ", ".join(f"{w.split('@')[0]} {k:+.0f} s" for w, k in skews)
            )
        wh_checks(s, result)
    return result


def busy_workers(variant: str, broker: str, scale: Scale) -> Result:
    """Every slot of a prefork, a threads and a solo worker runs CPU-bound tasks longer
    than STALE_AFTER."""
    result = Result("busy workers (prefork, threads, solo)", variant, broker)
    with stack("busy", variant, broker=broker) as s:
        s.worker("prefork", pool="prefork", concurrency=2, wait=False)
        s.worker("threads", pool="threads", concurrency=2, wait=False)
        s.worker("solo", pool="solo", concurrency=1, wait=False)
        for name in ("prefork", "threads", "solo"):
            s.wait_ready(name)
        seconds = 2 * s.settings["STALE_AFTER"]
        ids = s.publish(scale.count(10, 20), "burn", seconds=seconds)
        runs = s.wait_done(ids, timeout=settle_timeout(s) + 20 * seconds, quiet=4 * seconds)
        account(s, result, ids, runs)
        result.notes.append(f"tasks of {seconds:.0f} s")
        wh_checks(s, result)
    return result


def three_detectors(variant: str, broker: str, scale: Scale) -> Result:
    """Three celery beat processes (and every worker's heartbeat thread) sweep at once
    while a worker holding tasks is SIGKILLed."""
    result = Result("three detectors + SIGKILL", variant, broker)
    with stack("detectors", variant, broker=broker) as s:
        start_workers(s, ["victim", "w2", "w3"])
        for name in ("beat1", "beat2", "beat3"):
            s.beat(name)
        ids = s.publish(scale.count(60, 120), seconds=1.0)
        time.sleep(3.0)
        s.procs["victim"].kill_group()
        # 1 s tasks and a kill 3 s in: the kill can land between a run's effect and its
        # completion's write (CI on 7087ecd), the storm's at-least-once window
        kills = [(s.node("victim"), datetime.now(timezone.utc))]
        runs = s.wait_done(ids, timeout=settle_timeout(s))
        account(s, result, ids, runs)
        explained = note_killed_after_effect(s, result, runs, kills)
        if variant == "worker_health":
            rows = s.query(
                "SELECT task_id, count(*) FROM worker_health_event WHERE kind = 'task_reclaimed' "
                "GROUP BY task_id HAVING count(*) > 1"
            )
            reclaimed = s.query(
                "SELECT count(*) FROM worker_health_event WHERE kind = 'task_reclaimed'"
            )[0][0]
            result.notes.append(f"{reclaimed} reclaimed, {len(rows)} reclaimed twice")
            if rows:
                result.problems.append(f"{len(rows)} task(s) reclaimed more than once")
        wh_checks(s, result, failed_ok={s.node("victim")}, allowed_twice=explained)
    return result


def poison_pill(variant: str, broker: str, scale: Scale) -> Result:
    """A task that SIGKILLs its pool process, among ordinary tasks."""
    result = Result("poison pill", variant, broker)
    with stack("poison", variant, broker=broker) as s:
        start_workers(s, ["w1", "w2"])
        pill = s.publish(1, "poison")
        ids = s.publish(scale.count(20, 40), seconds=0.2)
        window = scale.pick(40, 60)
        runs = s.wait_done(ids, timeout=settle_timeout(s))
        # let the pill do what it does for a while
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            if variant == "worker_health" and s.query(
                "SELECT 1 FROM task_queue WHERE task_id = %s AND status = 'quarantined'", pill
            ):
                break
            time.sleep(1.0)
        time.sleep(3.0)
        account(s, result, ids, runs)
        attempts = s.attempts()
        result.notes.append(f"pill ran {attempts} time(s) in {window:.0f} s")
        if variant == "worker_health":
            status = s.query(
                "SELECT status, reclaim_count FROM task_queue WHERE task_id = %s", pill
            )
            alerts = s.query(
                "SELECT count(*) FROM worker_health_event WHERE kind = 'alert_sent' "
                "AND CAST(details AS TEXT) LIKE '%%quarantined%%'"
            )[0][0]
            result.notes.append(f"pill {status[0][0] if status else '?'}; {alerts} alert(s)")
            if not status or status[0][0] != "quarantined":
                result.problems.append("the pill was not quarantined")
            if alerts != 1:
                result.problems.append(f"{alerts} quarantine alerts (expected 1)")
        wh_checks(s, result, failed_ok={s.node("w1"), s.node("w2")})
    return result


def broker_restart(variant: str, broker: str, scale: Scale) -> Result:
    """The broker goes away mid-run and comes back: a private redis-server restarted
    gracefully (append-only file), or RabbitMQ's connections cut by a TCP proxy."""
    result = Result("broker restart", variant, broker)
    with stack("brokerrestart", variant, broker=broker) as s:
        start_workers(s, ["w1", "w2"])
        ids = s.publish(scale.count(60, 120), seconds=0.5)
        time.sleep(3.0)
        down = scale.pick(5, 10)
        if s.redis is not None:
            s.redis.stop()
            time.sleep(down)
            s.redis.start()
        elif s.broker_proxy is not None:
            s.broker_proxy.cut()
            time.sleep(down)
            s.broker_proxy.restore()
        runs = s.wait_done(ids, timeout=settle_timeout(s) + 30)
        account(s, result, ids, runs)
        result.notes.append(f"broker down {down:.0f} s")
        wh_checks(s, result)
    return result


def rolling_restart(variant: str, broker: str, scale: Scale) -> Result:
    """A deploy: every worker in turn gets SIGTERM (warm shutdown) and is started again."""
    result = Result("rolling restart (SIGTERM)", variant, broker)
    with stack("rolling", variant, broker=broker) as s:
        names = ["w1", "w2", "w3"]
        start_workers(s, names)
        ids = s.publish(scale.count(60, 150), seconds=1.0)
        time.sleep(2.0)
        for name in names:
            s.procs[name].stop(timeout=60)
            s.worker(name)
        runs = s.wait_done(ids, timeout=settle_timeout(s))
        account(s, result, ids, runs)
        wh_checks(s, result)
    return result


SCENARIOS: dict[str, Callable[[str, str, Scale], Result]] = {
    "storm": sigkill_storm,
    "zombie": zombie,
    "db-outage": db_outage,
    "busy": busy_workers,
    "detectors": three_detectors,
    "poison": poison_pill,
    "broker-restart": broker_restart,
    "rolling": rolling_restart,
    "clock-skew": clock_skew,
}


def run_with_timer(fn: Callable[[str, str, Scale], Result], *args: Any) -> Result:
    started = time.monotonic()
    result = fn(*args)
    result.seconds = time.monotonic() - started
    return result


def background(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread
