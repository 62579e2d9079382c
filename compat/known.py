"""Known differences: tests that pass plain and not with worker_health, for a diagnosed
reason whose fix is pending in worker_health.

They still run in both runs; the report lists them with their reason (they are not
dropped), and the gate stays green for them only. An entry that no longer reproduces is
reported too, so it can be removed. A key is a test's node id, without parameters to cover
all of them (``...::test_x`` matches ``...::test_x[a]``).
"""

from __future__ import annotations

#: a finished task id published again by the application is skipped as a duplicate
#: delivery (the suite re-sends a signature whose ids a first ``delay()`` froze); the fix
#: belongs to ``TaskQuerySet.record_published`` (see docs/compatibility.md)
REPUBLISHED_FINISHED_ID = (
    "a task id that already finished is published again by the application (a chain "
    "signature reused after its first run): Celery runs it again, worker_health skips it as "
    "a duplicate delivery, so the errback never runs. Pending fix in "
    "TaskQuerySet.record_published: a publish re-opens a finished row (docs/compatibility.md)."
)

KNOWN_DIFFERENCES: dict[str, str] = {
    "t/integration/test_canvas.py::test_chord::test_mutable_errback_called_by_chord_from_chain": (
        REPUBLISHED_FINISHED_ID
    ),
    "t/integration/test_canvas.py::test_chord::test_mutable_errback_called_by_chord_from_chain_tail": (  # noqa: E501
        REPUBLISHED_FINISHED_ID
    ),
    "t/integration/test_canvas.py::test_chord::test_mutable_errback_called_by_chord_from_group": (
        REPUBLISHED_FINISHED_ID
    ),
}


def known_reason(nodeid: str) -> str | None:
    """The reason ``nodeid`` is a known difference, or ``None``."""
    for key, reason in KNOWN_DIFFERENCES.items():
        if nodeid == key or nodeid.startswith(key + "["):
            return reason
    return None
