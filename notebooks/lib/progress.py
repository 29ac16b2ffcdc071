"""Progress of long work: tqdm bars where someone watches, printed lines where nobody can (papermill).

01 shows its downloads, 02 its run (`RunProgress`: rows, img/s, failures, time left) and 03 and 04
their blocks; headless, 02 prints a line per chunk and at least one every half minute.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from tqdm.auto import tqdm


def watched() -> bool:
    """True where someone watches progress bars: a notebook front end, or a terminal.

    The front ends that render tqdm's widgets (JupyterLab, Notebook, VS Code, Colab) can answer
    input(); papermill, nbval and nbconvert cannot, and tell the kernel so with every cell.
    """
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    kernel = getattr(shell, "kernel", None)
    if kernel is not None:
        return bool(getattr(kernel, "_allow_stdin", False))
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable | None = None, **options: Any) -> tqdm:
    """A tqdm bar where someone watches (see `watched`), a silent one elsewhere."""
    return tqdm(iterable, disable=not watched(), **options)


# A headless run prints a line at least every PROGRESS_INTERVAL seconds and at most one every
# LINE_GAP seconds, besides its first and last: a line per chunk, chunks written closer together
# counted in one line.
PROGRESS_INTERVAL = 30.0
LINE_GAP = 10.0


class RunProgress:
    """How far one 02 run is: a tqdm bar where someone watches it, else a printed line now and then.

    A line gives the rows done of the run's total, img/s, the failures so far with the commonest
    reason, and the time left. One is printed for the chunks written (one line per chunk, or per
    `gap` seconds when they come faster), and one every `interval` seconds in between, also while
    no image arrives: a stalled source shows as a count that stops moving.
    """

    def __init__(
        self,
        total: int,
        lines: bool | None = None,
        interval: float = PROGRESS_INTERVAL,
        gap: float = LINE_GAP,
    ):
        self.total = total
        self.done = 0  # rows this run embedded or recorded as failed
        self.elsewhere = 0  # rows of the plan that another run did
        self.failed: collections.Counter = collections.Counter()
        self._lines = not watched() if lines is None else lines
        self._interval, self._gap = interval, gap
        self._began = self._last_line = time.monotonic()
        self._printed = 0
        self._written: list[str] = []  # chunks written since the last line
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._ticker = threading.Thread(target=self._print_every_interval, name="progress", daemon=True)
        self._bar = tqdm(total=total, desc="embed", unit="img", disable=self._lines or not total)

    def __enter__(self) -> RunProgress:
        if self._lines and self.total:
            self._ticker.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stopped.set()
        if self._ticker.is_alive():
            self._ticker.join()
        if self._written:
            self._print()
        self._bar.close()

    def add(self, reasons: Sequence[str | None]) -> None:
        """Count a batch of rows: None for each embedded one, else the reason it failed."""
        with self._lock:
            self.done += len(reasons)
            self.failed.update(reason for reason in reasons if reason is not None)
            failed = self.failed.total()
        self._bar.set_postfix(failed=failed, refresh=False)
        self._bar.update(len(reasons))

    def take_back(self, reasons: Sequence[str | None], elsewhere: int = 0) -> None:
        """Uncount rows whose work was lost (a Ray worker died under them): they are counted again."""
        with self._lock:
            self.done -= len(reasons)
            self.elsewhere -= elsewhere
            self.failed.subtract(reason for reason in reasons if reason is not None)
            self.failed = +self.failed
        self._bar.update(-len(reasons) - elsewhere)

    def add_elsewhere(self, rows: int) -> None:
        """Count rows of the plan that another run embedded."""
        with self._lock:
            self.elsewhere += rows
        self._bar.update(rows)

    def chunk_written(self, name: str) -> None:
        """Say that a chunk file is written: now, or in the next line when the last one is recent."""
        if not self._lines:
            return
        with self._lock:
            self._written.append(name)
            due = not self._printed or time.monotonic() - self._last_line >= self._gap
        if due:
            self._print()

    def line(self) -> str:
        """Rows done of the total, img/s, failures with the commonest reason, and the time left."""
        with self._lock:
            done, settled, failed = self.done, self.done + self.elsewhere, self.failed.most_common(1)
            failures = self.failed.total()
        rate = done / max(time.monotonic() - self._began, 1e-9)
        share = f" ({settled / self.total:.1%})" if self.total else ""
        text = f"{settled:,} of {self.total:,} rows{share}, {rate:,.1f} img/s, {failures:,} failed"
        if failed:
            text += f" (most: {failed[0][0]}, {failed[0][1]:,})"
        left = self.total - settled
        return text + (f", about {_duration(left / rate)} left" if rate and left else "")

    def _print(self) -> None:
        with self._lock:
            written, self._written = self._written, []
            self._last_line = time.monotonic()
            self._printed += 1
        print(f"[02] {_chunks_written(written)}{self.line()}", flush=True)

    def _print_every_interval(self) -> None:
        while not self._stopped.wait(max(0.0, self._last_line + self._interval - time.monotonic())):
            if time.monotonic() - self._last_line >= self._interval:
                self._print()


def _chunks_written(names: list[str]) -> str:
    """The start of a progress line that reports chunk files written since the last one."""
    if len(names) > 1:
        return f"{len(names)} chunks written, the last {names[-1]}; "
    return f"{names[0]} written; " if names else ""


def _duration(seconds: float) -> str:
    """12s, 5m 41s, 3h 07m."""
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"
