"""The models and the migrations agree, and the named indexes exist in the database."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connections

from tests.factories import ALIASES


@pytest.mark.django_db(databases="__all__")  # makemigrations checks each database's history
def test_makemigrations_finds_nothing_for_worker_health() -> None:
    out = StringIO()
    try:
        call_command(
            "makemigrations", "worker_health", check=True, dry_run=True, stdout=out, stderr=out
        )
    except SystemExit:  # --check exits 1 when a migration is missing
        pytest.fail(f"worker_health has model changes without a migration:\n{out.getvalue()}")
    assert "No changes detected" in out.getvalue()


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize("alias", ALIASES)
def test_named_indexes_exist(alias: str) -> None:
    expected = {
        "worker_registry": {"wh_worker_active_hb_idx", "wh_worker_status_idx"},
        "task_queue": {
            "wh_task_held_idx",
            "wh_task_reclaiming_idx",
            "wh_task_finished_idx",
            "wh_task_status_idx",
        },
        "worker_health_event": {"wh_event_kind_idx", "wh_event_worker_idx"},
    }
    connection = connections[alias]
    with connection.cursor() as cursor:
        for table, names in expected.items():
            constraints = connection.introspection.get_constraints(cursor, table)
            assert names <= set(constraints), (table, sorted(constraints))
