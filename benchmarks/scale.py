"""Paper-shaped rehearsal (``make bench-scale``): every stage on token stores of N, 2N and 4N samples.

Data: a folder dataset (the ``folder`` reader, 5 classes) of 240×320 JPEG images with PNG labels. A few
hundred base scenes come from the synthetic generator (stages/datasets/synthetic.py: ~0.1 s a scene, far
too slow for 90,000 images on 2 cores); sample ``i`` is base scene ``i % BASES``, mirrored on alternate
passes, through a seeded per-sample colour gain and offset, so no two samples hold the same pixels; its
label file is a hard link to the base scene's (mirrored) labels. The N and 2N folders are hard-linked
prefixes of the 4N one. Token source: ``vit_small_patch8_embed.rehearsal`` (ViT-S/8's patch + position
embedding and final LayerNorm, random weights, no blocks; stages/backbones.py) at 224 px: real 28×28×384
float16 tokens (602 kB a train sample; val samples also store ``tokens_flip`` and the crop's RGB).

Sizes: by default 4N holds 1.2× this machine's RAM of train tokens (``--n auto``); ``--n 2048`` is a
mid-size check. The configs are the real ones: reduce fits on ``reduce.fit_n`` = 5,000 sampled images
(``fit_subset=images``, the default), h-NNE on ``reduce.hnne_tokens`` tokens sampled from those
(default 1,000,000, the h-NNE experiment's); so PCA, RP and the h-NNE fit stop growing once N passes 5,000
images. h-NNE runs with ``reduce.materialize=false``: its transform finds each token's exact nearest
finest-level centroid (about 226,000 of them for 1M fit tokens), 8.7 TFLOP per 64-sample shard, so
materialising a paper-sized store is out of reach on a CPU (the report gives the flop count).

Each stage runs as its own ``stegopipe run`` process, in one artifact root (``--root``), with the page
cache dropped first (root only: ``sync; echo 3 > /proc/sys/vm/drop_caches``), so every read is cold as at
paper scale. Per stage: the manifest's ``wall_time_s``, peak RSS of the process (``wait4``, from a small
launcher) and, for 2N and 4N, the ``stegopipe plan --json`` estimate made from the manifests of the
smaller sizes on the root before the size runs. Limits, measured in the same run on the same files:

- disk read: ``cat`` of the 4N train store's files in two parallel streams, page cache dropped; disk write: ``dd`` of 2 GiB with
  ``conv=fdatasync`` on the same file system;
- sgemm: numpy float32 ``A·Bᵀ`` (4096×384) GFLOP/s, applied to the N(N+1)/2 pairs kNN needs; XᵀX: numpy
  float64 ``XᵀX`` (65536×384) GFLOP/s, applied to the fit rows;
- decode: PIL decode (prepare's bound), and decode + resize + crop to 224 (extract's), of the first 2,000
  train JPEGs on 2 threads (cold); forward: the rehearsal backbone alone on batches of 16 (2 threads);
- the CPU rates are measured at the start and after each size, and the best (quietest) is the limit.

Disk: the 4N folder first, then each size's stores; the smaller sizes' stores are deleted once the 4N plan
is made (their manifests feed it). The run refuses to start when the file system lacks the room. Progress
is saved after each stage (``<root>/scale-progress.json``): the same command with the same ``--root``
resumes a failed run (``--dataset-only`` builds the dataset ahead, unmeasured). Writes
``benchmarks/results/scale.md`` and ``scale.json`` and, unless ``--keep``, deletes the root once the table
is written; ``--report scale.json`` only writes the table again.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, RESULTS_DIR, cat_files

TOKEN_BYTES = 28 * 28 * 384 * 2
BACKBONE = "vit_small_patch8_embed.rehearsal"
STEPS = 20  # head and probe steps (--steps): fixed, so their time should not grow with N
HNNE_TOKENS = 1_000_000  # reduce.hnne_tokens (the default, the h-NNE experiment's)
FIT_N = 5000  # reduce.fit_n (the default): images the reducers fit on
BASES = 256  # base scenes per split
HEIGHT, WIDTH = 240, 320
CRF_SAMPLE = 32
DATASET_BYTES = 32_000  # bytes of one JPEG + label on disk (measured: 28 kB + hard link)


def _overrides(data: Path, steps: int, hnne_tokens: int) -> list[str]:
    return [f"dataset.root={data}", "dataset.n_classes=5", f"backbone.name={BACKBONE}", "backbone.weights=random",
            "extract.train_res=224", "extract.val_res=224", f"head.steps={steps}", f"probe.steps={steps}",
            "head.val_every=0", f"reduce.hnne_tokens={hnne_tokens}"]


# (label, target, extra overrides)
STAGE_RUNS: list[tuple[str, str, list[str]]] = [
    ("prepare train", "prepare", ["split=train"]),
    ("extract train", "extract", ["split=train"]),
    ("extract val", "extract", ["split=val"]),
    ("knn", "knn", []),
    ("reduce pca", "reduce", ["projection.method=pca"]),
    ("reduce rp", "reduce", ["projection.method=rp", "projection.dim=32"]),
    ("reduce hnne", "reduce", ["projection.method=hnne", "projection.dim=32", "reduce.materialize=false"]),
    ("train-head", "train-head", []),
    ("probe pca", "probe", ["projection.method=pca", "projection.dim=32"]),
    ("evaluate pca", "evaluate", ["projection.method=pca", "projection.dim=32", "evaluate.crf=false"]),
]


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def make_dataset(folder: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """The folder dataset described in the module docstring: ``imgs/{split}/{i:06d}.jpg``,
    ``labels/{split}/{i:06d}.png`` (hard links to ``bases/``)."""
    from PIL import Image

    from stages.datasets.synthetic import synthetic_scene

    for split, n, code in (("train", n_train, 0), ("val", n_val, 1)):
        imgs, labels, bases = folder / "imgs" / split, folder / "labels" / split, folder / "bases" / split
        for d in (imgs, labels, bases):
            d.mkdir(parents=True, exist_ok=True)
        scenes = []
        for b in range(min(BASES, n)):
            img, label = synthetic_scene(np.random.default_rng([seed, code, b]), HEIGHT, WIDTH)
            Image.fromarray(label).save(bases / f"{b}.png")
            Image.fromarray(label[:, ::-1]).save(bases / f"{b}m.png")
            scenes.append(Image.fromarray(img))

        def write(i: int, split: str = split, scenes: list = scenes, code: int = code,
                  imgs: Path = imgs, labels: Path = labels, bases: Path = bases) -> None:
            b, mirror = i % len(scenes), (i // len(scenes)) % 2 == 1
            rng = np.random.default_rng([seed, code + 2, i])
            gain, offset = rng.uniform(0.75, 1.25, (3, 1)), rng.uniform(-20, 20, (3, 1))
            lut = np.clip(np.arange(256)[None] * gain + offset, 0, 255).astype(np.uint8)
            image = scenes[b].point(lut.ravel().tolist())
            if mirror:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image.save(imgs / f"{i:06d}.jpg", quality=90)
            os.link(bases / f"{b}{'m' if mirror else ''}.png", labels / f"{i:06d}.png")

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(write, range(n)))
    return folder


def link_prefix(source: Path, folder: Path, n_train: int, n_val: int) -> Path:
    """A dataset folder holding the first ``n_train`` / ``n_val`` samples of ``source`` (hard links)."""
    for split, n in (("train", n_train), ("val", n_val)):
        for kind, ext in (("imgs", "jpg"), ("labels", "png")):
            d = folder / kind / split
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                os.link(source / kind / split / f"{i:06d}.{ext}", d / f"{i:06d}.{ext}")
    return folder


# --------------------------------------------------------------------------------------------------
# running stages
# --------------------------------------------------------------------------------------------------


_PEAK_RSS = ("import os, subprocess, sys\n"
             "child = subprocess.Popen(sys.argv[2:])\n"
             "_, status, usage = os.wait4(child.pid, 0)\n"
             "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")
"""Runs a command and writes its peak RSS (KiB). The command is forked from this small process: Linux
counts the memory a child was forked with (here the benchmark's, torch loaded) in its ``ru_maxrss``."""


def run_target(root: Path, target: str, overrides: list[str]) -> dict[str, Any]:
    """``stegopipe run TARGET`` in a fresh process: peak RSS (MiB), wall s, the id it printed."""
    env = {**os.environ, "STEGOPIPE_ROOT": str(root), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", target, "--preset", "folder", *overrides]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(rss_file), *cmd], cwd=REPO, env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[3:])} failed: {proc.stderr.strip()[-800:]}")
        rss_kib = int(rss_file.read_text())
    return {"rss_mb": rss_kib / 1024, "wall_s": time.perf_counter() - start,
            "target_id": proc.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]}


def plan_estimates(root: Path, target: str, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """``stegopipe plan --json``: id -> {stage, seconds, basis} of every missing artifact of TARGET."""
    env = {**os.environ, "STEGOPIPE_ROOT": str(root)}
    cmd = [sys.executable, "-m", "pipeline.cli", "plan", target, "--preset", "folder", "--json", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"plan {target} failed: {proc.stderr.strip()[-800:]}")
    rows = json.loads(proc.stdout)["rows"]
    return {r["id"]: {"stage": r["stage"], **(r["estimate"] or {})} for r in rows if r["status"] != "cached"}


def manifest(root: Path, artifact: str) -> dict[str, Any]:
    stage = artifact.rsplit("-", 1)[0]
    return json.loads((root / stage / artifact / "manifest.json").read_text())


def artifact_bytes(root: Path, artifact: str) -> int:
    return sum(int(f["size"]) for f in manifest(root, artifact).get("files", []))


# --------------------------------------------------------------------------------------------------
# limits
# --------------------------------------------------------------------------------------------------


def drop_page_cache() -> bool:
    """Drop the page cache (root only); False when not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cat_rate(folder: Path, streams: int = 2) -> tuple[float, bool]:
    """(bytes/s of ``cat`` of every file under ``folder`` to /dev/null in ``streams`` parallel processes, each
    over its own share of the files; page cache dropped first?). The stages keep reads in flight, and one
    stream leaves this disk at about half its rate."""
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    total = sum(os.path.getsize(f) for f in files)
    cold = drop_page_cache()
    start = time.perf_counter()
    cat_files(files, streams)
    return total / (time.perf_counter() - start), cold


def write_rate(folder: Path, mib: int = 2048) -> float:
    """Bytes/s of ``dd`` writing ``mib`` MiB of zeros with ``conv=fdatasync`` (the file is removed)."""
    target = folder / "dd-write-test"
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={mib // 16}", "conv=fdatasync"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - start
    target.unlink()
    return mib * 2**20 / seconds


def gemm_rates() -> tuple[float, float]:
    """(float32 GFLOP/s of A·Bᵀ on 4096×384 each, float64 GFLOP/s of XᵀX on 65536×384, as 2·n·384² flops
    whatever numpy computes, as PCA's moments do): best of 3 each."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 4096, 384), dtype=np.float32)
    out = np.empty((4096, 4096), np.float32)
    x = rng.standard_normal((65536, 384))
    best32 = best64 = math.inf
    for _ in range(3):
        t = time.perf_counter()
        np.matmul(a, b.T, out=out)
        best32 = min(best32, time.perf_counter() - t)
        t = time.perf_counter()
        x.T @ x
        best64 = min(best64, time.perf_counter() - t)
    return 2 * 4096 * 4096 * 384 / best32 / 1e9, 2 * 65536 * 384 * 384 / best64 / 1e9


def decode_rates(images: Path, n: int = 2000) -> tuple[float, float]:
    """Images/s on 2 threads of the first ``n`` JPEGs, page cache dropped first: (PIL decode alone, what
    prepare does to validate an image; decode + resize (shorter side 224) + centre crop, extract's decode)."""
    from PIL import Image

    def decode(f: Path) -> Image.Image:
        with Image.open(f) as im:
            return im.convert("RGB")

    def decode_crop(f: Path) -> np.ndarray:
        rgb = decode(f)
        w, h = rgb.size
        scale = 224 / min(w, h)
        rgb = rgb.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        left, top = (rgb.size[0] - 224) // 2, (rgb.size[1] - 224) // 2
        return np.asarray(rgb.crop((left, top, left + 224, top + 224)))

    files = sorted(images.glob("*.jpg"))[:n]
    rates = []
    for fn in (decode, decode_crop):
        drop_page_cache()
        start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(fn, files))
        rates.append(len(files) / (time.perf_counter() - start))
    return rates[0], rates[1]


def forward_rate(batches: int = 20, batch: int = 16) -> float:
    """Images/s of the rehearsal backbone alone (random input, float32 on the CPU, after one warm-up batch)."""
    import torch

    from stages.backbones import load_backbone
    from stages.extract import forward_tokens

    model, _ = load_backbone(BACKBONE, "random")
    images = torch.randn(batch, 3, 224, 224)
    forward_tokens(model, images, amp=False)
    start = time.perf_counter()
    for _ in range(batches):
        forward_tokens(model, images, amp=False)
    return batches * batch / (time.perf_counter() - start)


def crf_sample_seconds(n: int = CRF_SAMPLE, size: int = 224) -> float:
    """Seconds per image of ``crf_map`` (2 workers) on ``n`` synthetic val-sized images, 27 classes."""
    from benchmarks.bench_crf import _images
    from stages.evaluation.crf import crf_map

    items = _images(n, size)
    start = time.perf_counter()
    crf_map(items, workers=2, timeout_s=600, progress=False)
    return (time.perf_counter() - start) / n


def limits(size: dict[str, Any], meta: dict[str, Any]) -> dict[str, float]:
    """Lower bounds (s) of each stage at this size, from the best rates of this run (NaN: none defined).

    A stage's bound is the largest of the times of its parts measured alone (they can overlap: decode,
    forward and writes in extract; reads and the moments in reduce); kNN reads the store before it
    multiplies, so its two parts add."""
    n, n_val, stages = size["n"], size["n_val"], size["stages"]
    disk, write = meta["disk_read_b_s"], meta["disk_write_b_s"]
    sgemm, xtx = meta["sgemm32_gflops"] * 1e9, meta["xtx64_gflops"] * 1e9
    train, val = stages["extract train"]["bytes"], stages["extract val"]["bytes"]
    fit_rows = min(n, FIT_N) * 28 * 28
    fit_bytes = min(n, FIT_N) * TOKEN_BYTES
    return {
        "prepare train": n / meta["decode_only_img_s"],  # every image decoded once to validate it
        "extract train": max(n / meta["decode_img_s"], n / meta["forward_img_s"], train / write),
        "extract val": max(n_val / meta["decode_img_s"], 2 * n_val / meta["forward_img_s"], val / write),
        "knn": train / disk + n * (n + 1) / 2 * 384 * 2 / sgemm,  # all pairs once: half the product
        "reduce pca": max(fit_bytes / disk, fit_rows * 384 * 384 * 2 / xtx),
        "reduce rp": max(fit_bytes / disk, fit_rows * 384 * 384 * 2 / xtx),  # standardize=fit: the same moments
        "reduce hnne": fit_bytes / disk,  # the fit rows' read only: no bound on the fit itself
        "train-head": math.nan,
        "probe pca": math.nan,
        "evaluate pca": val / disk,
    }


# --------------------------------------------------------------------------------------------------
# the rehearsal
# --------------------------------------------------------------------------------------------------


def rehearse(n: int, n_val: int, overrides: list[str], root: Path, estimates: dict[str, dict[str, Any]],
             cold: bool, stages: dict[str, dict[str, Any]], save: Any) -> dict[str, Any]:
    """Run every stage at one size (page cache dropped before each) that ``stages`` does not hold yet;
    per stage: wall (manifest), peak RSS, estimate (if planned); ``save()`` after each."""
    for label, target, extra in STAGE_RUNS:
        if label in stages:  # measured before a resume
            continue
        if cold:
            drop_page_cache()
        res = run_target(root, target, overrides + extra)
        art = res["target_id"]
        m = manifest(root, art)
        est = estimates.get(art, {})
        stages[label] = {"id": art, "wall_s": float(m.get("wall_time_s") or res["wall_s"]), "rss_mb": res["rss_mb"],
                         "process_s": res["wall_s"], "bytes": artifact_bytes(root, art),
                         "estimate_s": est.get("seconds"), "estimate_basis": est.get("basis")}
        save()
        print(f"  {label:<14} {stages[label]['wall_s']:8.1f} s (process {res['wall_s']:.1f} s)  "
              f"RSS {res['rss_mb']:7.0f} MiB" + (f"  estimated {est['seconds']:.1f} s" if est.get("seconds") else ""),
              flush=True)
    return {"n": n, "n_val": n_val, "stages": stages, "token_bytes": stages["extract train"]["bytes"],
            "tokens_path": str(root / "extract" / stages["extract train"]["id"])}


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def write_report(sizes: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """``benchmarks/results/scale.md`` (+ ``scale.json``): one row per stage."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "scale.json").write_text(json.dumps({"meta": meta, "sizes": sizes}, indent=2, default=str) + "\n")
    first, last = sizes[0], sizes[-1]
    lines = ["# Scale rehearsal", "",
             f"Train token stores of {', '.join(format(s['n'], ',') for s in sizes)} samples "
             f"({', '.join(format(s['token_bytes'] / 1e9, '.1f') + ' GB' for s in sizes)}; this machine's RAM "
             f"{meta['ram_gb']:.1f} GB, so the largest is {last['token_bytes'] / 1e9 / meta['ram_gb']:.2f}× RAM), val "
             f"{', '.join(format(s['n_val'], ',') for s in sizes)} samples; backbone `{BACKBONE}` at 224 px; "
             f"reduce fits on {FIT_N:,} sampled images, h-NNE on {meta['hnne_tokens']:,} tokens; head and probe "
             f"{meta['steps']} steps. {meta['cpus']} cores; load average {meta['load_before']} before, "
             f"{meta['load_after']} after; total {meta['total_min']:.0f} min.", "",
             f"Limits measured in this run: disk read (`cat` of the 4N train store, "
             f"{'page cache dropped' if meta['cold'] else 'WARM: the page cache could not be dropped'}) "
             f"{meta['disk_read_b_s'] / 1e9:.2f} GB/s, disk write (`dd`, fdatasync) "
             f"{meta['disk_write_b_s'] / 1e9:.2f} GB/s, sgemm {meta['sgemm32_gflops']:.0f} GFLOP/s float32, "
             f"XᵀX {meta['xtx64_gflops']:.0f} GFLOP/s float64, decode {meta['decode_only_img_s']:.0f} img/s "
             f"(+ resize and crop {meta['decode_img_s']:.0f} img/s), forward {meta['forward_img_s']:.0f} img/s "
             f"(best of {meta['measurements']} measurements: at the start and after each size); CRF (crf_map, "
             f"2 workers, {CRF_SAMPLE} images 224², 27 classes): {meta['crf_s_per_img']:.2f} s/image.", "",
             "| stage | " + " | ".join("wall " + format(s["n"], ",") for s in sizes)
             + " | limit (largest) | limit/wall | growth exp. | peak RSS MiB | plan estimate / actual |",
             "|---" * (len(sizes) + 6) + "|"]
    for label, *_ in STAGE_RUNS:
        walls = [s["stages"][label]["wall_s"] for s in sizes]
        limit = last["limits"][label]
        exponent = (math.log(walls[-1] / walls[0]) / math.log(last["n"] / first["n"])
                    if walls[0] > 0 and last["n"] > first["n"] else math.nan)
        rss = " / ".join(f"{s['stages'][label]['rss_mb']:.0f}" for s in sizes)
        est = [f"{format(s['n'], ',')}: {_fmt_s(s['stages'][label]['estimate_s'])} / "
               f"{_fmt_s(s['stages'][label]['wall_s'])} "
               f"({100 * (s['stages'][label]['estimate_s'] / s['stages'][label]['wall_s'] - 1):+.0f}%)"
               for s in sizes if s["stages"][label].get("estimate_s")]
        lines.append(f"| {label} | " + " | ".join(_fmt_s(w) for w in walls)
                     + f" | {'-' if math.isnan(limit) else _fmt_s(limit)}"
                     + f" | {'-' if math.isnan(limit) else f'{limit / walls[-1]:.2f}'}"
                     + f" | {exponent:.2f} | {rss} | {'; '.join(est) or '-'} |")
    lines += ["", "Wall: the manifest's `wall_time_s` (the stage itself; the process adds imports and planning). "
              "Growth exponent: log(wall 4N / wall N) / log 4 (kNN is quadratic; reduce fits on a fixed sample, "
              "so its fit stops growing past 5,000 images; train-head and probe run fixed steps: ≈ 0; the rest "
              "≈ 1). Peak RSS: the `stegopipe run` process (wait4), per size. limit/wall: 1 is at the limit. "
              "Plan estimates: `stegopipe plan --json` from the manifests of the smaller sizes on the same root, "
              "before the size ran (startup + work / rate, pipeline/estimates.py; kNN as the sum of its phases: "
              "the store read, linear, the search, quadratic, and a constant rest)."]
    out = RESULTS_DIR / "scale.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _size_n(arg: str, ram: int) -> int:
    """N: ``auto`` = the smallest multiple of 64 with 4N × 602 kB ≥ 1.2 × RAM."""
    if arg != "auto":
        return int(arg)
    return 64 * math.ceil(1.2 * ram / TOKEN_BYTES / 4 / 64)


def disk_needed(n: int) -> float:
    """Bytes the rehearsal needs at its peak: the 4N dataset and, at 4N, its train store, val store
    (tokens, flipped tokens, RGB) and h-NNE codes, plus 10 % slack; the N and 2N stores (3N) are gone by then."""
    n4, val4 = 4 * n, max(32, n // 4)
    dataset = (n4 + val4) * DATASET_BYTES
    stores = n4 * TOKEN_BYTES * (1 + 32 / 384) + val4 * (2 * TOKEN_BYTES + 224 * 224 * 4) * (1 + 32 / 384)
    return 1.1 * (dataset + stores)


def main(argv: list[str] | None = None) -> None:
    import psutil

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="auto", help="base size N (train samples); auto: 4N = 1.2× RAM")
    parser.add_argument("--root", type=Path, help="artifact root (default: a new folder in the temp dir); a root "
                        "left by a failed run resumes it")
    parser.add_argument("--keep", action="store_true", help="keep the artifacts (they are large)")
    parser.add_argument("--steps", type=int, default=STEPS, help="head and probe training steps")
    parser.add_argument("--hnne-tokens", type=int, default=HNNE_TOKENS, help="reduce.hnne_tokens")
    parser.add_argument("--report", type=Path, help="only write the table from this scale.json")
    parser.add_argument("--dataset-only", action="store_true", help="only build the dataset in --root (the run "
                        "with the same --root then starts from it)")
    opts = parser.parse_args(argv)
    if opts.report:
        data = json.loads(opts.report.read_text())
        print(write_report(data["sizes"], data["meta"]).read_text())
        return
    ram = psutil.virtual_memory().total
    n = _size_n(opts.n, ram)
    root = (opts.root or Path(tempfile.mkdtemp(prefix="stegopipe-scale-"))).absolute()
    root.mkdir(parents=True, exist_ok=True)
    progress = root / "scale-progress.json"
    state: dict[str, Any] = json.loads(progress.read_text()) if progress.exists() else {}
    settings = (n, opts.steps, opts.hnne_tokens)
    if state and tuple(state["meta"][k] for k in ("n", "steps", "hnne_tokens")) != settings:
        raise SystemExit(f"bench-scale: {root} holds a run with other settings ({progress}); use another --root")
    used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.stat().st_nlink == 1)
    free, need = shutil.disk_usage(root).free, disk_needed(n) - used
    if need > free:
        raise SystemExit(f"bench-scale: N={n:,} needs about {need / 1e9:.0f} GB more on {root} at 4N but only "
                         f"{free / 1e9:.0f} GB are free; free some or pass a smaller --n")
    started = time.perf_counter()
    meta: dict[str, Any] = state.get("meta") or {
        "load_before": [round(v, 1) for v in os.getloadavg()], "cpus": os.cpu_count(), "steps": opts.steps,
        "hnne_tokens": opts.hnne_tokens, "ram_gb": ram / 1e9, "root": str(root), "n": n, "gemm": []}
    state.update(meta=meta, sizes=state.get("sizes", []), partial=state.get("partial", {}),
                 estimates=state.get("estimates", {}))
    sizes: list[dict[str, Any]] = state["sizes"]

    def save() -> None:
        progress.write_text(json.dumps(state, indent=1, default=str))

    print(f"bench-scale: N = {n:,} (4N = {4 * n * TOKEN_BYTES / 1e9:.1f} GB of train tokens, RAM {ram / 1e9:.1f} GB); "
          f"{need / 1e9:.0f} GB of {free / 1e9:.0f} GB free needed; root {root}"
          + (f"; resuming after {len(sizes)} sizes" if sizes or state["partial"] else ""), flush=True)
    full = root / "data" / "4N"
    if not (full / "complete").exists():
        t = time.perf_counter()
        shutil.rmtree(full, ignore_errors=True)
        make_dataset(full, 4 * n, max(32, n // 4))
        (full / "complete").touch()
        meta["dataset_s"] = time.perf_counter() - t
        save()
        print(f"dataset: {4 * n:,} + {max(32, n // 4):,} images in {meta['dataset_s']:.0f} s", flush=True)
    if opts.dataset_only:
        return
    def measure_rates() -> None:  # at the start and after each size; the best (quietest) is the limit
        meta["gemm"].append(gemm_rates())
        meta["cpu"].append([*decode_rates(full / "imgs" / "train"), forward_rate()])
        save()

    if "crf_s_per_img" not in meta:
        meta.update(load_before=[round(v, 1) for v in os.getloadavg()], gemm=[], cpu=[])
        meta["disk_write_b_s"] = write_rate(root)
        meta["crf_s_per_img"] = crf_sample_seconds()
        measure_rates()
    cold = drop_page_cache()
    for factor in (1, 2, 4)[len(sizes):]:
        size_n, n_val = factor * n, max(32, factor * n // 16)
        data = full
        if factor < 4:
            shutil.rmtree(root / "data" / f"{factor}N", ignore_errors=True)
            data = link_prefix(full, root / "data" / f"{factor}N", size_n, n_val)
        overrides = _overrides(data, opts.steps, opts.hnne_tokens)
        if sizes and str(factor) not in state["estimates"]:  # from the smaller sizes' manifests, still on the root
            estimates: dict[str, dict[str, Any]] = {}
            for _, target, extra in STAGE_RUNS:
                estimates.update(plan_estimates(root, target, overrides + extra))
            state["estimates"][str(factor)] = estimates
            save()
        if factor == 4:  # the smaller sizes' stores and codes: their manifests have served the plan
            for size in sizes:
                for label, entry in size["stages"].items():
                    if label.startswith(("extract", "reduce")):
                        shutil.rmtree(root / entry["id"].rsplit("-", 1)[0] / entry["id"], ignore_errors=True)
        print(f"N = {size_n:,} ({size_n * TOKEN_BYTES / 1e9:.1f} GB of train tokens), val {n_val:,}; "
              f"{shutil.disk_usage(root).free / 1e9:.0f} GB free", flush=True)
        stages = state["partial"].setdefault(str(factor), {})
        size = rehearse(size_n, n_val, overrides, root, state["estimates"].get(str(factor), {}), cold, stages, save)
        measure_rates()
        if factor == 4:  # the disk limit: the largest store, bigger than the page cache
            meta["disk_read_b_s"], meta["cold"] = cat_rate(Path(size["tokens_path"]))
        sizes.append(size)
        del state["partial"][str(factor)]
        save()
    meta.update(sgemm32_gflops=max(g[0] for g in meta["gemm"]), xtx64_gflops=max(g[1] for g in meta["gemm"]),
                decode_only_img_s=max(c[0] for c in meta["cpu"]), decode_img_s=max(c[1] for c in meta["cpu"]),
                forward_img_s=max(c[2] for c in meta["cpu"]), measurements=len(meta["gemm"]))
    for size in sizes:
        size["limits"] = limits(size, meta)
    meta["load_after"] = [round(v, 1) for v in os.getloadavg()]
    meta["total_min"] = meta.get("total_min", 0) + (time.perf_counter() - started) / 60
    print(write_report(sizes, meta).read_text())
    if not opts.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
