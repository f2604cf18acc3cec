"""Untrusted manifests (issue 19 items 7, 8, 10): confined file paths, forged params, one bad manifest never
breaks gc/show/ls for the root and protects its artifact, pins on a read-only root, links in .trash."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.artifacts import MANIFEST, ArtifactStore, artifact_id, id_from_manifest, parse_manifest, seal_manifest
from pipeline.cli import main
from pipeline.errors import ArtifactError
from tests.test_cli import tmpfs  # noqa: F401  (fixture)


def _publish(store: ArtifactStore, name: str, inputs: dict[str, str] | None = None) -> str:
    params = {"name": name}
    artifact = artifact_id("toy", "1", params, inputs or {})
    staging = store.staging(artifact, fresh=True)
    (staging.dir / "data.bin").write_bytes(name.encode() * 10)
    store.publish(artifact, staging, {"stage": "toy", "version": "1", "params": params, "inputs": inputs or {}})
    return artifact


def _rewrite(store: ArtifactStore, artifact: str, **changes: object) -> None:
    """Edit a manifest as an attacker would: change fields and recompute its checksum."""
    manifest = json.loads((store.path(artifact) / MANIFEST).read_text())
    manifest.update(changes)
    (store.path(artifact) / MANIFEST).write_text(json.dumps(seal_manifest(manifest)))


@pytest.mark.parametrize("entry", ["/etc/passwd", "../../../../etc/passwd", "sub/../../x", "link/passwd"])
def test_file_entries_outside_the_artifact_are_refused(tmp_path: Path, entry: str) -> None:
    store = ArtifactStore(tmp_path / "root")
    artifact = _publish(store, "a")
    (store.path(artifact) / "link").symlink_to("/etc")
    _rewrite(store, artifact, files=[{"path": entry, "size": Path("/etc/passwd").stat().st_size, "sha256": "0" * 64}])
    if entry.startswith("link/"):  # well-formed: refused where it is followed
        assert store.incomplete(artifact) == [entry]  # the cache check: rebuild
    else:
        with pytest.raises(ArtifactError, match="not a plain relative path inside the artifact"):
            store.incomplete(artifact)
    problems = store.verify(artifact)  # names the entry, hashes nothing outside
    assert str(store.path(artifact)) in problems[0]
    assert "leading out of the artifact" in problems[0] or "not a plain relative path" in problems[0]


@pytest.mark.parametrize(("change", "problem"), [
    ({"score": float("nan")}, "not valid JSON"),  # NaN is not JSON, even when sealed
    ({"files": [{"path": "data.bin", "size": -1, "sha256": "0" * 64}]}, "'files' must be a list"),
    ({"inputs": {"a": "not-an-id"}}, "'inputs' must map names to artifact ids"),
    ({"params": {"name": "forged"}}, "give the id"),  # the id no longer follows from the fields
    ({"files": [{"path": "../x", "size": 1, "sha256": "0" * 64}]}, "not a plain relative path"),
])
def test_a_manifest_without_its_folder_is_checked_like_one_with_it(tmp_path: Path, change: dict[str, object],
                                                                   problem: str) -> None:
    """An object store's manifest (no folder name vouches for its id) gets every check a local one gets, and
    its id is recomputed from its fields."""
    store = ArtifactStore(tmp_path / "root")
    artifact = _publish(store, "a")
    manifest = json.loads((store.path(artifact) / MANIFEST).read_text())
    assert parse_manifest(json.dumps(manifest).encode(), "s3://b/m.json", directory=None)["id"] == artifact
    data = json.dumps(seal_manifest({**manifest, **change})).encode()
    with pytest.raises(ArtifactError, match=problem) as caught:
        parse_manifest(data, "s3://b/m.json", directory=None, hint="the export is damaged")
    assert "\n" not in str(caught.value)


def test_verify_recomputes_the_id_from_the_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "root")
    artifact = _publish(store, "a")
    manifest = store.manifest(artifact)
    assert id_from_manifest(manifest) == artifact and store.verify(artifact) == []
    _rewrite(store, artifact, params={"name": "forged"})
    assert store.manifest(artifact)["params"] == {"name": "forged"}  # checksum recomputed: readable ...
    problems = store.verify(artifact)  # ... but verify says it is not what the id covers
    assert len(problems) == 1 and "give the id toy-" in problems[0] and artifact in problems[0]
    result = CliRunner().invoke(main, ["verify", artifact], env={"STEGOPIPE_ROOT": str(store.root)})
    assert result.exit_code == 1 and "the manifest was edited" in result.output


def test_one_bad_manifest_neither_breaks_nor_exposes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ArtifactStore(tmp_path / "root")
    parent = _publish(store, "parent")
    child = _publish(store, "child", {"parent": parent})
    orphan = _publish(store, "orphan")
    other = _publish(store, "other")
    _rewrite(store, child, inputs={"parent": parent, "bad": "nonsense"})
    with pytest.raises(ArtifactError, match=f"{child}/manifest.json: 'inputs' must map"):
        store.manifest(child)
    env = {"STEGOPIPE_ROOT": str(store.root)}
    dry = store.gc(set(), dry_run=True)
    assert set(dry.artifacts) == {orphan, other}
    assert set(dry.unreadable) == {child}  # protected, and so is the parent its damaged manifest names
    done = CliRunner().invoke(main, ["gc", "--yes", "--keep", other, "--experiment", "demo"], env=env)
    assert done.exit_code == 0, done.output
    assert f"kept {child} and every artifact its manifest names" in done.stderr
    assert store.exists(child) and store.exists(parent) and store.exists(other) and not store.exists(orphan)
    ls = CliRunner().invoke(main, ["ls"], env=env)
    assert ls.exit_code == 0 and other in ls.output and f"warning: skipping {child}" in ls.stderr
    shown = CliRunner().invoke(main, ["show", other], env=env)
    assert shown.exit_code == 0 and other in shown.output
    bad = CliRunner().invoke(main, ["show", child], env=env)
    assert bad.exit_code != 0 and len(bad.stderr.strip().splitlines()) == 1 and child in bad.stderr


def test_a_damaged_kept_manifest_protects_the_ids_it_mentions(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "root")
    parent = _publish(store, "parent")
    child = _publish(store, "child", {"parent": parent})
    path = store.path(child) / MANIFEST
    path.write_text(path.read_text().replace('"child"', '"chilt"'))  # checksum now wrong
    report = store.gc({child}, dry_run=False)
    assert report.artifacts == [] and child in report.unreadable and store.exists(parent)


def test_pin_on_a_read_only_root_is_one_line(tmpfs: Path) -> None:  # noqa: F811
    store = ArtifactStore(tmpfs / "root")
    artifact = _publish(store, "a")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    result = CliRunner().invoke(main, ["pin", artifact], env={"STEGOPIPE_ROOT": str(store.root)})
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and "cannot write the pin list" in errors[0] and str(store.root) in errors[0]


def test_a_link_in_trash_is_removed_once(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "root")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "big.bin").write_bytes(b"x" * 100_000)
    trash = store.root / ".trash"
    trash.mkdir(parents=True)
    (trash / "toy-0000000000000000-1").symlink_to(target)
    (trash / "stray-file").write_bytes(b"y" * 10)
    first = store.gc(set(), dry_run=False)
    assert 0 < first.trash_bytes < 1000  # the link and the file, never what the link points at
    assert not any(trash.iterdir()) and (target / "big.bin").exists()
    assert store.gc(set(), dry_run=False).trash_bytes == 0


def test_adopt_never_copies_a_file_from_outside_the_artifact(tmp_path: Path) -> None:
    from pipeline.adopt import _copy_files

    store = ArtifactStore(tmp_path / "root")
    artifact = _publish(store, "a")
    (store.path(artifact) / "link").symlink_to("/etc")
    _rewrite(store, artifact, files=[{"path": "link/passwd", "size": 1, "sha256": "0" * 64}])
    into = tmp_path / "into"
    with pytest.raises(ArtifactError, match="leading out of the artifact"):
        _copy_files(store, artifact, store.manifest(artifact)["files"], into, link=False)
    assert not (into / "link" / "passwd").exists()
