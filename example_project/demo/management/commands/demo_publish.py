"""``manage.py demo_publish TASK --count N``: publish demo tasks, print their ids as JSON."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from example_project.demo import tasks

TASKS = {
    "work": tasks.work,
    "burn": tasks.burn,
    "poison": tasks.poison,
    "poison_worker": tasks.poison_worker,
    "noop": tasks.noop,
    "flaky": tasks.flaky,
}


class Command(BaseCommand):
    help = "Publish demo tasks and print their ids as a JSON list."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("task", choices=sorted(TASKS))
        parser.add_argument("--count", type=int, default=1)
        parser.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
        parser.add_argument("--serializer", default=None, choices=["json", "pickle"])
        parser.add_argument("--countdown", type=float, default=None)
        parser.add_argument("--prefix", default="", help="task id prefix")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            kwargs = json.loads(options["kwargs"])
        except ValueError as exc:
            raise CommandError(f"--kwargs is not JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise CommandError("--kwargs must be a JSON object")
        task = TASKS[options["task"]]
        ids = []
        send_options: dict[str, Any] = {}
        if options["serializer"]:
            send_options["serializer"] = options["serializer"]
        if options["countdown"] is not None:
            send_options["countdown"] = options["countdown"]
        for i in range(options["count"]):
            if options["prefix"]:
                send_options["task_id"] = f"{options['prefix']}-{i}"
            ids.append(task.apply_async(kwargs=kwargs, **send_options).id)
        self.stdout.write(json.dumps(ids))
