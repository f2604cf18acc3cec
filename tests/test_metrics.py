"""Metrics: RV6 of the reference spec exactly, plus extra-cluster behaviour."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from stages.evaluation.metrics import confusion_matrix, map_clusters, scores

RV6_TARGET = [0, 0, 0, 1, 1, 2, 2, 2, -1, 1, 0, 2]
RV6_PREDS = [1, 1, 0, 2, 2, 0, 0, 0, 1, 2, 1, 1]


def test_rv6_confusion_numpy_and_torch():
    expected = np.array([[1, 0, 3], [3, 0, 1], [0, 3, 0]])
    conf = confusion_matrix(np.array(RV6_PREDS), np.array(RV6_TARGET), 3)
    assert conf.dtype == np.int64 and conf.shape == (3, 3)
    np.testing.assert_array_equal(conf, expected)
    conf_t = confusion_matrix(torch.tensor(RV6_PREDS).view(3, 4), torch.tensor(RV6_TARGET).view(3, 4), 3)
    np.testing.assert_array_equal(conf_t, expected)
    assert conf.sum() == 11  # the -1 pixel is dropped


def test_rv6_cluster_hungarian():
    s = scores(confusion_matrix(RV6_PREDS, RV6_TARGET, 3), hungarian=True)
    np.testing.assert_array_equal(s["assignment"], [2, 0, 1])
    np.testing.assert_array_equal(s["histogram"], [[3, 0, 1], [0, 3, 0], [1, 0, 3]])
    np.testing.assert_allclose(s["iou"], [0.6, 1.0, 0.6])
    assert s["miou"] == pytest.approx(73.3333333, abs=1e-4)
    assert s["accuracy"] == pytest.approx(81.8181818, abs=1e-4)
    np.testing.assert_allclose(s["precision"], [0.75, 1.0, 0.75])
    np.testing.assert_allclose(s["recall"], [0.75, 1.0, 0.75])


def test_rv6_linear_no_hungarian():
    s = scores(confusion_matrix(RV6_PREDS, RV6_TARGET, 3), hungarian=False)
    np.testing.assert_allclose(s["iou"], [1 / 7, 0.0, 0.0], atol=1e-6)
    assert s["miou"] == pytest.approx(4.7619048, abs=1e-4)
    assert s["accuracy"] == pytest.approx(9.0909091, abs=1e-4)
    np.testing.assert_array_equal(s["assignment"], [0, 1, 2])


def test_rv6_absent_class_counts_zero():
    s = scores(confusion_matrix([0, 0, 1, 2], [0, 0, 1, 1], 3), hungarian=False)
    np.testing.assert_allclose(s["iou"], [1.0, 0.5, 0.0])
    assert s["miou"] == pytest.approx(50.0)
    assert s["accuracy"] == pytest.approx(75.0)


def test_rv6_class_neither_present_nor_predicted_is_nan():
    s = scores(confusion_matrix([0, 0, 1, 1], [0, 0, 1, 1], 3), hungarian=False)
    assert s["iou"][:2] == [1.0, 1.0] and math.isnan(s["iou"][2])
    assert s["miou"] == pytest.approx(100.0)
    assert s["accuracy"] == pytest.approx(100.0)


def test_ignored_targets_and_bad_predictions():
    conf = confusion_matrix([0, 1, 5, 7], [0, 1, 255, -3], 2)
    np.testing.assert_array_equal(conf, [[1, 0], [0, 1]])
    with pytest.raises(InputError, match="outside"):
        confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(InputError, match="elements"):
        confusion_matrix([0, 1, 1], [0, 1], 2)
    with pytest.raises(InputError, match="square"):
        scores(np.zeros((3, 2), dtype=np.int64), hungarian=False)


# Extra clusters: 2 classes, 3 clusters. Truth 0: 4 px in cluster 0, 1 px in cluster 2;
# truth 1: 3 px in cluster 1, 2 px in cluster 2.
EXTRA_PREDS = [0, 0, 0, 0, 2, 1, 1, 1, 2, 2]
EXTRA_TARGET = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_extra_clusters_count_as_errors():
    conf = confusion_matrix(EXTRA_PREDS, EXTRA_TARGET, 2, n_clusters=3)
    np.testing.assert_array_equal(conf, [[4, 0], [0, 3], [1, 2]])
    s = scores(conf, hungarian=True)
    np.testing.assert_array_equal(s["assignment"], [0, 1, -1])
    np.testing.assert_array_equal(s["histogram"], [[4, 0, 0], [0, 3, 0], [1, 2, 0]])
    np.testing.assert_allclose(s["iou"], [4 / 5, 3 / 5])  # unmatched pixels are misses
    assert s["miou"] == pytest.approx(70.0)
    assert s["accuracy"] == pytest.approx(70.0)
    np.testing.assert_allclose(s["recall"], [0.8, 0.6])
    np.testing.assert_allclose(s["precision"], [1.0, 1.0])


def test_extra_clusters_reference_mode_drops_extra_pixels():
    conf = confusion_matrix(EXTRA_PREDS, EXTRA_TARGET, 2, n_clusters=3)
    s = scores(conf, hungarian=True, drop_extra_clusters=True)
    # cluster 2 (id >= n_classes) is dropped: 7 pixels remain, all correct; "Extra" row is empty.
    np.testing.assert_array_equal(s["histogram"], [[4, 0, 0], [0, 3, 0], [0, 0, 0]])
    assert s["iou"][:2] == [1.0, 1.0] and math.isnan(s["iou"][2]) and len(s["iou"]) == 3
    assert s["miou"] == pytest.approx(100.0)
    assert s["accuracy"] == pytest.approx(100.0)


def test_reference_mode_matches_over_kept_rows():
    # clusters 0/1 are matched crosswise; cluster 2 (id >= n_classes) is dropped before matching.
    conf = np.array([[1, 5], [2, 0], [3, 0]], dtype=np.int64)
    s = scores(conf, hungarian=True, drop_extra_clusters=True)
    np.testing.assert_array_equal(s["histogram"], [[2, 0, 0], [1, 5, 0], [0, 0, 0]])
    assert s["accuracy"] == pytest.approx(100 * 7 / 8)
    np.testing.assert_allclose(s["iou"][:2], [2 / 3, 5 / 6])
    # without dropping, cluster 2 takes class 0 and cluster 1 is unmatched (counted as errors)
    s_keep = scores(conf, hungarian=True)
    np.testing.assert_array_equal(s_keep["assignment"], [1, -1, 0])
    np.testing.assert_array_equal(s_keep["histogram"], [[3, 0, 0], [1, 5, 0], [2, 0, 0]])
    assert s_keep["accuracy"] == pytest.approx(100 * 8 / 11)
    assert len(s_keep["iou"]) == 2


def test_fewer_clusters_than_classes():
    conf = confusion_matrix([0, 0, 1, 1], [0, 1, 2, 2], 3, n_clusters=2)
    s = scores(conf, hungarian=True)
    np.testing.assert_array_equal(s["assignment"], [0, 2])
    np.testing.assert_allclose(s["iou"], [0.5, 0.0, 1.0])
    assert s["accuracy"] == pytest.approx(75.0)


def test_map_clusters():
    out = map_clusters(torch.tensor([[0, 1], [2, 5]]), np.array([2, 0, -1]))
    np.testing.assert_array_equal(out, [[2, 0], [-1, -1]])
    with pytest.raises(InputError):
        map_clusters(np.array([0.5]), np.array([0]))
