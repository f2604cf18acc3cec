"""Compiled running top-k selection for :func:`stages.stego.knn.topk_neighbors` on CPU (numba).

A similarity block arrives as the int32 bit patterns of its float32 values. ``best[i]`` holds row ``i``'s
current top-k sort keys, descending, padded with int64 min. A key is
``mono(similarity) * 2**32 + (2**32 - 1 - column)`` where ``mono`` maps float bits to an int32 of the same
order (and -0.0 onto +0.0), so keys are unique and a larger key is a better neighbour. The row's own
column gets the key of +inf (self first). A similarity can enter ``best[i]`` only when its ``mono`` is at
least the k-th key's, so each chunk of similarities is first reduced to its max (vectorised) and only
chunks that reach the row's threshold are scanned element by element.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from stages.stego.knn import _LOW as _HIGH  # the key's column part: one definition of the key layout

_CHUNK = 64  # similarities per vectorised max before a scalar scan
_SELF_MONO = 0x7F800000  # mono(+inf)
_INT32_MIN = -2147483648


@njit(cache=True, inline="always")
def _mono(bits):
    """Order-preserving int32 of a float32's bits (-0.0 maps to -1; callers fold it onto 0)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@njit(cache=True, inline="always")
def _threshold(row):
    """``mono`` of the row's k-th similarity (int32 min while the row has fewer than k keys)."""
    return np.int32(row[-1] >> 32)


@njit(cache=True, inline="always")
def _offer(row, m, column):
    """Insert key (m, column) into the descending ``row`` if it beats the k-th key."""
    if m == -1:
        m = 0  # -0.0 ties with +0.0
    key = np.int64(m) * _HIGH + (_HIGH - 1 - column)
    if key <= row[-1]:
        return
    p = row.shape[0] - 1
    while p > 0 and row[p - 1] < key:
        row[p] = row[p - 1]
        p -= 1
    row[p] = key


@njit(cache=True, inline="always")
def _scan(values, lo, hi, i, c0, row, t):
    """Offer ``values[lo:hi]`` (columns ``c0 + j``) to row ``i``; returns the updated threshold."""
    for j in range(lo, hi):
        m = _mono(values[j])
        if m >= t - 1 and c0 + j != i:  # t - 1: a -0.0 may tie a +0.0 threshold
            _offer(row, m, c0 + j)
            t = _threshold(row)
    return t


@njit(cache=True, nogil=True)
def select_rows(bits, r0, c0, best):
    """Offer block ``bits`` (rows ``r0 + a``, columns ``c0 + b``) to the rows' top-k keys ``best[r0 + a]``."""
    b, c = bits.shape
    full = c // _CHUNK * _CHUNK
    for a in range(b):
        i = r0 + a
        row = best[i]
        values = bits[a]
        if c0 <= i < c0 + c:
            _offer(row, _SELF_MONO, i)
        t = _threshold(row)
        for lo in range(0, full, _CHUNK):
            top = np.int32(_INT32_MIN)
            for j in range(_CHUNK):
                top = max(top, _mono(values[lo + j]))
            if top >= t - 1:
                t = _scan(values, lo, lo + _CHUNK, i, c0, row, t)
        _scan(values, full, c, i, c0, row, t)


@njit(cache=True, nogil=True)
def select_columns(bits, r0, c0, best):
    """Offer the transpose of block ``bits`` to the columns' rows: ``bits[a, b]`` is a candidate of row
    ``c0 + b`` at column ``r0 + a``. Blocks must not overlap the diagonal (self is added by select_rows).

    Row by row, each chunk of columns is compared with those columns' thresholds at once (a vectorised
    count); only chunks with a hit are offered element by element."""
    b, c = bits.shape
    limits = np.empty(c, dtype=np.int32)  # threshold - 1 of each column's row (a -0.0 may tie +0.0)
    for j in range(c):
        limits[j] = max(np.int64(_threshold(best[c0 + j])) - 1, _INT32_MIN)
    full = c // _CHUNK * _CHUNK
    for a in range(b):
        values = bits[a]
        for lo in range(0, full, _CHUNK):
            hits = 0
            for j in range(_CHUNK):
                hits += _mono(values[lo + j]) >= limits[lo + j]
            if hits:
                _offer_columns(values, lo, lo + _CHUNK, r0 + a, c0, best, limits)
        _offer_columns(values, full, c, r0 + a, c0, best, limits)


@njit(cache=True, inline="always")
def _offer_columns(values, lo, hi, column, c0, best, limits):
    """Offer ``values[j]`` (row ``column`` of the block) to row ``c0 + j`` for ``j`` in ``[lo, hi)``."""
    for j in range(lo, hi):
        m = _mono(values[j])
        if m >= limits[j]:
            row = best[c0 + j]
            _offer(row, m, column)
            limits[j] = max(np.int64(_threshold(row)) - 1, _INT32_MIN)
