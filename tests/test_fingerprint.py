"""Code fingerprints in artifact ids (issue 18.1, 18.5): an edit of a stage's code, of a helper it calls or
of a module-level constant changes the ids of the stages that import it and no others; comments,
docstrings and formatting change nothing; manifests record what the fingerprint covered; a process whose
code differs from the planner's refuses the task."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import fingerprint as fp
from pipeline.artifacts import ArtifactStore, id_from_manifest
from pipeline.config import load_config
from pipeline.errors import StageError
from pipeline.planner import Request, plan
from pipeline.registry import get_stage, stage_fingerprint
from pipeline.runner import RemoteFailure, _execute_remote, run_tasks

REPO = Path(__file__).resolve().parent.parent
STAGE_MODULES = {"synthesize": "stages.synthesize", "prepare": "stages.prepare", "extract": "stages.extract",
                 "knn": "stages.knn", "reduce": "stages.reduce", "train-head": "stages.train_head",
                 "probe": "stages.probe", "evaluate": "stages.evaluate", "report": "stages.report"}
LOSS = "stages/stego/loss.py"
LAYOUT = "stages/store/layout.py"


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the ``pipeline`` and ``stages`` packages to edit."""
    dest = tmp_path_factory.mktemp("copy")
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, dest / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _fingerprints(copy: Path) -> dict[str, dict[str, object]]:
    """Each stage's fingerprint (digest and files) as the copy's code computes it, in a fresh process."""
    script = ("import json; from pipeline.fingerprint import fingerprint; "
              f"print(json.dumps({{s: fingerprint(m, plugins=[]).record() for s, m in {STAGE_MODULES!r}.items()}}))")
    env = {**os.environ, "PYTHONPATH": str(copy), "STEGOPIPE_CACHE_DIR": str(copy / ".cache")}
    done = subprocess.run([sys.executable, "-c", script], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _edited(copy: Path, rel: str, old: str, new: str) -> dict[str, dict[str, object]]:
    """The fingerprints with ``old`` replaced by ``new`` in ``rel`` (restored afterwards)."""
    path = copy / rel
    original = path.read_text()
    assert original.count(old) == 1, old
    path.write_text(original.replace(old, new))
    try:
        return _fingerprints(copy)
    finally:
        path.write_text(original)


def _changed(before: dict[str, dict[str, object]], after: dict[str, dict[str, object]]) -> set[str]:
    return {stage for stage in before if before[stage]["digest"] != after[stage]["digest"]}


def test_helper_and_constant_edits_change_exactly_the_dependent_stages(package_copy: Path) -> None:
    base = _fingerprints(package_copy)
    assert len({entry["digest"] for entry in base.values()}) == len(STAGE_MODULES)
    # a helper that correlation_loss calls (not the stage function): only train-head imports the loss
    helper = _edited(package_copy, LOSS, "return F.normalize(t, dim=1, eps=_NORM_EPS)",
                     "return F.normalize(t * 1.0, dim=1, eps=_NORM_EPS)")
    assert _changed(base, helper) == {"train-head"}
    assert fp.changed_code(base["train-head"]["files"], helper["train-head"]["files"]) == [f"{LOSS} (_norm)"]
    # a module-level constant of the loss: the same
    constant = _edited(package_copy, LOSS, "_NORM_EPS = 1e-10", "_NORM_EPS = 1e-9")
    assert _changed(base, constant) == {"train-head"}
    assert fp.changed_code(base["train-head"]["files"], constant["train-head"]["files"]) == [f"{LOSS} (_NORM_EPS)"]
    # a constant of the token store: every stage that reads or writes tokens, not prepare or synthesize
    store = _edited(package_copy, LAYOUT, "MAX_SAMPLE_BYTES = 1 << 30", "MAX_SAMPLE_BYTES = 1 << 31")
    assert _changed(base, store) == set(STAGE_MODULES) - {"prepare", "synthesize"}


def test_comments_docstrings_and_formatting_change_no_fingerprint(package_copy: Path) -> None:
    base = _fingerprints(package_copy)
    path = package_copy / LOSS
    original = path.read_text()
    edited = original.replace("L2-normalise along the channel dim 1", "Unit length along dim 1 (reworded)")
    edited = edited.replace("_NORM_EPS = 1e-10", "_NORM_EPS = (\n    1e-10  # a comment\n)\n\n# another comment")
    assert edited != original
    path.write_text(edited)
    try:
        assert _fingerprints(package_copy) == base
    finally:
        path.write_text(original)


def _package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = tmp_path / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_the_closure_follows_every_kind_of_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _package(tmp_path, monkeypatch, "fpdemo", {
        "__init__.py": "",
        "plugin.py": "",
        "stage.py": """
            from . import rel_a
            from .sub import rel_b
            lazy = lazy_module("fpdemo.lazy_target")
            def run():
                import fpdemo.in_function
                from pipeline.cli import main  # excluded: not followed
            """,
        "rel_a.py": "X = 1\n", "lazy_target.py": "", "in_function.py": "", "unused.py": "",
        "sub/__init__.py": "", "sub/rel_b.py": "",
    })
    found = fp.fingerprint("fpdemo.stage", plugins=["fpdemo.plugin"])
    ours = {rel for rel in found.files if rel.startswith("fpdemo/")}
    assert ours == {f"fpdemo/{rel}" for rel in ("__init__.py", "plugin.py", "stage.py", "rel_a.py", "lazy_target.py",
                                                 "in_function.py", "sub/__init__.py", "sub/rel_b.py")}
    assert "pipeline/cli.py" not in found.files
    assert found.files["fpdemo/rel_a.py"]["defs"].keys() == {"X"}


def test_an_edit_that_keeps_size_and_mtime_changes_the_fingerprint(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The parse cache is keyed by the file's bytes, not by its size and mtime (both can survive an edit)."""
    _package(tmp_path, monkeypatch, "fpsame", {"__init__.py": "", "plugin.py": "", "stage.py": "SCALE = 1\n"})
    stage = tmp_path / "fpsame" / "stage.py"
    before = fp.fingerprint("fpsame.stage", plugins=["fpsame.plugin"])
    stat = stage.stat()
    stage.write_text("SCALE = 3\n")
    os.utime(stage, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert stage.stat().st_size == stat.st_size and stage.stat().st_mtime_ns == stat.st_mtime_ns
    after = fp.fingerprint("fpsame.stage", plugins=["fpsame.plugin"])
    assert fp.changed_code(before.files, after.files) == ["fpsame/stage.py (SCALE)"]


def test_every_exclusion_names_a_module_and_a_reason() -> None:
    for module, reason in fp.EXCLUDED.items():
        assert fp.module_file(module) is not None, module
        assert len(reason) > 20, module


def _toy_task(overrides: list[str] | None = None):
    cfg = load_config(None, ["run.executor=local", *(overrides or [])])
    tasks, _ = plan([Request("t_source", cfg)])
    return cfg, tasks[0]


def test_ids_carry_the_fingerprint_and_manifests_record_its_files(toy: Path) -> None:
    cfg, task = _toy_task()
    expected = stage_fingerprint(get_stage("t_source"))
    assert task.code == {"fingerprint": expected.digest, "format": "1"}
    [result] = run_tasks([task], cfg.run)
    manifest = ArtifactStore(toy).manifest(result.id)
    assert manifest["version"] == task.code and id_from_manifest(manifest) == result.id
    files = manifest["fingerprint"]["files"]
    assert "tests/plugin_stages.py" in files and "t_source" in files["tests/plugin_stages.py"]["defs"]
    assert manifest["fingerprint"]["digest"] == expected.digest


def test_package_versions_enter_the_id_only_when_asked(toy: Path) -> None:
    import stages.plugin  # noqa: F401  (declares the numerics packages)

    _, plain = _toy_task()
    _, pinned = _toy_task(["run.id_includes_packages=true"])
    assert "packages" not in plain.code and pinned.id != plain.id
    assert pinned.code["packages"]["numpy"] and pinned.code["packages"]["python"]


def test_a_worker_with_other_code_refuses_the_task(toy: Path) -> None:
    cfg, task = _toy_task()
    task.code = {**task.code, "fingerprint": "0" * 32}
    task.code_files = {**task.code_files, "tests/plugin_stages.py": "stale"}
    failure = _execute_remote(task, str(toy), ["stages.plugin", "tests.plugin_stages"], False, "cpu", None)
    assert isinstance(failure, RemoteFailure) and isinstance(failure.error, StageError)
    message = str(failure.error)
    assert socket.gethostname() in message and "tests/plugin_stages.py" in message and "\n" not in message
    assert ArtifactStore(toy).ids() == []  # nothing published


def test_a_process_without_the_checkout_on_sys_path_fingerprints_the_same_code(tmp_path: Path) -> None:
    """The ``stegopipe`` console script's ``sys.path`` does not hold the checkout (an editable install finds it
    through its own finder): its fingerprint must cover the same files as one from the checkout, or a
    SLURM worker started with ``python -m`` from the checkout refuses every task (and edits go unseen)."""
    code = ("import sys, json; sys.path[:] = [p for p in sys.path if p not in ('', %r)]\n"
            "import stages.plugin; from pipeline.registry import get_stage, stage_fingerprint\n"
            "print(json.dumps(sorted(stage_fingerprint(get_stage('synthesize')).files)))" % str(REPO))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    files = json.loads(done.stdout)
    assert files and files == sorted(stage_fingerprint(get_stage("synthesize")).files)


def test_a_module_without_source_is_an_error_not_an_empty_fingerprint() -> None:
    with pytest.raises(StageError, match="cannot fingerprint module no_such_pkg.stage: its source file is not found"):
        fp.fingerprint("no_such_pkg.stage", plugins=[])
