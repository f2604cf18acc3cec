"""Carry a cached result forward to new code once it is proven byte-identical (``stegopipe adopt``).

For a task whose artifact is missing only because its stage's code changed (a cached artifact of the same
stage has the same params, format version and inputs, an input counting as the same when it was itself
adopted or is unchanged), part of its work is redone with the current code in a scratch folder and every
file is compared byte for byte with the cached ones (no file may come or go):

- a stage whose cached run took at most ``full_below_s`` seconds: the whole stage, from nothing;
- a longer resumable (sharded) stage: the scratch folder starts as a copy of the cached files and only
  :data:`SAMPLE_SHARDS` shards drawn by a generator seeded with the new id, and the last shard, are
  recomputed (:attr:`pipeline.context.StageContext.sample`), then whatever the stage does after its
  shards; so the sampled shards and the stage's summary files are checked, the other shards are not;
- a longer stage without shards: refused, with the reason.

Identical: the new id is published as a twin whose files are hard links of the cached ones (copies across
filesystems) and whose manifest says ``adopted``: from which id, how it was verified, and what code
changed. Different: nothing is published; the files (and the shards sampled) are named.
"""
from __future__ import annotations

import filecmp
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import (MANIFEST, SHARD_MARKERS, ArtifactStore, Staging, canonical_json, confined, list_files,
                                utc_now)
from pipeline.context import StageContext
from pipeline.environment import resolve_device
from pipeline.errors import StegopipeError
from pipeline.executor import LOG_FILE, load_inputs
from pipeline.fingerprint import Fingerprint, changed_code
from pipeline.planner import Task
from pipeline.registry import get_stage, stage_fingerprint
from pipeline.why import Explainer

SAMPLE_SHARDS = 3
FULL_BELOW_S = 300.0
MAX_NAMED = 5


@dataclass
class Adoption:
    """What ``adopt`` did for one task: ``status`` is cached | adopted | different | refused | no-match."""

    task: str
    status: str
    source: str | None = None
    detail: str = ""
    wall_s: float = 0.0


def _same_json(a: Any, b: Any) -> bool:
    return canonical_json(a) == canonical_json(b)


def find_source(siblings: list[tuple[str, dict[str, Any]]], task: Task, same: Mapping[str, str]) -> str | None:
    """Of ``siblings`` (the cached artifacts of ``task``'s stage with their manifests), one that differs
    from ``task`` only in code: same params, args, format version and package versions (when the id holds
    them), inputs the same after ``same`` (new id → the cached id it stands for). Artifacts published before
    code fingerprints qualify too."""
    wanted = {name: same.get(dep) for name, dep in task.inputs.items()}
    if None in wanted.values():
        return None
    for artifact, manifest in siblings:
        code = manifest.get("version")
        if isinstance(code, Mapping) and (code.get("format") != task.code.get("format")
                                          or code.get("packages") != task.code.get("packages")):
            continue
        if _same_json(manifest.get("params"), task.params) and _same_json(manifest.get("inputs") or {}, wanted) \
                and _same_json(manifest.get("args") or {}, task.args):
            return artifact
    return None


def _differences(work: Path, cached: Path) -> list[str]:
    """The files that differ between the scratch folder and the cached artifact, or are in one only (the
    stage log, shard markers and the manifest are not compared)."""
    def files(directory: Path) -> set[str]:
        return {p.as_posix() for p in list_files(directory)
                if p.as_posix() not in (LOG_FILE, MANIFEST) and not p.as_posix().startswith(f"{SHARD_MARKERS}/")}

    written, present = files(work), files(cached)
    differ = [rel for rel in sorted(written & present) if not filecmp.cmp(work / rel, cached / rel, shallow=False)]
    differ += [f"{rel} (new)" for rel in sorted(written - present)]
    differ += [f"{rel} (not written)" for rel in sorted(present - written)]
    return differ


def _copy_files(store: ArtifactStore, source: str, files: list[dict[str, Any]], into: Path, *, link: bool) -> None:
    """``files`` (``source``'s manifest entries) into ``into``: hard links (``link``; copies across
    filesystems), else copies."""
    for entry in files:
        origin = confined(store.path(source), entry["path"])  # never a file outside the artifact
        target = into / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(origin, target)
                continue
            except OSError:  # another filesystem, or no hard links there
                pass
        shutil.copy2(origin, target)


def _twin(store: ArtifactStore, task: Task, source: str, old: dict[str, Any], fingerprint: Fingerprint,
          how: dict[str, Any]) -> None:
    """Publish ``task.id`` as hard links of ``source``'s files (``old``: its manifest) with a manifest that
    says it was adopted, under the current code's ``fingerprint``."""
    staging = store.staging(task.id, fresh=True)
    _copy_files(store, source, old.get("files", []), staging.dir, link=True)
    manifest = {key: value for key, value in old.items() if key not in ("id", "files", "manifest_sha256")}
    manifest.update(version=task.code, fingerprint=fingerprint.record(), inputs=task.inputs, created=utc_now(),
                    adopted={"from": source, **how})
    store.publish(task.id, staging, manifest, files=old.get("files", []))


def verify_and_adopt(store: ArtifactStore, task: Task, source: str, *, device: str = "auto",
                     full_below_s: float = FULL_BELOW_S, samples: int = SAMPLE_SHARDS) -> Adoption:
    """Recompute part of ``task`` with the current code, compare with ``source``, adopt when identical."""
    stage = get_stage(task.stage)
    old = store.manifest(source)
    took = float(old.get("wall_time_s") or 0.0)
    whole = took <= full_below_s
    if not whole and not stage.resumable:
        return Adoption(task.id, "refused", source,
                        f"stage {task.stage} has no shards to sample and its cached run took {took:.0f} s "
                        f"(more than --full-below-s {full_below_s:.0f}); rebuild it with `stegopipe run`")
    start = time.perf_counter()
    fingerprint = stage_fingerprint(stage)
    code = changed_code((old.get("fingerprint") or {}).get("files") or {}, fingerprint.files)
    work = Staging(store.root / ".staging" / f"{task.id}.adopt")
    shutil.rmtree(work.dir, ignore_errors=True)
    work.dir.mkdir(parents=True)
    lock = store.lock(task.id, info={"inputs": sorted({*task.inputs.values(), source})})
    lock.acquire()
    try:
        if not whole:  # resume from the cached files: only the sampled shards are redone
            _copy_files(store, source, old.get("files", []), work.dir, link=False)
        ctx = StageContext(task, store, work, load_inputs(store, task), resolve_device(device), stage.sections,
                           sample=None if whole else samples)
        try:
            stage.run(ctx)
        except Exception as exc:  # the current code cannot even redo the sample: nothing to adopt
            error = exc if isinstance(exc, StegopipeError) else f"{type(exc).__name__}: {exc}"
            return Adoption(task.id, "different", source, f"the current code failed on it: {error}",
                            time.perf_counter() - start)
        verified = "the whole stage" if whole else f"shards {', '.join(ctx.sampled or [])}"
        differ = _differences(work.dir, store.path(source))
        if not whole and ctx.shards_computed != len(ctx.sampled or []):
            differ.insert(0, f"(the current code finished {ctx.shards_computed} of the {len(ctx.sampled or [])} "
                             "sampled shards)")
        if differ:
            more = f" and {len(differ) - MAX_NAMED} more" if len(differ) > MAX_NAMED else ""
            return Adoption(task.id, "different", source,
                            f"recomputed {verified}: {', '.join(differ[:MAX_NAMED])}{more} differ from {source}",
                            time.perf_counter() - start)
        how = {"verified": verified, "result": "files identical",
               "shards": None if whole else ctx.sampled, "code_changes": code}
        _twin(store, task, source, old, fingerprint, how)
        return Adoption(task.id, "adopted", source, f"verified on {verified}, files identical",
                        time.perf_counter() - start)
    finally:
        lock.release()
        shutil.rmtree(work.dir, ignore_errors=True)


def adopt(store: ArtifactStore, tasks: list[Task], *, device: str = "auto", full_below_s: float = FULL_BELOW_S,
          samples: int = SAMPLE_SHARDS) -> list[Adoption]:
    """Adopt, in dependency order, every missing task of a plan that a cached artifact matches but for
    its code (see the module docstring). A task downstream of one not adopted is not matched."""
    same: dict[str, str] = {}
    done = []
    cached = Explainer(store)  # each stage's manifests read once
    for task in tasks:
        if store.exists(task.id):
            same[task.id] = task.id
            done.append(Adoption(task.id, "cached"))
            continue
        source = find_source(cached.siblings(task.stage), task, same)
        if source is None:
            done.append(Adoption(task.id, "no-match", detail="no cached artifact differs from it only in code"))
            continue
        result = verify_and_adopt(store, task, source, device=device, full_below_s=full_below_s, samples=samples)
        if result.status == "adopted":
            same[task.id] = source
        done.append(result)
    return done
