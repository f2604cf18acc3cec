"""Segmentation metrics: confusion matrix, Hungarian matching, mIoU / pixel accuracy (pure numpy/scipy).

Conventions (method.md §6): a confusion matrix is int64 ``[n_clusters, n_classes]`` indexed
``[prediction, truth]``. Scores are computed on a *histogram* whose row ``k`` holds the pixels
predicted as class ``k`` (for the cluster probe: the cluster Hungarian-matched to class ``k``).
``mIoU`` and ``accuracy`` are reported ×100; per-class ``iou``, ``precision`` and ``recall`` are
fractions with NaN where undefined (0/0).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import InputError
from pipeline.lazy import lazy_module

optimize = lazy_module("scipy.optimize")

__all__ = ["confusion_matrix", "scores", "map_clusters"]


def _as_int_array(x: Any, name: str) -> np.ndarray:
    """Return ``x`` (numpy array or torch tensor) as a flat int64 numpy array."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise InputError(f"{name}: expected integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False).ravel()


def confusion_matrix(preds: Any, targets: Any, n_classes: int,
                     n_clusters: int | None = None) -> np.ndarray:
    """Count ``[prediction, truth]`` pairs over all pixels.

    ``preds`` and ``targets`` (numpy or torch, same number of elements, any shape) hold integer ids.
    Pixels whose target lies outside ``[0, n_classes)`` (e.g. -1, 255) are ignored. Every remaining
    pixel must have a prediction in ``[0, n_clusters)`` (``n_clusters`` defaults to ``n_classes``);
    predictions of extra clusters (``>= n_classes``) are kept, unlike the reference which drops them
    (use ``scores(..., drop_extra_clusters=True)`` to reproduce that). Returns int64
    ``[n_clusters, n_classes]``.
    """
    n_clusters = n_classes if n_clusters is None else n_clusters
    if n_classes < 1 or n_clusters < 1:
        raise InputError(f"confusion_matrix: n_classes={n_classes} and n_clusters={n_clusters} "
                         "must both be >= 1")
    p = _as_int_array(preds, "preds")
    t = _as_int_array(targets, "targets")
    if p.size != t.size:
        raise InputError(f"confusion_matrix: preds has {p.size} elements but targets has {t.size}; "
                         "they must describe the same pixels")
    valid = (t >= 0) & (t < n_classes)
    p, t = p[valid], t[valid]
    bad = (p < 0) | (p >= n_clusters)
    if bad.any():
        raise InputError(f"preds: {int(bad.sum())} labelled pixels have a prediction outside "
                         f"[0, {n_clusters}) (e.g. {int(p[bad][0])})")
    counts = np.bincount(p * n_classes + t, minlength=n_clusters * n_classes)
    return counts.reshape(n_clusters, n_classes).astype(np.int64)


def _per_class(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU, precision, recall per histogram column (rows = prediction, cols = truth)."""
    h = hist.astype(np.float64)
    tp = np.diag(h)
    predicted = h.sum(axis=1)  # pixels predicted as k
    actual = h.sum(axis=0)  # pixels whose truth is k
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (predicted + actual - tp)
        precision = tp / predicted
        recall = tp / actual
    return iou, precision, recall


def scores(confusion: np.ndarray, hungarian: bool, *,
           drop_extra_clusters: bool = False) -> dict[str, Any]:
    """mIoU, accuracy and per-class scores of a ``[n_clusters, n_classes]`` confusion matrix.

    ``hungarian=False`` (linear probe): predictions are class ids, the matrix must be square and
    is used as it stands. ``hungarian=True`` (cluster probe): clusters are matched one-to-one to
    classes maximising the matched pixel count (``scipy.optimize.linear_sum_assignment``).

    With more clusters than classes the pixels of unmatched clusters are wrong predictions: they
    are gathered in an extra "unmatched" row of the histogram (plus a zero column, making it
    ``(n+1)×(n+1)``) and lower the IoU of their true class and the accuracy; the per-class lists
    and mIoU cover the ``n`` real classes. ``drop_extra_clusters=True`` reproduces the reference
    instead (method.md §6.2-6.3): pixels predicted as cluster ids ``>= n_classes`` are discarded before
    matching and the "Extra" row/column counts as an ``n+1``-th class (IoU 0, or NaN when empty).

    Returns a dict: ``miou``, ``accuracy`` (×100, NaN without pixels), ``iou``, ``precision``
    (of pixels predicted k, the fraction truly k), ``recall`` (of pixels truly k, the fraction
    predicted k) as lists of floats, ``histogram`` (int64, rows = matched prediction, cols =
    truth) and ``assignment`` (int64 ``[n_clusters]``: class of each cluster, -1 if unmatched).
    Note: the MXM code names precision "recall" and vice versa; these are the usual meanings.
    """
    conf = np.asarray(confusion)
    if conf.ndim != 2 or conf.dtype.kind not in "iu" or (conf < 0).any():
        raise InputError(f"confusion: expected a 2-D non-negative integer matrix "
                         f"[n_clusters, n_classes], got shape {conf.shape} dtype {conf.dtype}")
    conf = conf.astype(np.int64)
    n_clusters, n_classes = conf.shape
    if drop_extra_clusters:
        conf = conf.copy()
        conf[n_classes:] = 0
    if not hungarian:
        if n_clusters != n_classes:
            raise InputError(f"confusion: shape {conf.shape} is not square; scores without "
                             "Hungarian matching need one prediction id per class")
        assignment = np.arange(n_classes, dtype=np.int64)
    else:
        rows, cols = optimize.linear_sum_assignment(conf, maximize=True)
        assignment = np.full(n_clusters, -1, dtype=np.int64)
        assignment[rows] = cols
    hist = np.zeros((n_classes, n_classes), dtype=np.int64)
    for cluster, cls in enumerate(assignment):
        if cls >= 0:
            hist[cls] = conf[cluster]
    unmatched = assignment < 0
    n_scored = n_classes
    if unmatched.any():
        extra_row = conf[unmatched].sum(axis=0)
        hist = np.vstack([hist, extra_row[None, :]])
        hist = np.hstack([hist, np.zeros((n_classes + 1, 1), dtype=np.int64)])
        if drop_extra_clusters:
            n_scored = n_classes + 1
    iou, precision, recall = _per_class(hist)
    iou, precision, recall = iou[:n_scored], precision[:n_scored], recall[:n_scored]
    total = hist.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = 100.0 * np.trace(hist) / total if total else float("nan")
    miou = 100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    return {
        "miou": miou,
        "accuracy": float(accuracy),
        "iou": iou.tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "histogram": hist,
        "assignment": assignment,
    }


def map_clusters(preds: Any, assignment: np.ndarray) -> np.ndarray:
    """Replace cluster ids by their matched class ids (for plotting).

    ``preds`` (numpy or torch, any shape, integer) → int64 numpy array of the same shape; pixels of
    unmatched clusters, or with an id outside ``[0, len(assignment))``, become -1.
    """
    if hasattr(preds, "detach"):
        preds = preds.detach().cpu().numpy()
    p = np.asarray(preds)
    if p.dtype.kind not in "iu":
        raise InputError(f"preds: expected integer cluster ids, got dtype {p.dtype}")
    lut = np.asarray(assignment, dtype=np.int64).ravel()
    out = np.full(p.shape, -1, dtype=np.int64)
    inside = (p >= 0) & (p < lut.size)
    out[inside] = lut[p[inside]]
    return out
