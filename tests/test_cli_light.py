"""Light commands import no stage code: ``--help``, ``ls``, ``stages``, ``show``, ``config``, a gc dry run and
shell completion leave torch, timm, torchvision, scipy, zarr and dask unimported (each in a fresh process)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "timm", "torchvision", "scipy", "zarr", "dask", "distributed")
PROBE = """
import sys
from pipeline.cli import main
try:
    main(sys.argv[1:], prog_name="stegopipe")
except SystemExit as exc:
    code = exc.code
print("HEAVY=" + ",".join(sorted({m.split(".")[0] for m in sys.modules} & set(%r))))
""" % (HEAVY,)


def _heavy_after(args: list[str], env: dict[str, str]) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("HEAVY=")]
    assert lines, done.stderr
    return lines[-1].removeprefix("HEAVY="), done.stdout


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("light") / "artifacts"
    env = {**os.environ, "STEGOPIPE_ROOT": str(root)}
    for name in ("STEGOPIPE_PLUGINS", "STEGOPIPE_WEIGHTS_DIR", "STEGOPIPE_DATA_ROOT"):
        env.pop(name, None)
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "synthesize", "dataset.synthetic.n_train=2",
                    "dataset.synthetic.n_val=1"], cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    return env


@pytest.mark.parametrize("args", [["--help"], ["ls"], ["ls", "synthesize"], ["stages"], ["show", "synthesize-"],
                                  ["config", "synthetic"], ["gc"], ["verify"], ["run", "--help"]], ids=" ".join)
def test_light_commands_import_no_stage_code(env: dict[str, str], args: list[str]) -> None:
    heavy, out = _heavy_after(args, env)
    assert heavy == "", f"`stegopipe {' '.join(args)}` imported {heavy}"


def test_completion_is_light_and_offers_names(env: dict[str, str]) -> None:
    completing = {**env, "_STEGOPIPE_COMPLETE": "bash_complete", "COMP_WORDS": "stegopipe run ", "COMP_CWORD": "2"}
    heavy, out = _heavy_after([], completing)
    assert "plain,demo" in out and "plain,train-head" in out and "plain,table2" in out
    assert heavy == ""


def test_help_lists_plugin_commands_without_loading_them(env: dict[str, str]) -> None:
    heavy, out = _heavy_after(["--help"], env)
    assert "predict" in out and "import-stego" in out and "export-squirrel" in out


def test_show_finds_by_prefix(env: dict[str, str], tmp_path: Path) -> None:
    _, out = _heavy_after(["show", "synthesize-"], env)
    assert "stage      synthesize" in out


def test_gc_plans_every_experiment_in_a_fresh_process(env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "gc", "--yes"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 2 and "refusing to delete" in done.stderr  # the paper experiments were found
    assert "table2" in done.stderr
