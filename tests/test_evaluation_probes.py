"""Probes: RV5 (cluster lookup), RV13 (linear probe loss), RV15 (toy end-to-end), trainer options."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, InputError
from stages.evaluation.metrics import confusion_matrix, scores
from stages.evaluation.probes import (
    CLUSTER_CRF_ALPHA, PROBE_LR, ClusterProbe, LinearProbe, ProbeTrainer, predict_batch, upsample_code,
)

torch.set_num_threads(1)


def _rv5() -> tuple[ClusterProbe, torch.Tensor]:
    probe = ClusterProbe(2, 3)
    with torch.no_grad():
        probe.clusters.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    x = torch.tensor([[2.0, 0.0, -1.0], [1.0, -3.0, -0.5]]).reshape(1, 2, 1, 3)
    return probe, x


def test_rv5_cluster_lookup():
    probe, x = _rv5()
    inner = probe.inner(x).detach()[0, :, 0, :].T  # [pixel, cluster]
    np.testing.assert_allclose(inner.numpy(), [[0.894427, 0.447214, -0.948683],
                                               [0.0, -1.0, 0.707107],
                                               [-0.894427, -0.447214, 0.948683]], atol=1e-6)
    assert probe.predict(x).flatten().tolist() == [0, 2, 2]
    loss, probs = probe(x, None)
    assert loss.item() == pytest.approx(-0.8500724234, abs=1e-7)
    assert probs.shape == (1, 3, 1, 3)
    np.testing.assert_array_equal(probs.detach()[0, :, 0, :].T.numpy(), np.eye(3)[[0, 2, 2]])
    lp = probe.log_probs(x, 2.0).detach()[0, :, 0, :].T
    np.testing.assert_allclose(lp.numpy(), [[-0.360404, -1.254831, -4.046625],
                                            [-1.657959, -3.657959, -0.243745],
                                            [-3.769070, -2.874643, -0.082849]], atol=1e-6)


def test_rv5_soft_loss_and_hard_gradient():
    probe, x = _rv5()
    loss, probs = probe(x, 2.0)
    inner = probe.inner(x)
    expected = -(F.softmax(2 * inner, 1) * inner).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-7)
    assert torch.allclose(probs.sum(1), torch.ones(1, 1, 3))
    probe.zero_grad()
    probe(x, None)[0].backward()
    # hard assignment: only winning centroids (0 and 2) receive gradient
    grad_norms = probe.clusters.grad.norm(dim=1)
    assert grad_norms[1].item() == 0.0 and grad_norms[0].item() > 0 and grad_norms[2].item() > 0


def test_cluster_probe_rejects_wrong_width():
    with pytest.raises(InputError, match=r"\[B, 2, h, w\]"):
        ClusterProbe(2, 3).inner(torch.zeros(1, 3, 2, 2))


def _bilinear_2_to_4(v: np.ndarray) -> np.ndarray:
    """Reference upsampling 2→4 per axis, align_corners=False: taps (1,0),(.75,.25),(.25,.75),(0,1)."""
    w = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    return np.einsum("ih,chw,jw->cij", w, v, w)


def test_rv13_linear_probe_loss():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[0, 1, 2, -1], [2, 2, 1, 0], [3, 0, -1, 1], [1, 1, 2, 2]]).unsqueeze(0)
    probe = LinearProbe(3, 3)
    probe.load_stego(torch.eye(3), torch.zeros(3))  # identity: probe logits == the input
    loss = probe.loss(logits, labels)
    up = _bilinear_2_to_4(logits[0].double().numpy())
    lab = labels[0].numpy()
    nll = []
    for i, j in itertools.product(range(4), range(4)):
        if 0 <= lab[i, j] < 3:
            z = up[:, i, j]
            nll.append(np.log(np.exp(z).sum()) - z[lab[i, j]])
    assert len(nll) == 13
    assert loss.item() == pytest.approx(float(np.mean(nll)), abs=1e-6)
    all_ignored = torch.full((1, 4, 4), -1)
    all_ignored[0, 0, 0] = 3
    assert math.isnan(probe.loss(logits, all_ignored).item())


def test_linear_probe_load_stego_and_errors():
    probe = LinearProbe(4, 2)
    w = torch.arange(8.0).reshape(2, 4, 1, 1)
    probe.load_stego(w, torch.tensor([1.0, -1.0]))
    assert torch.equal(probe.weight, w) and torch.equal(probe.bias, torch.tensor([1.0, -1.0]))
    probe.load_stego(w.reshape(2, 4), torch.zeros(2))
    assert torch.equal(probe.conv.weight, w)
    x = torch.ones(1, 4, 1, 1)
    assert probe(x).flatten().tolist() == [6.0, 22.0]
    assert probe.predict(x).item() == 1
    with pytest.raises(InputError, match="linear_probe"):
        probe.load_stego(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(InputError, match="labels"):
        probe.loss(x, torch.zeros(1, 2, 2))


def _toy(seed: int = 1, batch: int = 4, centred: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """RV15 toy data: 3-class 8×8 label maps, code = one-hot(label) (− 1/3 when centred, as a
    centred projection would give) + small noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (batch, 8, 8), generator=g)
    code = F.one_hot(labels, 3).permute(0, 3, 1, 2).float() - (1 / 3 if centred else 0.0)
    code = code + 0.05 * torch.randn(code.shape, generator=g)
    return code, labels


def _train_cluster_probe(code: torch.Tensor, steps: int = 200) -> ClusterProbe:
    torch.manual_seed(0)
    probe = ClusterProbe(3, 3)
    opt = torch.optim.Adam(probe.parameters(), lr=5e-3)
    for _ in range(steps):
        loss, _ = probe(code, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe


def test_rv15_cluster_probe_reaches_100_miou():
    code, labels = _toy()
    probe = _train_cluster_probe(code)
    s = scores(confusion_matrix(probe.predict(code), labels, 3), hungarian=True)
    assert s["miou"] == pytest.approx(100.0)
    assert sorted(s["assignment"].tolist()) == [0, 1, 2]


def test_hard_kmeans_starves_a_centroid_on_uncentred_codes():
    # Uncentred one-hot codes: from seed-0 centroids, centroid 1 wins only a few noisy pixels,
    # loses them, and then never moves again (the hard loss only updates winners, method.md §5.1):
    # two classes end up sharing centroid 2. Centred codes (RV15 above) do not have this problem.
    code, labels = _toy(centred=False)
    probe = _train_cluster_probe(code)
    assert (probe.predict(code) == 1).sum() == 0
    probe.zero_grad()
    probe(code, None)[0].backward()
    assert torch.count_nonzero(probe.clusters.grad[1]) == 0
    s = scores(confusion_matrix(probe.predict(code), labels, 3), hungarian=True)
    assert s["miou"] < 60.0


def test_trainer_matches_manual_loop_and_is_deterministic():
    code, labels = _toy()
    trainer = ProbeTrainer(3, 3, seed=0)
    torch.manual_seed(0)
    assert torch.equal(trainer.cluster.clusters.detach(), torch.randn(3, 3))
    state_before = torch.get_rng_state()
    history = trainer.fit(itertools.repeat((code, labels)), max_steps=200)
    assert torch.equal(torch.get_rng_state(), state_before)  # global RNG untouched
    assert len(history) == 200 and trainer.steps == 200
    assert history[-1]["linear"] < history[0]["linear"]
    assert history[-1]["cluster"] < history[0]["cluster"]
    out = predict_batch(code, trainer.linear, trainer.cluster)
    lin = scores(confusion_matrix(out["linear"], labels, 3), hungarian=False)
    clu = scores(confusion_matrix(out["cluster"], labels, 3), hungarian=True)
    assert lin["miou"] == pytest.approx(100.0) and clu["miou"] == pytest.approx(100.0)
    again = ProbeTrainer(3, 3, seed=0)
    again.fit(itertools.repeat((code, labels)), max_steps=200)
    assert torch.equal(again.cluster.clusters, trainer.cluster.clusters)
    assert torch.equal(again.linear.weight, trainer.linear.weight)


def test_trainer_upsamples_linear_loss_to_labels_and_skips_empty_batches():
    code, labels = _toy()
    low = F.avg_pool2d(code, 2)  # feature-resolution code 4×4, labels stay 8×8
    trainer = ProbeTrainer(3, 3, seed=0, lr=PROBE_LR)
    w0 = trainer.linear.weight.detach().clone()
    losses = trainer.step(low, torch.full_like(labels, -1))
    assert math.isnan(losses["linear"]) and torch.equal(trainer.linear.weight, w0)
    losses = trainer.step(low, labels)
    assert math.isfinite(losses["linear"]) and not torch.equal(trainer.linear.weight, w0)


def test_trainer_kmeans_option():
    code, labels = _toy(batch=2, centred=False)  # k-means++ seeding copes where Adam leaves a dead centroid
    trainer = ProbeTrainer(3, 3, seed=0, cluster_fit="kmeans")
    history = trainer.fit((_toy(seed=s, batch=2, centred=False) for s in range(10)))
    assert len(history) == 10 and history[-1]["cluster"] < -0.99
    s = scores(confusion_matrix(trainer.cluster.predict(code), labels, 3), hungarian=True)
    assert s["miou"] == pytest.approx(100.0)
    again = ProbeTrainer(3, 3, seed=0, cluster_fit="kmeans")
    again.fit((_toy(seed=s, batch=2, centred=False) for s in range(10)))
    assert torch.equal(again.cluster.clusters, trainer.cluster.clusters)
    # a 4th cluster splits a class: its pixels count as errors (mIoU < 100)
    four = ProbeTrainer(3, 3, n_clusters=4, seed=0, cluster_fit="kmeans")
    four.fit((_toy(seed=s, batch=2, centred=False) for s in range(10)))
    s4 = scores(confusion_matrix(four.cluster.predict(code), labels, 3, n_clusters=4), hungarian=True)
    assert (s4["assignment"] == -1).sum() == 1 and 50.0 < s4["miou"] < 100.0
    with pytest.raises(ConfigError, match="cluster_fit"):
        ProbeTrainer(3, 3, cluster_fit="gmm")
    with pytest.raises(InputError, match="k-means"):
        ProbeTrainer(3, 3, n_clusters=5, cluster_fit="kmeans").step(code[:1, :, :1, :2], labels[:1, :1, :2])


def test_predict_batch_unaries():
    probe, x = _rv5()
    linear = LinearProbe(2, 3)
    out = predict_batch(x, linear, probe, unaries=True)
    assert out["cluster"].flatten().tolist() == [0, 2, 2]
    assert torch.allclose(out["cluster_unary"], probe.log_probs(x, CLUSTER_CRF_ALPHA))
    assert torch.allclose(out["linear_unary"], F.log_softmax(linear(x), 1))
    assert torch.equal(out["linear"], linear(x).argmax(1))
    assert set(predict_batch(x, linear, probe)) == {"linear", "cluster"}
    up = upsample_code(torch.tensor([[[[0.0, 1.0]]]]), (1, 4))
    np.testing.assert_allclose(up.flatten().numpy(), [0, 0.25, 0.75, 1])
