"""Progress of long conversions on stderr, through tqdm (which writes plain lines when stderr is not a terminal)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class ProgressBar:
    """Call with ``(done, total)``; the bar closes when ``done`` reaches ``total``."""

    def __init__(self, description: str, stream=sys.stderr):
        self.description = description
        self.stream = stream
        self._bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.description, file=self.stream, unit="tensor", dynamic_ncols=True,
                             mininterval=0.1)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()
