"""Dense CRF refinement (method.md §7): a pure per-image function around pydensecrf2 and a process-pool
runner with a per-image timeout.

This module imports neither torch nor anything heavy, so spawned pool workers start quickly; torch
tensors are accepted as inputs (converted with ``.detach().cpu().numpy()``).

Pixels: the reference receives the ImageNet-normalised float32 image, un-normalises it
(``x·std + mean``), converts it to uint8 by *truncation* (``mul(255).byte()``, so many values come out
one lower than the source pixel) and reverses it to BGR. Both steps change the result, because
pydensecrf's permutohedral lattice only approximates the bilateral kernel and is not symmetric in the
colour channels. :func:`dense_crf` takes the uint8 RGB image and by default rebuilds exactly those
pixels (:func:`reference_pixels`); ``pixels="raw"`` skips the round trip (BGR order kept).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from queue import SimpleQueue
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.errors import ConfigError, InputError

__all__ = [
    "MAX_ITER", "POS_W", "POS_XY_STD", "BI_W", "BI_XY_STD", "BI_RGB_STD", "PIXEL_MODES",
    "resize_bilinear", "reference_pixels", "crf_pixels", "dense_crf", "CrfResult", "crf_map",
]

log = logging.getLogger(__name__)

# Reference constants (method.md §7).
MAX_ITER = 10
POS_W = 3
POS_XY_STD = 1
BI_W = 4
BI_XY_STD = 67
BI_RGB_STD = 3
UNARY_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax default
PIXEL_MODES = ("reference", "raw")  # what dense_crf hands pydensecrf: see crf_pixels


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _source_index(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps of 1-D linear interpolation with ``align_corners=False`` (torch semantics, no antialias)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize ``x [C, h, w]`` to ``[C, H, W]`` like ``F.interpolate(mode="bilinear",
    align_corners=False)``; float32 out."""
    x = np.asarray(x, dtype=np.float32)
    height, width = size
    if x.shape[1:] == (height, width):
        return x
    r0, r1, ry = _source_index(height, x.shape[1])
    c0, c1, cx = _source_index(width, x.shape[2])
    rows = x[:, r0, :] * (1 - ry)[None, :, None] + x[:, r1, :] * ry[None, :, None]
    return rows[:, :, c0] * (1 - cx)[None, None, :] + rows[:, :, c1] * cx[None, None, :]


def reference_pixels(image: np.ndarray) -> np.ndarray:
    """The uint8 RGB ``[H, W, 3]`` values the reference's CRF sees (still RGB, same shape): the image
    ImageNet-normalised as torchvision does it (``x / 255``, then ``(x − mean) / std``), un-normalised
    (``x·std + mean``), ×255 and truncated to uint8, every step in float32 in torch's order, so the
    result is bit-identical to ``to_pil_image(unnorm(normalize(to_tensor(image))))``."""
    from stages.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD  # lazily: keeps pool workers light

    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    x = (image.astype(np.float32) / np.float32(255) - mean) / std
    x = (x * std + mean) * np.float32(255)
    return np.clip(x, 0, 255).astype(np.uint8)  # the clip only catches -0.x / 255.0x; uint8 cast truncates


def crf_pixels(image: Any, pixels: str = "reference") -> np.ndarray:
    """The contiguous uint8 BGR ``[H, W, 3]`` image :func:`dense_crf` hands pydensecrf for the uint8 RGB
    ``image``: ``pixels="reference"`` (default) rebuilds the reference's pixels (:func:`reference_pixels`);
    ``"raw"`` keeps the image's own values. Both reverse to BGR, as the reference does."""
    img = _to_numpy(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(f"image: expected uint8 [H, W, 3] RGB, got {img.dtype} {img.shape}")
    if pixels not in PIXEL_MODES:
        raise ConfigError(f"pixels={pixels!r}: expected one of {', '.join(PIXEL_MODES)}")
    if pixels == "reference":
        img = reference_pixels(img)
    return np.ascontiguousarray(img[:, :, ::-1])


def _softmax0(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=0, keepdims=True))
    return (z / z.sum(axis=0, keepdims=True)).astype(np.float32)


def dense_crf(image: Any, logits: Any, *, pixels: str = "reference", iterations: int = MAX_ITER,
              gaussian_sxy: float = POS_XY_STD, gaussian_w: float = POS_W, bilateral_sxy: float = BI_XY_STD,
              bilateral_srgb: float = BI_RGB_STD, bilateral_w: float = BI_W) -> np.ndarray:
    """Refine class scores with a fully connected CRF.

    ``image``: uint8 ``[H, W, 3]`` RGB, handed to pydensecrf as :func:`crf_pixels` ``(image, pixels)``
    (default: exactly the reference's pixels). ``logits``: float ``[C, h, w]`` (any log-scale scores, e.g.
    ``log_softmax`` outputs), bilinearly resized to ``(H, W)`` when needed. The unary is
    ``−log(clip(softmax(logits), 1e-5, 1))``; pairwise terms: a Gaussian kernel (``gaussian_sxy``,
    weight ``gaussian_w``) and a bilateral kernel (``bilateral_sxy``, ``bilateral_srgb``, weight
    ``bilateral_w``), Potts compatibility, ``iterations`` mean-field steps. Returns float32
    marginals ``[C, H, W]`` (callers take ``argmax(0)``).
    """
    import pydensecrf.densecrf as dcrf  # here, so importing this module never needs the extension

    img = crf_pixels(image, pixels)
    scores = _to_numpy(logits)
    if scores.ndim != 3 or scores.dtype.kind != "f" or scores.shape[0] < 1:
        raise InputError(f"logits: expected float [C, h, w], got {scores.dtype} {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise InputError("logits: contains NaN or infinite values")
    height, width = img.shape[:2]
    n_classes = scores.shape[0]
    # C order first: the class sums of the softmax round differently over another memory layout, and a
    # pool worker receives its (unpickled) item C-contiguous whatever the caller's layout was
    probs = _softmax0(np.ascontiguousarray(resize_bilinear(scores, (height, width))))
    unary = np.ascontiguousarray(-np.log(np.clip(probs, UNARY_CLIP, 1.0)).reshape(n_classes, -1),
                                 dtype=np.float32)
    crf = dcrf.DenseCRF2D(width, height, n_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_w)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=img, compat=bilateral_w)
    q = crf.inference(iterations)
    return np.asarray(q, dtype=np.float32).reshape(n_classes, height, width)


@dataclass
class CrfResult:
    """Outcome of one item of :func:`crf_map`: marginals ``[C, H, W]`` or an error message."""

    index: int
    marginals: np.ndarray | None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


Items = Sequence[tuple[Any, Any]] | Callable[[int], tuple[Any, Any]]


def _run_one(index: int, pair: tuple[Any, Any] | None, loader: Callable | None,
             params: dict[str, Any]) -> CrfResult:
    start = time.perf_counter()
    try:
        image, logits = pair if pair is not None else loader(index)
        q = dense_crf(image, logits, **params)
        return CrfResult(index, q, None, time.perf_counter() - start)
    except Exception as exc:  # one bad item must not abort the batch; it is reported
        return CrfResult(index, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)


def _worker_main(tasks: Any, results: Any, loader: Callable | None, params: dict[str, Any]) -> None:
    """Pool worker: import what an item needs, announce readiness, then run ``(index, pair)`` tasks
    until ``None``."""
    import pydensecrf.densecrf  # noqa: F401  (before "ready": the import is start-up, not an item's time)

    _keep_freed_memory()
    results.send("ready")
    while True:
        task = tasks.recv()
        if task is None:
            return
        index, pair = task
        results.send(_run_one(index, pair, loader, params))


def _keep_freed_memory() -> None:
    """glibc only (elsewhere nothing): keep freed memory for the next item instead of handing it back.
    Every item allocates and frees the same arrays of several MB; in a fresh worker whose heap holds
    little else, glibc trimmed (or unmapped) them after each use and the next item faulted every page in
    again, costing a worker about 1.5× the serial CPU per image. 32 MiB is the largest mmap threshold
    glibc accepts; the trim threshold (1 GiB) only bounds what a worker keeps, which is its peak."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 25)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _widen_pipe(conn: Any) -> None:
    """Give an OS pipe the largest buffer the system allows (Linux ``F_SETPIPE_SZ``, at most
    ``/proc/sys/fs/pipe-max-size``, 1 MiB by default): an item or a result of several MB then crosses
    in a few writes instead of one wake-up of each side per 64 KiB. Elsewhere, or when refused, nothing."""
    try:
        import fcntl

        with open("/proc/sys/fs/pipe-max-size") as f:
            fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, int(f.read()))
    except (ImportError, AttributeError, OSError, ValueError):
        pass


class _Worker:
    """One spawned worker: tasks go down one pipe through a sender thread (a large item never blocks
    the pool loop, and the next item waits in the pipe while the current one runs), results come up
    another."""

    def __init__(self, ctx: Any, loader: Callable | None, params: dict[str, Any]) -> None:
        task_out, task_in = ctx.Pipe(duplex=False)
        self.conn, result_in = ctx.Pipe(duplex=False)
        for end in (task_in, result_in):
            _widen_pipe(end)
        self.proc = ctx.Process(target=_worker_main, args=(task_out, result_in, loader, params), daemon=True)
        self.proc.start()
        task_out.close()
        result_in.close()
        self._tasks = task_in
        self._outbox: SimpleQueue[Any] = SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="crf-send", daemon=True)
        self._sender.start()
        self.started = time.monotonic()
        self.ready = False
        self.queue: deque[int] = deque()  # items sent, in order; the first is in progress
        self.deadline = 0.0  # of the item in progress

    def _send_loop(self) -> None:
        while True:
            task = self._outbox.get()
            try:
                self._tasks.send(task)
            except OSError:  # the worker is gone: the pool loop sees it on the result pipe
                return
            if task is None:
                return

    def submit(self, task: Any) -> None:
        """Queue ``task`` (``None``: stop) for the sender thread."""
        self._outbox.put(task)

    def _close(self) -> None:
        self._sender.join(5)
        self._tasks.close()
        self.conn.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.submit(None)  # a sender blocked on the dead worker's pipe fails and returns
        self._close()

    def stop(self) -> None:
        self.submit(None)
        self.proc.join(2)
        if self.proc.is_alive():
            self.kill()
        else:
            self._close()


def _run_pool(n: int, items: Items, loader: Callable | None, params: dict[str, Any], workers: int,
              timeout_s: float, startup_timeout_s: float, emit: Callable[[CrfResult], None]) -> set[int]:
    """Process items in spawned workers; returns the indices it could not start (pool failure).

    A worker holds two items (the next one waits in its pipe, so it starts the moment the previous
    result is sent) while more items are pending than there are workers; the last ones go one at a
    time to whichever worker is free first, so no worker idles while another still has a queue. An
    item's timeout runs from when it starts."""
    ctx = mp.get_context("spawn")
    pending = deque(range(n))
    pool: list[_Worker] = []

    def lost(w: _Worker, error: str, seconds: float = 0.0) -> None:
        """Drop worker ``w``: its item in progress fails with ``error``, the ones queued behind it go back."""
        pool.remove(w)
        if w.queue:
            emit(CrfResult(w.queue.popleft(), None, error, seconds))
            pending.extendleft(reversed(w.queue))

    try:
        pool = [_Worker(ctx, loader, params) for _ in range(min(workers, n))]
        while pending or any(w.queue for w in pool):
            for w in pool:
                while w.ready and pending and (not w.queue or (len(w.queue) < 2 and len(pending) > len(pool))):
                    index = pending.popleft()
                    w.submit((index, None if loader is not None else items[index]))
                    if not w.queue:
                        w.deadline = time.monotonic() + timeout_s
                    w.queue.append(index)
            now = time.monotonic()
            deadlines = [w.started + startup_timeout_s if not w.ready else w.deadline
                         for w in pool if not w.ready or w.queue]
            readable = wait([w.conn for w in pool],
                            timeout=max(0.0, min(deadlines) - now) if deadlines else None)
            for w in list(pool):
                if w.conn in readable:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        w.kill()  # reaps it: exitcode is then the worker's own status
                        lost(w, f"worker died (exit code {w.proc.exitcode})")
                        if w.ready:  # a worker that cannot start: do not respawn blindly
                            pool.append(_Worker(ctx, loader, params))
                        continue
                    if msg == "ready":
                        w.ready = True
                    else:
                        w.queue.popleft()
                        if w.queue:
                            w.deadline = time.monotonic() + timeout_s  # the next item starts now
                        emit(msg)
            now = time.monotonic()
            for w in list(pool):
                if w.ready and w.queue and now > w.deadline:
                    w.kill()
                    lost(w, f"timed out after {timeout_s:g} s", timeout_s)
                    pool.append(_Worker(ctx, loader, params))
                elif not w.ready and now > w.started + startup_timeout_s:
                    w.kill()
                    pool.remove(w)
            if not pool:
                log.warning("crf_map: no pool worker could start; running %d items serially",
                            len(pending))
                return set(pending)
        return set()
    finally:
        for w in pool:
            if not w.queue and w.ready:
                w.stop()
            else:
                w.kill()


def crf_map(items: Items, *, workers: int, timeout_s: float, n_items: int | None = None,
            on_result: Callable[[CrfResult], None] | None = None, progress: bool = True,
            startup_timeout_s: float = 120.0, **crf_params: Any) -> list[CrfResult]:
    """Run :func:`dense_crf` over many images; results in input order.

    ``items`` is a sequence of ``(image, logits)`` pairs, or a picklable callable ``load(i) ->
    (image, logits)`` together with ``n_items`` (workers then load their own items, so large arrays
    are never pickled). ``crf_params`` are passed to :func:`dense_crf`.

    With ``workers > 1`` the items run in a spawn-mode process pool (safe from a process that has
    torch or CUDA loaded): an item running longer than ``timeout_s`` gets its worker killed and
    replaced and is returned as failed (``marginals=None``, ``error`` says why), as is an item whose
    worker crashed or whose computation raised. ``workers <= 1``, or a pool whose workers cannot
    start within ``startup_timeout_s``, runs serially in this process, where ``timeout_s`` is not
    enforced. ``on_result`` is called in this process as each result arrives (completion order).
    """
    if not isinstance(workers, int) or isinstance(workers, bool):
        raise ConfigError(f"workers={workers!r}: must be an integer (<= 1 means serial)")
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s={timeout_s!r}: must be > 0 seconds")
    if callable(items):
        if n_items is None or n_items < 0:
            raise ConfigError("n_items: required (>= 0) when items is a loader callable")
        loader, n = items, n_items
    else:
        loader, n = None, len(items)
    results: list[CrfResult | None] = [None] * n
    with tqdm(total=n, desc="crf", unit="img", **({} if progress else {"disable": True})) as bar:
        def emit(result: CrfResult) -> None:
            results[result.index] = result
            bar.update(1)
            if on_result is not None:
                on_result(result)

        todo: set[int] | range = range(n)
        if workers > 1 and n > 0:
            try:
                todo = _run_pool(n, items, loader, params=crf_params, workers=workers,
                                 timeout_s=timeout_s, startup_timeout_s=startup_timeout_s, emit=emit)
            except OSError as exc:  # e.g. cannot spawn processes here
                log.warning("crf_map: process pool failed (%s); running serially", exc)
                todo = [i for i in range(n) if results[i] is None]
        for index in sorted(todo):
            emit(_run_one(index, None if loader is not None else items[index], loader, crf_params))
    return results  # type: ignore[return-value]
