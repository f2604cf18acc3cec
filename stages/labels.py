"""The label fields of stegopipe's stages (see :mod:`pipeline.labels`): dataset, split, backbone,
resolution, k, method, dim, seed, CRF, experiment, in that order; how each reads in a label's text."""
from __future__ import annotations

import re
from typing import Any

from pipeline.labels import register_label, register_label_format, register_replicate
from pipeline.results import register_result_names
from stages.projections.methods import METHODS, method_names
_VIT = re.compile(r"vit_(tiny|small|base|large|giant)_patch(\d+)")


def backbone_short(name: Any) -> str:
    """``vit_small_patch8_224.dino`` → ``ViT-S/8`` (other names as they are, without a ``.tag``)."""
    text = str(name)
    found = _VIT.match(text)
    return f"ViT-{found.group(1)[0].upper()}/{found.group(2)}" if found else text.split(".", 1)[0]


def _backbone(params: dict[str, Any]) -> str | None:
    name = params.get("backbone.name", params.get("backbone"))  # the params layout before and after issue 18
    if not name:
        return None
    short = backbone_short(name)
    return f"{short} random" if str(params.get("weights_tag", "")).startswith("random") else short


def _res(params: dict[str, Any]) -> Any:
    return params.get("extract.train_res", params.get("extract.val_res", params.get("res")))


# Each path first as the params name it has now, then as it was in manifests written before (kept readable)
register_label("synthesize", {"dataset": lambda p: "synthetic", "split": lambda p: "train+val"}, local=("split",))
register_label("prepare", {"dataset": ("dataset.name", "dataset"), "split": "split"}, local=("split",))
register_label("extract", {"backbone": _backbone, "split": "split", "res": _res}, local=("split", "res"))
register_label("knn", {"k": ("knn.k", "k")}, local=("k",))
register_label("reduce", {"method": ("projection.method", "method"), "dim": ("projection.dim", "dim"),
                          "seed": ("projection.seed", "seed")})
register_label("train-head", {"method": lambda p: "stego", "dim": ("projection.dim", "head.dim", "dim"),
                              "seed": ("projection.seed", "seed")})
register_label("probe", {"method": "projection.method", "dim": "projection.dim", "seed": ("projection.seed", "seed")})
register_label("evaluate", {"method": "projection.method", "dim": "projection.dim", "seed": "projection.seed",
                            "crf": ("evaluate.crf", "crf")}, local=("crf",))
register_label("report", {"experiment": "experiment"})

register_label_format("dataset", str)
register_label_format("split", str)
register_label_format("backbone", str)
register_label_format("res", lambda v: f"{v}px")
register_label_format("method", lambda v: METHODS[v].label if v in METHODS else str(v),
                      cell=lambda v: METHODS[v].label if v in METHODS else str(v), order=method_names())
register_label_format("dim", lambda v: f"d={v}")
register_label_format("crf", lambda v: "CRF" if v else "", cell=lambda v: "on" if v else "off", order=(False, True))
register_label_format("experiment", str)
register_replicate("seed")

register_result_names({"linear": "linear", "cluster": "cluster", "linear_crf": "linear+CRF", "cluster_crf": "cluster+CRF"},
                      {"miou": "mIoU", "accuracy": "acc"})
