"""State transitions, one place each, as QuerySet methods used as managers.

Every comparison with "now" uses the database server's clock (``Now()``), never a host's.
Every transition that two processes could race on is a conditional UPDATE whose row count
says who won.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from binascii import b2a_base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from django.db import IntegrityError, connections, models, transaction
from django.db.models import Case, Exists, F, OuterRef, Q, Value, When
from django.db.models.functions import Now
from django.db.models.sql import UpdateQuery

from .durability import prepares, unprepared

if TYPE_CHECKING:
    from .models import DetectorState, TaskQueue, WorkerEvent, WorkerRegistry  # noqa: F401

logger = logging.getLogger("worker_health")


def db_now_minus(seconds: float) -> models.Expression:
    """``Now() - seconds`` evaluated by the database."""
    return models.ExpressionWrapper(
        Now() - Value(timedelta(seconds=seconds), output_field=models.DurationField()),
        output_field=models.DateTimeField(),
    )


# --------------------------------------------------------------------------------------------
# workers


#: sweeps are at least this many ``CHECK_INTERVAL``s apart, whoever runs them
SWEEP_SPACING = 0.9


@dataclass(frozen=True)
class Beat:
    written: bool
    sweep_due: bool = True


#: a heartbeat, and whether a detector sweep is due (``WorkerQuerySet.beat``)
BEAT_SQL = """
UPDATE worker_registry SET last_heartbeat = now(), tasks_processed = %s
WHERE worker_id = %s AND incarnation = %s AND status = 'active'
RETURNING (SELECT d.last_sweep_at IS NULL OR d.last_sweep_at <= now() - make_interval(secs => %s)
           FROM worker_health_detector d WHERE d.id = 1)
"""


@dataclass(frozen=True)
class Registration:
    worker: WorkerRegistry
    #: the incarnation this registration replaced, if the node name was seen before
    previous_incarnation: uuid.UUID | None
    previous_status: str | None


class WorkerQuerySet(models.QuerySet["WorkerRegistry"]):
    def active(self) -> WorkerQuerySet:
        return self.filter(status="active")

    def register(
        self,
        worker_id: str,
        *,
        incarnation: uuid.UUID,
        metadata: dict[str, Any],
        clock_skew: float | None = None,
    ) -> Registration:
        """Insert or take over the row of ``worker_id`` for a new start of the worker."""
        fields = {
            "status": "active",
            "incarnation": incarnation,
            "last_heartbeat": Now(),
            "started_at": Now(),
            "status_changed_at": Now(),
            "tasks_processed": 0,
            "metadata": metadata,
            "clock_skew": clock_skew,
        }
        with transaction.atomic(using=self.db):
            previous = (
                self.select_for_update().filter(worker_id=worker_id).values("incarnation", "status")
            ).first()
            if previous is None:
                try:
                    with transaction.atomic(using=self.db):
                        self.create(worker_id=worker_id, **fields)
                except IntegrityError:  # registered concurrently under the same name
                    previous = (
                        self.filter(worker_id=worker_id).values("incarnation", "status").first()
                    )
            if previous is not None:
                self.filter(worker_id=worker_id).update(**fields)
        worker = self.get(worker_id=worker_id)
        if previous is None or previous["incarnation"] == incarnation:
            return Registration(worker, None, None)
        return Registration(worker, previous["incarnation"], previous["status"])

    def beat(
        self,
        worker_id: str,
        incarnation: uuid.UUID,
        tasks_processed: int,
        *,
        sweep_spacing: float = 0.0,
    ) -> Beat:
        """Write one heartbeat. ``written`` False: the row is not ours-and-active any more.
        ``sweep_due``: no detector swept in the last ``sweep_spacing`` seconds, read by the
        same statement on PostgreSQL, so that of a thousand workers only the few that beat
        when a sweep is due try to take its lease (otherwise always True)."""
        mine = self.filter(worker_id=worker_id, incarnation=incarnation, status="active")
        if connections[self.db].vendor != "postgresql":
            return Beat(bool(mine.update(last_heartbeat=Now(), tasks_processed=tasks_processed)))
        with connections[self.db].cursor() as cursor:
            cursor.execute(BEAT_SQL, [tasks_processed, worker_id, incarnation, sweep_spacing])
            row = cursor.fetchone()
        if row is None:
            return Beat(False)
        return Beat(True, row[0] is not False)  # NULL: no detector state yet

    def beat_draining(self, worker_id: str, incarnation: uuid.UUID, tasks_processed: int) -> int:
        """Heartbeat of a worker marked offline that is still finishing its work."""
        return self.filter(worker_id=worker_id, incarnation=incarnation, status="offline").update(
            last_heartbeat=Now(), tasks_processed=tasks_processed
        )

    def recover(
        self, worker_id: str, incarnation: uuid.UUID, tasks_processed: int
    ) -> WorkerRegistry | None:
        """A worker declared failed heartbeats again (it was paused or cut off): active,
        with its ``worker_recovered`` event in the same transaction (never silently active
        again, even if the process dies right after). The worker's row, or ``None``."""
        from .models import EventKind, event

        with transaction.atomic(using=self.db):
            if not self.filter(
                worker_id=worker_id, incarnation=incarnation, status="failed"
            ).update(
                status="active",
                last_heartbeat=Now(),
                status_changed_at=Now(),
                tasks_processed=tasks_processed,
            ):
                return None
            worker = self.get(worker_id=worker_id)
            event(
                EventKind.WORKER_RECOVERED, worker=worker, previous_status="failed", using=self.db
            )
        return worker

    def mark_offline(self, worker_id: str, incarnation: uuid.UUID | None = None) -> int:
        """Warm shutdown (or an operator's drain): the worker left on purpose."""
        qs = self.filter(worker_id=worker_id)
        if incarnation is not None:
            qs = qs.filter(incarnation=incarnation)
        return qs.exclude(status="offline").update(status="offline", status_changed_at=Now())

    def stale(self, stale_after: float) -> WorkerQuerySet:
        """Active workers whose last heartbeat is older than ``stale_after`` seconds."""
        return self.filter(status="active", last_heartbeat__lt=db_now_minus(stale_after))

    def fail_if_stale(self, pk: int, stale_after: float) -> bool:
        """Mark one worker failed if it is still active and stale; True if this call did it."""
        return bool(
            self.stale(stale_after).filter(pk=pk).update(status="failed", status_changed_at=Now())
        )

    def recently_dead(self, within: float, stale_after: float) -> WorkerQuerySet:
        """Workers that stopped running in the last ``within`` seconds (by the database's
        clock): failed since then, or marked offline and silent for ``stale_after`` (done
        draining) since then. Found by index, however many workers the table holds."""
        failed = Q(status="failed", status_changed_at__gte=db_now_minus(within))
        drained = Q(
            status="offline",
            last_heartbeat__lt=db_now_minus(stale_after),
            last_heartbeat__gte=db_now_minus(stale_after + within),
        )
        return self.filter(failed | drained)

    def holding_tasks(self) -> WorkerQuerySet:
        """Workers with at least one task in a held status (any incarnation)."""
        from .models import HELD_STATUSES, TaskQueue

        return self.filter(
            Exists(TaskQueue.objects.filter(claimed_by=OuterRef("pk"), status__in=HELD_STATUSES))
        )

    def delete_inactive_older_than(self, days: float) -> int:
        qs = self.exclude(status="active").filter(status_changed_at__lt=db_now_minus(days * 86400))
        deleted, _ = qs.delete()
        return deleted


# --------------------------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class Delivery:
    """What a worker saw of one received message: enough to publish it again."""

    task_id: str
    task_name: str
    queue: str
    exchange: str
    routing_key: str
    body: bytes | None
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    eta: datetime | None
    expires: datetime | None

    def json_row(self) -> dict[str, Any]:
        """This delivery as a row of ``CLAIM_RECEIVED_SQL``'s JSON batch."""
        return {
            "i": self.task_id,
            "n": self.task_name,
            "q": self.queue,
            "x": self.exchange,
            "k": self.routing_key,
            "b": None if self.body is None else b2a_base64(self.body, newline=False).decode(),
            "ct": self.content_type,
            "ce": self.content_encoding,
            "h": self.headers,
            "p": self.properties,
            "eta": None if self.eta is None else self.eta.isoformat(),
            "exp": None if self.expires is None else self.expires.isoformat(),
        }

    def row_fields(self) -> dict[str, Any]:
        return {
            "task_name": self.task_name,
            "queue": self.queue,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "body": self.body,
            "content_type": self.content_type,
            "content_encoding": self.content_encoding,
            "headers": self.headers,
            "properties": self.properties,
            "eta": self.eta,
            "expires": self.expires,
        }


MESSAGE_FIELDS = (
    "task_name",
    "queue",
    "exchange",
    "routing_key",
    "body",
    "content_type",
    "content_encoding",
    "headers",
    "properties",
    "eta",
    "expires",
)


#: the token of a claim refused because the claiming worker is marked failed (a zombie
#: that resumed before its heart noticed): its deliveries go back to the broker
CLAIMER_FAILED = -3

#: the claiming worker (its row, this incarnation) when it may claim: not marked failed
CLAIMER_SQL = """w AS MATERIALIZED (SELECT r.id AS worker, r.incarnation AS inc
    FROM worker_registry r
    WHERE r.id = %s::bigint AND r.incarnation = %s::uuid AND r.status <> 'failed')"""

#: the claim of a batch of received messages (see ``TaskQuerySet.claim_received``): an
#: upsert of the messages that takes each row only where it is claimable, as ``claim``,
#: and only while the claiming worker is not marked failed (then one row ``'x'`` says so)
CLAIM_UPSERT_SQL = """
INSERT INTO task_queue AS t (task_id, task_name, status, queue, exchange, routing_key, body,
    content_type, content_encoding, headers, properties, eta, expires, claimed_by_id,
    claimed_incarnation, claimed_at, fencing_token, reclaim_count, publish_attempts, lost_on,
    created_at, updated_at)
SELECT v.i, v.n, 'claimed', v.q, v.x, v.k, decode(v.b, 'base64'), v.ct, v.ce, v.h, v.p,
    v.eta, v.exp, w.worker, w.inc, now(), 1, 0, 0, '[]'::jsonb, now(), now()
FROM json_to_recordset(%s::json) AS v(i text, n text, q text, x text, k text, b text,
    ct text, ce text, h jsonb, p jsonb, eta timestamptz, exp timestamptz)
CROSS JOIN w
ON CONFLICT (task_id) DO UPDATE SET
    task_name = EXCLUDED.task_name, queue = EXCLUDED.queue, exchange = EXCLUDED.exchange,
    routing_key = EXCLUDED.routing_key, body = EXCLUDED.body,
    content_type = EXCLUDED.content_type, content_encoding = EXCLUDED.content_encoding,
    headers = EXCLUDED.headers, properties = EXCLUDED.properties, eta = EXCLUDED.eta,
    expires = EXCLUDED.expires, status = 'claimed', claimed_by_id = EXCLUDED.claimed_by_id,
    claimed_incarnation = EXCLUDED.claimed_incarnation, claimed_at = now(),
    fencing_token = t.fencing_token + 1, reclaim_lease = NULL, publish_attempts = 0,
    updated_at = now()
WHERE t.status IN ('queued', 'reserved', 'reclaiming') OR (t.status = 'claimed' AND NOT EXISTS (
    SELECT 1 FROM worker_registry r
    WHERE r.id = t.claimed_by_id AND r.incarnation = t.claimed_incarnation
      AND (r.status = 'active' OR (r.status = 'offline'
           AND r.last_heartbeat >= now() - make_interval(secs => %s::float8)))))
RETURNING t.task_id, t.fencing_token
"""

#: rows tagged ``'c'`` (a claim and its token), or one ``'x'`` (the claimer is failed).
#: Parameters: worker, incarnation, the batch, STALE_AFTER.
CLAIM_RECEIVED_SQL = """
WITH {claimer}, cl AS ({claim})
SELECT 'c', task_id, fencing_token FROM cl
UNION ALL SELECT 'x', NULL, NULL WHERE NOT EXISTS (SELECT 1 FROM w)
"""

#: the end of a batch of runs and the claim of a batch of received messages in one statement
#: (the gate writes both at once: :meth:`TaskQuerySet.claim_and_finish`). Parameters: the
#: runs, then those of ``CLAIM_RECEIVED_SQL``.
CLAIM_AND_FINISH_SQL = """
WITH fin AS ({finish}), {claimer}, cl AS ({claim})
SELECT 'f', task_id, fencing_token FROM fin UNION ALL SELECT 'c', task_id, fencing_token FROM cl
UNION ALL SELECT 'x', NULL, NULL WHERE NOT EXISTS (SELECT 1 FROM w)
"""

#: the publisher's record (see ``TaskQuerySet.record_published``)
RECORD_PUBLISHED_SQL = """
INSERT INTO task_queue AS t (task_id, task_name, status, queue, exchange, routing_key,
    content_type, content_encoding, eta, expires, fencing_token, reclaim_count,
    publish_attempts, lost_on, created_at, updated_at)
SELECT %s, %s, 'queued', %s, '', %s, '', '', %s::timestamptz, %s::timestamptz, 0, 0, 0,
    '[]'::jsonb, now(), now()
FROM {relax}
ON CONFLICT (task_id) DO UPDATE SET status = 'queued', claimed_by_id = NULL,
    claimed_incarnation = NULL, claimed_at = NULL, finished_at = NULL, reclaim_count = 0,
    lost_on = '[]'::jsonb, updated_at = now()
WHERE t.status IN ('succeeded', 'failed')
"""

#: the end of a batch of runs, each conditional on its fencing token. The rows are found by
#: an index condition on their task ids (``= ANY``), whatever the plan: a generic plan made
#: while the table was small (a young installation, a worker started after a TRUNCATE)
#: otherwise joins the batch to a full scan of the task_id index, and keeps that plan while
#: the table grows (PostgreSQL CPU per finished task grew with the table: 0.4 ms at 3,000
#: rows, 1 ms at 12,000). (``IS TRUE`` keeps the status out of the index conditions.)
FINISH_MANY_SQL = """
WITH runs AS MATERIALIZED (
    SELECT * FROM json_to_recordset(%s::json) AS r(i text, k integer, s text))
UPDATE task_queue AS t SET status = v.s, finished_at = now(), updated_at = now()
FROM runs AS v
WHERE t.task_id = ANY (ARRAY(SELECT runs.i FROM runs)) AND t.task_id = v.i
  AND t.fencing_token = v.k AND (t.status = 'claimed') IS TRUE
RETURNING t.task_id, t.fencing_token
"""


CLAIM_RECEIVED_SQL = CLAIM_RECEIVED_SQL.format(claimer=CLAIMER_SQL, claim=CLAIM_UPSERT_SQL.strip())
CLAIM_AND_FINISH_SQL = CLAIM_AND_FINISH_SQL.format(
    finish=FINISH_MANY_SQL.strip(), claimer=CLAIMER_SQL, claim=CLAIM_UPSERT_SQL.strip()
)


def claims_from_rows(
    task_ids: Sequence[str], rows: Sequence[tuple[Any, Any, Any]]
) -> tuple[dict[str, int | None], set[tuple[str, int]]]:
    """The tokens of a claim statement's ``'c'`` rows by task id (``None``: must not run;
    ``CLAIMER_FAILED`` for all when an ``'x'`` row says the claimer is failed), and the
    ``'f'`` rows (finished runs accepted)."""
    claimed: dict[str, int] = {}
    finished: set[tuple[str, int]] = set()
    refused = False
    for kind, task_id, token in rows:
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "x":
            refused = True
        elif kind == "c":
            claimed[_text(task_id)] = int(token)
        else:
            finished.add((_text(task_id), int(token)))
    if refused:
        return {task_id: CLAIMER_FAILED for task_id in task_ids}, finished
    return {task_id: claimed.get(task_id) for task_id in task_ids}, finished


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _batch_json(rows: list[dict[str, Any]]) -> str:
    """A batch for the statements above: one JSON parameter, whatever the batch's size
    (one C-encoded string is far cheaper to send than a dozen arrays dumped element by
    element, and the statement's text stays the same for its prepared plan)."""
    return json.dumps(rows, separators=(",", ":"), default=str)


def _execute_prepared(using: str, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Run one of the hot-path statements above and fetch its rows.

    Their text does not depend on the batch size (one JSON parameter, not VALUES lists),
    so with psycopg 3 they run as server-side prepared statements: PostgreSQL parses and
    plans each once per connection. With psycopg2 they run through Django's cursor as any
    query.
    """
    conn = connections[using]
    conn.ensure_connection()
    raw = conn.connection
    if hasattr(raw, "pipeline"):  # psycopg 3
        import psycopg

        started = time.monotonic()
        prepare = prepares(using)
        try:
            rows = _run_psycopg(conn, psycopg.Cursor(raw), sql, params, prepare)
        except (psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement):
            # A pooler handed us another server connection: prepare nothing more here.
            logger.warning(
                "worker_health: the database refused a prepared statement (a connection "
                "pooler in transaction mode?); running unprepared from now on. Set "
                "OPTIONS['prepare_threshold'] = None to say so."
            )
            unprepared.add(using)
            if conn.in_atomic_block:  # the failed statement aborted the transaction
                with conn.wrap_database_errors:
                    raise
            rows = _run_psycopg(conn, psycopg.Cursor(raw), sql, params, False)
        if conn.queries_logged:  # as Django's debug cursor does (CaptureQueriesContext)
            conn.queries_log.append(
                {
                    "sql": sql,
                    "time": f"{time.monotonic() - started:.3f}",
                    "params": "prepared" if prepare else "bound",
                }
            )
        return rows
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def _run_psycopg(
    conn: Any, cursor: Any, sql: str, params: Sequence[Any], prepare: bool
) -> list[tuple[Any, ...]]:
    # A server-side binding cursor, whatever Django's ``server_side_binding``: Django's
    # default cursor binds parameters on the client, and a statement whose text holds
    # its values cannot be prepared.
    with cursor:
        try:
            cursor.execute(sql, params, prepare=prepare)
        except Exception as exc:
            import psycopg

            if isinstance(
                exc,
                (psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement),
            ):
                raise
            with conn.wrap_database_errors:
                raise
        return list(cursor.fetchall())


def _holder_alive() -> Exists:
    """The worker incarnation that holds a row still runs: active, or draining (marked
    offline but still heartbeating)."""
    from .conf import settings
    from .models import WorkerRegistry

    draining = Q(status="offline", last_heartbeat__gte=db_now_minus(settings.STALE_AFTER))
    return Exists(
        WorkerRegistry.objects.filter(
            Q(status="active") | draining,
            pk=OuterRef("claimed_by"),
            incarnation=OuterRef("claimed_incarnation"),
        )
    )


def _update_returning(qs: models.QuerySet[Any], values: dict[str, Any], column: str) -> Any:
    """``qs.update(**values)`` with ``RETURNING column`` (PostgreSQL); the value of the
    first updated row, or None when no row matched."""
    query = cast(UpdateQuery, qs.query.chain(UpdateQuery))
    query.add_update_values(values)
    compiler = query.get_compiler(qs.db)
    compiler.pre_sql_setup()
    sql, params = compiler.as_sql()
    quoted = compiler.connection.ops.quote_name(column)
    with compiler.connection.cursor() as cursor:
        cursor.execute(f"{sql} RETURNING {quoted}", params)
        row = cursor.fetchone()
    return row[0] if row else None


class TaskQuerySet(models.QuerySet["TaskQueue"]):
    def held_by(self, worker: WorkerRegistry | int) -> TaskQuerySet:
        """Tasks a worker holds: received but not started, or running."""
        return self.filter(claimed_by=worker, status__in=("reserved", "claimed"))

    def orphaned(self) -> TaskQuerySet:
        """Held tasks whose holder is not an active incarnation any more."""
        return self.filter(status__in=("reserved", "claimed")).exclude(_holder_alive())

    def record_published(
        self,
        *,
        task_id: str,
        task_name: str,
        queue: str,
        eta: datetime | None,
        expires: datetime | None,
    ) -> None:
        """The publisher's record: insert the row unless a worker already did, and re-open
        a finished one.

        A publish is always a new run: a broker's redelivery and worker_health's own
        re-publish of a reclaimed task never come through here, so an application that
        publishes the id of a finished task again (Celery allows it; a reused signature
        does it) gets it run again, as Celery would. A revoked id stays revoked (Celery's
        workers drop revoked ids themselves).
        """
        from .durability import relaxed_write

        conn = connections[self.db]
        if conn.vendor == "postgresql":
            # One statement, one round trip on the publisher's request path. Outside a
            # transaction it relaxes its own commit (set_config(.., true) lasts until the
            # end of the statement's transaction), as relaxed_write does.
            from .conf import settings

            relax = not settings.SYNCHRONOUS_COMMIT and not conn.in_atomic_block
            with conn.cursor() as cursor:
                cursor.execute(
                    RECORD_PUBLISHED_SQL.format(
                        relax="(SELECT set_config('synchronous_commit', 'off', true)) AS r"
                        if relax
                        else "(SELECT 1) AS r"
                    ),
                    [task_id, task_name, queue, queue, eta, expires],
                )
            return
        with relaxed_write(self.db):
            self.filter(task_id=task_id, status__in=("succeeded", "failed")).update(
                status="queued",
                claimed_by=None,
                claimed_incarnation=None,
                claimed_at=None,
                finished_at=None,
                reclaim_count=0,
                lost_on=[],
                updated_at=Now(),
            )
            self.bulk_create(
                [
                    self.model(
                        task_id=task_id,
                        task_name=task_name,
                        queue=queue,
                        routing_key=queue,
                        eta=eta,
                        expires=expires,
                    )
                ],
                ignore_conflicts=True,
            )

    def reserve(
        self, deliveries: Sequence[Delivery], worker_pk: int, incarnation: uuid.UUID
    ) -> None:
        """A worker received these messages: store them and note that it holds them.

        Two statements for the whole batch: an upsert of the message contents (the latest
        delivery is the one to publish again) and a conditional hand-over of the hold.
        """
        if not deliveries:
            return
        self.bulk_create(
            [self.model(task_id=d.task_id, status="queued", **d.row_fields()) for d in deliveries],
            update_conflicts=True,
            unique_fields=["task_id"],
            update_fields=[*MESSAGE_FIELDS, "updated_at"],
        )
        self.filter(
            task_id__in=[d.task_id for d in deliveries], status__in=("queued", "reclaiming")
        ).update(
            status="reserved",
            claimed_by=worker_pk,
            claimed_incarnation=incarnation,
            claimed_at=Now(),
            reclaim_lease=None,
            publish_attempts=0,
            updated_at=Now(),
        )

    def claim_received(
        self, deliveries: Sequence[Delivery], *, worker_pk: int, incarnation: uuid.UUID
    ) -> dict[str, int | None]:
        """A worker is about to run these received messages: store each message, note
        that this worker holds the task and give the run a new fencing token, in one
        statement for the batch on PostgreSQL.

        Returns the new token by task id, or ``None`` for a delivery that must not run
        (finished, or claimed by a live worker), or ``CLAIMER_FAILED`` for every delivery
        when the claiming worker is marked failed (a zombie that resumed before its heart
        noticed: it must not take tasks that were reclaimed from it and run elsewhere; its
        deliveries go back to the broker). Task ids must be distinct.
        """
        if not deliveries:
            return {}
        if connections[self.db].vendor == "postgresql":
            return self._claim_received_pg(deliveries, worker_pk, incarnation)
        ids = [d.task_id for d in deliveries]
        refused: dict[str, int | None] = {task_id: CLAIMER_FAILED for task_id in ids}
        # The receipts first, in their own transaction (durable as soon as possible: on a
        # transport that drops a message once read, they are all that is left of it).
        # Each transaction checks the claimer first (SQLite: the write lock is held).
        with transaction.atomic(using=self.db):
            if not self._claimer_may_claim(worker_pk, incarnation):
                return refused
            self.reserve(deliveries, worker_pk, incarnation)
        # Then the claims, three statements for the batch. The rows this UPDATE takes are
        # marked with a lease of its own (visible to nobody: it is cleared before commit)
        # to read their new tokens back.
        marker = uuid.uuid4()
        claimable = Q(status__in=("queued", "reserved", "reclaiming")) | (
            Q(status="claimed") & ~_holder_alive()
        )
        with transaction.atomic(using=self.db):
            if not self._claimer_may_claim(worker_pk, incarnation):
                return refused
            self.filter(task_id__in=ids).filter(claimable).update(
                status="claimed",
                claimed_by=worker_pk,
                claimed_incarnation=incarnation,
                claimed_at=Now(),
                fencing_token=F("fencing_token") + 1,
                reclaim_lease=marker,
                publish_attempts=0,
                updated_at=Now(),
            )
            tokens = dict(
                self.filter(task_id__in=ids, reclaim_lease=marker).values_list(
                    "task_id", "fencing_token"
                )
            )
            if tokens:
                self.filter(task_id__in=list(tokens), reclaim_lease=marker).update(
                    reclaim_lease=None
                )
        return {task_id: tokens.get(task_id) for task_id in ids}

    def _claimer_may_claim(self, worker_pk: int, incarnation: uuid.UUID) -> bool:
        from .models import WorkerRegistry

        return (
            WorkerRegistry.objects.using(self.db)
            .filter(pk=worker_pk, incarnation=incarnation)
            .exclude(status="failed")
            .exists()
        )

    def _claim_received_pg(
        self, deliveries: Sequence[Delivery], worker_pk: int, incarnation: uuid.UUID
    ) -> dict[str, int | None]:
        from .conf import settings

        rows = _execute_prepared(
            self.db,
            CLAIM_RECEIVED_SQL,
            [
                worker_pk,
                incarnation,
                _batch_json([d.json_row() for d in deliveries]),
                settings.STALE_AFTER,
            ],
        )
        return claims_from_rows([d.task_id for d in deliveries], rows)[0]

    def claim_and_finish(
        self,
        deliveries: Sequence[Delivery],
        runs: Sequence[tuple[str, int, str]],
        *,
        worker_pk: int,
        incarnation: uuid.UUID,
    ) -> tuple[dict[str, int | None], set[tuple[str, int]]]:
        """:meth:`finish_many` of ``runs`` and :meth:`claim_received` of ``deliveries``,
        in one statement on PostgreSQL. Returns what each returns."""
        ids = {d.task_id for d in deliveries}
        if (
            not deliveries
            or not runs
            or connections[self.db].vendor != "postgresql"
            or any(run[0] in ids for run in runs)  # one statement must not touch a row twice
        ):
            accepted = self.finish_many(runs)
            return self.claim_received(deliveries, worker_pk=worker_pk, incarnation=incarnation), (
                accepted
            )
        from .conf import settings

        rows = _execute_prepared(
            self.db,
            CLAIM_AND_FINISH_SQL,
            [
                _batch_json([{"i": i, "k": k, "s": st} for i, k, st in runs]),
                worker_pk,
                incarnation,
                _batch_json([d.json_row() for d in deliveries]),
                settings.STALE_AFTER,
            ],
        )
        return claims_from_rows([d.task_id for d in deliveries], rows)

    def confirm_claim(
        self, task_id: str, token: int, worker_pk: int, incarnation: uuid.UUID
    ) -> bool:
        """Is the claim with ``token`` still this worker's? If so, note that its run starts
        now (``started_token``). A run checks before its code runs when it waited long in
        the pool's queue (its worker may have been declared failed meanwhile and the task
        reclaimed), and when it is not the task's first run, so that a reclaim can tell
        whether the run had started (see :func:`worker_health.reclaim.reclaim`)."""
        return bool(
            self.filter(
                task_id=task_id,
                status="claimed",
                fencing_token=token,
                claimed_by=worker_pk,
                claimed_incarnation=incarnation,
            ).update(claimed_at=Now(), updated_at=Now(), started_token=token)
        )

    def finish_many(self, runs: Sequence[tuple[str, int, str]]) -> set[tuple[str, int]]:
        """Record the end of several runs ``(task_id, token, status)``; only the current
        claim of each may. Returns the ``(task_id, token)`` pairs accepted."""
        if not runs:
            return set()
        if connections[self.db].vendor == "postgresql":
            batch = _batch_json([{"i": i, "k": k, "s": s} for i, k, s in runs])
            rows = _execute_prepared(self.db, FINISH_MANY_SQL, [batch])
            return {(task_id, int(token)) for task_id, token in rows}
        return {(run[0], run[1]) for run in runs if self.finish(*run)}

    def finish_untracked(self, task_ids: Sequence[str], status: str) -> int:
        """Runs that started untracked (no claim: the database was down) ended: their rows
        are finished unless a worker claimed them meanwhile."""
        return self.filter(task_id__in=list(task_ids), status__in=("queued", "reserved")).update(
            status=status, finished_at=Now(), updated_at=Now()
        )

    def claim(
        self,
        *,
        task_id: str,
        task_name: str,
        queue: str,
        worker_pk: int,
        incarnation: uuid.UUID,
        require_alive: bool = False,
    ) -> int | None:
        """Claim a task before its code runs. Returns the new fencing token, or ``None``
        when this delivery must not run (finished, or running on a live worker).

        ``require_alive``: and not while the claiming worker is marked failed (a prefork
        run whose gate claim was reclaimed while it waited: the task runs elsewhere)."""
        from .models import WorkerRegistry

        claimable = Q(status__in=("queued", "reserved", "reclaiming")) | (
            Q(status="claimed") & ~_holder_alive()
        )
        if require_alive:
            claimer = WorkerRegistry.objects.filter(pk=worker_pk, incarnation=incarnation)
            claimable = Q(claimable, Exists(claimer.exclude(status="failed")))  # type: ignore[assignment]
            if not self._claimer_may_claim(worker_pk, incarnation):
                return None

        values = {
            "status": "claimed",
            "claimed_by": worker_pk,
            "claimed_incarnation": incarnation,
            "claimed_at": Now(),
            "fencing_token": F("fencing_token") + 1,
            # this claim is made just before the run's code: the run starts
            "started_token": F("fencing_token") + 1,
            "reclaim_lease": None,
            "publish_attempts": 0,
            "updated_at": Now(),
        }
        target = self.filter(task_id=task_id).filter(claimable)

        def take() -> int:
            return target.update(**values)

        if connections[self.db].vendor == "postgresql":
            # The claim and its new token in one statement: the ORM's own UPDATE, with
            # RETURNING added.
            token = _update_returning(target, values, "fencing_token")
            if token is not None:
                return int(token)
        elif take():
            return self._own_token(task_id, worker_pk, incarnation)
        try:
            with transaction.atomic(using=self.db):
                self.create(
                    task_id=task_id,
                    task_name=task_name,
                    queue=queue,
                    routing_key=queue,
                    status="claimed",
                    claimed_by_id=worker_pk,
                    claimed_incarnation=incarnation,
                    claimed_at=Now(),
                    fencing_token=1,
                    started_token=1,
                )
            return 1
        except IntegrityError:
            # The row appeared meanwhile (the publisher's insert, or this worker's own
            # record of the delivery): claim it if it is claimable, else it's a duplicate.
            if not take():
                return None
        return self._own_token(task_id, worker_pk, incarnation)

    def _own_token(self, task_id: str, worker_pk: int, incarnation: uuid.UUID) -> int | None:
        return (
            self.filter(
                task_id=task_id,
                status="claimed",
                claimed_by=worker_pk,
                claimed_incarnation=incarnation,
            )
            .values_list("fencing_token", flat=True)
            .first()
        )

    def finish(self, task_id: str, token: int, status: str) -> bool:
        """Record the end of a run; only the current claim may. False means fenced off."""
        return bool(
            self.filter(task_id=task_id, status="claimed", fencing_token=token).update(
                status=status, finished_at=Now(), updated_at=Now()
            )
        )

    def requeue_own(self, task_id: str, token: int) -> bool:
        """A running task published itself again (retry, replace): it is queued again."""
        return bool(
            self.filter(task_id=task_id, status="claimed", fencing_token=token).update(
                status="queued",
                claimed_by=None,
                claimed_incarnation=None,
                updated_at=Now(),
            )
        )

    def mark_revoked(self, task_ids: Iterable[str]) -> int:
        return (
            self.filter(task_id__in=list(task_ids))
            .exclude(status__in=("succeeded", "failed", "quarantined"))
            .update(status="revoked", finished_at=Now(), updated_at=Now())
        )

    def requeue_quarantined(self, pks: Iterable[int]) -> list[str]:
        """An operator lets quarantined tasks run again (reclaim budget reset)."""
        ids = list(self.filter(pk__in=list(pks), status="quarantined").values_list("pk", flat=True))
        self.filter(pk__in=ids, status="quarantined").update(
            status="reclaiming",
            reclaim_count=0,
            reclaimed_at=db_now_minus(86400 * 365),  # due for the outbox at once
            reclaim_lease=None,
            finished_at=None,
            updated_at=Now(),
        )
        return [str(pk) for pk in ids]

    def delete_finished(self, older_than: timedelta, batch_size: int = 1000) -> int:
        """Delete finished rows older than ``older_than``, in batches."""
        total = 0
        cutoff = db_now_minus(older_than.total_seconds())
        while True:
            pks = list(
                self.filter(
                    status__in=("succeeded", "failed", "revoked", "quarantined"),
                    finished_at__lt=cutoff,
                ).values_list("pk", flat=True)[:batch_size]
            )
            if not pks:
                return total
            deleted, _ = self.filter(pk__in=pks).delete()
            total += deleted


# --------------------------------------------------------------------------------------------
# events and detector state


class EventQuerySet(models.QuerySet["WorkerEvent"]):
    def delete_older_than(self, older_than: timedelta, batch_size: int = 1000) -> int:
        total = 0
        cutoff = db_now_minus(older_than.total_seconds())
        while True:
            pks = list(self.filter(created_at__lt=cutoff).values_list("pk", flat=True)[:batch_size])
            if not pks:
                return total
            deleted, _ = self.filter(pk__in=pks).delete()
            total += deleted


class DetectorStateManager(models.Manager["DetectorState"]):
    def take_sweep_lease(self, who: str, spacing: float, outage_gap: float, force: bool) -> bool:
        """Start a sweep if none started in the last ``spacing`` seconds (or ``force``).

        The same statement keeps the outage guard: after a pause in sweeps longer than
        ``outage_gap``, ``observing_since`` restarts, and no worker is failed until the
        detector has watched for ``STALE_AFTER`` again.
        """
        gap_exceeded = Q(last_sweep_at__isnull=True) | Q(last_sweep_at__lt=db_now_minus(outage_gap))
        qs = self.filter(pk=1)
        if not force:
            qs = qs.filter(
                Q(last_sweep_at__isnull=True) | Q(last_sweep_at__lte=db_now_minus(spacing))
            )
        updated = qs.update(
            observing_since=Case(When(gap_exceeded, then=Now()), default=F("observing_since")),
            last_sweep_at=Now(),
            last_sweep_by=who[:255],
        )
        if updated:
            return True
        if not self.filter(pk=1).exists():
            try:
                with transaction.atomic(using=self.db):
                    self.create(
                        pk=1, last_sweep_at=Now(), observing_since=Now(), last_sweep_by=who[:255]
                    )
                return True
            except IntegrityError:
                return False
        return False

    def observed_for(self, seconds: float) -> bool:
        """Has the detector watched without a gap for at least ``seconds``?"""
        return self.filter(pk=1, observing_since__lte=db_now_minus(seconds)).exists()

    def take_full_scan(self, every: float) -> bool:
        """Is this sweep the one (at most every ``every`` seconds) that looks for orphaned
        tasks across the whole table? Call only while holding the sweep lease."""
        due = Q(last_full_scan_at__isnull=True) | Q(last_full_scan_at__lte=db_now_minus(every))
        if self.filter(due, pk=1).update(last_full_scan_at=Now()):
            return True
        return not self.filter(pk=1).exists()  # no detector state yet: nothing was scanned

    def record_sweep_done(self, duration: float) -> None:
        self.filter(pk=1).update(last_sweep_duration=duration, last_success_at=Now())
