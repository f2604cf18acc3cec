"""Paper-shaped rehearsal (``make bench-scale``): every stage on token stores of N, 2N and 4N samples.

Token source: the synthetic dataset at 240×320 px through ``vit_small_patch8_embed.rehearsal`` (ViT-S/8's
patch + position embedding and final LayerNorm, random weights, no blocks; stages/backbones.py) at 224 px:
real 28×28×384 float16 tokens (602 kB a sample, ViT-S/8's shape) at a fraction of a CPU forward. By
default 4N is sized to 1.2× this machine's RAM (``--n auto``); ``--n 256`` is a small end-to-end check.

For each size, in one artifact root (``--root``, default a folder under the system temp dir), every stage
runs as its own ``stegopipe run`` process (peak RSS of that process from ``wait4``; CRF pool workers not
included): extract train (with synthesize + prepare), extract val (N/16 samples, min 32), knn, reduce
pca (every token) / rp / hnne, train-head (fixed steps), probe (pca), evaluate (pca, no CRF), and the CRF
alone (``crf_map``, 2 workers) on a sample of 32 val images. Wall times are the manifests'
``wall_time_s``. Limits, measured in the same run:

- disk: ``cat`` of the train store's files after dropping the page cache (``/proc/sys/vm/drop_caches``,
  root only; when it cannot be dropped the rate says "warm");
- sgemm (measured after each size's stages, as the disk rate): numpy float32 matmul rate (kNN's N²·384·2 flops; half that is what kNN computes) and the float64
  XᵀX rate for PCA (N·784·384² flops);
- decode: PIL decode + resize of the synthetic PNGs (extract's bound on CPU besides the forward).

Before 2N and 4N run, ``stegopipe plan --json`` estimates their time from the manifests of the smaller
sizes on the same root (pipeline/estimates.py); the table reports estimate vs actual. Images and stores of a
size are deleted once the next size has been planned (disk), and everything is deleted at the end unless
``--keep``. Writes ``benchmarks/results/scale.md`` and ``scale.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, RESULTS_DIR

TOKEN_BYTES = 28 * 28 * 384 * 2
BACKBONE = "vit_small_patch8_embed.rehearsal"
STEPS = 200  # head and probe steps (--steps): fixed, so their time should not grow with N
CRF_SAMPLE = 32


def _overrides(n: int, n_val: int, steps: int = STEPS) -> list[str]:
    return [f"dataset.synthetic.n_train={n}", f"dataset.synthetic.n_val={n_val}", "dataset.synthetic.height=240",
            "dataset.synthetic.width=320", f"backbone.name={BACKBONE}", "backbone.weights=random",
            "extract.train_res=224", "extract.val_res=224", f"head.steps={steps}", f"probe.steps={steps}",
            "head.val_every=0", "reduce.fit_subset=all"]


# (label, target, extra overrides); projection.dim for probe/evaluate on PCA
STAGE_RUNS: list[tuple[str, str, list[str]]] = [
    ("extract train", "extract", ["split=train"]),
    ("extract val", "extract", ["split=val"]),
    ("knn", "knn", []),
    ("reduce pca", "reduce", ["projection.method=pca"]),
    ("reduce rp", "reduce", ["projection.method=rp", "projection.dim=32"]),
    ("reduce hnne", "reduce", ["projection.method=hnne", "projection.dim=32"]),
    ("train-head", "train-head", []),
    ("probe pca", "probe", ["projection.method=pca", "projection.dim=32"]),
    ("evaluate pca", "evaluate", ["projection.method=pca", "projection.dim=32", "evaluate.crf=false"]),
]


def run_target(root: Path, target: str, overrides: list[str]) -> dict[str, Any]:
    """``stegopipe run TARGET`` in a fresh process: peak RSS (MiB, ``wait4``), wall s, the ids it printed."""
    env = {**os.environ, "STEGOPIPE_ROOT": str(root), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", target, "--preset", "synthetic", *overrides]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed: {stderr.strip()[-800:]}")
    return {"rss_mb": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - start,
            "target_id": stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]}


def plan_estimates(root: Path, target: str, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """``stegopipe plan --json``: id -> {stage, seconds, basis} of every missing artifact of TARGET."""
    env = {**os.environ, "STEGOPIPE_ROOT": str(root)}
    cmd = [sys.executable, "-m", "pipeline.cli", "plan", target, "--preset", "synthetic", "--json", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    rows = json.loads(proc.stdout)["rows"]
    return {r["id"]: {"stage": r["stage"], **(r["estimate"] or {})} for r in rows if r["status"] != "cached"}


def manifest(root: Path, artifact: str) -> dict[str, Any]:
    stage = artifact.rsplit("-", 1)[0]
    return json.loads((root / stage / artifact / "manifest.json").read_text())


def artifact_bytes(root: Path, artifact: str) -> int:
    return sum(int(f["size"]) for f in manifest(root, artifact).get("files", []))


def drop_page_cache() -> bool:
    """Drop the page cache (root only); False when not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cat_rate(folder: Path) -> tuple[float, bool]:
    """(bytes/s of ``cat`` of every file under ``folder`` to /dev/null, page cache dropped first?)."""
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    total = sum(os.path.getsize(f) for f in files)
    cold = drop_page_cache()
    start = time.perf_counter()
    for i in range(0, len(files), 200):
        subprocess.run(["cat", *files[i:i + 200]], stdout=subprocess.DEVNULL, check=True)
    return total / (time.perf_counter() - start), cold


def gemm_rates() -> tuple[float, float]:
    """(float32 GFLOP/s on 4096×384×4096, float64 GFLOP/s of XᵀX on 65536×384): best of 3 each."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, 384), dtype=np.float32)
    out = np.empty((4096, 4096), np.float32)
    x = rng.standard_normal((65536, 384))
    best32 = best64 = math.inf
    for _ in range(3):
        t = time.perf_counter()
        np.matmul(a, a.T, out=out)
        best32 = min(best32, time.perf_counter() - t)
        t = time.perf_counter()
        x.T @ x
        best64 = min(best64, time.perf_counter() - t)
    return 2 * 4096 * 4096 * 384 / best32 / 1e9, 2 * 65536 * 384 * 384 / best64 / 1e9


def decode_rate(images: Path, n: int = 200) -> float:
    """Images/s of PIL decode + resize to 224 (extract's CPU decode bound) on the first ``n`` PNGs."""
    from PIL import Image

    files = sorted(images.glob("*.png"))[:n]
    start = time.perf_counter()
    for f in files:
        with Image.open(f) as im:
            np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR))
    return len(files) / (time.perf_counter() - start)


def crf_sample_seconds(n: int = CRF_SAMPLE, size: int = 224) -> float:
    """Seconds per image of ``crf_map`` (2 workers) on ``n`` synthetic val-sized images, 27 classes."""
    from benchmarks.bench_crf import _images
    from stages.evaluation.crf import crf_map

    items = _images(n, size)
    start = time.perf_counter()
    crf_map(items, workers=2, timeout_s=600, progress=False)
    return (time.perf_counter() - start) / n


def rehearse(n: int, n_val: int, steps: int, root: Path, estimates: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run every stage at one size; per stage: wall (manifest), peak RSS, estimate (if planned)."""
    overrides = _overrides(n, n_val, steps)
    stages: dict[str, dict[str, Any]] = {}
    built: dict[str, str] = {}
    for label, target, extra in STAGE_RUNS:
        res = run_target(root, target, overrides + extra)
        art = res["target_id"]
        built[label] = art
        m = manifest(root, art)
        est = estimates.get(art, {})
        stages[label] = {"id": art, "wall_s": float(m.get("wall_time_s") or res["wall_s"]), "rss_mb": res["rss_mb"],
                         "process_s": res["wall_s"], "bytes": artifact_bytes(root, art),
                         "estimate_s": est.get("seconds"), "estimate_basis": est.get("basis")}
        print(f"  {label:<14} {stages[label]['wall_s']:8.1f} s  RSS {res['rss_mb']:7.0f} MiB"
              + (f"  (estimated {est['seconds']:.1f} s)" if est.get("seconds") else ""), flush=True)
    tokens = root / "extract" / built["extract train"]
    dataset = next((root / "synthesize").iterdir())
    return {"n": n, "n_val": n_val, "stages": stages, "tokens_path": str(tokens),
            "token_bytes": artifact_bytes(root, built["extract train"]), "dataset_path": str(dataset)}


def _limits(size: dict[str, Any], disk: float, sgemm32: float, gemm64: float, decode: float) -> dict[str, float]:
    """The physical lower bound (s) of each stage at this size."""
    n, read = size["n"], size["token_bytes"] / disk
    val_read = size["stages"]["extract val"]["bytes"] / disk
    return {
        "extract train": max(n / decode, size["token_bytes"] / disk),
        "extract val": max(size["n_val"] / decode, val_read),
        "knn": n * n * 384 * 2 / (sgemm32 * 1e9) + read,
        "reduce pca": max(read, n * 784 * 384 * 384 * 2 / (gemm64 * 1e9)),
        "reduce rp": read,
        "reduce hnne": read,
        "train-head": float("nan"),
        "probe pca": float("nan"),
        "evaluate pca": val_read,
    }


def write_report(sizes: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """``benchmarks/results/scale.md`` (+ ``scale.json``): one row per stage and size."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "scale.json").write_text(json.dumps({"meta": meta, "sizes": sizes}, indent=2, default=str) + "\n")
    first, last = sizes[0], sizes[-1]
    lines = ["# Scale rehearsal", "",
             f"Token stores of {', '.join(format(s['n'], ',') for s in sizes)} samples "
             f"({', '.join(format(s['token_bytes'] / 1e9, '.2f') + ' GB' for s in sizes)} of train tokens; "
             f"RAM {meta['ram_gb']:.1f} GB), backbone `{BACKBONE}` at 224 px; "
             f"machine load average {meta['load_before']} before, {meta['load_after']} after "
             f"(other jobs shared the {meta['cpus']} cores).", "",
             f"Limits measured in this run: disk `cat` {meta['disk_gb_s']:.2f} GB/s "
             f"({'page cache dropped' if meta['cold'] else 'WARM: page cache could not be dropped'}), "
             f"sgemm {meta['sgemm32_gflops']:.0f} GFLOP/s float32, XᵀX {meta['gemm64_gflops']:.0f} GFLOP/s "
             f"float64, decode {meta['decode_img_s']:.0f} img/s; CRF (crf_map, 2 workers, {CRF_SAMPLE} images "
             f"224², 27 classes): {meta['crf_s_per_img']:.2f} s/image.", "",
             "| stage | " + " | ".join("wall " + format(s["n"], ",") for s in sizes) + " | limit (largest) | limit/wall | "
             "growth exp. | peak RSS (MiB) | plan estimate vs actual |",
             "|---" * (len(sizes) + 6) + "|"]
    for label, *_ in STAGE_RUNS:
        walls = [s["stages"][label]["wall_s"] for s in sizes]
        limit = last["limits"][label]
        exponent = (math.log(walls[-1] / walls[0]) / math.log(last["n"] / first["n"])
                    if walls[0] > 0 and last["n"] > first["n"] else float("nan"))
        rss = " / ".join(f"{s['stages'][label]['rss_mb']:.0f}" for s in sizes)
        est = [f"{s['stages'][label]['estimate_s']:.0f}/{s['stages'][label]['wall_s']:.0f} s "
               f"({100 * (s['stages'][label]['estimate_s'] / s['stages'][label]['wall_s'] - 1):+.0f}%)"
               for s in sizes if s["stages"][label].get("estimate_s")]
        lines.append(f"| {label} | " + " | ".join(f"{w:.1f} s" for w in walls)
                     + f" | {'-' if math.isnan(limit) else f'{limit:.1f} s'}"
                     + f" | {'-' if math.isnan(limit) else f'{limit / walls[-1]:.2f}'}"
                     + f" | {exponent:.2f} | {rss} | {'; '.join(est) or '-'} |")
    lines += ["", "Growth exponent: log(wall 4N / wall N) / log 4 (kNN is quadratic; the rest should be ≈ 1, "
              "train-head and probe run fixed steps: ≈ 0). Peak RSS: the `stegopipe run` process (wait4). "
              "limit/wall: 1 is at the limit. Plan estimates come from the manifests of the smaller sizes on the "
              "same root (`stegopipe plan --json`)."]
    out = RESULTS_DIR / "scale.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    import psutil

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="auto", help="base size N (train samples); auto: 4N = 1.2× RAM")
    parser.add_argument("--root", type=Path, help="artifact root (default: a new folder in the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the artifacts (they are large)")
    parser.add_argument("--steps", type=int, default=STEPS, help="head and probe training steps")
    opts = parser.parse_args(argv)
    ram = psutil.virtual_memory().total
    n = math.ceil(1.2 * ram / TOKEN_BYTES / 4) if opts.n == "auto" else int(opts.n)
    root = opts.root or Path(tempfile.mkdtemp(prefix="stegopipe-scale-"))
    free = shutil.disk_usage(root.parent if not root.exists() else root).free
    need = 4 * n * TOKEN_BYTES * 1.3  # the 4N stores and images (smaller sizes deleted by then)
    if need > 0.9 * free:
        raise SystemExit(f"bench-scale: N={n} needs about {need / 1e9:.0f} GB on {root} but {free / 1e9:.0f} GB are free")
    meta: dict[str, Any] = {"load_before": [round(v, 1) for v in os.getloadavg()], "cpus": os.cpu_count(), "steps": opts.steps,
                            "ram_gb": ram / 1e9, "root": str(root)}
    sizes: list[dict[str, Any]] = []
    try:
        previous: dict[str, Any] | None = None
        for factor in (1, 2, 4):
            size_n, n_val = factor * n, max(32, factor * n // 16)
            estimates: dict[str, dict[str, Any]] = {}
            if previous is not None:  # estimate from the manifests of the smaller size, then free its disk
                for _, target, extra in STAGE_RUNS:
                    estimates.update(plan_estimates(root, target, _overrides(size_n, n_val, opts.steps) + extra))
                for stage in ("synthesize", "extract"):  # the smaller size's images and token stores
                    shutil.rmtree(root / stage, ignore_errors=True)
            print(f"N = {size_n:,} ({size_n * TOKEN_BYTES / 1e9:.1f} GB of train tokens)", flush=True)
            size = rehearse(size_n, n_val, opts.steps, root, estimates)
            if factor == 1:
                meta["decode_img_s"] = decode_rate(Path(size["dataset_path"]) / "imgs" / "train")
                meta["crf_s_per_img"] = crf_sample_seconds()
            sgemm32, gemm64 = gemm_rates()  # per size: the load on a shared machine changes during the run
            meta.update(sgemm32_gflops=sgemm32, gemm64_gflops=gemm64)
            disk, cold = cat_rate(Path(size["tokens_path"]))
            meta.update(disk_gb_s=disk / 1e9, cold=cold)
            size["limits"] = _limits(size, disk, sgemm32, gemm64, meta["decode_img_s"])
            size["disk_gb_s"] = disk / 1e9
            sizes.append(size)
            previous = size
    finally:
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
    meta["load_after"] = [round(v, 1) for v in os.getloadavg()]
    print(write_report(sizes, meta).read_text())


if __name__ == "__main__":
    main()
