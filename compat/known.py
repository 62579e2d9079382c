"""Known differences: tests that pass plain and not with worker_health, for a diagnosed
reason whose fix is pending in worker_health.

They still run in both runs; the report lists them with their reason (they are not
dropped), and the gate stays green for them only. An entry that no longer reproduces is
reported too, so it can be removed. A key is a test's node id, without parameters to cover
all of them (``...::test_x`` matches ``...::test_x[a]``).
"""

from __future__ import annotations

#: none at the moment: the one found (a finished task id published again by the application
#: was skipped as a duplicate delivery) is fixed in TaskQuerySet.record_published.
KNOWN_DIFFERENCES: dict[str, str] = {}


def known_reason(nodeid: str) -> str | None:
    """The reason ``nodeid`` is a known difference, or ``None``."""
    for key, reason in KNOWN_DIFFERENCES.items():
        if nodeid == key or nodeid.startswith(key + "["):
            return reason
    return None
