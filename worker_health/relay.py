"""The completions relay: prefork pool processes hand the end of each run to the gate.

A pool process runs one task at a time, so completions written from there cost one
statement each. Instead the worker's main process opens a pipe before the pool forks, and
a pool process writes each completion into it: one non-blocking ``write`` of a line, never
a database round trip. The gate's thread reads the pipe and writes the completions in the
same statement as the next claims (:meth:`TaskQuerySet.claim_and_finish`).

A line is at most ``PIPE_BUF`` bytes, so writes from several processes never interleave. A
completion that cannot be relayed (the line is too long, or the pipe is full because the
main process is stuck) is written by the pool process itself, as without a relay
(:mod:`.completions`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
from typing import NamedTuple

#: writes of at most this many bytes to a pipe are atomic (POSIX guarantees 512)
MAX_LINE = min(getattr(select, "PIPE_BUF", 512), 4096)
#: separates a line's fields (a line whose fields hold it, or a newline, goes as JSON)
SEP = "\x1f"


class Relayed(NamedTuple):
    task_id: str
    token: int
    status: str
    state: str


class Relay:
    """A pipe from the pool processes to the main process's gate."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        # O_NONBLOCK belongs to the pipe's open file, shared with every forked process
        os.set_blocking(self.write_fd, False)
        self.owner_pid = os.getpid()
        self._tail = b""

    # -- in a pool process --------------------------------------------------------------

    def send(self, task_id: str, token: int, status: str, state: str) -> bool:
        """Relay one completion; ``False``: write it yourself."""
        if os.getpid() == self.owner_pid:
            return False  # not a forked pool process (the threads pool): nothing to gain
        # Fields joined by a separator (a JSON line only for a task id or a state holding
        # it or a newline): this runs once per task in every pool process.
        text = f"{task_id}{SEP}{token}{SEP}{status}{SEP}{state}\n"
        try:
            if text.count(SEP) != 3 or text.count("\n") != 1:
                raise ValueError
            line = text.encode()
        except ValueError:  # (also a lone surrogate, which UTF-8 cannot encode)
            line = json.dumps([task_id, token, status, state], separators=(",", ":")).encode()
            line += b"\n"
        if len(line) > MAX_LINE:
            return False
        try:
            return os.write(self.write_fd, line) == len(line)
        except OSError:  # full (EAGAIN), or closed: the process writes it itself
            return False

    # -- on the gate's thread -----------------------------------------------------------

    def receive(self) -> list[Relayed]:
        """Every completion waiting in the pipe (never blocks)."""
        chunks = [self._tail]
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        lines = data.split(b"\n")
        self._tail = lines.pop()
        out = []
        for line in lines:
            try:
                if b"\x1f" in line:  # never in a JSON line: json escapes control characters
                    task_id, token, status, state = line.decode().split(SEP)
                else:
                    task_id, token, status, state = json.loads(line)
                out.append(Relayed(str(task_id), int(token), str(status), str(state)))
            except (ValueError, TypeError):  # cannot happen with atomic writes; never fatal
                continue
        return out

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


#: the relay of this worker (set in the main process before the pool forks; pool
#: processes inherit it)
current: Relay | None = None


def open_relay() -> Relay:
    global current
    if current is None or current.owner_pid != os.getpid():
        current = Relay()
    return current


def close_relay() -> None:
    global current
    if current is not None and current.owner_pid == os.getpid():
        current.close()
        current = None
