"""GPU-only checks for benchmarks/gpu_check.sh: AMP parity of the tokens and PCA moments on the GPU.

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


if __name__ == "__main__":
    amp_parity()
    pca_moments()
