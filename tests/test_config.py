"""Config: presets, dotted overrides, errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest

import stages.plugin  # noqa: F401  (registers the config sections)
from pipeline.config import load_config, parse_override
from pipeline.errors import ConfigError


def test_defaults_preset_and_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STEGOPIPE_ROOT", str(tmp_path))
    cfg = load_config("synthetic", ["dataset.synthetic.n_train=7", "run.slurm.cores=4", "run.device=cpu"])
    assert cfg.dataset.name == "synthetic"
    assert cfg.dataset.synthetic.n_train == 7 and isinstance(cfg.dataset.synthetic.n_train, int)
    assert cfg.run.slurm.cores == 4 and cfg.run.device == "cpu"
    assert cfg.run.root == str(tmp_path)  # STEGOPIPE_ROOT is the default root


def test_unknown_key_names_the_key_and_the_nearest_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dataset.synthetic.n_trian=3"])
    assert "dataset.synthetic.n_trian" in str(err.value) and "dataset.synthetic.n_train" in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key 'datset.name'.*dataset.name"):
        load_config(None, ["datset.name=x"])


def test_wrong_type_names_key_value_and_expected_type() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dataset.synthetic.n_train=many"])
    message = str(err.value)
    assert "dataset.synthetic.n_train" in message and "'many'" in message and "int" in message


def test_bad_preset_and_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*synthetic"):
        load_config("nope")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("dataset.name")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset:\n  nme: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'dataset.nme'"):
        load_config(str(bad))


def test_extends_layers_presets(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("extends: synthetic\ndataset:\n  synthetic:\n    seed: 5\n")
    cfg = load_config(str(child))
    assert cfg.dataset.name == "synthetic" and cfg.dataset.synthetic.seed == 5
