"""pytest plugin loaded in both runs of the gate (``-p compat.harness``).

* writes every test's final outcome to a JSON report, after each test, so a run that is
  killed still tells which tests finished and which never did (``missing``);
* runs the known differences (:mod:`compat.known`) once, without Celery's reruns;
* caps each test's timeout (Celery marks some tests ``timeout=300`` with five reruns: one
  hang would cost half an hour) and never reruns a test that timed out, so a hang is a
  failure, not a stuck CI;
* sends the Redis keys that Celery's test helpers write (``get_redis_connection()``, database
  0 of localhost by default) to a database of the gate's own, without the 5 s socket
  timeout that redis-py 8 gives a connection by default (the suite blocks on BLPOP for
  up to 60 s).

The run with worker_health adds :mod:`compat.plugin` on top; it annotates tests through
:func:`annotate` and the session through :func:`session_extra`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

TIMEOUT_MESSAGE = "Timeout (>"
#: outcomes that count as "the test passed"
PASSING = frozenset({"passed", "xfailed", "skipped"})

_annotations_key = pytest.StashKey[dict[str, dict[str, Any]]]()
_extra_key = pytest.StashKey[dict[str, Any]]()


def annotate(config: pytest.Config, nodeid: str, **data: Any) -> None:
    """Attach data to a test's entry in the report (e.g. what worker_health saw)."""
    config.stash.setdefault(_annotations_key, {}).setdefault(nodeid, {}).update(data)


def session_extra(config: pytest.Config) -> dict[str, Any]:
    """Session-level data written to the report's top level."""
    return config.stash.setdefault(_extra_key, {})


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("compat", "compatibility gate")
    group.addoption("--compat-report", default=None, help="write outcomes as JSON here")
    group.addoption("--compat-run", default="plain", help="name of this run in the report")
    group.addoption(
        "--compat-test-timeout",
        type=float,
        default=180.0,
        help="upper bound of any test's timeout, seconds (default 180)",
    )
    group.addoption(
        "--compat-leave-out",
        action="append",
        default=[],
        metavar="NODEID",
        help="deselect this test (and its parametrizations; unlike --deselect, not every "
        "node id it is a prefix of)",
    )
    group.addoption(
        "--compat-helper-redis",
        default=os.environ.get("COMPAT_HELPER_REDIS_URL"),
        help="Redis URL for the keys of Celery's test helpers (get_redis_connection)",
    )


class Outcomes:
    """Final outcome of every test, written to JSON as the run goes."""

    def __init__(self, config: pytest.Config, path: Path) -> None:
        self.config = config
        self.path = path
        self.started = time.time()
        self.tests: dict[str, dict[str, Any]] = {}
        self._attempt: dict[str, dict[str, pytest.TestReport]] = {}
        self._subtest_failures: dict[str, list[str]] = {}
        self._reruns: dict[str, list[str]] = {}
        self._durations: dict[str, float] = {}
        self._rerun_pending: set[str] = set()
        self.exitstatus: int | None = None

    # -- hooks --------------------------------------------------------------------------------
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            self.tests[item.nodeid] = {"outcome": "missing", "reruns": 0, "duration": 0.0}
        self.write()

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        # last: the worker_health plugin annotates the test in its own logfinish
        self.finished(nodeid)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, exitstatus: int) -> None:
        self.exitstatus = int(exitstatus)
        self.write()

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self) -> None:
        # last: the worker_health plugin adds its session summary in its own unconfigure
        self.write()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        nodeid = report.nodeid
        if type(report).__name__ == "SubtestReport":
            if report.failed:
                context = getattr(report, "context", None)
                msg = getattr(context, "msg", None) or ""
                self._subtest_failures.setdefault(nodeid, []).append(
                    f"subtest {msg!r}: {short_message(report)}"
                )
            return
        self._durations[nodeid] = self._durations.get(nodeid, 0.0) + report.duration
        if str(report.outcome) == "rerun":  # set by pytest-rerunfailures
            self._reruns.setdefault(nodeid, []).append(short_message(report))
            self._rerun_pending.add(nodeid)
            return
        if report.when == "setup":
            self._attempt[nodeid] = {}
            self._subtest_failures.pop(nodeid, None)
        self._attempt.setdefault(nodeid, {})[report.when] = report

    def finished(self, nodeid: str) -> None:
        if nodeid in self._rerun_pending:
            # rerunfailures ends each attempt with logfinish: this one will be run again
            self._rerun_pending.discard(nodeid)
            self._attempt.pop(nodeid, None)
            self._subtest_failures.pop(nodeid, None)
            return
        phases = self._attempt.pop(nodeid, {})
        outcome, message = final_outcome(phases)
        subtests = self._subtest_failures.pop(nodeid, [])
        if subtests and outcome == "passed":
            outcome, message = "failed", subtests[0]
        reruns = self._reruns.pop(nodeid, [])
        entry: dict[str, Any] = {
            "outcome": outcome,
            "reruns": len(reruns),
            "duration": round(self._durations.pop(nodeid, 0.0), 2),
        }
        if message:
            entry["message"] = message
        if TIMEOUT_MESSAGE in (message or ""):
            entry["timeout"] = True
        if subtests:
            entry["subtest_failures"] = subtests
        if reruns:
            entry["rerun_messages"] = reruns
        entry.update(self.config.stash.get(_annotations_key, {}).get(nodeid, {}))
        self.tests[nodeid] = entry
        self.write()

    def write(self) -> None:
        import celery

        data = {
            "run": self.config.getoption("compat_run"),
            "celery": celery.__version__,
            "python": sys.version.split()[0],
            "started": self.started,
            "duration": round(time.time() - self.started, 1),
            "exitstatus": self.exitstatus,
            "counts": count(self.tests),
            "tests": self.tests,
            **session_extra(self.config),
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
        tmp.replace(self.path)


def count(tests: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in tests.values():
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
    return dict(sorted(counts.items()))


def final_outcome(phases: dict[str, pytest.TestReport]) -> tuple[str, str]:
    """The outcome of one attempt: passed, failed, error, skipped, xfailed, xpassed."""
    setup, call, teardown = phases.get("setup"), phases.get("call"), phases.get("teardown")
    if setup is None:
        return "missing", ""
    if setup.failed:
        return "error", short_message(setup)
    if setup.skipped:
        return ("xfailed" if hasattr(setup, "wasxfail") else "skipped"), short_message(setup)
    if call is None:
        outcome, message = "missing", "the test never finished its call phase"
    elif call.failed:
        outcome, message = "failed", short_message(call)
    elif call.skipped:
        outcome = "xfailed" if hasattr(call, "wasxfail") else "skipped"
        message = short_message(call)
    else:
        outcome, message = ("xpassed" if hasattr(call, "wasxfail") else "passed"), ""
    if teardown is not None and teardown.failed and outcome in PASSING | {"xpassed"}:
        return "error", "teardown: " + short_message(teardown)
    return outcome, message


def short_message(report: pytest.TestReport) -> str:
    """One line saying why: the exception's message, or the skip/xfail reason."""
    wasxfail = getattr(report, "wasxfail", None)
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2]).removeprefix("Skipped: ")
        return f"xfail: {wasxfail}" if wasxfail else reason
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        text = str(crash.message)
    elif longrepr is None:
        text = str(wasxfail or "")
    else:
        text = str(longrepr).strip().splitlines()[-1] if str(longrepr).strip() else ""
    text = " ".join(text.split())
    return text[:400]


# --------------------------------------------------------------------------------------------
# hooks


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("compat_report")
    if path:
        config.pluginmanager.register(Outcomes(config, Path(path)), "compat-outcomes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from .known import known_reason

    leave_out = config.getoption("compat_leave_out")
    if leave_out:
        left = [item for item in items if matches(item.nodeid, leave_out)]
        if left:
            config.hook.pytest_deselected(items=left)
            items[:] = [item for item in items if item not in left]
    cap = config.getoption("compat_test_timeout")
    default = config.getoption("timeout", None)
    for item in items:
        if known_reason(item.nodeid):
            # a known difference fails the same way each time: no reruns, in either run
            item.add_marker(pytest.mark.flaky(reruns=0), append=False)
        marker = item.get_closest_marker("timeout")
        current: Any = default
        if marker is not None:
            current = marker.args[0] if marker.args else marker.kwargs.get("timeout", default)
        if not current or float(current) > cap:
            item.add_marker(pytest.mark.timeout(cap), append=False)


def matches(nodeid: str, keys: list[str]) -> bool:
    """``nodeid`` is one of ``keys``, or a parametrization of one."""
    return any(nodeid == key or nodeid.startswith(key + "[") for key in keys)


def pytest_collection_finish(session: pytest.Session) -> None:
    redirect_helper_redis(session.config)


def redirect_helper_redis(config: pytest.Config) -> None:
    """Point the suite's ``get_redis_connection()`` at the gate's own Redis database.

    Patched after collection, before the worker (and its forked pool) starts, in every
    module of ``t.integration`` that holds a reference to the function.
    """
    url = config.getoption("compat_helper_redis")
    if not url:
        return
    from redis import StrictRedis

    def get_redis_connection() -> StrictRedis:
        # No socket timeout, as redis-py had before 8.0 (whose default is 5 s): the suite
        # waits on BLPOP for up to 60 s, which a 5 s read timeout turns into failures.
        return StrictRedis.from_url(url, socket_timeout=None)

    for name, module in list(sys.modules.items()):
        if name.startswith("t.integration") and hasattr(module, "get_redis_connection"):
            setattr(module, "get_redis_connection", get_redis_connection)  # noqa: B010
