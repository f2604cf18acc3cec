"""train-head: STEGO heads trained from cached tokens (method.md §1.4, §3, §5.3, §9.1) and the stego projection."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from pipeline.artifacts import ArtifactStore
from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.planner import Request, plan
from pipeline.runner import run_tasks
from pipeline.specs import validate as validate_spec
from stages.evaluation.probes import ClusterProbe, LinearProbe, load_probes
from stages.projections import load_projection
from stages.projections.select import open_projection
from stages.stego.head import StegoHead
from stages.stego.loss import correlation_loss, tensor_correlation, weighted_total
from stages.projections.stego import StegoProjection
from stages.stego.train import TrainSettings, _sub_seeds, batch_indices, feature_correlations, train_head, validate
from pipeline.registry import get_stage, id_params
from stages.store import create_token_store, open_token_store, write_shard

D, GRID, LABEL, N_CLASSES = 12, 4, 8, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _store(path: Path, n: int, seed: int):
    """Tokens whose first N_CLASSES channels encode the class of each patch, plus noise; exact labels."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, N_CLASSES, size=(n, GRID, GRID))
    tokens = rng.normal(0, 0.3, size=(n, GRID, GRID, D)).astype(np.float32)
    tokens[..., :N_CLASSES] += 3 * np.eye(N_CLASSES, dtype=np.float32)[classes]
    labels = classes.repeat(LABEL // GRID, axis=1).repeat(LABEL // GRID, axis=2).astype(np.int16)
    labels[:, 0, 0] = -1  # an ignored pixel
    create_token_store(path, n=n, grid=(GRID, GRID), dim=D, label_hw=(LABEL, LABEL), shard_size=4,
                       with_rgb=False, with_flip=False, attrs={"n_classes": N_CLASSES})
    for k, a in enumerate(range(0, n, 4)):
        b = min(a + 4, n)
        write_shard(path, k, tokens=tokens[a:b], labels=labels[a:b], ids=[str(i) for i in range(a, b)])
    return open_token_store(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("stores")
    train, val = _store(base / "train.zarr", 10, 0), _store(base / "val.zarr", 4, 1)
    rng = np.random.default_rng(2)
    nns = np.stack([np.r_[i, rng.permutation(np.delete(np.arange(10), i))[:4]] for i in range(10)])
    return train, val, nns


def _settings(**overrides) -> TrainSettings:
    base = {"projection": "nonlinear", "dim": 5, "dropout": 0.1, "lr": 5e-3, "steps": 4, "batch_size": 4,
            "feature_samples": 3, "neg_samples": 2, "pointwise": True, "zero_clamp": True, "stabilize": False,
            "weights": {"intra": 0.1, "inter": 1.0, "neg": 0.1538476246415498},
            "shifts": {"intra": 0.12, "inter": 0.2, "neg": 1.0}, "num_neighbors": 3, "true_permutation": False,
            "val_every": 2, "selection": "last", "extra_clusters": 0, "amp": True, "seed": 0}
    return TrainSettings(**{**base, **overrides})


def _states(result) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, m in (("head", result.head), ("linear", result.linear),
                                           ("cluster", result.cluster)) for k, v in m.state_dict().items()}


def test_training_is_deterministic_and_seeded(data) -> None:
    train, val, nns = data
    first = train_head(train, nns, _settings(), n_classes=N_CLASSES, val=val)
    second = train_head(train, nns, _settings(), n_classes=N_CLASSES, val=val, loader_workers=1)  # read-ahead
    a, b = _states(first), _states(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.diagnostics["curves"] == second.diagnostics["curves"]
    other = _states(train_head(train, nns, _settings(seed=1), n_classes=N_CLASSES, val=val))
    assert not torch.equal(a["head.cluster1.0.weight"], other["head.cluster1.0.weight"])
    # training moved the head away from its seeded init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_sub_seeds(0)["head"])
        init = StegoHead(D, 5)
    assert not torch.equal(init.cluster1[0].weight, a["head.cluster1.0.weight"])


def test_a_failed_read_stops_training_and_leaves_no_reader_threads(data, monkeypatch) -> None:
    """A read error in a prefetch thread reaches the loop at its batch; the reader threads are joined."""
    import threading

    train, val, nns = data
    store = open_token_store(train.path)
    calls = []
    real_get = store.get

    def failing_get(name, indices, *args, **kwargs):
        calls.append(name)
        if name == "tokens" and len([c for c in calls if c == "tokens"]) == 3:
            raise InputError(f"token store {store.path}: chunk of sample 7 is corrupt")
        return real_get(name, indices, *args, **kwargs)

    monkeypatch.setattr(store, "get", failing_get)
    with pytest.raises(InputError, match="sample 7 is corrupt"):
        train_head(store, nns, _settings(steps=6, val_every=0), n_classes=N_CLASSES, loader_workers=2)
    assert not [t for t in threading.enumerate() if t.name.startswith("train-head-read")]


def test_first_step_is_the_reference_step(data) -> None:
    """Rebuild step 1 from the public pieces: sampler, head init, dropout masks (anchor forward, then the
    partner forward), then the loss, all drawn from the run's seeds in the reference order."""
    train, _, nns = data
    settings = _settings(steps=1, val_every=0)
    result = train_head(train, nns, settings, n_classes=N_CLASSES)
    seeds = _sub_seeds(settings.seed)
    anchors, partners = next(batch_indices(train.n, nns, 4, 3, np.random.default_rng(seeds["sampler"])))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds["head"])
        head = StegoHead(D, 5, "nonlinear", 0.1)
    noise = torch.Generator().manual_seed(seeds["noise"])
    feats = torch.from_numpy(train.get_tokens(anchors)).permute(0, 3, 1, 2)
    feats_pos = torch.from_numpy(train.get_tokens(partners)).permute(0, 3, 1, 2)
    f, c = head(feats, train_dropout=True, generator=noise)
    fp, cp = head(feats_pos, train_dropout=True, generator=noise)
    losses = correlation_loss(f, fp, c, cp, settings, generator=noise)
    total = weighted_total(losses, settings.weights)
    curves = result.diagnostics["curves"]
    assert curves["total"][0] == pytest.approx(float(total.detach()), rel=1e-6, abs=1e-7)
    for part in ("intra", "inter", "neg", "cd_intra", "cd_inter", "cd_neg"):
        assert curves[part][0] == pytest.approx(float(losses[part].detach()), rel=1e-6, abs=1e-7)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.lr)
    total.backward()
    optimizer.step()
    for key, value in head.state_dict().items():
        torch.testing.assert_close(result.head.state_dict()[key], value)


def test_batches_are_epoch_permutations_with_knn_partners() -> None:
    nns = np.arange(60).reshape(6, 10) % 6
    stream = batch_indices(6, nns, 3, 4, np.random.default_rng(0))
    anchors, partners, columns = [], [], []
    for _ in range(4):
        a, p = next(stream)
        anchors.append(a)
        partners.append(p)
        columns.append([int(np.flatnonzero(nns[i] == q)[0]) for i, q in zip(a, p)])
    assert sorted(np.concatenate(anchors[:2])) == list(range(6))  # one epoch = one permutation
    assert sorted(np.concatenate(anchors[2:])) == list(range(6))
    for a, p in zip(anchors, partners):
        assert all(q in nns[i, 1:5] for i, q in zip(a, p))
    assert set(np.concatenate(columns)) <= {1, 2, 3, 4}


def test_feature_correlations_match_the_spec_formula() -> None:
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    fd = tensor_correlation(F.normalize(f1, dim=1, eps=1e-10), F.normalize(f2, dim=1, eps=1e-10))
    torch.testing.assert_close(feature_correlations(f1, f2, pointwise=False), fd)
    centred = fd - fd.mean(dim=(3, 4), keepdim=True)
    centred = centred - centred.mean() + fd.mean()
    torch.testing.assert_close(feature_correlations(f1, f2, pointwise=True), centred)


def test_best_val_selection_keeps_the_best_state(data) -> None:
    train, val, nns = data
    result = train_head(train, nns, _settings(steps=6, val_every=2, selection="best_val_cluster_miou"),
                        n_classes=N_CLASSES, val=val)
    vals = result.diagnostics["validation"]
    assert [v["step"] for v in vals] == [2, 4, 6]
    scores = [v["cluster"]["miou"] for v in vals]
    assert result.chosen_step == vals[int(np.argmax(scores))]["step"]
    again = validate(result.head, result.linear, result.cluster, val, N_CLASSES, torch.device("cpu"))
    chosen = vals[int(np.argmax(scores))]
    assert again["cluster"]["miou"] == pytest.approx(chosen["cluster"]["miou"])
    assert again["linear"]["miou"] == pytest.approx(chosen["linear"]["miou"])
    last = train_head(train, nns, _settings(steps=5, val_every=2), n_classes=N_CLASSES, val=val)
    assert last.chosen_step == 5 and [v["step"] for v in last.diagnostics["validation"]] == [2, 4, 5]


def test_validation_scores_linear_and_hungarian_cluster(data) -> None:
    """A head whose code is the class one-hot: both probes perfect → 100; permuted centroids stay 100
    for the cluster probe (Hungarian) while the linear probe with permuted rows drops to 0."""
    _, val, _ = data
    head = StegoHead(D, N_CLASSES, "linear")
    with torch.no_grad():
        head.cluster1[0].weight.zero_()
        head.cluster1[0].weight[:, :N_CLASSES, 0, 0] = torch.eye(N_CLASSES)
        head.cluster1[0].bias.zero_()
    linear, cluster = LinearProbe(N_CLASSES, N_CLASSES), ClusterProbe(N_CLASSES, N_CLASSES)
    perm = torch.tensor([1, 2, 0])
    with torch.no_grad():
        linear.load_stego(10 * torch.eye(N_CLASSES), torch.zeros(N_CLASSES))
        cluster.clusters.copy_(torch.eye(N_CLASSES)[perm])
    got = validate(head, linear, cluster, val, N_CLASSES, torch.device("cpu"), batch_size=3)
    assert got["linear"]["miou"] == pytest.approx(100.0) and got["cluster"]["miou"] == pytest.approx(100.0)
    with torch.no_grad():
        linear.load_stego(10 * torch.eye(N_CLASSES)[perm], torch.zeros(N_CLASSES))
    got = validate(head, linear, cluster, val, N_CLASSES, torch.device("cpu"))
    assert got["linear"]["accuracy"] == pytest.approx(0.0) and got["cluster"]["accuracy"] == pytest.approx(100.0)


def test_bad_settings_and_inputs_raise_config_errors(data) -> None:
    train, val, nns = data
    with pytest.raises(ConfigError, match="head.selection"):
        _settings(selection="best")
    with pytest.raises(ConfigError, match="val_every"):
        _settings(selection="best_val_cluster_miou", val_every=0)
    with pytest.raises(ConfigError, match="head.projection.*nonlinear"):
        _settings(projection="mlp")
    with pytest.raises(ConfigError, match="head.weights"):
        _settings(weights={"intra": 1.0, "inter": 1.0})
    with pytest.raises(ConfigError, match="num_neighbors=5.*5 columns"):
        train_head(train, nns, _settings(num_neighbors=5), n_classes=N_CLASSES, val=val)
    with pytest.raises(ConfigError, match="batch_size=11 exceeds the 10"):
        train_head(train, nns, _settings(batch_size=11), n_classes=N_CLASSES, val=val)


def test_params_follow_config_and_projection_dim() -> None:
    stage = get_stage("train-head")

    def params(*overrides: str) -> dict[str, Any]:
        return id_params(stage, load_config(None, list(overrides)), {})

    got = params("head.dim=90", "head.val_batch_size=3", "head.loader_workers=1", "projection.seed=4")
    assert got["dim"] == 90 and got["projection.seed"] == 4 and "head.dim" not in got  # dim: the derived width
    assert not {"head.val_batch_size", "head.loader_workers"} & set(got) and got["head.checkpoint"] is None
    assert got == params("head.dim=90", "projection.seed=4")
    assert params("projection.method=stego", "projection.dim=24")["dim"] == 24
    assert params("projection.method=pca", "projection.dim=24") == params()  # a head does not depend on who asks
    fields = set(TrainSettings.__dataclass_fields__)
    assert {k.removeprefix("head.").split(".")[0] for k in got if k.startswith("head.")} - {"checkpoint"} <= fields
    with pytest.raises(ConfigError, match="head.selection"):
        params("head.selection=max")


def test_stego_projection_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = StegoHead(D, 5)
    projection = StegoProjection(head)
    projection.save(tmp_path / "p")
    loaded = load_projection(tmp_path / "p")
    assert isinstance(loaded, StegoProjection) and (loaded.in_dim, loaded.dim) == (D, 5)
    feats = torch.randn(2, D, 3, 4)
    torch.testing.assert_close(loaded.transform_map(feats), head.code(feats))
    tokens = feats.permute(0, 2, 3, 1).reshape(-1, D)
    codes = loaded.transform(tokens.numpy())
    assert isinstance(codes, np.ndarray) and codes.dtype == np.float32
    np.testing.assert_allclose(codes, head.code(feats).permute(0, 2, 3, 1).reshape(-1, 5).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    projection.save(tmp_path / "projection")  # as inside a head artifact
    assert open_projection(tmp_path, D, None).dim == 5
    with pytest.raises(ConfigError, match="cannot be narrowed"):
        open_projection(tmp_path, D, 3)


CHAIN = ["run.executor=local", "dataset.synthetic.n_train=8", "dataset.synthetic.n_val=4",
         "dataset.synthetic.height=40", "dataset.synthetic.width=48", "backbone.name=vit_small_patch16_224.dino",
         "extract.train_res=32", "extract.val_res=48", "extract.shard_size=4", "extract.loader_workers=0",
         "knn.k=5", "head.num_neighbors=3", "head.steps=4", "head.batch_size=4", "head.val_every=2",
         "head.feature_samples=3", "head.dim=6", "head.selection=best_val_cluster_miou"]


def test_train_head_stage_end_to_end(root: Path) -> None:
    cfg = load_config(None, CHAIN)
    tasks, targets = plan([Request("train-head", cfg)])
    assert [t.stage for t in tasks].count("extract") == 2
    results = {r.id: r for r in run_tasks(tasks, cfg.run)}
    path = results[targets[0]].path
    validate_spec("head", path)
    manifest = ArtifactStore(root).manifest(targets[0])
    assert manifest["chosen_step"] in (2, 4) and manifest["params"]["dim"] == 6
    assert set(manifest["inputs"]) == {"tokens", "knn", "val"}
    diagnostics = json.loads((path / "diagnostics.json").read_text())
    assert set(diagnostics["curves"]) >= {"intra", "inter", "neg", "linear", "cluster", "total", "cd_intra"}
    assert all(len(v) == 4 for v in diagnostics["curves"].values())
    hist = diagnostics["feature_correlation"]["neg"]
    assert hist["shift"] == cfg.head.shifts.neg and sum(hist["counts"]) == 4 * 4 * 3 ** 4  # steps × B × S⁴
    assert (path / "loss_curves.png").stat().st_size > 0 and (path / "feature_correlations.png").is_file()

    head_meta = json.loads((path / "head.json").read_text())
    assert head_meta["source"] == "trained" and head_meta["chosen_step"] == manifest["chosen_step"]
    head = StegoHead(head_meta["in_dim"], 6)
    head.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(path / "head.safetensors")).items()})
    projection = open_projection(path, head_meta["in_dim"], None)
    feats = torch.randn(1, head_meta["in_dim"], 2, 2)
    torch.testing.assert_close(projection.transform_map(feats), head.code(feats))
    probes = load_probes(path / "probes")
    assert (probes.dim, probes.n_classes) == (6, 5)

    tasks_again, _ = plan([Request("train-head", load_config(None, CHAIN))])
    assert {r.status for r in run_tasks(tasks_again, cfg.run)} == {"hit"}
    _, other = plan([Request("train-head", load_config(None, [*CHAIN, "projection.seed=1"]))])
    assert other[0] != targets[0]
