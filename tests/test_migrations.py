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
        "worker_registry": {
            "wh_worker_active_hb_idx",
            "wh_worker_status_idx",
            "wh_worker_offline_hb_idx",
        },
        "task_queue": {
            "wh_task_held_idx",
            "wh_task_reclaiming_idx",
            "wh_task_unpicked_idx",
            "wh_task_finished_idx",
            "wh_task_name_idx",
            "wh_task_id_uniq",
        },
        "worker_health_event": {"wh_event_kind_idx", "wh_event_worker_idx"},
    }
    connection = connections[alias]
    with connection.cursor() as cursor:
        for table, names in expected.items():
            constraints = connection.introspection.get_constraints(cursor, table)
            assert names <= set(constraints), (table, sorted(constraints))


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize("alias", ALIASES)
def test_task_queue_has_no_index_that_nothing_uses(alias: str) -> None:
    """Every index is written on every status change of every task: only the named ones,
    the primary key and the task id's uniqueness (no ``LIKE`` twins on PostgreSQL)."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, "task_queue")
    indexes = {
        name
        for name, info in constraints.items()
        if (info["index"] or info["unique"]) and not info["primary_key"]
    }
    assert indexes == {
        "wh_task_held_idx",
        "wh_task_reclaiming_idx",
        "wh_task_unpicked_idx",
        "wh_task_finished_idx",
        "wh_task_name_idx",
        "wh_task_id_uniq",
    }, sorted(indexes)
