"""A block of status lines redrawn in place on a terminal, with log lines printed above it.

On a terminal the block is erased and drawn again (two ANSI escapes, no curses). Elsewhere
(a pipe, a file, a test) a block is printed only when what it shows has changed, or every
few seconds, so the output stays readable as a log.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Hashable, Sequence

from django.core.management.base import OutputWrapper


class LiveBlock:
    def __init__(self, out: OutputWrapper, *, interactive: bool | None = None, every: float = 5.0):
        self.out = out
        if interactive is None:
            interactive = out.isatty() and os.environ.get("TERM", "") != "dumb"
        self.interactive = interactive
        self.every = every
        self._lines: list[str] = []
        self._drawn = 0
        self._key: Hashable = object()
        self._printed_at = 0.0
        self._pending = False

    # -- the block -------------------------------------------------------------------------
    def show(self, lines: Sequence[str], key: Hashable = None) -> None:
        """Replace the block. ``key`` is what matters in it (no clocks): when not on a
        terminal, the block is printed if ``key`` changed or ``every`` seconds passed."""
        self._lines = list(lines)
        if self.interactive:
            self._erase()
            self._draw()
            return
        now = time.monotonic()
        self._pending = True
        if key != self._key or now - self._printed_at >= self.every:
            self._key = key
            self._printed_at = now
            self._print_block()

    def log(self, line: str) -> None:
        """A permanent line, printed above the block."""
        if self.interactive:
            self._erase()
            self.out.write(line + "\n", ending="")
            self._draw()
        else:
            self.out.write(line + "\n", ending="")
            self.out.flush()

    def close(self) -> None:
        """Leave the last block on screen (printed once more if it was not)."""
        if not self.interactive and self._pending:
            self._print_block()
        self._lines = []
        self._drawn = 0
        self._key = object()
        self._printed_at = 0.0
        self.out.flush()

    def _print_block(self) -> None:
        self.out.write("\n".join(self._lines) + "\n", ending="")
        self.out.flush()
        self._pending = False

    # -- terminal drawing ------------------------------------------------------------------
    def _erase(self) -> None:
        if self._drawn:
            # cursor to the start of the block's first line, then clear to the end
            self.out.write(f"\x1b[{self._drawn}F\x1b[J", ending="")
            self._drawn = 0

    def _draw(self) -> None:
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        lines = [line[:width] for line in self._lines]
        if lines:
            self.out.write("\n".join(lines) + "\n", ending="")
        self._drawn = len(lines)
        self.out.flush()
