"""The package's settings, read lazily as ``WORKER_HEALTH_<NAME>`` on every access.

Reading on access (never at import time) keeps ``override_settings`` and pytest-django's
``settings`` fixture working, and never mutates the user's settings. Values are validated
by the system checks in :mod:`worker_health.checks`; the accessors here return the values
as numbers and raise ``ImproperlyConfigured`` only if a check was skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured

PREFIX = "WORKER_HEALTH_"
_UNSET = object()

DEFAULT_HEARTBEAT_INTERVAL = 30.0
DEFAULT_MAX_RECLAIMS = 3
DEFAULT_RETENTION = timedelta(days=7)


def positive_number(value: Any) -> float | None:
    """Return ``value`` as a float if it is a finite number > 0, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        return None
    return number


class Settings:
    """Typed view over the ``WORKER_HEALTH_*`` Django settings."""

    def raw(self, name: str, default: Any = _UNSET) -> Any:
        """The user's value for ``WORKER_HEALTH_<name>``, or ``default``."""
        return getattr(django_settings, PREFIX + name, default)

    def is_set(self, name: str) -> bool:
        return self.raw(name) is not _UNSET

    def _seconds(self, name: str, default: float) -> float:
        value = self.raw(name, default)
        number = positive_number(value)
        if number is None:
            raise ImproperlyConfigured(
                f"{PREFIX}{name} must be a positive number of seconds, got {value!r}"
            )
        return number

    @property
    def HEARTBEAT_INTERVAL(self) -> float:
        """Seconds between two heartbeats of a worker."""
        return self._seconds("HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL)

    @property
    def STALE_AFTER(self) -> float:
        """Seconds without a heartbeat (by the database's clock) after which a worker failed."""
        return self._seconds("STALE_AFTER", 2 * self.HEARTBEAT_INTERVAL)

    @property
    def CHECK_INTERVAL(self) -> float:
        """Seconds between two detector sweeps."""
        return self._seconds("CHECK_INTERVAL", self.HEARTBEAT_INTERVAL)

    @property
    def BEAT_SCHEDULE(self) -> bool:
        """Whether the detector and the pruner are added to celery beat's schedule."""
        return bool(self.raw("BEAT_SCHEDULE", True))

    @property
    def MAX_RECLAIMS(self) -> int:
        """How many times one task may be reclaimed before it is quarantined."""
        value = self.raw("MAX_RECLAIMS", DEFAULT_MAX_RECLAIMS)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ImproperlyConfigured(
                f"{PREFIX}MAX_RECLAIMS must be a whole number >= 0, got {value!r}"
            )
        return value

    @property
    def TRACK_TASKS(self) -> tuple[str, ...] | None:
        """Task-name patterns / queue names to track; ``None`` means every task."""
        value = self.raw("TRACK_TASKS", None)
        if value is None or value == "__all__":
            return None
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ImproperlyConfigured(
                f"{PREFIX}TRACK_TASKS must be None, '__all__' or a list of task-name "
                f"patterns / queue names, got {value!r}"
            )
        return tuple(str(item) for item in value)

    @property
    def RETENTION(self) -> timedelta:
        """How long finished task rows and events are kept."""
        value = self.raw("RETENTION", DEFAULT_RETENTION)
        if isinstance(value, timedelta):
            seconds = value.total_seconds()
        else:
            seconds = positive_number(value) or 0.0
        if seconds <= 0:
            raise ImproperlyConfigured(
                f"{PREFIX}RETENTION must be a positive timedelta or number of seconds, "
                f"got {value!r}"
            )
        return timedelta(seconds=seconds)

    @property
    def OUTAGE_GAP(self) -> float:
        """A pause in detector sweeps longer than this restarts every worker's grace period.

        See "Outage guard" in the README: after the database (or every detector) was
        unreachable for longer than ``STALE_AFTER``, no worker is failed until the detector
        has again watched it for a full ``STALE_AFTER``.
        """
        return self.STALE_AFTER

    @property
    def HEARTBEAT_RETRY_MAX(self) -> float:
        """Longest wait between two heartbeat attempts while the database is unreachable."""
        return max(0.05, min(self.HEARTBEAT_INTERVAL / 2, 2.0))


settings = Settings()
