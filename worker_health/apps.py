from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class WorkerHealthConfig(AppConfig):
    name = "worker_health"
    verbose_name = _("Worker health")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery import signals as celery_signals
        from django.core import checks as django_checks
        from django.core.signals import setting_changed

        from . import beat, checks, conf, heartbeat, tasks, tracking  # noqa: F401 - registers tasks

        setting_changed.connect(conf.reload, dispatch_uid="worker_health.settings")
        conf.reload()  # anything read before the app was ready is read again

        django_checks.register(checks.check_settings, "worker_health")
        django_checks.register(checks.check_alert_and_endpoint_settings, "worker_health")

        connections: list[tuple[Any, Callable[..., None], str]] = [
            (celery_signals.worker_init, checks.on_worker_init, "checks.worker_init"),
            (celery_signals.worker_init, heartbeat.on_worker_init, "heartbeat.worker_init"),
            (celery_signals.worker_init, tracking.install_claim_hooks, "tracking.worker_init"),
            (celery_signals.worker_shutdown, heartbeat.on_worker_shutdown, "heartbeat.shutdown"),
            (celery_signals.before_task_publish, tracking.on_before_task_publish, "publish"),
            (celery_signals.task_received, tracking.on_task_received, "received"),
            (celery_signals.task_revoked, tracking.on_task_revoked, "revoked"),
            (celery_signals.task_failure, tracking.on_task_failure, "failure"),
            (celery_signals.task_postrun, tracking.on_task_postrun, "postrun"),
            (
                celery_signals.worker_process_shutdown,
                tracking.on_worker_process_shutdown,
                "process_shutdown",
            ),
        ]
        for signal, receiver, uid in connections:
            signal.connect(receiver, weak=False, dispatch_uid=f"worker_health.{uid}")
        beat.install_everywhere()

        from . import notifiers

        for alert_signal, alert_receiver, name in notifiers.signal_receivers():
            alert_signal.connect(
                alert_receiver, weak=False, dispatch_uid=f"worker_health.alerts.{name}"
            )
