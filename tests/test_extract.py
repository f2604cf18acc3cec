"""extract: tokens artifact layout, equality with a direct forward, cache hits, config errors, Dask shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.artifacts import ArtifactStore
from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.executor import TaskResult
from pipeline.planner import Request, plan
from pipeline.runner import run_tasks
from stages.backbones import dino_features, load_backbone, weights_tag
from stages.datasets.transforms import center_crop, preprocess_image, preprocess_label, resize_shorter_nearest
from stages.extract import ModelSettings, load_model
from stages.store import TOKENS_STORE
from stages.datasets.index import load_index
from stages.store import open_token_store

TINY = ["run.executor=local", "dataset.synthetic.n_train=5", "dataset.synthetic.n_val=3",
        "dataset.synthetic.height=40", "dataset.synthetic.width=48", "backbone.name=vit_small_patch16_224.dino",
        "extract.train_res=32", "extract.val_res=48", "extract.shard_size=2", "extract.batch_size=3",
        "extract.loader_workers=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_extract(overrides: list[str], split: str = "train") -> tuple[TaskResult, dict[str, TaskResult]]:
    """Build extract(split) and its upstream; the extract result and every result by stage name."""
    cfg = load_config(None, [*TINY, *overrides])
    tasks, targets = plan([Request("extract", cfg, {"split": split})])
    results = {r.id: r for r in run_tasks(tasks, cfg.run)}
    return results[targets[0]], {r.stage: r for r in results.values()}


def manifest(result: TaskResult) -> dict:
    return json.loads((result.path / "manifest.json").read_text())


def store_files(artifact: Path) -> dict[str, bytes]:
    """Every file of the artifact's token store, by relative path."""
    base = artifact / TOKENS_STORE
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def test_train_and_val_stores_have_the_spec_layout(root: Path) -> None:
    train, by_stage = run_extract([])
    store = open_token_store(train.path / TOKENS_STORE)
    assert store.arrays == ("tokens", "labels", "ids")  # no flip / rgb for train
    group = zarr.open_group(str(train.path / TOKENS_STORE), mode="r")
    assert group["tokens"].shape == (5, 2, 2, 384) and group["tokens"].dtype == np.float16
    assert group["tokens"].chunks == (1, 2, 2, 384) and group["tokens"].shards == (2, 2, 2, 384)
    assert group["labels"].shape == (5, 32, 32) and group["labels"].dtype == np.int16
    index = load_index(by_stage["prepare"].path)
    assert store.ids == [s.id for s in index.samples]
    assert store.attrs["split"] == "train" and store.attrs["res"] == 32 and store.attrs["patch"] == 16
    assert store.attrs["backbone"] == "vit_small_patch16_224.dino" and store.attrs["weights_tag"] == "random-seed0"
    assert store.attrs["n_classes"] == index.n_classes and store.attrs["class_names"] == index.class_names
    assert store.attrs["normalisation"]["mean"] == [0.485, 0.456, 0.406]
    m = manifest(train)
    assert m["counts"] == {"samples": 5, "shards": 3, "samples_computed": 5}
    assert m["shards"] == {"computed": 3, "reused": 0}
    assert m["throughput_img_s"] > 0 and m["backbone"]["weights_tag"] == "random-seed0"
    # the throughput is of the loop alone: the backbone's load is recorded apart, not inside the wall
    assert m["model_load_s"] > 0 and m["throughput_img_s"] == pytest.approx(5 / m["extract_wall_s"], rel=0.01)

    val, _ = run_extract([], split="val")
    vstore = open_token_store(val.path / TOKENS_STORE)
    assert vstore.arrays == ("tokens", "tokens_flip", "labels", "rgb", "ids")
    vgroup = zarr.open_group(str(val.path / TOKENS_STORE), mode="r")
    assert vgroup["tokens_flip"].shape == vgroup["tokens"].shape == (3, 3, 3, 384)
    assert vgroup["tokens_flip"].dtype == np.float16
    assert vgroup["rgb"].shape == (3, 48, 48, 3) and vgroup["rgb"].dtype == np.uint8
    assert vstore.attrs["split"] == "val" and vstore.attrs["res"] == 48

    bare, _ = run_extract(["extract.flip_val=false", "extract.rgb_val=false"], split="val")
    assert bare.id != val.id
    assert open_token_store(bare.path / TOKENS_STORE).arrays == ("tokens", "labels", "ids")


def test_stored_arrays_equal_a_direct_forward_of_the_preprocessed_images(root: Path) -> None:
    val, by_stage = run_extract([], split="val")
    store = open_token_store(val.path / TOKENS_STORE)
    index = load_index(by_stage["prepare"].path)
    model, _ = load_backbone("vit_small_patch16_224.dino", "random", seed=0)
    for i, ref in enumerate(index.samples):
        image = index.reader.load_image(ref)
        x = torch.from_numpy(preprocess_image(image, 48))[None]
        with torch.inference_mode():
            direct = dino_features(model, x)[0].permute(1, 2, 0).numpy()
            flipped = dino_features(model, x.flip(-1))[0].permute(1, 2, 0).numpy()
        tokens = store.get_tokens([i])[0]
        np.testing.assert_allclose(tokens, direct, rtol=1e-3, atol=2e-3)
        np.testing.assert_allclose(store.get_tokens([i], flip=True)[0], flipped, rtol=1e-3, atol=2e-3)
        assert np.abs(flipped - direct[:, ::-1]).max() > 1e-2  # flipped-image tokens are not flipped tokens
        expected_label = preprocess_label(index.reader.load_label(ref), 48)
        np.testing.assert_array_equal(store.get_labels([i])[0], expected_label)
        np.testing.assert_array_equal(store.get_rgb([i])[0], center_crop(resize_shorter_nearest(image, 48), 48))


def test_rerun_hits_the_cache_and_only_output_changing_settings_change_the_id(root: Path) -> None:
    first, _ = run_extract([])
    again, _ = run_extract(["extract.batch_size=1", "extract.loader_workers=0", "extract.dask_shards=true"])
    assert again.id == first.id and again.status == "hit"
    assert len(ArtifactStore(root).ids("extract")) == 1
    for override in ("extract.shard_size=4", "backbone.seed=1", "extract.train_res=48", "extract.amp=false",
                     "backbone.pos_interp=timm"):
        cfg = load_config(None, [*TINY, override])
        _, targets = plan([Request("extract", cfg, {"split": "train"})])
        assert targets[0] != first.id, override
    cfg = load_config(None, [*TINY, "extract.val_res=64"])  # the other split's resolution
    assert plan([Request("extract", cfg, {"split": "train"})])[1][0] == first.id


def test_batch_size_and_loader_threads_do_not_change_the_bytes(root: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    first, _ = run_extract([])
    monkeypatch.setenv("STEGOPIPE_ROOT", str(tmp_path / "other"))
    other, _ = run_extract(["extract.loader_workers=0", "extract.batch_size=2"])
    assert other.id == first.id and other.status == "ran"
    assert store_files(other.path) == store_files(first.path)


def test_config_errors_name_the_key(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def params(overrides: list[str], split: str = "train") -> None:
        plan([Request("extract", load_config(None, [*TINY, *overrides]), {"split": split})])

    monkeypatch.delenv("STEGOPIPE_WEIGHTS_DIR", raising=False)
    with pytest.raises(ConfigError, match=r"extract\.train_res=40.*multiple of the patch size 16"):
        params(["extract.train_res=40"])
    with pytest.raises(ConfigError, match=r"backbone\.name='vit_huge'"):
        params(["backbone.name=vit_huge"])
    with pytest.raises(ConfigError, match=r"backbone\.weights=dino needs backbone\.weights_dir"):
        params(["backbone.weights=dino"])
    with pytest.raises(ConfigError, match=r"no dino_deitsmall16_pretrain\.pth"):
        params(["backbone.weights=dino", f"backbone.weights_dir={tmp_path}"])
    monkeypatch.setenv("STEGOPIPE_WEIGHTS_DIR", str(tmp_path / "env"))  # `make extract WEIGHTS_DIR=...`
    with pytest.raises(ConfigError, match=r"backbone\.weights_dir=.*env: no dino_deitsmall16_pretrain\.pth"):
        params(["backbone.weights=dino"])
    with pytest.raises(ConfigError, match=r"backbone\.weights='/no/such\.pth'"):
        params(["backbone.weights=/no/such.pth"])
    with pytest.raises(ConfigError, match=r"extract\.shard_size=0"):
        params(["extract.shard_size=0"])
    with pytest.raises(ConfigError, match=r"backbone\.pos_interp='cubic'"):
        params(["backbone.pos_interp=cubic"])
    with pytest.raises(ConfigError, match=r"split='test'"):
        params([], split="test")


def test_planned_weights_tag_is_the_loaded_tag_and_follows_content(tmp_path: Path) -> None:
    model, _ = load_backbone("vit_small_patch16_224.dino", "random", seed=3)
    path = tmp_path / "a" / "dino_deitsmall16_pretrain.pth"
    path.parent.mkdir()
    torch.save(model.state_dict(), path)
    cfg = load_config(None, ["backbone.name=vit_small_patch16_224.dino", f"backbone.weights={path}"])
    tag = weights_tag(cfg.backbone)
    assert tag.startswith("file:") and tag == load_backbone(cfg.backbone.name, str(path))[1].weights_tag
    dino = load_config(None, ["backbone.name=vit_small_patch16_224.dino", "backbone.weights=dino",
                              f"backbone.weights_dir={path.parent}"])
    loaded = load_backbone(dino.backbone.name, "dino", weights_dir=path.parent)[1]
    assert weights_tag(dino.backbone) == loaded.weights_tag
    copy = tmp_path / "b.pth"
    copy.write_bytes(path.read_bytes())
    cfg_copy = load_config(None, ["backbone.name=vit_small_patch16_224.dino", f"backbone.weights={copy}"])
    assert weights_tag(cfg_copy.backbone) == tag  # the id follows the content, not the path
    edited = ModelSettings(name=cfg.backbone.name, weights=str(path), weights_dir=None, seed=0, pos_interp="dino",
                           trust_checkpoint=False, weights_tag="file:0123456789abcdef", device="cpu")
    with pytest.raises(InputError, match="changed since the run was planned"):
        load_model(edited)  # a file replaced between planning and running is refused


def test_dask_shards_give_the_same_bytes_as_the_local_path(root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import LocalCluster

    local, _ = run_extract([], split="val")
    assert manifest(local)["executor"] == "local"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        # the stage in this process, shards on the scheduler's workers
        monkeypatch.setenv("STEGOPIPE_ROOT", str(tmp_path / "scheduler"))
        remote, _ = run_extract(["extract.dask_shards=true", f"run.scheduler={address}"], split="val")
        # the stage itself inside a Dask worker, shards through worker_client
        monkeypatch.setenv("STEGOPIPE_ROOT", str(tmp_path / "worker"))
        inside, _ = run_extract(["extract.dask_shards=true", f"run.scheduler={address}", "run.executor=dask"],
                                split="val")
    for result in (remote, inside):
        assert result.id == local.id and result.status == "ran"
        m = manifest(result)
        assert m["executor"] == "dask" and m["shards"] == {"computed": 2, "reused": 0}
        assert store_files(result.path) == store_files(local.path)


def test_normalise_images_is_bit_identical_to_preprocess_image() -> None:
    """The per-batch normalisation of extract equals the reference transform exactly, for every value."""
    from stages.extract import normalise_images

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    images[1] = np.arange(256, dtype=np.uint8).reshape(16, 16)[:, :, None]  # every value in every channel
    got = normalise_images(torch.from_numpy(images)).numpy()
    expected = np.stack([preprocess_image(image, 16) for image in images])
    assert got.dtype == np.float32 and got.shape == (3, 3, 16, 16)
    assert np.array_equal(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_copy_returns_the_device_tensor() -> None:
    from stages.extract import HostCopy

    t = torch.randn(4, 3, 5, 7, device="cuda").to(torch.float16)
    expected = t.cpu().numpy()
    copy = HostCopy(t)
    t.zero_()  # queued after the copy on the same stream: the copy still sees the old values
    assert np.array_equal(copy.numpy(), expected)
