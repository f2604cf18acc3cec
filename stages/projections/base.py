"""The Projection protocol: anything that maps tokens ``[N, D]`` to codes ``[N, d]``.

Identity (the "DINO baseline"), PCA, random projection, h-NNE and the STEGO head all implement it, so
probe / evaluate / report never ask which kind they hold.

Contract of an implementation:

- ``kind``: registry name (``"identity"``, ``"pca"``, ``"rp"``, ``"hnne"``, ``"stego"``, ...);
  ``in_dim``: token width D; ``dim``: code width d.
- ``transform(tokens)``: ``[N, in_dim]`` numpy array or torch tensor -> ``[N, dim]`` float32 of the same
  type (a tensor stays on its device). Tokens of the wrong width or with NaN/inf raise ``InputError``.
- ``transform_map(feats)``: ``[B, in_dim, h, w]`` tensor -> ``[B, dim, h, w]`` float32 tensor.
- ``save(directory)``: writes ``projection.json`` (``{"format", "kind", "in_dim", "params"}``) and, when
  the projection has arrays, ``projection.safetensors``. No pickle. ``load(directory)`` inverts it.
- Fitting is per kind (e.g. ``PCAProjection.from_moments``) and is not part of the protocol.

``BaseProjection`` implements the shared parts (validation, numpy/torch dispatch, ``transform_map``,
file layout): a subclass provides ``dim``, ``_project`` (validated float tensor in, tensor out),
``_state`` (json params + arrays to save) and ``_from_state`` (the inverse). Subclasses register
with ``@register_projection("kind")``; ``load_projection(directory)`` dispatches on the saved kind (importing
the module its :class:`~stages.projections.methods.Method` names when the kind is not loaded yet).
"""
from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, TypeVar, overload, runtime_checkable

import numpy as np
from safetensors.numpy import load_file, save_file

from pipeline.artifacts import write_json_atomic
from pipeline.errors import ArtifactError, ConfigError, InputError
from pipeline.lazy import lazy_module
from stages.projections.methods import METHODS

META_FILE = "projection.json"
TENSORS_FILE = "projection.safetensors"
FORMAT_VERSION = 1

_REGISTRY: dict[str, type["BaseProjection"]] = {}

torch = lazy_module("torch")


@runtime_checkable
class Projection(Protocol):
    """Maps tokens ``[N, in_dim]`` to codes ``[N, dim]`` (see the module docstring for the contract)."""

    kind: str
    in_dim: int

    @property
    def dim(self) -> int: ...

    def transform(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor: ...

    def transform_map(self, feats: torch.Tensor) -> torch.Tensor: ...

    def save(self, directory: Path) -> None: ...

    @classmethod
    def load(cls, directory: Path) -> "Projection": ...


P = TypeVar("P", bound="BaseProjection")


def register_projection(kind: str) -> Callable[[type[P]], type[P]]:
    """Class decorator: register ``cls`` under ``kind`` (sets ``cls.kind``); a kind registers once."""

    def decorate(cls: type[P]) -> type[P]:
        existing = _REGISTRY.get(kind)
        if existing is not None and existing is not cls:
            raise ConfigError(
                f"projection kind {kind!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return decorate


def registered_kinds() -> list[str]:
    """Kinds registered so far (sorted)."""
    return sorted(_REGISTRY)


def read_projection_meta(directory: Path) -> dict[str, Any]:
    """Read and check ``projection.json`` of a saved projection; raises ``ArtifactError`` if absent/corrupt."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {directory} does not hold a saved projection")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from err
    missing = [key for key in ("format", "kind", "in_dim", "params") if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ArtifactError(f"{path} lacks the key(s) {missing}")
    if meta["format"] != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format {meta['format']!r}; this code reads format {FORMAT_VERSION}")
    return meta


def load_projection(directory: Path) -> "BaseProjection":
    """Load any saved projection, dispatching on the ``kind`` in its ``projection.json``."""
    meta = read_projection_meta(directory)
    kind = meta["kind"]
    method = METHODS.get(kind)
    if kind not in _REGISTRY and method is not None:  # its module registers the class (e.g. stego: torch)
        try:
            importlib.import_module(method.module)
        except ImportError as err:
            raise ArtifactError(
                f"{directory}: projection kind {kind!r} needs module {method.module}, which failed to import: {err}"
            ) from err
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise ArtifactError(
            f"{Path(directory) / META_FILE}: unknown projection kind {kind!r}; known kinds: "
            f"{sorted(set(_REGISTRY) | set(METHODS))}"
        )
    return cls.load(directory)


def check_fit_rows(x: np.ndarray, dim: int, method: str) -> tuple[int, int]:
    """``(n, D)`` of the fit rows ``x`` after checking them (finite float ``[n, D]``, else ``InputError``)
    and ``1 <= dim <= D`` (else ``ConfigError`` naming ``projection.dim`` and ``method``)."""
    if x.ndim != 2:
        raise InputError(f"tokens must be 2-D [n, D], got shape {x.shape}")
    n, d = x.shape
    check_tokens(x, d)
    if not 1 <= dim <= d:
        raise ConfigError(f"projection.dim={dim} is out of range: {method} needs 1 <= dim <= {d}")
    return n, d


def check_tokens(tokens: np.ndarray | torch.Tensor, in_dim: int, name: str = "tokens") -> None:
    """Raise ``InputError`` unless ``tokens`` is a finite float ``[N, in_dim]`` array/tensor."""
    if tokens.ndim != 2:
        raise InputError(f"{name} must be 2-D [N, {in_dim}], got shape {tuple(tokens.shape)}")
    if tokens.shape[1] != in_dim:
        raise InputError(f"{name} have width {tokens.shape[1]}, projection expects {in_dim}")
    if isinstance(tokens, torch.Tensor):
        if not tokens.is_floating_point():
            raise InputError(f"{name} must be floating point, got {tokens.dtype}")
        finite = bool(torch.isfinite(tokens).all())
    else:
        if not np.issubdtype(tokens.dtype, np.floating):
            raise InputError(f"{name} must be floating point, got {tokens.dtype}")
        finite = bool(np.isfinite(tokens).all())
    if not finite:
        raise InputError(f"{name} contain NaN or inf values")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class BaseProjection(ABC):
    """Shared implementation of the protocol; see the module docstring for what a subclass provides."""

    kind: ClassVar[str]
    in_dim: int

    @property
    @abstractmethod
    def dim(self) -> int:
        """Output width."""

    @abstractmethod
    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """Project validated finite tokens ``[N, in_dim]`` (float32 or float64) to ``[N, dim]``."""

    @abstractmethod
    def _state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able params and named arrays that ``_from_state`` rebuilds the projection from."""

    @classmethod
    @abstractmethod
    def _from_state(cls: type[P], in_dim: int, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> P:
        """Inverse of ``_state``."""

    @overload
    def transform(self, tokens: np.ndarray) -> np.ndarray: ...

    @overload
    def transform(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def transform(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """``[N, in_dim]`` -> ``[N, dim]`` float32, same type (and device) as the input."""
        check_tokens(tokens, self.in_dim)
        if isinstance(tokens, torch.Tensor):
            x = tokens.detach()
            return self._project(x.to(compute_dtype(x))).to(torch.float32)
        x = torch.from_numpy(np.ascontiguousarray(tokens))
        return self._project(x.to(compute_dtype(x))).to(torch.float32).numpy()

    def transform_map(self, feats: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim, h, w]`` -> ``[B, dim, h, w]`` float32 (all B·h·w tokens form one batch)."""
        if feats.ndim != 4 or feats.shape[1] != self.in_dim:
            raise InputError(
                f"feature map must be [B, {self.in_dim}, h, w], got shape {tuple(feats.shape)}"
            )
        b, d, h, w = feats.shape
        tokens = feats.permute(0, 2, 3, 1).reshape(b * h * w, d)
        codes = self.transform(tokens)
        return codes.reshape(b, h, w, self.dim).permute(0, 3, 1, 2).contiguous()

    def save(self, directory: Path) -> None:
        """Write ``projection.json`` and (if there are arrays) ``projection.safetensors`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        params, arrays = self._state()
        if arrays:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(directory / TENSORS_FILE))
        meta = {"format": FORMAT_VERSION, "kind": self.kind, "in_dim": int(self.in_dim), "params": params}
        write_json_atomic(directory / META_FILE, meta)

    @classmethod
    def load(cls: type[P], directory: Path) -> P:
        """Rebuild a projection saved by ``save``; ``ArtifactError`` if the files are missing or of another kind."""
        directory = Path(directory)
        meta = read_projection_meta(directory)
        if meta["kind"] != cls.kind:
            raise ArtifactError(f"{directory / META_FILE} holds kind {meta['kind']!r}, expected {cls.kind!r}")
        tensors = directory / TENSORS_FILE
        arrays = load_file(str(tensors)) if tensors.is_file() else {}
        try:
            return cls._from_state(int(meta["in_dim"]), meta["params"], arrays)
        except KeyError as err:
            raise ArtifactError(f"{directory}: saved {cls.kind} projection lacks {err}") from err
