"""The Projection protocol, registry and identity projection (stages/projections/)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ArtifactError, ConfigError, InputError
from stages.projections import (
    IdentityProjection,
    Projection,
    check_tokens,
    load_projection,
    register_projection,
    registered_kinds,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def test_identity_transform_numpy_and_torch() -> None:
    proj = IdentityProjection(4)
    assert isinstance(proj, Projection)
    assert proj.kind == "identity" and proj.in_dim == 4 and proj.dim == 4
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    out = proj.transform(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float32))
    t = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    tout = proj.transform(t)
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.float32
    torch.testing.assert_close(tout, t.float())


def test_identity_does_not_alias_input() -> None:
    proj = IdentityProjection(2)
    x = np.zeros((2, 2), np.float32)
    proj.transform(x)[0, 0] = 5.0
    assert x[0, 0] == 0.0
    t = torch.zeros(2, 2)
    proj.transform(t)[0, 0] = 5.0
    assert t[0, 0] == 0.0


def test_wrong_width_names_both_widths() -> None:
    with pytest.raises(InputError, match="tokens have width 384, projection expects 768"):
        IdentityProjection(768).transform(np.zeros((2, 384), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tokens_rejected(bad: float) -> None:
    x = np.ones((3, 4), np.float32)
    x[1, 2] = bad
    with pytest.raises(InputError, match="NaN or inf"):
        IdentityProjection(4).transform(x)
    with pytest.raises(InputError, match="NaN or inf"):
        IdentityProjection(4).transform(torch.from_numpy(x))


def test_non_2d_and_integer_tokens_rejected() -> None:
    with pytest.raises(InputError, match="2-D"):
        check_tokens(np.zeros((2, 3, 4), np.float32), 4)
    with pytest.raises(InputError, match="floating point"):
        check_tokens(np.zeros((2, 4), np.int64), 4)


def test_transform_map_matches_per_token_transform() -> None:
    proj = IdentityProjection(3)
    feats = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    out = proj.transform_map(feats)
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, feats)
    with pytest.raises(InputError, match=r"\[B, 3, h, w\]"):
        proj.transform_map(torch.zeros(2, 4, 4, 5))


def test_identity_save_load_roundtrip(tmp_path: Path) -> None:
    IdentityProjection(7).save(tmp_path)
    meta = json.loads((tmp_path / "projection.json").read_text())
    assert meta == {"format": 1, "kind": "identity", "in_dim": 7, "params": {}}
    assert not (tmp_path / "projection.safetensors").exists()
    loaded = load_projection(tmp_path)
    assert isinstance(loaded, IdentityProjection) and loaded.dim == 7


def test_load_projection_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="projection.json is missing"):
        load_projection(tmp_path)
    (tmp_path / "projection.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_projection(tmp_path)
    (tmp_path / "projection.json").write_text(json.dumps({"format": 1, "kind": "tsne", "in_dim": 3, "params": {}}))
    with pytest.raises(ArtifactError, match="unknown projection kind 'tsne'"):
        load_projection(tmp_path)
    (tmp_path / "projection.json").write_text(json.dumps({"format": 9, "kind": "identity", "in_dim": 3, "params": {}}))
    with pytest.raises(ArtifactError, match="format 9"):
        load_projection(tmp_path)
    (tmp_path / "projection.json").write_text(json.dumps({"format": 1, "kind": "identity"}))
    with pytest.raises(ArtifactError, match="in_dim"):
        load_projection(tmp_path)


def test_registry_rejects_a_second_class_for_a_kind() -> None:
    assert "identity" in registered_kinds()
    with pytest.raises(ConfigError, match="already registered"):

        @register_projection("identity")
        class Other(IdentityProjection):
            pass


def test_load_projection_imports_the_module_of_a_saved_kind(tmp_path: Path) -> None:
    """A saved STEGO head loads in a process that never imported stages.projections.stego (torch): the
    method registry names the module of each kind."""
    from stages.projections.stego import StegoProjection
    from stages.stego.head import StegoHead

    StegoProjection(StegoHead(4, 2, "linear", 0.1)).save(tmp_path)
    code = (
        "import sys; import stages.plugin; from stages.projections import load_projection\n"
        "assert 'stages.projections.stego' not in sys.modules\n"
        f"p = load_projection({str(tmp_path)!r}); print(p.kind, p.dim)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["stego", "2"]
