"""Dataset files we did not write (issue 19 items 3, 9, 10): an image replaced after prepare is caught at
extract (sha256 checked while decoding; ``extract.verify_files=false`` skips it); odd folder trees, bombs
under five-crop and interpolation errors in overrides are one error line."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.artifacts import ArtifactStore
from pipeline.cli import main

FOLDER = ["--preset", "folder", "dataset.n_classes=3", "extract.train_res=32", "extract.loader_workers=0",
          "backbone.name=vit_small_patch16_224.dino"]


def _invoke(*args: str) -> object:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _one_error_line(result: object, *needles: str) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output  # type: ignore[attr-defined]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # type: ignore[attr-defined]
    assert len(errors) == 1, result.stderr  # type: ignore[attr-defined]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _dataset(root: Path, n: int = 3, suffix: str = ".bmp") -> Path:
    rng = np.random.default_rng(0)
    folder = root / "imgs" / "train"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"im{i}{suffix}")
    return root


def test_an_image_replaced_after_prepare_is_caught_at_extract(root: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "mine")
    args = [*FOLDER, f"dataset.root={data}"]
    assert _invoke("run", "prepare", *args).exit_code == 0
    image = data / "imgs" / "train" / "im1.bmp"
    stat = image.stat()
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(image)  # BMP: same size in bytes
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: the index id does not change
    assert image.stat().st_size == stat.st_size
    _one_error_line(_invoke("run", "extract", *args), str(image), "changed since prepare indexed it")
    assert _invoke("run", "extract", *args, "extract.verify_files=false").exit_code == 0  # documented opt-out


@pytest.mark.parametrize("odd", ["non-utf8", "loop", "dangling"])
def test_odd_folder_trees_are_one_error_line(root: Path, tmp_path: Path, odd: str) -> None:
    data = _dataset(tmp_path / "mine")
    folder = data / "imgs" / "train"
    if odd == "non-utf8":
        name = os.fsencode(folder) + b"/caf\xe9.png"
        with open(name, "wb") as handle:
            handle.write((folder / "im0.bmp").read_bytes())
        needle = "caf\\xe9.png"
    elif odd == "loop":
        (folder / "a.png").symlink_to(folder / "b.png")
        (folder / "b.png").symlink_to(folder / "a.png")
        needle = "a.png"
    else:
        (folder / "gone.png").symlink_to(folder / "nowhere.png")
        needle = "gone.png is a dangling symlink"
    args = [*FOLDER, f"dataset.root={data}"]
    plan = _invoke("plan", "prepare", *args)
    assert "Traceback" not in plan.output and plan.exit_code in (0, 2), plan.output
    if plan.exit_code == 2:
        _one_error_line(plan, needle)
    _one_error_line(_invoke("run", "prepare", *args), needle)


def test_a_bomb_under_five_crop_is_named_and_skippable(root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    data = _dataset(tmp_path / "mine", n=3, suffix=".png")
    bomb = data / "imgs" / "train" / "bomb.png"
    Image.fromarray(np.zeros((80, 96, 3), np.uint8)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 80x96 > 2 x 2000 px: a bomb for PIL; 40x48 is not
    args = [*FOLDER, f"dataset.root={data}", "dataset.train_crop=five"]
    _one_error_line(_invoke("run", "prepare", *args), str(bomb), "decompression bomb")
    done = _invoke("run", "prepare", *args, "dataset.on_bad_input=skip")
    assert done.exit_code == 0, done.output
    manifest = ArtifactStore(root).manifest(ArtifactStore(root).ids("prepare")[0])
    assert [s["id"] for s in manifest["skipped"]] == ["bomb"] and str(bomb) in manifest["skipped"][0]["reason"]
    assert manifest["counts"]["samples"] == 15  # five crops of each good image


def test_an_interpolation_error_in_an_override_is_one_line(root: Path) -> None:
    unset = _invoke("config", "dataset.root=${oc.env:STEGOPIPE_SURELY_UNSET}")
    _one_error_line(unset, "config interpolation failed at dataset.root", "STEGOPIPE_SURELY_UNSET")
    missing = _invoke("plan", "prepare", "dataset.root=${nope.x}")
    _one_error_line(missing, "Interpolation key 'nope.x' not found")
    assert len(unset.stderr.strip().splitlines()) == len(missing.stderr.strip().splitlines()) == 1  # no full_key etc.
