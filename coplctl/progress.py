"""One rich progress bar on stderr, shared by every long loop (GCF epochs, training steps, benchmarks)."""

from __future__ import annotations


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

        from coplctl.cli.common import err

        self.prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TextColumn("{task.fields[info]}"), console=err)
        self.task = self.prog.add_task(label, total=total, completed=completed, info="")
        self.prog.start()

    def update(self, *, advance: int = 0, completed: int | None = None, info: str = "") -> None:
        if self.prog is not None:
            self.prog.update(self.task, advance=advance, completed=completed, info=info)

    def close(self) -> None:
        if self.prog is not None:
            self.prog.stop()
            self.prog = None
