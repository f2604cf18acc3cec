"""GPU-only checks for benchmarks/gpu_check.sh: AMP parity of the tokens, PCA moments on the GPU (torch, and
cupy/cuML's backend when installed), exact kNN on the GPU vs the CPU path, and the cached STEGO head step at
paper resolution eager vs ``torch.compile`` (default and ``reduce-overhead``, i.e. CUDA graphs).

Prints one line per measurement. Not part of ``make bench`` (it needs CUDA).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.backbones import load_backbone, dino_features  # noqa: E402
from stages.projections.linear import PCAMoments, accumulate_moments  # noqa: E402


def amp_parity() -> None:
    """fp16 autocast tokens vs fp32 tokens for ViT-B/8 at 320 (the val resolution)."""
    model, _ = load_backbone("vit_base_patch8_224.dino", "random", seed=0)
    model = model.cuda()
    x = torch.randn(8, 3, 320, 320, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        ref = dino_features(model, x)
        with torch.autocast("cuda", dtype=torch.float16):
            amp = dino_features(model, x)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(2), amp.float().flatten(2), dim=1)
    print(f"AMP parity ViT-B/8@320: max |fp16-fp32| {float((amp.float() - ref).abs().max()):.4f}, "
          f"min token cosine {float(cos.min()):.7f}")


def pca_moments(n_tokens: int = 4_000_000, dim: int = 768, numpy_chunks: int = 2) -> None:
    """Exact PCA moments (count, sum, XᵀX in float64) of fp16 tokens: GPU (torch) vs numpy."""
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((250_000, dim), dtype=np.float32).astype(np.float16) for _ in range(n_tokens // 250_000)]
    start = time.perf_counter()
    ref = PCAMoments.empty(dim)
    for chunk in chunks[:numpy_chunks]:
        ref.update(chunk)
    numpy_tok_s = numpy_chunks * 250_000 / (time.perf_counter() - start)
    accumulate_moments(chunks[:1], backend="torch")  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    gpu = accumulate_moments(chunks, backend="torch")
    torch.cuda.synchronize()
    gpu_tok_s = n_tokens / (time.perf_counter() - start)
    small = accumulate_moments(chunks[:numpy_chunks], backend="torch")
    rel = float(np.abs(small.xtx - ref.xtx).max() / np.abs(ref.xtx).max())
    print(f"PCA moments {dim}-d fp16: GPU {gpu_tok_s:,.0f} tok/s vs numpy {numpy_tok_s:,.0f} tok/s "
          f"= {gpu_tok_s / numpy_tok_s:.1f}x; max rel diff of XtX {rel:.2e}")


def pca_moments_cupy(n_tokens: int = 4_000_000, dim: int = 768) -> None:
    """The same moments through the cupy backend (``reduce.backend=cupy``; cuML's stack), when cupy is installed."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        print("PCA moments cupy: cupy not installed (skipped)")
        return
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((250_000, dim), dtype=np.float32).astype(np.float16) for _ in range(n_tokens // 250_000)]
    accumulate_moments(chunks[:1], backend="cupy")
    start = time.perf_counter()
    accumulate_moments(chunks, backend="cupy")
    print(f"PCA moments {dim}-d fp16: cupy {n_tokens / (time.perf_counter() - start):,.0f} tok/s")


def knn_gpu(n: int = 200_000, check: int = 20_000) -> None:
    """``topk_neighbors`` on CUDA (blocked torch path) for ``n`` × 384, k=30, vs the CPU path on ``check`` rows."""
    from stages.stego.knn import topk_neighbors

    x = np.random.default_rng(0).standard_normal((n, 384), dtype=np.float32)
    topk_neighbors(x[:4096], 30, device="cuda")  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    topk_neighbors(x, 30, device="cuda")
    gpu_s = time.perf_counter() - start
    small = x[:check]
    start = time.perf_counter()
    cpu = topk_neighbors(small, 30)
    cpu_s = time.perf_counter() - start
    gpu_small = topk_neighbors(small, 30, device="cuda")
    same = float(np.mean(np.all(np.sort(cpu, 1) == np.sort(gpu_small, 1), 1)))
    print(f"kNN {n:,}x384 k=30 on CUDA: {gpu_s:.2f} s; CPU path on {check:,} rows {cpu_s:.2f} s "
          f"(GPU on the same rows agrees in {100 * same:.3f}% of neighbour sets)")


def head_step_compiled(dim: int = 384, res: int = 224, steps: int = 30) -> None:
    """Cached STEGO head step (ViT-S/8 tokens at ``res``, batch 8) eager vs ``torch.compile`` modes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_train_step import BATCH, N_CLASSES, _settings

    from stages.stego.train import HeadTrainer, _sub_seeds

    device = torch.device("cuda")
    grid = res // 8
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2 * BATCH, dim, grid, grid, generator=gen).to(device)
    labels = torch.randint(-1, N_CLASSES, (BATCH, res, res), generator=gen).to(device)
    results = {}
    for mode in ("eager", "default", "reduce-overhead"):
        trainer = HeadTrainer(dim, N_CLASSES, _settings(), _sub_seeds(0), device)
        step = trainer.step if mode == "eager" else torch.compile(trainer.step, mode=mode)
        try:
            for _ in range(3):  # compile + warm-up
                step(feats[:BATCH], feats[BATCH:], labels)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                step(feats[:BATCH], feats[BATCH:], labels)
            torch.cuda.synchronize()
            results[mode] = (time.perf_counter() - start) / steps
        except Exception as exc:  # noqa: BLE001 - report what a compile mode cannot do, run the others
            print(f"head step {mode}: failed ({type(exc).__name__}: {str(exc)[:200]})")
    eager = results.get("eager")
    print("head step ViT-S/8@224 batch 8 (tokens on the GPU): " + ", ".join(
        f"{mode} {s * 1e3:.2f} ms" + (f" ({eager / s:.2f}x eager)" if eager and mode != "eager" else "")
        for mode, s in results.items()))


if __name__ == "__main__":
    for check in (amp_parity, pca_moments, pca_moments_cupy, knn_gpu, head_step_compiled):
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - one failed check must not hide the others' numbers
            print(f"{check.__name__}: failed ({type(exc).__name__}: {str(exc)[:300]})")
