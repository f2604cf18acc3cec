"""Extract stage img/s next to its two possible limits: the bare forward and decode + preprocess alone.

The extract stage is a pipeline (decode → forward → write), so it can go no faster than the slower of
its producer and its forward: the ratio is ``stage ÷ min(bare forward, decode)`` (goal ≥ 0.8 on CPU and
GPU), and the two limit rows show which one it is.

- stage: the real ``extract`` stage through the runner on the synthetic dataset in a temporary
  artifact root (its ``prepare`` input is built first, untimed); img/s is the manifest's
  ``throughput_img_s`` (samples ÷ the stage's extraction loop: decoding, preprocessing, forward and
  writing the store; the backbone is loaded before the loop starts, its load is the manifest's
  ``model_load_s``).
- bare forward: :func:`stages.backbones.dino_features` under ``torch.inference_mode`` (and AMP on CUDA)
  on a tensor already in memory on the device, same backbone, resolution and batch size, after one
  warm-up batch.
- decode: :func:`stages.extract.load_sample` (image + label decode, resize, crop) over the same
  prepared index through the stage's loader (:mod:`pipeline.prefetch`, same thread count), no forward,
  nothing written (the stage normalises each batch on the device, as part of its forward).

Stage, decode and forward alternate for 3 rounds (quick: 1), best of each; the load average is noted
(other processes share the cores). A last row shows the point
of the cache: reading the stored tokens back (``TokenStore.iter_batches``) vs computing them.

CPU: ViT-S/16 (random init) at 224, 32 images, batch 16 (quick: 16 images at 64, batch 8), 2 loader
threads. CUDA: ViT-S/8 and ViT-B/8 at 224 with AMP, 1024 images, batch 64 (quick: 64, batch 32), 8
loader threads, plus the bare forward against timm's published inference throughput (RTX 4090, AMP:
1790 / 659 img/s).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, script_main, temp_root, timed

TIMM_PUBLISHED_IMG_S = {"vit_small_patch8_224.dino": 1790.0, "vit_base_patch8_224.dino": 659.0}
"""timm's published inference img/s (RTX 4090, AMP) for the DINO ViT-S/8 and ViT-B/8."""
ROUNDS = 3


@dataclass(frozen=True)
class Case:
    backbone: str
    res: int
    n: int
    batch: int
    device: str

    @property
    def short(self) -> str:
        size = "S" if "small" in self.backbone else "B"
        patch = self.backbone.split("patch")[1].split("_")[0]
        return f"ViT-{size}/{patch}@{self.res} {self.device}"


def cases(quick: bool, cuda: bool) -> list[Case]:
    """What to measure: CPU ViT-S/16 (tiny when quick), or ViT-S/8 and ViT-B/8 at 224 on CUDA."""
    if cuda:
        n, batch = (64, 32) if quick else (1024, 64)
        return [Case(name, 224, n, batch, "cuda") for name in TIMM_PUBLISHED_IMG_S]
    if quick:
        return [Case("vit_small_patch16_224.dino", 64, 16, 8, "cpu")]
    return [Case("vit_small_patch16_224.dino", 224, 32, 16, "cpu")]


def bare_forward_img_s(case: Case, amp: bool = True) -> float:
    """img/s of the backbone alone on pre-loaded ``[n,3,res,res]`` tensors in batches of ``case.batch``."""
    import torch

    from stages.backbones import dino_features, load_backbone

    model, _ = load_backbone(case.backbone, "random")
    model = model.to(case.device)
    images = torch.randn(case.n, 3, case.res, case.res, generator=torch.Generator().manual_seed(0)).to(case.device)
    cuda = case.device == "cuda"

    def forward(x: torch.Tensor) -> None:
        with torch.inference_mode(), torch.autocast(case.device, dtype=torch.float16, enabled=amp and cuda):
            dino_features(model, x)
        if cuda:
            torch.cuda.synchronize()

    forward(images[:case.batch])  # warm-up
    start = time.perf_counter()
    for a in range(0, case.n, case.batch):
        forward(images[a:a + case.batch])
    return case.n / (time.perf_counter() - start)


def loader_workers(case: Case) -> int:
    """``extract.loader_workers`` of the runs: 8 on CUDA (a GPU host has the cores), else 2."""
    return 8 if case.device == "cuda" else 2


def stage_run(case: Case, root: Path) -> tuple[dict[str, Any], Path, Path]:
    """Run prepare (untimed) then extract for ``case`` in artifact ``root``; the extract manifest, the
    extract artifact's path and the prepare (index) artifact's path."""
    import stages.plugin  # noqa: F401  (registers the stages and their config sections)
    from pipeline.config import load_config
    from pipeline.planner import Request, plan
    from pipeline.runner import run_tasks

    cfg = load_config("synthetic", [
        "run.executor=local", f"run.root={root}", f"run.device={case.device}",
        f"dataset.synthetic.n_train={case.n}", "dataset.synthetic.n_val=1",
        f"backbone.name={case.backbone}", f"extract.train_res={case.res}", f"extract.batch_size={case.batch}",
        f"extract.loader_workers={loader_workers(case)}",
    ])
    paths = {}
    for stage in ("prepare", "extract"):
        tasks, targets = plan([Request(stage, cfg, {"split": "train"})])
        results = {r.id: r for r in run_tasks(tasks, cfg.run)}
        paths[stage] = results[targets[0]].path
    return json.loads((paths["extract"] / "manifest.json").read_text()), paths["extract"], paths["prepare"]


def decode_img_s(index_path: Path, case: Case) -> float:
    """img/s of the stage's loader alone: load_sample over the index through the same prefetch."""
    from pipeline.prefetch import prefetch
    from stages.extract import load_sample
    from stages.datasets.index import load_index

    index = load_index(index_path)
    workers = loader_workers(case)
    start = time.perf_counter()
    with prefetch(lambda ref: load_sample(index, ref, case.res), index.samples, workers=workers,
                  depth=4 * case.batch) as samples:
        count = sum(1 for _ in samples)
    return count / (time.perf_counter() - start)


def cache_read_img_s(artifact: Path, batch: int) -> float:
    """img/s of streaming the stored tokens back as float32 batches."""
    from stages.store import TOKENS_STORE
    from stages.store import open_token_store

    store = open_token_store(artifact / TOKENS_STORE)
    seconds = timed(lambda: [None for _batch in store.iter_batches(batch)], repeat=2)
    return store.n / seconds


def run(quick: bool = False) -> list[dict[str, Any]]:
    import torch

    rows = []
    for case in cases(quick, torch.cuda.is_available()):
        bare = cached = decode = 0.0
        best: dict[str, Any] = {"throughput_img_s": 0.0}
        rounds = 1 if quick else ROUNDS
        workers = loader_workers(case)
        load_before = "/".join(f"{x:.1f}" for x in os.getloadavg())
        for _ in range(rounds):  # interleaved rounds, best of each: the machine is shared
            with temp_root("stegopipe-bench-extract-") as root:
                manifest, artifact, index = stage_run(case, root)
                cached = max(cached, cache_read_img_s(artifact, case.batch))
                decode = max(decode, decode_img_s(index, case))
            best = max(best, manifest, key=lambda m: float(m["throughput_img_s"]))
            bare = max(bare, bare_forward_img_s(case))
        ours = float(best["throughput_img_s"])
        load_after = "/".join(f"{x:.1f}" for x in os.getloadavg())
        amp = " AMP" if case.device == "cuda" else ""
        limit, limiter = min((bare, "bare forward"), (decode, "decode + preprocess"))
        rows.append(row(f"extract stage vs min(forward, decode) ({case.short})", ours, "img/s", baseline=limit,
                        goal=">= 0.8",
                        note=f"{case.n} synthetic images, batch {case.batch}{amp}, {workers} loader threads; stage = "
                             f"manifest throughput (decode + preprocess + forward + store write, loop wall "
                             f"{best['extract_wall_s']:.1f} s); baseline = the slower of the two rows below "
                             f"({limiter}); best of {rounds} interleaved round(s); ratio = ours/baseline; "
                             f"load avg {load_before} before, {load_after} after"))
        rows.append(row(f"extract limit: bare forward ({case.short})", bare, "img/s",
                        note=f"dino_features on pre-loaded tensors on the device{amp}, batch {case.batch}"))
        rows.append(row(f"extract limit: decode + preprocess ({case.short})", decode, "img/s",
                        note=f"load_sample over the prepared index, {workers} loader threads, no forward or write"))
        rows.append(row(f"token cache read vs live forward ({case.short})", cached, "img/s", baseline=bare,
                        note="TokenStore.iter_batches (fp16 → float32) of the extracted store ÷ the bare forward; "
                             "ratio = ours/baseline"))
        if case.device == "cuda":
            rows.append(row(f"bare forward vs timm published ({case.short})", bare, "img/s",
                            baseline=TIMM_PUBLISHED_IMG_S[case.backbone],
                            note=f"{torch.cuda.get_device_name()} here vs timm's RTX 4090 AMP figure; "
                                 "different cards, for orientation only"))
    return rows


if __name__ == "__main__":
    script_main(run)
