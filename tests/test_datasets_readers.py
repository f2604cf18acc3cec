"""Dataset readers on tiny fake trees in each real on-disk layout (method.md §8), five-crop and bad inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.errors import ConfigError, InputError
from stages.datasets import SampleRef, check_sample, dataset_names, get_reader
from stages.datasets.base import jpeg_roundtrip
from stages.datasets.transforms import five_crop_boxes

RNG = np.random.default_rng(0)


def _rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _jpg(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


# ---------------------------------------------------------------------------------------- trees
def make_coco(root: Path) -> dict[str, np.ndarray]:
    """2 train ids, 1 val id; returns the fine label per id."""
    fine = {}
    for split, folder, list_name, ids in (
        ("train", "train2017", "Coco164kFull_Stuff_Coarse.txt", ["000000000009", "000000000025"]),
        ("val", "val2017", "Coco164kFull_Stuff_Coarse_7.txt", ["000000000139"]),
    ):
        for i in ids:
            _jpg(root / "images" / folder / f"{i}.jpg", _rgb(48, 64))
            lab = RNG.choice(np.array([0, 1, 105, 156, 181, 255], dtype=np.uint8), size=(48, 64))
            _png(root / "annotations" / folder / f"{i}.png", lab)
            fine[i] = lab
        (root / "curated" / folder).mkdir(parents=True, exist_ok=True)
        (root / "curated" / folder / list_name).write_text("\n".join(ids) + "\n\n")
    # a list the reader must not use for val
    (root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse.txt").write_text("000000000139\n000000000285\n")
    return fine


def make_cityscapes(root: Path) -> dict[str, np.ndarray]:
    images = {}
    for split, city, n in (("train", "bochum", 1), ("train", "aachen", 2), ("val", "frankfurt", 1)):
        for k in range(n):
            base = f"{city}_{k:06d}_000019"
            img = _rgb(32, 64)
            _png(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", img)
            ids = np.tile(np.array([0, 6, 7, 8, 33, 34, 255], dtype=np.uint8), (32, 10))[:, :64]
            _png(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png", ids)
            images[base] = img
    return images


def make_potsdam(root: Path) -> dict[str, np.ndarray]:
    imgs = {}
    (root / "imgs").mkdir(parents=True)
    (root / "gt").mkdir()
    for i in ("0", "1", "7"):
        img = RNG.integers(0, 256, (20, 20, 4), dtype=np.uint8)
        gt = np.tile(np.array([0, 1, 2, 3, 4, 5, 255, 7], dtype=np.int32), (20, 3))[:, :20]
        scipy.io.savemat(root / "imgs" / f"{i}.mat", {"img": img})
        scipy.io.savemat(root / "gt" / f"{i}.mat", {"gt": gt})
        imgs[i] = img
    (root / "labelled_train.txt").write_text("0\n1\n")
    (root / "labelled_test.txt").write_text("7\n")
    (root / "unlabelled_train.txt").write_text("5\n")
    return imgs


def make_folder(root: Path, labels: bool = True) -> None:
    for split, names in (("train", ["b", "a", "c"]), ("val", ["z"])):
        for n in names:
            _png(root / "imgs" / split / f"{n}.png", _rgb(10, 12))
            if labels:
                _png(root / "labels" / split / f"{n}.png", np.arange(120, dtype=np.uint8).reshape(10, 12) % 6)


# ---------------------------------------------------------------------------------------- registry
def test_dataset_names_and_unknown_name(tmp_path):
    assert dataset_names() == ["cocostuff27", "cityscapes", "potsdam", "folder", "synthetic"]
    with pytest.raises(ConfigError, match="'imagenet'.*cocostuff27, cityscapes, potsdam, folder, synthetic"):
        get_reader("imagenet", tmp_path)


def test_bad_options_are_config_errors(tmp_path):
    make_coco(tmp_path)
    with pytest.raises(ConfigError, match="crop='ten'.*none, five"):
        get_reader("cocostuff27", tmp_path, crop="ten")
    with pytest.raises(ConfigError, match="no option.*n_classes"):
        get_reader("cocostuff27", tmp_path, n_classes=5)
    with pytest.raises(ConfigError, match="split='test'.*train, val"):
        get_reader("cocostuff27", tmp_path).list_samples("test")
    with pytest.raises(ConfigError, match="n_classes"):
        get_reader("folder", tmp_path)


def test_missing_root_is_input_error(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path / "nope")):
        get_reader("cityscapes", tmp_path / "nope")


# ---------------------------------------------------------------------------------------- cocostuff
def test_cocostuff_lists_loads_and_remaps(tmp_path):
    fine = make_coco(tmp_path)
    r = get_reader("cocostuff27", tmp_path)
    assert r.n_classes == 27 and len(r.class_names) == 27
    train = r.list_samples("train")
    assert [s.id for s in train] == ["000000000009", "000000000025"]
    assert train[0] == SampleRef("000000000009", "images/train2017/000000000009.jpg",
                                 "annotations/train2017/000000000009.png", None)
    val = r.list_samples("val")
    assert [s.id for s in val] == ["000000000139"]  # from the _7 list
    img = r.load_image(train[1])
    assert img.dtype == np.uint8 and img.shape == (48, 64, 3)
    np.testing.assert_array_equal(img, np.asarray(Image.open(tmp_path / train[1].image).convert("RGB")))
    lab = r.load_label(train[1])
    assert lab.dtype == np.int16 and lab.shape == (48, 64)
    lut = {0: 9, 1: 11, 105: 23, 156: 23, 181: 24, 255: -1}
    np.testing.assert_array_equal(lab, np.vectorize(lut.get)(fine["000000000025"]))
    assert check_sample(r, train[0]) == (48, 64)


def test_cocostuff_grayscale_jpeg_becomes_rgb(tmp_path):
    make_coco(tmp_path)
    gray = RNG.integers(0, 256, (48, 64), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "images/train2017/000000000009.jpg", quality=95)
    r = get_reader("cocostuff27", tmp_path)
    img = r.load_image(r.list_samples("train")[0])
    assert img.shape == (48, 64, 3)
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])


def test_five_crop_ids_boxes_and_pixels(tmp_path):
    make_coco(tmp_path)
    full = get_reader("cocostuff27", tmp_path)
    r = get_reader("cocostuff27", tmp_path, crop="five")
    refs = r.list_samples("train")
    assert [s.id for s in refs] == [f"{i}_c{k}" for i in ("000000000009", "000000000025") for k in range(5)]
    boxes = [s.crop for s in refs[:5]]
    assert boxes == [(0, 0, 24, 32), (0, 32, 24, 32), (24, 0, 24, 32), (24, 32, 24, 32), (12, 16, 24, 32)]
    assert boxes == five_crop_boxes(48, 64)
    base = full.list_samples("train")[0]
    img, lab = full.load_image(base), full.load_label(base)
    for ref in refs[:5]:
        t, left, h, w = ref.crop
        np.testing.assert_array_equal(r.load_image(ref), img[t : t + h, left : left + w])
        np.testing.assert_array_equal(r.load_label(ref), lab[t : t + h, left : left + w])
        assert check_sample(r, ref) == (24, 32)


def test_five_crop_jpeg_roundtrip(tmp_path):
    make_coco(tmp_path)
    plain = get_reader("cocostuff27", tmp_path, crop="five")
    rt = get_reader("cocostuff27", tmp_path, crop="five", jpeg_roundtrip=True)
    ref = rt.list_samples("train")[4]
    crop = plain.load_image(ref)
    out = rt.load_image(ref)
    np.testing.assert_array_equal(out, jpeg_roundtrip(crop, 75))
    assert out.shape == crop.shape and not np.array_equal(out, crop)  # noisy image: JPEG is lossy
    np.testing.assert_array_equal(rt.load_label(ref), plain.load_label(ref))  # -1..26 survive uint8(l+1)
    # whole images are never re-encoded
    whole = get_reader("cocostuff27", tmp_path, jpeg_roundtrip=True)
    ref0 = whole.list_samples("train")[0]
    np.testing.assert_array_equal(whole.load_image(ref0), np.asarray(Image.open(tmp_path / ref0.image)))


def test_cocostuff_missing_list_names_it(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(InputError, match="Coco164kFull_Stuff_Coarse_7.txt does not exist"):
        get_reader("cocostuff27", tmp_path).list_samples("val")


def test_missing_image_file_names_it(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "images/train2017/000000000025.jpg").unlink()
    r = get_reader("cocostuff27", tmp_path)
    with pytest.raises(InputError, match=r"000000000025\.jpg does not exist"):
        check_sample(r, r.list_samples("train")[1])


def test_missing_image_file_fails_five_crop_listing(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "images/train2017/000000000025.jpg").unlink()
    with pytest.raises(InputError, match=r"000000000025\.jpg does not exist"):
        get_reader("cocostuff27", tmp_path, crop="five").list_samples("train")


@pytest.mark.parametrize("which", ["images/train2017/000000000009.jpg", "annotations/train2017/000000000009.png"])
def test_truncated_file_names_it(tmp_path, which):
    make_coco(tmp_path)
    path = tmp_path / which
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    r = get_reader("cocostuff27", tmp_path)
    with pytest.raises(InputError, match=rf"{path.name} is unreadable or truncated"):
        check_sample(r, r.list_samples("train")[0])


def test_label_size_mismatch_names_both_files(tmp_path):
    make_coco(tmp_path)
    _png(tmp_path / "annotations/train2017/000000000009.png", np.zeros((40, 64), dtype=np.uint8))
    r = get_reader("cocostuff27", tmp_path)
    with pytest.raises(InputError, match=r"000000000009\.png is 40x64 but image .*000000000009\.jpg is 48x64"):
        check_sample(r, r.list_samples("train")[0])


def test_rgb_label_is_rejected(tmp_path):
    make_coco(tmp_path)
    _png(tmp_path / "annotations/train2017/000000000009.png", _rgb(48, 64))
    r = get_reader("cocostuff27", tmp_path)
    with pytest.raises(InputError, match="single-channel"):
        r.load_label(r.list_samples("train")[0])


def test_crop_outside_image_is_input_error(tmp_path):
    make_coco(tmp_path)
    r = get_reader("cocostuff27", tmp_path)
    ref = SampleRef("x", "images/train2017/000000000009.jpg", None, (30, 0, 24, 32))
    with pytest.raises(InputError, match="outside"):
        r.load_image(ref)


# ---------------------------------------------------------------------------------------- cityscapes
def test_cityscapes_lists_sorted_and_remaps(tmp_path):
    images = make_cityscapes(tmp_path)
    r = get_reader("cityscapes", tmp_path)
    assert r.n_classes == 27 and r.class_names[0] == "road"
    refs = r.list_samples("train")
    assert [s.id for s in refs] == ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000019"]
    assert refs[0].label == "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    np.testing.assert_array_equal(r.load_image(refs[1]), images["aachen_000001_000019"])
    lab = r.load_label(refs[0])
    assert lab.dtype == np.int16
    # label ids 0, 6, 7, 8, 33, 34, 255 -> -1, -1, 0, 1, 26, -1, -1
    assert lab[0, :7].tolist() == [-1, -1, 0, 1, 26, -1, -1]
    assert [s.id for s in r.list_samples("val")] == ["frankfurt_000000_000019"]


def test_cityscapes_missing_label_and_folder(tmp_path):
    make_cityscapes(tmp_path)
    (tmp_path / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png").unlink()
    r = get_reader("cityscapes", tmp_path)
    with pytest.raises(InputError, match="frankfurt_000000_000019_gtFine_labelIds.png does not exist"):
        r.list_samples("val")
    with pytest.raises(InputError, match=r"leftImg8bit/val does not exist"):
        get_reader("cityscapes", tmp_path / "gtFine").list_samples("val")


# ---------------------------------------------------------------------------------------- potsdam
def test_potsdam_lists_loads_and_remaps(tmp_path):
    imgs = make_potsdam(tmp_path)
    r = get_reader("potsdam", tmp_path)
    assert r.n_classes == 3
    assert [s.id for s in r.list_samples("train")] == ["0", "1"]
    (val,) = r.list_samples("val")
    assert val == SampleRef("7", "imgs/7.mat", "gt/7.mat", None)
    img = r.load_image(val)
    assert img.dtype == np.uint8 and img.shape == (20, 20, 3)
    np.testing.assert_array_equal(img, imgs["7"][:, :, :3])
    lab = r.load_label(val)
    assert lab.dtype == np.int16 and lab[0, :8].tolist() == [0, 1, 2, 2, 0, 1, -1, 0]
    assert check_sample(r, val) == (20, 20)


def test_potsdam_missing_key_and_file(tmp_path):
    make_potsdam(tmp_path)
    scipy.io.savemat(tmp_path / "gt" / "1.mat", {"label": np.zeros((20, 20), dtype=np.int32)})
    r = get_reader("potsdam", tmp_path)
    ref0, ref1 = r.list_samples("train")
    with pytest.raises(InputError, match=r"gt/1\.mat has no key 'gt'"):
        r.load_label(ref1)
    (tmp_path / "imgs" / "0.mat").unlink()
    with pytest.raises(InputError, match=r"imgs/0\.mat does not exist"):
        check_sample(r, ref0)
    (tmp_path / "labelled_test.txt").unlink()
    with pytest.raises(InputError, match="labelled_test.txt does not exist"):
        r.list_samples("val")


def test_potsdam_truncated_mat(tmp_path):
    make_potsdam(tmp_path)
    path = tmp_path / "imgs" / "7.mat"
    path.write_bytes(path.read_bytes()[:200])
    r = get_reader("potsdam", tmp_path)
    with pytest.raises(InputError, match=r"7\.mat is unreadable or truncated"):
        check_sample(r, r.list_samples("val")[0])


# ---------------------------------------------------------------------------------------- folder
def test_folder_labelled(tmp_path):
    make_folder(tmp_path)
    r = get_reader("folder", tmp_path, n_classes=4)
    assert r.class_names == ["class_0", "class_1", "class_2", "class_3"]
    refs = r.list_samples("train")
    assert [s.id for s in refs] == ["a", "b", "c"]
    assert refs[0] == SampleRef("a", "imgs/train/a.png", "labels/train/a.png", None)
    lab = r.load_label(refs[0])
    assert lab[0, :7].tolist() == [0, 1, 2, 3, -1, -1, 0]  # values >= 4 ignored
    assert check_sample(r, refs[2]) == (10, 12)


def test_folder_unlabelled(tmp_path):
    make_folder(tmp_path, labels=False)
    r = get_reader("folder", tmp_path, n_classes=2, class_names=["bg", "fg"])
    (ref,) = r.list_samples("val")
    assert ref.label is None
    lab = r.load_label(ref)
    assert lab.shape == (10, 12) and lab.dtype == np.int16 and (lab == -1).all()


def test_folder_errors(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "labels/train/b.png").unlink()
    with pytest.raises(InputError, match=r"labels/train does not match .*no label for \['b'\]"):
        get_reader("folder", tmp_path, n_classes=3).list_samples("train")
    with pytest.raises(ConfigError, match="class_names has 1 names but n_classes=3"):
        get_reader("folder", tmp_path, n_classes=3, class_names=["x"])
    with pytest.raises(InputError, match=r"imgs/val does not exist"):
        get_reader("folder", tmp_path / "labels", n_classes=3).list_samples("val")
