"""benchmarks/scale.py's pieces that decide what the rehearsal measures: sizes, the disk check, the
dataset it builds and the limits it reports (the rehearsal itself is `make bench-scale`, tens of GB)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from PIL import Image

from benchmarks import scale


def test_auto_size_puts_4n_above_1_2x_ram():
    ram = 25_000_000_000
    n = scale._size_n("auto", ram)
    assert n % 64 == 0 and 4 * n * scale.TOKEN_BYTES >= 1.2 * ram > 4 * (n - 64) * scale.TOKEN_BYTES
    assert scale._size_n("2048", ram) == 2048


def test_disk_needed_covers_the_4n_stores():
    n = 12_544
    assert scale.disk_needed(n) > 4 * n * scale.TOKEN_BYTES > 30e9


def test_dataset_samples_differ_and_labels_are_hard_links(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, "BASES", 2)
    folder = scale.make_dataset(tmp_path / "full", n_train=5, n_val=2)
    imgs = [np.asarray(Image.open(folder / "imgs" / "train" / f"{i:06d}.jpg")) for i in range(5)]
    assert all(a.shape == (scale.HEIGHT, scale.WIDTH, 3) for a in imgs)
    assert len({a.tobytes() for a in imgs}) == 5  # base scene 0 is samples 0, 2, 4: colours differ
    labels = [folder / "labels" / "train" / f"{i:06d}.png" for i in range(5)]
    assert os.path.samefile(labels[0], labels[4]) and not os.path.samefile(labels[0], labels[2])  # 2: mirrored
    assert np.array_equal(np.asarray(Image.open(labels[2])), np.asarray(Image.open(labels[0]))[:, ::-1])
    small = scale.link_prefix(folder, tmp_path / "small", 3, 1)
    assert sorted(p.name for p in (small / "imgs" / "train").iterdir()) == ["000000.jpg", "000001.jpg", "000002.jpg"]
    assert os.path.samefile(small / "imgs" / "val" / "000000.jpg", folder / "imgs" / "val" / "000000.jpg")


def test_limits_follow_the_measured_rates():
    n, n_val = 8000, 500
    meta = {"disk_read_b_s": 1e9, "disk_write_b_s": 5e8, "sgemm32_gflops": 100.0, "xtx64_gflops": 40.0,
            "decode_only_img_s": 1000.0, "decode_img_s": 400.0, "forward_img_s": 800.0}
    train, val = n * scale.TOKEN_BYTES, n_val * 2 * scale.TOKEN_BYTES
    stages = {"extract train": {"bytes": train}, "extract val": {"bytes": val}}
    got = scale.limits({"n": n, "n_val": n_val, "stages": stages}, meta)
    assert got["prepare train"] == pytest.approx(n / 1000)
    assert got["extract train"] == pytest.approx(max(n / 400, n / 800, train / 5e8))  # parts overlap: the slowest
    assert got["extract val"] == pytest.approx(max(n_val / 400, 2 * n_val / 800, val / 5e8))  # flip: 2 forwards
    assert got["knn"] == pytest.approx(train / 1e9 + n * (n + 1) / 2 * 768 / 100e9)
    fit = scale.FIT_N * scale.TOKEN_BYTES  # reduce reads the fit images only, not the whole store
    assert got["reduce pca"] == pytest.approx(max(fit / 1e9, scale.FIT_N * 784 * 384**2 * 2 / 40e9))
    assert got["evaluate pca"] == pytest.approx(val / 1e9)
    assert math.isnan(got["train-head"]) and set(got) == {label for label, *_ in scale.STAGE_RUNS}
