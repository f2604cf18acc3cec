"""Bad inputs through the CLI: one clear line naming the file or key and what is wrong, exit status 2, nothing
published. Label values beyond the classes keep the reference behaviour (ignored), checked end to end."""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import torch
from click.testing import CliRunner
from PIL import Image

import stages.extract as extract_module
from pipeline.artifacts import ArtifactStore
from pipeline.cli import main
from stages.store import open_token_store
from tests.faults_util import cli_args
from tests.test_stego_import import _checkpoint, _save


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(root: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--quiet", *args], env={"STEGOPIPE_ROOT": str(root)})


def refused(result: Any, *needles: str) -> str:
    """Assert exit status 2 and one error line (no traceback) holding every needle; returns the line."""
    assert result.exit_code == 2, result.output
    lines = re.split(r"[\r\n]+", result.stderr.strip())  # progress bars may precede the error
    line = lines[-1]
    assert line.startswith("error: ") and "Traceback" not in result.output, result.output
    assert sum("error" in x for x in lines) == 1, result.stderr
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def published(root: Path, stage: str | None = None) -> list[str]:
    return ArtifactStore(root).ids(stage) if root.exists() else []


def folder_dataset(tmp_path: Path, *, ext: str = ".png", n: int = 3, label_value: int | None = None) -> Path:
    """imgs/{train,val}/{i}{ext} (40×48 RGB) with labels/{split}/{i}.png: left half class 0, right half
    class 1 (or ``label_value`` on the left half)."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (data / "imgs" / split).mkdir(parents=True)
        (data / "labels" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / "imgs" / split / f"{i}{ext}")
            label = np.ones((40, 48), np.uint8)
            label[:, :24] = 0 if label_value is None else label_value
            Image.fromarray(label).save(data / "labels" / split / f"{i}.png")
    return data


def folder_args(data: Path) -> list[str]:
    return ["dataset.name=folder", f"dataset.root={data}", "dataset.n_classes=2", "dataset.check_workers=1"]


# --------------------------------------------------------------------------------------------------
# dataset files
# --------------------------------------------------------------------------------------------------


def test_truncated_jpeg(root: Path, tmp_path: Path) -> None:
    data = folder_dataset(tmp_path, ext=".jpg")
    jpeg = data / "imgs" / "train" / "1.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    refused(cli(root, *cli_args("prepare", *folder_args(data))), str(jpeg), "truncated")
    assert published(root) == []


def test_label_png_of_the_wrong_size(root: Path, tmp_path: Path) -> None:
    data = folder_dataset(tmp_path)
    label = data / "labels" / "train" / "2.png"
    Image.fromarray(np.zeros((20, 48), np.uint8)).save(label)
    refused(cli(root, *cli_args("prepare", *folder_args(data))), str(label), "20x48",
            str(data / "imgs" / "train" / "2.png"), "40x48")
    assert published(root) == []


def test_label_values_beyond_the_classes_are_ignored_as_in_the_reference(root: Path, tmp_path: Path) -> None:
    """n_classes=2 and a label 7 on the left half: values >= n_classes become -1 (ignore), the rest is kept."""
    data = folder_dataset(tmp_path, label_value=7)
    result = cli(root, *cli_args("extract", *folder_args(data), "extract.train_res=32"))
    assert result.exit_code == 0, result.output
    store = open_token_store(Path(result.stdout.strip().splitlines()[-1]) / "tokens.zarr")
    labels = store.get_labels(np.arange(store.n))
    assert labels.shape == (3, 32, 32) and set(np.unique(labels)) == {-1, 1}
    # 40×48 resized to 32×38 (shorter side) and centre-cropped: the 7-valued left half ends near column 16
    edge = int((labels[0, 0] == -1).sum())
    assert 14 <= edge <= 18 and (labels[:, :, :edge] == -1).all() and (labels[:, :, edge:] == 1).all()


def test_empty_curated_split_list(root: Path, tmp_path: Path) -> None:
    coco = tmp_path / "cocostuff"
    split_list = coco / "curated" / "train2017" / "Coco164kFull_Stuff_Coarse.txt"
    split_list.parent.mkdir(parents=True)
    split_list.write_text("\n  \n")
    refused(cli(root, *cli_args("prepare", "dataset.name=cocostuff27", f"dataset.root={coco}")),
            str(split_list), "is empty")
    assert published(root) == []


def test_mat_file_without_its_key(root: Path, tmp_path: Path) -> None:
    potsdam = tmp_path / "potsdam"
    (potsdam / "imgs").mkdir(parents=True)
    (potsdam / "gt").mkdir()
    (potsdam / "labelled_train.txt").write_text("0\n")
    scipy.io.savemat(potsdam / "imgs" / "0.mat", {"image": np.zeros((8, 8, 4), np.uint8)})  # key should be img
    scipy.io.savemat(potsdam / "gt" / "0.mat", {"gt": np.zeros((8, 8), np.uint8)})
    refused(cli(root, *cli_args("prepare", "dataset.name=potsdam", f"dataset.root={potsdam}")),
            str(potsdam / "imgs" / "0.mat"), "has no key 'img'")
    assert published(root) == []


# --------------------------------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), 1e6])  # 1e6 overflows float16 to inf
def test_non_finite_tokens_are_not_written(root: Path, value: float, monkeypatch: pytest.MonkeyPatch) -> None:
    real = extract_module.dino_features

    def broken(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        feats = real(model, images)
        feats[:, :, 0, 0] = value
        return feats

    monkeypatch.setattr(extract_module, "dino_features", broken)
    line = refused(cli(root, *cli_args("extract")), "extract stage, artifact extract-", "tokens.zarr, shard 0 "
                   "(samples 0..1)", "'tokens'", "non-finite values", "nothing was written")
    # token (0, 0) of both images of the shard, all 384 channels: the first sample is named by its id
    assert re.search(r"sample '[^']+' \(index 0\) \(and 1 more samples\) has 384 non-finite values", line), line
    assert published(root, "extract") == []


def test_tokens_of_the_wrong_width_for_the_projection(root: Path, tmp_path: Path) -> None:
    """A STEGO head imported for 16-wide tokens, probed on ViT-S tokens (384 wide)."""
    ckpt = _save(tmp_path, _checkpoint())
    head = cli(root, "import-stego", str(ckpt))
    assert head.exit_code == 0, head.output
    head_path = ArtifactStore(root).path(head.stdout.strip().splitlines()[-1])
    refused(cli(root, *cli_args("probe", "projection.method=stego", f"head.checkpoint={ckpt}")),
            str(head_path), "expects tokens of width 16", "tokens have width 384")
    assert published(root, "probe") == []


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "override", "needles"), [
    ("prepare", "dataset.name=imagenet", ("dataset.name='imagenet'", "expected one of", "cocostuff27")),
    ("extract", "backbone.name=vit_huge", ("backbone.name='vit_huge'", "expected one of", "vit_small_patch16_224.dino")),
    ("extract", "extract.trian_res=32", ("unknown config key 'extract.trian_res'", "did you mean", "extract.train_res")),
    ("extract", "extract.train_res=big", ("extract.train_res", "'big'", "expected type int")),
    ("evaluate", "evaluate.crf=maybe", ("evaluate.crf", "'maybe'", "expected type bool")),
    ("train-head", "head.weights=3", ("override 'head.weights=3'", "int is not a subclass of LossWeights")),
    ("extract", "extract.train_res=30", ("extract.train_res=30", "multiple of the patch size 16")),
    ("reduce", "projection.method=tsne", ("projection.method='tsne'", "expected one of", "hnne")),
])
def test_bad_config(root: Path, stage: str, override: str, needles: tuple[str, ...]) -> None:
    refused(cli(root, *cli_args(stage, override)), *needles)
    assert published(root) == []


def test_unknown_experiment_key_and_preset(root: Path, tmp_path: Path) -> None:
    experiment = tmp_path / "typo.yaml"
    experiment.write_text("experiment: typo\ntargetz: [evaluate]\n")
    refused(cli(root, "run", str(experiment)), str(experiment), "unknown keys ['targetz']")
    refused(cli(root, "run", "prepare", "--preset", "cocostuff28"), "unknown preset 'cocostuff28'", "cocostuff27")
    assert published(root) == []


# --------------------------------------------------------------------------------------------------
# checkpoints: missing keys, code in pickles
# --------------------------------------------------------------------------------------------------


def test_stego_checkpoint_with_missing_keys(root: Path, tmp_path: Path) -> None:
    ckpt = _checkpoint()
    del ckpt["state_dict"]["linear_probe.bias"]
    path = _save(tmp_path, ckpt, "missing.ckpt")
    refused(cli(root, "import-stego", str(path)), str(path), "linear_probe.bias")
    assert published(root) == []


class RunsCode:
    """Unpickling this runs ``exec`` of a statement that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_pickles_that_run_code_are_refused(root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    weights = tmp_path / "evil.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1)}, "payload": RunsCode(marker)}, weights)
    refused(cli(root, *cli_args("extract", f"backbone.weights={weights}")), str(weights), "refused")

    ckpt = _checkpoint()
    ckpt["hyper_parameters"]["payload"] = RunsCode(marker)
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps(ckpt, protocol=2))  # a plain pickle, as Lightning < 1.6 wrote them
    refused(cli(root, "import-stego", str(evil)), str(evil))
    refused(cli(root, *cli_args("train-head", f"head.checkpoint={evil}")), str(evil))
    torch.save(ckpt, evil)  # the zip format of torch.save
    refused(cli(root, "import-stego", str(evil)), str(evil))

    assert not marker.exists(), "unpickling ran code"
    assert published(root, "extract") == [] and published(root, "train-head") == []
