"""A user's own method without touching the package (README "Add your own method"): a toy reducer defined in
a module outside the repository, named in STEGOPIPE_PLUGINS, runs reduce → probe → evaluate → report, and
its label is in the report; the registry is the one list every method list comes from."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import stages.plugin  # noqa: F401  (registers stages and methods)
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.planner import Request, plan
from stages.projections.methods import get_method, method_names, methods
from stages.report import method_label
from tests.faults_util import TINY

REPO = Path(__file__).resolve().parent.parent



def readme_example() -> str:
    """The module of the README's section "Add your own method" (its first python block), as it stands."""
    section = (REPO / "README.md").read_text().split("## Add your own method", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_registry_is_the_one_list_of_methods() -> None:
    names = method_names()
    assert names[:5] == ("identity", "pca", "rp", "hnne", "umap") and "stego" in names
    assert [m.name for m in methods("reduce")] == ["pca", "rp", "hnne", "umap"]
    assert get_method("stego").stage == "train-head" and get_method("identity").stage is None
    assert method_label("umap", table=True) == "UMAP (beyond the paper)" and method_label("pca") == "PCA"
    with pytest.raises(ConfigError, match=r"projection.method='umpa': expected one of identity, pca, rp, hnne, umap"):
        plan([Request("probe", load_config(None, ["projection.method=umpa"]))])
    with pytest.raises(ConfigError, match="the reduce stage fits one of pca, rp, hnne, umap"):
        plan([Request("reduce", load_config(None, ["projection.method=stego"]))])


def test_umap_asked_for_on_the_gpu_without_cuml_is_one_line() -> None:
    pytest.importorskip("umap")
    if __import__("importlib").util.find_spec("cuml") is not None:
        pytest.skip("cuML is installed here")
    cfg = load_config(None, ["projection.method=umap", "projection.dim=2", "umap.backend=cuml"])
    with pytest.raises(ConfigError, match=r"^umap.backend=cuml needs cuML on an NVIDIA GPU: pip install 'stegopipe\[gpu\]'"):
        plan([Request("reduce", cfg)])
    tasks, _ = plan([Request("reduce", load_config(None, ["projection.method=umap", "projection.dim=2"]))])
    assert tasks[-1].params["umap.backend"] == "umap-learn"  # auto, resolved when planned


def test_a_plugin_method_from_outside_the_repository_runs_to_a_report(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_methods.py").write_text(readme_example())
    experiment = tmp_path / "mine.yaml"
    experiment.write_text(yaml.safe_dump({
        "experiment": "mine", "overrides": TINY, "targets": ["evaluate"], "collect": "report",
        "matrix": [{"projection.method": ["firstdims", "pca"], "projection.dim": [4]}]}))
    env = {**os.environ, "STEGOPIPE_PLUGINS": "my_methods", "STEGOPIPE_ROOT": str(tmp_path / "artifacts"),
           "PYTHONPATH": os.pathsep.join([str(plugins), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "--quiet", "run", str(experiment)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = Path(done.stdout.strip().splitlines()[-1])
    text = (report / "report.md").read_text()
    assert "| synthetic | First dims (beyond the paper) | 4 | cluster |" in text
    with open(report / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["method"] for r in rows} == {"firstdims", "pca"} and all(0 <= float(r["miou"]) <= 100 for r in rows)
    listing = subprocess.run([sys.executable, "-m", "pipeline.cli", "ls", "reduce"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert "First dims" in listing.stdout, listing.stdout + listing.stderr


def test_methods_command_and_make_help_list_the_registry() -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()[1:]
    assert [line.split()[0] for line in lines] == list(method_names())
    assert any(line.startswith("umap") and "umap.*" in line and "beyond the paper" in line for line in lines)
