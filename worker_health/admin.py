"""The health dashboard in the Django admin.

The data is machine-written, so every page is read-only; the only changes an operator can
make are the actions, each behind its own permission and each calling the same function as
the beat task and the management command:

=========================  ==================================  ===============================
action                     permission                          calls
=========================  ==================================  ===============================
reclaim tasks now          worker_health.reclaim_worker_tasks  ``reclaim.reclaim_tasks_of``
mark offline (drain)       worker_health.drain_worker          ``WorkerRegistry...mark_offline``
delete old workers         worker_health.delete_old_workers    ``...delete_inactive_older_than``
requeue quarantined        worker_health.requeue_quarantined   ``TaskQueue...requeue_quarantined``
=========================  ==================================  ===============================

Task arguments are shown only for JSON payloads and only to users with
``worker_health.view_task_arguments``; pickle and YAML payloads are never deserialized here.
List pages run a constant number of queries and never count the whole task table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce, Now
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.safestring import SafeString

from . import drain, reclaim
from .conf import settings
from .metrics import (
    CAPPED_TASK_STATUSES,
    COUNT_CAP,
    HourlySeries,
    database_now,
    events_per_hour,
    task_counts,
    worker_counts,
)
from .models import (
    HELD_STATUSES,
    EventKind,
    HealthOverview,
    TaskQueue,
    TaskStatus,
    WorkerEvent,
    WorkerRegistry,
    event,
)

logger = logging.getLogger("worker_health")

BADGE_COLOURS = {
    "active": "#2e7d32",
    "late": "#b26a00",
    "failed": "#c62828",
    "offline": "#616161",
    # task statuses
    "queued": "#455a64",
    "reserved": "#1565c0",
    "claimed": "#1565c0",
    "reclaiming": "#b26a00",
    "succeeded": "#2e7d32",
    "revoked": "#616161",
    "quarantined": "#6a1b9a",
}


def badge(label: str, title: str = "") -> SafeString:
    """A coloured status label (inline styles: it must render without the package's CSS)."""
    return format_html(
        '<span class="wh-badge wh-badge-{}" title="{}" style="background:{};color:#fff;'
        'padding:2px 8px;border-radius:8px;white-space:nowrap">{}</span>',
        label,
        title,
        BADGE_COLOURS.get(label, "#455a64"),
        label,
    )


def human_duration(seconds: float | None) -> str:
    """``3d 4h``, ``2h 5m``, ``4m 10s``, ``12.3s``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def details_text(details: Any, limit: int = 300) -> str:
    """An event's details on one line, empty values left out."""
    if not isinstance(details, dict):
        return str(details or "")
    text = ", ".join(f"{k}={v}" for k, v in details.items() if v not in (None, "", [], {}))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def heartbeat_age(worker: WorkerRegistry) -> float | None:
    """Seconds since the worker's last heartbeat, by the database's clock (``db_now``)."""
    db_now = getattr(worker, "db_now", None)
    if worker.last_heartbeat is None or db_now is None:
        return None
    return max(0.0, (db_now - worker.last_heartbeat).total_seconds())


def display_state(worker: WorkerRegistry) -> str:
    """``active``, ``late`` (active, heartbeat older than one interval), ``failed``, ``offline``."""
    if worker.status != "active":
        return worker.status
    age = heartbeat_age(worker)
    if age is None or age > settings.HEARTBEAT_INTERVAL:
        return "late"
    return "active"


def held_count() -> Coalesce:
    """The number of tasks a worker holds, as a correlated subquery (uses the partial index
    on held tasks, and runs only for the rows on the page)."""
    held = (
        TaskQueue.objects.filter(claimed_by=OuterRef("pk"), status__in=HELD_STATUSES)
        .order_by()
        .values("claimed_by")
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(held, output_field=IntegerField()), 0)


class CappedCountPaginator(Paginator):
    """Counts at most ``COUNT_CAP`` rows, so a page of a million-row table stays cheap.

    Beyond the cap, the last pages are not reachable: narrow the list with a filter.
    """

    @cached_property
    def count(self) -> int:
        object_list = self.object_list
        if isinstance(object_list, QuerySet):
            return object_list.order_by()[:COUNT_CAP].count()
        return len(object_list)


class TextInputFilter(admin.SimpleListFilter):
    """A sidebar filter with a text box (exact match): no query to list its choices."""

    template = "worker_health/admin/input_filter.html"
    field_path = ""

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> Sequence[Any]:
        return ()

    def has_output(self) -> bool:
        return True

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value:
            return queryset.filter(**{self.field_path: value.strip()})
        return queryset

    def choices(self, changelist: ChangeList) -> Iterator[Any]:
        params = changelist.params if hasattr(changelist, "params") else {}
        keep = []
        for key, values in params.items():
            if key in (self.parameter_name, "p", "e"):
                continue
            for value in values if isinstance(values, list) else [values]:
                keep.append((key, value))
        yield {
            "query_parts": keep,
            "clear_query_string": changelist.get_query_string(remove=[str(self.parameter_name)]),
            "value": self.value() or "",
        }


class TaskNameFilter(TextInputFilter):
    title = "task name"
    parameter_name = "task_name"
    field_path = "task_name"


class TaskWorkerFilter(TextInputFilter):
    title = "worker"
    parameter_name = "worker"
    field_path = "claimed_by__worker_id"


class TaskQueueNameFilter(TextInputFilter):
    title = "queue"
    parameter_name = "queue"
    field_path = "queue"


class ReadOnlyAdmin(admin.ModelAdmin):
    """Machine-written data: nothing is added, edited or deleted through the forms."""

    show_full_result_count = False
    if hasattr(admin, "ShowFacets"):  # Django >= 5.0: facet counts would COUNT the table
        show_facets = admin.ShowFacets.NEVER

    class Media:
        css = {"all": ("worker_health/dashboard.css",)}

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def _has(self, request: HttpRequest, codename: str) -> bool:
        return request.user.has_perm(f"worker_health.{codename}")

    def confirm(
        self,
        request: HttpRequest,
        queryset: QuerySet[Any],
        *,
        action: str,
        title: str,
        warnings: Sequence[str] = (),
        form: forms.Form | None = None,
        button: str = "Yes, I'm sure",
    ) -> TemplateResponse:
        """The intermediate page of an action: posts the same selection back to the action."""
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "queryset": queryset,
            "objects": list(queryset[:200]),
            "count": queryset.count(),
            "action": action,
            "warnings": warnings,
            "form": form,
            "button": button,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "select_across": request.POST.get("select_across") == "1",
        }
        return TemplateResponse(request, "worker_health/admin/confirm_action.html", context)


# --------------------------------------------------------------------------------------------
# workers


class DeleteOldWorkersForm(forms.Form):
    days = forms.FloatField(
        min_value=0,
        initial=30,
        label="Offline or failed for more than (days)",
    )


@admin.register(WorkerRegistry)
class WorkerRegistryAdmin(ReadOnlyAdmin):
    list_display = (
        "worker_id",
        "status_badge",
        "heartbeat_age_display",
        "tasks_processed",
        "claimed_now",
        "host",
        "pool",
        "queues",
        "clock_skew_display",
        "uptime",
    )
    list_filter = ("status",)
    search_fields = ("worker_id",)
    list_per_page = 100
    actions = ("reclaim_tasks_now", "mark_offline", "delete_old_workers")
    change_form_template = "worker_health/admin/worker_change_form.html"
    readonly_fields = (
        "worker_id",
        "status_badge",
        "heartbeat_age_display",
        "last_heartbeat",
        "tasks_processed",
        "claimed_now",
        "host",
        "pool",
        "queues",
        "clock_skew_display",
        "uptime",
        "started_at",
        "status_changed_at",
        "incarnation",
        "metadata_display",
    )
    fields = readonly_fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkerRegistry]:
        return super().get_queryset(request).annotate(db_now=Now(), claimed_now=held_count())

    # -- columns ---------------------------------------------------------------------------
    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: WorkerRegistry) -> SafeString:
        state = display_state(obj)
        titles = {
            "late": f"no heartbeat for more than {settings.HEARTBEAT_INTERVAL:g} s; failed "
            f"after {settings.STALE_AFTER:g} s",
            "failed": "missed its heartbeats; its tasks were reclaimed",
            "offline": "shut down or drained",
            "active": "heartbeats on time",
        }
        return badge(state, titles.get(state, ""))

    @admin.display(description="seconds since heartbeat", ordering="last_heartbeat")
    def heartbeat_age_display(self, obj: WorkerRegistry) -> str:
        age = heartbeat_age(obj)
        if age is None:
            return "-"
        if obj.status == "active" and age >= settings.STALE_AFTER:
            return format_html('<strong class="wh-stale">{}</strong>', f"{age:.1f}")
        return f"{age:.1f}"

    @admin.display(description="claimed now", ordering="claimed_now")
    def claimed_now(self, obj: WorkerRegistry) -> int:
        return getattr(obj, "claimed_now", 0)

    def _meta(self, obj: WorkerRegistry, key: str) -> Any:
        return (obj.metadata or {}).get(key) if isinstance(obj.metadata, dict) else None

    @admin.display(description="host:pid")
    def host(self, obj: WorkerRegistry) -> str:
        host, pid = self._meta(obj, "host"), self._meta(obj, "pid")
        return f"{host or '-'}:{pid}" if pid else str(host or "-")

    @admin.display(description="pool (concurrency)")
    def pool(self, obj: WorkerRegistry) -> str:
        pool, concurrency = self._meta(obj, "pool"), self._meta(obj, "concurrency")
        return f"{pool or '-'} ({concurrency})" if concurrency is not None else str(pool or "-")

    @admin.display(description="queues")
    def queues(self, obj: WorkerRegistry) -> str:
        value = self._meta(obj, "queues") or []
        return ", ".join(str(q) for q in value) if isinstance(value, list) else str(value)

    @admin.display(description="clock skew", ordering="clock_skew")
    def clock_skew_display(self, obj: WorkerRegistry) -> str:
        if obj.clock_skew is None:
            return "-"
        text = f"{obj.clock_skew:+.3f} s"
        if abs(obj.clock_skew) >= 1:
            return format_html(
                '<strong class="wh-stale" title="this host\'s clock differs from the '
                "database's; heartbeats use the database's clock, so detection is not "
                'affected">{}</strong>',
                text,
            )
        return text

    @admin.display(description="uptime", ordering="started_at")
    def uptime(self, obj: WorkerRegistry) -> str:
        db_now = getattr(obj, "db_now", None)
        if obj.status != "active" or db_now is None or obj.started_at is None:
            return "-"
        return human_duration((db_now - obj.started_at).total_seconds())

    @admin.display(description="metadata")
    def metadata_display(self, obj: WorkerRegistry) -> SafeString:
        return format_html("<pre>{}</pre>", json.dumps(obj.metadata, indent=2, sort_keys=True))

    # -- detail page -----------------------------------------------------------------------
    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        worker = self.get_object(request, object_id)
        extra: dict[str, Any] = {**(extra_context or {})}
        if worker is not None:
            held = list(
                TaskQueue.objects.held_by(worker).defer("body").order_by("claimed_at")[:201]
            )
            extra.update(
                claimed_tasks=held[:200],
                claimed_tasks_truncated=len(held) > 200,
                worker_events=[
                    {"event": e, "details": details_text(e.details)}
                    for e in WorkerEvent.objects.filter(worker_name=worker.worker_id).order_by(
                        "-created_at", "-id"
                    )[:100]
                ],
                worker_actions=self.detail_actions(request),
                task_changelist=reverse("admin:worker_health_taskqueue_changelist"),
            )
        return super().change_view(request, object_id, form_url, extra)

    def detail_actions(self, request: HttpRequest) -> list[tuple[str, str]]:
        """The actions offered as buttons on a worker's page (those the user may run)."""
        available = self.get_actions(request)
        labels = {"reclaim_tasks_now": "Reclaim its tasks now", "mark_offline": "Mark offline"}
        return [(name, label) for name, label in labels.items() if name in available]

    # -- actions ---------------------------------------------------------------------------
    def has_reclaim_worker_tasks_permission(self, request: HttpRequest) -> bool:
        return self._has(request, "reclaim_worker_tasks")

    def has_drain_worker_permission(self, request: HttpRequest) -> bool:
        return self._has(request, "drain_worker")

    def has_delete_old_workers_permission(self, request: HttpRequest) -> bool:
        return self._has(request, "delete_old_workers")

    def _live(self, queryset: QuerySet[WorkerRegistry]) -> list[str]:
        return [w.worker_id for w in queryset if display_state(w) in ("active", "late")]

    @admin.action(
        permissions=["reclaim_worker_tasks"], description="Reclaim the selected workers' tasks now"
    )
    def reclaim_tasks_now(
        self, request: HttpRequest, queryset: QuerySet[WorkerRegistry]
    ) -> HttpResponse | None:
        live = self._live(queryset)
        if live and request.POST.get("confirm") != "yes":
            return self.confirm(
                request,
                queryset,
                action="reclaim_tasks_now",
                title="Reclaim tasks from live workers?",
                warnings=[
                    f"{', '.join(live[:20])} still heartbeat{'s' if len(live) == 1 else ''}. "
                    "The tasks they are running will be published again and may run twice; "
                    "the late results of the first runs are fenced off."
                ],
            )
        reclaimed = quarantined = 0
        for worker in queryset:
            outcome = reclaim.reclaim_tasks_of(worker, reason="manual")
            reclaimed += len(outcome.reclaimed)
            quarantined += len(outcome.quarantined)
            logger.warning(
                "worker_health: %s reclaimed %d task(s) of %s from the admin",
                request.user,
                len(outcome.reclaimed) + len(outcome.quarantined),
                worker.worker_id,
                extra={"worker_id": worker.worker_id, "user": str(request.user)},
            )
        self.message_user(
            request,
            f"Reclaimed {reclaimed} task(s)"
            + (f", quarantined {quarantined}" if quarantined else "")
            + f" from {queryset.count()} worker(s).",
            messages.SUCCESS,
        )
        return None

    @admin.action(permissions=["drain_worker"], description="Mark the selected workers offline")
    def mark_offline(
        self, request: HttpRequest, queryset: QuerySet[WorkerRegistry]
    ) -> HttpResponse | None:
        live = self._live(queryset)
        if live and request.POST.get("confirm") != "yes":
            return self.confirm(
                request,
                queryset,
                action="mark_offline",
                title="Mark live workers offline?",
                warnings=[
                    f"{', '.join(live[:20])} still heartbeat{'s' if len(live) == 1 else ''}: "
                    "each will see the mark at its next heartbeat and shut down warmly, "
                    "finishing the tasks it runs and handing back the ones it holds."
                ],
            )
        changed = sum(
            drain.mark_offline(worker.worker_id, drained_by=str(request.user))
            for worker in queryset
        )
        self.message_user(request, f"Marked {changed} worker(s) offline.", messages.SUCCESS)
        return None

    @admin.action(
        permissions=["delete_old_workers"],
        description="Delete the selected workers offline or failed for more than N days",
    )
    def delete_old_workers(
        self, request: HttpRequest, queryset: QuerySet[WorkerRegistry]
    ) -> HttpResponse | None:
        form = DeleteOldWorkersForm(request.POST if "days" in request.POST else None)
        if not form.is_valid():
            return self.confirm(
                request,
                queryset,
                action="delete_old_workers",
                title="Delete old workers",
                warnings=[
                    "Only workers among the selection that are offline or failed, and have "
                    "been so for longer than the given number of days, are deleted. Active "
                    "workers are never deleted; their events are kept."
                ],
                form=form,
                button="Delete",
            )
        selected = WorkerRegistry.objects.filter(pk__in=queryset.order_by().values("pk"))
        deleted = selected.delete_inactive_older_than(form.cleaned_data["days"])
        self.message_user(request, f"Deleted {deleted} worker(s).", messages.SUCCESS)
        return None


# --------------------------------------------------------------------------------------------
# tasks


#: headers that repeat the task's arguments (Celery protocol 2)
ARGUMENT_HEADERS = ("argsrepr", "kwargsrepr")
MAX_DECODED_BODY = 1_000_000
HIDDEN = "(hidden: needs the 'Can view task arguments' permission)"


def decode_arguments(task: TaskQueue) -> tuple[dict[str, Any] | None, str]:
    """``(arguments, reason)``: the decoded ``args``/``kwargs`` of a JSON message, or
    ``None`` and why not. Only JSON is ever parsed: pickle and YAML would run code."""
    if task.body is None:
        return None, "no message recorded"
    content_type = (task.content_type or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return None, f"{task.content_type or 'unknown'} payloads are never deserialized"
    if (task.headers or {}).get("compression"):
        return None, "compressed payload"
    body = bytes(task.body)
    if len(body) > MAX_DECODED_BODY:
        return None, f"payload too large to show ({len(body):,} bytes)"
    try:
        data = json.loads(body.decode(task.content_encoding or "utf-8"))
    except (ValueError, LookupError) as exc:
        return None, f"not valid JSON ({exc})"
    if isinstance(data, list) and len(data) == 3:  # protocol 2: [args, kwargs, embed]
        return {"args": data[0], "kwargs": data[1]}, ""
    if isinstance(data, dict) and ("args" in data or "kwargs" in data):  # protocol 1
        return {"args": data.get("args", []), "kwargs": data.get("kwargs", {})}, ""
    return None, "unrecognised message layout"


#: the statuses that set ``finished_at``
FINISHED_STATUSES = (
    TaskStatus.SUCCEEDED,
    TaskStatus.FAILED,
    TaskStatus.REVOKED,
    TaskStatus.QUARANTINED,
)

#: the order of the task list: newest rows first
TASK_ORDERING: tuple[str, ...] = ("-pk",)

#: The order of a list filtered by one status, each served by an index. The default ``-pk``
#: walks the primary key backwards past the rows of every other status until it has a page:
#: 530 ms for the claimed tasks among a million rows. Finished rows come in the order of
#: ``wh_task_finished_idx`` (status, finished_at), and rows being reclaimed in that of
#: ``wh_task_reclaiming_idx``, so the page's ``LIMIT`` stops the scan; held tasks (a few per
#: live worker) are all found through ``wh_task_held_idx`` and sorted. ``pk`` only breaks
#: ties. Queued tasks keep ``-pk``: a backlog is mostly new rows, at the end of the key.
STATUS_ORDERING: dict[str, tuple[str, ...]] = {
    **{str(status): ("-claimed_at", "-pk") for status in HELD_STATUSES},
    str(TaskStatus.RECLAIMING): ("-reclaimed_at", "-pk"),
    **{str(status): ("-finished_at", "-pk") for status in FINISHED_STATUSES},
}


def search_candidates(search_term: str) -> list[str]:
    """The task ids a search box entry may mean: as typed without the whitespace around it
    (a pasted id), and also without quotes around it (``"id"`` or ``'id'``, which Django's
    search unquotes too). Case is kept: task ids are case-sensitive."""
    term = search_term.strip()
    if not term:
        return []
    candidates = [term]
    if len(term) > 2 and term[0] == term[-1] and term[0] in "\"'":
        inner = term[1:-1].strip()
        if inner:
            candidates.append(inner)
    return candidates


@admin.register(TaskQueue)
class TaskQueueAdmin(ReadOnlyAdmin):
    list_display = (
        "task_id",
        "task_name",
        "status_badge",
        "worker_link",
        "queue",
        "fencing_token",
        "reclaim_count",
        "updated_at",
    )
    # status has static choices; the others are text boxes: no filter lists its values
    list_filter = ("status", TaskNameFilter, TaskWorkerFilter, TaskQueueNameFilter)
    # shows the search box; the search itself is get_search_results (an exact, indexed match)
    search_fields = ("task_id",)
    search_help_text = "Exact task id (case-sensitive)"
    list_select_related = ("claimed_by",)
    list_per_page = 100
    paginator = CappedCountPaginator
    ordering = TASK_ORDERING  # and STATUS_ORDERING: see get_ordering
    actions = ("requeue_quarantined",)
    change_list_template = "worker_health/admin/capped_change_list.html"
    readonly_fields = (
        "task_id",
        "task_name",
        "status_badge",
        "queue",
        "worker_link",
        "claimed_incarnation",
        "claimed_at",
        "fencing_token",
        "started_token",
        "reclaim_count",
        "reclaimed_at",
        "lost_on",
        "exchange",
        "routing_key",
        "content_type",
        "content_encoding",
        "eta",
        "expires",
        "properties",
        "created_at",
        "updated_at",
        "finished_at",
        # one of each pair, depending on view_task_arguments (see get_fieldsets)
        "headers_display",
        "arguments",
        "headers_redacted",
        "arguments_hidden",
    )

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        # Field callables get only the object, so the permission picks the callables here.
        if request.user.has_perm("worker_health.view_task_arguments"):
            private: tuple[str, ...] = ("headers_display", "arguments")
        else:
            private = ("headers_redacted", "arguments_hidden")
        return (
            (
                None,
                {
                    "fields": (
                        "task_id",
                        "task_name",
                        "status_badge",
                        "queue",
                        "worker_link",
                        "claimed_incarnation",
                        "claimed_at",
                        "fencing_token",
                        "started_token",
                        "reclaim_count",
                        "reclaimed_at",
                        "lost_on",
                    )
                },
            ),
            (
                "Message",
                {
                    "fields": (
                        "exchange",
                        "routing_key",
                        "content_type",
                        "content_encoding",
                        "eta",
                        "expires",
                        "properties",
                        *private,
                    )
                },
            ),
            ("Times", {"fields": ("created_at", "updated_at", "finished_at")}),
        )

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return DeferredBodyChangeList

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[TaskQueue], search_term: str
    ) -> tuple[QuerySet[TaskQueue], bool]:
        """A search is a task id, compared exactly: ``task_id = '...'`` is one probe of the
        unique index ``wh_task_id_uniq``. (Django's ``=task_id`` compares
        ``UPPER(task_id)``, which no index serves: a scan of the whole table, 400 ms with a
        million rows; and Celery task ids are case-sensitive.)"""
        candidates = search_candidates(search_term)
        if not candidates:
            return queryset, False
        if len(candidates) == 1:
            return queryset.filter(task_id=candidates[0]), False
        return queryset.filter(task_id__in=candidates), False

    def get_ordering(self, request: HttpRequest) -> tuple[str, ...]:
        """``STATUS_ORDERING`` when the list is filtered by one status (a column the user
        sorts by still comes first)."""
        statuses = {*request.GET.getlist("status__exact"), *request.GET.getlist("status")}
        if len(statuses) == 1:
            return STATUS_ORDERING.get(statuses.pop(), TASK_ORDERING)
        return TASK_ORDERING

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return super().changelist_view(request, {**(extra_context or {}), "count_cap": COUNT_CAP})

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: TaskQueue) -> SafeString:
        return badge(obj.status)

    @admin.display(description="worker", ordering="claimed_by__worker_id")
    def worker_link(self, obj: TaskQueue) -> str:
        if obj.claimed_by is None:
            return "-"
        url = reverse("admin:worker_health_workerregistry_change", args=[obj.claimed_by.pk])
        return format_html('<a href="{}">{}</a>', url, obj.claimed_by.worker_id)

    @admin.display(description="headers")
    def headers_display(self, obj: TaskQueue) -> SafeString:
        return format_html("<pre>{}</pre>", json.dumps(obj.headers, indent=2, default=str))

    @admin.display(description="headers")
    def headers_redacted(self, obj: TaskQueue) -> SafeString:
        headers = dict(obj.headers or {})
        for key in ARGUMENT_HEADERS:
            if key in headers:
                headers[key] = HIDDEN
        return format_html("<pre>{}</pre>", json.dumps(headers, indent=2, default=str))

    @admin.display(description="arguments")
    def arguments(self, obj: TaskQueue) -> SafeString | str:
        decoded, reason = decode_arguments(obj)
        if decoded is None:
            return f"Not shown: {reason}."
        text = json.dumps(decoded, indent=2, ensure_ascii=False, default=str)
        return format_html('<pre class="wh-arguments">{}</pre>', text)

    @admin.display(description="arguments")
    def arguments_hidden(self, obj: TaskQueue) -> str:
        return HIDDEN

    def has_requeue_quarantined_permission(self, request: HttpRequest) -> bool:
        return self._has(request, "requeue_quarantined")

    @admin.action(
        permissions=["requeue_quarantined"], description="Requeue the selected quarantined tasks"
    )
    def requeue_quarantined(
        self, request: HttpRequest, queryset: QuerySet[TaskQueue]
    ) -> HttpResponse | None:
        pks = list(queryset.filter(status="quarantined").values_list("pk", flat=True)[:COUNT_CAP])
        requeued = TaskQueue.objects.requeue_quarantined(pks)
        task_ids = list(
            TaskQueue.objects.filter(pk__in=[int(pk) for pk in requeued]).values_list(
                "task_id", flat=True
            )
        )
        for task_id in task_ids:
            event(EventKind.TASK_REQUEUED, task_id=task_id, requeued_by=str(request.user))
        published = reclaim.flush_outbox()
        self.message_user(
            request,
            f"Requeued {len(requeued)} quarantined task(s); published {len(published)} "
            "(tasks not quarantined are left alone).",
            messages.SUCCESS if len(published) >= len(requeued) else messages.WARNING,
        )
        return None


class DeferredBodyChangeList(ChangeList):
    """The task list never loads message bodies."""

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[Any]:
        if exclude_parameters is None:
            qs = super().get_queryset(request)
        else:
            qs = super().get_queryset(request, exclude_parameters)
        return qs.defer("body", "headers", "properties", "lost_on")


# --------------------------------------------------------------------------------------------
# events


#: the badge colour of each event kind
EVENT_BADGES: dict[str, str] = {
    "worker_failed": "failed",
    "task_quarantined": "quarantined",
    "task_reclaimed": "reclaiming",
    "stale_completion": "late",
    "worker_recovered": "active",
    "worker_registered": "active",
    "worker_offline": "offline",
}


@admin.register(WorkerEvent)
class WorkerEventAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "kind_badge", "worker_link", "task_link", "details_summary")
    list_filter = ("kind",)
    search_fields = ("=task_id", "=worker_name")
    search_help_text = "Exact task id or worker name"
    list_per_page = 100
    paginator = CappedCountPaginator
    change_list_template = "worker_health/admin/capped_change_list.html"
    fields = ("created_at", "kind", "worker_name", "worker", "task_id", "details_display")
    readonly_fields = fields

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        return super().changelist_view(request, {**(extra_context or {}), "count_cap": COUNT_CAP})

    @admin.display(description="kind", ordering="kind")
    def kind_badge(self, obj: WorkerEvent) -> SafeString:
        return format_html(
            '<span class="wh-badge" style="background:{};color:#fff;padding:2px 8px;'
            'border-radius:8px;white-space:nowrap">{}</span>',
            BADGE_COLOURS.get(EVENT_BADGES.get(obj.kind, ""), "#455a64"),
            obj.get_kind_display(),
        )

    @admin.display(description="worker", ordering="worker_name")
    def worker_link(self, obj: WorkerEvent) -> str:
        if not obj.worker_name:
            return "-"
        url = reverse("admin:worker_health_workerregistry_changelist")
        return format_html('<a href="{}?q={}">{}</a>', url, obj.worker_name, obj.worker_name)

    @admin.display(description="task")
    def task_link(self, obj: WorkerEvent) -> str:
        if not obj.task_id:
            return "-"
        url = reverse("admin:worker_health_taskqueue_changelist")
        return format_html('<a href="{}?q={}">{}</a>', url, obj.task_id, obj.task_id)

    @admin.display(description="details")
    def details_summary(self, obj: WorkerEvent) -> str:
        return details_text(obj.details, limit=160)

    @admin.display(description="details")
    def details_display(self, obj: WorkerEvent) -> SafeString:
        return format_html("<pre>{}</pre>", json.dumps(obj.details, indent=2, default=str))


# --------------------------------------------------------------------------------------------
# the overview


CHART_TITLES: dict[str, str] = {
    "worker_failed": "Worker failures",
    "task_reclaimed": "Reclaimed tasks",
    "task_quarantined": "Quarantined tasks",
}
CHART_COLOURS: dict[str, str] = {
    "worker_failed": "#c62828",
    "task_reclaimed": "#b26a00",
    "task_quarantined": "#6a1b9a",
}


def bar_chart(series: HourlySeries, width: int = 320, height: int = 120) -> dict[str, Any]:
    """Geometry of a server-side SVG bar chart (one bar per hour)."""
    n = len(series.counts)
    top = max(series.counts) or 1
    left, bottom = 28, 18
    plot_w, plot_h = width - left - 4, height - bottom - 6
    slot = plot_w / n
    bars = []
    for i, count in enumerate(series.counts):
        start = series.start + timedelta(hours=i)
        h = plot_h * count / top
        local = timezone.localtime(start)
        bars.append(
            {
                "x": round(left + i * slot + 1, 1),
                "y": round(6 + plot_h - h, 1),
                "w": round(max(slot - 2, 1), 1),
                "h": round(h, 1),
                "count": count,
                "title": f"{local:%H:00}-{(local + timedelta(hours=1)):%H:00}: {count}",
            }
        )
    ticks = [
        {
            "x": round(left + i * slot + slot / 2, 1),
            "label": f"{timezone.localtime(series.start + timedelta(hours=i)):%H:00}",
        }
        for i in range(0, n, 6)
    ]
    return {
        "kind": series.kind,
        "label": CHART_TITLES.get(series.kind, series.label),
        "total": series.total,
        "max": max(series.counts),
        "colour": CHART_COLOURS.get(series.kind, "#455a64"),
        "bars": bars,
        "ticks": ticks,
        "width": width,
        "height": height,
        "left": left,
        "baseline": 6 + plot_h,
        "top_y": 6,
    }


def heartbeat_rows(workers: Sequence[WorkerRegistry]) -> list[dict[str, Any]]:
    """Per-worker heartbeat age against the stale threshold, as bar widths in percent."""
    stale = settings.STALE_AFTER
    interval_pct = round(100 * settings.HEARTBEAT_INTERVAL / stale, 1)
    rows = []
    for worker in workers:
        age = heartbeat_age(worker)
        state = display_state(worker)
        if age is not None and age >= stale:
            state = "stale"
        rows.append(
            {
                "worker": worker,
                "age": age,
                "state": state,
                "pct": round(min(100.0, 100 * (age or 0) / stale), 1),
                "interval_pct": interval_pct,
            }
        )
    return rows


@admin.register(HealthOverview)
class HealthOverviewAdmin(admin.ModelAdmin):
    """The overview page: the admin index links to it as "Health overview"."""

    class Media:
        css = {"all": ("worker_health/dashboard.css",)}

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        user = request.user
        return user.has_perm("worker_health.view_healthoverview") or user.has_perm(
            "worker_health.view_workerregistry"
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[Any]:
        from django.urls import path

        view = self.admin_site.admin_view(self.changelist_view)
        info = (self.model._meta.app_label, self.model._meta.model_name)
        return [path("", view, name="{}_{}_changelist".format(*info))]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        return TemplateResponse(
            request,
            "worker_health/admin/overview.html",
            {
                **self.admin_site.each_context(request),
                **overview_context(),
                "title": "Worker health",
                "opts": self.model._meta,
                "media": self.media,
                **(extra_context or {}),
            },
        )


def overview_context() -> dict[str, Any]:
    """Everything the overview shows: about a dozen queries, whatever the table sizes."""
    now = database_now()
    workers = worker_counts()
    live = list(
        WorkerRegistry.objects.filter(status="active")
        .annotate(db_now=Now(), claimed_now=held_count())
        .order_by("last_heartbeat")[:30]
    )
    live_total = workers["active"] + workers["late"]
    recently_failed = list(
        WorkerRegistry.objects.filter(status="failed")
        .annotate(db_now=Now(), claimed_now=held_count())
        .order_by("-status_changed_at")[:10]
    )
    from .models import DetectorState

    detector = DetectorState.objects.filter(pk=1).first()
    detector_age = (
        (now - detector.last_sweep_at).total_seconds()
        if detector is not None and detector.last_sweep_at
        else None
    )
    recent_events = list(
        WorkerEvent.objects.exclude(kind=EventKind.ALERT_SENT).order_by("-created_at", "-id")[:15]
    )
    tasks = task_counts()
    return {
        "db_now": now,
        "worker_counts": workers,
        "worker_total": sum(workers.values()),
        "task_counts": tasks,
        "capped_statuses": CAPPED_TASK_STATUSES,
        "count_cap": f"{COUNT_CAP:,}",
        "charts": [bar_chart(s) for s in events_per_hour(now=now)],
        "heartbeats": heartbeat_rows(live),
        "heartbeats_more": max(0, live_total - len(live)),
        "recently_failed": heartbeat_rows(recently_failed),
        "detector": detector,
        "detector_age": detector_age,
        "detector_late": detector_age is None or detector_age > 3 * settings.CHECK_INTERVAL,
        "recent_events": recent_events,
        "heartbeat_interval": settings.HEARTBEAT_INTERVAL,
        "stale_after": settings.STALE_AFTER,
        "check_interval": settings.CHECK_INTERVAL,
        "max_reclaims": settings.MAX_RECLAIMS,
        "workers_url": reverse("admin:worker_health_workerregistry_changelist"),
        "tasks_url": reverse("admin:worker_health_taskqueue_changelist"),
        "events_url": reverse("admin:worker_health_workerevent_changelist"),
    }
