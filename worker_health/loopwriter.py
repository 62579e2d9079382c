"""The gate's writes made from the worker's event loop, without ever blocking it.

With an event loop (the Redis and AMQP transports), PostgreSQL and psycopg 3, the gate
does not need a thread: its statements go out on a connection of its own through libpq's
asynchronous interface. The loop sends a batch (a non-blocking write), goes on with its
work, and reads the answer when the connection's socket is readable, exactly as it reads
the broker's. One statement is in flight at a time; whatever arrives meanwhile makes the
next batch, so batches grow with the load and a lone task waits for one round trip only.

A thread and the loop taking turns at the interpreter cost more than the statements
themselves (about half of the worker's extra CPU time per task, measured: see
``docs/benchmarks.md``); here the loop's own cost per batch is building one JSON
parameter, one ``send`` and reading the rows back.

Only connecting blocks: it happens on a short-lived thread, and until the first connection
is up the gate holds what it received. When the connection is lost the batch in flight
runs untracked (as with the threaded gate when the database is down), relayed completions
wait, and a thread reconnects with back-off. At shutdown the loop stops before the pool
has drained: the writer finishes its statement in flight and hands over to the gate's
thread (:meth:`Gate.close_intake`).
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections

from . import dbthread
from .clock import pause
from .conf import settings
from .durability import prepares, session_settings
from .querysets import claims_from_rows

if TYPE_CHECKING:
    from celery.worker.request import Request

    from .gate import Gate
    from .relay import Relayed

logger = logging.getLogger("worker_health")

RECONNECT_FIRST = 0.2
#: at most this long between reconnection attempts (relayed completions land within it of
#: the database's return, before the heartbeat's audit looks a second time)
RECONNECT_MAX = 1.0
#: how long a batch may gather while the pool has work waiting (see ``LoopWriter._linger``)
LINGER_BUSY = 0.004
#: SQLSTATE of "prepared statement does not exist" (a pooler in transaction mode)
INVALID_STATEMENT_NAME = "26000"


def usable(alias: str = DEFAULT_DB_ALIAS) -> bool:
    """Can the gate write from the loop on this database (PostgreSQL with psycopg 3)?"""
    conn = connections[alias]
    if conn.vendor != "postgresql":
        return False
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return bool(getattr(conn, "is_psycopg3", True))


def _dollar(sql: str) -> bytes:
    """``%s`` placeholders as libpq's ``$n``."""
    parts = sql.split("%s")
    out = parts[0]
    for n, part in enumerate(parts[1:], start=1):
        out += f"${n}{part}"
    return out.encode()


def _statements() -> dict[str, bytes]:
    from .querysets import CLAIM_AND_FINISH_SQL, CLAIM_RECEIVED_SQL, FINISH_MANY_SQL

    return {
        "claim": _dollar(CLAIM_RECEIVED_SQL),
        "finish": _dollar(FINISH_MANY_SQL),
        "both": _dollar(CLAIM_AND_FINISH_SQL),
    }


def _open_connection(alias: str) -> Any:
    """A new psycopg connection configured as Django's (blocking: a helper thread only),
    tuned as worker_health's own connections are, with the statements prepared."""
    wrapper = connections.create_connection(alias)
    wrapper.ensure_connection()
    raw = wrapper.connection
    raw.autocommit = True
    for statement in session_settings(alias):
        raw.execute(statement)
    if prepares(alias):
        from psycopg import pq

        for name, sql in _statements().items():
            result = raw.pgconn.prepare(f"wh_{name}".encode(), sql)
            if result.status != pq.ExecStatus.COMMAND_OK:
                raw.close()
                raise RuntimeError(result.error_message.decode(errors="replace"))
    return raw


class LoopWriter:
    """Sends the gate's batches from the event loop and reads their answers there."""

    def __init__(self, gate: Gate, hub: Any, alias: str = DEFAULT_DB_ALIAS) -> None:
        self.gate = gate
        self.hub = hub
        self.alias = alias
        self.statements = _statements()
        self.prepared = prepares(alias)
        self.raw: Any = None
        self.fd: int | None = None
        #: (kind, requests, completions, started) of the statement in flight
        self.inflight: tuple[str, list[Request], list[Relayed], float] | None = None
        self.results: list[Any] = []
        self.scheduled = False
        self.connecting = False
        self.closed = False
        #: the database could not be reached: received tasks run untracked meanwhile
        self.down = False
        self.down_since: float | None = None
        self.backoff = RECONNECT_FIRST
        self.worker_pk: int | None = None

    # -- connection (a helper thread connects; everything else is on the loop) ----------

    def start(self) -> None:
        self._connect_later(0.0)

    def attach(self, hub: Any) -> None:
        """The consumer (re)started its loop on ``hub``."""
        self.hub = hub
        if self.fd is not None:
            hub.add_reader(self.fd, self._on_readable)
        # a reset hub dropped its pending callbacks and timers (ours among them)
        self.scheduled = False
        self.kick()

    def _connect_later(self, delay: float) -> None:
        if self.connecting or self.closed:
            return
        self.connecting = True
        threading.Thread(
            target=self._connect, args=(delay,), name="worker-health-connect", daemon=True
        ).start()

    def _connect(self, delay: float) -> None:
        raw: Any = None
        error: Exception | None = None
        try:
            pause(delay)
            raw = _open_connection(self.alias)
            pk = self.gate._worker_pk()
            if pk is None:
                raise RuntimeError("this worker is not registered yet")
        except Exception as exc:
            error = exc
            if raw is not None:
                raw.close()
                raw = None
        finally:
            connections.close_all()  # this thread's own (the worker's row lookup)
        if error is not None:
            self._call_on_loop(self._connect_failed, error)
        else:
            self._call_on_loop(self._connected, raw, pk)

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        self.hub.call_soon(fn, *args)

    def _connected(self, raw: Any, pk: int) -> None:
        self.connecting = False
        if self.closed:
            raw.close()
            return
        self.raw, self.worker_pk = raw, pk
        raw.pgconn.nonblocking = 1
        self.fd = raw.pgconn.socket
        self.hub.add_reader(self.fd, self._on_readable)
        self.backoff = RECONNECT_FIRST
        if self.down_since is not None:
            logger.warning(
                "worker_health: claims written again after %.1f s",
                time.monotonic() - self.down_since,
            )
        self.down, self.down_since = False, None
        self.kick()

    def _connect_failed(self, error: Exception) -> None:
        self.connecting = False
        if self.closed:
            return
        if not self.down:
            self.down, self.down_since = True, time.monotonic()
            logger.warning(
                "worker_health: cannot claim received tasks (%s); running them untracked "
                "until the database answers",
                error,
            )
        self.kick()  # what waited for the first connection runs now, untracked
        delay, self.backoff = self.backoff, min(self.backoff * 2, RECONNECT_MAX)
        self._connect_later(delay)

    def _lost(self, error: Exception | str) -> None:
        """The connection broke: what was in flight is unknown (claims: run untracked;
        completions: written again later, fenced by their tokens)."""
        self._drop_connection()
        inflight, self.inflight = self.inflight, None
        self.results = []
        if inflight is not None:
            _, batch, done, _ = inflight
            self.gate._requeue_done(done)
            self._release(batch, {})
        self._connect_failed(Exception(str(error)))

    def _drop_connection(self) -> None:
        if self.fd is not None:
            for remove in (self.hub.remove_reader, self.hub.remove_writer):
                with contextlib.suppress(Exception):
                    remove(self.fd)
        self.fd = None
        if self.raw is not None:
            with contextlib.suppress(Exception):
                self.raw.close()
        self.raw = None

    # -- sending ------------------------------------------------------------------------

    def kick(self) -> None:
        """Something waits to be written: send it once the loop's current turn is over
        (everything received in the same turn goes in the same batch), or a little later
        while every pool process has a task waiting already (see :meth:`_linger`)."""
        if not self.scheduled and not self.closed:
            self.scheduled = True
            delay = self._linger()
            if delay:
                self.hub.call_later(delay, self._send)
            else:
                self.hub.call_soon(self._send)

    def _linger(self) -> float:
        """How long the next batch may gather: nothing while the pool could run out of
        tasks; ``LINGER_BUSY`` while each pool process has at least one more task waiting
        for it (claimed and passed on), so that waiting costs no pool time. Batches then
        carry several tasks, and the statement's cost is shared."""
        from celery.worker import state

        gate = self.gate
        waiting = (
            len(state.reserved_requests)
            - len(state.active_requests)
            - len(gate._pending)
            - len(gate.held)
        )
        return LINGER_BUSY if waiting >= max(1, gate.concurrency) else 0.0

    def _send(self) -> None:
        self.scheduled = False
        if self.inflight is not None or self.closed:
            return
        gate = self.gate
        if self.raw is None:
            if self.down:  # no database: run what was received, untracked
                batch = gate._take_batch()
                self._release(batch, {})
            return  # first connection still coming: hold what was received
        batch = gate._take_batch()
        ids = {req.id for req in batch}
        done = gate._take_due_done(exclude=ids)
        if not batch and not done:
            return
        for req in batch:
            gate.held[req.id] = req
        try:
            kind, params = self._params(batch, done)
        except Exception:
            # A bug, or a message we cannot read: run the batch untracked rather than hold
            # it; the completions are tried again.
            logger.exception("worker_health: could not claim %d received task(s)", len(batch))
            gate._requeue_done(done)
            self._release(batch, {})
            return
        if not params:
            return  # only runs that started untracked: the database thread has them
        pgconn = self.raw.pgconn
        try:
            if self.prepared:
                pgconn.send_query_prepared(f"wh_{kind}".encode(), params)
            else:
                pgconn.send_query_params(self.statements[kind], params)
            self.inflight = (kind, batch, done, time.monotonic())
            if pgconn.flush():
                self.hub.add_writer(self.fd, self._on_writable)
        except Exception as exc:
            self.inflight = (kind, batch, done, time.monotonic())
            self._lost(exc)

    def _params(self, batch: list[Request], done: list[Relayed]) -> tuple[str, list[bytes]]:
        """The statement to send and its parameters (none: nothing to send)."""
        from .querysets import _batch_json
        from .tracking import claim_row

        runs = [{"i": c.task_id, "k": c.token, "s": c.status} for c in done if c.token >= 0]
        untracked = [c for c in done if c.token < 0]
        if untracked:  # rare (runs that started while the database was down)
            dbthread.submit(lambda: self._finish_untracked(untracked))
        claim = [
            str(self.worker_pk).encode(),
            str(self.gate.identity.incarnation).encode(),
            _batch_json([claim_row(req) for req in batch]).encode(),
            repr(float(settings.STALE_AFTER)).encode(),
        ]
        if batch and runs:
            return "both", [_batch_json(runs).encode(), *claim]
        if batch:
            return "claim", claim
        if runs:
            return "finish", [_batch_json(runs).encode()]
        return "finish", []

    def _finish_untracked(self, untracked: list[Relayed]) -> None:
        """On the database thread: the rows of runs that started untracked; tried again
        after a back-off when the database fails."""
        failed = self.gate._finish_untracked_safely(untracked)
        if failed:
            self._call_on_loop(self.gate._requeue_done, failed)

    def _on_writable(self, *_: Any) -> None:
        if self.raw is None:
            return
        try:
            if not self.raw.pgconn.flush() and self.fd is not None:
                self.hub.remove_writer(self.fd)
        except Exception as exc:
            self._lost(exc)

    # -- reading ------------------------------------------------------------------------

    def _on_readable(self, *_: Any) -> None:
        if self.raw is None:
            return
        pgconn = self.raw.pgconn
        try:
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    self._finished()
                    break
                self.results.append(result)
            else:
                return
        except Exception as exc:
            self._lost(exc)
            return
        self.kick()

    def _finished(self) -> None:
        from psycopg import pq

        inflight, self.inflight = self.inflight, None
        results, self.results = self.results, []
        if inflight is None:
            if self.raw is not None and self.raw.pgconn.status != pq.ConnStatus.OK:
                self._lost("the connection was closed")
            return  # nothing was asked (a notice)
        kind, batch, done, _ = inflight
        result = results[-1] if results else None
        if result is None or result.status != pq.ExecStatus.TUPLES_OK:
            self._failed(kind, batch, done, result)
            return
        # the claims tag their rows ('c'laim, 'f'inish, 'x': the claimer is failed); the
        # finish alone returns (task id, token)
        rows = [
            tuple(result.get_value(row, col) for col in range(result.nfields))
            for row in range(result.ntuples)
        ]
        if kind == "finish":
            rows = [(b"f", *row) for row in rows]
        tokens, accepted = claims_from_rows([req.id for req in batch], rows)
        self.gate._done_written()
        self._release(batch, tokens)
        stale = [c for c in done if c.token >= 0 and (c.task_id, c.token) not in accepted]
        if stale:
            dbthread.submit(lambda: self.gate._report_stale(stale, set()))

    def _failed(self, kind: str, batch: list[Request], done: list[Relayed], result: Any) -> None:
        from psycopg import pq

        message = (
            result.error_message.decode(errors="replace") if result is not None else "no result"
        )
        sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE) if result is not None else None
        if sqlstate == INVALID_STATEMENT_NAME.encode() and self.prepared:
            logger.warning(
                "worker_health: the database refused a prepared statement (a connection "
                "pooler in transaction mode?); running unprepared from now on. Set "
                "OPTIONS['prepare_threshold'] = None to say so."
            )
            self.prepared = False
            self.gate._pending.extendleft(reversed(batch))
            for req in batch:
                self.gate.held.pop(req.id, None)
            self.gate._requeue_done(done)
            self.kick()
            return
        if self.raw is None or self.raw.pgconn.status != pq.ConnStatus.OK:
            self.inflight = (kind, batch, done, time.monotonic())
            self._lost(message)
            return
        # The statement failed, the connection did not (a bug, a message the database
        # cannot store): the claims run untracked, the completions are tried again.
        logger.error("worker_health: the claim gate's statement failed: %s", message)
        self.gate._requeue_done(done)
        self._release(batch, {})

    def _release(self, batch: list[Request], tokens: dict[str, int | None]) -> None:
        from .gate import UNTRACKED

        claimed_at = time.monotonic()
        gate = self.gate
        for req in batch:
            if gate._closing:
                return  # shutdown: nothing more goes to the pool; these are handed back
            gate._dispatch(req, tokens.get(req.id, UNTRACKED) if tokens else UNTRACKED, claimed_at)

    # -- shutdown -----------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """The loop has stopped: finish the statement in flight (waiting for it here), and
        stop. What is left goes back to the gate (its thread takes over)."""
        if self.closed:
            return
        self.closed = True
        if self.inflight is not None and self.raw is not None:
            pgconn = self.raw.pgconn
            deadline = time.monotonic() + timeout
            try:
                while pgconn.flush():
                    select.select([], [pgconn.socket], [], max(0.0, deadline - time.monotonic()))
                while self.inflight is not None and time.monotonic() < deadline:
                    select.select([pgconn.socket], [], [], max(0.0, deadline - time.monotonic()))
                    self._on_readable()
            except Exception as exc:
                self._lost(exc)
        if self.inflight is not None:  # no answer in time: as if the connection broke
            _, batch, done, _ = self.inflight
            self.inflight = None
            self.gate._requeue_done(done)
            for req in batch:
                self.gate.held[req.id] = req  # claimed or not: handed back as held
        self._drop_connection()
