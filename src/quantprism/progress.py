"""Progress of long steps (canonical pass, exports, runtime loading, validation), decoupled from how it is shown.

Library code opens a task and advances it; the CLI installs a reporter: rich bars with ETA on a terminal, plain
log lines (throttled) when stdout is not a TTY (CI), nothing with ``--quiet``. Without a reporter, tasks are no-ops.

    with progress.task("canonical pass", total=n_layers, unit="layer") as t:
        t.advance(1, note="layer 3: 4.1 s")
"""
from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

log = logging.getLogger("quantprism")


class Reporter(Protocol):
    def start(self, key: int, description: str, total: float | None, unit: str) -> None: ...
    def advance(self, key: int, n: float, note: str | None) -> None: ...
    def finish(self, key: int) -> None: ...
    def set_total(self, key: int, total: float) -> None: ...


class Task:
    """One long step; ``advance`` by units of work (layers, bytes, chunks)."""

    _next = 0

    def __init__(self, reporter: Reporter | None, description: str, total: float | None, unit: str):
        Task._next += 1
        self.key, self.reporter, self.done = Task._next, reporter, 0.0
        if reporter is not None:
            reporter.start(self.key, description, total, unit)

    def advance(self, n: float = 1, note: str | None = None) -> None:
        self.done += n
        if self.reporter is not None:
            self.reporter.advance(self.key, n, note)

    def set_total(self, total: float) -> None:
        if self.reporter is not None:
            self.reporter.set_total(self.key, total)


_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("quantprism_progress", default=None)


@contextmanager
def task(description: str, total: float | None = None, unit: str = "step") -> Iterator[Task]:
    t = Task(_reporter.get(), description, total, unit)
    try:
        yield t
    finally:
        if t.reporter is not None:
            t.reporter.finish(t.key)


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def _fmt(n: float, unit: str) -> str:
    if unit == "B":
        for u in ("B", "KB", "MB", "GB", "TB"):
            if abs(n) < 1000 or u == "TB":
                return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
            n /= 1000
    return f"{n:g}"


class LogReporter:
    """Plain log lines for CI: one when a task starts, then at most one every ``every_s`` seconds, and one at the end
    (with an ETA from the mean rate so far)."""

    def __init__(self, logger: logging.Logger | None = None, every_s: float = 10.0):
        self.log = logger or log
        self.every_s = every_s
        self.tasks: dict[int, dict] = {}

    def start(self, key: int, description: str, total: float | None, unit: str) -> None:
        self.tasks[key] = {"desc": description, "total": total, "unit": unit, "done": 0.0, "t0": time.monotonic(),
                           "last": 0.0}
        tot = f" ({_fmt(total, unit)} {unit if unit != 'B' else ''})".rstrip() if total else ""
        self.log.info("%s: started%s", description, tot.replace("  ", " ").replace(" )", ")"))

    def advance(self, key: int, n: float, note: str | None) -> None:
        t = self.tasks[key]
        t["done"] += n
        now = time.monotonic()
        if now - t["last"] < self.every_s and not (t["total"] and t["done"] >= t["total"]):
            return
        t["last"] = now
        el = now - t["t0"]
        if t["total"]:
            eta = el / t["done"] * (t["total"] - t["done"]) if t["done"] else float("nan")
            msg = f"{_fmt(t['done'], t['unit'])}/{_fmt(t['total'], t['unit'])} {t['unit'] if t['unit'] != 'B' else ''}"
            self.log.info("%s: %s, %.0f s elapsed, ETA %.0f s%s", t["desc"], msg.rstrip(), el, eta,
                          f" · {note}" if note else "")
        else:
            self.log.info("%s: %s, %.0f s%s", t["desc"], _fmt(t["done"], t["unit"]), el, f" · {note}" if note else "")

    def set_total(self, key: int, total: float) -> None:
        self.tasks[key]["total"] = total

    def finish(self, key: int) -> None:
        t = self.tasks.pop(key)
        self.log.info("%s: done in %.1f s", t["desc"], time.monotonic() - t["t0"])


class RichReporter:
    """rich bars with ETA (for a terminal); ``progress`` is a started ``rich.progress.Progress``."""

    def __init__(self, progress):
        self.p = progress
        self.ids: dict[int, object] = {}
        self.units: dict[int, str] = {}

    def start(self, key: int, description: str, total: float | None, unit: str) -> None:
        self.ids[key] = self.p.add_task(description, total=total, note="")
        self.units[key] = unit

    def advance(self, key: int, n: float, note: str | None) -> None:
        kw = {"note": note} if note else {}
        self.p.update(self.ids[key], advance=n, **kw)

    def set_total(self, key: int, total: float) -> None:
        self.p.update(self.ids[key], total=total)

    def finish(self, key: int) -> None:
        tid = self.ids.pop(key)
        self.units.pop(key, None)
        self.p.remove_task(tid)


def rich_progress(console):
    """The Progress layout every command uses: description, bar, done/total, elapsed, ETA, last note."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), TextColumn("[dim]{task.fields[note]}"),
                    console=console, transient=True)
