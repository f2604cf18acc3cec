"""Token stores in object storage (issue 24, items 2-3), against a real S3-protocol server: moto's server on
127.0.0.1 at a random port (only loopback traffic). Export -> open_tokens(URL) -> import round trip, same id
and bytes; a flipped byte refused naming the object; a missing object refused, never read as fill values;
Squirrel export/import at s3:// URLs."""
from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import google_crc32c
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.artifacts import ArtifactStore, artifact_id, seal_manifest
from pipeline.cli import main
from pipeline.errors import InputError
from stages.store import create_token_store, open_token_store, open_tokens, shard_ranges, write_shard

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

N, SHARD, GRID, DIM, HW = 5, 2, (2, 3), 4, (6, 8)
SECRET = "h6-secret-never-printed"
ATTRS = {"dataset": "synthetic", "split": "val", "n_classes": 5, "class_names": list("abcde"), "res": 48,
         "backbone": "vit_small_patch16_224.dino", "weights_tag": "random-seed0", "patch": 16, "normalisation": "imagenet"}
PARAMS = {"split": "val", "made_by": "test_s3_tokens"}
ARTIFACT = artifact_id("extract", "test", PARAMS, {})


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the loopback server; credentials and endpoint only in the environment."""
    for name, value in {"AWS_ACCESS_KEY_ID": "h6-key", "AWS_SECRET_ACCESS_KEY": SECRET,
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem object of an earlier test's server
    name = f"b{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    yield name
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def artifact(root: Path) -> Path:
    """A small published tokens artifact (3 shards, the last one partial; tokens, flip, labels, rgb, ids)."""
    rng = np.random.default_rng(0)
    store = ArtifactStore(root)
    staging = store.staging(ARTIFACT, fresh=True)
    path = staging.dir / "tokens.zarr"
    create_token_store(path, n=N, grid=GRID, dim=DIM, label_hw=HW, shard_size=SHARD, with_rgb=True,
                       with_flip=True, attrs=ATTRS)
    for k, (a, b) in enumerate(shard_ranges(N, SHARD)):
        write_shard(path, k, tokens=rng.standard_normal((b - a, *GRID, DIM)),
                    tokens_flip=rng.standard_normal((b - a, *GRID, DIM)),
                    labels=rng.integers(-1, 5, (b - a, *HW)), rgb=rng.integers(0, 256, (b - a, *HW, 3)),
                    ids=[f"img{i}" for i in range(a, b)])
    (staging.dir / "log.txt").write_text("[run] made by the test\n")
    return store.publish(ARTIFACT, staging, {"stage": "extract", "version": "test", "kind": "tokens",
                                             "params": PARAMS, "inputs": {}})


def _invoke(*args: str) -> object:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _assert_same_store(remote: object, local: object) -> None:
    assert remote.n == local.n and remote.ids == local.ids and remote.attrs == local.attrs
    assert all(reason is not None for reason in remote.fast_path.values())  # read through zarr-python
    order = [4, 0, 2, 2, 1]  # any order, repeats, across shards
    np.testing.assert_array_equal(remote.get_tokens(order), local.get_tokens(order))
    np.testing.assert_array_equal(remote.get_tokens(order, flip=True), local.get_tokens(order, flip=True))
    np.testing.assert_array_equal(remote.get_labels(order), local.get_labels(order))
    np.testing.assert_array_equal(remote.get_rgb(order), local.get_rgb(order))
    arrays = ("tokens", "labels", "rgb")
    for got, want in zip(remote.iter_batches(3, arrays=arrays), local.iter_batches(3, arrays=arrays), strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_export_open_import_round_trip(bucket: str, artifact: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{bucket}/cache/{ARTIFACT}"
    exported = _invoke("export-tokens", ARTIFACT[:12], url)
    assert ARTIFACT in exported.stdout and url in exported.stdout
    remote_files = fsspec.filesystem("s3").find(f"{bucket}/cache/{ARTIFACT}")
    assert sorted(f.split(f"{ARTIFACT}/", 1)[1] for f in remote_files) == sorted(_files(artifact))

    _assert_same_store(open_tokens(url), open_token_store(artifact / "tokens.zarr"))
    _assert_same_store(open_tokens(f"{url}/tokens.zarr"), open_token_store(artifact / "tokens.zarr"))  # bare store

    assert ARTIFACT in _invoke("export-tokens", ARTIFACT, url).stdout  # exported before: nothing to do
    no_bucket = CliRunner().invoke(main, ["export-tokens", ARTIFACT, f"s3://{bucket}-missing/x"])
    assert no_bucket.exit_code == 2 and no_bucket.stderr.count("\n") == 1 and f"{bucket}-missing" in no_bucket.stderr
    fsspec.filesystem("s3").pipe_file(f"{bucket}/other/notes.txt", b"not ours")
    refused = CliRunner().invoke(main, ["export-tokens", ARTIFACT, f"s3://{bucket}/other"])
    assert refused.exit_code == 2 and f"s3://{bucket}/other: holds objects that are not part of" in refused.stderr
    assert "(notes.txt)" in refused.stderr

    other = tmp_path / "elsewhere"
    monkeypatch.setenv("STEGOPIPE_ROOT", str(other))
    imported = Path(_invoke("import-tokens", url).stdout.strip())
    assert imported == other / "extract" / ARTIFACT  # the same id
    assert _files(imported) == _files(artifact)  # the same bytes, manifest included
    assert ArtifactStore(other).verify(ARTIFACT) == []
    again = _invoke("import-tokens", url)
    assert "already in the artifact root" in again.stderr and Path(again.stdout.strip()) == imported
    assert not (other / ".staging" / ARTIFACT).exists()
    for output in (exported.output, again.output):
        assert SECRET not in output


def _import_elsewhere(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    """``stegopipe import-tokens URL`` into a second artifact root (the first one holds the artifact)."""
    monkeypatch.setenv("STEGOPIPE_ROOT", str(tmp_path / "elsewhere"))
    return CliRunner().invoke(main, ["import-tokens", url])


def _corrupt(fs: object, key: str, position: int) -> None:
    data = bytearray(fs.cat_file(key))
    data[position] ^= 0x10
    fs.pipe_file(key, bytes(data))


@pytest.mark.parametrize(("obj", "position", "read", "message"), [
    ("tokens/c/1/0/0/0", 10, lambda t: t.get_tokens([2]), "chunk crc32c mismatch"),  # one chunk read
    ("tokens/c/1/0/0/0", 10, lambda t: t.get_tokens([2, 3]), "crc32c mismatch"),  # a whole shard read
    ("tokens/c/1/0/0/0", -8, lambda t: t.get_tokens([3]), "shard index crc32c mismatch"),
    ("labels/c/2/0/0", 12, lambda t: t.get_labels([4]), "crc32c mismatch"),
    ("ids/c/1", 3, lambda t: t.ids, "crc32c mismatch"),
    ("tokens/zarr.json", 30, lambda t: t, "differs from the manifest"),
])
def test_flipped_byte_is_refused_naming_the_object(bucket: str, artifact: Path, obj: str, position: int,
                                                   read: object, message: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{bucket}/{ARTIFACT}"
    _invoke("export-tokens", ARTIFACT, url)
    fs = fsspec.filesystem("s3")
    _corrupt(fs, f"{bucket}/{ARTIFACT}/tokens.zarr/{obj}", position)
    with pytest.raises(InputError, match=message) as caught:
        read(open_tokens(url))
    assert f"object {obj} " in str(caught.value) and "\n" not in str(caught.value)
    refused = _import_elsewhere(url, tmp_path, monkeypatch)
    assert refused.exit_code == 2 and f"tokens.zarr/{obj}" in refused.stderr and "corrupt" in refused.stderr
    assert not (tmp_path / "elsewhere" / "extract" / ARTIFACT).exists()  # nothing half-copied is published
    assert not (tmp_path / "elsewhere" / ".staging" / ARTIFACT).exists()


def test_crafted_shard_index_is_refused(bucket: str, artifact: Path) -> None:
    """Sample 3's index entry pointed at sample 2's chunk, the index crc32c recomputed: both chunks pass their
    crc32c, so only the index check keeps sample 3 from reading as sample 2."""
    url = f"s3://{bucket}/{ARTIFACT}"
    _invoke("export-tokens", ARTIFACT, url)
    fs = fsspec.filesystem("s3")
    key = f"{bucket}/{ARTIFACT}/tokens.zarr/tokens/c/1/0/0/0"
    data = bytearray(fs.cat_file(key))
    index = np.frombuffer(bytes(data[-(16 * SHARD + 4):-4]), dtype="<u8").reshape(SHARD, 2).copy()
    index[1] = index[0]
    data[-(16 * SHARD + 4):] = index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    fs.pipe_file(key, bytes(data))
    with pytest.raises(InputError, match=r"object tokens/c/1/0/0/0 is corrupt \(shard index entry 1: .*aliased"):
        open_tokens(url).get_tokens([3])


@pytest.mark.parametrize(("obj", "sample", "read"), [
    ("tokens/c/1/0/0/0", 2, lambda t: t.get_tokens([2])),
    ("tokens_flip/c/2/0/0/0", 4, lambda t: next(iter(t.iter_batches(5, arrays=("tokens_flip",))))),
    ("ids/c/2", 4, lambda t: t.ids),
])
def test_missing_object_is_refused_never_read_as_fill_values(bucket: str, artifact: Path, obj: str, sample: int,
                                                             read: object, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{bucket}/{ARTIFACT}"
    _invoke("export-tokens", ARTIFACT, url)
    fs = fsspec.filesystem("s3")
    fs.rm(f"{bucket}/{ARTIFACT}/tokens.zarr/{obj}")
    fill = zarr.open_group(f"{url}/tokens.zarr", mode="r")[obj.split("/")[0]][sample]
    assert fill == "" if obj.startswith("ids") else not fill.any()  # what zarr-python alone reads: fill values
    with pytest.raises(InputError, match=f"object {obj} is missing"):
        read(open_tokens(url))
    refused = _import_elsewhere(url, tmp_path, monkeypatch)
    assert refused.exit_code == 2 and f"tokens.zarr/{obj}: missing" in refused.stderr


def test_unfinished_export_is_not_read(bucket: str, artifact: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{bucket}/{ARTIFACT}"
    _invoke("export-tokens", ARTIFACT, url)
    fsspec.filesystem("s3").rm(f"{bucket}/{ARTIFACT}/manifest.json")  # as an export killed before its last write
    with pytest.raises(InputError, match="no manifest.json"):
        open_tokens(url)
    refused = _import_elsewhere(url, tmp_path, monkeypatch)
    assert refused.exit_code == 2 and "did not finish" in refused.stderr
    fsspec.filesystem("s3").rm(f"{bucket}/{ARTIFACT}/tokens.zarr/labels/c/1/0/0")
    monkeypatch.setenv("STEGOPIPE_ROOT", str(artifact.parent.parent))
    _invoke("export-tokens", ARTIFACT, url)  # the export again: it resumes over its own objects
    assert open_tokens(url).get_labels([2]).shape == (1, *HW)


def test_stray_object_and_edited_manifest_are_refused(bucket: str, artifact: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{bucket}/{ARTIFACT}"
    _invoke("export-tokens", ARTIFACT, url)
    fs = fsspec.filesystem("s3")
    store = f"{bucket}/{ARTIFACT}/tokens.zarr"
    fs.pipe_file(f"{store}/extra/zarr.json", fs.cat_file(f"{store}/ids/zarr.json"))  # an array nobody exported
    with pytest.raises(InputError, match="object extra/zarr.json is not listed in the artifact's manifest.json"):
        open_tokens(url)
    manifest = json.loads(fs.cat_file(f"{bucket}/{ARTIFACT}/manifest.json"))
    manifest["params"]["split"] = "train"  # edited, and sealed again
    fs.pipe_file(f"{bucket}/{ARTIFACT}/manifest.json", json.dumps(seal_manifest(manifest)).encode())
    refused = _import_elsewhere(url, tmp_path, monkeypatch)
    assert refused.exit_code == 2 and "the manifest was edited" in refused.stderr
    assert not (tmp_path / "elsewhere" / "extract" / ARTIFACT).exists()


def test_squirrel_export_import_at_s3_urls(bucket: str, artifact: Path, root: Path) -> None:
    url = f"s3://{bucket}/squirrel/val"
    assert f"{N} samples" in _invoke("export-squirrel", ARTIFACT, url, "--shard-size", "2").stdout
    imported = Path(_invoke("import-squirrel", url).stdout.strip())
    source, back = open_token_store(artifact / "tokens.zarr"), open_token_store(imported / "tokens.zarr")
    assert back.ids == source.ids
    np.testing.assert_array_equal(back.get_tokens(range(N)), source.get_tokens(range(N)))
    np.testing.assert_array_equal(back.get_labels(range(N)), source.get_labels(range(N)))
    np.testing.assert_array_equal(back.get_rgb(range(N)), source.get_rgb(range(N)))


def test_any_fsspec_url(artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same commands at a file:// URL (any fsspec URL works as s3:// does)."""
    url = f"file://{tmp_path}/exports/{ARTIFACT}"
    _invoke("export-tokens", ARTIFACT, url)
    _assert_same_store(open_tokens(url), open_token_store(artifact / "tokens.zarr"))
    imported = _import_elsewhere(url, tmp_path, monkeypatch)
    assert imported.exit_code == 0 and _files(Path(imported.stdout.strip())) == _files(artifact)
