"""``manage.py demo_canvas``: publish a chain, a group and a chord; print ids as JSON."""

from __future__ import annotations

import json
from typing import Any

from celery import chain, chord, group
from django.core.management.base import BaseCommand, CommandParser

from example_project.demo.tasks import add, total


class Command(BaseCommand):
    help = "Publish a chain, a group and a chord of demo tasks; print their ids as JSON."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--size", type=int, default=3)

    def handle(self, *args: Any, **options: Any) -> None:
        size = options["size"]
        chained = chain(add.s(1, 1), *[add.s(1) for _ in range(size - 1)]).apply_async()
        grouped = group(add.s(i, i) for i in range(size)).apply_async()
        chorded = chord((add.s(i, 1) for i in range(size)), total.s()).apply_async()
        self.stdout.write(
            json.dumps(
                {
                    "chain": chained.id,
                    "chain_expected": 1 + size,
                    "group": [r.id for r in grouped.results],
                    "chord": chorded.id,
                    "chord_expected": sum(i + 1 for i in range(size)),
                }
            )
        )
