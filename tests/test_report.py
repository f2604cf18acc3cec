"""Report: cells aggregate seeds only (never dims, protocol flags or configurations), the Table-2 dim
column, configuration fingerprints, Figure 4 series, lineage-derived backbone names."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from stages.evaluation.figures import backbone_label
from stages.report import cells, config_fingerprint, eval_rows, plot_fig4, sweep_markdown, table2_markdown


def _metrics(method: str, dim: int, seed: int, cluster_acc: float, *, crf: bool = True, preset: bool = False,
             flip_tta: bool = False, dataset: str = "synthetic") -> dict[str, Any]:
    score = {"miou": cluster_acc / 2, "accuracy": cluster_acc}
    scores = {"linear": score, "cluster": score}
    if crf:
        scores |= {"linear_crf": score, "cluster_crf": score}
    return {"protocol": {"dataset": dataset, "seed": seed, "crf": crf, "crf_pixels": "reference" if crf else None,
                         "flip_tta": flip_tta, "drop_extra_clusters": False, "backbone": "vit_small_patch8_224.dino",
                         "weights_tag": "random-seed0", "resolution": [96, 96], "n_images": 16,
                         "projection": {"method": method, "id": f"{method}-{dim}-{seed}", "kind": method, "dim": dim,
                                        "requested_dim": None if preset else dim}},
            "scores": scores}


# The demo's four STEGO runs: dims 4 and 16, seeds 0 and 1 (cluster accuracies from the issue).
DEMO = [("stego", 4, 0, 85.86), ("stego", 4, 1, 65.22), ("stego", 16, 0, 65.22), ("stego", 16, 1, 67.85)]


def _rows(runs: list[tuple[str, int, int, float]], **kwargs: Any) -> list[dict[str, Any]]:
    return [r for i, (method, dim, seed, acc) in enumerate(runs)
            for r in eval_rows(f"evaluate-{i}", _metrics(method, dim, seed, acc, **kwargs))]


def _line(table: str, start: str) -> list[list[str]]:
    """The cells of the table's lines that start with ``start`` (bold marks removed)."""
    return [[c.strip().strip("*") for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith(start)]


def test_table2_never_pools_dims() -> None:
    table = table2_markdown(_rows(DEMO))
    assert "71.0 ± 8.6" not in table  # the four runs pooled (the old report's cell)
    stego = _line(table, "| STEGO (stegopipe")
    assert [line[1] for line in stego] == ["4", "16"]  # one row per dim, a dim column
    by_dim = {line[1]: line for line in stego}
    assert by_dim["4"][2] == "75.5 ± 10.3"  # cluster Acc over the seeds of dim 4 only
    assert by_dim["16"][2] == "66.5 ± 1.3"
    assert table.splitlines()[0].startswith("| method | dim |")


def test_table2_shows_the_preset_dim_when_it_was_evaluated() -> None:
    rows = _rows(DEMO) + [r for i, seed in enumerate((0, 1)) for r in
                          eval_rows(f"evaluate-p{i}", _metrics("stego", 8, seed, 50.0 + 10 * seed, preset=True))]
    stego = _line(table2_markdown(rows), "| STEGO (stegopipe")
    assert len(stego) == 1 and stego[0][1] == "8" and stego[0][2] == "55.0 ± 5.0"


def test_protocol_flags_and_configurations_split_cells() -> None:
    rows = _rows(DEMO[:2]) + _rows(DEMO[:2], flip_tta=True)
    table = table2_markdown(rows)
    lines = _line(table, "| STEGO (stegopipe")
    assert sorted(line[0] for line in lines) == ["STEGO (stegopipe, CRF, flip-TTA)",
                                                 "STEGO (stegopipe, CRF, no flip-TTA)"]
    assert all(line[2] == "75.5 ± 10.3" for line in lines)
    sweep = sweep_markdown(rows)
    assert "flip-TTA" in sweep.splitlines()[0] and "config" not in sweep.splitlines()[0]
    # same protocol, different upstream parameters (e.g. another head lr): told apart by the fingerprint
    a = eval_rows("evaluate-a", _metrics("stego", 4, 0, 80.0), {False: "aaaa1111", True: "aaaa2222"})
    b = eval_rows("evaluate-b", _metrics("stego", 4, 1, 60.0), {False: "bbbb1111", True: "bbbb2222"})
    assert all(len(c.rows) == 1 for c in cells(a + b))
    assert "config" in sweep_markdown(a + b).splitlines()[0]
    split = _line(table2_markdown(a + b), "| STEGO (stegopipe")
    assert sorted(line[2] for line in split) == ["60.0 (n=1)", "80.0 (n=1)"]


def test_a_seed_counted_once_per_configuration() -> None:
    plain = eval_rows("evaluate-a", _metrics("identity", 384, 0, 70.0, crf=False), {False: "cfg", True: "x"})
    with_crf = eval_rows("evaluate-b", _metrics("identity", 384, 0, 70.0), {False: "cfg", True: "y"})
    group = [c for c in cells(plain + with_crf) if not c.key["crf"] and c.key["probe"] == "linear"]
    assert len(group) == 1 and group[0].seeds == [0]


def test_config_fingerprint_ignores_only_the_run_seed() -> None:
    manifests = {
        "tokens": {"stage": "extract", "version": "1", "params": {"seed": 3, "res": 96}, "inputs": {}},
        "head0": {"stage": "train-head", "version": "1", "params": {"projection.seed": 0, "head.lr": 5e-4}, "inputs": {"t": "tokens"}},
        "head1": {"stage": "train-head", "version": "1", "params": {"projection.seed": 1, "head.lr": 5e-4}, "inputs": {"t": "tokens"}},
        "head2": {"stage": "train-head", "version": "1", "params": {"projection.seed": 1, "head.lr": 1e-3}, "inputs": {"t": "tokens"}},
        "tokens9": {"stage": "extract", "version": "1", "params": {"seed": 9, "res": 96}, "inputs": {}},
        "head3": {"stage": "train-head", "version": "1", "params": {"projection.seed": 1, "head.lr": 5e-4}, "inputs": {"t": "tokens9"}},
    }
    memo: dict[str, str] = {}
    fp = {k: config_fingerprint(manifests.get, k, memo) for k in manifests}
    assert fp["head0"] == fp["head1"]  # only the run seed differs
    assert fp["head1"] != fp["head2"]  # another lr
    assert fp["head1"] != fp["head3"]  # a seed of another stage (e.g. the dataset's) is configuration
    assert config_fingerprint(manifests.get, "gone", memo) == "gone"


def test_fig4_is_legible_and_its_legend_covers_no_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), real(self, *a, **k)))
    rows = _rows(DEMO) + _rows([("pca", 4, 0, 50.0), ("pca", 4, 1, 54.0), ("pca", 16, 0, 60.0)], crf=False)
    rows += _rows([("identity", 384, 0, 70.0), ("identity", 384, 1, 72.0)])
    path = tmp_path / "fig4.png"
    assert plot_fig4(rows, "miou", path)
    fig = drawn[0]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    legend = fig.legends[0].get_window_extent(canvas.get_renderer())
    assert all(not legend.overlaps(ax.get_window_extent()) for ax in fig.axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["DINO (D=384)", "DINO + CRF", "PCA", "STEGO", "STEGO + CRF"]  # the paper's order
    assert "random init (seed 0)" in fig._suptitle.get_text() and "dino" not in fig._suptitle.get_text().lower()
    with Image.open(path) as png:
        assert png.info["dpi"][0] == pytest.approx(150, abs=1)
        assert png.width >= 900 and png.height >= 1000  # one dataset: 6.4 × 7.6 in at 150 dpi


def test_backbone_label_never_calls_random_weights_dino() -> None:
    assert backbone_label("vit_small_patch8_224.dino", "random-seed0") == "vit_small_patch8_224, random init (seed 0)"
    assert backbone_label("vit_base_patch8_224.dino", "dino:0123456789abcdef") == "vit_base_patch8_224, DINO weights"
    assert backbone_label("vit_small_patch16_224.dino", "timm") == "vit_small_patch16_224, timm weights"
    assert "dino" not in backbone_label("vit_small_patch8_224.dino", "random-seed3").lower()
    assert backbone_label(None, "timm") is None


def test_paper_row_order_bold_best_and_one_seed() -> None:
    runs = [("stego", 4, 0, 60.0), ("hnne", 4, 0, 50.0), ("identity", 384, 0, 70.0), ("identity", 384, 1, 72.0),
            ("rp", 4, 0, 40.0), ("pca", 4, 0, 45.0)]
    sweep = sweep_markdown(_rows(runs, crf=False))
    methods = [line[1] for line in _line(sweep, "| synthetic") if line[3] == "cluster"]
    assert methods == ["DINO", "PCA", "RP", "h-NNE", "STEGO"]  # the paper's order, not the alphabet's
    dino = next(line for line in sweep.splitlines() if "| DINO |" in line and "| cluster |" in line)
    assert "**35.5 ± 0.5**" in dino and "**71.0 ± 1.0**" in dino  # the best of its column group, bold
    rp = next(line for line in sweep.splitlines() if "| RP |" in line and "| cluster |" in line)
    assert "20.0 (n=1)" in rp and "± 0.0" not in sweep and "**" not in rp
    table = table2_markdown(_rows(runs, crf=False))
    assert "**70.0" not in table and "**71.0 ± 1.0**" in table  # Table 2: DINO beats STEGO in every column


def test_fig3_has_a_log_x_axis_and_percent_y(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    from stages.report import plot_fig3

    drawn: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: drawn.append(self))
    d = 8
    cumulative = [1 - 0.5 ** k for k in range(d + 1)]
    plot_fig3({("synthetic", "vit"): {"in_dim": d, "fraction": [k / d for k in range(d + 1)],
                                       "cumulative": cumulative}}, tmp_path / "fig3.png")
    ax = drawn[0].axes[0]
    assert ax.get_xscale() == "log" and "%" in ax.get_ylabel()
    x, y = ax.lines[0].get_data()
    assert x[0] == 1 / d and y[0] == 50.0 and y[-1] == pytest.approx(100 * cumulative[-1])


def test_fig4_draws_few_seeds_as_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: drawn.append(self))
    assert plot_fig4(_rows(DEMO, crf=False), "accuracy", tmp_path / "f.png")
    panel = drawn[0].axes[0]
    points = [c for c in panel.collections if c.get_offsets().shape[0] == 4]  # 2 dims x 2 seeds
    assert points and not [c for c in panel.collections if type(c).__name__ == "FillBetweenPolyCollection"]


def test_a_run_ends_with_the_table2_shape_of_every_method_in_the_paper_order(tmp_path: Path) -> None:
    """The table an experiment's run prints is the report's Table 2 (one implementation): rows method/dim in
    the paper's order, cluster/linear Acc and mIoU without and with CRF, mean ± std over seeds, n=1 marked."""
    import json

    from pipeline import results
    from pipeline.artifacts import MANIFEST, ArtifactStore, manifest_checksum

    runs = [("stego", 4, 0, 80.0), ("stego", 4, 1, 60.0), ("pca", 4, 0, 50.0), ("identity", 384, 0, 70.0),
            ("rp", 4, 0, 40.0), ("rp", 4, 1, 44.0)]
    ids = []
    for i, (method, dim, seed, acc) in enumerate(runs):
        artifact = f"evaluate-{i:016x}"
        folder = tmp_path / "evaluate" / artifact
        folder.mkdir(parents=True)
        metrics = _metrics(method, dim, seed, acc, preset=method == "identity")
        metrics["scores"]["cluster_crf"] = {"miou": acc / 2 + 1, "accuracy": acc + 1}
        (folder / "metrics.json").write_text(json.dumps(metrics))
        manifest = {"id": artifact, "stage": "evaluate", "version": "1", "kind": "eval", "files": [],
                    "params": {"projection.method": method, "projection.seed": seed}, "inputs": {}}
        manifest["manifest_sha256"] = manifest_checksum(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest))
        ids.append(artifact)
    table = results.run_table(ArtifactStore(str(tmp_path)), [*ids, "probe-0000000000000000"])
    assert table is not None
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    assert lines[0] == ["method", "dim", "synthetic cluster Acc", "synthetic cluster mIoU", "synthetic linear Acc",
                        "synthetic linear mIoU", "synthetic cluster+CRF Acc", "synthetic cluster+CRF mIoU",
                        "synthetic linear+CRF Acc", "synthetic linear+CRF mIoU"]
    assert [line[0] for line in lines[2:]] == ["DINO", "PCA", "RP", "STEGO"]  # the paper's row order
    by_method = {line[0]: line for line in lines[2:]}
    assert by_method["STEGO"][1] == "4" and by_method["STEGO"][2] == "**70.0 ± 10.0**"  # best cluster Acc, bold
    assert by_method["STEGO"][6] == "**71.0 ± 10.0**"  # with CRF
    assert by_method["PCA"][2] == "50.0 (n=1)" and by_method["RP"][3] == "21.0 ± 1.0"
    assert by_method["DINO"][1] == "384"
    assert len({len(line) for line in table.splitlines()}) == 1  # columns aligned
    assert results.run_table(ArtifactStore(str(tmp_path)), ["probe-0000000000000000"]) is None
