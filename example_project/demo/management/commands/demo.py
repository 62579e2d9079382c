"""``manage.py demo``: real workers, one killed with SIGKILL, its tasks reclaimed and run
exactly once on the others, then the admin until Ctrl-C.

1. migrate, reset the demo's state, create the ``admin`` / ``admin`` superuser;
2. start N ``celery worker`` processes (prefork, 2 pool processes each) and ``celery beat``,
   with fast heartbeat settings, their logs under ``var/demo/``;
3. publish ``work`` tasks and SIGKILL the first worker's process group while it runs some;
4. watch it being failed, its tasks reclaimed and run on the others, and prove that every
   task ran exactly once (``Effect`` rows), printing PASS or FAIL (exit status 1);
5. print the health summary (``manage.py worker_health status``);
6. serve the admin until Ctrl-C (unless ``--no-serve``), then stop every process it started.

It runs unchanged on the embedded default (SQLite + kombu's filesystem transport) and with
``DATABASE_URL`` / ``CELERY_BROKER_URL`` pointing at PostgreSQL, Redis or RabbitMQ.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import close_old_connections, connections
from django.db.models import Count
from django.db.models.functions import Now
from django.test.utils import override_settings

from example_project.demo.live import LiveBlock
from example_project.demo.models import Effect
from example_project.demo.processes import Child, end_leftovers, stop_all, write_pid_file
from example_project.demo.tasks import work
from example_project.fs_transport import INFLIGHT
from worker_health.models import (
    DetectorState,
    EventKind,
    TaskQueue,
    WorkerEvent,
    WorkerRegistry,
)
from worker_health.summary import health_summary

#: fast failure detection for the demo, passed to every child through the environment
FAST_SETTINGS = {
    "WORKER_HEALTH_HEARTBEAT_INTERVAL": "1",
    "WORKER_HEALTH_STALE_AFTER": "3",
    "WORKER_HEALTH_CHECK_INTERVAL": "1",
}
#: a queue of the demo's own, so that purging it on a shared Redis / RabbitMQ is harmless
DEMO_QUEUE = "worker-health-demo"
CONCURRENCY = 2
REFRESH = 0.5
FINISHED = ("succeeded", "failed", "revoked", "quarantined")
#: events worth a line of their own while the victim's tasks are recovered
NOTABLE_EVENTS = {
    EventKind.WORKER_FAILED: "worker failed",
    EventKind.WORKER_RECOVERED: "worker recovered",
    EventKind.WORKER_OFFLINE: "worker offline",
    EventKind.WORKER_RESTARTED: "worker restarted",
    EventKind.TASK_QUARANTINED: "task QUARANTINED",
    EventKind.STALE_COMPLETION: "stale completion fenced",
    EventKind.DUPLICATE_DELIVERY: "duplicate delivery skipped",
}


class DemoFailed(Exception):
    """The demo could not get to its proof (a process died, something timed out)."""


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class Run:
    """What one run of the demo published, killed and saw."""

    queue: str
    nodes: list[str]
    victim: str
    task_ids: list[str] = field(default_factory=list)
    killed_at: float = 0.0  # monotonic
    killed_at_db: datetime | None = None
    held_at_kill: dict[str, str] = field(default_factory=dict)  # task id -> status
    failed_after: float | None = None  # seconds from the kill to ``failed``, database clock
    reclaimed: dict[str, str] = field(default_factory=dict)  # task id -> from worker
    done_reported: set[str] = field(default_factory=set)
    last_event_id: int = 0
    timed_out: bool = False


def _fast_settings_for_this_process() -> dict[str, float]:
    return {name: float(value) for name, value in FAST_SETTINGS.items()}


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def short(task_id: str) -> str:
    return task_id[:8]


class Command(BaseCommand):
    help = (
        "Live demo: start real celery workers and beat, SIGKILL one worker while it runs "
        "tasks, watch its tasks being reclaimed and run exactly once on the others, then "
        "serve the admin until Ctrl-C."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--no-serve",
            action="store_true",
            help="Stop everything after the proof instead of serving the admin.",
        )
        parser.add_argument("--workers", type=int, default=3, help="Workers to start (>= 2).")
        parser.add_argument("--tasks", type=int, default=30, help="work tasks to publish.")
        parser.add_argument(
            "--seconds", type=float, default=2.5, help="Mean duration of a task (+/- 20%%)."
        )
        parser.add_argument("--port", type=int, default=8000, help="Port of the admin.")

    # -- entry point -----------------------------------------------------------------------
    def handle(self, *args: Any, **options: Any) -> None:
        if options["workers"] < 2:
            raise CommandError("--workers must be at least 2: one to kill, one to survive.")
        if options["tasks"] < 1:
            raise CommandError("--tasks must be at least 1.")
        if options["seconds"] <= 0:
            raise CommandError("--seconds must be positive.")
        if not options["no_serve"] and not port_is_free(options["port"]):
            raise CommandError(
                f"port {options['port']} is in use: pass another --port, or --no-serve"
            )
        self.options = options
        self.children: list[Child] = []
        self.live = LiveBlock(self.stdout, every=3.0)
        self.var = Path(getattr(settings, "VAR_DIR", Path.cwd() / "var")) / "demo"
        self.pid_file = self.var / "pids.json"
        self.passed: bool | None = None  # the proof's verdict, once it is known
        started = time.monotonic()
        problem = ""
        with override_settings(**_fast_settings_for_this_process()), self._signals_interrupt():
            try:
                self.demo()
            except KeyboardInterrupt:
                if self.passed is None:
                    problem = "interrupted before the proof"
            except DemoFailed as exc:
                self.live.close()
                self.stdout.write(self.style.ERROR(f"ERROR: {exc}"))
                problem = str(exc).splitlines()[0]
            finally:
                self.stop_children()
                close_old_connections()
        self.stdout.write(f"demo took {time.monotonic() - started:.0f} s")
        if problem:
            raise CommandError(problem)
        if not self.passed:
            raise CommandError(f"the demo FAILED (see above; logs in {self.var})")

    @contextmanager
    def _signals_interrupt(self) -> Iterator[None]:
        """SIGTERM and SIGHUP end the demo like Ctrl-C: its children are stopped. SIGINT is
        set too, as a shell starts a background job with SIGINT ignored."""

        def interrupt(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, interrupt) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def demo(self) -> None:
        run = self.setup()
        self.start_processes(run)
        self.wait_registered(run)
        self.publish(run)
        self.wait_victim_busy(run)
        self.kill_victim(run)
        self.watch_recovery(run)
        self.passed = self.prove(run)
        self.print_status()
        if not self.options["no_serve"]:
            self.serve(run)

    def say(self, line: str = "") -> None:
        self.live.log(line)

    def heading(self, text: str) -> None:
        self.live.close()
        self.stdout.write("")
        self.stdout.write(self.style.MIGRATE_HEADING(f"== {text}"))

    # -- 1. database and demo state --------------------------------------------------------
    def setup(self) -> Run:
        self.heading("1. Database, demo state, admin user")
        call_command("migrate", verbosity=0, interactive=False)
        db = connections["default"]
        self.say(f"database: {db.vendor} {db.settings_dict.get('NAME')} (migrated)")
        ended = end_leftovers(self.pid_file)
        if ended:
            self.say(f"ended processes left by an earlier run: {', '.join(ended)}")
        queue = os.environ.get("EXAMPLE_QUEUE") or DEMO_QUEUE
        self.say(f"broker: {self._broker_label()} queue {queue!r}: {self.clear_broker(queue)}")
        counts = self.reset_rows()
        self.say("cleared: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
        for stale in self.var.glob("celerybeat-schedule*"):
            stale.unlink()

        user_model = get_user_model()
        if user_model.objects.filter(username="admin").exists():
            note = "existing user kept"
        else:
            user_model.objects.create_superuser("admin", "admin@example.com", "admin")
            note = "created"
        self.say(f"admin user: admin / password: admin ({note})")

        host = socket.gethostname()
        nodes = [f"demo{i}@{host}" for i in range(1, self.options["workers"] + 1)]
        return Run(queue=queue, nodes=nodes, victim=nodes[0])

    def _broker_label(self) -> str:
        url = str(settings.CELERY_BROKER_URL)
        if "@" in url:  # hide credentials
            scheme, _, rest = url.partition("://")
            url = f"{scheme}://***@{rest.rpartition('@')[2]}"
        return url

    def clear_broker(self, queue: str) -> str:
        """Drop messages a previous run left: the filesystem transport's files, or the
        demo queue's messages on a real broker."""
        options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {}
        if str(settings.CELERY_BROKER_URL).startswith("filesystem://"):
            removed = 0
            for key in ("data_folder_in", "data_folder_out", "control_folder"):
                folder = options.get(key)
                if not folder:
                    continue
                Path(folder).mkdir(parents=True, exist_ok=True)
                for path in Path(folder).iterdir():
                    if path.is_file():
                        path.unlink(missing_ok=True)
                        removed += 1
                    elif path.name == INFLIGHT:  # read, unacknowledged, by a killed worker
                        removed += sum(1 for p in path.glob("*/*") if p.is_file())
                        shutil.rmtree(path, ignore_errors=True)
            return f"{removed} old message files removed"
        from example_project.celery import app

        try:
            with app.connection_for_write() as conn:
                bound = app.amqp.queues[queue].bind(conn.default_channel)
                bound.declare()
                purged = bound.purge() or 0
        except Exception as exc:  # the workers would fail to connect too; say why early
            raise DemoFailed(f"cannot reach the broker {self._broker_label()}: {exc}") from exc
        return f"{purged} old messages purged"

    def reset_rows(self) -> dict[str, int]:
        counts = {
            "tasks": TaskQueue.objects.all().delete()[0],
            "events": WorkerEvent.objects.all().delete()[0],
            "workers": WorkerRegistry.objects.all().delete()[0],
            "effects": Effect.objects.all().delete()[0],
        }
        DetectorState.objects.all().delete()
        try:
            from django_celery_results.models import TaskResult
        except ImportError:  # pragma: no cover - the example project installs it
            return counts
        counts["results"] = TaskResult.objects.filter(
            task_name__startswith="example_project.demo."
        ).delete()[0]
        return counts

    # -- 2. processes ----------------------------------------------------------------------
    def child_env(self, run: Run) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FAST_SETTINGS)
        base = str(settings.BASE_DIR)
        env.update(
            DJANGO_SETTINGS_MODULE=os.environ.get(
                "DJANGO_SETTINGS_MODULE", "example_project.settings"
            ),
            EXAMPLE_QUEUE=run.queue,
            PYTHONPATH=os.pathsep.join(p for p in (base, env.get("PYTHONPATH", "")) if p),
            PYTHONUNBUFFERED="1",
        )
        # Point the children at exactly this process's database and broker folder.
        if getattr(settings, "VAR_DIR", None):
            env["EXAMPLE_VAR_DIR"] = str(settings.VAR_DIR)
        if getattr(settings, "BROKER_DIR", None):
            env["EXAMPLE_BROKER_DIR"] = str(settings.BROKER_DIR)
        return env

    def start_processes(self, run: Run) -> None:
        self.heading(f"2. Starting {len(run.nodes)} celery workers and celery beat")
        celery = [sys.executable, "-m", "celery", "-A", "example_project"]
        for node in run.nodes:
            name = node.split("@")[0]
            argv = [
                *celery,
                "worker",
                "-n",
                node,
                "-P",
                "prefork",
                "-c",
                str(CONCURRENCY),
                "-Q",
                run.queue,
                "--without-mingle",
                "--without-gossip",
                "-l",
                "info",
            ]
            self.children.append(Child(name, argv, self.var / f"{name}.log"))
        beat_argv = [*celery, "beat", "-l", "info", "-s", str(self.var / "celerybeat-schedule")]
        self.children.append(Child("beat", beat_argv, self.var / "beat.log"))
        env = self.child_env(run)
        for child in self.children:
            child.start(cwd=settings.BASE_DIR, env=env)
            self.say(f"{child.name:<6} pid {child.pid:<7} log {child.log_path}")
        write_pid_file(self.pid_file, self.children)
        fast = (f"{k.removeprefix('WORKER_HEALTH_')}={v}s" for k, v in FAST_SETTINGS.items())
        self.say(f"settings: {', '.join(fast)}")

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def check_children(self, run: Run) -> None:
        """Stop the demo if a worker or beat exited (the victim is meant to)."""
        for child in self.children:
            if child.popen is None or child.name == "runserver":
                continue
            if run.killed_at and child.name == run.victim.split("@")[0]:
                continue
            if not child.alive():
                raise DemoFailed(
                    f"{child.name} exited with status {child.exit_code()}; the end of "
                    f"{child.log_path}:\n{child.log_tail()}"
                )

    # -- the live table --------------------------------------------------------------------
    def table(self, run: Run) -> tuple[list[str], tuple[Any, ...]]:
        """The worker table, and its workers' statuses: off a terminal the table is
        printed again when they change (or every few seconds)."""
        close_old_connections()
        workers = {w["id"]: w for w in health_summary(include_tasks=False)["workers"]}
        held = Counter(
            {
                (worker, status): n
                for worker, status, n in TaskQueue.objects.filter(
                    status__in=("reserved", "claimed")
                )
                .order_by()
                .values_list("claimed_by__worker_id", "status")
                .annotate(n=Count("pk"))
            }
        )
        lines = [
            f"  {'worker':<28} {'status':<9} {'heartbeat':>10} {'processed':>10} "
            f"{'claimed':>8} {'ETA':>8}"
        ]
        key: list[Any] = []
        for node in run.nodes:
            w = workers.get(node)
            tag = " <- SIGKILLed" if node == run.victim and run.killed_at else ""
            if w is None:
                lines.append(f"  {node:<28} {'starting':<9}")
                key.append((node, "starting"))
                continue
            age = w["heartbeat_age"]
            age_text = f"{age:.1f} s ago" if age is not None else "-"
            running = held[(node, "claimed")]
            waiting = held[(node, "reserved")]
            lines.append(
                f"  {node:<28} {w['status']:<9} {age_text:>10} {w['tasks_processed']:>10} "
                f"{running:>8} {waiting:>8}{tag}"
            )
            key.append((node, w["status"]))
        return lines, tuple(key)

    def task_line(self, run: Run) -> tuple[str, tuple[Any, ...]]:
        statuses = Counter(
            dict(
                TaskQueue.objects.filter(task_id__in=run.task_ids)
                .order_by()
                .values_list("status")
                .annotate(n=Count("pk"))
            )
        )
        effects = Effect.objects.filter(task_id__in=run.task_ids).count()
        total = len(run.task_ids)
        line = (
            f"  tasks: queued {statuses['queued']}, waiting {statuses['reserved']}, "
            f"running {statuses['claimed']}, reclaiming {statuses['reclaiming']}, "
            f"succeeded {statuses['succeeded']}/{total}"
            + "".join(
                f", {s} {statuses[s]}" for s in ("failed", "revoked", "quarantined") if statuses[s]
            )
            + f" | effects recorded {effects}/{total}"
        )
        # Off a terminal the block is printed again when this changes (or every few seconds).
        return line, (statuses["reclaiming"] > 0, statuses["claimed"] > 0)

    # -- 3. registration, publish, kill ----------------------------------------------------
    def wait_registered(self, run: Run, timeout: float = 120.0) -> None:
        self.heading("3. Waiting for the workers to register")
        deadline = time.monotonic() + timeout
        while True:
            self.check_children(run)
            lines, key = self.table(run)
            self.live.show(lines, key)
            active = WorkerRegistry.objects.filter(worker_id__in=run.nodes, status="active")
            if active.count() == len(run.nodes):
                break
            if time.monotonic() > deadline:
                raise DemoFailed(f"the workers did not register within {timeout:.0f} s")
            time.sleep(REFRESH)
        self.live.close()
        self.say(f"all {len(run.nodes)} workers registered and heartbeating")
        self.say("('processed': every task a worker ran, beat's detector sweeps included)")

    def publish(self, run: Run) -> None:
        n = self.options["tasks"]
        mean = self.options["seconds"]
        durations = [round(mean * (0.8 + 0.4 * (i % 5) / 4), 2) for i in range(n)]
        for i, seconds in enumerate(durations, 1):
            result = work.apply_async(
                kwargs={"seconds": seconds, "label": f"demo-{i}"}, queue=run.queue
            )
            run.task_ids.append(result.id)
        self.say(
            f"published {n} 'work' tasks of {min(durations):g}-{max(durations):g} s each "
            f"to queue {run.queue!r}"
        )

    def victim_holds(self, run: Run) -> dict[str, str]:
        return dict(
            TaskQueue.objects.filter(
                claimed_by__worker_id=run.victim, status__in=("reserved", "claimed")
            ).values_list("task_id", "status")
        )

    def wait_victim_busy(self, run: Run, timeout: float = 90.0) -> None:
        self.say(f"waiting until the victim {run.victim} runs tasks ...")
        started = time.monotonic()
        while True:
            self.check_children(run)
            lines, key = self.table(run)
            task_line, task_key = self.task_line(run)
            self.live.show([*lines, task_line], (key, task_key))
            running = sum(1 for s in self.victim_holds(run).values() if s == "claimed")
            waited = time.monotonic() - started
            # Both pool processes busy, or at least one after a while.
            if running >= CONCURRENCY or (running and waited > 15):
                break
            if waited > timeout:
                raise DemoFailed(f"{run.victim} did not start a task within {timeout:.0f} s")
            time.sleep(REFRESH / 2)
        self.live.close()

    def db_now(self, run: Run) -> datetime | None:
        return (
            WorkerRegistry.objects.filter(worker_id=run.victim)
            .annotate(now=Now())
            .values_list("now", flat=True)
            .first()
        )

    def kill_victim(self, run: Run) -> None:
        victim = self.child(run.victim.split("@")[0])
        run.held_at_kill = self.victim_holds(run)
        run.killed_at_db = self.db_now(run)
        run.killed_at = time.monotonic()
        victim.kill_group()
        counts = Counter(run.held_at_kill.values())
        self.heading(
            f"4. SIGKILL {run.victim} (process group {victim.pid}: main process + "
            f"{CONCURRENCY} pool processes)"
        )
        self.say(
            f"it was running {counts['claimed']} tasks and held {counts['reserved']} more "
            f"received but not started: {', '.join(short(t) for t in sorted(run.held_at_kill))}"
        )

    # -- 4. recovery -----------------------------------------------------------------------
    def watch_recovery(self, run: Run) -> None:
        n = len(run.task_ids)
        timeout = 60.0 + 3 * n * self.options["seconds"] / (CONCURRENCY * (len(run.nodes) - 1))
        settle_until: float | None = None
        while True:
            self.check_children(run)
            elapsed = time.monotonic() - run.killed_at
            self.report_failure(run)
            self.report_events(run)
            self.report_completions(run)
            lines, key = self.table(run)
            task_line, task_key = self.task_line(run)
            self.live.show(
                [f"  t+{elapsed:5.1f} s since the SIGKILL", *lines, task_line], (key, task_key)
            )
            if self.all_done(run):
                # Stay a little longer: a duplicate run would show up now.
                settle_until = settle_until or time.monotonic() + 2 * float(
                    FAST_SETTINGS["WORKER_HEALTH_STALE_AFTER"]
                )
                if time.monotonic() >= settle_until:
                    break
            else:
                settle_until = None
            if elapsed > timeout:
                run.timed_out = True
                self.live.close()
                self.say(self.style.ERROR(f"timed out after {timeout:.0f} s"))
                break
            time.sleep(REFRESH)
        self.live.close()

    def report_failure(self, run: Run) -> None:
        if run.failed_after is not None:
            return
        row = (
            WorkerRegistry.objects.filter(worker_id=run.victim)
            .values("status", "status_changed_at", "last_heartbeat")
            .first()
        )
        if not row or row["status"] != "failed":
            return
        if run.killed_at_db is not None and row["status_changed_at"] is not None:
            run.failed_after = (row["status_changed_at"] - run.killed_at_db).total_seconds()
        else:  # pragma: no cover - the row always has both
            run.failed_after = time.monotonic() - run.killed_at
        silent = (
            (row["status_changed_at"] - row["last_heartbeat"]).total_seconds()
            if row["last_heartbeat"] and row["status_changed_at"]
            else float("nan")
        )
        self.say(
            self.style.WARNING(
                f"{run.victim}: active -> failed {run.failed_after:.1f} s after the SIGKILL "
                f"(no heartbeat for {silent:.1f} s; STALE_AFTER = "
                f"{FAST_SETTINGS['WORKER_HEALTH_STALE_AFTER']} s)"
            )
        )

    def report_events(self, run: Run) -> None:
        events = WorkerEvent.objects.filter(pk__gt=run.last_event_id).order_by("pk")
        for ev in events:
            run.last_event_id = ev.pk
            details = ev.details or {}
            if ev.kind == EventKind.TASK_RECLAIMED:
                run.reclaimed[ev.task_id] = ev.worker_name
                self.say(
                    f"  reclaimed {short(ev.task_id)} from {ev.worker_name} "
                    f"({details.get('reason')}; reclaim_count {details.get('reclaim_count')}; "
                    f"re-published {'yes' if details.get('published') else 'NO'})"
                )
            elif ev.kind in NOTABLE_EVENTS and ev.kind != EventKind.WORKER_FAILED:
                # the victim's failure has its own line; another worker's would show here
                self.say(f"  event: {NOTABLE_EVENTS[ev.kind]} {ev.worker_name} {ev.task_id}")
            elif ev.kind == EventKind.WORKER_FAILED and ev.worker_name != run.victim:
                self.say(
                    self.style.ERROR(f"  event: worker failed {ev.worker_name} (NOT the victim)")
                )

    def report_completions(self, run: Run) -> None:
        pending = [t for t in run.reclaimed if t not in run.done_reported]
        if not pending:
            return
        for task_id, worker, runs in Effect.objects.filter(task_id__in=pending).values_list(
            "task_id", "worker", "runs"
        ):
            run.done_reported.add(task_id)
            self.say(f"  done {short(task_id)} on {worker} (runs = {runs})")

    def all_done(self, run: Run) -> bool:
        if run.failed_after is None:
            return False
        unfinished = (
            TaskQueue.objects.filter(task_id__in=run.task_ids).exclude(status__in=FINISHED).count()
        )
        effects = Effect.objects.filter(task_id__in=run.task_ids).count()
        return unfinished == 0 and effects == len(run.task_ids)

    # -- the proof -------------------------------------------------------------------------
    def prove(self, run: Run) -> bool:
        self.heading("Proof: every published task ran exactly once")
        ids = run.task_ids
        effects = {
            e["task_id"]: e
            for e in Effect.objects.filter(task_id__in=ids).values("task_id", "runs", "worker")
        }
        statuses = dict(TaskQueue.objects.filter(task_id__in=ids).values_list("task_id", "status"))
        reclaimed = {t for t, w in run.reclaimed.items() if w == run.victim}
        missing = [t for t in ids if t not in effects]
        repeated = {t: e["runs"] for t, e in effects.items() if e["runs"] != 1}
        not_succeeded = Counter(s for t, s in statuses.items() if s != "succeeded")
        untracked = [t for t in ids if t not in statuses]
        # What the victim held when it was killed must have run once, on a survivor:
        # re-published by worker_health, or (RabbitMQ) redelivered by the broker too.
        held = run.held_at_kill
        recovered = {t for t in held if effects.get(t, {}).get("worker", run.victim) != run.victim}
        not_recovered = sorted(set(held) - recovered)
        ran_on = Counter(effects[t]["worker"].split("@")[0] for t in recovered)
        by_broker = recovered - reclaimed
        held_counts = Counter(held.values())
        checks = [
            Check(
                f"{run.victim} detected as failed",
                run.failed_after is not None,
                f"{run.failed_after:.1f} s after the SIGKILL" if run.failed_after else "never",
            ),
            Check(
                "the tasks it held ran on the survivors",
                bool(reclaimed) and not not_recovered,
                f"{len(held)} held ({held_counts['claimed']} claimed: running or next in "
                f"its pool, {held_counts['reserved']} waiting for an ETA), "
                f"{len(reclaimed)} reclaimed"
                + (f", {len(by_broker)} redelivered by the broker" if by_broker else "")
                + f"; ran on {', '.join(f'{w} x{n}' for w, n in sorted(ran_on.items()))}"
                + (
                    f"; NOT run on a survivor: {', '.join(map(short, not_recovered))}"
                    if not_recovered
                    else ""
                ),
            ),
            Check(
                "one Effect row per published task",
                not missing,
                f"{len(effects)}/{len(ids)}"
                + (f"; missing: {', '.join(map(short, missing))}" if missing else ""),
            ),
            Check(
                "every task ran exactly once (runs == 1)",
                not repeated and not missing,
                f"{sum(1 for e in effects.values() if e['runs'] == 1)}/{len(ids)}"
                + (
                    "; ran more than once: "
                    + ", ".join(f"{short(t)} x{n}" for t, n in repeated.items())
                    if repeated
                    else ""
                ),
            ),
            Check(
                "TaskQueue: every task succeeded",
                not not_succeeded and not untracked,
                f"{len(ids) - sum(not_succeeded.values()) - len(untracked)}/{len(ids)}"
                + "".join(f"; {s}: {n}" for s, n in not_succeeded.items())
                + (f"; untracked: {len(untracked)}" if untracked else ""),
            ),
        ]
        if run.timed_out:
            checks.append(Check("finished in time", False, "timed out"))
        for check in checks:
            mark = self.style.SUCCESS("ok  ") if check.ok else self.style.ERROR("FAIL")
            self.stdout.write(f"  [{mark}] {check.what}: {check.detail}")
        passed = all(c.ok for c in checks)
        if passed:
            self.stdout.write(
                self.style.SUCCESS(
                    f"PASS: all {len(ids)} tasks ran exactly once; {len(reclaimed)} of them "
                    f"were reclaimed from the SIGKILLed worker {run.victim} and ran on the "
                    f"survivors"
                )
            )
        else:
            failed = "; ".join(c.what for c in checks if not c.ok)
            self.stdout.write(self.style.ERROR(f"FAIL: {failed}"))
            self.stdout.write(f"  logs: {self.var}")
        return passed

    # -- 5. status ----------------------------------------------------------------------
    def print_status(self) -> None:
        self.heading("5. manage.py worker_health status")
        self.stdout.write(json.dumps(health_summary(), indent=2))

    # -- 6. admin ------------------------------------------------------------------------
    def serve(self, run: Run) -> None:
        port = self.options["port"]
        url = f"http://127.0.0.1:{port}/admin/"
        self.heading(f"6. The admin: {url}  (user admin, password admin)")
        server = Child(
            "runserver",
            [sys.executable, "-m", "django", "runserver", f"127.0.0.1:{port}", "--noreload"],
            self.var / "runserver.log",
        )
        self.children.append(server)
        server.start(cwd=settings.BASE_DIR, env=self.child_env(run))
        write_pid_file(self.pid_file, self.children)
        if not self.wait_port(server, port):
            raise DemoFailed(f"the admin server did not start on port {port}:\n{server.log_tail()}")
        self.say(f"serving {url} (log {server.log_path}); the workers keep running.")
        self.say("Press Ctrl-C to stop the workers, beat and the server.")
        self.live.every = 60.0  # off a terminal, a line when a worker's status changes
        while True:
            if not server.alive():
                raise DemoFailed(f"the admin server exited:\n{server.log_tail()}")
            lines, key = self.table(run)
            self.live.show(lines, key)
            time.sleep(1.0)

    def wait_port(self, server: Child, port: int, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.alive():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.3)
        return False

    # -- clean-up ----------------------------------------------------------------------
    def stop_children(self) -> None:
        if not self.children:
            return
        # A second Ctrl-C (or SIGTERM) must not cut the clean-up short and leave processes
        # behind, nor may a closed terminal (SIGHUP, then writes failing). It is bounded:
        # SIGKILL after a timeout.
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
        try:
            running = [c.name for c in self.children if c.alive()]
            self._print_safely("", f"stopping {', '.join(running) or 'nothing'} (SIGTERM) ...")
            killed = stop_all(self.children, timeout=20.0)
            self.pid_file.unlink(missing_ok=True)
            self.children = []
            if killed:
                self._print_safely(f"  had to SIGKILL: {', '.join(killed)}")
            self._print_safely("all demo processes stopped")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _print_safely(self, *lines: str) -> None:
        try:
            self.live.close()
            for line in lines:
                self.stdout.write(line)
        except (OSError, ValueError):
            pass
