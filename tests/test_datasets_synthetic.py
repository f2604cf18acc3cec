"""Synthetic dataset: determinism, exact labels, class separability, speed, reading via the folder reader."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, InputError
from stages.datasets import SYNTHETIC_CLASS_NAMES, check_sample, generate_synthetic, get_reader


def _bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a = _bytes(generate_synthetic(tmp_path / "a", n_train=4, n_val=2, size=(32, 48), seed=3))
    b = _bytes(generate_synthetic(tmp_path / "b", n_train=4, n_val=2, size=(32, 48), seed=3))
    c = _bytes(generate_synthetic(tmp_path / "c", n_train=4, n_val=2, size=(32, 48), seed=4))
    assert len(a) == 12 and a == b
    assert sorted(a) == sorted(c)
    assert all(a[k] != c[k] for k in a if k.startswith("imgs"))
    # train and val images differ from each other under one seed
    assert a["imgs/train/00000.png"] != a["imgs/val/00000.png"]


def test_more_images_keep_the_earlier_ones(tmp_path):
    small = _bytes(generate_synthetic(tmp_path / "s", n_train=2, n_val=1, size=(24, 24), seed=0))
    big = _bytes(generate_synthetic(tmp_path / "b", n_train=5, n_val=1, size=(24, 24), seed=0))
    assert all(big[k] == v for k, v in small.items())


def test_read_through_reader_and_classes_are_separable(tmp_path):
    root = generate_synthetic(tmp_path, n_train=12, n_val=3, size=(48, 64), seed=0)
    r = get_reader("synthetic", root)
    assert r.n_classes == 5 and r.class_names == SYNTHETIC_CLASS_NAMES
    train = r.list_samples("train")
    assert [s.id for s in train] == [f"{i:05d}" for i in range(12)] and len(r.list_samples("val")) == 3
    pixels, labels = [], []
    grad, count = np.zeros(5), np.zeros(5)
    for ref in train:
        assert check_sample(r, ref) == (48, 64)
        img, lab = r.load_image(ref).astype(np.float64), r.load_label(ref)
        pixels.append(img.reshape(-1, 3))
        labels.append(lab.ravel())
        step = np.abs(np.diff(img, axis=1)).sum(-1)  # horizontal neighbour difference inside one region
        for k in range(5):
            inside = (lab[:, 1:] == k) & (lab[:, :-1] == k)
            grad[k] += step[inside].sum()
            count[k] += inside.sum()
    x, y = np.concatenate(pixels), np.concatenate(labels)
    assert y.min() >= 0 and y.max() <= 4
    assert set(np.unique(y)) == {0, 1, 2, 3, 4}  # every class appears in 12 scenes
    # nearest class-mean colour already classifies most pixels: colour is informative
    means = np.stack([x[y == k].mean(0) for k in range(5)])
    pred = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == y).mean() > 0.8
    # texture: sky is smooth along rows, grass (noise) and road (stripes) are rough, water in between
    texture = grad / count
    assert texture[0] < 1.0 and texture[1] > 20 and texture[2] > 20 and 3 < texture[3] < 20


def test_labels_are_exact_region_masks(tmp_path):
    root = generate_synthetic(tmp_path, n_train=3, n_val=0, size=(40, 40), seed=1)
    r = get_reader("synthetic", root)
    for ref in r.list_samples("train"):
        img, lab = r.load_image(ref), r.load_label(ref)
        sky = img[lab == 0].astype(int)
        assert (sky[:, 2] > sky[:, 0]).all()  # sky pixels are blue
        obj = img[lab == 4].astype(int)
        assert (obj.max(1) - obj.min(1) > 60).all()  # object pixels are saturated


def test_demo_size_is_fast(tmp_path):
    t0 = time.process_time()  # CPU time of this process: other load on the machine does not count
    generate_synthetic(tmp_path, n_train=80, n_val=20, size=(96, 128), seed=0)
    assert time.process_time() - t0 < 5.0


def test_refuses_foreign_files_and_bad_args(tmp_path):
    generate_synthetic(tmp_path, n_train=3, n_val=1, size=(16, 16), seed=0)
    generate_synthetic(tmp_path, n_train=3, n_val=1, size=(16, 16), seed=0)  # same names: overwrite is fine
    with pytest.raises(InputError, match=r"imgs/train already holds other files \(00002.png\)"):
        generate_synthetic(tmp_path, n_train=2, n_val=1, size=(16, 16), seed=0)
    with pytest.raises(ConfigError, match="size"):
        generate_synthetic(tmp_path / "x", n_train=1, n_val=1, size=(4, 16), seed=0)
