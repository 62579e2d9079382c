"""The demo's child processes: celery workers, celery beat and the admin server.

Each child runs in a session (and so a process group) of its own: a SIGKILL of the group
takes a prefork worker's pool processes with it, and Ctrl-C in the terminal reaches only
the demo, which then stops its children in order. The process group ids are written to a
file so that a later run can end what a crashed run left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    """One child process and its log file."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.popen.pid

    def start(self, *, cwd: Path, env: Mapping[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def kill_group(self) -> None:
        """SIGKILL the child and every process it started (its process group)."""
        if self.popen is None:
            return
        _kill_group(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def terminate(self) -> None:
        """Ask the child to stop (a warm shutdown for celery)."""
        if self.alive():
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)

    def reap(self, deadline: float) -> bool:
        """Wait until ``deadline`` (monotonic) for the child to exit; SIGKILL its group if it
        did not, and in any case SIGKILL what is left of its group. True if it exited."""
        if self.popen is None:
            return True
        exited = True
        try:
            self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            exited = False
        # Pool processes left behind by the main process (or everything, on a timeout).
        _kill_group(self.popen.pid, signal.SIGKILL)
        if not exited:
            self.popen.wait(10)
        return exited

    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-chars:]


def _kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_all(children: Iterable[Child], timeout: float = 20.0) -> list[str]:
    """SIGTERM every child at once, wait up to ``timeout`` s, then SIGKILL the stragglers.
    Returns the names of the children that had to be killed."""
    children = [c for c in children if c.popen is not None]
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout
    return [child.name for child in children if not child.reap(deadline)]


# --------------------------------------------------------------------------------------------
# what a previous run left behind


def write_pid_file(path: Path, children: Iterable[Child]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({c.name: c.pid for c in children if c.popen is not None}, indent=1))


def _group_members(pgid: int) -> list[int]:
    """Pids in process group ``pgid``, from ``/proc`` (empty where there is none)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid):
            members.append(int(stat.parent.name))
    return members


def _looks_like_ours(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"example_project" in cmdline or b"runserver" in cmdline


def end_leftovers(path: Path) -> list[str]:
    """SIGKILL the process groups of a previous run that are still alive."""
    try:
        pids: dict[str, int] = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    ended = []
    for name, pid in pids.items():
        # Only a group we can identify as a demo child's is killed (this needs ``/proc``):
        # its leader may be gone while its pool processes live on.
        if not isinstance(pid, int) or not any(map(_looks_like_ours, _group_members(pid))):
            continue
        if _kill_group(pid, signal.SIGKILL):
            ended.append(name)
    path.unlink(missing_ok=True)
    return ended
