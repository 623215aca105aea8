"""Progress a user can follow: rich's live display in a terminal, plain lines anywhere else.

Outside a terminal (a log file, CI, ``nohup``) rich's live display prints nothing, so a run was
silent for minutes. ``LineProgress`` offers the same task calls and prints a line when a step
ends, and, while work goes on, a line a minute saying what is running and how far it got.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

HEARTBEAT_SECONDS = 60.0
# A generation call shorter than this ends without a line: a search makes hundreds of them.
QUIET_SECONDS = 10.0


def make_progress(console: Console) -> Any:
    """rich's progress display in a terminal; ``LineProgress`` elsewhere."""
    if not console.is_terminal:
        return LineProgress(console)
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def status(console: Console, message: str) -> Any:
    """rich's spinner in a terminal; elsewhere the message as a line (a spinner prints nothing)."""
    if console.is_terminal:
        return console.status(message)
    console.print(f"{message} ...", highlight=False)
    return nullcontext()


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    started: float = field(default_factory=time.monotonic)
    announced: bool = False


def _elapsed(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


class LineProgress:
    """The task calls of ``rich.progress.Progress`` as plain lines (see the module docstring)."""

    def __init__(self, console: Console, heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.console = console
        self.heartbeat = heartbeat
        self._tasks: dict[int, _Task] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LineProgress:
        self._thread = threading.Thread(target=self._beat, name="flipsearch-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def add_task(
        self, description: str, total: float | None = None, completed: float = 0, **_: Any
    ) -> int:
        with self._lock:
            self._next += 1
            self._tasks[self._next] = _Task(description, total, float(completed))
            return self._next

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        total: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **_: Any,
    ) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return
            task.total = task.total if total is None else total
            task.description = description or task.description
            task.completed = task.completed if completed is None else float(completed)
            task.completed += advance or 0.0
            finished = task.total is not None and task.completed >= task.total
        if finished and not task.announced:
            task.announced = True
            self.console.print(f"done: {task.description} ({_elapsed(self._age(task))})")

    def remove_task(self, task_id: int) -> None:
        with self._lock:
            task = self._tasks.pop(task_id, None)
        if task is not None and not task.announced and self._age(task) >= QUIET_SECONDS:
            self.console.print(f"done: {task.description} ({_elapsed(self._age(task))})")

    def print(self, *objects: Any, **options: Any) -> None:
        self.console.print(*objects, **options)

    @staticmethod
    def _age(task: _Task) -> float:
        return time.monotonic() - task.started

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                running = [t for t in self._tasks.values() if not t.announced]
            if running:
                self.console.print("working: " + "; ".join(map(self._describe, running)))

    def _describe(self, task: _Task) -> str:
        done = f"{task.completed:.0f}" + (f"/{task.total:.0f}" if task.total is not None else "")
        return f"{task.description} {done}, {_elapsed(self._age(task))}"
