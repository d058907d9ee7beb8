"""SimCLR and CC: a few CPU steps on a fixed batch, CC's head read-out, checkpoint state, and the
gathered losses' gradients on 1 process vs 2 gloo ranks."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import DataInfo, Progress, build_method
from models.cc import CCConfig
from models.simclr import SimCLRConfig
from tests.test_distributed import SCRIPTS, run_one_process
from tests.torchrun_util import run_torchrun
from utils.config import ConfigError

INFO = DataInfo(in_channels=1, image_size=28, num_classes=4, num_samples=32, num_clusters=4)
CONFIGS = {
    "simclr": lambda: SimCLRConfig(projector_hidden_dim=64, feature_dim=32, temperature=0.5),
    "cc": lambda: CCConfig(instance_hidden_dim=64, feature_dim=32, cluster_hidden_dim=64),
}


def fixed_batch(n: int = 32):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 28, 28, generator=gen)
    views = [images + 0.1 * torch.randn(images.shape, generator=gen) for _ in range(2)]
    return views, torch.arange(n)


def progress(step: int) -> Progress:
    return Progress(epoch=0, global_step=step, steps_per_epoch=10, total_steps=10)


def train_on_fixed_batch(method, views, indices, *, steps: int = 12) -> tuple[list[float], dict]:
    """Adam steps on one batch, every term checked finite; returns the losses and the last terms."""
    opt = torch.optim.Adam(method.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        terms = method.training_step(views, indices, progress(step))
        assert all(torch.isfinite(v) for v in terms.values()), terms
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        method.after_optimizer_step(progress(step))
        losses.append(terms["loss"].item())
    return losses, terms


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trains_on_a_fixed_batch(name):
    torch.manual_seed(0)
    method = build_method(CONFIGS[name](), backbone="small_cnn", norm="batch", data=INFO)
    views, indices = fixed_batch()
    losses, _ = train_on_fixed_batch(method, views, indices)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_resumes_the_same_next_loss(name):
    torch.manual_seed(0)
    a = build_method(CONFIGS[name](), backbone="small_cnn", norm="batch", data=INFO)
    views, indices = fixed_batch(8)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    a.training_step(views, indices, progress(0))["loss"].backward()
    opt.step()
    torch.manual_seed(1)
    b = build_method(CONFIGS[name](), backbone="small_cnn", norm="batch", data=INFO)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.training_step(views, indices, progress(1))["loss"],
                               a.training_step(views, indices, progress(1))["loss"])


def test_eval_features_shapes():
    views, _ = fixed_batch(5)
    simclr = build_method(CONFIGS["simclr"](), backbone="small_cnn", norm="batch", data=INFO).eval()
    cc = build_method(CONFIGS["cc"](), backbone="small_cnn", norm="batch", data=INFO).eval()
    with torch.no_grad():
        assert simclr.eval_features(views[0], "backbone").shape == (5, 512)
        proj = simclr.eval_features(views[0], "projector")
        assert proj.shape == (5, 32)
        torch.testing.assert_close(proj.norm(dim=1), torch.ones(5))
        assert cc.eval_features(views[0], "instance").shape == (5, 32)
        torch.testing.assert_close(cc.eval_features(views[0], "instance").norm(dim=1), torch.ones(5))
        probs = cc.eval_features(views[0], "cluster")
        assert probs.shape == (5, 4)
        torch.testing.assert_close(probs.sum(1), torch.ones(5))
    with pytest.raises(ValueError, match="unknown feature kind"):
        simclr.eval_features(views[0], "cluster")


def nt_xent_written_out(a, b, temperature, anchors_of_a_only=False):
    """Every one of the 2N rows of [a; b] as an anchor (or a's N rows alone): -log of its positive's share of
    exp(cos / T) over the other 2N - 1 rows, averaged."""
    rows = F.normalize(torch.cat([a, b]), dim=1)
    n, total = a.shape[0], 0.0
    anchors = n if anchors_of_a_only else 2 * n
    for i in range(anchors):
        others = [j for j in range(2 * n) if j != i]
        logits = rows[others] @ rows[i] / temperature
        positive = others.index((i + n) % (2 * n))
        total = total - (logits[positive] - torch.logsumexp(logits, dim=0))
    return total / anchors


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "anchors-of-view-1"])
def test_simclr_step_is_nt_xent_written_out(symmetric):
    torch.manual_seed(0)
    cfg = SimCLRConfig(projector_hidden_dim=64, feature_dim=32, temperature=0.3, symmetric=symmetric)
    method = build_method(cfg, backbone="small_cnn", norm="batch", data=INFO)
    views, indices = fixed_batch(8)
    loss = method.training_step(views, indices, progress(0))["loss"]
    z1, z2 = method.projector(method.backbone(torch.cat(views))).chunk(2)
    torch.testing.assert_close(loss, nt_xent_written_out(z1, z2, 0.3, anchors_of_a_only=not symmetric),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bn, norm, has_bn", [(True, "batch", True), (False, "batch", False), (True, "none", False)])
def test_projection_heads_have_batch_norm_only_when_asked_and_allowed(bn, norm, has_bn):
    from models.simclr import projection_head

    head = projection_head(8, 16, 4, bn=bn, norm=norm)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()) is has_bn


def test_cc_step_is_the_papers_loss():
    """Instance NT-Xent of the instance head's rows (both views' anchors), the cluster head's NT-Xent over the
    columns of the two views' softmax assignments, and the weighted entropy term: log K - H(P) for each view,
    P the mean assignment."""
    torch.manual_seed(0)
    cfg = CCConfig(instance_hidden_dim=64, feature_dim=32, cluster_hidden_dim=64, instance_temperature=0.4,
                   cluster_temperature=0.8, entropy_weight=0.7)
    method = build_method(cfg, backbone="small_cnn", norm="batch", data=INFO)
    views, indices = fixed_batch(8)
    terms = method.training_step(views, indices, progress(0))
    h = method.backbone(torch.cat(views))
    z1, z2 = method.instance_head(h).chunk(2)
    p1, p2 = F.softmax(method.cluster_head(h), dim=1).chunk(2)
    instance = nt_xent_written_out(z1, z2, 0.4)
    cluster = nt_xent_written_out(p1.t(), p2.t(), 0.8)
    entropy = sum(math.log(4) + (p.mean(0) * p.mean(0).log()).sum() for p in (p1, p2))
    for name, expected in (("instance", instance), ("cluster", cluster), ("entropy", entropy)):
        torch.testing.assert_close(terms[name], expected.detach(), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(terms["loss"], instance + cluster + 0.7 * entropy, rtol=1e-5, atol=1e-6)


def test_cc_head_predictions_are_argmax_cluster_ids():
    torch.manual_seed(0)
    cc = build_method(CONFIGS["cc"](), backbone="small_cnn", norm="batch", data=INFO).eval()
    assert cc.has_head and not build_method(CONFIGS["simclr"](), backbone="small_cnn", norm="batch",
                                            data=INFO).has_head
    images, _ = fixed_batch(16)
    with torch.no_grad():
        preds = cc.head_predictions(images[0])
        probs = cc.eval_features(images[0], "cluster")
    assert preds.shape == (16,) and preds.dtype == torch.long
    assert int(preds.min()) >= 0 and int(preds.max()) < INFO.num_clusters
    assert torch.equal(preds, probs.argmax(1))


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="method.temperature"):
        SimCLRConfig(temperature=0.0).validate()
    with pytest.raises(ConfigError, match="method.cluster_temperature"):
        CCConfig(cluster_temperature=-1.0).validate()
    with pytest.raises(ConfigError, match="method.entropy_weight"):
        CCConfig(entropy_weight=-0.5).validate()


def test_gathered_losses_give_the_same_gradients_on_one_and_two_ranks(tmp_path):
    run_one_process(SCRIPTS / "simclr_cc_grad.py", tmp_path / "one.pt")
    run_torchrun(SCRIPTS / "simclr_cc_grad.py", tmp_path / "two.pt", nproc=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name in ("simclr", "cc", "scan", "selflabel", "nnm", "dccm"):
        assert one[name]["terms"]["loss"] == pytest.approx(two[name]["terms"]["loss"], rel=1e-5), name
        grads_one, grads_two = one[name]["grads"], two[name]["grads"]
        assert grads_one.keys() == grads_two.keys() and len(grads_one) > 0
        for param, g in grads_one.items():
            torch.testing.assert_close(grads_two[param], g, rtol=1e-4, atol=1e-6, msg=f"{name}: {param}")


def test_cc_steps_on_extra_rows_train_the_instance_loss_alone():
    # Rows 24..31 are extra (STL-10's unlabeled images): a batch of them gives the instance term of a
    # full step on the same images (the same weights and views), no cluster terms, and the cluster head
    # as the parameters to leave alone; a batch mixing both kinds is refused.
    torch.manual_seed(0)
    extra_info = DataInfo(in_channels=1, image_size=28, num_classes=4, num_samples=32, num_clusters=4,
                          num_extra_rows=8)
    method = build_method(CONFIGS["cc"](), backbone="small_cnn", norm="batch", data=extra_info)
    plain = build_method(CONFIGS["cc"](), backbone="small_cnn", norm="batch", data=INFO)
    plain.load_state_dict(method.state_dict())
    views, _ = fixed_batch(8)
    terms = method.training_step(views, torch.arange(24, 32), progress(0))
    full = plain.training_step(views, torch.arange(24, 32), progress(0))
    assert sorted(terms) == ["instance", "loss"] and "cluster" in full
    assert terms["loss"].item() == pytest.approx(full["instance"].item(), rel=1e-6)
    assert method.parameters_left_alone() == list(method.cluster_head.parameters())
    terms["loss"].backward()   # every parameter takes part (DistributedDataParallel needs it), the head with 0
    assert all(p.grad is not None and not p.grad.any() for p in method.cluster_head.parameters())
    assert sorted(method.training_step(views, torch.arange(8), progress(1))) == sorted(full)
    assert method.parameters_left_alone() == []
    with pytest.raises(RuntimeError, match=r"CC: a batch mixes extra rows \(>= 24\) with clustered ones"):
        method.training_step(views, torch.arange(20, 28), progress(2))
