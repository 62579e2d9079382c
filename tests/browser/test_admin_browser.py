"""What an operator sees: headless Chromium logs into the admin of a running server that has a
failed worker and reclaimed tasks in its database, and reads the overview and the worker page.

Needs Debian's ``chromium`` (``scripts/install-browser.sh``) and Playwright for Python (the
``dev`` extra). Screenshots go to ``test-artifacts/``; the overview's is copied to
``docs/overview.png`` for the README when that file is missing or when
``WORKER_HEALTH_UPDATE_SCREENSHOT=1``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from tests.dashboard_data import make_event, make_task, scenario
from worker_health import publish, reclaim
from worker_health.models import DetectorState, EventKind, TaskQueue

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
#: the README's screenshot; refreshed when missing or with WORKER_HEALTH_UPDATE_SCREENSHOT=1
#: (not on every run: the times in it change and would leave the work tree dirty)
DOCS_SCREENSHOT = REPO / "docs" / "overview.png"
UPDATE_DOCS = os.environ.get("WORKER_HEALTH_UPDATE_SCREENSHOT") == "1"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="browser test: /usr/bin/chromium is missing (run scripts/install-browser.sh)",
    ),
    pytest.mark.skipif(
        sync_playwright is None,
        reason="browser test: Playwright for Python is missing (pip install -e '.[dev]')",
    ),
]


@pytest.fixture
def cluster_after_a_failure(
    transactional_db: None, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """The database after gamma@web-3 died: the package itself reclaimed one of its tasks
    and quarantined another that had already killed workers three times."""
    data = scenario()
    failed = data["failed"]
    make_task("task-lost-1", worker=failed, task_name="billing.tasks.charge")
    make_task(
        "task-lost-2",
        worker=failed,
        task_name="media.tasks.transcode",
        reclaim_count=3,
        lost_on=["epsilon@web-5", "zeta@web-6"],
    )
    published: list[str] = []
    monkeypatch.setattr(publish, "republish", lambda task: published.append(task.task_id))
    outcome = reclaim.reclaim_tasks_of(failed, reason="worker failed")
    assert outcome.reclaimed == ["task-lost-1"] and outcome.quarantined == ["task-lost-2"]
    assert published == ["task-lost-1"]
    assert TaskQueue.objects.get(task_id="task-lost-1").status == "queued"
    for hours_ago, kind in (
        (2.5, EventKind.TASK_RECLAIMED),
        (7.2, EventKind.WORKER_FAILED),
        (7.1, EventKind.TASK_RECLAIMED),
        (7.1, EventKind.TASK_RECLAIMED),
        (16.4, EventKind.TASK_QUARANTINED),
    ):
        make_event(kind, worker_name="old@web-9", hours_ago=hours_ago)
    DetectorState.objects.take_sweep_lease("beat@scheduler", 0, 60, force=True)
    DetectorState.objects.record_sweep_done(0.0123)
    User.objects.create_superuser("admin", "admin@example.com", "correct horse")
    return data


@pytest.fixture
def page(live_server: Any) -> Iterator[Page]:
    assert sync_playwright is not None
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(15_000)
        page = context.new_page()
        yield page
        context.close()
        browser.close()


def test_operator_sees_the_failed_worker_and_its_reclaimed_task(
    cluster_after_a_failure: dict[str, Any], live_server: Any, page: Page
) -> None:
    # Log in like a person: the login form, then the admin index.
    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "correct horse")
    page.click("input[type=submit]")
    expect(page.locator("#site-name")).to_be_visible()

    # The admin index links to the overview.
    page.get_by_role("link", name="Health overview").first.click()
    expect(page.locator("h1")).to_have_text("Worker health")
    counts = page.locator("#wh-worker-counts")
    expect(counts.locator("[data-status=active]")).to_have_text("1")
    expect(counts.locator("[data-status=late]")).to_have_text("1")
    expect(counts.locator("[data-status=failed]")).to_have_text("1")
    expect(counts.locator("[data-status=offline]")).to_have_text("1")
    tasks = page.locator("#wh-task-counts")
    expect(tasks.locator("[data-status=quarantined]")).to_have_text("2")
    expect(tasks.locator("[data-status=claimed]")).to_have_text("1")
    # Charts drawn on the server, with the 24-hour totals in their headings.
    expect(page.locator("#wh-chart-worker_failed svg rect")).to_have_count(2)
    expect(page.locator("#wh-chart-task_reclaimed .wh-chart-total")).to_have_text("6")
    # Heartbeats against the stale threshold: the late worker is flagged.
    heartbeats = page.locator("#wh-heartbeats")
    expect(heartbeats).to_contain_text("beta@web-2")
    expect(heartbeats.locator(".wh-badge-late")).to_have_text("late")
    failed_row = page.locator("#wh-recently-failed tr", has_text="gamma@web-3")
    expect(failed_row.locator(".wh-badge-failed")).to_have_text("failed")
    expect(page.locator("#wh-recent-events")).to_contain_text("task-lost-1")
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)
    if UPDATE_DOCS or not DOCS_SCREENSHOT.exists():
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACTS / "overview.png", DOCS_SCREENSHOT)

    # The failed worker's page: its badge, nothing held any more, the reclaimed task.
    failed_row.get_by_role("link", name="gamma@web-3").click()
    expect(page.locator(".field-status_badge .wh-badge")).to_have_text("failed")
    expect(page.locator("#wh-claimed-tasks")).to_contain_text("This worker holds no task.")
    history = page.locator("#wh-worker-events")
    reclaimed_row = history.locator("tr", has_text="task-lost-1")
    expect(reclaimed_row).to_contain_text("task reclaimed")
    expect(reclaimed_row).to_contain_text("reason=worker failed")
    expect(history.locator("tr", has_text="task-lost-2")).to_contain_text("task quarantined")
    page.screenshot(path=str(ARTIFACTS / "worker-failed.png"), full_page=True)

    # The worker list: one row per worker, each with its badge from the database's clock.
    page.goto(f"{live_server.url}/admin/worker_health/workerregistry/")
    for worker_id, state in (
        ("alpha@web-1", "active"),
        ("beta@web-2", "late"),
        ("gamma@web-3", "failed"),
        ("delta@web-4", "offline"),
    ):
        row = page.locator("#result_list tr", has_text=worker_id)
        expect(row.locator(".wh-badge")).to_have_text(state)
    page.screenshot(path=str(ARTIFACTS / "workers.png"), full_page=True)

    # The reclaimed task, found by its id: queued again, reclaim count and token visible.
    page.goto(f"{live_server.url}/admin/worker_health/taskqueue/?q=task-lost-1")
    row = page.locator("#result_list tbody tr")
    expect(row).to_have_count(1)
    expect(row.locator(".wh-badge")).to_have_text("queued")
    expect(row.locator(".field-reclaim_count")).to_have_text("1")
    page.screenshot(path=str(ARTIFACTS / "task-reclaimed.png"), full_page=True)
    # (No ORM calls here: Playwright's loop runs in this thread; the fixture checked the rows.)
