"""Publication-style image panels: a fixed class palette, titled columns and a colour → class legend
(evaluation examples, ``predict`` summaries). Drawn on a bare matplotlib ``Figure`` (no pyplot state, safe
in worker threads)."""
from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import InputError

__all__ = ["DPI", "backbone_label", "class_legend", "colorize", "palette", "save_panels"]

DPI = 150
PANEL_INCHES = 2.4
IGNORE_LABEL = "ignore / unmatched"


def palette(n: int) -> np.ndarray:
    """A fixed palette: uint8 ``[n + 1, 3]``, row ``k`` the colour of class ``k``, the last row black
    (for ignore / unmatched, index -1). Colours are well-separated golden-ratio hues."""
    if n < 0:
        raise InputError(f"palette: n={n} must be >= 0")
    colours = []
    for k in range(n):
        hue = (k * 0.618033988749895) % 1.0
        sat, val = (0.75, 0.95) if k % 2 == 0 else (0.55, 0.75)
        i, f = int(hue * 6) % 6, hue * 6 - int(hue * 6)
        p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
        rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
        colours.append([round(255 * c) for c in rgb])
    return np.array(colours + [[0, 0, 0]], dtype=np.uint8).reshape(n + 1, 3)


def colorize(ids: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Integer ids ``[H, W]`` → uint8 RGB ``[H, W, 3]``; ids outside ``[0, len(colours) - 1)`` are black."""
    ids = np.asarray(ids)
    n = len(colours) - 1
    idx = np.where((ids >= 0) & (ids < n), ids, n)
    return colours[idx]


def class_legend(id_maps: Iterable[np.ndarray], colours: np.ndarray,
                 names: Sequence[str] | None) -> list[tuple[str, np.ndarray]]:
    """``(name, RGB uint8)`` of every id that occurs in ``id_maps``, in id order, with ``colours`` from
    :func:`palette` (last row: ignore/unmatched, listed last when any id falls outside
    the palette). ``names[k]`` names id ``k`` (``class k`` when missing)."""
    n = len(colours) - 1
    present: set[int] = set()
    for ids in id_maps:
        present |= {int(v) for v in np.unique(ids)}
    items = [(names[k] if names is not None and k < len(names) else f"class {k}", colours[k])
             for k in sorted(v for v in present if 0 <= v < n)]
    if any(v < 0 or v >= n for v in present):
        items.append((IGNORE_LABEL, colours[n]))
    return items


def save_panels(path: Path, panels: Sequence[tuple[str, np.ndarray]], legend: Sequence[tuple[str, np.ndarray]],
                title: str | None = None) -> None:
    """One row of uint8 RGB images ``[H, W, 3]`` titled ``panels[i][0]``, a colour legend below
    (``legend``: ``(label, RGB uint8)``), an optional suptitle; PNG at :data:`DPI` dpi."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    height, width = panels[0][1].shape[:2]
    ncol = max(1, min(len(legend), 2 * len(panels)))
    legend_rows = -(-len(legend) // ncol)
    panel_h = PANEL_INCHES * height / width
    fig_width = PANEL_INCHES * len(panels)
    # the title wrapped to the figure's width (about 0.6 em per character at 10 pt), never cut at its edges
    lines = textwrap.wrap(title, width=max(20, int(fig_width * 72 / (10 * 0.6))), break_on_hyphens=False) if title else []
    fig = Figure(figsize=(fig_width, panel_h + 0.35 + 0.22 * legend_rows + 0.2 * len(lines) + 0.1 * bool(lines)),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, image) in zip(axes, panels, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    if legend:
        handles = [Patch(facecolor=np.asarray(colour) / 255.0, edgecolor="0.3", label=label)
                   for label, colour in legend]
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False,
                   handlelength=1.2, columnspacing=1.2)
    if lines:
        fig.suptitle("\n".join(lines), fontsize=10)
    fig.savefig(path, dpi=DPI)


def backbone_label(name: str | None, weights_tag: str | None) -> str | None:
    """A reader's name for a backbone from its lineage (timm name and weights tag): the timm name without
    its pretrained-tag suffix, then the weights, e.g. ``vit_small_patch8_224, random init (seed 0)`` or
    ``vit_base_patch8_224, DINO weights``; a random-init backbone is never called DINO. None when the
    name is unknown."""
    if not name:
        return None
    base = str(name).split(".", 1)[0]
    tag = str(weights_tag or "")
    if tag.startswith("random-seed"):
        weights = f"random init (seed {tag.removeprefix('random-seed')})"
    elif tag.startswith("dino:") or (not tag and str(name).endswith(".dino")):
        weights = "DINO weights"
    elif tag == "timm":
        weights = "timm weights"
    elif tag.startswith("file:"):
        weights = f"weights file {tag.removeprefix('file:')[:8]}"
    else:
        weights = f"weights {tag}" if tag else "weights not recorded"
    return f"{base}, {weights}"
