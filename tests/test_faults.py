"""Fault injection on the real stages: kill -9 at points the stage reaches, concurrent runs, a full disk,
flipped bytes.

Kill tests: the stage runs in a ``stegopipe run`` process that SIGKILLs itself at a point it reports itself
(``STEGOPIPE_FAULT_KILL_AT``: the stage's start, its N-th shard marker, or just before its manifest), so
every case kills whatever the machine's speed or load; the re-run completes, its files are bit-identical
(sha256 from the manifests) to an uninterrupted run in another root, and a resumable stage reuses exactly
the shards marked before the kill. The short ``faults`` subset kills a forked CLI once per stage; the
``faults_full`` runs kill a fresh interpreter at up to 5 seeded points per stage.
"""
from __future__ import annotations

import errno
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.artifacts import ArtifactStore
from pipeline.cli import main
from pipeline.errors import ArtifactError, StageError
from pipeline.experiments import Experiment
from tests.faults_util import (
    TINY,
    CliRun,
    build,
    cli_args,
    digests,
    flip_byte,
    forget,
    manifest,
    markers,
    plan_stage,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Case:
    """A stage under fault: its overrides (on top of TINY) and request args."""

    stage: str
    overrides: tuple[str, ...] = ()
    args: dict[str, Any] = field(default_factory=dict)
    resumable: bool = True


CASES = {  # the other cases read the same TINY extract artifacts (4 shards of 2 images per split)
    # 16 images, 8 shards: extract marks a shard done two shards after writing it, so 4 would be too few
    "extract": Case("extract", ("dataset.synthetic.n_train=16",), {"split": "train"}),
    # h-NNE on 8 images × 2×2 tokens, codes materialised for train and val (4 shards each)
    "reduce": Case("reduce", ("projection.method=hnne", "projection.dim=2", "reduce.hnne_tokens=32")),
    # not resumable: a killed run restarts from scratch and must end identical all the same
    "train-head": Case("train-head", (), {}, resumable=False),
    # 4 CRF shards
    "evaluate": Case("evaluate", ("evaluate.crf=true",)),
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(root the faults happen in, root of the uninterrupted reference runs), shared by the module."""
    base = tmp_path_factory.mktemp("faults")
    return base / "work", base / "reference"


@dataclass(frozen=True)
class Reference:
    """An uninterrupted in-process run: artifact id, file digests, shards it computed."""

    id: str
    digests: dict[str, str]
    shards: int


_REFERENCES: dict[str, Reference] = {}


def reference(case: Case, root: Path) -> Reference:
    if case.stage not in _REFERENCES:
        result = build(root, case.stage, *case.overrides, args=case.args)
        assert result is not None
        _REFERENCES[case.stage] = Reference(result.id, digests(result.path), manifest(result.path)["shards"]["computed"])
    return _REFERENCES[case.stage]


def fault_points(ref: Reference) -> list[str]:
    """Every point a stage reports: its start, each shard marker, just before its manifest."""
    return ["start:1", *(f"shard:{n}" for n in range(1, ref.shards + 1)), "publish:1"]


def kill_and_resume(case: Case, roots: tuple[Path, Path], log: Path, *, fork: bool, point: str) -> dict[str, Any]:
    """One fault: the stage's process SIGKILLs itself at ``point`` (``EVENT:N``); re-run it in-process and
    compare with the reference."""
    work, ref_root = roots
    ref = reference(case, ref_root)
    assert point in fault_points(ref), (point, fault_points(ref))
    build(work, case.stage, *case.overrides, args=case.args, upstream_only=True)
    forget(work, ref.id)
    fault = f"{case.stage}:{point}"
    run = CliRun(cli_args(case.stage, *case.overrides, args=case.args), work, log, fork=fork, fault=fault)
    report = run.killed_at_fault(ref.id)
    assert report.killed, f"{fault}: exit {run.returncode}, not killed:\n{run.output()[-3000:]}"
    assert report.started and f"[fault] SIGKILL at {fault}" in run.output()
    store = ArtifactStore(work)
    assert not store.exists(ref.id)  # nothing half-done was published
    event, n = point.split(":")
    if event != "publish":  # (evaluate unmarks its CRF shards before writing its outputs)
        assert len(report.markers) == (int(n) if event == "shard" else 0), (fault, report.markers)
    resumed = build(work, case.stage, *case.overrides, args=case.args)
    assert resumed is not None and resumed.id == ref.id and resumed.status == "ran"
    assert digests(resumed.path) == ref.digests, f"{case.stage} after a kill at {point} differs"
    assert store.verify(ref.id) == []
    assert not (work / ".locks" / f"{ref.id}.lock").exists()
    shards = manifest(resumed.path)["shards"]
    expected = len(report.markers) if case.resumable else 0
    assert shards == {"computed": ref.shards - expected, "reused": expected}, (fault, shards, report.markers)
    return {"point": point, "markers": report.markers, "shards": shards}


# --------------------------------------------------------------------------------------------------
# kill -9
# --------------------------------------------------------------------------------------------------

ONCE = [  # (case, point): at the start, after the first shard, mid-way, after the last, before the manifest
    ("extract", "shard:1"),
    ("reduce", "shard:5"),  # of 11: the fit, the train store, 3 of its 4 shards
    ("train-head", "publish:1"),  # trained, files staged, no manifest yet
    ("evaluate", "start:1"),
    ("evaluate", "shard:4"),  # every CRF shard done, nothing merged yet
]


@pytest.mark.faults
@pytest.mark.parametrize(("name", "point"), ONCE, ids=[f"{n}-{p}" for n, p in ONCE])
def test_kill_9_once_then_rerun_is_bit_identical(name: str, point: str, roots: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    """A forked CLI killed at one point; the resumed run reuses exactly the shards marked before it."""
    outcome = kill_and_resume(CASES[name], roots, tmp_path / "cli.log", fork=True, point=point)
    if point.startswith("shard:"):
        assert outcome["shards"]["reused"] == int(point.split(":")[1]) >= 1


@pytest.mark.faults_full
@pytest.mark.parametrize("name", list(CASES))
def test_kill_9_at_seeded_points(name: str, roots: tuple[Path, Path], tmp_path: Path) -> None:
    """A fresh interpreter killed at 5 seeded points (of every point the stage reports; train-head: both)."""
    case = CASES[name]
    points = fault_points(reference(case, roots[1]))
    chosen = random.Random(name).sample(points, min(5, len(points)))
    outcomes = [kill_and_resume(case, roots, tmp_path / f"cli-{k}.log", fork=False, point=point)
                for k, point in enumerate(chosen)]
    if case.resumable:  # some kills came after finished shards, whose reuse kill_and_resume checked
        assert any(o["shards"]["reused"] for o in outcomes), outcomes


@pytest.mark.faults
def test_failure_after_the_crf_merge_redoes_the_crf(roots: tuple[Path, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate deletes its staged CRF shards before writing its outputs; a run dying there (a kill found
    this) must not leave shard markers without their files behind."""
    import stages.evaluate as evaluate

    case = CASES["evaluate"]
    ref = reference(case, roots[1])
    work = tmp_path / "artifacts"

    def dies(path: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, "simulated crash while writing the examples", str(path))

    monkeypatch.setattr(evaluate, "save_panels", dies)
    with pytest.raises(StageError, match="simulated crash"):
        build(work, case.stage, *case.overrides)
    assert not (work / ".staging" / ref.id / "crf_shards").exists() and markers(work, ref.id) == []
    monkeypatch.undo()
    resumed = build(work, case.stage, *case.overrides)
    assert resumed is not None and digests(resumed.path) == ref.digests
    assert manifest(resumed.path)["shards"] == {"computed": 4, "reused": 0}


@pytest.mark.faults_full
def test_killed_crf_pool_leaves_no_workers_behind(roots: tuple[Path, Path], tmp_path: Path) -> None:
    """With CRF worker processes, a SIGKILL of the stage process must not leave the pool running. The stage
    stops itself after its first CRF shard (its pool alive), then gets kill -9 from here."""
    import psutil

    case = Case("evaluate", (*CASES["evaluate"].overrides, "evaluate.crf_workers=2"))
    work, _ = roots
    _, _, target = plan_stage(work, case.stage, *case.overrides)
    build(work, case.stage, *case.overrides, upstream_only=True)
    forget(work, target)
    run = CliRun(cli_args(case.stage, *case.overrides), work, tmp_path / "cli.log", fault="evaluate:shard:1:STOP")
    stage = psutil.Process(run.pid)
    deadline = time.monotonic() + 180
    while stage.status() != psutil.STATUS_STOPPED:
        assert run.poll() is None and time.monotonic() < deadline, f"never stopped:\n{run.output()[-3000:]}"
        time.sleep(0.02)
    workers = [p for p in stage.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 2, f"the CRF pool is not running: {workers}"
    assert run.kill()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"CRF workers outlived the killed stage: {alive}"


# --------------------------------------------------------------------------------------------------
# two runs of one experiment at once
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fork", [pytest.param(True, marks=pytest.mark.faults),
                                  pytest.param(False, marks=pytest.mark.faults_full)])
def test_two_concurrent_runs_of_an_experiment_compute_each_artifact_once(fork: bool, root: Path,
                                                                          tmp_path: Path) -> None:
    """Two `stegopipe run <experiment.yaml>` at once (forked, or fresh interpreters with a bigger matrix)."""
    matrix: list[dict[str, Any]] = [{"projection.method": ["identity"], "projection.seed": [0, 1]}]
    if not fork:
        matrix.append({"projection.method": ["pca"], "projection.dim": [3]})
    spec = {"experiment": "tiny-concurrent", "overrides": [*TINY, "probe.steps=5"], "matrix": matrix,
            "targets": ["evaluate"], "collect": "report"}
    path = tmp_path / "tiny-concurrent.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    tasks, targets = Experiment.load(str(path)).plan()
    runs = [CliRun(["run", str(path)], root, tmp_path / f"run-{k}.log", fork=fork) for k in range(2)]
    codes = [r.wait(300) for r in runs]
    logs = [r.output() for r in runs]
    assert codes == [0, 0], logs
    started = Counter(line.split()[1] for log in logs for line in log.splitlines() if line.startswith("[run] "))
    assert set(started) == {t.id for t in tasks} and set(started.values()) == {1}, started  # each built once
    assert all(started[t] == 1 for t in started) and len(started) == len(tasks)
    store = ArtifactStore(root)
    assert set(store.ids()) == {t.id for t in tasks}
    assert _cli(root, "verify").exit_code == 0
    final = str(store.path(targets[0]))
    assert all(log.rstrip().splitlines()[-1] == final for log in logs)  # both print the report's path
    assert not list((root / ".locks").glob("*.lock"))


# --------------------------------------------------------------------------------------------------
# a full disk
# --------------------------------------------------------------------------------------------------


def _enospc_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> list[str]:
    """Make file writes fail with ENOSPC after ``writes`` successful ones: zarr's LocalStore (metadata) and
    the token store's direct shard writes (``os.writev``); returns the written keys."""
    from zarr.storage import LocalStore

    real_set, real_writev = LocalStore.set, os.writev
    done: list[str] = []

    async def full_disk(self: LocalStore, key: str, value: Any) -> None:
        if len(done) >= writes:
            raise OSError(errno.ENOSPC, "No space left on device", key)
        done.append(key)
        await real_set(self, key, value)

    def full_disk_writev(fd: int, buffers: Any) -> int:
        if len(done) >= writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        done.append(f"fd {fd}")
        return real_writev(fd, buffers)

    monkeypatch.setattr(LocalStore, "set", full_disk)
    monkeypatch.setattr(os, "writev", full_disk_writev)
    return done


@pytest.mark.faults
@pytest.mark.parametrize("name", ["extract", "reduce"])
def test_disk_full_in_the_store_writer_publishes_nothing_and_the_next_run_recovers(
        name: str, roots: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    _, ref_root = roots
    ref = reference(case, ref_root)
    work = tmp_path / "artifacts"
    build(work, case.stage, *case.overrides, args=case.args, upstream_only=True)
    # the store's metadata files plus a few shards: the disk fills up in the middle of the shard writes
    written = _enospc_after(monkeypatch, 12)
    with pytest.raises(StageError, match=r"No space left on device") as failure:
        build(work, case.stage, *case.overrides, args=case.args)
    assert ref.id in str(failure.value) and written
    store = ArtifactStore(work)
    assert not store.exists(ref.id) and not (work / ".locks" / f"{ref.id}.lock").exists()
    done = markers(work, ref.id)
    assert len(done) >= 2, done  # the failure came after some shards were complete
    monkeypatch.undo()
    resumed = build(work, case.stage, *case.overrides, args=case.args)
    assert resumed is not None and digests(resumed.path) == ref.digests
    assert manifest(resumed.path)["shards"]["reused"] == len(done)


@pytest.mark.faults
def test_disk_full_while_publishing_keeps_the_staged_work(root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES["extract"]
    _, _, target = plan_stage(root, case.stage, *case.overrides, args=case.args)
    real = Path.write_text

    def full_disk(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if self.name.startswith(".manifest.json.tmp"):
            real(self, data[: len(data) // 2], *args, **kwargs)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    build(root, case.stage, *case.overrides, args=case.args, upstream_only=True)
    monkeypatch.setattr(Path, "write_text", full_disk)
    args = cli_args(case.stage, *case.overrides, args=case.args)
    result = CliRunner().invoke(main, ["--quiet", *args], env={"STEGOPIPE_ROOT": str(root)})
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "No space left on device" in result.stderr
    assert f"could not publish {target}" in result.stderr and "Traceback" not in result.output
    store = ArtifactStore(root)
    assert not store.exists(target)
    staging = root / ".staging" / target
    assert not list(staging.glob(".manifest.json.tmp*"))  # the partial manifest was removed
    assert len(markers(root, target)) == 8  # every shard is still marked done
    monkeypatch.undo()
    resumed = build(root, case.stage, *case.overrides, args=case.args)
    assert resumed is not None and manifest(resumed.path)["shards"] == {"computed": 0, "reused": 8}
    assert store.verify(target) == []
    assert not any(p.name.startswith(".manifest") for p in resumed.path.iterdir())


# --------------------------------------------------------------------------------------------------
# flipped bytes: `stegopipe verify` names the file; a stage reading it refuses to run
# --------------------------------------------------------------------------------------------------

HEAD = ("projection.method=stego",)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A train-head artifact and its token inputs, built once; tests flip bytes and flip them back."""
    root = tmp_path_factory.mktemp("corrupt") / "artifacts"
    head = build(root, "train-head", *HEAD)
    assert head is not None
    tokens = root / "extract" / manifest(head.path)["inputs"]["tokens"]
    return {"root": root, "head": head.path, "tokens": tokens}


def _cli(root: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--quiet", *args], env={"STEGOPIPE_ROOT": str(root)})


def _probe_refuses(root: Path, damaged: Path, what: str) -> None:
    """``run probe`` on the head projection fails with one line naming ``damaged``; nothing is published."""
    before = ArtifactStore(root).ids("probe")
    result = _cli(root, *cli_args("probe", *HEAD))
    assert result.exit_code == 2, result.output
    assert str(damaged) in result.stderr and what in result.stderr and result.stderr.count("\n") == 1
    assert ArtifactStore(root).ids("probe") == before


@pytest.mark.faults
def test_flipped_byte_in_a_token_shard(chain: dict[str, Path]) -> None:
    root, tokens = chain["root"], chain["tokens"]
    shard = sorted((tokens / "tokens.zarr" / "tokens" / "c").rglob("*"))[-1]
    assert shard.is_file()
    offset = flip_byte(shard, 100)
    try:
        bad = _cli(root, "verify", "-v")
        assert bad.exit_code == 1 and f"BAD  {tokens.name}" in bad.output and str(shard) in bad.output
        assert "sha256 differs" in bad.output and f"ok   {chain['head'].name}" in bad.output
        assert "1 of 7 artifacts are damaged" in _cli(root, "verify").output
        _probe_refuses(root, shard, f"input 'tokens' ({tokens.name}) is damaged")
    finally:
        flip_byte(shard, offset)
    assert _cli(root, "verify").exit_code == 0


@pytest.mark.faults
def test_flipped_byte_in_head_weights(chain: dict[str, Path]) -> None:
    root, head = chain["root"], chain["head"]
    weights = head / "head.safetensors"
    offset = flip_byte(weights, -3)  # inside the tensor data, so the file still parses
    try:
        bad = _cli(root, "verify", head.name)
        assert bad.exit_code == 1 and str(weights) in bad.output
        _probe_refuses(root, weights, f"input 'projection' ({head.name}) is damaged")
    finally:
        flip_byte(weights, offset)


@pytest.mark.faults
@pytest.mark.parametrize("seed", [0, 1])
def test_flipped_byte_in_a_manifest(chain: dict[str, Path], seed: int) -> None:
    """Seed 0 flips the low bit of a digit (still valid JSON: only the manifest's checksum can tell): a stage
    reading the artifact refuses to run. Seed 1 sets the high bit of any byte (no longer UTF-8/JSON): the
    artifact no longer looks whole, so a run rebuilds it, saying so."""
    root, head = chain["root"], chain["head"]
    path = head / "manifest.json"
    text = path.read_bytes()
    rng = random.Random(seed)
    if seed == 0:
        offset = rng.choice([i for i, b in enumerate(text) if chr(b).isdigit()])
        mask = 0x01
    else:
        offset, mask = rng.randrange(len(text)), 0x80
    flip_byte(path, offset, mask)
    try:
        if seed == 0:
            json.loads(path.read_text())  # the damage is not a syntax error
        bad = _cli(root, "verify")
        assert bad.exit_code == 1 and f"BAD  {head.name}" in bad.output and str(path) in bad.output
        assert bad.output.count("BAD") == 1  # the other artifacts are still checked and fine
        if seed == 0:
            _probe_refuses(root, path, "is damaged")
        else:
            rebuilt = _cli(root, *cli_args("probe", *HEAD))
            assert rebuilt.exit_code == 0, rebuilt.output
            assert f"artifact {head.name} is incomplete" in rebuilt.stderr and str(path) in rebuilt.stderr
            assert "rebuilding it" in rebuilt.stderr
            forget(root, Path(rebuilt.stdout.strip().splitlines()[-1]).name)  # later tests build the probe
    finally:
        if seed == 0:
            flip_byte(path, offset, mask)
    assert _cli(root, "verify", head.name).exit_code == 0


@pytest.mark.faults
def test_input_verification_settings(chain: dict[str, Path]) -> None:
    """run.verify_hash_mb=0 checks sizes only; run.verify_inputs=false skips the check; an input file cut
    short makes the input look incomplete, so it is rebuilt whatever the settings."""
    root, head = chain["root"], chain["head"]
    diagnostics = head / "diagnostics.json"  # not read by the probe stage: damage there changes no number
    original = diagnostics.read_bytes()
    flip_byte(diagnostics, 10)
    try:
        with pytest.raises(ArtifactError, match="diagnostics.json: sha256 differs"):
            build(root, "probe", *HEAD)
        for setting in ("run.verify_hash_mb=0", "run.verify_inputs=false"):  # same size: both pass
            probe = build(root, "probe", *HEAD, setting)
            assert probe is not None and probe.status == "ran"
            forget(root, probe.id)
    finally:
        diagnostics.write_bytes(original)
    diagnostics.write_bytes(original[:-1])
    probe = build(root, "probe", *HEAD, "run.verify_hash_mb=0")
    assert probe is not None and probe.status == "ran" and ArtifactStore(root).verify(head.name) == []
    forget(root, probe.id)
