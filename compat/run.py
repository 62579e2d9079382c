"""The compatibility gate: Celery's integration suite, plain and with worker_health.

    python -m compat.run                      # full test_tasks.py + test_canvas.py (tox env)
    python -m compat.run --ci --parallel      # CI's selection, both runs side by side
    python -m compat.run --write-docs         # also refresh docs/compatibility.md
    python -m compat.run -k test_chord        # any pytest -k expression

1. downloads the sdist of the *installed* Celery (``pip download --no-deps --no-binary
   :all:``) into ``.compat-cache/`` and extracts its ``t/`` folder and ``pyproject.toml``
   (pytest's configuration: markers, ``xfail_strict``);
2. runs the selected files twice against the local Redis (broker and result backend):
   plain, and with worker_health (``-p compat.plugin``); each run writes its outcomes as JSON
   (``-p compat.harness``);
3. compares them test by test. Exit status 1 when a test passes plain and fails, errors,
   hangs, is skipped or never finishes with worker_health (and fails again when run once
   more with worker_health: Celery's suite has races of its own), or when worker_health did
   not track the run; 2 when the gate could not run at all.

Tests that fail in both runs (environment-dependent ones), the known differences of
:mod:`compat.known` and the tests CI leaves out are listed in the report, never dropped.

Environment: ``COMPAT_REDIS_URL`` (default ``redis://127.0.0.1:6379``; the gate uses and
flushes only its own database numbers, see ``--redis-dbs``), ``COMPAT_REDIS_DBS`` and
``COMPAT_DATABASE_URL`` (PostgreSQL, default ``postgres://root@127.0.0.1:5432/wh_compat``,
dropped and created afresh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .known import KNOWN_DIFFERENCES, known_reason, race_reason

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".compat-cache"
DOCS = ROOT / "docs" / "compatibility.md"
FILES = ("t/integration/test_tasks.py", "t/integration/test_canvas.py")

#: CI's selection of test_canvas.py: the chain, group and chord classes (the canvas
#: primitives worker_health must not disturb). Left to the tox env: test_link_error,
#: test_result_set, test_signature_serialization, test_stamping_mechanism.
CI_CANVAS_SELECTION = ("test_chain", "test_group", "test_chord")

_CHORD = "t/integration/test_canvas.py::test_chord::"
#: tests of CI's selection left to the tox env because of their cost, with the reason; the
#: report lists them (with the known differences, also left out of CI: they fail by waiting
#: for Celery's 60 s result timeouts)
CI_LEFT_OUT: dict[str, str] = {
    _CHORD + "test_disabling_flag_allow_error_cb_on_chord_header": (
        "70-140 s: seven chords, each waiting for errbacks that must not come"
    ),
    _CHORD + "test_enabling_flag_allow_error_cb_on_chord_header": "about 85 s, as above",
    _CHORD + "test_flag_allow_error_cb_on_chord_header_on_upgraded_chord": "about 70 s, as above",
    _CHORD + "test_error_propagates_from_chord": (
        "an xfail of Celery's that waits for its 60 s result timeout"
    ),
}

RUNS = ("plain", "worker_health")
#: outcomes that count as passing; anything else (failed, error, missing) is a failure
PASSING = frozenset({"passed", "skipped", "xfailed", "xpassed"})

RESULTS_START = "<!-- compat:results:start -->"
RESULTS_END = "<!-- compat:results:end -->"


def log(message: str) -> None:
    print(f"[compat] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Celery's suite


def celery_version() -> str:
    return metadata.version("celery")


def fetch_suite(version: str, cache: Path = CACHE) -> Path:
    """The extracted ``t/`` of Celery ``version``'s sdist (downloaded once, then cached)."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"celery-{version}"
    stamp = target / ".complete"
    if stamp.exists():
        return target
    sdist = cache / f"celery-{version}.tar.gz"
    if not sdist.exists():
        log(f"downloading the sdist of celery {version}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"celery=={version}",
                "-d",
                str(cache),
            ],
            check=True,
        )
    if not sdist.exists():
        raise SystemExit(f"pip download did not produce {sdist}")
    prefix = f"celery-{version}/"
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(prefix + "t/") or m.name == prefix + "pyproject.toml"
        ]
        # Only the tests: the sdist's own ``celery/`` package must not shadow the installed one.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(cache, members=members, filter="data")
        else:  # Python < 3.10.12 / 3.11.4: no extraction filters
            tar.extractall(cache, members=members)
    stamp.write_text(version)
    return target


def pytest_celery_plugin_args() -> list[str]:
    """Celery's fixtures (``celery_session_worker``...) come from ``celery.contrib.pytest``,
    registered by pytest-celery's entry point when that is installed, else loaded here."""
    for ep in metadata.entry_points(group="pytest11"):
        if ep.value.startswith(("celery.contrib.pytest", "pytest_celery")):
            return []
    return ["-p", "celery.contrib.pytest"]


# --------------------------------------------------------------------------------------------
# one run


@dataclass
class RunConfig:
    name: str
    suite: Path
    out: Path
    targets: list[str]
    redis_url: str
    redis_dbs: tuple[int, int, int]
    test_timeout: float
    session_timeout: float
    keyword: str | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def report(self) -> Path:
        return self.out / f"{self.name}.json"

    @property
    def logfile(self) -> Path:
        return self.out / f"{self.name}.log"

    def redis(self, index: int) -> str:
        return f"{self.redis_url.rstrip('/')}/{self.redis_dbs[index]}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *self.targets,
            *pytest_celery_plugin_args(),
            "-p",
            "no:django",  # pytest-django would block the database outside django_db tests
            "-p",
            "no:cacheprovider",
            "-p",
            "compat.harness",
        ]
        if self.name.startswith("worker_health"):
            cmd += ["-p", "compat.plugin"]
        cmd += [
            f"--compat-run={self.name}",
            f"--compat-report={self.report}",
            f"--compat-helper-redis={self.redis(2)}",
            f"--compat-test-timeout={self.test_timeout:g}",
            f"--timeout={self.test_timeout:g}",
            "--timeout-method=signal",
            # a test that timed out is not run again (it would hang again)
            r"--rerun-except=Timeout \(>",
            "-q",
            "-rfE",
            "--color=no",
        ]
        if self.keyword:
            cmd += ["-k", self.keyword]
        return cmd + self.extra_args

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TEST_BROKER"] = self.redis(0)
        env["TEST_BACKEND"] = self.redis(1)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("DJANGO_SETTINGS_MODULE", None)  # the plugin configures Django itself
        return env


def flush_redis(config: RunConfig) -> None:
    """Empty the run's own Redis databases (and only those)."""
    import redis

    for index in range(3):
        client = redis.Redis.from_url(config.redis(index), socket_connect_timeout=5)
        client.flushdb()
        client.close()


def run_pytest(config: RunConfig) -> dict[str, Any]:
    """Run Celery's suite once; return its JSON report (with the run's own status)."""
    config.out.mkdir(parents=True, exist_ok=True)
    config.report.unlink(missing_ok=True)
    flush_redis(config)
    cmd = config.command()
    log(f"{config.name}: {shlex.join(cmd[1:])}")
    log(f"{config.name}: output in {config.logfile}")
    started = time.monotonic()
    timed_out = False
    with config.logfile.open("w") as logfile:
        proc = subprocess.Popen(
            cmd,
            cwd=config.suite,
            env=config.env(),
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _live.add(proc)
        try:
            rc = proc.wait(timeout=config.session_timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            log(f"{config.name}: still running after {config.session_timeout:.0f}s: stopping it")
            rc = stop(proc)
        except BaseException:
            stop(proc)
            raise
        finally:
            _live.discard(proc)
    took = time.monotonic() - started
    with contextlib.suppress(Exception):  # tidy only: the next run flushes them anyway
        flush_redis(config)
    try:
        report: dict[str, Any] = json.loads(config.report.read_text())
    except (OSError, ValueError) as exc:
        report = {"tests": {}, "error": f"no report from pytest ({exc})"}
    report["returncode"] = rc
    report["session_timed_out"] = timed_out
    report["wall_time"] = round(took, 1)
    log(f"{config.name}: exit {rc} after {took:.0f}s: {counts_text(report)}")
    if rc not in (0, 1) or timed_out:
        tail = config.logfile.read_text(errors="replace").splitlines()[-40:]
        print("\n".join(tail), flush=True)
    return report


#: pytest processes running now (each the leader of its own process group)
_live: set[subprocess.Popen[Any]] = set()


def _on_terminate(signum: int, _frame: Any) -> None:
    """SIGTERM (CI's ``timeout``): stop the runs, whose process groups are not ours."""
    for proc in list(_live):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit(128 + signum)


def stop(proc: subprocess.Popen[Any]) -> int:
    """Stop pytest and the worker processes it forked (its own process group)."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


# --------------------------------------------------------------------------------------------
# comparison


@dataclass
class Comparison:
    plain: dict[str, Any]
    worker_health: dict[str, Any]
    #: pass plain, fail / error / hang / skip / never finish with worker_health
    regressions: list[str] = field(default_factory=list)
    #: fail (error, ...) in both runs
    failing_in_both: list[str] = field(default_factory=list)
    #: any other change of outcome (e.g. fails plain, passes with worker_health)
    other_differences: list[str] = field(default_factory=list)
    #: passed in both, but needed reruns with worker_health only
    reruns_with_worker_health: list[str] = field(default_factory=list)
    #: regressions listed in compat/known.py: diagnosed, fix pending (reason by test)
    known_differences: dict[str, str] = field(default_factory=dict)
    #: regressions (or the reverse) on tests listed in CELERY_RACES: decided by a race inside
    #: Celery, they do not fail the gate (reason by test)
    celery_races: dict[str, str] = field(default_factory=dict)
    #: entries of compat/known.py that passed with worker_health this time
    known_not_reproduced: list[str] = field(default_factory=list)
    #: failed with worker_health, then passed when run again with worker_health (Celery's
    #: suite has races of its own: these are listed, and do not fail the gate)
    flaky_with_worker_health: dict[str, str] = field(default_factory=dict)
    #: why the gate cannot trust the worker_health run (it tracked nothing, ...)
    problems: list[str] = field(default_factory=list)

    @property
    def green(self) -> bool:
        return not self.regressions and not self.problems


def outcome(report: dict[str, Any], nodeid: str) -> str:
    entry = report.get("tests", {}).get(nodeid)
    return "absent" if entry is None else str(entry["outcome"])


def compare(plain: dict[str, Any], wh: dict[str, Any]) -> Comparison:
    result = Comparison(plain, wh)
    nodeids = sorted(set(plain.get("tests", {})) | set(wh.get("tests", {})))
    for nodeid in nodeids:
        before, after = outcome(plain, nodeid), outcome(wh, nodeid)
        if before in PASSING:
            if after not in PASSING or (before == "passed" and after != "passed"):
                result.regressions.append(nodeid)
            elif after != before:
                result.other_differences.append(nodeid)
            elif reruns(wh, nodeid) > reruns(plain, nodeid):
                result.reruns_with_worker_health.append(nodeid)
        elif after in PASSING:
            result.other_differences.append(nodeid)
        else:
            result.failing_in_both.append(nodeid)
    for nodeid in nodeids:
        reason = known_reason(nodeid)
        if reason is None:
            continue
        if nodeid in result.regressions:
            result.regressions.remove(nodeid)
            result.known_differences[nodeid] = reason
        elif outcome(wh, nodeid) in PASSING:
            result.known_not_reproduced.append(nodeid)
    for nodeid in nodeids:
        reason = race_reason(nodeid)
        if reason is None:
            continue
        for differences in (result.regressions, result.other_differences):
            if nodeid in differences:
                differences.remove(nodeid)
                result.celery_races[nodeid] = reason
    if not nodeids:
        result.problems.append("no test ran")
    result.problems += worker_health_problems(wh)
    return result


def confirm(result: Comparison, config: RunConfig, attempts: int) -> None:
    """Run each regression again with worker_health, alone; one that passes now is flaky
    (a race in Celery's suite that the first run lost), not a regression."""
    for attempt in range(1, attempts + 1):
        if not result.regressions:
            return
        config.name = f"worker_health-confirm{attempt}"
        config.targets = list(result.regressions)
        config.keyword = None
        report = run_pytest(config)
        for nodeid in list(result.regressions):
            now = outcome(report, nodeid)
            if now in PASSING:
                result.regressions.remove(nodeid)
                result.flaky_with_worker_health[nodeid] = (
                    f"{describe(result.worker_health, nodeid)}; then {now} in {config.name}"
                )


def reruns(report: dict[str, Any], nodeid: str) -> int:
    return int(report.get("tests", {}).get(nodeid, {}).get("reruns", 0))


def worker_health_problems(report: dict[str, Any]) -> list[str]:
    """A green gate means nothing unless worker_health really saw the suite's tasks."""
    problems = []
    inits = report.get("worker_inits") or []
    if not inits:
        problems.append("worker_health run: worker_init was never sent (no worker started?)")
    elif not all(i.get("tasks_hooked") for i in inits):
        problems.append("worker_health run: a worker started without worker_health's hooks")
    summary = report.get("worker_health") or {}
    if "error" in summary:
        problems.append(f"worker_health run: no summary ({summary['error']})")
    elif not summary.get("tasks_total") or not summary.get("claims"):
        problems.append("worker_health run: worker_health recorded no task at all")
    return problems


# --------------------------------------------------------------------------------------------
# reporting


def counts_text(report: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for entry in report.get("tests", {}).values():
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
    total = sum(counts.values())
    reruns_total = sum(int(e.get("reruns", 0)) for e in report.get("tests", {}).values())
    parts = [f"{n} {k}" for k, n in sorted(counts.items())]
    return f"{total} tests: " + ", ".join(parts) + f" ({reruns_total} reruns)"


def short_id(nodeid: str) -> str:
    return nodeid.removeprefix("t/integration/")


def describe(report: dict[str, Any], nodeid: str) -> str:
    entry = report.get("tests", {}).get(nodeid) or {"outcome": "absent"}
    text = str(entry["outcome"])
    if entry.get("timeout"):
        text += " (timeout)"
    if entry.get("reruns"):
        text += f" after {entry['reruns']} rerun(s)"
    message = entry.get("message")
    if message and entry["outcome"] not in PASSING:
        text += f": {message}"
    return text


def markdown(
    result: Comparison, command: str, selection: str, left_out: dict[str, str] | None = None
) -> str:
    plain, wh = result.plain, result.worker_health
    lines = [
        f"Celery **{plain.get('celery', '?')}**, Python {plain.get('python', '?')}; "
        f"selection: {selection}.",
        "",
        "| run | tests | outcomes | reruns | time |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for name, report in (("plain", plain), ("worker_health", wh)):
        tests = report.get("tests", {})
        counts: dict[str, int] = {}
        for entry in tests.values():
            counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
        reruns_total = sum(int(e.get("reruns", 0)) for e in tests.values())
        outcomes = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        lines.append(
            f"| {name} | {len(tests)} | {outcomes} | {reruns_total} | "
            f"{report.get('wall_time', '?')} s |"
        )
    lines += ["", f"**Gate: {'green' if result.green else 'RED'}.**", ""]
    lines.append(
        f"### Tests that pass plain and not with worker_health ({len(result.regressions)})"
    )
    lines.append("")
    if not result.regressions:
        lines.append("None.")
    for nodeid in result.regressions:
        lines.append(
            f"- `{short_id(nodeid)}`: plain {describe(plain, nodeid)}; "
            f"worker_health {describe(wh, nodeid)}"
        )
        for event in wh.get("tests", {}).get(nodeid, {}).get("worker_health_events", [])[:5]:
            lines.append(f"  - worker_health event: {event['kind']} {event.get('task_id', '')}")
    for problem in result.problems:
        lines.append(f"- {problem}")
    lines += [
        "",
        f"### Known differences, fix pending ({len(result.known_differences)})",
        "",
        "Listed in `compat/known.py`; they run in both runs and do not fail the gate.",
        "",
    ]
    if not result.known_differences:
        lines.append("None.")
    for nodeid, reason in result.known_differences.items():
        lines.append(
            f"- `{short_id(nodeid)}`: plain {describe(plain, nodeid)}; "
            f"worker_health {describe(wh, nodeid)}. Why: {reason}"
        )
    for nodeid in result.known_not_reproduced:
        lines.append(
            f"- `{short_id(nodeid)}` is in `compat/known.py` but passed with worker_health: "
            "remove it once the fix is in."
        )
    if result.celery_races:
        lines += [
            "",
            f"### Decided by a race inside Celery ({len(result.celery_races)})",
            "",
            "Listed in `compat/known.py` (`CELERY_RACES`); they run in both runs, and an "
            "outcome that differs does not fail the gate.",
            "",
        ]
        for nodeid, reason in result.celery_races.items():
            lines.append(
                f"- `{short_id(nodeid)}`: plain {describe(plain, nodeid)}; "
                f"worker_health {describe(wh, nodeid)}. Why: {reason}"
            )
    lines += [
        "",
        f"### Tests that fail in both runs ({len(result.failing_in_both)})",
        "",
    ]
    if not result.failing_in_both:
        lines.append("None.")
    for nodeid in result.failing_in_both:
        lines.append(f"- `{short_id(nodeid)}`: {describe(plain, nodeid)}")
    lines += ["", f"### Other differences ({len(result.other_differences)})", ""]
    if not result.other_differences:
        lines.append("None.")
    for nodeid in result.other_differences:
        lines.append(
            f"- `{short_id(nodeid)}`: plain {describe(plain, nodeid)}; "
            f"worker_health {describe(wh, nodeid)}"
        )
    if result.flaky_with_worker_health:
        lines += [
            "",
            "### Failed once with worker_health, passed when run again (flaky)",
            "",
        ]
        for nodeid, text in result.flaky_with_worker_health.items():
            lines.append(f"- `{short_id(nodeid)}`: plain {describe(plain, nodeid)}; {text}")
    if result.reruns_with_worker_health:
        lines += [
            "",
            "### Passed in both, with more reruns with worker_health",
            "",
        ]
        for nodeid in result.reruns_with_worker_health:
            lines.append(
                f"- `{short_id(nodeid)}`: plain {describe(plain, nodeid)}; "
                f"worker_health {describe(wh, nodeid)}"
            )
    if left_out:
        lines += ["", f"### Left out of this selection ({len(left_out)})", ""]
        for nodeid, reason in left_out.items():
            lines.append(f"- `{short_id(nodeid)}`: {reason}")
    summary = wh.get("worker_health") or {}
    if summary and "error" not in summary:
        lines += [
            "",
            "### What worker_health recorded in its run",
            "",
            f"- tasks: {summary.get('tasks_total')} ({_pairs(summary.get('tasks', {}))}), "
            f"{summary.get('task_names')} task names, {summary.get('claims')} claims",
            f"- workers: {_pairs(summary.get('workers', {}))}",
            f"- events: {_pairs(summary.get('events', {}))}",
        ]
    lines += ["", "Reproduce:", "", "```", command, "```"]
    return "\n".join(lines) + "\n"


def _pairs(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in mapping.items()) or "none"


def write_docs(text: str, path: Path = DOCS) -> None:
    """Replace the results block of ``docs/compatibility.md`` (the prose around it stays)."""
    current = path.read_text() if path.exists() else f"{RESULTS_START}\n{RESULTS_END}\n"
    head, sep, rest = current.partition(RESULTS_START)
    _, sep2, tail = rest.partition(RESULTS_END)
    if not sep or not sep2:
        raise SystemExit(f"{path}: the markers {RESULTS_START} / {RESULTS_END} are missing")
    path.write_text(f"{head}{RESULTS_START}\n{text}{RESULTS_END}{tail}")


# --------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m compat.run", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--ci",
        action="store_true",
        help="CI's selection: all of test_tasks.py, the chain/group/chord tests of test_canvas.py",
    )
    parser.add_argument("-k", dest="keyword", help="pytest -k expression for both runs")
    parser.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="which runs (default: plain,worker_health); a single run only writes its report",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=CACHE / "results",
        help="reports and logs (default: %(default)s)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("COMPAT_REDIS_URL", "redis://127.0.0.1:6379"),
        help="Redis server, without a database number (default: %(default)s)",
    )
    parser.add_argument(
        "--redis-dbs",
        default=os.environ.get("COMPAT_REDIS_DBS", "9,10,11"),
        help="database numbers of the broker, the result backend and the suite's helper "
        "keys, flushed before each run (default: %(default)s); with --parallel, three more "
        "for the worker_health run (default: the next three)",
    )
    parser.add_argument(
        "--test-timeout", type=float, default=120.0, help="seconds per test (default 120)"
    )
    parser.add_argument(
        "--session-timeout",
        type=float,
        default=3600.0,
        help="seconds per run, after which it is stopped (default 3600)",
    )
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="run plain and worker_health side by side (the worker_health run then uses "
        "three Redis databases of its own, see --redis-dbs)",
    )
    parser.add_argument(
        "--confirm",
        type=int,
        default=1,
        help="run each regression again this many times with worker_health; one that "
        "passes is reported as flaky, not failing (default 1; 0 = no second chance)",
    )
    parser.add_argument(
        "--write-docs", action="store_true", help=f"refresh the results in {DOCS.name}"
    )
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_terminate)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in RUNS for r in runs):
        raise SystemExit(f"--runs: choose from {', '.join(RUNS)}")
    dbs = tuple(int(x) for x in args.redis_dbs.split(","))
    if len(dbs) == 3:
        dbs = (*dbs, dbs[0] + 3, dbs[1] + 3, dbs[2] + 3)
    if len(dbs) != 6:
        raise SystemExit("--redis-dbs: three database numbers (e.g. 9,10,11), or six")
    version = celery_version()
    try:
        suite = fetch_suite(version)
    except (subprocess.CalledProcessError, OSError, tarfile.TarError) as exc:
        log(f"could not fetch Celery {version}'s test suite: {exc}")
        return 2
    targets = list(FILES)
    keyword = args.keyword
    selection = (
        "of `test_tasks.py` and `test_canvas.py`"
        if keyword
        else ("all of `test_tasks.py` and `test_canvas.py`")
    )
    left_out: dict[str, str] = {}
    if args.ci:
        targets = [FILES[0], *(f"{FILES[1]}::{cls}" for cls in CI_CANVAS_SELECTION)]
        left_out = dict(CI_LEFT_OUT)
        for nodeid, reason in KNOWN_DIFFERENCES.items():
            left_out[nodeid] = "known difference (run by the tox env): " + reason
        selection = (
            "all of `test_tasks.py`; the "
            + ", ".join(f"`{c}`" for c in CI_CANVAS_SELECTION)
            + " classes of `test_canvas.py`"
        )
    if keyword:
        selection = ("" if args.ci else "all tests ") + selection + f" matching `-k {keyword}`"
    log(f"celery {version}: suite in {suite}")
    reports: dict[str, dict[str, Any]] = {}

    def config_for(name: str) -> RunConfig:
        # side by side, the worker_health run uses databases of its own
        first = 3 if args.parallel and name.startswith("worker_health") else 0
        return RunConfig(
            name=name,
            suite=suite,
            out=args.out.resolve(),
            targets=targets,
            redis_url=args.redis_url,
            redis_dbs=(dbs[first], dbs[first + 1], dbs[first + 2]),
            test_timeout=args.test_timeout,
            session_timeout=args.session_timeout,
            keyword=keyword,
            extra_args=[
                *(f"--compat-leave-out={nodeid}" for nodeid in left_out),
                *args.pytest_args,
            ],
        )

    if args.parallel and len(runs) > 1:
        with ThreadPoolExecutor(max_workers=len(runs)) as pool:
            futures = {name: pool.submit(run_pytest, config_for(name)) for name in runs}
            reports = {name: future.result() for name, future in futures.items()}
    else:
        for name in runs:
            reports[name] = run_pytest(config_for(name))
    if len(reports) < 2:
        return 0 if all(r.get("returncode") in (0, 1) for r in reports.values()) else 2
    result = compare(reports["plain"], reports["worker_health"])
    if not result.problems:
        confirm(result, config_for("worker_health"), args.confirm)
    command = "python -m compat.run" + (" --ci" if args.ci else "")
    if args.keyword:
        command += f" -k {shlex.quote(args.keyword)}"
    text = markdown(result, command, selection, left_out)
    (args.out / "report.md").write_text(text)
    (args.out / "comparison.json").write_text(
        json.dumps(
            {
                "green": result.green,
                "regressions": result.regressions,
                "failing_in_both": result.failing_in_both,
                "other_differences": result.other_differences,
                "reruns_with_worker_health": result.reruns_with_worker_health,
                "flaky_with_worker_health": result.flaky_with_worker_health,
                "known_differences": result.known_differences,
                "celery_races": result.celery_races,
                "known_not_reproduced": result.known_not_reproduced,
                "problems": result.problems,
            },
            indent=1,
        )
    )
    print(text, flush=True)
    if args.write_docs:
        write_docs(text)
        log(f"wrote {DOCS.relative_to(ROOT)}")
    if result.green:
        log("gate green: no test passes plain and fails with worker_health")
        return 0
    log(
        f"gate RED: {len(result.regressions)} test(s) pass plain and not with worker_health"
        + (f"; {'; '.join(result.problems)}" if result.problems else "")
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
