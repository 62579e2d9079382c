"""``manage.py demo --no-serve`` end to end, on the embedded default (SQLite + kombu's
filesystem transport) in a temporary folder: real workers, one SIGKILLed, the proof."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def demo_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh machine: none of our variables, a folder of its own."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WORKER_HEALTH_", "CELERY_", "DJANGO_", "EXAMPLE_", "DATABASE_URL"))
    }
    env.update(
        EXAMPLE_VAR_DIR=str(tmp_path / "var"),
        EXAMPLE_BROKER_DIR=str(tmp_path / "broker"),
        PYTHONUNBUFFERED="1",
    )
    return env


def logs(tmp_path: Path) -> str:
    parts = []
    for log in sorted((tmp_path / "var" / "demo").glob("*.log")):
        parts.append(f"===== {log.name}\n{log.read_text(errors='replace')[-4000:]}")
    return "\n".join(parts)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - reused by another user's process
        return False
    return True


@pytest.mark.timeout(420)
def test_demo_kills_a_worker_and_every_task_runs_exactly_once(tmp_path: Path) -> None:
    try:
        result = subprocess.run(
            [sys.executable, "manage.py", "demo", "--no-serve"],
            cwd=ROOT,
            env=demo_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=360,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"manage.py demo did not finish:\n{out}\n{logs(tmp_path)}")
    out = result.stdout
    report = f"exit {result.returncode}\n{out}\n{result.stderr}\n{logs(tmp_path)}"

    assert result.returncode == 0, report
    assert re.search(r"^PASS: all 30 tasks ran exactly once", out, re.MULTILINE), report
    assert "FAIL" not in out, report
    assert re.search(r"demo1@\S+: active -> failed [\d.]+ s after the SIGKILL", out), report
    assert '"failed_workers": 1' in out, report  # the health summary's JSON
    assert "all demo processes stopped" in out, report
    assert "Traceback" not in out + result.stderr, report
    assert "database is locked" not in report, report

    # Nothing left running: every process group the demo started is gone.
    pids = [int(pid) for pid in re.findall(r"^\w+\s+pid (\d+)", out, re.MULTILINE)]
    assert len(pids) == 4, report  # three workers and beat
    for pid in pids:
        if group_alive(pid):
            os.killpg(pid, signal.SIGKILL)
            pytest.fail(f"process group {pid} was left running\n{report}")
