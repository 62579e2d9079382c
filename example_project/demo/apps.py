from __future__ import annotations

import os
import time
from typing import Any

from django.apps import AppConfig


def _slow_start(**_: Any) -> None:
    time.sleep(float(os.environ["EXAMPLE_SLOW_START"]))


class DemoConfig(AppConfig):
    name = "example_project.demo"
    label = "demo"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        if os.environ.get("EXAMPLE_SLOW_START"):
            # For the tests: a worker whose start takes longer than STALE_AFTER, as with a
            # heavy ``worker_init`` handler of the application's own (this one runs after
            # worker_health's: its app comes first in INSTALLED_APPS).
            from celery.signals import worker_init

            worker_init.connect(_slow_start, weak=False, dispatch_uid="demo.slow_start")
