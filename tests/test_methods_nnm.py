"""NNM: its losses against values worked out by hand, the bank against scikit-learn's nearest
neighbours, and the step's batch neighbours and bank rows against a brute-force assembly. A run stopped
while the bank is in use is among SCAN's resume tests (tests/test_methods_scan.py); a short run checks
that only the scan stage's steps get the third view."""
import math

import numpy as np
import pytest
import torch

import main as launcher
from losses.nnm import cluster_column_contrast, nnm_loss
from losses.scan import mean_assignment_entropy, pair_consistency
from models import DataInfo, Progress, StageContext, build_method
from models.nnm import NNMConfig
from tests.test_methods_scan import SMALL
from tests.torchrun_util import REPO_ROOT
from utils.trainer import Trainer

P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
Q = torch.tensor([[0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])


def test_cluster_column_contrast_by_hand():
    p, q = P.numpy().astype(np.float64), Q.numpy().astype(np.float64)
    pn, qn = p / np.linalg.norm(p, axis=0), q / np.linalg.norm(q, axis=0)
    total = 0.0
    for k in range(3):
        sims = [float(pn[:, k] @ qn[:, j]) for j in range(3)]
        total += -(sims[k] - math.log(sum(math.exp(v) for v in sims)))
    assert cluster_column_contrast(P, Q).item() == pytest.approx(total / 3, rel=1e-6)


def test_nnm_loss_adds_its_terms_and_the_bank_ones_only_with_a_bank():
    no_bank = nnm_loss(P, Q, None, entropy_weight=5.0)
    local = -np.mean([math.log(float(P[i] @ Q[i])) for i in range(4)])
    assert no_bank["local"].item() == pytest.approx(local, rel=1e-6)
    assert no_bank["global"].item() == 0.0 and no_bank["global_cluster"].item() == 0.0
    mean = P.mean(0).double()
    entropy = -float((mean * mean.log()).sum())
    assert no_bank["entropy"].item() == pytest.approx(entropy, rel=1e-6)
    assert no_bank["loss"].item() == pytest.approx(local + cluster_column_contrast(P, Q).item() - 5 * entropy,
                                                   rel=1e-6)
    bank = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])   # B = 2 anchors: rows of P are [a; a']
    both = torch.cat([P, Q])                                    # the 4B rows: a, a', n, a_j
    targets = torch.stack([bank[i % 2] for i in range(8)])      # each row's anchor's bank row
    with_bank = nnm_loss(P, Q, bank, entropy_weight=5.0)
    glob = -np.mean([math.log(float(both[r] @ targets[r])) for r in range(8)])
    assert with_bank["global"].item() == pytest.approx(glob, rel=1e-6)
    assert with_bank["global_cluster"].item() == pytest.approx(cluster_column_contrast(both, targets).item())
    assert with_bank["loss"].item() == pytest.approx(no_bank["loss"].item() + glob
                                                     + with_bank["global_cluster"].item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"bank must be \(B, K\) = \(2, 3\), got \(4, 3\)"):
        nnm_loss(P, Q, P, entropy_weight=1.0)


INFO = DataInfo(in_channels=1, image_size=28, num_classes=4, num_samples=40, num_clusters=4)


def build_nnm(**options):
    torch.manual_seed(0)
    return build_method(NNMConfig(projector_hidden_dim=32, feature_dim=16, num_neighbours=5, **options),
                        backbone="small_cnn", norm="batch", data=INFO)


def test_the_bank_holds_each_images_nearest_other_images_assignment():
    from sklearn.neighbors import NearestNeighbors

    method = build_nnm(num_heads=2)
    assert method.num_views == 3 and method.cfg.mining_features == "backbone"
    method.enter_stage("scan")
    features = torch.randn(40, 512, generator=torch.Generator().manual_seed(1))
    method.start_stage("scan", StageContext(features=lambda kind: features, cluster=None, num_clusters=4))
    assert method.wants_pseudo_labels(0) and not method.has_pseudo_labels()
    method.update_from_features(features, cluster=None, num_clusters=4)
    _, rows = NearestNeighbors(n_neighbors=2, metric="cosine", algorithm="brute").fit(
        features.double().numpy()).kneighbors(features.double().numpy())
    for h, head in enumerate(method.heads):
        expected = torch.softmax(head(features), 1)[torch.from_numpy(rows[:, 1])]
        torch.testing.assert_close(method.bank[h], expected.detach())
    assert method.has_pseudo_labels() and not method.head_selected   # heads are chosen at read-outs, not here
    method.enter_stage("selflabel")
    method.start_stage("selflabel", StageContext(features=lambda kind: features, cluster=None, num_clusters=4))
    assert method.has_pseudo_labels() and not method.wants_pseudo_labels(0)
    method.enter_stage("scan")       # the scan stage mines its neighbours afresh: a bank from before is stale
    method.start_stage("scan", StageContext(features=lambda kind: features, cluster=None, num_clusters=4))
    assert not method.has_pseudo_labels()


def test_the_step_matches_each_anchor_with_its_nearest_batch_anchor_and_its_bank_row():
    method = build_nnm(num_heads=1)
    method.enter_stage("scan")
    gen = torch.Generator().manual_seed(2)
    views = [torch.rand(6, 1, 28, 28, generator=gen) for _ in range(3)]
    indices = torch.tensor([3, 9, 0, 17, 25, 38])
    method.bank[0].copy_(torch.softmax(torch.randn(40, 4, generator=gen), 1))
    method.bank_ready.fill_(True)
    method.eval()   # batch-norm statistics fixed, so the oracle's forward pass is the step's
    with torch.no_grad():
        h = method.backbone(torch.cat(views))
        p = torch.softmax(method.heads[0](h), 1)
        distances = torch.cdist(h[:6], h[:6]) + torch.diag(torch.full((6,), float("inf")))
        nearest = [int(distances[i].argmin()) for i in range(6)]
        p_anchor, p_neighbour, p_second = p[:6], p[6:12], p[12:]
        P_, Q_ = torch.cat([p_anchor, p_second]), torch.cat([p_neighbour, p_anchor[nearest]])
    for stage_step, bank in [(0, None), (7, None), (8, method.bank[0][indices])]:   # 8 steps per epoch
        terms = method.training_step(views, indices, Progress(epoch=0, global_step=stage_step, steps_per_epoch=8,
                                                              total_steps=16, stage="scan", stage_step=stage_step))
        expected = nnm_loss(P_, Q_, bank, entropy_weight=5.0)
        for name in ("loss", "local", "local_cluster", "global", "global_cluster", "entropy"):
            assert terms[name].item() == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-6), (stage_step, name)
    assert expected["global"].item() > 0
    assert pair_consistency(P_, Q_).item() == pytest.approx(expected["local"].item())
    assert mean_assignment_entropy(P_).item() == pytest.approx(expected["entropy"].item())


def test_only_the_scan_stage_makes_and_takes_the_third_view(tmp_path, monkeypatch):
    seen = []
    train_step = Trainer.train_step

    def recording_train_step(self, views, indices, epoch):
        seen.append((self.stage.name, len(views)))
        return train_step(self, views, indices, epoch)

    monkeypatch.setattr(Trainer, "train_step", recording_train_step)
    launcher.main([str(REPO_ROOT / "config" / "mnist_cnn_nnm.yml"), f"run.output_dir={tmp_path}", *SMALL,
                   "method.scan_epochs=1", "method.selflabel_epochs=1"])
    assert seen == [("pretext", 2)] * 8 + [("scan", 3)] * 8 + [("selflabel", 2)] * 8
