"""STEGO head training step from the token cache vs with a live backbone (speed-up, goal ≥ 2×).

Both sides do the same head step (:class:`stages.stego.train.HeadTrainer.step`: three dropout masks,
head forward of anchors and kNN partners, correlation loss, Adam, probe steps) for a batch of 8 at
ViT-S/8 224 (28×28×384 tokens, head dim 70, S=11, 5 negatives). The cached step first reads the anchor
and partner tokens from a token store (random access, float16 → float32, no prefetch, so the read is
fully counted); the live step first runs a randomly initialised ViT-S/8 on the 8 anchor and 8 partner
images (``torch.no_grad``, fp16 autocast on CUDA, as extraction would). Best of ``repeat`` after a
warm-up, on CUDA when available. Ratio = live ÷ cached seconds (higher is better).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import row, script_main, temp_root, timed

BACKBONE = "vit_small_patch8_224.dino"
RES, GRID, DIM, BATCH, N_CLASSES = 224, 28, 384, 8, 27


def _store(path: Path, n: int) -> Any:
    from stages.store import create_token_store, open_token_store, write_shard

    rng = np.random.default_rng(0)
    create_token_store(path, n=n, grid=(GRID, GRID), dim=DIM, label_hw=(RES, RES), shard_size=16,
                       with_rgb=False, with_flip=False, attrs={"n_classes": N_CLASSES})
    for k, a in enumerate(range(0, n, 16)):
        b = min(a + 16, n)
        tokens = rng.standard_normal((b - a, GRID, GRID, DIM), dtype=np.float32)
        labels = np.repeat(np.repeat(rng.integers(-1, N_CLASSES, (b - a, 8, 8)), 28, axis=1), 28, axis=2)
        write_shard(path, k, tokens=tokens, labels=labels, ids=[str(i) for i in range(a, b)])
    return open_token_store(path)


def run(quick: bool = False) -> list[dict[str, Any]]:
    import torch

    from stages.backbones import dino_features, load_backbone
    from stages.stego.train import HeadTrainer, TrainSettings, _sub_seeds, _to_device_map, batch_indices

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, repeat = (16, 2) if quick else (64, 5)
    settings = TrainSettings(projection="nonlinear", dim=70, dropout=0.1, lr=5e-4, steps=1, batch_size=BATCH,
                             feature_samples=11, neg_samples=5, pointwise=True, zero_clamp=True, stabilize=False,
                             weights={"intra": 0.67, "inter": 0.25, "neg": 0.63},
                             shifts={"intra": 0.18, "inter": 0.12, "neg": 0.46}, num_neighbors=7,
                             true_permutation=False, val_every=0, selection="last", extra_clusters=0, amp=True,
                             seed=0)
    rng = np.random.default_rng(1)
    nns = np.stack([np.r_[i, rng.permutation(np.delete(np.arange(n), i))[:8]] for i in range(n)])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with temp_root() as tmp:
        store = _store(tmp / "tokens.zarr", n)
        batches = batch_indices(n, nns, BATCH, settings.num_neighbors, np.random.default_rng(2))
        cached = HeadTrainer(DIM, N_CLASSES, settings, _sub_seeds(0), device)

        def cached_step() -> None:
            anchors, partners = next(batches)
            both = _to_device_map(store.get("tokens", np.concatenate([anchors, partners])), device)
            labels = torch.from_numpy(store.get_labels(anchors).astype(np.int64))
            cached.step(both[:BATCH], both[BATCH:], labels)
            sync()

        cached_s = timed(cached_step, repeat=repeat)

    vit, _ = load_backbone(BACKBONE, "random")
    vit = vit.to(device)
    live = HeadTrainer(DIM, N_CLASSES, settings, _sub_seeds(0), device)
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2 * BATCH, 3, RES, RES, generator=gen).to(device)
    labels = torch.randint(-1, N_CLASSES, (BATCH, RES, RES), generator=gen)

    def live_step() -> None:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.float16,
                                             enabled=device.type == "cuda"):
            feats = dino_features(vit, images[:BATCH])
            feats_pos = dino_features(vit, images[BATCH:])
        live.step(feats, feats_pos, labels)
        sync()

    live_s = timed(live_step, repeat=repeat)
    where = f"{device.type}, torch threads {torch.get_num_threads()}"
    print(f"train step, batch {BATCH}, ViT-S/8 @ {RES} ({where}): cached {cached_s * 1e3:.1f} ms, "
          f"live {live_s * 1e3:.1f} ms, speed-up {live_s / cached_s:.2f}x", file=sys.stderr)
    return [
        row("train-head step from cache", cached_s * 1e3, "ms", baseline=live_s * 1e3, goal="ratio >= 50",
            higher_is_better=False,
            note=f"ratio = live-backbone step / cached step ({where}; batch {BATCH}, ViT-S/8 random init @ {RES}, "
                 f"head dim 70; best of {repeat})"),
        row("train-head step with live ViT", live_s * 1e3, "ms", note="ViT forward of anchors + kNN partners, "
            "then the same head step"),
    ]


if __name__ == "__main__":
    script_main(run)
