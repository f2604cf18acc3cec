"""Token stores in object storage: a tokens artifact exported to a URL (``s3://``, ``gs://``, any fsspec URL),
read there, and imported back.

An exported artifact is the artifact folder under the URL: every file its manifest lists (the Zarr store
``tokens.zarr/...`` and the log), then ``manifest.json`` itself, byte for byte and written last, so a URL
without ``manifest.json`` holds an unfinished export that nothing reads. Credentials and endpoints come
from the environment, as the filesystem library reads them (for S3: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` or ``~/.aws``, ``AWS_ENDPOINT_URL``); they never enter a config, a manifest or a log.

Reading (:func:`open_remote_tokens`) goes through zarr-python's ``FsspecStore`` (the local ``pread`` fast
path does not apply) wrapped in :class:`_CheckedStore`, which refuses what zarr-python would accept
quietly: a missing object (zarr reads it as fill values) and, naming the object's key, a crc32c that
does not match (every chunk and every shard index) or a metadata object whose sha256 differs from the
manifest. :func:`import_tokens` copies an export into a local artifact root with the same id and the same
bytes, checking every file's size and sha256 against the manifest while it downloads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import Crc32cCodec, ShardingCodec
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, WrapperStore

from pipeline.artifacts import MANIFEST, ArtifactStore, parse_manifest
from pipeline.errors import ArtifactError, InputError
from pipeline.prefetch import prefetch
from stages.store.artifact import TOKENS_STORE
from stages.store.fastpath import _EMPTY, _crc, shard_index_nbytes, shard_index_problem
from stages.store.reader import TokenStore

_BLOCK = 8 << 20
"""Bytes per read/write while copying a file (also the multipart part size of s3fs uploads)."""
_COPY_WORKERS = 8
"""Files copied at once (object stores are fast in parallel, slow per stream)."""
for _name in ("botocore.credentials", "aiobotocore.credentials", "botocore.configprovider"):
    logging.getLogger(_name).setLevel(logging.WARNING)  # "Found credentials in environment variables." on every CLI call


@dataclass(frozen=True)
class _Layout:
    """What :class:`_CheckedStore` needs to know of one array to check its objects."""

    sharded: bool
    index_entries: int  # inner chunks per shard (sharded arrays)
    index_nbytes: int  # bytes of a shard index (sharded arrays)
    samples: int  # samples of the array (its first dimension)
    shard_samples: int  # samples per shard object (or per chunk object, unsharded)
    chunk_crc: bool  # every (inner) chunk ends in a crc32c
    index_crc: bool  # the shard index ends in a crc32c

    @classmethod
    def of(cls, array: zarr.Array) -> _Layout:
        codecs = tuple(array.metadata.codecs)
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sharding, shard = codecs[0], tuple(array.shards)
            return cls(True, prod(s // c for s, c in zip(shard, sharding.chunk_shape, strict=True)),
                       shard_index_nbytes(sharding, shard), int(array.shape[0]), int(array.shards[0]),
                       isinstance(sharding.codecs[-1], Crc32cCodec), isinstance(sharding.index_codecs[-1], Crc32cCodec))
        return cls(False, 0, 0, int(array.shape[0]), int(array.chunks[0]), isinstance(codecs[-1], Crc32cCodec), False)


def _crc_ok(data: np.ndarray) -> bool:
    """Whether ``data`` (uint8) ends in the crc32c of the rest (zarr's crc32c codec)."""
    return len(data) >= 4 and _crc(data[:-4]) == data[-4:].tobytes()


class _CheckedStore(WrapperStore[FsspecStore]):
    """A read-only zarr store at a URL that raises :class:`InputError` naming the object instead of returning
    what zarr-python would read quietly: a missing chunk object (fill values), a chunk, shard index or whole
    shard whose crc32c does not match, an index entry missing for a stored sample, a metadata object that
    differs from the manifest (``files``: path inside the store -> manifest entry). Checked shard indexes
    are kept (an exported store never changes), so a random read costs one request per sample after the
    first read of its shard."""

    def __init__(self, store: FsspecStore, *, url: str, files: dict[str, dict[str, Any]] | None,
                 layouts: dict[str, _Layout] | None = None, indexes: dict[str, Buffer] | None = None) -> None:
        super().__init__(store)
        self.url, self.files = url, files
        self.layouts = {} if layouts is None else layouts  # shared with copies; filled once the group is open
        self.indexes = {} if indexes is None else indexes  # shared with copies: checked shard indexes by key

    def _with_store(self, store: FsspecStore) -> _CheckedStore:
        return type(self)(store, url=self.url, files=self.files, layouts=self.layouts, indexes=self.indexes)

    def _refuse(self, key: str, what: str) -> InputError:
        return InputError(f"token store {self.url}: object {key} {what}; export the artifact again "
                          "(`stegopipe export-tokens ID URL`)")

    async def get(self, key: str, prototype: BufferPrototype, byte_range: Any = None) -> Buffer | None:
        index = isinstance(byte_range, SuffixByteRequest)
        if index and key in self.indexes:
            return self.indexes[key]
        buf = await self._store.get(key, prototype, byte_range)
        parts = key.split("/")
        chunk = len(parts) >= 3 and parts[1] == "c"  # <array>/c/<shard>/...
        listed = self.files is not None and key in self.files
        if buf is None:
            if chunk or listed:
                raise self._refuse(key, "is missing (it is never read as fill values)")
            return None  # zarr-python probing for optional metadata
        if self.files is not None and not listed:
            raise self._refuse(key, f"is not listed in the artifact's {MANIFEST} (a stray object)")
        data = buf.as_numpy_array().view(np.uint8).reshape(-1)
        layout = self.layouts.get(parts[0]) if chunk else None
        if layout is not None:
            size = len(data) if byte_range is None else self.files[key]["size"] if listed else None
            self._check_chunk_object(key, data, layout, int(parts[2]), byte_range, size)
            if index:
                self.indexes[key] = buf
        elif listed and byte_range is None:
            entry = self.files[key]
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise self._refuse(key, "differs from the manifest (size or sha256)")
        return buf

    def _check_chunk_object(self, key: str, data: np.ndarray, layout: _Layout, shard: int, byte_range: Any,
                            size: int | None) -> None:
        """Check one chunk (a ranged read or an unsharded object), a shard index (a suffix read) or a whole
        shard object; ``size``: the object's size where known (whole reads, or from the manifest)."""
        if not layout.sharded or isinstance(byte_range, RangeByteRequest):  # one whole chunk
            if layout.chunk_crc and not _crc_ok(data):
                raise self._refuse(key, "is corrupt (chunk crc32c mismatch)"
                                   + (f" at bytes [{byte_range.start}, {byte_range.end})" if byte_range else ""))
            return
        index = data[len(data) - layout.index_nbytes:] if len(data) >= layout.index_nbytes else data
        if len(index) != layout.index_nbytes or (layout.index_crc and not _crc_ok(index)):
            raise self._refuse(key, "is corrupt (shard index crc32c mismatch or object too short)")
        entries = np.frombuffer(index[:16 * layout.index_entries].tobytes(), dtype="<u8").reshape(-1, 2)
        stored = max(0, min(layout.index_entries, layout.samples - shard * layout.shard_samples))
        if layout.index_entries == layout.shard_samples and (entries[:stored, 0] == _EMPTY).any():
            sample = shard * layout.shard_samples + int(np.flatnonzero(entries[:stored, 0] == _EMPTY)[0])
            raise self._refuse(key, f"has no chunk for sample {sample} (it is never read as fill values)")
        body = _EMPTY if size is None else max(0, size - layout.index_nbytes)  # the chunk data: [0, body)
        problem = shard_index_problem(entries, 0, body, (1, _EMPTY))
        if problem is not None:
            raise self._refuse(key, f"is corrupt (shard index entry {problem[0]}: {problem[1]})")
        if byte_range is None:  # a whole shard object: every chunk it indexes
            for offset, length in entries[entries[:, 0] != _EMPTY].tolist():
                if layout.chunk_crc and not _crc_ok(data[offset:offset + length]):
                    raise self._refuse(key, f"is corrupt (chunk at bytes [{offset}, {offset + length}): crc32c "
                                       "mismatch)")

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges: Any) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]


def _manifest(raw: bytes, where: str) -> dict[str, Any]:
    """A tokens artifact's manifest from its bytes, checked as a local one is (:func:`parse_manifest`, the id
    recomputed from its fields since no folder name vouches for it); InputError naming ``where`` otherwise."""
    try:
        manifest = parse_manifest(raw, where, directory=None, hint="the export is damaged or was edited")
    except ArtifactError as exc:
        raise InputError(str(exc)) from None
    if manifest.get("kind") != "tokens":
        raise InputError(f"{where}: not the manifest of a tokens artifact (kind {manifest.get('kind')!r})")
    return manifest


def _copy(read: Any, write: Any, entry: dict[str, Any], where: str) -> None:
    """Copy one file from the open handle ``read`` to ``write`` in blocks, checking size and sha256 against
    its manifest ``entry``; InputError naming ``where`` on a mismatch."""
    digest, size = hashlib.sha256(), 0
    while block := read.read(_BLOCK):
        digest.update(block)
        size += len(block)
        write.write(block)
    if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
        raise InputError(f"{where}: {size} bytes with sha256 {digest.hexdigest()[:12]}..., the manifest says "
                         f"{entry['size']} bytes, sha256 {entry['sha256'][:12]}... (corrupt)")


def _copy_all(copy: Callable[[dict[str, Any]], None], entries: list[dict[str, Any]], name: str) -> None:
    """``copy(entry)`` for every manifest entry, :data:`_COPY_WORKERS` at a time, with a progress bar in
    bytes on a terminal; the first failure is raised (the other copies are joined)."""
    with tqdm(total=sum(e["size"] for e in entries), unit="B", unit_scale=True, desc=name, leave=False,
              disable=None) as bar, prefetch(copy, entries, workers=_COPY_WORKERS, name=name) as copies:
        for entry, _ in zip(entries, copies, strict=True):
            bar.update(entry["size"])


@dataclass(frozen=True)
class Export:
    """What :func:`export_tokens` wrote."""

    url: str
    artifact: str
    files: int
    bytes: int


def export_tokens(artifact_dir: str | os.PathLike[str], url: str) -> Export:
    """Write the tokens artifact in ``artifact_dir`` to ``url``, every file checked against the manifest while
    it is uploaded, ``manifest.json`` (unchanged) last. ``url`` must be new or empty, hold this very export
    (then nothing is written) or an export of it that did not finish (then every file is written again)."""
    directory, url = Path(artifact_dir), url.rstrip("/")
    raw = (directory / MANIFEST).read_bytes()
    manifest = _manifest(raw, str(directory / MANIFEST))
    fs, base = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):  # a folder tree: make each file's folder (object stores have none)
        fs = LocalFileSystem(auto_mkdir=True)
    entries = manifest["files"]
    done = Export(url, manifest["id"], len(entries) + 1, sum(e["size"] for e in entries) + len(raw))
    there = _read_manifest(fs, base, url)
    if there is not None and there[0] == raw:
        return done  # exported before: the same manifest seals the same files
    if there is not None:
        raise InputError(f"{url}: holds the export of {there[1]['id']}; export to a new or empty location")
    others = sorted({path[len(base) + 1:] for path in fs.find(base)} - {e["path"] for e in entries})
    if others:  # objects of this artifact alone are an export that did not finish: written again
        raise InputError(f"{url}: holds objects that are not part of {manifest['id']} ({others[0]}"
                         f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}); export to a new or empty "
                         "location")

    def upload(entry: dict[str, Any]) -> None:
        with open(directory / entry["path"], "rb") as src, fs.open(f"{base}/{entry['path']}", "wb",
                                                                   block_size=_BLOCK) as dst:
            _copy(src, dst, entry, str(directory / entry["path"]))

    _copy_all(upload, entries, "export-tokens")
    fs.pipe_file(f"{base}/{MANIFEST}", raw)
    return done


def _read_manifest(fs: Any, base: str, url: str) -> tuple[bytes, dict[str, Any]] | None:
    try:
        raw = fs.cat_file(f"{base}/{MANIFEST}")
    except FileNotFoundError:
        return None
    return raw, _manifest(raw, f"{url}/{MANIFEST}")


def open_remote_tokens(url: str) -> TokenStore:
    """The token store of an exported tokens artifact at ``url`` (or of a bare token store: the URL of its
    ``zarr.json`` folder), read-only, every object checked as :class:`_CheckedStore` says."""
    url = url.rstrip("/")
    fs, base = fsspec.core.url_to_fs(url)
    found = _read_manifest(fs, base, url)
    if found is not None:
        prefix = f"{TOKENS_STORE}/"
        files = {e["path"][len(prefix):]: e for e in found[1]["files"] if e["path"].startswith(prefix)}
        store_url = f"{url}/{TOKENS_STORE}"
    elif fs.exists(f"{base}/zarr.json"):
        files, store_url = None, url
    else:
        raise InputError(f"{url}: neither an exported tokens artifact (no {MANIFEST}; an export that did not "
                         "finish has none) nor a token store (no zarr.json)")
    checked = _CheckedStore(FsspecStore.from_url(store_url, read_only=True), url=store_url, files=files)
    try:
        group = zarr.open_group(checked, mode="r", zarr_format=3)
    except InputError:
        raise
    except Exception as exc:  # zarr raises several types for "not a group"
        raise InputError(f"token store {store_url}: not a Zarr v3 group ({exc})") from exc
    checked.layouts.update({name: _Layout.of(array) for name, array in group.arrays()})
    return TokenStore(store_url, group=group)


def import_tokens(url: str, root: str | os.PathLike[str]) -> tuple[Path, bool]:
    """Copy the exported tokens artifact at ``url`` into the artifact root ``root`` under its own id, byte
    for byte, each file checked against the manifest; published atomically (staging folder, manifest last,
    rename). Returns the artifact folder and whether it was copied (False: already there)."""
    url = url.rstrip("/")
    fs, base = fsspec.core.url_to_fs(url)
    found = _read_manifest(fs, base, url)
    if found is None:
        raise InputError(f"{url}: no {MANIFEST}, so not an exported tokens artifact (or its export did not "
                         "finish); export it with `stegopipe export-tokens ID URL`")
    raw, manifest = found
    store, artifact = ArtifactStore(root), manifest["id"]
    if store.exists(artifact):
        return store.path(artifact), False
    store.require_writable()
    with store.lock(artifact):
        if store.exists(artifact):
            return store.path(artifact), False
        staging = store.staging(artifact, fresh=True)

        def download(entry: dict[str, Any]) -> None:
            target = staging.dir / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            where = f"{url}/{entry['path']}"
            try:
                with fs.open(f"{base}/{entry['path']}", "rb", block_size=_BLOCK) as src, open(target, "wb") as dst:
                    _copy(src, dst, entry, where)
            except FileNotFoundError as exc:
                raise InputError(f"{where}: missing (the manifest lists it)") from exc

        try:
            _copy_all(download, manifest["files"], "import-tokens")
            (staging.dir / MANIFEST).write_bytes(raw)
            final = store.path(artifact)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging.dir, final)
        except BaseException:
            shutil.rmtree(staging.dir, ignore_errors=True)
            raise
    return final, True
