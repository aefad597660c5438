"""A minimal progress bar on stderr for long conversions (no dependency)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Call with ``(done, total)``; redraws at most ten times a second and ends the line when done."""

    def __init__(self, description: str, stream=sys.stderr, width: int = 30):
        self.description = description
        self.stream = stream
        self.width = width
        self.start = time.perf_counter()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        filled = self.width * done // max(total, 1)
        self.stream.write(f"\r{self.description} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} "
                          f"{now - self.start:.1f}s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
