"""``extract`` stage: frozen DINO tokens of one split → a sharded Zarr ``tokens`` artifact.

Per sample (method.md §1.5): decode image and label through the prepared index's reader, resize the
shorter side to ``res`` (nearest) and center-crop, ImageNet-normalise (per batch, on the device: uint8
goes over the bus, the values are those of :func:`preprocess_image`); forward the frozen backbone
(:func:`stages.backbones.dino_features`, ``torch.inference_mode``, fp16 autocast on CUDA when
``extract.amp``); for val also the horizontally flipped image (its tokens are stored as computed,
evaluation flips them back) and the cropped uint8 image (for the CRF). Tokens go to
``<artifact>/tokens.zarr`` (layout: :mod:`stages.store`) one shard at a time.

Pipelined decode → forward → write: ``extract.loader_workers`` threads decode, resize and crop samples
ahead of the forward (:mod:`pipeline.prefetch`, bounded), the main thread runs the model in batches of
``extract.batch_size`` that never cross a shard boundary (so a shard's bytes do not depend on which
shards ran before it) and starts one copy of a shard's tokens back from the device without waiting
for it (:class:`HostCopy`), and writer threads write finished shards side by side (at most three in
flight; a failed write stops the run). A shard is marked done only after its data is written (markers
in shard order), so a run killed at any moment resumes with the missing shards and ends bit-identical
to an uninterrupted one (CPU). The manifest's ``throughput_img_s`` is samples ÷ ``extract_wall_s``, the
loop from the moment the backbone is loaded (its load, a fixed cost, is ``model_load_s``; on the Dask
path each worker's load falls inside the loop).

Scale-out (``extract.dask_shards=true``): through ``ctx.map_shards`` (when the stage runs inside a Dask
worker, a client exists or ``run.scheduler`` is set) each missing shard becomes an independent Dask task
(resources ``{"GPU": 1}`` on CUDA) that loads the backbone once per worker process and writes its shard;
the shard is marked done when its future completes. The store must then live on a filesystem the
workers share.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from pipeline.artifacts import ArtifactStore
from pipeline.config import register_section, setting
from pipeline.errors import ConfigError, InputError
from pipeline.lazy import lazy_module
from pipeline.params import Context, Derive, Exclude, Params, View
from pipeline.prefetch import prefetch
from pipeline.context import StageContext
from pipeline.planner import Request, Task
from pipeline.registry import Need, register_estimate, register_needs, register_stage
from stages.backbones import BACKBONES, POS_INTERP_MODES, PosInterp, dino_features, load_backbone, weights_tag
from stages.datasets.base import SPLITS, SampleRef
from stages.datasets.index import Index, load_index
from stages.datasets.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop,
    preprocess_image,
    preprocess_label,
    resize_shorter_nearest,
)

torch = lazy_module("torch")
token_store = lazy_module("stages.store")

_WRITES_IN_FLIGHT = 3
_WRITER_THREADS = 3  # shards are separate files: writes (encode + checksum) run side by side
_PREFETCH_BATCHES = 4
_MODEL_LOCK = threading.Lock()


@dataclass
class BackboneConfig:
    """The frozen backbone (``backbone.*``)."""

    name: str = setting("vit_small_patch8_224.dino", choices=lambda: tuple(BACKBONES))  # stages.backbones
    weights: str = setting("random", path=True)  # random | dino | timm | a checkpoint path
    weights_dir: str | None = setting("${oc.env:STEGOPIPE_WEIGHTS_DIR,null}", path=True)  # folder of the official DINO files
    seed: int = 0  # init seed of weights=random
    pos_interp: str = setting("dino", choices=POS_INTERP_MODES)  # DINOv2 always uses timm
    trust_checkpoint: bool = setting(False, runtime=True)  # allow checkpoints that need arbitrary unpickling


@dataclass
class ExtractConfig:
    """Token extraction (``extract.*``)."""

    train_res: int = setting(224, min=1)
    val_res: int = setting(320, min=1)
    shard_size: int = setting(64, min=1)  # samples per shard file (changes the layout, so part of the id)
    batch_size: int = setting(16, runtime=True, min=1)
    loader_workers: int = setting(2, runtime=True, min=0)  # decode/transform threads (0: on the main thread)
    amp: bool = True  # fp16 autocast on CUDA (no effect on CPU)
    flip_val: bool = True  # store tokens_flip (tokens of the flipped image) for val
    rgb_val: bool = True  # store the cropped uint8 image for val (CRF)
    dask_shards: bool = setting(False, runtime=True)  # shards as Dask tasks inside a Dask worker or with run.scheduler
    verify_files: bool = setting(True, runtime=True)  # check each image/label file against its sha256 in the index


register_section("backbone", BackboneConfig)
register_section("extract", ExtractConfig)


# --------------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------------


def _check(cfg: Any, args: Mapping[str, Any]) -> None:
    split = args["split"]
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    name = cfg.backbone.name
    patch, res = BACKBONES[name].patch, int(cfg.extract[f"{split}_res"])
    if res % patch:
        raise ConfigError(f"extract.{split}_res={res}: must be a multiple of the patch size {patch} of {name}")


def _split_is(split: str) -> Callable[[Any, Mapping[str, Any]], bool]:
    return lambda cfg, args: args["split"] == split


EXTRACT_PARAMS = Params(
    exclude=(
        Exclude(("extract.val_res", "extract.flip_val", "extract.rgb_val"), "the train split reads train_res "
                "and stores neither flipped tokens nor images", when=_split_is("train")),
        Exclude(("extract.train_res",), "the val split reads val_res", when=_split_is("val")),
        Exclude(("backbone.pos_interp",), "DINOv2 / timm models interpolate position embeddings their own way",
                when=lambda cfg, args: BACKBONES[cfg.backbone.name].family != "dino"),
        Exclude(("backbone.seed",), "only backbone.weights=random reads the seed",
                when=lambda cfg, args: cfg.backbone.weights != "random"),
        Exclude(("backbone.weights_dir",), "only backbone.weights=dino reads the folder",
                when=lambda cfg, args: cfg.backbone.weights != "dino"),
    ),
    derive=(Derive("weights_tag", lambda cfg, args: weights_tag(cfg.backbone),
                   replaces=("backbone.weights", "backbone.weights_dir", "backbone.seed"), uses=("backbone.name",)),),
    check=_check,
    contexts=(Context(args={"split": "train"}), Context(args={"split": "val"}),
              Context(("backbone.weights=dino", "backbone.weights_dir={weights}"), {"split": "train"}),
              Context(("backbone.name=vit_small_patch14_dinov2.lvd142m", "extract.val_res=322"), {"split": "val"})))


def settings_of(cfg: Any, split: str) -> dict[str, Any]:
    """What shapes the tokens of ``split`` under the extract config view ``cfg``: res, flip, rgb,
    position-embedding mode."""
    return {"res": int(cfg.extract[f"{split}_res"]), "flip": split == "val" and bool(cfg.extract.flip_val),
            "rgb": split == "val" and bool(cfg.extract.rgb_val),
            "pos_interp": cfg.backbone.get("pos_interp", "timm")}


def extract_inputs(cfg: Any, args: Mapping[str, Any]) -> dict[str, Request]:
    return {"index": Request("prepare", cfg, {"split": args["split"]})}


@lru_cache(maxsize=16)
def _listed_samples(name: str, root: str, split: str, options: tuple[tuple[str, Any], ...]) -> int | None:
    """Samples the dataset reader lists for ``split`` under ``root`` (None: it cannot list them)."""
    from stages.datasets.registry import get_reader

    try:
        return len(get_reader(name, root, **dict(options)).list_samples(split))
    except (InputError, ConfigError, OSError):
        return None


def extract_estimate(task: Task, store: ArtifactStore) -> int | None:
    """Bytes of the token arrays, N × h × w × D float16 (twice with tokens_flip): N from the index when it
    exists, else from the synthetic dataset's config or what the reader lists on disk (before prepare ran);
    None when N is not known yet."""
    from stages.datasets.registry import reader_options

    split, dataset, cfg = task.args["split"], task.cfg["dataset"], task.cfg
    index = task.inputs.get("index")
    if index and store.exists(index):
        n = store.manifest(index).get("counts", {}).get("samples")
    elif dataset["name"] == "synthetic":
        n = dataset["synthetic"][f"n_{split}"] * (5 if split == "train" and dataset["train_crop"] == "five" else 1)
    elif dataset.get("root"):
        options = reader_options(View(dataset), split)
        n = _listed_samples(dataset["name"], str(dataset["root"]), split,
                            tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(options.items())))
    else:
        return None
    if n is None:
        return None
    spec, settings = BACKBONES[cfg["backbone"]["name"]], settings_of(View(cfg), split)
    grid = settings["res"] // spec.patch
    return int(n) * grid * grid * spec.embed_dim * 2 * (2 if settings["flip"] else 1)


register_estimate("extract", extract_estimate)


def extract_needs(cfg: Any, args: Mapping[str, Any]) -> list[Need]:
    """The weights file of ``backbone.weights=dino`` or a checkpoint path (none for random or timm)."""
    backbone = cfg.backbone
    spec = BACKBONES.get(backbone.name)
    if backbone.weights == "dino" and backbone.weights_dir and spec is not None and spec.dino_file:
        path = Path(backbone.weights_dir).expanduser().absolute() / spec.dino_file
    elif backbone.weights not in ("random", "timm", "dino"):
        path = Path(backbone.weights).expanduser().absolute()
    else:
        return []
    return [Need("weights", str(path), "backbone.weights_dir (WEIGHTS_DIR=DIR for make, or STEGOPIPE_WEIGHTS_DIR) "
                 "or backbone.weights=PATH", path.is_file())]


register_needs("extract", extract_needs)


# --------------------------------------------------------------------------------------------------
# per-sample transform and per-shard forward (shared by the local and the Dask path)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One decoded sample at the extraction resolution: resized and cropped image ``[R,R,3]`` uint8 (the
    ImageNet normalisation runs on the device, per batch: :func:`normalise_images`), label ``[R,R]`` int16."""

    rgb: np.ndarray
    label: np.ndarray


def load_sample(index: Index, ref: SampleRef, res: int) -> Sample:
    """Decode ``ref`` through the index's reader; resize (shorter side, nearest) and center-crop to ``res``."""
    image = index.reader.load_image(ref)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"sample {ref.id} ({ref.image}): the reader gave a {image.dtype} image of shape "
                         f"{list(image.shape)}, expected uint8 [H, W, 3]")
    crop = center_crop(resize_shorter_nearest(image, res), res)
    label = preprocess_label(index.reader.load_label(ref), res).astype(np.int16, copy=False)
    return Sample(crop, label)


@cache
def _normalised_values() -> np.ndarray:
    """float32 ``[3, 256]``: the normalised value of each uint8 value per channel, taken from
    :func:`preprocess_image` itself (an image whose row ``v`` holds the value ``v``)."""
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 256, 3)).copy()
    return np.ascontiguousarray(preprocess_image(ramp, 256)[:, :, 0])


@cache
def _normalised_table(device: torch.device) -> torch.Tensor:
    """:func:`_normalised_values` on ``device``, copied there once (a per-batch copy would sync the host)."""
    return torch.from_numpy(_normalised_values()).to(device)


def normalise_images(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B,R,R,3]`` → float32 ``[B,3,R,R]`` on the same device, bit-identical to
    :func:`preprocess_image` on each image (a per-channel table lookup of its values)."""
    table = _normalised_table(rgb.device)
    index = rgb.long()
    return torch.stack([table[c][index[..., c]] for c in range(3)], dim=1)


def forward_tokens(model: torch.nn.Module, images: torch.Tensor, *, amp: bool) -> torch.Tensor:
    """``[B,3,H,W]`` images (on the model's device) → float16 tokens ``[B,h,w,D]`` on the same device.

    ``torch.inference_mode``; fp16 autocast when ``amp`` and the images are on CUDA. No host sync: the
    caller copies a whole shard back at once, without blocking, so the device queue stays full.
    """
    on_cuda = images.device.type == "cuda"
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=torch.float16, enabled=amp and on_cuda):
        feats = dino_features(model, images)
    return feats.permute(0, 2, 3, 1).to(torch.float16)


@dataclass(frozen=True)
class ModelSettings:
    """Which backbone to load, where, and the weights tag it must report."""

    name: str
    weights: str
    weights_dir: str | None
    seed: int
    pos_interp: str
    trust_checkpoint: bool
    weights_tag: str
    device: str


@dataclass(frozen=True)
class Settings:
    """Plain, picklable settings of one extraction (travel to Dask workers)."""

    index_path: str
    res: int
    flip: bool
    rgb: bool
    amp: bool
    batch_size: int
    loader_workers: int
    model: ModelSettings
    verify_files: bool = True


class HostCopy:
    """A device tensor being copied into pinned host memory without blocking the host; :meth:`numpy`
    waits for the copy. Lets the forward of the next shard start while this one travels back."""

    def __init__(self, device_tensor: torch.Tensor) -> None:
        self._host = torch.empty(device_tensor.shape, dtype=device_tensor.dtype, pin_memory=True)
        self._host.copy_(device_tensor, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def numpy(self) -> np.ndarray:
        self._done.synchronize()
        return self._host.numpy()


def _to_host(t: torch.Tensor) -> np.ndarray | HostCopy:
    return HostCopy(t) if t.device.type == "cuda" else t.numpy()


def write_computed(store: str | Path, shard: int, arrays: Mapping[str, np.ndarray | HostCopy], ids: list[str]) -> None:
    """:func:`stages.store.write_shard` of :func:`compute_shard`'s arrays (waits for their device copies)."""
    token_store.write_shard(store, shard, **{k: v.numpy() if isinstance(v, HostCopy) else v for k, v in arrays.items()}, ids=ids)


def compute_shard(model: torch.nn.Module, samples: list[Sample],
                  settings: Settings) -> dict[str, np.ndarray | HostCopy]:
    """Arrays of one shard for :func:`write_computed` (ids excluded); on CUDA the tokens are still being
    copied back when it returns (:class:`HostCopy`).

    The model runs on batches of ``settings.batch_size`` counted from the shard's first sample.
    """
    tokens, flipped = [], []
    device = torch.device(settings.model.device)
    for start in range(0, len(samples), settings.batch_size):
        rgb = torch.from_numpy(np.stack([s.rgb for s in samples[start:start + settings.batch_size]]))
        if device.type == "cuda":
            rgb = rgb.pin_memory().to(device, non_blocking=True)
        images = normalise_images(rgb)
        tokens.append(forward_tokens(model, images, amp=settings.amp))
        if settings.flip:
            flipped.append(forward_tokens(model, images.flip(-1), amp=settings.amp))
    out = {"tokens": _to_host(torch.cat(tokens)), "labels": np.stack([s.label for s in samples])}
    if settings.flip:
        out["tokens_flip"] = _to_host(torch.cat(flipped))
    if settings.rgb:
        out["rgb"] = np.stack([s.rgb for s in samples])
    return out


def load_model(m: ModelSettings) -> torch.nn.Module:
    """The frozen backbone on ``m.device``; InputError if its weights are not the ones planned (tag).

    Serialised per process: the seeded random init goes through torch's global RNG, so two threads
    building models at once (Dask shard tasks) would get different weights.
    """
    with _MODEL_LOCK:
        model, info = load_backbone(m.name, m.weights, weights_dir=m.weights_dir, seed=m.seed,
                                    trust_checkpoint=m.trust_checkpoint, pos_interp=cast(PosInterp, m.pos_interp))
    if info.weights_tag != m.weights_tag:
        raise InputError(f"backbone weights {m.weights} changed since the run was planned: planned "
                         f"{m.weights_tag}, loaded {info.weights_tag}; re-run extract")
    return model.to(m.device)


@lru_cache(maxsize=1)
def _worker_model(m: ModelSettings) -> torch.nn.Module:
    """The backbone of a Dask worker process, loaded once (per backbone settings)."""
    return load_model(m)


@cache
def _worker_index(path: str, verify_files: bool) -> Index:
    return load_index(Path(path), verify_files=verify_files)


def extract_shard_task(store_path: str, shard: int, start: int, stop: int, settings: Settings) -> int:
    """Dask task: compute and write shard ``shard`` (samples ``[start, stop)``); returns its sample count."""
    index = _worker_index(settings.index_path, settings.verify_files)
    model = _worker_model(settings.model)
    refs = index.samples[start:stop]
    with prefetch(lambda ref: load_sample(index, ref, settings.res), refs, workers=settings.loader_workers,
                  depth=max(1, 2 * settings.loader_workers), name="extract-load") as loaded:
        samples = list(loaded)
    write_computed(store_path, shard, compute_shard(model, samples, settings), [r.id for r in refs])
    return stop - start


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------


def _open_or_create_store(out: Path, layout: dict[str, Any], attrs: dict[str, Any]) -> Path:
    """The staging store: reopened when an interrupted run left one, else created atomically."""
    path = token_store.TokensArtifact(out).store_path
    for stale in out.glob(f"{path.name}.partial-*"):
        shutil.rmtree(stale)
    if path.exists():
        store = token_store.open_token_store(path)
        found = {"n": store.n, "grid": store.grid, "dim": store.dim, "label_hw": store.label_hw,
                 "shard_size": store.shard_size, "with_rgb": store.has_rgb, "with_flip": store.has_flip}
        if found != layout or store.attrs != attrs:
            raise InputError(f"{path}: an interrupted run left a token store with another layout or attributes "
                             f"({found}, expected {layout}); delete the staging folder {out} and re-run")
        return path
    partial = out / f"{path.name}.partial-{os.getpid()}"
    token_store.create_token_store(partial, attrs=attrs, **layout)
    os.replace(partial, path)
    return path


def _run_local(ctx: StageContext, model: torch.nn.Module, store: Path, index: Index, todo: list[tuple[int, str]],
               ranges: list[tuple[int, int]], settings: Settings, bar: tqdm) -> None:
    shard_of = {s: key for s, key in todo}

    def work() -> Iterator[tuple[int, int]]:
        for shard, _ in todo:
            a, b = ranges[shard]
            yield from ((shard, i) for i in range(a, b))

    def load(item: tuple[int, int]) -> tuple[int, Sample]:
        return item[0], load_sample(index, index.samples[item[1]], settings.res)

    samples = prefetch(load, work(), workers=settings.loader_workers, depth=_PREFETCH_BATCHES * settings.batch_size,
                       name="extract-load")
    in_flight: deque[tuple[str, Future[None]]] = deque()

    def settle(limit: int) -> None:
        """Mark written shards done, in shard order: wait while more than ``limit`` are in flight, and
        take any finished ones at the head (their markers and errors come without delay)."""
        while in_flight and (len(in_flight) > limit or in_flight[0][1].done()):
            key, future = in_flight.popleft()
            future.result()
            ctx.shard_finished(key)

    with samples as loaded, ThreadPoolExecutor(_WRITER_THREADS, thread_name_prefix="extract-write") as writer:
        buffer: list[Sample] = []
        for shard, sample in loaded:
            buffer.append(sample)
            a, b = ranges[shard]
            if len(buffer) < b - a:
                continue
            arrays = compute_shard(model, buffer, settings)
            ids = [ref.id for ref in index.samples[a:b]]
            in_flight.append((shard_of[shard], writer.submit(write_computed, store, shard, arrays, ids)))
            bar.update(b - a)
            buffer = []
            settle(_WRITES_IN_FLIGHT)
        settle(0)


@register_stage("extract", kind="tokens", sections=("backbone", "extract"), params=EXTRACT_PARAMS, inputs=extract_inputs,
                args={"split": "train"}, resumable=True, make_target="make extract",
                resources={"GPU": 1})
def extract(ctx: StageContext) -> None:
    """Frozen-backbone tokens of one split into a sharded Zarr store."""
    backbone, runtime, tag = ctx.config.backbone, ctx.runtime, ctx.params["weights_tag"]
    p = settings_of(ctx.config, ctx.args["split"])
    index_path = ctx.input("index").path
    index = load_index(index_path, verify_files=bool(runtime.extract.verify_files))
    spec = BACKBONES[backbone.name]
    settings = Settings(
        index_path=str(index_path), res=p["res"], flip=p["flip"], rgb=p["rgb"], amp=bool(ctx.config.extract.amp),
        batch_size=int(runtime.extract.batch_size), loader_workers=int(runtime.extract.loader_workers),
        model=ModelSettings(name=backbone.name, weights=str(backbone.weights), weights_dir=backbone.get("weights_dir"),
                            seed=int(backbone.get("seed", 0)), pos_interp=p["pos_interp"],
                            trust_checkpoint=bool(runtime.backbone.trust_checkpoint), weights_tag=tag,
                            device=ctx.device),
        verify_files=bool(runtime.extract.verify_files),
    )
    grid = (p["res"] // spec.patch, p["res"] // spec.patch)
    attrs = {"dataset": index.dataset, "split": index.split, "n_classes": index.n_classes,
             "class_names": list(index.class_names), "backbone": backbone.name, "weights_tag": tag,
             "patch": spec.patch, "pos_interp": p["pos_interp"], "res": p["res"],
             "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                               "resize": "shorter side, nearest", "crop": "center"}}
    layout = {"n": len(index), "grid": grid, "dim": spec.embed_dim, "label_hw": (p["res"], p["res"]),
              "shard_size": int(ctx.config.extract.shard_size), "with_rgb": p["rgb"], "with_flip": p["flip"]}
    store = _open_or_create_store(ctx.out, layout, attrs)
    ranges = token_store.shard_ranges(len(index), int(ctx.config.extract.shard_size))
    keys = [f"{s:06d}" for s in range(len(ranges))]
    todo = [(int(key), key) for key in ctx.shards(keys)]
    n_todo = sum(ranges[s][1] - ranges[s][0] for s, _ in todo)

    jobs = {key: (str(store), shard, *ranges[shard], settings) for shard, key in todo}
    with tqdm(total=n_todo, unit="img", desc=f"extract {index.dataset}/{index.split}@{p['res']}",
              leave=False) as bar:

        clock = {"start": time.perf_counter(), "model_load_s": 0.0}

        def run_here(keys: list[str]) -> None:
            model = load_model(settings.model)
            now = time.perf_counter()  # the loop's clock starts with the model loaded: a fixed cost, not per image
            clock["model_load_s"], clock["start"] = now - clock["start"], now
            _run_local(ctx, model, store, index, [(int(k), k) for k in keys], ranges, settings, bar)

        for _, n in ctx.map_shards(extract_shard_task, jobs, dask=bool(runtime.extract.dask_shards),
                                   resources={"GPU": 1}, local=run_here):
            bar.update(n)
    wall = time.perf_counter() - clock["start"]
    executor = ctx.shard_executor
    ctx.record(
        counts={"samples": len(index), "shards": len(ranges), "samples_computed": n_todo},
        throughput_img_s=round(n_todo / wall, 2) if n_todo and wall > 0 else None,
        extract_wall_s=round(wall, 3),
        model_load_s=round(clock["model_load_s"], 3),
        executor=executor,
        backbone={"name": backbone.name, "weights_tag": tag, "patch": spec.patch,
                  "embed_dim": spec.embed_dim, "pos_interp": p["pos_interp"]},
        grid=list(grid),
        runtime={"batch_size": settings.batch_size, "loader_workers": settings.loader_workers,
                 "device": ctx.device},
    )
