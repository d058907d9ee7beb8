"""MoCo v2 and SimSiam: losses against hand-computed values, a few CPU steps, the checkpointed queue."""
import pytest
import torch

from losses.simsiam import negative_cosine, simsiam_loss
from models import DataInfo, Progress, build_method
from models.simsiam import SimSiamConfig
from utils.config import ConfigError

DATA = DataInfo(in_channels=1, image_size=28, num_classes=10, num_samples=64, num_clusters=10)


def progress(step: int = 0) -> Progress:
    return Progress(epoch=0, global_step=step, steps_per_epoch=10, total_steps=10)


def fixed_views(batch: int = 16):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=gen)
    noisy = [(x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1) for _ in range(2)]
    return noisy, torch.arange(batch)


def train_losses(method, steps: int) -> list[float]:
    views, indices = fixed_views()
    groups = [{"params": g["params"], "lr": 1e-3 * g.get("lr_scale", 1.0)} for g in method.parameter_groups()]
    optimizer = torch.optim.Adam(groups)
    method.train()
    losses = []
    for step in range(steps):
        terms = method.training_step(views, indices, progress(step))
        assert torch.isfinite(terms["loss"])
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        method.after_optimizer_step(progress(step))
        losses.append(float(terms["loss"]))
    return losses


# ---------------------------------------------------------------- SimSiam
def test_simsiam_loss_by_hand():
    p1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    z2 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])     # cos 1 and 0 -> D = -(1 + 0) / 2 = -0.5
    p2 = torch.tensor([[3.0, 4.0, 0.0], [1.0, 1.0, 0.0]])
    z1 = torch.tensor([[3.0, 0.0, 4.0], [-1.0, -1.0, 0.0]])   # cos 9/25 and -1 -> D = -(0.36 - 1) / 2 = 0.32
    assert float(negative_cosine(p1, z2)) == pytest.approx(-0.5)
    assert float(negative_cosine(p2, z1)) == pytest.approx(0.32)
    assert float(simsiam_loss(p1, p2, z1, z2)) == pytest.approx(0.5 * (-0.5 + 0.32))


def test_simsiam_loss_stops_the_gradient_of_the_projections():
    p = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], requires_grad=True)
    simsiam_loss(p, p, z, z).backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0


def test_simsiam_trains_on_cpu():
    torch.manual_seed(0)
    cfg = SimSiamConfig(feature_dim=32, projector_hidden_dim=64, predictor_hidden_dim=16)
    method = build_method(cfg, backbone="small_cnn", norm="batch", data=DATA)
    assert isinstance(method.projector[-1], torch.nn.BatchNorm1d) and not method.projector[-1].affine
    losses = train_losses(method, steps=8)
    assert losses[-1] < losses[0] - 0.05, losses
    assert method.eval_features(fixed_views()[0][0], "backbone").shape == (16, 512)


def test_simsiam_config_names_the_bad_key():
    with pytest.raises(ConfigError, match="method.predictor_hidden_dim"):
        SimSiamConfig(predictor_hidden_dim=0).validate()
