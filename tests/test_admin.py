"""The admin dashboard: every page, action and permission, with query counts."""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from tests.dashboard_data import make_event, make_task, make_worker, scenario, staff_user
from worker_health import publish
from worker_health.admin import CappedCountPaginator, decode_arguments, human_duration
from worker_health.metrics import COUNT_CAP
from worker_health.models import EventKind, TaskQueue, WorkerEvent, WorkerRegistry
from worker_health.signals import worker_offline

pytestmark = pytest.mark.django_db

OVERVIEW = reverse("admin:worker_health_healthoverview_changelist")
WORKERS = reverse("admin:worker_health_workerregistry_changelist")
TASKS = reverse("admin:worker_health_taskqueue_changelist")
EVENTS = reverse("admin:worker_health_workerevent_changelist")


def worker_url(worker: WorkerRegistry) -> str:
    return reverse("admin:worker_health_workerregistry_change", args=[worker.pk])


def task_url(task: TaskQueue) -> str:
    return reverse("admin:worker_health_taskqueue_change", args=[task.pk])


def login(client: Client, *perms: str, username: str = "operator") -> Client:
    client.force_login(staff_user(username, *perms))
    return client


def queries_for(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200, response.content[:500]
    return len(ctx.captured_queries)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Reclaimed tasks are published through a fake broker."""
    sent: list[str] = []
    monkeypatch.setattr(publish, "republish", lambda task: sent.append(task.task_id))
    return sent


def post_action(client: Client, url: str, action: str, objects: list[Any], **extra: str) -> Any:
    data = {"action": action, ACTION_CHECKBOX_NAME: [str(o.pk) for o in objects], **extra}
    if "confirm" not in extra and "days" not in extra:
        data["index"] = "0"
    return client.post(url, data, follow=False)


# --------------------------------------------------------------------------------------------
# overview


def test_admin_index_links_to_the_overview(admin_client: Client) -> None:
    response = admin_client.get(reverse("admin:index"))
    assert OVERVIEW.encode() in response.content
    assert b"Health overview" in response.content


def test_overview_shows_counts_charts_and_heartbeats(admin_client: Client) -> None:
    data = scenario()
    response = admin_client.get(OVERVIEW)
    assert response.status_code == 200
    ctx = response.context
    assert ctx["worker_counts"] == {"active": 1, "late": 1, "failed": 1, "offline": 1}
    counts = {c.status: str(c) for c in ctx["task_counts"]}
    assert counts["claimed"] == "1"
    assert counts["quarantined"] == "1"
    assert counts["queued"] == "1"
    charts = {c["kind"]: c for c in ctx["charts"]}
    assert charts["worker_failed"]["total"] == 1
    assert charts["task_reclaimed"]["total"] == 2
    assert charts["task_quarantined"]["total"] == 1
    # the newest hour is the last bar; the 3-hours-old reclaim sits three bars earlier
    reclaims = [b["count"] for b in charts["task_reclaimed"]["bars"]]
    assert len(reclaims) == 24 and sum(reclaims) == 2
    html = response.content.decode()
    assert "<svg" in html and "<rect" in html
    assert "cdn" not in html.lower()
    # heartbeats of the live workers, oldest first, the late one flagged
    rows = ctx["heartbeats"]
    assert [r["worker"].worker_id for r in rows] == ["beta@web-2", "alpha@web-1"]
    assert [r["state"] for r in rows] == ["late", "active"]
    assert rows[0]["pct"] == pytest.approx(75, abs=3)  # 45 s of a 60 s threshold
    assert [r["worker"].worker_id for r in ctx["recently_failed"]] == [data["failed"].worker_id]
    assert ctx["detector_late"] is True
    assert "The detector has never swept" in html


def test_overview_caps_counts_of_finished_tasks(admin_client: Client, monkeypatch: Any) -> None:
    monkeypatch.setattr("worker_health.metrics.COUNT_CAP", 3)
    for i in range(5):
        make_task(f"done-{i}", status="succeeded")
    response = admin_client.get(OVERVIEW)
    counts = {c.status: c for c in response.context["task_counts"]}
    assert (counts["succeeded"].count, counts["succeeded"].exact) == (3, False)
    assert str(counts["succeeded"]) == "3+"
    assert (counts["quarantined"].count, counts["quarantined"].exact) == (0, True)


def test_overview_runs_a_constant_number_of_queries(admin_client: Client) -> None:
    scenario()
    few = queries_for(admin_client, OVERVIEW)
    for i in range(50):
        w = make_worker(f"extra-{i}@host", heartbeat_age=i % 40)
        make_task(f"extra-task-{i}", worker=w)
        make_event(EventKind.TASK_RECLAIMED, worker_name=w.worker_id, hours_ago=i % 24)
    assert queries_for(admin_client, OVERVIEW) == few
    assert few <= 16


def test_overview_needs_a_view_permission(client: Client) -> None:
    login(client)
    assert client.get(OVERVIEW).status_code == 403
    client.logout()
    login(client, "worker_health.view_workerregistry", username="viewer")
    assert client.get(OVERVIEW).status_code == 200


def test_overview_redirects_anonymous_users_to_the_login(client: Client) -> None:
    response = client.get(OVERVIEW)
    assert response.status_code == 302
    assert reverse("admin:login") in response["Location"]


# --------------------------------------------------------------------------------------------
# workers


def test_worker_list_shows_badges_from_the_database_clock(admin_client: Client) -> None:
    scenario()
    response = admin_client.get(WORKERS)
    html = response.content.decode()
    for state in ("active", "late", "failed", "offline"):
        assert f"wh-badge-{state}" in html
    cl = response.context["cl"]
    rows = {w.worker_id: w for w in cl.result_list}
    assert rows["alpha@web-1"].claimed_now == 1
    assert rows["beta@web-2"].claimed_now == 0
    assert "web-1:4242" in html and "prefork (4)" in html and "celery, priority" in html
    assert "+0.012 s" in html  # clock skew
    assert cl.show_full_result_count is False
    assert "_facets" not in html  # no "show counts" link: facets would count whole tables


def test_worker_list_runs_a_constant_number_of_queries(admin_client: Client) -> None:
    w = make_worker("only@host")
    make_task("t-only", worker=w)
    one = queries_for(admin_client, WORKERS)
    for i in range(49):
        w = make_worker(f"w{i}@host", status=("active", "failed", "offline")[i % 3])
        make_task(f"t{i}", worker=w)
    assert queries_for(admin_client, WORKERS) == one
    assert one <= 6


def test_worker_list_filters_by_status(admin_client: Client) -> None:
    scenario()
    response = admin_client.get(WORKERS + "?status__exact=failed")
    assert [w.worker_id for w in response.context["cl"].result_list] == ["gamma@web-3"]


def test_worker_page_lists_claimed_tasks_and_events(admin_client: Client) -> None:
    data = scenario()
    response = admin_client.get(worker_url(data["active"]))
    assert response.status_code == 200
    assert [t.task_id for t in response.context["claimed_tasks"]] == ["task-running-1"]
    html = response.content.decode()
    assert "task-running-1" in html
    response = admin_client.get(worker_url(data["failed"]))
    html = response.content.decode()
    kinds = [row["event"].kind for row in response.context["worker_events"]]
    assert kinds == ["task_quarantined", "task_reclaimed", "worker_failed"]
    assert "task-reclaimed-1" in html and "reason=worker failed" in html
    assert "This worker holds no task." in html
    # read-only: no save button, and a POST is refused
    assert 'name="_save"' not in html
    assert admin_client.post(worker_url(data["failed"]), {}).status_code == 403


def test_worker_page_runs_a_constant_number_of_queries(admin_client: Client) -> None:
    w = make_worker("busy@host")
    make_task("b0", worker=w)
    make_event(EventKind.WORKER_REGISTERED, worker=w, worker_name=w.worker_id)
    few = queries_for(admin_client, worker_url(w))
    for i in range(1, 50):
        make_task(f"b{i}", worker=w)
        make_event(EventKind.TASK_RECLAIMED, worker_name=w.worker_id, task_id=f"x{i}")
    assert queries_for(admin_client, worker_url(w)) == few


def test_workers_cannot_be_added_or_deleted_through_forms(admin_client: Client) -> None:
    w = make_worker("keep@host")
    assert admin_client.get(reverse("admin:worker_health_workerregistry_add")).status_code == 403
    delete = reverse("admin:worker_health_workerregistry_delete", args=[w.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert WorkerRegistry.objects.filter(pk=w.pk).exists()


# --------------------------------------------------------------------------------------------
# worker actions


ACTION_PERMS = {
    "reclaim_tasks_now": "worker_health.reclaim_worker_tasks",
    "mark_offline": "worker_health.drain_worker",
    "delete_old_workers": "worker_health.delete_old_workers",
}


@pytest.mark.parametrize("action", sorted(ACTION_PERMS))
def test_each_worker_action_needs_its_own_permission(client: Client, action: str) -> None:
    others = [p for a, p in ACTION_PERMS.items() if a != action]
    login(client, "worker_health.view_workerregistry", *others)
    response = client.get(WORKERS)
    choices = [name for name, _ in response.context["action_form"].fields["action"].choices]
    assert action not in choices
    assert {a for a in ACTION_PERMS if a != action} <= set(choices)
    w = make_worker("target@host", status="failed", changed_ago=90 * 86400)
    make_task("held-1", worker=w)
    post_action(client, WORKERS, action, [w], days="1")
    w.refresh_from_db()
    assert w.status == "failed"
    assert TaskQueue.objects.get(task_id="held-1").status == "claimed"


def test_view_only_user_gets_no_action_buttons_on_the_worker_page(client: Client) -> None:
    w = make_worker("target@host")
    login(client, "worker_health.view_workerregistry")
    response = client.get(worker_url(w))
    assert response.context["worker_actions"] == []
    assert b"wh-worker-actions" not in response.content
    client.logout()
    login(
        client,
        "worker_health.view_workerregistry",
        ACTION_PERMS["mark_offline"],
        username="drainer",
    )
    response = client.get(worker_url(w))
    assert [name for name, _ in response.context["worker_actions"]] == ["mark_offline"]


def test_reclaim_action_reclaims_a_dead_workers_tasks(
    client: Client, published: list[str], django_capture_on_commit_callbacks: Any
) -> None:
    login(client, "worker_health.view_workerregistry", ACTION_PERMS["reclaim_tasks_now"])
    dead = make_worker("dead@host", status="failed", heartbeat_age=500)
    make_task("lost-1", worker=dead)
    make_task("lost-2", worker=dead, status="reserved")
    with django_capture_on_commit_callbacks(execute=True):
        response = post_action(client, WORKERS, "reclaim_tasks_now", [dead])
    assert response.status_code == 302
    assert sorted(published) == ["lost-1", "lost-2"]
    assert set(TaskQueue.objects.values_list("status", flat=True)) == {"queued"}
    assert TaskQueue.objects.get(task_id="lost-1").reclaim_count == 1
    events = WorkerEvent.objects.filter(kind=EventKind.TASK_RECLAIMED)
    assert {e.details["reason"] for e in events} == {"manual"}
    messages = [str(m) for m in client.get(WORKERS).context["messages"]]
    assert "Reclaimed 2 task(s) from 1 worker(s)." in messages


def test_reclaim_action_asks_before_taking_tasks_from_a_live_worker(
    client: Client, published: list[str], django_capture_on_commit_callbacks: Any
) -> None:
    login(client, "worker_health.view_workerregistry", ACTION_PERMS["reclaim_tasks_now"])
    live = make_worker("live@host", heartbeat_age=1)
    make_task("running-1", worker=live)
    response = post_action(client, WORKERS, "reclaim_tasks_now", [live])
    assert response.status_code == 200
    assert b"still heartbeats" in response.content
    assert TaskQueue.objects.get(task_id="running-1").status == "claimed"
    with django_capture_on_commit_callbacks(execute=True):
        response = post_action(client, WORKERS, "reclaim_tasks_now", [live], confirm="yes")
    assert response.status_code == 302
    assert published == ["running-1"]


def test_reclaim_button_on_the_worker_page_posts_the_action(
    admin_client: Client, published: list[str], django_capture_on_commit_callbacks: Any
) -> None:
    dead = make_worker("dead@host", status="failed")
    make_task("lost-1", worker=dead)
    page = admin_client.get(worker_url(dead)).content.decode()
    assert 'value="reclaim_tasks_now"' in page and 'name="index"' in page
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            WORKERS,
            {"action": "reclaim_tasks_now", "index": "0", ACTION_CHECKBOX_NAME: str(dead.pk)},
        )
    assert response.status_code == 302
    assert published == ["lost-1"]


def test_mark_offline_action_drains_a_worker(client: Client) -> None:
    login(client, "worker_health.view_workerregistry", ACTION_PERMS["mark_offline"])
    gone = make_worker("gone@host", status="failed")
    received: list[str] = []

    def on_offline(sender: Any, worker: WorkerRegistry, **_: Any) -> None:
        received.append(worker.worker_id)

    worker_offline.connect(on_offline, dispatch_uid="test-admin-offline")
    try:
        response = post_action(client, WORKERS, "mark_offline", [gone])
    finally:
        worker_offline.disconnect(dispatch_uid="test-admin-offline")
    assert response.status_code == 302
    gone.refresh_from_db()
    assert gone.status == "offline"
    assert received == ["gone@host"]
    ev = WorkerEvent.objects.get(kind=EventKind.WORKER_OFFLINE)
    assert ev.worker_name == "gone@host" and ev.details["drained_by"] == "operator"


def test_mark_offline_asks_before_draining_a_live_worker(client: Client) -> None:
    login(client, "worker_health.view_workerregistry", ACTION_PERMS["mark_offline"])
    live = make_worker("live@host")
    response = post_action(client, WORKERS, "mark_offline", [live])
    assert response.status_code == 200
    assert b"shut down warmly" in response.content
    live.refresh_from_db()
    assert live.status == "active"
    post_action(client, WORKERS, "mark_offline", [live], confirm="yes")
    live.refresh_from_db()
    assert live.status == "offline"


def test_delete_old_workers_asks_for_days_then_deletes_only_old_inactive_ones(
    client: Client,
) -> None:
    login(client, "worker_health.view_workerregistry", ACTION_PERMS["delete_old_workers"])
    old_failed = make_worker("old-failed@host", status="failed", changed_ago=40 * 86400)
    old_offline = make_worker("old-offline@host", status="offline", changed_ago=40 * 86400)
    recent = make_worker("recent@host", status="offline", changed_ago=2 * 86400)
    active = make_worker("active@host", started_ago=90 * 86400, changed_ago=90 * 86400)
    make_event(EventKind.WORKER_FAILED, worker=old_failed, worker_name=old_failed.worker_id)
    selection = [old_failed, old_offline, recent, active]
    response = post_action(client, WORKERS, "delete_old_workers", selection)
    assert response.status_code == 200
    assert b'name="days"' in response.content
    assert WorkerRegistry.objects.count() == 4
    response = post_action(
        client, WORKERS, "delete_old_workers", selection, days="30", confirm="yes"
    )
    assert response.status_code == 302
    assert sorted(WorkerRegistry.objects.values_list("worker_id", flat=True)) == [
        "active@host",
        "recent@host",
    ]
    # the audit log outlives the worker row
    assert WorkerEvent.objects.filter(worker_name="old-failed@host").exists()


def test_delete_old_workers_rejects_a_bad_number_of_days(admin_client: Client) -> None:
    old = make_worker("old@host", status="failed", changed_ago=40 * 86400)
    response = post_action(
        admin_client, WORKERS, "delete_old_workers", [old], days="-3", confirm="yes"
    )
    assert response.status_code == 200
    assert WorkerRegistry.objects.filter(pk=old.pk).exists()


# --------------------------------------------------------------------------------------------
# tasks


def test_task_list_shows_reclaim_count_and_fencing_token(admin_client: Client) -> None:
    scenario()
    response = admin_client.get(TASKS)
    html = response.content.decode()
    assert "field-reclaim_count" in html and "field-fencing_token" in html
    rows = {t.task_id: t for t in response.context["cl"].result_list}
    assert rows["task-quarantined-1"].reclaim_count == 3
    assert rows["task-quarantined-1"].fencing_token == 4
    assert response.context["cl"].show_full_result_count is False
    # message bodies are never loaded for the list
    assert "body" in rows["task-running-1"].get_deferred_fields()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status__exact=quarantined", ["task-quarantined-1"]),
        ("task_name=billing.charge", ["bill-1"]),
        ("worker=alpha@web-1", ["task-running-1"]),
        ("queue=priority", ["bill-1"]),
        ("q=task-reclaimed-1", ["task-reclaimed-1"]),
        ("q=task-reclaimed", []),  # task id search is exact: it uses the unique index
        ("status__exact=queued&queue=celery", ["task-reclaimed-1"]),
    ],
)
def test_task_list_filters_and_search(
    admin_client: Client, query: str, expected: list[str]
) -> None:
    scenario()
    make_task("bill-1", task_name="billing.charge", queue="priority", status="succeeded")
    response = admin_client.get(f"{TASKS}?{query}")
    assert response.status_code == 200
    assert sorted(t.task_id for t in response.context["cl"].result_list) == sorted(expected)


def task_list_sql(client: Client, params: dict[str, str]) -> tuple[list[str], list[str]]:
    """The task ids the list shows, and the SQL of its queries of the task table."""
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(TASKS, params)
    assert response.status_code == 200, response.content[:500]
    sql = [q["sql"] for q in ctx.captured_queries if 'FROM "task_queue"' in q["sql"]]
    return [t.task_id for t in response.context["cl"].result_list], sql


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("AbC-1", ["AbC-1"]),
        ("abc-1", ["abc-1"]),  # task ids are case-sensitive: not AbC-1 too
        ("ABC-1", []),
        ("  AbC-1\n", ["AbC-1"]),  # pasted with the spaces around it
        ('"AbC-1"', ["AbC-1"]),
        ("'abc-1'", ["abc-1"]),
        ("AbC", []),
        ("AbC-1 abc-1", []),  # one id, not two terms
    ],
)
def test_task_search_matches_the_task_id_exactly(
    admin_client: Client, term: str, expected: list[str]
) -> None:
    for task_id in ("AbC-1", "abc-1", "other"):
        make_task(task_id)
    shown, _ = task_list_sql(admin_client, {"q": term})
    assert shown == expected


def test_task_search_compares_the_task_id_as_is_so_the_unique_index_serves_it(
    admin_client: Client,
) -> None:
    make_task("0f6e2a8c-3d9b-4c1e-9a57-2b8f1d4e6c30")
    make_task("other")
    shown, sql = task_list_sql(admin_client, {"q": " 0f6e2a8c-3d9b-4c1e-9a57-2b8f1d4e6c30 "})
    assert shown == ["0f6e2a8c-3d9b-4c1e-9a57-2b8f1d4e6c30"]
    # Django's "=task_id" would compare UPPER(task_id) (a scan of the whole table on
    # PostgreSQL), or LIKE on SQLite
    assert sql and all(
        """"task_queue"."task_id" = '0f6e2a8c-3d9b-4c1e-9a57-2b8f1d4e6c30'""" in q for q in sql
    )
    assert not any("UPPER(" in q or " LIKE " in q or "DISTINCT" in q for q in sql)
    html = admin_client.get(TASKS).content.decode()
    assert 'id="searchbar"' in html and "Exact task id" in html


@pytest.mark.parametrize(
    ("status", "column"),
    [
        ("claimed", "claimed_at"),
        ("reserved", "claimed_at"),
        ("reclaiming", "reclaimed_at"),
        ("succeeded", "finished_at"),
        ("failed", "finished_at"),
        ("revoked", "finished_at"),
        ("quarantined", "finished_at"),
    ],
)
def test_task_list_filtered_by_status_is_ordered_by_an_indexed_column(
    admin_client: Client, status: str, column: str
) -> None:
    """``-pk`` with a rare status walks the primary key past every other row (530 ms with
    a million rows); each status is ordered by a column an index gives in order (finished
    rows) or on the few rows it holds (held tasks), newest first, the pk breaking ties."""
    now = timezone.now()
    minutes_ago = {"a": 2, "b": 0, "c": 5, "d": 2}  # created a, b, c, d
    for name, ago in minutes_ago.items():
        make_task(f"{status}-{name}", status=status, **{column: now - timedelta(minutes=ago)})
    make_task("queued-1", status="queued")
    shown, sql = task_list_sql(admin_client, {"status__exact": status})
    assert shown == [f"{status}-{name}" for name in ("b", "d", "a", "c")]
    page = [q for q in sql if "ORDER BY" in q]
    assert page and all(
        f'ORDER BY "task_queue"."{column}" DESC, "task_queue"."id" DESC' in q for q in page
    )


def test_task_list_keeps_newest_rows_first_without_a_status_or_for_queued_ones(
    admin_client: Client,
) -> None:
    """A backlog of queued tasks is mostly new rows: ``-pk`` finds a page of them at once."""
    for i in range(3):
        make_task(f"q-{i}", status="queued")
    make_task("done", status="succeeded", finished_at=timezone.now() - timedelta(hours=1))
    cases: list[tuple[dict[str, str], list[str]]] = [
        ({}, ["done", "q-2", "q-1", "q-0"]),
        ({"status__exact": "queued"}, ["q-2", "q-1", "q-0"]),
        ({"status__exact": "queued", "task_name": "demo.tasks.work"}, ["q-2", "q-1", "q-0"]),
    ]
    for params, expected in cases:
        shown, sql = task_list_sql(admin_client, params)
        assert shown == expected
        page = [q for q in sql if "ORDER BY" in q]
        assert page and all(q.endswith('ORDER BY "task_queue"."id" DESC') for q in page)


def test_task_list_sorted_by_a_column_breaks_ties_by_the_status_order(
    admin_client: Client,
) -> None:
    now = timezone.now()
    make_task("b-old", task_name="b.task", status="succeeded", finished_at=now - timedelta(hours=1))
    make_task("a-1", task_name="a.task", status="succeeded", finished_at=now - timedelta(hours=2))
    make_task("b-new", task_name="b.task", status="succeeded", finished_at=now)
    make_task("a-2", task_name="a.task", status="succeeded", finished_at=now - timedelta(hours=3))
    shown, sql = task_list_sql(admin_client, {"status": "succeeded", "o": "2"})  # task name
    assert shown == ["a-1", "a-2", "b-new", "b-old"]
    assert any(
        'ORDER BY "task_queue"."task_name" ASC, "task_queue"."finished_at" DESC, '
        '"task_queue"."id" DESC' in q
        for q in sql
    )


def test_task_list_text_filters_keep_the_other_filters(admin_client: Client) -> None:
    scenario()
    html = admin_client.get(f"{TASKS}?status__exact=queued&queue=celery").content.decode()
    assert 'name="task_name"' in html and 'name="worker"' in html
    assert '<input type="hidden" name="status__exact" value="queued">' in html


def test_task_list_runs_a_constant_number_of_queries(admin_client: Client) -> None:
    w = make_worker("one@host")
    make_task("t-0", worker=w)
    one = queries_for(admin_client, TASKS)
    for i in range(1, 50):
        w = make_worker(f"w{i}@host")
        make_task(f"t-{i}", worker=w if i % 2 else None)
    assert queries_for(admin_client, TASKS) == one
    assert queries_for(admin_client, TASKS + "?status__exact=claimed&queue=celery") == one
    assert one <= 5


def test_task_list_never_counts_past_the_cap(admin_client: Client, monkeypatch: Any) -> None:
    monkeypatch.setattr("worker_health.admin.COUNT_CAP", 5)
    for i in range(8):
        make_task(f"many-{i}", status="succeeded")
    with CaptureQueriesContext(connection) as ctx:
        response = admin_client.get(TASKS)
    assert response.context["cl"].result_count == 5
    counts = [q["sql"] for q in ctx.captured_queries if "COUNT(" in q["sql"].upper()]
    assert counts and all("LIMIT 5" in sql for sql in counts)


def test_capped_paginator_counts_lists_too() -> None:
    assert CappedCountPaginator([1, 2, 3], 2).count == 3


def test_task_arguments_need_the_permission(client: Client) -> None:
    data = scenario()
    login(client, "worker_health.view_taskqueue")
    html = client.get(task_url(data["running"])).content.decode()
    assert "person@example.com" not in html  # neither the body nor the argsrepr header
    assert "needs the &#x27;Can view task arguments&#x27; permission" in html
    client.logout()
    login(
        client,
        "worker_health.view_taskqueue",
        "worker_health.view_task_arguments",
        username="auditor",
    )
    html = client.get(task_url(data["running"])).content.decode()
    assert "person@example.com" in html
    assert "&quot;args&quot;: [\n    7\n  ]" in html


def test_pickle_payloads_are_never_deserialized(admin_client: Client, monkeypatch: Any) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the web process must not unpickle task payloads")

    monkeypatch.setattr(pickle, "loads", boom)
    task = make_task(
        "pickled-1",
        body=pickle.dumps(((1,), {"secret": "x"}, {})),
        content_type="application/x-python-serialize",
        content_encoding="binary",
    )
    response = admin_client.get(task_url(task))
    assert response.status_code == 200
    assert b"application/x-python-serialize payloads are never deserialized" in response.content


def test_task_page_shows_which_run_recorded_its_start(admin_client: Client) -> None:
    task = make_task("restarted-1", fencing_token=3, started_token=3)
    html = admin_client.get(task_url(task)).content.decode()
    assert "field-started_token" in html and "MAX_RECLAIMS only if the run had started" in html


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"body": b'[[1, 2], {"a": 3}, {}]'}, {"args": [1, 2], "kwargs": {"a": 3}}),
        ({"body": b'{"args": [1], "kwargs": {}, "id": "x"}'}, {"args": [1], "kwargs": {}}),
        ({"body": None}, "no message recorded"),
        (
            {"content_type": "application/x-yaml", "body": b"- !!python/object:os.system"},
            "application/x-yaml payloads are never deserialized",
        ),
        ({"body": b"not json"}, "not valid JSON"),
        ({"headers": {"compression": "application/x-gzip"}}, "compressed payload"),
    ],
)
def test_decode_arguments(fields: dict[str, Any], expected: Any) -> None:
    task = TaskQueue(
        task_id="x",
        content_type="application/json",
        content_encoding="utf-8",
        body=b"[[], {}, {}]",
        headers={},
    )
    for key, value in fields.items():
        setattr(task, key, value)
    decoded, reason = decode_arguments(task)
    if isinstance(expected, dict):
        assert decoded == expected
    else:
        assert decoded is None and reason.startswith(expected)


def test_task_page_is_read_only(admin_client: Client) -> None:
    task = make_task("t-1")
    assert admin_client.post(task_url(task), {"status": "succeeded"}).status_code == 403
    assert admin_client.get(reverse("admin:worker_health_taskqueue_add")).status_code == 403
    task.refresh_from_db()
    assert task.status == "queued"


def test_requeue_quarantined_needs_its_permission(client: Client) -> None:
    login(client, "worker_health.view_taskqueue")
    task = make_task("q-1", status="quarantined", reclaim_count=3)
    response = client.get(TASKS)
    assert response.context["action_form"] is None  # no action this user may run
    post_action(client, TASKS, "requeue_quarantined", [task])
    task.refresh_from_db()
    assert task.status == "quarantined"


def test_requeue_quarantined_publishes_the_tasks_again(
    client: Client, published: list[str]
) -> None:
    login(client, "worker_health.view_taskqueue", "worker_health.requeue_quarantined")
    q = make_task("q-1", status="quarantined", reclaim_count=3)
    done = make_task("done-1", status="succeeded")
    response = post_action(client, TASKS, "requeue_quarantined", [q, done])
    assert response.status_code == 302
    q.refresh_from_db()
    done.refresh_from_db()
    assert (q.status, q.reclaim_count) == ("queued", 0)
    assert done.status == "succeeded"
    assert published == ["q-1"]
    ev = WorkerEvent.objects.get(kind=EventKind.TASK_REQUEUED)
    assert (ev.task_id, ev.details["requeued_by"]) == ("q-1", "operator")


# --------------------------------------------------------------------------------------------
# events


def test_event_list_is_read_only_and_searchable(admin_client: Client) -> None:
    scenario()
    response = admin_client.get(EVENTS)
    assert response.status_code == 200
    assert response.context["cl"].show_full_result_count is False
    html = response.content.decode()
    assert "worker failed" in html and "reason=worker failed" in html
    assert reverse("admin:worker_health_workerevent_add").encode() not in response.content
    response = admin_client.get(EVENTS + "?q=task-quarantined-1")
    assert [e.kind for e in response.context["cl"].result_list] == ["task_quarantined"]
    response = admin_client.get(EVENTS + "?kind__exact=worker_failed")
    assert [e.worker_name for e in response.context["cl"].result_list] == ["gamma@web-3"]
    ev = WorkerEvent.objects.first()
    assert ev is not None
    change = reverse("admin:worker_health_workerevent_change", args=[ev.pk])
    assert admin_client.get(change).status_code == 200
    assert admin_client.post(change, {"kind": "alert_sent"}).status_code == 403
    delete = reverse("admin:worker_health_workerevent_delete", args=[ev.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403


def test_event_list_runs_a_constant_number_of_queries(admin_client: Client) -> None:
    make_event(EventKind.WORKER_FAILED, worker_name="a@h")
    one = queries_for(admin_client, EVENTS)
    for i in range(49):
        w = make_worker(f"w{i}@h")
        make_event(EventKind.TASK_RECLAIMED, worker=w, worker_name=w.worker_id, task_id=f"t{i}")
    assert queries_for(admin_client, EVENTS) == one


# --------------------------------------------------------------------------------------------
# helpers


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (4.25, "4.2s"), (75, "1m 15s"), (3 * 3600 + 120, "3h 2m"), (90000, "1d 1h")],
)
def test_human_duration(seconds: float | None, text: str) -> None:
    assert human_duration(seconds) == text


def test_count_cap_is_large_enough_for_normal_lists() -> None:
    assert COUNT_CAP >= 1000
