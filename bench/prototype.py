"""Prototypes of the proposed cheaper tracking writes, to size them end to end.

Installed from outside by :mod:`bench.celery` when ``BENCH_PROTOTYPE`` lists them (the
throughput variants ``wh_proto`` and ``wh_proto_async``); worker_health itself is not
changed. Not production code: no tests, only what a no-op benchmark exercises.

* ``claim`` (P1): the claim as one ``UPDATE .. RETURNING fencing_token`` in SQL (the same
  conditions as ``TaskQuerySet.claim``), falling back to the ORM method when no row
  matched (insert path, duplicate delivery).
* ``reserve`` (P3): the receipt of a batch as one ``INSERT .. ON CONFLICT DO UPDATE`` that
  stores the message and hands the hold over in the same statement.
* ``finish`` (P4): the completion is handed to the process's database thread without
  waiting (``dbthread.submit``), and completions that queue up there are written together
  in one ``UPDATE .. FROM (VALUES ..)``; stale ones are still logged and recorded.
* ``async`` (P2): ``synchronous_commit = off`` on the connections of worker_health's
  threads (the recorder, the heart and the database thread): a commit no longer waits for
  the WAL flush; a PostgreSQL crash may lose the last few hundred ms of tracking writes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

logger = logging.getLogger("worker_health")

CLAIM_SQL = """
UPDATE task_queue SET status = 'claimed', claimed_by_id = %(worker)s,
    claimed_incarnation = %(inc)s, claimed_at = now(), fencing_token = fencing_token + 1,
    reclaim_lease = NULL, updated_at = now()
WHERE task_id = %(task_id)s AND (
    status IN ('queued', 'reserved', 'reclaiming')
    OR (status = 'claimed' AND NOT EXISTS (
        SELECT 1 FROM worker_registry w
        WHERE w.id = task_queue.claimed_by_id AND w.incarnation = task_queue.claimed_incarnation
          AND (w.status = 'active' OR (w.status = 'offline'
               AND w.last_heartbeat >= now() - make_interval(secs => %(stale)s))))))
RETURNING fencing_token
"""

RESERVE_SQL = """
INSERT INTO task_queue AS t (task_id, task_name, status, queue, exchange, routing_key, body,
    content_type, content_encoding, headers, properties, eta, expires, claimed_by_id,
    claimed_incarnation, claimed_at, fencing_token, reclaim_count, publish_attempts, lost_on,
    created_at, updated_at)
SELECT v.task_id, v.task_name, 'reserved', v.queue, v.exchange, v.routing_key, v.body,
    v.content_type, v.content_encoding, v.headers::jsonb, v.properties::jsonb,
    v.eta::timestamptz, v.expires::timestamptz, %s, %s::uuid, now(), 0, 0, 0, '[]'::jsonb,
    now(), now()
FROM (VALUES {values}) AS v(task_id, task_name, queue, exchange, routing_key, body,
    content_type, content_encoding, headers, properties, eta, expires)
ON CONFLICT (task_id) DO UPDATE SET
    task_name = EXCLUDED.task_name, queue = EXCLUDED.queue, exchange = EXCLUDED.exchange,
    routing_key = EXCLUDED.routing_key, body = EXCLUDED.body,
    content_type = EXCLUDED.content_type, content_encoding = EXCLUDED.content_encoding,
    headers = EXCLUDED.headers, properties = EXCLUDED.properties, eta = EXCLUDED.eta,
    expires = EXCLUDED.expires, updated_at = now(),
    status = CASE WHEN t.status IN ('queued', 'reclaiming') THEN 'reserved' ELSE t.status END,
    claimed_by_id = CASE WHEN t.status IN ('queued', 'reclaiming')
        THEN EXCLUDED.claimed_by_id ELSE t.claimed_by_id END,
    claimed_incarnation = CASE WHEN t.status IN ('queued', 'reclaiming')
        THEN EXCLUDED.claimed_incarnation ELSE t.claimed_incarnation END,
    claimed_at = CASE WHEN t.status IN ('queued', 'reclaiming')
        THEN now() ELSE t.claimed_at END,
    reclaim_lease = CASE WHEN t.status IN ('queued', 'reclaiming')
        THEN NULL ELSE t.reclaim_lease END
"""

FINISH_SQL = """
UPDATE task_queue AS t SET status = v.status, finished_at = now(), updated_at = now()
FROM (VALUES {values}) AS v(task_id, token, status)
WHERE t.task_id = v.task_id AND t.status = 'claimed' AND t.fencing_token = v.token
RETURNING t.task_id
"""

_pending: list[tuple[str, int, str]] = []
_pending_lock = threading.Lock()


def enabled() -> set[str]:
    return {p.strip() for p in os.environ.get("BENCH_PROTOTYPE", "").split(",") if p.strip()}


def install() -> None:
    wanted = enabled()
    if not wanted:
        return
    try:
        from worker_health import querysets
    except Exception:  # the variant without worker_health
        return
    if "claim" in wanted:
        _install_claim(querysets)
    if "reserve" in wanted:
        _install_reserve(querysets)
    from celery import signals

    if "finish" in wanted:
        signals.worker_process_init.connect(
            _install_finish, weak=False, dispatch_uid="bench.prototype.finish"
        )
    if "async" in wanted:
        from django.db.backends.signals import connection_created

        connection_created.connect(_async_commit, weak=False, dispatch_uid="bench.proto.async")


def _install_claim(querysets: Any) -> None:
    original = querysets.TaskQuerySet.claim

    def claim(
        self: Any, *, task_id: str, task_name: str, queue: str, worker_pk: int, incarnation: Any
    ) -> int | None:
        from django.db import connections

        from worker_health.conf import settings

        params = {
            "worker": worker_pk,
            "inc": incarnation,
            "task_id": task_id,
            "stale": settings.STALE_AFTER,
        }
        with connections[self.db].cursor() as cursor:
            cursor.execute(CLAIM_SQL, params)
            row = cursor.fetchone()
        if row is not None:
            return int(row[0])
        return original(
            self,
            task_id=task_id,
            task_name=task_name,
            queue=queue,
            worker_pk=worker_pk,
            incarnation=incarnation,
        )

    querysets.TaskQuerySet.claim = claim


def _install_reserve(querysets: Any) -> None:
    def reserve(self: Any, deliveries: Any, worker_pk: int, incarnation: Any) -> None:
        from django.db import connections

        if not deliveries:
            return
        values = ", ".join(
            ["(%s, %s, %s, %s, %s, %s::bytea, %s, %s, %s, %s, %s, %s)"] * len(deliveries)
        )
        params: list[Any] = [worker_pk, str(incarnation)]
        for d in deliveries:
            params += [
                d.task_id, d.task_name, d.queue, d.exchange, d.routing_key, d.body,
                d.content_type, d.content_encoding, json.dumps(d.headers),
                json.dumps(d.properties),
                d.eta.isoformat() if d.eta else None,
                d.expires.isoformat() if d.expires else None,
            ]  # fmt: skip
        with connections[self.db].cursor() as cursor:
            cursor.execute(RESERVE_SQL.format(values=values), params)

    querysets.TaskQuerySet.reserve = reserve


def _install_finish(**_: Any) -> None:
    """In each pool process: replace worker_health's ``task_postrun`` receiver."""
    from celery import signals

    signals.task_postrun.disconnect(dispatch_uid="worker_health.postrun")
    signals.task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid="bench.proto.postrun")


def _on_task_postrun(
    sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any
) -> None:
    from worker_health import dbthread, tracking

    if task_id is None:
        return
    token = tracking._tokens.pop(task_id, None)
    if token is None:
        return
    if task_id in tracking._requeued:
        tracking._requeued.discard(task_id)
        return
    status = tracking.FINAL_STATUS.get(state or "", "failed")
    with _pending_lock:
        _pending.append((task_id, token, status))
    dbthread.submit(_flush_finishes)


def _flush_finishes() -> None:
    from django.db import connection

    from worker_health.models import EventKind, event

    with _pending_lock:
        batch = list(_pending)
        _pending.clear()
    if not batch:
        return
    values = ", ".join(["(%s, %s::int, %s)"] * len(batch))
    params: list[Any] = []
    for item in batch:
        params += list(item)
    with connection.cursor() as cursor:
        cursor.execute(FINISH_SQL.format(values=values), params)
        accepted = {row[0] for row in cursor.fetchall()}
    for task_id, token, _status in batch:
        if task_id not in accepted:
            event(EventKind.STALE_COMPLETION, task_id=task_id, token=token)
            logger.warning("worker_health: stale completion of %s (token %s)", task_id, token)


def _async_commit(sender: Any = None, connection: Any = None, **_: Any) -> None:
    if threading.current_thread().name.startswith("worker-health"):
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO off")
