"""``manage.py worker_health <status|detect|reclaim|prune|probe>``: thin over the package."""

from __future__ import annotations

import json
import socket
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ... import reclaim
from ...conf import settings
from ...models import TaskQueue, WorkerEvent, WorkerRegistry
from ...summary import health_summary


class Command(BaseCommand):
    help = "Celery worker health: status, failure detection, reclamation, retention."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", metavar="ACTION")
        sub.required = True
        status = sub.add_parser("status", help="Print the health summary as JSON.")
        status.add_argument("--indent", type=int, default=2)
        detect = sub.add_parser(
            "detect", help="Fail stale workers and reclaim their tasks (one detector sweep)."
        )
        detect.add_argument(
            "--respect-lease",
            action="store_true",
            help="Skip the sweep if another detector swept within CHECK_INTERVAL.",
        )
        rec = sub.add_parser("reclaim", help="Reclaim the tasks a worker holds, now.")
        rec.add_argument("worker_id")
        sub.add_parser("prune", help="Delete finished tasks and events older than RETENTION.")
        probe = sub.add_parser(
            "probe", help="Exit 0 if the worker has a fresh heartbeat, else 1 (liveness probe)."
        )
        probe.add_argument("--worker", help="Node name (default: any worker on this host).")

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        getattr(self, f"handle_{action}")(**options)

    def handle_status(self, indent: int = 2, **_: Any) -> None:
        self.stdout.write(json.dumps(health_summary(), indent=indent or None))

    def handle_detect(self, respect_lease: bool = False, **_: Any) -> None:
        result = reclaim.sweep(who=f"manage.py@{socket.gethostname()}", force=not respect_lease)
        self.stdout.write(json.dumps(result.as_dict()))

    def handle_reclaim(self, worker_id: str, **_: Any) -> None:
        worker = WorkerRegistry.objects.filter(worker_id=worker_id).first()
        if worker is None:
            raise CommandError(f"No worker named {worker_id!r} is registered.")
        outcome = reclaim.reclaim_tasks_of(worker, reason="manual")
        self.stdout.write(
            json.dumps({"reclaimed": outcome.reclaimed, "quarantined": outcome.quarantined})
        )

    def handle_prune(self, **_: Any) -> None:
        retention = settings.RETENTION
        self.stdout.write(
            json.dumps(
                {
                    "tasks": TaskQueue.objects.delete_finished(retention),
                    "events": WorkerEvent.objects.delete_older_than(retention),
                }
            )
        )

    def handle_probe(self, worker: str | None = None, **_: Any) -> None:
        from ...probe import probe

        ok, reason = probe(worker or None, host=socket.gethostname())
        if ok:
            self.stdout.write(reason)
            return
        self.stderr.write(reason)
        raise SystemExit(1)
