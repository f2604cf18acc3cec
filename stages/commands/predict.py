"""``stegopipe predict``: segment new images with a trained (or imported) STEGO head.

For each image: fresh backbone features (the backbone the head was trained on, read from the head's
lineage: head manifest → its ``tokens`` input → backbone name, weights tag, pos-embed mode), the head's
code upsampled to the output size, the linear and cluster probes, optionally the dense CRF. Written to
``--out`` per image ``<stem>``:

* ``<stem>.cluster.png`` / ``<stem>.linear.png``: label maps, pixel value = id (8-bit palette PNGs that
  viewers show in the panels' colours; 16-bit grey when ids exceed 254; 255 / 65535 = unmatched). Cluster ids are mapped to classes by the Hungarian assignment of an evaluation
  (``--eval``), else they are the raw cluster ids.
* ``<stem>.cluster.overlay.png`` / ``<stem>.linear.overlay.png``: the image blended with the palette of
  :func:`stages.evaluation.figures.palette` (pixel-exact, the image's size).
* ``<stem>.panels.png``: a figure for readers: titled columns (image, linear probe, cluster probe, "+ CRF"
  with ``--crf``) of the overlays and a colour → class legend (clusters named ``cluster k`` without
  ``--eval``).
* ``predictions.json``: what was used (head, probes, eval, backbone, resolution, CRF and its pixel mode)
  and the files written.

Geometry: by default the evaluation transform (shorter side → ``res``, nearest; centre crop ``res``²) for
the network, and the outputs are that centre square at the image's own resolution (capped at
:data:`MAX_OUTPUT_SIDE`, never below ``res``); with ``--full`` the whole image is resized (nearest) so that the shorter side
is ``res`` and both sides are multiples of the patch, and the outputs have the original image size.

CRF: :func:`stages.evaluation.crf.dense_crf` on the reference's pixels (``evaluate``'s default), recorded in
``predictions.json``.

Weights: the backbone weights come from the current config (``backbone.weights``, ``backbone.weights_dir``
/ ``STEGOPIPE_WEIGHTS_DIR``, ``--preset``, ``--set``) and must give the weights tag recorded by the
head's tokens artifact. An imported STEGO checkpoint records no tag (only its ViT variant and patch);
then any non-random weights are accepted.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.artifacts import ArtifactStore, stage_of, write_json_atomic
from pipeline.cli import register_command
from pipeline.config import load_config
from pipeline.errors import ArtifactError, ConfigError, InputError
from pipeline.paths import LocalPath
from pipeline.environment import resolve_device
from stages.artifacts import EvalArtifact, HeadArtifact, ProbesArtifact
from stages.backbones import BACKBONES, dino_features, load_backbone, weights_tag
from stages.evaluation.crf import dense_crf
from stages.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, center_crop, resize_nearest, resize_shorter_nearest
from stages.evaluation.figures import IGNORE_LABEL, backbone_label, colorize, palette, save_panels
from stages.evaluation.metrics import map_clusters
from stages.evaluation.probes import Probes, load_probes, predict_batch, upsample_code
from stages.projections import BaseProjection
from stages.projections.select import open_projection
from stages.store import TokensArtifact

__all__ = ["BackboneRecord", "PredictResult", "backbone_record", "check_weights", "predict_image", "prepare_image",
           "overlay", "panel_legend", "resolve_probes", "write_label_png", "predict_cmd"]

DEFAULT_RES = 320  # the evaluation resolution of every paper preset
OVERLAY_ALPHA = 0.5
MAX_OUTPUT_SIDE = 1024  # default geometry: outputs are the centre square at most this many pixels wide
CRF_PIXELS = "reference"  # the image the CRF sees: the reference's pixels, as evaluate's default
HEAD_STAGE = "train-head"
_STEGO_VARIANTS = {"vit_small": "small", "vit_base": "base"}


@dataclass(frozen=True)
class BackboneRecord:
    """The backbone a head reads, as recorded in its lineage. ``weights_tag`` None: not recorded (an
    imported checkpoint); ``val_res`` None: the head has no val tokens input."""

    name: str
    weights_tag: str | None
    pos_interp: str
    val_res: int | None

    @property
    def patch(self) -> int:
        return BACKBONES[self.name].patch

    @property
    def embed_dim(self) -> int:
        return BACKBONES[self.name].embed_dim


@dataclass(frozen=True)
class PredictResult:
    """Label maps of one image: ``linear`` and ``cluster`` int64 ``[H, W]`` (cluster: class ids when an
    assignment was given, else cluster ids; -1 = unmatched), and the uint8 image they belong to."""

    linear: np.ndarray
    cluster: np.ndarray
    rgb: np.ndarray


# --------------------------------------------------------------------------------------------------
# lineage: which backbone, which probes, which cluster assignment
# --------------------------------------------------------------------------------------------------


def resolve_artifact(store: ArtifactStore, ref: str, stage: str | tuple[str, ...], option: str) -> str:
    """Full id of ``ref`` (id or unique prefix) in ``store``; InputError unless it is an artifact of ``stage``."""
    artifact = store.resolve(ref)
    stages = (stage,) if isinstance(stage, str) else stage
    if stage_of(artifact) not in stages:
        raise InputError(f"{option} {ref}: {artifact} is a {stage_of(artifact)} artifact, expected "
                         f"{' or '.join(stages)} (see `stegopipe ls {stages[0]}`)")
    return artifact


def backbone_record(store: ArtifactStore, head_id: str) -> BackboneRecord:
    """The backbone of head ``head_id``: from its ``tokens`` input's params (trained heads) or the
    checkpoint's ViT variant and patch recorded in the manifest (imported heads)."""
    head = HeadArtifact.of(store, head_id)
    inputs = head.lineage
    if "tokens" not in inputs:
        return _imported_record(head.manifest, head_id)
    tokens_id = inputs["tokens"]
    if not store.exists(tokens_id):
        raise ArtifactError(f"head {head_id}: its tokens artifact {tokens_id} is gone (deleted by gc?); it "
                            "records the backbone; rebuild it with `stegopipe run extract split=train ...`")
    params = _tokens_params(TokensArtifact.of(store, tokens_id).params)
    if params["pos_interp"] is None and params["backbone"] in BACKBONES and BACKBONES[params["backbone"]].family != "dino":
        params["pos_interp"] = "timm"  # extract leaves backbone.pos_interp out for DINOv2: timm's own mode
    missing = [k for k in ("backbone", "weights_tag", "pos_interp") if params.get(k) is None]
    if missing:
        raise ArtifactError(f"tokens artifact {tokens_id}: manifest params lack {missing}")
    if params["backbone"] not in BACKBONES:
        raise ArtifactError(f"tokens artifact {tokens_id}: unknown backbone {params['backbone']!r}")
    val_res = None
    if "val" in inputs and store.exists(inputs["val"]):
        val_res = _tokens_params(TokensArtifact.of(store, inputs["val"]).params).get("res")
    return BackboneRecord(params["backbone"], params["weights_tag"], params["pos_interp"],
                          int(val_res) if val_res else None)


# A tokens artifact's params as predict reads them: name -> its params keys, now and in older manifests
_TOKENS_PARAMS = {"backbone": ("backbone.name", "backbone"), "weights_tag": ("weights_tag",),
                  "pos_interp": ("backbone.pos_interp", "pos_interp"), "res": ("extract.val_res", "res")}


def _tokens_params(params: dict[str, Any]) -> dict[str, Any]:
    return {name: next((params[k] for k in keys if params.get(k) is not None), None)
            for name, keys in _TOKENS_PARAMS.items()}


def _imported_record(manifest: dict[str, Any], head_id: str) -> BackboneRecord:
    info = manifest.get("backbone") or {}
    variant, patch = _STEGO_VARIANTS.get(str(info.get("model_type"))), info.get("patch")
    name = f"vit_{variant}_patch{patch}_224.dino"
    if variant is None or name not in BACKBONES:
        raise ArtifactError(f"head {head_id}: has no tokens input and its manifest names backbone {info!r}; "
                            f"cannot tell which DINO backbone it reads (known: {sorted(BACKBONES)})")
    return BackboneRecord(name, None, "dino", None)


def check_weights(backbone_cfg: Any, record: BackboneRecord) -> str:
    """The weights tag ``backbone_cfg`` (``backbone.*``) gives for the recorded backbone; ConfigError
    when it differs from the recorded tag (or, for imported heads, when the weights are random)."""
    cfg = SimpleNamespace(name=record.name, weights=str(backbone_cfg.weights), seed=int(backbone_cfg.seed),
                          weights_dir=backbone_cfg.weights_dir)
    tag = weights_tag(cfg)
    if record.weights_tag is None:
        if tag.startswith("random"):
            raise ConfigError(f"backbone.weights={cfg.weights}: this head was imported from a STEGO checkpoint "
                              f"trained on official DINO features of {record.name}; set backbone.weights=dino "
                              "(with backbone.weights_dir / STEGOPIPE_WEIGHTS_DIR), timm or a checkpoint path")
        return tag
    if tag != record.weights_tag:
        hint = {"random": "backbone.weights=random backbone.seed=<k>", "dino": "backbone.weights=dino with "
                "backbone.weights_dir (or STEGOPIPE_WEIGHTS_DIR) holding the official file", "timm":
                "backbone.weights=timm", "file": "backbone.weights=<the checkpoint file>"}
        kind = re.split(r"[-:]", record.weights_tag, maxsplit=1)[0]
        raise ConfigError(f"backbone weights tag {tag} (backbone.weights={cfg.weights}) differs from "
                          f"{record.weights_tag}, the weights the head's features were extracted with; set "
                          f"{hint.get(kind, 'them')} (--set KEY=VALUE or --preset)")
    return tag


def resolve_probes(store: ArtifactStore, head_id: str, probes_ref: str | None,
                   eval_ref: str | None) -> tuple[Probes, str, np.ndarray | None]:
    """The probes to use, where they come from (an id, or ``<head id>/probes``), and the cluster → class
    assignment of the evaluation ``eval_ref`` (None without one).

    Default: the probes inside the head artifact; with ``--eval``, the probes that evaluation scored (its
    assignment belongs to them); ``--probes`` overrides (and must then be the evaluation's probes).
    """
    assignment, eval_probes = None, None
    if eval_ref is not None:
        eval_id = resolve_artifact(store, eval_ref, "evaluate", "--eval")
        evaluation = EvalArtifact.of(store, eval_id)
        protocol = evaluation.protocol
        try:
            assignment = np.asarray(evaluation.scores["cluster"]["assignment"], dtype=np.int64)
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{evaluation.path / EvalArtifact.METRICS}: no readable cluster assignment "
                                f"({exc})") from exc
        if (protocol.get("projection") or {}).get("id") != head_id:
            raise InputError(f"--eval {eval_ref}: evaluation {eval_id} scored projection "
                             f"{(protocol.get('projection') or {}).get('id')}, not head {head_id}")
        eval_probes = protocol.get("probe_id")
    if probes_ref is not None:
        probes_id = resolve_artifact(store, probes_ref, ("probe", HEAD_STAGE), "--probes")
    elif eval_probes is not None:
        probes_id = eval_probes
    else:
        probes_id = head_id
    if eval_probes is not None and probes_id != eval_probes:
        raise InputError(f"--probes {probes_ref}: the cluster assignment of --eval {eval_ref} belongs to the probes "
                         f"{eval_probes}; leave out --probes or evaluate these probes")
    if stage_of(probes_id) == "probe":
        probes_artifact = ProbesArtifact.of(store, probes_id)
        projection_input = probes_artifact.projection_id
        if projection_input != head_id:
            raise InputError(f"probes {probes_id} were trained on the codes of {projection_input or 'raw tokens'}, "
                             f"not of head {head_id}")
        directory = probes_artifact.probes_dir
    else:
        if probes_id != head_id:
            raise InputError(f"--probes {probes_ref}: {probes_id} holds the probes of another head than {head_id}")
        directory = HeadArtifact.of(store, head_id).probes_dir
    probes = load_probes(directory)
    if assignment is not None and len(assignment) != probes.n_clusters:
        raise ArtifactError(f"--eval {eval_ref}: assignment of {len(assignment)} clusters for a cluster probe of "
                            f"{probes.n_clusters}")
    return probes, probes_id if probes_id != head_id else f"{head_id}/probes", assignment


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


def load_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 ``[H, W, 3]`` RGB; InputError naming the file when it is not one."""
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)  # writable (the CRF needs it)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from exc


def prepare_image(rgb: np.ndarray, res: int, patch: int, *, full: bool) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` uint8 ``[H, W, 3]`` → (network input float32 ``[3, H', W']`` ImageNet-normalised, the uint8
    image the outputs belong to).

    Default: shorter side → ``res`` (nearest), centre crop ``res``² for the network; the outputs belong to
    the same centre square at the image's resolution (side ``max(res, min(shorter side, MAX_OUTPUT_SIDE))``).
    ``full``: shorter side → ``res``, longer side → the nearest multiple of ``patch`` to the proportional
    length (nearest resize, no crop); the outputs belong to the original image.
    """
    if res < patch or res % patch:
        raise ConfigError(f"--res {res}: must be a positive multiple of the backbone's patch size {patch}")
    if full:
        h, w = rgb.shape[:2]
        scale = res / min(h, w)
        size = [max(patch, int(round(side * scale / patch)) * patch) for side in (h, w)]
        net, shown = resize_nearest(rgb, size[0], size[1]), rgb
    else:
        side = max(res, min(min(rgb.shape[:2]), MAX_OUTPUT_SIDE))
        shown = center_crop(resize_shorter_nearest(rgb, side), side)
        net = shown if side == res else resize_nearest(shown, res, res)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    x = (net.transpose(2, 0, 1).astype(np.float32) / np.float32(255) - mean) / std
    return x, shown


def overlay(rgb: np.ndarray, ids: np.ndarray, colours: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``rgb`` uint8 ``[H, W, 3]`` blended with ``colorize(ids)`` (weight ``alpha``); pixels with ids
    outside the palette (-1: unmatched) keep the image."""
    colour = colorize(ids, colours).astype(np.float32)
    valid = ((ids >= 0) & (ids < len(colours) - 1))[..., None]
    blend = (1 - alpha) * rgb.astype(np.float32) + alpha * colour
    return np.where(valid, np.rint(blend), rgb).astype(np.uint8)


def panel_legend(linear: np.ndarray, cluster: np.ndarray, colours: np.ndarray, class_names: list[str] | None,
                 clusters_are_classes: bool) -> list[tuple[str, np.ndarray]]:
    """Colour → meaning of the ids shown (``colours``: :func:`stages.evaluation.figures.palette`, whose
    colour ``k`` is the same for any length): class ``k``'s name, or without a cluster assignment ``name / cluster k`` when
    both panels show ``k``; ids outside the palette (-1: unmatched) last."""
    n = len(colours) - 1

    def name(k: int) -> str:
        return class_names[k] if class_names is not None and k < len(class_names) else f"class {k}"

    in_linear = {int(v) for v in np.unique(linear)}
    in_cluster = {int(v) for v in np.unique(cluster)}
    items = []
    for k in sorted(v for v in in_linear | in_cluster if 0 <= v < n):
        if clusters_are_classes:
            label = name(k)
        else:
            label = " / ".join(([name(k)] if k in in_linear else []) + ([f"cluster {k}"] if k in in_cluster else []))
        items.append((label, colours[k]))
    if any(v < 0 or v >= n for v in in_linear | in_cluster):
        items.append((IGNORE_LABEL, colours[n]))
    return items


def write_label_png(path: Path, ids: np.ndarray, colours: np.ndarray | None = None) -> None:
    """Label map → PNG, pixel value = id: 8-bit when every id is < 255 (255 = unmatched), with ``colours``
    (:func:`stages.evaluation.figures.palette`: one per id, the last for unmatched) as its palette so that
    an image viewer shows the classes, not near-black ids; else 16-bit grey (65535 = unmatched)."""
    big = int(ids.max(initial=0)) >= 255
    fill = 65535 if big else 255
    data = np.where(ids < 0, fill, ids).astype(np.uint16 if big else np.uint8)
    image = Image.fromarray(data)
    if not big and colours is not None:
        table = np.zeros((256, 3), np.uint8)
        table[: len(colours) - 1] = colours[:-1][:255]
        table[255] = colours[-1]
        image = image.convert("P") if image.mode != "P" else image
        image.putpalette(table.reshape(-1).tolist())
    image.save(path)


# --------------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_image(model: torch.nn.Module, projection: BaseProjection, probes: Probes, x: np.ndarray,
                  rgb: np.ndarray, *, assignment: np.ndarray | None = None, crf: bool = False) -> PredictResult:
    """Labels of one image: backbone features of ``x [3, H', W']`` → head code → bilinear upsampling to
    ``rgb``'s size → probes (→ dense CRF on their unaries when ``crf``) → cluster ids mapped by
    ``assignment`` when given."""
    device = next(model.parameters()).device
    feats = dino_features(model, torch.from_numpy(x)[None].to(device))
    code = upsample_code(projection.transform_map(feats), tuple(rgb.shape[:2]))
    out = predict_batch(code, probes.linear.to(device), probes.cluster.to(device), unaries=crf)
    labels = {}
    for name in ("linear", "cluster"):
        if crf:
            q = dense_crf(rgb, out[f"{name}_unary"][0].cpu().numpy(), pixels=CRF_PIXELS)
            labels[name] = q.argmax(0).astype(np.int64)
        else:
            labels[name] = out[name][0].cpu().numpy().astype(np.int64)
    cluster = labels["cluster"] if assignment is None else map_clusters(labels["cluster"], assignment)
    return PredictResult(labels["linear"], cluster, rgb)


def _stems(paths: list[Path]) -> list[str]:
    """Output stems: file stems made unique with ``-1``, ``-2`` suffixes, in input order."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem) or "image"
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}-{count}")
    return stems


@register_command
@click.command("predict")
@click.argument("images", nargs=-1, required=True, type=LocalPath(path_type=Path))
@click.option("--head", "head_ref", required=True, help="train-head artifact (id or unique prefix).")
@click.option("--probes", "probes_ref", help="probe artifact (trained on this head's codes) whose probes to use "
              "(default: the probes inside the head, or those of --eval).")
@click.option("--eval", "eval_ref", help="evaluate artifact whose Hungarian assignment maps clusters to classes.")
@click.option("--out", "out_dir", type=LocalPath(file_okay=False, path_type=Path), default=Path("predictions"),
              show_default=True, help="Output folder.")
@click.option("--crf/--no-crf", default=False, show_default=True, help="Refine both predictions with the dense CRF.")
@click.option("--res", type=int, help="Shorter side fed to the backbone (default: the head's val resolution, "
              f"else {DEFAULT_RES}).")
@click.option("--full", is_flag=True, help="Predict on the whole image (no centre crop); outputs at its size.")
@click.option("--preset", "-p", help="Config preset for backbone.weights / weights_dir and run.root.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Config override, e.g. --set backbone.weights=dino (repeatable).")
def predict_cmd(images: tuple[Path, ...], head_ref: str, probes_ref: str | None, eval_ref: str | None,
                out_dir: Path, crf: bool, res: int | None, full: bool, preset: str | None,
                overrides: tuple[str, ...]) -> None:
    """Segment IMAGES with a STEGO head: label PNGs (linear and cluster probe) and colour overlays."""
    cfg = load_config(preset, list(overrides))
    store = ArtifactStore(cfg.run.root)
    head_id = resolve_artifact(store, head_ref, HEAD_STAGE, "--head")
    record = backbone_record(store, head_id)
    tag = check_weights(cfg.backbone, record)
    probes, probes_source, assignment = resolve_probes(store, head_id, probes_ref, eval_ref)
    projection = open_projection(store.path(head_id), record.embed_dim, None)
    if probes.dim != projection.dim:
        raise ArtifactError(f"probes {probes_source} read codes of dim {probes.dim}, "
                            f"head {head_id} writes {projection.dim}")
    res = int(res if res is not None else record.val_res or DEFAULT_RES)
    paths = [Path(p) for p in images]
    rgbs = [load_rgb(p) for p in paths]  # every file checked before the model is loaded
    model, info = load_backbone(record.name, str(cfg.backbone.weights), weights_dir=cfg.backbone.weights_dir,
                                seed=int(cfg.backbone.seed), trust_checkpoint=bool(cfg.backbone.trust_checkpoint),
                                pos_interp=record.pos_interp)  # type: ignore[arg-type]
    if info.weights_tag != tag:
        raise InputError(f"backbone weights changed while loading: expected {tag}, loaded {info.weights_tag}")
    model = model.to(resolve_device(cfg.run.device))
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = {"linear": palette(probes.n_classes),
               "cluster": palette(probes.n_classes if assignment is not None else probes.n_clusters)}
    widest = colours["linear"] if probes.n_classes >= len(colours["cluster"]) - 1 else colours["cluster"]
    suffix = " + CRF" if crf else ""
    maps = ("linear", "cluster") if probes.linear_trained else ("cluster",)
    if not probes.linear_trained:
        click.echo(f"warning: the linear probe of {probes_source} was never trained (no labelled pixel in its "
                   "train split), so only cluster maps are written", err=True)
    features = backbone_label(record.name, tag)
    caption = f"head {head_id}" + (f" on {features}" if features else "")
    written = []
    for path, stem, rgb in zip(paths, _stems(paths), rgbs):
        x, shown = prepare_image(rgb, res, record.patch, full=full)
        result = predict_image(model, projection, probes, x, shown, assignment=assignment, crf=crf)
        files = {}
        panels = [("image", shown)]
        for name in maps:
            ids = getattr(result, name)
            write_label_png(out_dir / f"{stem}.{name}.png", ids, colours[name])
            blended = overlay(shown, ids, colours[name])
            Image.fromarray(blended).save(out_dir / f"{stem}.{name}.overlay.png")
            panels.append((f"{name} probe{suffix}", blended))
            files[name] = f"{stem}.{name}.png"
            files[f"{name}_overlay"] = f"{stem}.{name}.overlay.png"
        legend = panel_legend(result.linear if "linear" in maps else np.empty(0, np.int64), result.cluster, widest,
                              probes.meta.get("class_names"),
                              assignment is not None)
        save_panels(out_dir / f"{stem}.panels.png", panels, legend, title=f"{path.name}: {caption}")
        files["panels"] = f"{stem}.panels.png"
        written.append({"image": str(path), "size": list(shown.shape[:2]), "input_size": list(x.shape[1:]),
                        "files": files})
        click.echo(str(out_dir / files["cluster"]))
    summary = {"head": head_id, "probes": probes_source, "eval": eval_ref and store.resolve(eval_ref),
               "cluster_ids": "classes" if assignment is not None else "clusters",
               "class_names": probes.meta.get("class_names"), "n_clusters": probes.n_clusters,
               "backbone": {**asdict(record), "weights_tag": tag}, "res": res, "full": full, "crf": crf,
               "crf_pixels": CRF_PIXELS if crf else None, "maps": list(maps),
               "images": written}
    write_json_atomic(out_dir / "predictions.json", summary)
    click.echo(f"{len(written)} images → {out_dir}/", err=True)
