"""``probe`` stage: fresh linear + cluster probes trained on the codes of the cached train tokens (the
probes themselves: :mod:`stages.evaluation.probes`)."""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.artifacts import json_safe, write_json_atomic
from pipeline.config import register_section, setting
from pipeline.errors import InputError
from pipeline.lazy import lazy_module
from pipeline.params import Params
from pipeline.prefetch import prefetch
from pipeline.context import StageContext
from pipeline.planner import Request
from pipeline.registry import register_stage
from stages.projections.select import NO_DIM_WITHOUT_PROVIDER, open_projection, projection_request, reader_contexts
from stages.evaluation.settings import PROBE_LR

torch = lazy_module("torch")
probes = lazy_module("stages.evaluation.probes")
token_store = lazy_module("stages.store")


@dataclass
class ProbeConfig:
    """Probe training on cached tokens (``probe.*``); everything here changes the probes."""

    steps: int = setting(5000, min=1)  # optimisation steps (one step = one batch), method.md §9.1 / §10.6
    batch_size: int = setting(16, min=1)  # training samples per step
    lr: float = setting(PROBE_LR, above=0)  # Adam learning rate of both probes
    extra_clusters: int = setting(0, min=0)  # cluster probe gets n_classes + extra_clusters centroids
    cluster_fit: str = setting("adam", choices=("adam", "kmeans"))  # adam: the reference; kmeans: mini-batch spherical


register_section("probe", ProbeConfig)


def _probe_inputs(cfg: Any, args: Mapping[str, Any]) -> dict[str, Request]:
    return {"tokens": Request("extract", cfg, {"split": "train"}), **projection_request(cfg)}


PROBE_PARAMS = Params(exclude=(NO_DIM_WITHOUT_PROVIDER,), contexts=reader_contexts)


def _batch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches of sample indices: seeded shuffled epochs (a short batch ends each epoch, as a
    ``DataLoader(shuffle=True)`` would give)."""
    rng = np.random.default_rng(seed)
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        order = rng.permutation(n)
        batches += [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return batches[:steps]


@register_stage("probe", kind="probes", sections=("probe", "projection"), params=PROBE_PARAMS, inputs=_probe_inputs,
                make_target="make probe")
def probe_stage(ctx: StageContext) -> None:
    """Train fresh linear + cluster probes on the codes of the cached train tokens.

    Codes = projection(tokens) at feature resolution, random seeded batches; the linear loss upsamples
    its logits to the label size (§5.2), the cluster loss is the hard cosine k-means loss at feature
    resolution (§5.1). For ``projection.method=stego`` the head artifact already holds probes trained
    concurrently with the head (§5.3); fresh ones are trained here anyway, so every projection is
    probed with the same protocol.
    """
    p, projection_cfg = ctx.config.probe, ctx.config.projection
    seed = int(projection_cfg.seed)
    store = token_store.TokensArtifact(ctx.input("tokens").path).store
    attrs = store.attrs
    for key in ("n_classes", "class_names"):
        if key not in attrs:
            raise InputError(f"token store {store.path}: group attribute {key!r} is missing")
    n_classes, class_names = int(attrs["n_classes"]), list(attrs["class_names"])
    provider = ctx.input("projection").path if "projection" in ctx.inputs else None
    projection = open_projection(provider, store.dim, projection_cfg.get("dim"))
    device = torch.device(ctx.device)
    trainer = probes.ProbeTrainer(projection.dim, n_classes, n_clusters=n_classes + p.extra_clusters, lr=p.lr,
                           seed=seed, cluster_fit=p.cluster_fit, device=device)
    batches = _batch_indices(store.n, p.batch_size, p.steps, seed)

    def read(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.from_numpy(store.get_tokens(indices)).permute(0, 3, 1, 2)
        return tokens, torch.from_numpy(store.get_labels(indices).astype(np.int64))

    history: list[dict[str, float]] = []
    start = time.perf_counter()
    with prefetch(read, batches, workers=1, depth=2, name="probe-read") as loaded, \
            tqdm(total=len(batches), desc="probe", unit="step", leave=False) as bar:
        for tokens, labels in loaded:
            with torch.no_grad():
                code = projection.transform_map(tokens.to(device))
            history.append(trainer.step(code, labels))
            bar.update(1)
    seconds = time.perf_counter() - start
    trainer.linear.eval()
    trainer.cluster.eval()
    losses = {name: json_safe([h[name] for h in history]) for name in ("linear", "cluster")}
    note = ("the head artifact also holds probes trained with the head (§5.3); these are fresh probes"
            if projection_cfg.method == "stego" else None)
    probes.save_probes(ctx.out, trainer.linear, trainer.cluster, class_names=class_names, projection=projection,
                extra={"steps": p.steps, "batch_size": p.batch_size, "lr": p.lr,
                       "cluster_fit": p.cluster_fit, "extra_clusters": p.extra_clusters, "seed": seed,
                       "projection_method": projection_cfg.method,
                       "final_loss": {k: v[-1] for k, v in losses.items()}})
    write_json_atomic(ctx.out / "history.json", losses)
    h, w = store.grid
    ctx.record(counts={"steps": len(history), "train_samples": store.n, "n_classes": n_classes,
                       "n_clusters": trainer.cluster.n_clusters, "dim": projection.dim},
               seeds={"probe": seed},
               throughput={"steps_per_s": round(len(history) / seconds, 3),
                           "tokens_per_s": round(sum(len(b) for b in batches) * h * w / seconds, 1)},
               final_loss={k: v[-1] for k, v in losses.items()}, **({"note": note} if note else {}))

