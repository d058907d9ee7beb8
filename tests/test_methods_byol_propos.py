"""BYOL and ProPos (clustering terms on): a few CPU steps on a fixed batch lower the loss and keep it
finite; ProPos's step, target, schedule and read-outs against the paper's formulas written out here.
Their losses are checked by hand in test_losses_propos.py, their resume in test_train.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses.propos import prototype_scattering_loss
from models import build_method
from models.base import Progress
from models.byol import BYOLConfig
from models.propos import ProPosConfig
from tests.test_methods_simclr_cc import INFO, fixed_batch, train_on_fixed_batch

CONFIGS = {
    "byol": lambda: BYOLConfig(projector_hidden_dim=64, feature_dim=32, predictor_hidden_dim=64,
                               momentum_base=0.9),
    "propos": lambda: ProPosConfig(projector_hidden_dim=64, feature_dim=32, predictor_hidden_dim=64,
                                   momentum_base=0.9, warmup_epochs=0, cluster_loss_weight=1.0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trains_on_a_fixed_batch(name):
    torch.manual_seed(0)
    method = build_method(CONFIGS[name](), backbone="small_cnn", norm="batch", data=INFO)
    views, indices = fixed_batch()
    if name == "propos":  # pseudo-labels and prototypes as the EM loop would set them
        labels = indices % INFO.num_clusters
        with torch.no_grad():
            feats = method.eval_features(views[0], "projector")
        method.set_pseudo_labels(labels, torch.stack([feats[labels == k].mean(0) for k in range(INFO.num_clusters)]))
    losses, terms = train_on_fixed_batch(method, views, indices)
    if name == "propos":
        assert "psl" in terms  # the prototype scattering term ran
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


def alignment(prediction, target):
    """BYOL's loss: the mean over the batch of || p / |p| - k / |k| ||^2."""
    return (F.normalize(prediction, dim=1) - F.normalize(target, dim=1)).pow(2).sum(1).mean()


@pytest.mark.parametrize("epoch, symmetric", [(0, True), (0, False), (1, True), (1, False)],
                         ids=["warm-up", "warm-up-one-sided", "clustering", "clustering-one-sided"])
def test_propos_step_is_the_papers_loss(epoch, symmetric):
    """Warm-up (epoch < warmup_epochs): BYOL's alignment alone, of the plain predictions (sigma 0), averaged over
    both views or of view 1's alone. After it: the predictions are made from q + sigma * eps (positive
    sampling), and the prototype scattering loss of both (normalised online, target) pairs, averaged, is added
    with its weight. Targets carry no gradient."""
    cfg = ProPosConfig(projector_hidden_dim=64, feature_dim=32, predictor_hidden_dim=64, momentum_base=0.9,
                       warmup_epochs=1, cluster_loss_weight=0.3, temperature=0.7, latent_std=0.2,
                       symmetric=symmetric)
    torch.manual_seed(0)
    method = build_method(cfg, backbone="small_cnn", norm="batch", data=INFO)
    views, indices = fixed_batch()
    labels = (indices * 7) % INFO.num_clusters
    method.set_pseudo_labels(labels, torch.zeros(INFO.num_clusters, 32))
    with torch.no_grad():  # online and target apart, as after some training
        for p in method.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    progress = Progress(epoch=epoch, global_step=3, steps_per_epoch=10, total_steps=20)
    torch.manual_seed(1)
    terms = method.training_step(views, indices, progress)

    torch.manual_seed(1)  # the same noise draws, in the step's order: q1's, then q2's
    clustering = epoch >= cfg.warmup_epochs
    sigma = cfg.latent_std if clustering else 0.0
    with torch.no_grad():
        k1, k2 = (F.normalize(method.target_projector(method.target_backbone(x)), dim=1) for x in views)
    q1, q2 = (method.projector(method.backbone(x)) for x in views)
    p1 = method.predictor(q1 + sigma * torch.randn_like(q1))
    expected_align = alignment(p1, k2)
    if symmetric:
        p2 = method.predictor(q2 + sigma * torch.randn_like(q2))
        expected_align = (expected_align + alignment(p2, k1)) / 2
    torch.testing.assert_close(terms["align"], expected_align.detach(), rtol=1e-5, atol=1e-6)
    expected = expected_align
    if clustering:
        scatter = [prototype_scattering_loss(F.normalize(q, dim=1), k, labels, num_clusters=INFO.num_clusters,
                                             temperature=0.7) for q, k in ((q1, k2), (q2, k1))]
        torch.testing.assert_close(terms["psl"], ((scatter[0] + scatter[1]) / 2).detach(), rtol=1e-5, atol=1e-6)
        expected = expected_align + 0.3 * (scatter[0] + scatter[1]) / 2
    else:
        assert "psl" not in terms
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    terms["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.target_parameters())
    assert all(p.grad is not None for p in method.predictor.parameters())


def test_propos_target_schedule_groups_and_read_outs():
    cfg = ProPosConfig(projector_hidden_dim=64, feature_dim=32, predictor_hidden_dim=64, momentum_base=0.9,
                       momentum_schedule="cosine", predictor_lr_scale=7.0)
    torch.manual_seed(0)
    method = build_method(cfg, backbone="small_cnn", norm="batch", data=INFO)
    # the target starts as a frozen copy of the online network; no pseudo-label is set yet
    online = list(method.backbone.parameters()) + list(method.projector.parameters())
    target = list(method.target_parameters())
    assert len(online) == len(target) and all(torch.equal(o, t) for o, t in zip(online, target))
    assert all(not t.requires_grad for t in target) and all(o.requires_grad for o in online)
    assert method.pseudo_labels.tolist() == [-1] * INFO.num_samples
    views, indices = fixed_batch()
    with pytest.raises(RuntimeError, match="needs pseudo-labels, but some are unset"):
        method.training_step(views, indices, Progress(epoch=cfg.warmup_epochs, global_step=0, steps_per_epoch=1,
                                                      total_steps=1))
    # the EMA momentum: cosine from the base at the start to 1 at the end (BYOL), or the base throughout
    constant = build_method(ProPosConfig(projector_hidden_dim=8, feature_dim=4, predictor_hidden_dim=8,
                                         momentum_base=0.9, momentum_schedule="constant"),
                            backbone="small_cnn", norm="batch", data=INFO)
    for step, total in ((0, 10), (5, 10), (10, 10), (3, 12)):
        progress = Progress(epoch=0, global_step=step, steps_per_epoch=10, total_steps=total)
        assert method.momentum(progress) == pytest.approx(1 - 0.1 * (math.cos(math.pi * step / total) + 1) / 2)
        assert constant.momentum(progress) == 0.9
    # after a step of the optimizer: target <- m * target + (1 - m) * online
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in target]
    progress = Progress(epoch=0, global_step=5, steps_per_epoch=10, total_steps=10)
    method.after_optimizer_step(progress)
    m = method.momentum(progress)
    for t, b, o in zip(target, before, online):
        torch.testing.assert_close(t, m * b + (1 - m) * o)
    # parameter groups: the online backbone and projector at the base lr, the predictor at its scale
    groups = method.parameter_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, 7.0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in online}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.predictor.parameters()}
    # read-outs: the target's normalised projection (the paper's), the target backbone, the online backbone
    method.eval()
    images = views[0][:5]
    with torch.no_grad():
        torch.testing.assert_close(method.eval_features(images, "projector"),
                                   F.normalize(method.target_projector(method.target_backbone(images)), dim=1))
        torch.testing.assert_close(method.eval_features(images, "backbone"), method.target_backbone(images))
        torch.testing.assert_close(method.eval_features(images, "online_backbone"), method.backbone(images))
        assert not torch.allclose(method.backbone(images), method.target_backbone(images))


@pytest.mark.parametrize("norm, shuffling_bn, shuffled", [("batch", True, True), ("batch", False, False),
                                                          ("none", True, False)])
def test_the_target_batch_is_shuffled_only_with_batch_norm(norm, shuffling_bn, shuffled):
    cfg = ProPosConfig(projector_hidden_dim=8, feature_dim=4, predictor_hidden_dim=8, shuffling_bn=shuffling_bn)
    assert build_method(cfg, backbone="small_cnn", norm=norm, data=INFO).shuffle_target_bn is shuffled
