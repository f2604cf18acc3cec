"""What a run shows while it works (:class:`RunDisplay`).

On a terminal: one live display at the bottom: an overall bar (artifacts done / to build, elapsed, an ETA
from the plan's time estimates, else from the stages finished so far) and one line per running stage with
its label and how long it has run (a stage's own progress bar shows under it); each finished stage scrolls
above as one ``[done]`` line with its label and headline result. Off a terminal (a log file, CI): one
``[run]`` line when a stage starts and one ``[done]`` line when it finishes. Cached artifacts are one line
(``54 cached``); ``verbose`` lists them (``[hit] id label``).

A stage on a Dask worker has no terminal: :func:`relay_bars` counts the tqdm bars its thread opens and sends
their state as events (``TOPIC``) that the client's display shows in the stage's running line
(:meth:`RunDisplay.follow`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("stegopipe")

REFRESH_S = 1.0
TOPIC = "stegopipe-progress"  # Dask event topic of the bars of stages on workers: {"artifact", "text"}


def live_terminal() -> bool:
    """True when stderr is a terminal that shows bars (``--quiet`` and non-terminals set TQDM_DISABLE)."""
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "") in ("", "0")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def bar_text(bar: tqdm) -> str:
    """A bar in a few words: ``extract synthetic/train@64: 45/128 img`` (``45 img`` without a total)."""
    state = bar.format_dict
    n, total, unit = state["n"], state["total"], state["unit"]
    size = (lambda v: tqdm.format_sizeof(v, divisor=state["unit_divisor"])) if state["unit_scale"] else (lambda v: f"{v:g}")
    count = f"{size(n)}/{size(total)}" if total else size(n)
    return f"{state['prefix'] or ''}{': ' if state['prefix'] else ''}{count} {unit}".strip()


_RELAYED: dict[int, tuple[list[tqdm], Any]] = {}  # thread id -> (the bars it opened while relayed, os.devnull)
_TQDM_INIT = tqdm.__dict__["__init__"]  # a partialmethod with the TQDM_* environment's defaults, or a function


def _relayed_init(self: tqdm, *args: Any, **kwargs: Any) -> None:
    relayed = _RELAYED.get(threading.get_ident())
    if relayed is not None:  # counted even where TQDM_DISABLE hides bars (a worker's stderr is no terminal)
        kwargs.setdefault("disable", False)
        kwargs["file"] = relayed[1]
    getattr(_TQDM_INIT, "func", _TQDM_INIT)(self, *args, **{**getattr(_TQDM_INIT, "keywords", {}), **kwargs})
    if relayed is not None:
        relayed[0].append(self)


@contextlib.contextmanager
def relay_bars(artifact: str, send: Callable[[dict[str, str]], None], interval: float = REFRESH_S) -> Iterator[None]:
    """While a stage runs in this thread (on a Dask worker): every ``interval`` seconds, and once at the end,
    ``send({"artifact": artifact, "text": ...})`` the state of the last bar it opened that is still open
    (:func:`bar_text`); nothing while it has none. A failure to send (a lost client) is ignored."""
    tqdm.__init__ = _relayed_init  # type: ignore[method-assign]  # bars of other threads: unchanged
    bars: list[tqdm] = []
    nowhere = open(os.devnull, "w")  # noqa: SIM115 (closed at the end)
    _RELAYED[threading.get_ident()] = (bars, nowhere)
    stop = threading.Event()
    sent = ""

    def report() -> None:  # never an error: the stage's outcome is what counts
        nonlocal sent
        with contextlib.suppress(Exception):
            open_bars = [b for b in list(bars) if not b.disable]
            text = bar_text(open_bars[-1]) if open_bars else ""
            if text and text != sent:
                sent = text
                send({"artifact": artifact, "text": text})

    def loop() -> None:
        while not stop.wait(interval):
            report()

    thread = threading.Thread(target=loop, name=f"stegopipe-relay-{artifact}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        report()
        del _RELAYED[threading.get_ident()]
        nowhere.close()


class _HideStartLines(logging.Filter):
    """Console filter while the live display runs: the running lines show what has started."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("[run] ")


class RunDisplay:
    """Progress of one ``run``: ``pending`` (id -> stage) to build, ``labels`` (id -> label text),
    ``estimates`` (id -> seconds, None where the plan has none). Use as a context manager; call
    :meth:`hit` for each cached artifact, :meth:`start` and :meth:`done` around each stage."""

    def __init__(self, pending: Mapping[str, str], labels: Mapping[str, str],
                 estimates: Mapping[str, float | None] | None = None, *, live: bool | None = None,
                 verbose: bool = False) -> None:
        self.pending = dict(pending)
        self.labels = labels
        self.estimates = dict(estimates or {})
        self.live = live_terminal() if live is None else live
        self.verbose = verbose
        self.hits = 0
        self.finished: dict[str, float] = {}  # id -> wall seconds
        self.running: dict[str, float] = {}  # id -> start time
        self.progress: dict[str, str] = {}  # id -> its stage's progress sent from a Dask worker (bar_text)
        self.started_at = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bars: dict[str, Any] = {}
        self._overall: Any = None
        self._thread: threading.Thread | None = None
        self._redirect: Any = None
        self._filter = _HideStartLines()

    # -- the lines ---------------------------------------------------------------------------------
    def label(self, artifact: str) -> str:
        return self.labels.get(artifact, "")

    def hit(self, artifact: str) -> None:
        self.hits += 1
        if self.verbose:
            log.info("[hit] %s %s", artifact, self.label(artifact))

    def cached_summary(self) -> None:
        """One line for every cached artifact (unless they were listed one by one)."""
        if self.hits and not self.verbose:
            log.info("%d cached (-v lists them)", self.hits)

    def start(self, artifact: str, *, announce: bool = False) -> None:
        """A stage starts; ``announce``: print its ``[run]`` line here (the stage runs elsewhere, e.g. on a
        Dask worker; in this process the stage logs its own)."""
        with self._lock:
            self.running[artifact] = time.monotonic()
        if self.live:
            self._add_bar(artifact)
        elif announce:
            log.info("[run] %s %s", artifact, self.label(artifact))

    def follow(self, event: Any) -> None:
        """A progress event of a stage on a Dask worker (:func:`relay_bars`; a ``(time, message)`` pair as
        ``Client.subscribe_topic`` hands it over): kept for the stage's running line, which only a terminal
        shows (off a terminal a stage is one line when it starts and one when it finishes)."""
        message = event[1] if isinstance(event, tuple) else event
        with self._lock:
            if message.get("artifact") in self.running:
                self.progress[message["artifact"]] = str(message.get("text", ""))

    def done(self, artifact: str, wall_s: float, headline: str = "") -> None:
        with self._lock:
            self.progress.pop(artifact, None)
            self.running.pop(artifact, None)
            self.finished[artifact] = wall_s
            bar = self._bars.pop(artifact, None)
        if bar is not None:
            bar.close()
        label = self.label(artifact)
        log.info("[done] %s%s in %.1fs%s", artifact, f" {label}" if label else "", wall_s,
                 f": {headline}" if headline else "")
        if self._overall is not None:
            self._overall.update()
            self._refresh()

    # -- the ETA -----------------------------------------------------------------------------------
    def eta(self) -> str:
        """``ETA 3m12s (estimated)`` from the plan's estimates when every pending stage has one, else
        ``ETA ~2m (so far)`` from the mean wall time of the stages finished so far; empty before that."""
        now = time.monotonic()
        with self._lock:
            left = [a for a in self.pending if a not in self.finished]
            running = dict(self.running)
            finished = dict(self.finished)
        if not left:
            return ""
        if all(self.estimates.get(a) is not None for a in left):
            seconds = sum(max(0.0, self.estimates[a] - (now - running[a] if a in running else 0.0)) for a in left)
            return f"ETA {duration(seconds)} (estimated)"
        if finished:
            mean = sum(finished.values()) / len(finished)
            return f"ETA ~{duration(mean * len(left))} (so far)"
        return ""

    # -- the live display --------------------------------------------------------------------------
    def _add_bar(self, artifact: str) -> None:
        stage = self.pending.get(artifact, "")
        bar = tqdm(total=None, bar_format="  {desc}", desc=f"{stage:<10} {self.label(artifact)}", leave=False,
                   file=sys.stderr, dynamic_ncols=True)
        with self._lock:
            self._bars[artifact] = bar
        self._refresh()

    def _refresh(self) -> None:
        now = time.monotonic()
        with self._lock:
            bars = [(a, b, now - self.running.get(a, now), self.progress.get(a)) for a, b in self._bars.items()]
        for artifact, bar, seconds, progress in bars:
            bar.set_description_str(f"{self.pending.get(artifact, ''):<10} {self.label(artifact)}  "
                                    f"running {duration(seconds)}{f'  {progress}' if progress else ''}", refresh=True)
        if self._overall is not None:
            self._overall.set_postfix_str(self.eta(), refresh=True)

    def _tick(self) -> None:
        while not self._stop.wait(REFRESH_S):
            self._refresh()

    def __enter__(self) -> RunDisplay:
        if self.live and self.pending:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            for handler in logging.root.handlers:
                handler.addFilter(self._filter)
            self._overall = tqdm(total=len(self.pending), desc="stegopipe", unit="artifact", file=sys.stderr,
                                 bar_format="{desc} {bar:24} {n_fmt}/{total_fmt} built [{elapsed}]{postfix}",
                                 dynamic_ncols=True)
            self._thread = threading.Thread(target=self._tick, name="stegopipe-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for bar in list(self._bars.values()):
            bar.close()
        self._bars.clear()
        if self._overall is not None:
            self._overall.close()
            self._overall = None
        if self._redirect is not None:
            for handler in logging.root.handlers:
                handler.removeFilter(self._filter)
            self._redirect.__exit__(None, None, None)
            self._redirect = None
