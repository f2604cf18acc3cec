"""Background prefetch: ``map(fn, items)`` computed ahead of the consumer in worker threads.

The one helper every batch consumer gathers its batches through (train-head, probe, evaluate and knn
via the token store's stream, reduce, extract's image loader), so reading the next batch overlaps the
compute on the current one::

    with prefetch(read_batch, batch_indices, workers=2, depth=4) as batches:
        for batch in batches:
            step(batch)

Contract:

- results come in the order of ``items``;
- bounded: at most ``depth`` items are taken from ``items`` (and submitted to ``fn``) beyond those the
  consumer has received, so memory holds at most ``depth`` results plus the current one; ``items`` is
  iterated lazily on the consumer's thread, so it may be endless;
- an exception raised by ``fn`` (or by iterating ``items``) is re-raised in the consumer at that item's
  position, the work queued behind it is cancelled and nothing after it is yielded;
- leaving the ``with`` block (early ``break``, an exception in the consumer), ``close()``, or the
  exhausted iterator cancels the queued work and joins the threads: none outlives it (work already
  running is finished first: threads cannot be interrupted);
- ``workers=0`` runs ``fn`` on the consumer's thread when the item is asked for (no background work).

Threads suit the consumers here: reads (``pread``, zarr's codecs) and image decoding release the GIL.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Prefetcher", "prefetch"]


class Prefetcher(Generic[T, R]):
    """Iterator and context manager over ``fn(item)`` for ``item`` in ``items`` (see the module contract)."""

    def __init__(self, fn: Callable[[T], R], items: Iterable[T], *, workers: int = 1, depth: int | None = None,
                 name: str = "prefetch") -> None:
        if workers < 0:
            raise ValueError(f"prefetch workers={workers}: must be >= 0")
        depth = max(1, workers) if depth is None else depth
        if depth < 1:
            raise ValueError(f"prefetch depth={depth}: must be >= 1")
        self._fn = fn
        self._items: Iterator[T] | None = iter(items)
        self._depth = depth
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name) if workers else None
        self._pending: deque[Future[R]] = deque()
        self._fill()

    def _fill(self) -> None:
        """Submit items until ``depth`` results are pending or ``items`` is exhausted (or failed)."""
        if self._pool is None:
            return
        while self._items is not None and len(self._pending) < self._depth:
            try:
                item = next(self._items)
            except StopIteration:
                self._items = None
                return
            except BaseException as exc:  # noqa: BLE001 - surfaces at this position in the consumer
                self._items = None
                failed: Future[R] = Future()
                failed.set_exception(exc)
                self._pending.append(failed)
                return
            self._pending.append(self._pool.submit(self._fn, item))

    def __iter__(self) -> Prefetcher[T, R]:
        return self

    def __next__(self) -> R:
        if self._pool is None:  # synchronous mode (workers=0) or closed
            if self._items is None:
                raise StopIteration
            try:
                return self._fn(next(self._items))
            except BaseException:
                self._items = None
                raise
        if not self._pending:
            self.close()
            raise StopIteration
        future = self._pending.popleft()
        try:
            result = future.result()
        except BaseException:
            self.close()
            raise
        self._fill()
        return result

    def close(self) -> None:
        """Cancel the queued work and join the worker threads (idempotent)."""
        self._items = None
        pool, self._pool = self._pool, None
        if pool is not None:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher[T, R]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def prefetch(fn: Callable[[T], R], items: Iterable[T], *, workers: int = 1, depth: int | None = None,
             name: str = "prefetch") -> Prefetcher[T, R]:
    """``map(fn, items)`` in order, computed by ``workers`` threads at most ``depth`` items ahead of the
    consumer (default ``max(1, workers)``); use it as a context manager so an early stop joins the
    threads. ``name`` prefixes the worker threads' names."""
    return Prefetcher(fn, items, workers=workers, depth=depth, name=name)
