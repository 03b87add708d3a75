"""Progress of long steps in images/s: a tqdm bar in a terminal, else a line every ``interval`` seconds, so a
job log shows a half-hour ``predict`` moving (a bar would fill it with carriage returns)."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
    """Count images done of ``total``; show ``done/total``, images/s and the time left, after ``desc``."""

    def __init__(self, total: int, desc: str, interval: float = 30.0) -> None:
        self.total, self.desc, self.interval = total, desc, interval
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.bar = tqdm(total=total, unit="img", desc=desc) if sys.stderr.isatty() else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def rate(self) -> float:
        """Images per second so far."""
        seconds = time.perf_counter() - self.start
        return self.done / seconds if seconds > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        left = f", {(self.total - self.done) / rate:.0f} s left" if rate > 0 and self.done < self.total else ""
        return f"{self.desc}: {self.done}/{self.total} images, {rate:.1f} images/s{left}"

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.done:
            print(self.line(), file=sys.stderr, flush=True)
