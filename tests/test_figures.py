"""Figures for readers: titled panels with a colour → class legend, and labelled training diagnostics."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from stages.evaluation.figures import IGNORE_LABEL, class_legend, palette, save_panels
from stages.stego.loss import PARTS
from stages.stego.train import plot_diagnostics


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every matplotlib figure saved during the test, in order (still saved to its file)."""
    figures: list[Figure] = []
    real = Figure.savefig

    def capture(self: Figure, *args: Any, **kwargs: Any) -> None:
        figures.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    return figures


def test_class_legend_lists_the_ids_shown() -> None:
    colours = palette(4)
    legend = class_legend([np.array([[2, 0]]), np.array([[0, -1]])], colours, ["a", "b", "c", "d"])
    assert [name for name, _ in legend] == ["a", "c", IGNORE_LABEL]
    assert (legend[1][1] == colours[2]).all() and (legend[2][1] == colours[4]).all()
    assert [name for name, _ in class_legend([np.array([1])], colours, None)] == ["class 1"]


def test_save_panels_titles_and_resolution(tmp_path: Path, drawn: list[Figure]) -> None:
    image = np.zeros((32, 48, 3), np.uint8)
    save_panels(tmp_path / "p.png", [("image", image), ("ground truth", image)], [("a", palette(1)[0])], title="t")
    axes = drawn[0].axes
    assert [ax.get_title() for ax in axes] == ["image", "ground truth"]
    assert [t.get_text() for t in drawn[0].legends[0].get_texts()] == ["a"]
    with Image.open(tmp_path / "p.png") as png:
        assert png.info["dpi"][0] == pytest.approx(150, abs=1) and png.width >= 2 * 300


def test_training_diagnostics_have_labelled_axes(tmp_path: Path, drawn: list[Figure]) -> None:
    steps = [1, 2, 3]
    curves = {k: [0.1, 0.2, None] for k in (*PARTS, "total", "linear", "cluster", "cd_intra", "cd_inter", "cd_neg")}
    hist = {"edges": [-1.0, 0.0, 1.0], "counts": [3, 5], "shift": 0.2, "mean": 0.1, "fraction_above_shift": 0.5}
    diagnostics = {"steps": steps, "curves": curves, "chosen_step": 3,
                   "validation": [{"step": 3, "linear": {"miou": 50.0}, "cluster": {"miou": 40.0}}],
                   "feature_correlation": {part: hist for part in PARTS}}
    assert plot_diagnostics(diagnostics, tmp_path, title="STEGO head, synthetic, d=4, seed 1") == \
        ["loss_curves.png", "feature_correlations.png"]
    assert len(drawn) == 2
    assert all(fig._suptitle.get_text().startswith("STEGO head, synthetic, d=4, seed 1") for fig in drawn)
    for fig in drawn:
        for ax in fig.axes:
            assert ax.get_ylabel() and ax.get_xlabel(), ax.get_title()
    with Image.open(tmp_path / "loss_curves.png") as png:
        assert png.info["dpi"][0] == pytest.approx(150, abs=1)


def test_a_long_panel_title_wraps_inside_the_figure(tmp_path: Path, drawn: list[Figure]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    image = np.zeros((32, 32, 3), np.uint8)
    title = "holiday-photo-2024-08-17.jpg: head train-head-3f2a9c0d1e2b4a5c on vit_small_patch8_224, random init (seed 0)"
    save_panels(tmp_path / "p.png", [("image", image), ("cluster probe", image)], [], title=title)
    fig = drawn[0]
    text = fig._suptitle
    assert "\n" in text.get_text() and text.get_text().replace("\n", " ") == title
    box = text.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width  # not cut at either edge
