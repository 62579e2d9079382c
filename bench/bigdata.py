"""Big tables for the scale benchmarks, generated on the server (``INSERT .. SELECT
generate_series``): workers, a million task rows, the event log.

Layout (ids are chosen so that the held tasks of worker ``k`` are rows ``2k-1`` and ``2k``):

* ``worker_registry``: ``workers`` active workers (ids 1..N, fresh heartbeats) and N/10
  offline ones (history);
* ``task_queue``: ``tasks`` rows; each active worker holds two (one claimed, one reserved);
  1 % are queued (a backlog), the rest finished over the last 7 days (1 % of them failed);
  every row has a message body and headers, as the worker records them;
* ``worker_health_event``: ``events`` rows over the last 7 days.
"""

from __future__ import annotations

import time
from typing import Any

HEADERS = (
    '{"lang": "py", "task": "app.tasks.t", "id": "x", "shadow": null, "eta": null, '
    '"expires": null, "group": null, "group_index": null, "retries": 0, '
    '"timelimit": [null, null], "root_id": "x", "parent_id": null, "argsrepr": "(1, 2)", '
    '"kwargsrepr": "{}", "origin": "gen1@web-1", "ignore_result": false}'
)
BODY = '[[1, 2], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'


def _exec(conn: Any, sql: str, params: Any = None) -> None:
    conn.execute(sql, params)


def populate_tasks(conn: Any, tasks: int) -> float:
    """Insert ``tasks`` finished / queued rows (no holder yet). Returns seconds taken."""
    started = time.monotonic()
    _exec(conn, "TRUNCATE task_queue RESTART IDENTITY")
    _exec(
        conn,
        """
        INSERT INTO task_queue (id, task_id, task_name, status, queue, fencing_token,
            reclaim_count, publish_attempts, lost_on, exchange, routing_key, body,
            content_type, content_encoding, headers, properties, created_at, updated_at,
            finished_at)
        SELECT g, 'bench-' || g, 'app.tasks.t' || (g %% 50),
            CASE WHEN g %% 100 = 7 THEN 'queued' WHEN g %% 100 = 3 THEN 'failed'
                 ELSE 'succeeded' END,
            'celery', 1, 0, 0, '[]'::jsonb, '', 'celery', convert_to(%(body)s, 'UTF8'),
            'application/json', 'utf-8', %(headers)s::jsonb,
            '{"delivery_mode": 2, "priority": 0}'::jsonb,
            now() - (g %% 604800) * interval '1 second',
            now() - (g %% 604800) * interval '1 second' + interval '1 second',
            CASE WHEN g %% 100 = 7 THEN NULL
                 ELSE now() - (g %% 604800) * interval '1 second' + interval '1 second' END
        FROM generate_series(1, %(tasks)s) g
        """,
        {"tasks": tasks, "body": BODY, "headers": HEADERS},
    )
    _exec(conn, "SELECT setval(pg_get_serial_sequence('task_queue', 'id'), %s)", [tasks + 1])
    return time.monotonic() - started


def populate_workers(conn: Any, workers: int) -> float:
    """Replace the workers: ``workers`` active ones holding two tasks each, and N/10 offline.
    Returns seconds taken."""
    started = time.monotonic()
    _exec(
        conn,
        "UPDATE task_queue SET status = 'succeeded', claimed_by_id = NULL, "
        "claimed_incarnation = NULL, claimed_at = NULL, finished_at = now() "
        "WHERE claimed_by_id IS NOT NULL OR status IN ('reserved', 'claimed', 'reclaiming')",
    )
    _exec(conn, "UPDATE worker_health_event SET worker_id = NULL WHERE worker_id IS NOT NULL")
    # Without the foreign-key checks: task_queue.claimed_by has no index that a check can
    # use (see docs/benchmarks.md), so each deleted worker would scan the million rows.
    _exec(conn, "SET session_replication_role = replica")
    _exec(conn, "DELETE FROM worker_registry")
    _exec(conn, "SET session_replication_role = DEFAULT")
    _exec(
        conn,
        """
        INSERT INTO worker_registry (id, worker_id, status, incarnation, last_heartbeat,
            tasks_processed, started_at, status_changed_at, clock_skew, metadata)
        SELECT g, CASE WHEN g <= %(n)s THEN 'celery-' || g || '@worker-host-' || (g %% 1000)
                       ELSE 'old-' || g || '@worker-host-' || (g %% 1000) END,
            CASE WHEN g <= %(n)s THEN 'active' ELSE 'offline' END,
            md5(g::text)::uuid,
            CASE WHEN g <= %(n)s THEN now() - (g %% 20) * interval '1 second'
                 ELSE now() - interval '3 days' END,
            g * 10, now() - interval '4 days', now() - interval '3 days', 0.001,
            jsonb_build_object('host', 'worker-host-' || (g %% 1000), 'pid', 1000 + g,
                'pool', 'prefork', 'concurrency', 2, 'queues', jsonb_build_array('celery'))
        FROM generate_series(1, %(total)s) g
        """,
        {"n": workers, "total": workers + workers // 10},
    )
    _exec(
        conn,
        "SELECT setval(pg_get_serial_sequence('worker_registry', 'id'), %s)",
        [workers + workers // 10 + 1],
    )
    _exec(
        conn,
        """
        UPDATE task_queue t SET
            status = CASE WHEN t.id %% 2 = 0 THEN 'claimed' ELSE 'reserved' END,
            claimed_by_id = w.id, claimed_incarnation = w.incarnation,
            claimed_at = now() - interval '5 seconds', finished_at = NULL,
            fencing_token = CASE WHEN t.id %% 2 = 0 THEN 1 ELSE 0 END
        FROM worker_registry w
        WHERE t.id <= 2 * %(n)s AND w.id = (t.id + 1) / 2
        """,
        {"n": workers},
    )
    return time.monotonic() - started


def populate_events(conn: Any, events: int) -> None:
    _exec(conn, "TRUNCATE worker_health_event RESTART IDENTITY")
    _exec(
        conn,
        """
        INSERT INTO worker_health_event (created_at, kind, worker_name, task_id, details)
        SELECT now() - (g %% 604800) * interval '1 second',
            (ARRAY['worker_registered', 'worker_failed', 'task_reclaimed', 'worker_offline',
                   'duplicate_delivery'])[1 + g %% 5],
            'celery-' || (g %% 1000) || '@worker-host', 'bench-' || g, '{}'::jsonb
        FROM generate_series(1, %(events)s) g
        """,
        {"events": events},
    )


def make_stale(conn: Any, workers: int, claimed: int, worker_pk: int = 1) -> None:
    """Worker ``worker_pk`` stopped beating an hour ago, holding ``claimed`` running tasks
    (rows after the live workers' held rows), and the detector has been watching."""
    _exec(
        conn,
        "UPDATE worker_registry SET status = 'active', "
        "last_heartbeat = now() - interval '1 hour' WHERE id = %s",
        [worker_pk],
    )
    _exec(
        conn,
        """
        UPDATE task_queue t SET status = 'claimed', claimed_by_id = w.id,
            claimed_incarnation = w.incarnation, claimed_at = now() - interval '1 hour',
            finished_at = NULL, reclaimed_at = NULL, reclaim_lease = NULL,
            fencing_token = 1, reclaim_count = 0, publish_attempts = 0
        FROM worker_registry w
        WHERE w.id = %(pk)s AND t.id > 2 * %(n)s AND t.id <= 2 * %(n)s + %(claimed)s
        """,
        {"pk": worker_pk, "n": workers, "claimed": claimed},
    )


def unmake_stale(conn: Any, workers: int, claimed: int, worker_pk: int = 1) -> None:
    _exec(
        conn,
        "UPDATE task_queue SET status = 'succeeded', claimed_by_id = NULL, "
        "claimed_incarnation = NULL, finished_at = now(), reclaimed_at = NULL, "
        "reclaim_lease = NULL, publish_attempts = 0 "
        "WHERE id > 2 * %(n)s AND id <= 2 * %(n)s + %(claimed)s",
        {"n": workers, "claimed": claimed},
    )
    _exec(
        conn,
        "UPDATE worker_registry SET status = 'active', last_heartbeat = now() WHERE id = %s",
        [worker_pk],
    )


def detector_watching(conn: Any) -> None:
    """The detector has swept without a gap for a day: the outage guard lets it fail."""
    _exec(
        conn,
        """
        INSERT INTO worker_health_detector (id, last_sweep_at, observing_since, last_sweep_by)
        VALUES (1, now(), now() - interval '1 day', 'bench')
        ON CONFLICT (id) DO UPDATE SET last_sweep_at = now(),
            observing_since = now() - interval '1 day'
        """,
    )


def refresh_heartbeats(conn: Any, workers: int) -> None:
    """Every live worker beat within the last 20 s (as it would between two sweeps)."""
    _exec(
        conn,
        "UPDATE worker_registry SET last_heartbeat = now() - (id %% 20) * interval '1 second' "
        "WHERE id <= %s",
        [workers],
    )
