"""One rich progress bar on stderr, shared by every long loop (GCF epochs, training steps, benchmarks).

When stderr is not a terminal (CI logs, `> run.log 2>&1`), rich draws nothing until the bar stops, so the bar
also prints a plain progress line every `LOG_EVERY_S` seconds there: on its updates, and from a heartbeat
thread while no update comes (a benchmark's bar between jobs: embedding, GCF, training run inside one job).
"""

from __future__ import annotations

import functools
import threading
import time

LOG_EVERY_S = 30.0


@functools.cache
def stderr_console():
    """The one rich console on stderr (logs, progress, errors); the CLI prints through it too."""
    from rich.console import Console

    return Console(stderr=True)


class Bar:
    """A progress bar that does nothing when disabled (tests, non-main processes, nested runs).

    Args:
        enabled: draw it or not.
        total: units of work.  label: text on the left.  completed: units already done (resumed work).
    """

    def __init__(self, enabled: bool, total: int, label: str, completed: int = 0):
        self.prog = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TextColumn("{task.fields[info]}"), console=stderr_console())
        self.task = self.prog.add_task(label, total=total, completed=completed, info="")
        self.last_log = time.monotonic()
        self.log = not stderr_console().is_terminal
        self.prog.start()
        self._stop, self._lock = threading.Event(), threading.Lock()
        if self.log:
            threading.Thread(target=self._heartbeat, daemon=True).start()

    def update(self, *, advance: int = 0, completed: int | None = None, info: str = "") -> None:
        if self.prog is None:
            return
        self.prog.update(self.task, advance=advance, completed=completed, info=info)
        self._log_due()

    def _log_due(self) -> None:
        prog = self.prog
        with self._lock:  # the heartbeat and update() may both find a line due
            now = time.monotonic()
            if prog is None or not self.log or now - self.last_log < LOG_EVERY_S:
                return
            self.last_log = now
        t = prog.tasks[0]
        eta = f", ~{t.time_remaining:.0f} s left" if t.time_remaining else ""
        prog.console.print(f"{t.description} {t.completed:.0f}/{t.total:.0f} [{t.elapsed:.0f} s{eta}] "
                           f"{t.fields['info']}", markup=False, highlight=False)

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0):
            self._log_due()

    def close(self) -> None:
        if self.prog is not None:
            self._stop.set()
            self.prog.stop()
            self.prog = None


class Counted:
    """A ``progress(done, total)`` callback drawing a :class:`Bar` once the total is known (its first call)."""

    def __init__(self, label: str):
        self.label, self.bar = label, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = Bar(True, total, self.label)
        self.bar.update(completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
