"""Import a released STEGO checkpoint (method.md §11) as a ``train-head`` artifact: ``stegopipe import-stego``.

The checkpoint is read with :func:`stages.stego.checkpoint.read_stego_checkpoint` (restricted
unpickler). The artifact holds the head weights, the head as a projection, the trained probes and the
checkpoint's stored STEGO config (``stego_cfg.json``, also recorded in the manifest). Its params are only
the file's sha256 and it has no inputs, so its id is
``artifact_id("train-head", <its code>, {"imported": sha256}, {})``: the same file gives the same artifact
whether it comes from ``stegopipe import-stego FILE`` or from ``head.checkpoint=FILE`` in a config.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import click
import torch

from pipeline.artifacts import sha256_file
from pipeline.cli import register_command
from pipeline.errors import InputError
from pipeline.paths import LocalPath
from stages.datasets.labelmaps import CITYSCAPES27_CLASS_NAMES, COCO27_CLASS_NAMES, POTSDAM3_CLASS_NAMES
from stages.evaluation.probes import ClusterProbe, LinearProbe
from stages.stego.checkpoint import read_stego_checkpoint
from stages.stego.head import StegoHead
from stages.projections.stego import write_head_files

STEGO_CFG_FILE = "stego_cfg.json"
KNOWN_CLASS_NAMES = {"cocostuff27": COCO27_CLASS_NAMES, "cityscapes": CITYSCAPES27_CLASS_NAMES,
                     "potsdam": POTSDAM3_CLASS_NAMES}
"""Class names by the checkpoint's ``cfg.dataset_name`` (others get ``class_<i>``)."""


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint file (cached per path, size and mtime); ``InputError`` if it is missing."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file (head.checkpoint / import-stego)")
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def write_imported(path: Path, out: Path, *, expected_sha256: str | None = None,
                   ignore_unknown: bool = False) -> dict[str, Any]:
    """Convert the STEGO checkpoint ``path`` into head-artifact files in ``out``; returns manifest fields.

    ``InputError`` (naming the file) when the file changed since ``expected_sha256`` was computed, has
    state-dict keys the converter does not know (listed; ``ignore_unknown`` imports anyway and records
    them), or holds no head (a DINO-baseline checkpoint). Missing keys are reported by the reader.
    """
    path = Path(path).expanduser().resolve()
    sha = checkpoint_sha256(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise InputError(f"{path}: the file changed since the run was planned (sha256 {sha[:16]}…, "
                         f"planned {expected_sha256[:16]}…); run again")
    ckpt = read_stego_checkpoint(path)
    if ckpt.unknown_keys and not ignore_unknown:
        keys = ", ".join(map(repr, ckpt.unknown_keys))  # repr: a key from the file may hold any character
        raise InputError(f"{path}: unknown state-dict key(s) {keys}; this is not the "
                         f"STEGO layout the importer knows (use --ignore-unknown-keys / "
                         f"head.checkpoint_ignore_unknown=true to import the known parts anyway)")
    if ckpt.head_state is None or ckpt.projection is None:
        raise InputError(f"{path}: holds no STEGO head (no net.cluster* keys): it is a DINO-baseline checkpoint; "
                         f"use projection.method=identity for DINO features")
    head = StegoHead(ckpt.feature_dim, ckpt.dim, ckpt.projection)  # STEGO's Dropout2d p is hard-coded 0.1
    head.load_state_dict(ckpt.head_state, strict=True)
    linear = LinearProbe(ckpt.dim, ckpt.n_classes)
    linear.load_stego(ckpt.linear_probe["weight"], ckpt.linear_probe["bias"])
    cluster = ClusterProbe(ckpt.dim, ckpt.n_classes + ckpt.extra_clusters)
    with torch.no_grad():
        cluster.clusters.copy_(ckpt.cluster_centroids)
    info = {"source": "imported", "checkpoint_sha256": sha, "backbone": ckpt.backbone, "patch": ckpt.patch_size,
            "dataset": ckpt.dataset_name, "global_step": ckpt.global_step}
    names = KNOWN_CLASS_NAMES.get(str(ckpt.dataset_name), [])
    class_names = names if len(names) == ckpt.n_classes else [f"class_{i}" for i in range(ckpt.n_classes)]
    write_head_files(out, head, linear, cluster, class_names=class_names, info=info)
    (Path(out) / STEGO_CFG_FILE).write_text(json.dumps(ckpt.cfg, indent=2, sort_keys=True, default=str) + "\n")
    return {"imported_from": str(path), "checkpoint_sha256": sha, "stego_cfg": json.loads(json.dumps(ckpt.cfg, default=str)),
            "backbone": {"model_type": ckpt.backbone, "patch": ckpt.patch_size},
            "checkpoint": {"epoch": ckpt.epoch, "global_step": ckpt.global_step,
                           "lightning_version": ckpt.lightning_version},
            "counts": {"n_classes": ckpt.n_classes, "extra_clusters": ckpt.extra_clusters, "dim": ckpt.dim,
                       "feature_dim": ckpt.feature_dim},
            "ignored_unknown_keys": list(ckpt.unknown_keys)}


@register_command
@click.command("import-stego")
@click.argument("checkpoint", type=LocalPath(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--preset", "-p", help="Config preset (only run.* settings matter here).")
@click.option("--ignore-unknown-keys", is_flag=True, help="Import even if the state dict has unknown keys.")
def import_stego_cmd(checkpoint: Path, overrides: tuple[str, ...], preset: str | None,
                     ignore_unknown_keys: bool) -> None:
    """Import a released STEGO .ckpt as a train-head artifact (content-addressed by the file's sha256).

    Prints the artifact id; use the file in experiments with head.checkpoint=CHECKPOINT.
    """
    from pipeline import planner, runner
    from pipeline.config import load_config

    cfg = load_config(preset, list(overrides))
    cfg.head.checkpoint = os.fspath(checkpoint.expanduser().resolve())
    cfg.head.checkpoint_ignore_unknown = ignore_unknown_keys
    tasks, targets = planner.plan([planner.Request("train-head", cfg)])
    results = runner.run_tasks(tasks, cfg.run)
    done = {r.id: r for r in results}[targets[0]]
    click.echo(f"{'imported' if done.status == 'ran' else 'already imported'}: {done.path}", err=True)
    click.echo(done.id)
