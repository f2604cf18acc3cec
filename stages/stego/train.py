"""STEGO segmentation head training on cached tokens (method.md §2, §3, §5.3, §9.1).

The backbone is frozen and Dropout2d follows it, so training on cached tokens with the three channel
dropout masks drawn on the fly is exactly STEGO's training. One step = one batch:

1. ``batch_size`` anchors: consecutive slices of a seeded per-epoch permutation of the train samples
   (an incomplete last slice is dropped); each anchor's kNN partner is ``nns[i, k]`` with ``k`` uniform
   in ``1..num_neighbors`` (column 0 is the sample itself). Tokens of both are read from the token
   store (random access, float16 → float32 ``[B, D, h, w]``), the next batches read ahead in threads
   (:mod:`pipeline.prefetch`).
2. Head forward of the anchors, then of the partners, with dropout masks (cluster1, cluster2,
   returned features; method.md §1.4), then the correlation loss (§3.3) and its weighted total (§3.4).
3. Adam step of the head; the linear and cluster probes take one Adam step each on the detached code
   (stop-gradient, §5.3) with the anchors' labels.
4. Every ``val_every`` steps (and after the last one) the code of every cached val sample is
   upsampled to the label size and both probes are scored (linear and Hungarian-matched cluster mIoU).
   ``selection=best_val_cluster_miou`` keeps the state with the best val cluster mIoU (STEGO's model
   selection, method.md §9.1, §12.4); ``last`` keeps the final one. The chosen step goes in the manifest.

Everything random derives from ``projection.seed``: head init, the batch/partner sampler, the dropout
masks and loss samples (a generator on the device), the probe init. On CPU two runs give identical
weights. On CUDA the head forward runs under autocast (``head.amp``: bfloat16 where supported, else
float16 with a gradient scaler); the loss is computed in float32.

``head.checkpoint=<file.ckpt>`` makes the stage import a released STEGO checkpoint instead
(:func:`stages.projections.stego.write_imported`); its params are then only the file's sha256, so the
artifact is the one ``stegopipe import-stego <file.ckpt>`` creates.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function
from tqdm import tqdm

from pipeline.artifacts import json_safe
from pipeline.errors import ConfigError, InputError, StageError
from pipeline.prefetch import prefetch
from stages.evaluation.metrics import confusion_matrix, scores
from stages.evaluation.probes import ClusterProbe, LinearProbe, ProbeTrainer, predict_batch, upsample_code
from stages.stego.head import StegoHead
from stages.stego.loss import correlation_loss, correlation_term, sample, super_perm, weighted_total
from stages.stego.settings import PARTS, TrainSettings
from stages.store import TokenStore

HIST_BINS = 100
HIST_RANGE = (-1.0, 1.0)
DIAG_BATCHES = 8  # batches whose feature correlations go into the histograms


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """A trained head with its probes (at the chosen step), the chosen step, diagnostics, throughput
    and the sub-seeds derived from the run's seed."""

    head: StegoHead
    linear: LinearProbe
    cluster: ClusterProbe
    chosen_step: int
    diagnostics: dict[str, Any]
    stats: dict[str, Any]
    seeds: dict[str, int]


def _sub_seeds(seed: int) -> dict[str, int]:
    names = ("head", "sampler", "noise", "probes", "diagnostics")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {name: int(child.generate_state(1)[0]) for name, child in zip(names, children)}


def batch_indices(n: int, nns: np.ndarray, batch_size: int, num_neighbors: int,
                  rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless ``(anchors, partners)`` index batches: slices of a fresh permutation per epoch (an
    incomplete last slice is dropped), partners ``nns[i, k]`` with ``k`` uniform in ``1..num_neighbors``."""
    while True:
        perm = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            anchors = perm[start:start + batch_size]
            cols = rng.integers(1, num_neighbors + 1, size=batch_size)
            yield anchors, nns[anchors, cols]


def read_batch(store: TokenStore, batch: tuple[np.ndarray, np.ndarray], *,
               pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[2B, h, w, D]`` as stored (anchors, then partners) and int64 anchor labels ``[B, H, W]``
    of one ``(anchors, partners)`` batch; in pinned memory when ``pin`` (for :func:`batch_to_device`)."""
    anchors, partners = batch
    tokens = torch.from_numpy(store.get("tokens", np.concatenate([anchors, partners])))
    labels = torch.from_numpy(store.get_labels(anchors).astype(np.int64))
    return (tokens.pin_memory(), labels.pin_memory()) if pin else (tokens, labels)


def batch_to_device(tokens: torch.Tensor, labels: torch.Tensor,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A :func:`read_batch` result on ``device``: float32 maps ``[2B, D, h, w]`` and the labels (copies
    from pinned memory do not block the host)."""
    return _to_device_map(tokens, device), labels.to(device, non_blocking=device.type == "cuda" and labels.is_pinned())


def _to_device_map(tokens: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[B, h, w, D]`` float16/32 tokens → float32 ``[B, D, h, w]`` on ``device`` (a channels-last view);
    a pinned CPU tensor is copied without blocking."""
    t = tokens if isinstance(tokens, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(tokens))
    return t.to(device, non_blocking=device.type == "cuda" and t.is_pinned()).permute(0, 3, 1, 2).float()


def feature_correlations(f1: torch.Tensor, f2: torch.Tensor, *, pointwise: bool) -> torch.Tensor:
    """The feature correlation ``fd`` of method.md §3.2 exactly as the loss uses it (centred if ``pointwise``)
    for sampled features ``[B, D, S, S]`` → ``[B, S, S, S, S]``.

    Computed by :func:`correlation_term` with constant unit codes: their code correlation is 1
    everywhere, so the term with shift 0 and no clamping is ``-fd``.
    """
    ones = f1.new_ones((f1.shape[0], 1, *f1.shape[2:]))
    term, _ = correlation_term(f1, f2, ones, ones, 0.0, pointwise=pointwise, zero_clamp=False, stabilize=False)
    return -term


class _CorrelationStats:
    """Histograms, means and above-shift fractions of ``fd`` per partner kind."""

    def __init__(self, shifts: Mapping[str, float]) -> None:
        self.shifts = dict(shifts)
        self.counts = {p: np.zeros(HIST_BINS, dtype=np.int64) for p in PARTS}
        self.total = {p: 0.0 for p in PARTS}
        self.above = {p: 0 for p in PARTS}
        self.n = {p: 0 for p in PARTS}

    @torch.no_grad()
    def add(self, feats: torch.Tensor, feats_pos: torch.Tensor, settings: TrainSettings,
            generator: torch.Generator) -> None:
        b, s = feats.shape[0], settings.feature_samples
        coords1 = torch.rand((b, s, s, 2), generator=generator, device=feats.device) * 2 - 1
        coords2 = torch.rand((b, s, s, 2), generator=generator, device=feats.device) * 2 - 1
        anchor = sample(feats, coords1)
        partners = {"intra": anchor, "inter": sample(feats_pos, coords2),
                    "neg": sample(feats[super_perm(b, generator=generator, device=feats.device)], coords2)}
        for part, partner in partners.items():
            fd = feature_correlations(anchor, partner, pointwise=settings.pointwise).float()
            hist = torch.histc(fd.clamp(*HIST_RANGE), bins=HIST_BINS, min=HIST_RANGE[0], max=HIST_RANGE[1])
            self.counts[part] += hist.cpu().numpy().astype(np.int64)
            self.total[part] += float(fd.sum())
            self.above[part] += int((fd > self.shifts[part]).sum())
            self.n[part] += fd.numel()

    def summary(self) -> dict[str, Any]:
        edges = np.linspace(*HIST_RANGE, HIST_BINS + 1).tolist()
        return {part: {"shift": self.shifts[part], "edges": edges, "counts": self.counts[part].tolist(),
                       "mean": self.total[part] / self.n[part] if self.n[part] else None,
                       "fraction_above_shift": self.above[part] / self.n[part] if self.n[part] else None}
                for part in PARTS}


@torch.no_grad()
def validate(head: StegoHead, linear: LinearProbe, cluster: ClusterProbe, val: TokenStore, n_classes: int,
             device: torch.device, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Score both probes on every sample of ``val``: eval-mode code → bilinear upsampling to the label
    size → probes → confusion matrices → linear mIoU/accuracy and Hungarian-matched cluster mIoU/accuracy."""
    conf_linear = np.zeros((n_classes, n_classes), dtype=np.int64)
    conf_cluster = np.zeros((cluster.n_clusters, n_classes), dtype=np.int64)
    for batch in val.iter_batches(batch_size, arrays=("tokens", "labels"), tokens_dtype=np.float16):
        code = head.code(_to_device_map(batch["tokens"], device))
        preds = predict_batch(upsample_code(code, val.label_hw), linear, cluster)
        labels = batch["labels"]
        conf_linear += confusion_matrix(preds["linear"], labels, n_classes)
        conf_cluster += confusion_matrix(preds["cluster"], labels, n_classes, cluster.n_clusters)
    out = {}
    for name, conf, hungarian in (("linear", conf_linear, False), ("cluster", conf_cluster, True)):
        s = scores(conf, hungarian)
        out[name] = {"miou": s["miou"], "accuracy": s["accuracy"]}
    return out


def _snapshot(*modules: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


class HeadTrainer:
    """The head, its probes and their optimisers; :meth:`step` is one STEGO training step on feature maps.

    Built from ``seeds`` (see :func:`train_head`): the head's init under ``seeds["head"]``, the probes'
    under ``seeds["probes"]``, the dropout masks and loss samples from a generator on ``device`` seeded
    with ``seeds["noise"]``.
    """

    def __init__(self, in_dim: int, n_classes: int, settings: TrainSettings, seeds: Mapping[str, int],
                 device: torch.device) -> None:
        self.settings = settings
        self.device = device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeds["head"])
            head = StegoHead(in_dim, settings.dim, settings.projection, settings.dropout)
        self.head = head.to(device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=settings.lr)
        self.probes = ProbeTrainer(settings.dim, n_classes, n_clusters=n_classes + settings.extra_clusters,
                                   seed=seeds["probes"], device=device)
        self.noise = torch.Generator(device=device).manual_seed(seeds["noise"])
        self.use_amp = settings.amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    def step(self, feats: torch.Tensor, feats_pos: torch.Tensor,
             labels: torch.Tensor) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        """One step on anchor / partner feature maps ``[B, D, h, w]`` and anchor labels ``[B, H, W]``.

        Returns the losses (``intra``, ``inter``, ``neg``, ``total``, ``cd_*``, ``linear``, ``cluster``;
        the probe losses None when not finite) and the two dropout feature maps the loss saw. Its phases
        are ``torch.profiler`` ranges ``stego.head_forward``, ``stego.loss``, ``stego.backward_adam`` and
        ``stego.probes``.
        """
        head = self.head.train()
        with record_function("stego.head_forward"), \
                torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            drop_feats, code = head(feats, train_dropout=True, generator=self.noise)
            drop_pos, code_pos = head(feats_pos, train_dropout=True, generator=self.noise)
        with record_function("stego.loss"):
            losses = correlation_loss(drop_feats.float(), drop_pos.float(), code.float(), code_pos.float(),
                                      self.settings, generator=self.noise)
            total = weighted_total(losses, self.settings.weights)
        with record_function("stego.backward_adam"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with record_function("stego.probes"):
            probe_losses = self.probes.step(code.detach(), labels)
        keys = (*PARTS, "total", "cd_intra", "cd_inter", "cd_neg")
        values = torch.stack([losses[p] for p in PARTS] + [total] + [losses[f"cd_{p}"] for p in PARTS]).tolist()
        out: dict[str, float] = dict(zip(keys, values))
        out.update(json_safe(probe_losses))
        return out, drop_feats.detach().float(), drop_pos.detach().float()


def train_head(train: TokenStore, nns: np.ndarray, settings: TrainSettings, *, n_classes: int,
               val: TokenStore | None = None, device: str | torch.device = "cpu", val_batch_size: int = 8,
               loader_workers: int = 4, progress: bool = False) -> TrainResult:
    """Train a STEGO head and its probes on cached tokens (see the module docstring).

    ``train``/``val``: token stores (``val`` is required when ``settings.val_every > 0``); ``nns``: int
    ``[N, K]`` kNN indices of the train samples with ``K > num_neighbors``; ``n_classes``: label classes.
    ``loader_workers`` batches are read ahead in parallel threads (the index stream is drawn in order, so
    this does not change the result). Deterministic for fixed inputs and settings on CPU.
    """
    dev = torch.device(device)
    n = train.n
    _check_inputs(train, nns, settings, val)
    seeds = _sub_seeds(settings.seed)
    trainer = HeadTrainer(train.dim, n_classes, settings, seeds, dev)
    head, probes = trainer.head, trainer.probes
    diag_noise = torch.Generator(device=dev).manual_seed(seeds["diagnostics"])
    sampler = batch_indices(n, nns, settings.batch_size, settings.num_neighbors,
                            np.random.default_rng(seeds["sampler"]))
    diag_every = max(1, settings.steps // DIAG_BATCHES)
    curves: dict[str, list[float | None]] = {k: [] for k in (*PARTS, "linear", "cluster", "total",
                                                              "cd_intra", "cd_inter", "cd_neg")}
    correlations = _CorrelationStats(settings.shifts)
    selector = _Selector(settings, val, n_classes, dev, val_batch_size)
    wait_s = 0.0

    def read(batch: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        return read_batch(train, batch, pin=dev.type == "cuda")

    start = time.perf_counter()
    bar = tqdm(total=settings.steps, desc="train-head", unit="step",
               **({} if progress else {"disable": True}))  # else TQDM_DISABLE (--quiet, no TTY) decides
    ahead = max(1, loader_workers)
    with prefetch(read, itertools.islice(sampler, settings.steps), workers=ahead, depth=ahead,
                  name="train-head-read") as batches:
        for step in range(1, settings.steps + 1):
            t0 = time.perf_counter()
            tokens, labels = next(batches)
            wait_s += time.perf_counter() - t0
            both, labels = batch_to_device(tokens, labels, dev)
            values, drop_feats, drop_pos = trainer.step(both[:settings.batch_size], both[settings.batch_size:],
                                                        labels)
            if not math.isfinite(values["total"]):
                raise StageError(f"train-head: the loss became {values['total']} at step {step}; try head.amp=false "
                                 f"or a smaller head.lr (now {settings.lr})")
            for key, curve in curves.items():
                curve.append(values[key])
            if (step - 1) % diag_every == 0:
                correlations.add(drop_feats, drop_pos, settings, diag_noise)
            cluster_miou = selector.after_step(step, head, probes)
            if cluster_miou is not None:
                bar.set_postfix(cluster_miou=f"{cluster_miou:.1f}")
            bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - start

    chosen = selector.restore_chosen(head, probes)
    head.eval()
    diagnostics = {
        "steps": list(range(1, settings.steps + 1)),
        "curves": curves,
        "validation": selector.validations,
        "feature_correlation": correlations.summary(),
        "chosen_step": chosen,
        "selection": settings.selection,
    }
    stats = {"wall_s": round(elapsed, 3), "steps_per_s": round(settings.steps / elapsed, 3),
             "samples_per_s": round(settings.steps * settings.batch_size / elapsed, 3),
             "data_wait_fraction": round(wait_s / elapsed, 4),
             "amp": str(trainer.amp_dtype).removeprefix("torch.") if trainer.use_amp else None}
    return TrainResult(head.cpu(), probes.linear.cpu(), probes.cluster.cpu(), chosen, diagnostics, stats, seeds)


def _check_inputs(train: TokenStore, nns: np.ndarray, settings: TrainSettings, val: TokenStore | None) -> None:
    """The kNN table, batch size and val store fit the train store and the settings (one clear error)."""
    n = train.n
    if nns.ndim != 2 or nns.shape[0] != n:
        raise InputError(f"kNN table has shape {list(nns.shape)}, expected [{n}, K] for the {n} train samples")
    if nns.shape[1] <= settings.num_neighbors:
        raise ConfigError(f"head.num_neighbors={settings.num_neighbors} needs kNN tables with more than "
                          f"{settings.num_neighbors} columns (column 0 is the sample itself); this one has "
                          f"{nns.shape[1]} (raise knn.k)")
    if nns.size and (nns.min() < 0 or nns.max() >= n):
        raise InputError(f"kNN table holds indices outside [0, {n})")
    if settings.batch_size > n:
        raise ConfigError(f"head.batch_size={settings.batch_size} exceeds the {n} train samples")
    if settings.val_every > 0:
        if val is None:
            raise InputError("validation (head.val_every > 0) needs the val token store")
        if val.dim != train.dim:
            raise InputError(f"val tokens have width {val.dim} but train tokens {train.dim}")


class _Selector:
    """Validation every ``val_every`` steps (and after the last) and model selection: with
    ``best_val_cluster_miou`` a snapshot of the best head and probes by val cluster mIoU."""

    def __init__(self, settings: TrainSettings, val: TokenStore | None, n_classes: int, dev: torch.device,
                 val_batch_size: int) -> None:
        self.settings, self.val, self.n_classes, self.dev, self.val_batch_size = (
            settings, val, n_classes, dev, val_batch_size)
        self.validations: list[dict[str, Any]] = []
        self.best: tuple[float, int, list[dict[str, torch.Tensor]]] | None = None

    def after_step(self, step: int, head: StegoHead, probes: Any) -> float | None:
        """Validate when due; returns the val cluster mIoU then, else None."""
        s = self.settings
        if not s.val_every or (step % s.val_every and step != s.steps):
            return None
        head.eval()
        metrics = validate(head, probes.linear, probes.cluster, self.val, self.n_classes, self.dev,
                           self.val_batch_size)
        self.validations.append({"step": step, **metrics})
        score = metrics["cluster"]["miou"]
        score = score if math.isfinite(score) else -math.inf
        if s.selection == "best_val_cluster_miou" and (self.best is None or score > self.best[0]):
            self.best = (score, step, _snapshot(head, probes.linear, probes.cluster))
        return float(metrics["cluster"]["miou"])

    def restore_chosen(self, head: StegoHead, probes: Any) -> int:
        """Load the chosen step's state into the modules (the last step's is already there); its step."""
        if self.best is None:
            return self.settings.steps
        _, chosen, states = self.best
        for module, state in zip((head, probes.linear, probes.cluster), states):
            module.load_state_dict(state)
        return chosen


# --------------------------------------------------------------------------------------------------
# diagnostics figures
# --------------------------------------------------------------------------------------------------


def plot_diagnostics(diagnostics: Mapping[str, Any], out: Path, title: str = "") -> list[str]:
    """Write ``loss_curves.png`` (losses, code correlations, val mIoU) and ``feature_correlations.png``
    (histogram of ``fd`` per partner kind with its shift marked) into ``out``, each under ``title`` (the
    head they show, e.g. its dim and seed); returns the file names."""
    from matplotlib.figure import Figure

    from stages.evaluation.figures import DPI

    steps = diagnostics["steps"]
    curves = diagnostics["curves"]
    fig = Figure(figsize=(14, 3.6), layout="constrained")
    axes = fig.subplots(1, 4)
    groups = (("correlation losses", "loss (parts unweighted; total weighted)", (*PARTS, "total")),
              ("probe losses", "loss (linear: CE; cluster: −mean cos)", ("linear", "cluster")),
              ("mean code correlation", "mean code correlation cd", ("cd_intra", "cd_inter", "cd_neg")))
    for ax, (panel_title, ylabel, keys) in zip(axes, groups):
        for key in keys:
            ys = [np.nan if v is None else v for v in curves[key]]
            ax.plot(steps, ys, label=key, linewidth=0.8)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    ax = axes[3]
    val = diagnostics["validation"]
    for probe in ("linear", "cluster"):
        ax.plot([v["step"] for v in val], [v[probe]["miou"] for v in val], marker=".", label=f"{probe} mIoU")
    ax.axvline(diagnostics["chosen_step"], color="grey", linestyle=":", label="chosen step")
    ax.set_title("validation")
    ax.set_xlabel("step")
    ax.set_ylabel("val mIoU (%)")
    ax.legend(fontsize=7)
    if title:
        fig.suptitle(f"{title}: training curves", fontsize=11)
    fig.savefig(out / "loss_curves.png", dpi=DPI)

    fig = Figure(figsize=(12, 3.4), layout="constrained")
    for ax, part in zip(fig.subplots(1, 3), PARTS):
        info = diagnostics["feature_correlation"][part]
        edges = np.asarray(info["edges"])
        ax.stairs(info["counts"], edges, fill=True, alpha=0.6)
        ax.axvline(info["shift"], color="red", label=f"shift {info['shift']:.3g}")
        if info["mean"] is not None:
            ax.axvline(info["mean"], color="black", linestyle="--", label=f"mean {info['mean']:.3g}")
        frac = info["fraction_above_shift"]
        ax.set_title(f"{part}: {100 * frac:.1f}% above shift" if frac is not None else part)
        ax.set_xlabel("feature correlation (as in the loss)")
        ax.set_ylabel("feature pairs (count)")
        ax.legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(f"{title}: feature correlations of the sampled pairs", fontsize=11)
    fig.savefig(out / "feature_correlations.png", dpi=DPI)
    return ["loss_curves.png", "feature_correlations.png"]
