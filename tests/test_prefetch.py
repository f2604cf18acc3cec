"""pipeline.prefetch: order, bounded look-ahead, overlap with the consumer, errors, clean early stop."""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from pipeline.prefetch import prefetch

WAIT_S = 10.0  # generous: only a broken prefetch waits this long


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(name)]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_order_is_kept(workers: int) -> None:
    def slow_for_small(i: int) -> int:
        time.sleep(0.002 * (10 - i))  # early items finish last
        return i * i

    with prefetch(slow_for_small, range(10), workers=workers, depth=4) as out:
        assert list(out) == [i * i for i in range(10)]


def test_look_ahead_is_bounded_and_items_are_lazy() -> None:
    pulled: list[int] = []

    def counting() -> Iterator[int]:
        for i in itertools.count():
            pulled.append(i)
            yield i

    with prefetch(lambda i: i, counting(), workers=2, depth=3, name="bounded") as out:
        assert len(pulled) == 3  # started before the consumer asks
        assert [next(out) for _ in range(5)] == [0, 1, 2, 3, 4]
        assert len(pulled) == 5 + 3


def test_producer_runs_while_the_consumer_holds_a_result() -> None:
    """Item 1 is computed while the consumer works on item 0: fn(1) waits for the consumer to hold item 0,
    the consumer waits for fn(1) to have started, without asking for item 1. Without overlap: deadlock."""
    consumer_has_0, started_1 = threading.Event(), threading.Event()

    def fn(i: int) -> int:
        if i == 1:
            assert consumer_has_0.wait(WAIT_S)
            started_1.set()
        return i

    with prefetch(fn, range(3), workers=1, depth=2) as out:
        assert next(out) == 0
        consumer_has_0.set()
        assert started_1.wait(WAIT_S), "the next item was not computed during the consumer's work"
        assert list(out) == [1, 2]


def test_synchronous_mode_computes_on_demand() -> None:
    calls: list[int] = []
    out = prefetch(lambda i: calls.append(i) or i, range(3), workers=0)
    assert calls == []
    assert next(out) == 0 and calls == [0]


@pytest.mark.parametrize("workers", [0, 2])
def test_exception_reaches_the_consumer_at_its_item(workers: int) -> None:
    def fn(i: int) -> int:
        if i == 3:
            raise KeyError(f"sample {i} is broken")
        return i

    got: list[int] = []
    with pytest.raises(KeyError, match="sample 3 is broken"):
        with prefetch(fn, range(100), workers=workers, depth=4, name=f"err{workers}") as out:
            for value in out:
                got.append(value)
    assert got == [0, 1, 2]
    assert _threads(f"err{workers}") == []


def test_exception_while_iterating_items_propagates() -> None:
    def items() -> Iterator[int]:
        yield 0
        raise OSError("index file vanished")

    out = prefetch(lambda i: i, items(), workers=2, name="itemerr")
    assert next(out) == 0
    with pytest.raises(OSError, match="index file vanished"):
        next(out)
    assert _threads("itemerr") == []
    assert list(out) == []  # closed after the error


def test_early_stop_joins_threads_and_cancels_queued_work() -> None:
    started: list[int] = []
    release = threading.Event()

    def fn(i: int) -> int:
        started.append(i)
        release.wait(WAIT_S)
        return i

    with prefetch(fn, itertools.count(), workers=1, depth=5, name="early") as out:
        release.set()
        assert next(out) == 0
        assert _threads("early")
    assert _threads("early") == []  # joined on leaving the block
    done = len(started)
    assert done <= 1 + 5  # the queued items were cancelled, not all run
    assert list(out) == []


def test_exception_in_the_consumer_stops_the_workers() -> None:
    with pytest.raises(RuntimeError, match="consumer failed"):
        with prefetch(lambda i: i, itertools.count(), workers=2, depth=2, name="consumerr") as out:
            for value in out:
                if value == 2:
                    raise RuntimeError("consumer failed")
    assert _threads("consumerr") == []


def test_exhaustion_joins_threads() -> None:
    out = prefetch(lambda i: i, range(4), workers=2, name="exhaust")
    assert list(out) == [0, 1, 2, 3]
    assert _threads("exhaust") == []


@pytest.mark.parametrize(("workers", "depth"), [(-1, None), (1, 0)])
def test_bad_settings(workers: int, depth: int | None) -> None:
    with pytest.raises(ValueError, match="prefetch"):
        prefetch(lambda i: i, range(2), workers=workers, depth=depth)
