"""The health dashboard in the Django admin (read-only: the data is machine-written)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.db.models.functions import Now
from django.http import HttpRequest
from django.utils.html import format_html

from .conf import settings
from .models import TaskQueue, WorkerEvent, WorkerRegistry

BADGE_COLOURS = {
    "active": "#2e7d32",
    "late": "#f9a825",
    "failed": "#c62828",
    "offline": "#757575",
}


def badge(label: str) -> str:
    return format_html(
        '<span style="background:{};color:#fff;padding:2px 8px;border-radius:8px">{}</span>',
        BADGE_COLOURS.get(label, "#455a64"),
        label,
    )


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(WorkerRegistry)
class WorkerRegistryAdmin(ReadOnlyAdmin):
    list_display = (
        "worker_id",
        "status_badge",
        "heartbeat_age",
        "tasks_processed",
        "started_at",
        "last_heartbeat",
    )
    list_filter = ("status",)
    search_fields = ("worker_id",)
    readonly_fields = [f.name for f in WorkerRegistry._meta.fields]

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkerRegistry]:
        return super().get_queryset(request).annotate(db_now=Now())

    def _age(self, obj: WorkerRegistry) -> float | None:
        db_now = getattr(obj, "db_now", None)
        if obj.last_heartbeat is None or db_now is None:
            return None
        return (db_now - obj.last_heartbeat).total_seconds()

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: WorkerRegistry) -> str:
        label = obj.status
        age = self._age(obj)
        if label == "active" and age is not None and age > settings.HEARTBEAT_INTERVAL:
            label = "late"
        return badge(label)

    @admin.display(description="seconds since heartbeat", ordering="last_heartbeat")
    def heartbeat_age(self, obj: WorkerRegistry) -> str:
        age = self._age(obj)
        return "-" if age is None else f"{age:.1f} / {settings.STALE_AFTER:g}"


@admin.register(TaskQueue)
class TaskQueueAdmin(ReadOnlyAdmin):
    list_display = (
        "task_id",
        "task_name",
        "status",
        "claimed_by",
        "fencing_token",
        "reclaim_count",
        "updated_at",
    )
    list_filter = ("status", "queue")
    search_fields = ("=task_id",)
    list_select_related = ("claimed_by",)
    show_full_result_count = False
    exclude = ("body",)
    readonly_fields = [f.name for f in TaskQueue._meta.fields if f.name != "body"]


@admin.register(WorkerEvent)
class WorkerEventAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "kind", "worker_name", "task_id")
    list_filter = ("kind",)
    search_fields = ("=task_id", "worker_name")
    show_full_result_count = False
    readonly_fields = [f.name for f in WorkerEvent._meta.fields]
