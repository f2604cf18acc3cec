"""Storage specs: one YAML per artifact kind, in folders plugins register, checked after every stage.

A spec names required files (globs), JSON files with required keys, Zarr groups with arrays
(dtype, shape symbols such as ``[N, h, w, D]`` bound consistently across arrays, chunk shapes in the
same symbols, optional arrays) and required group attributes, and safetensors files with required
tensors. :func:`validate` raises :class:`ArtifactError` naming the file and what is wrong.
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ArtifactError

SPEC_DIRS: list[Path] = []


def register_spec_dir(directory: Path) -> None:
    """Let a plugin ship storage specs of its own artifact kinds."""
    if directory not in SPEC_DIRS:
        SPEC_DIRS.append(directory)
        load_spec.cache_clear()


@cache
def load_spec(kind: str) -> dict[str, Any]:
    paths = [d / f"{kind}.yaml" for d in SPEC_DIRS if (d / f"{kind}.yaml").is_file()]
    if not paths:
        raise ArtifactError(f"no storage spec for artifact kind '{kind}' (looked in {', '.join(map(str, SPEC_DIRS))})")
    path = paths[0]
    spec = yaml.safe_load(path.read_text()) or {}
    if spec.get("kind") != kind:
        raise ArtifactError(f"{path}: 'kind' must be '{kind}'")
    return spec


def _bind(symbols: dict[str, int], names: list[Any], actual: tuple[int, ...], where: str) -> None:
    if len(names) != len(actual):
        raise ArtifactError(f"{where}: expected {len(names)} dimensions {names}, found shape {list(actual)}")
    for name, size in zip(names, actual):
        if isinstance(name, int):
            if name != size:
                raise ArtifactError(f"{where}: dimension must be {name}, found shape {list(actual)}")
        elif symbols.setdefault(name, size) != size:
            raise ArtifactError(f"{where}: dimension {name}={size} disagrees with {name}={symbols[name]} "
                                f"elsewhere in the artifact (shape {list(actual)})")


def _check_zarr(directory: Path, name: str, spec: dict[str, Any], symbols: dict[str, int]) -> None:
    import zarr

    path = directory / name
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a missing/invalid group
        raise ArtifactError(f"{path}: not a readable Zarr group ({exc})") from exc
    missing = [a for a in spec.get("attrs", []) if a not in group.attrs]
    if missing:
        raise ArtifactError(f"{path}: missing group attributes {missing}")
    for array_name, array_spec in spec.get("arrays", {}).items():
        where = f"{path}/{array_name}"
        if array_name not in group:
            if array_spec.get("optional"):
                continue
            raise ArtifactError(f"{where}: required array is missing")
        array = group[array_name]
        if "dtype" in array_spec and str(array.dtype) != array_spec["dtype"]:
            raise ArtifactError(f"{where}: dtype {array.dtype}, expected {array_spec['dtype']}")
        if "shape" in array_spec:
            _bind(symbols, array_spec["shape"], tuple(array.shape), where)
        if "chunks" in array_spec:
            expected = [symbols.get(c, c) if isinstance(c, str) else c for c in array_spec["chunks"]]
            if list(array.chunks) != expected:
                raise ArtifactError(f"{where}: chunks {list(array.chunks)}, expected {expected}")


def _check_safetensors(directory: Path, name: str, spec: dict[str, Any], symbols: dict[str, int]) -> None:
    from safetensors import safe_open

    path = directory / name
    try:
        with safe_open(str(path), framework="numpy") as handle:
            keys = set(handle.keys())
            for tensor, tensor_spec in (spec.get("tensors") or {}).items():
                if tensor not in keys:
                    raise ArtifactError(f"{path}: required tensor '{tensor}' is missing")
                if tensor_spec and "shape" in tensor_spec:
                    _bind(symbols, tensor_spec["shape"], tuple(handle.get_slice(tensor).get_shape()),
                          f"{path}:{tensor}")
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from exc


def validate(kind: str, directory: Path) -> None:
    """Check ``directory`` against the spec of ``kind`` (shape symbols bind per Zarr group / file).

    Raises ArtifactError on the first problem.
    """
    spec = load_spec(kind)
    for pattern in spec.get("files", []):
        if not list(directory.glob(pattern)):
            raise ArtifactError(f"{directory}: required file '{pattern}' is missing (kind {kind})")
    for name, keys in (spec.get("json") or {}).items():
        path = directory / name
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: not a readable JSON file ({exc})") from exc
        missing = [k for k in keys or [] if k not in data]
        if missing:
            raise ArtifactError(f"{path}: missing keys {missing}")
    for name, zspec in (spec.get("zarr") or {}).items():
        for match in sorted(directory.glob(name)) or [directory / name]:
            _check_zarr(directory, match.relative_to(directory).as_posix(), zspec, {})
    for name, sspec in (spec.get("safetensors") or {}).items():
        for match in sorted(directory.glob(name)) or [directory / name]:
            _check_safetensors(directory, match.relative_to(directory).as_posix(), sspec or {}, {})
