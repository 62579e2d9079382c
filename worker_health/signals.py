"""Django signals sent by worker_health. Every receiver gets ``sender`` (the model class) and
the keyword arguments listed. Receivers run after the database change was committed; an
exception in a receiver is logged and never interrupts detection or reclamation."""

from __future__ import annotations

from django.dispatch import Signal

#: a worker started: ``worker`` (WorkerRegistry), ``restarted`` (bool)
worker_registered = Signal()
#: the detector declared a worker dead: ``worker``, ``last_heartbeat``
worker_failed = Signal()
#: a worker declared failed (or marked offline) heartbeats again: ``worker``
worker_recovered = Signal()
#: a worker shut down warmly or was drained: ``worker``
worker_offline = Signal()
#: a held task was taken from a dead worker and published again: ``task`` (TaskQueue),
#: ``worker_id`` (the dead holder's name), ``reason``
task_reclaimed = Signal()
#: a task reached WORKER_HEALTH_MAX_RECLAIMS and will not run again: ``task``, ``worker_id``
task_quarantined = Signal()
#: a run that had been reclaimed finished late and was ignored: ``task_id``, ``worker_id``,
#: ``token``, ``state``
stale_completion = Signal()
