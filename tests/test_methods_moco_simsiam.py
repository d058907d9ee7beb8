"""MoCo v2 and SimSiam: losses against hand-computed values, a few CPU steps, the checkpointed queue."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from losses.moco import info_nce_loss
from losses.simsiam import negative_cosine, simsiam_loss
from models import DataInfo, Progress, build_method
from models.moco import MoCoConfig
from models.simsiam import SimSiamConfig
from tests.torchrun_util import REPO_ROOT, SHARED_DATA, run_torchrun
from utils.config import ConfigError

SCRIPTS = REPO_ROOT / "tests" / "dist_scripts"

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
        losses.append(float(terms["loss"].detach()))
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


def test_simsiam_step_groups_and_read_outs():
    """The step is simsiam_loss of each view's own pass (BN statistics per view); the predictor's group has
    its lr scale and the reference's fixed lr; the projector read-out has unit rows."""
    torch.manual_seed(0)
    cfg = SimSiamConfig(feature_dim=32, projector_hidden_dim=64, predictor_hidden_dim=16, predictor_lr_scale=3.0)
    method = build_method(cfg, backbone="small_cnn", norm="batch", data=DATA)
    views, indices = fixed_views()
    loss = method.training_step(views, indices, progress())["loss"]
    z1, z2 = (method.projector(method.backbone(x)) for x in views)
    torch.testing.assert_close(loss, simsiam_loss(method.predictor(z1), method.predictor(z2), z1, z2))
    groups = method.parameter_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, 3.0] and groups[1]["fixed_lr"] is True
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.predictor.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in [*method.backbone.parameters(),
                                                                      *method.projector.parameters()]}
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(method.eval_features(views[0], "projector"),
                                   F.normalize(method.projector(method.backbone(views[0])), dim=1))


def test_simsiam_config_names_the_bad_key():
    with pytest.raises(ConfigError, match="method.predictor_hidden_dim"):
        SimSiamConfig(predictor_hidden_dim=0).validate()


# ---------------------------------------------------------------- MoCo v2
def test_info_nce_by_hand():
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    queue = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    t = 0.5
    # row 0: positive 1, negatives 0 and 0 -> -log(e^2 / (e^2 + 2)) = log(1 + 2 e^-2)
    # row 1: positive 0, negatives 1 and 0 -> -log(1 / (1 + e^2 + 1)) = log(2 + e^2)
    expected = 0.5 * (math.log(1 + 2 * math.exp(-2)) + math.log(2 + math.exp(2)))
    assert float(info_nce_loss(q, k, queue, t)) == pytest.approx(expected, rel=1e-6)


def test_info_nce_gradient_reaches_only_the_queries():
    q = F.normalize(torch.randn(2, 3), dim=1).requires_grad_()
    k, queue = F.normalize(torch.randn(2, 3), dim=1), F.normalize(torch.randn(4, 3), dim=1)
    info_nce_loss(q, k, queue, 0.1).backward()
    assert q.grad.abs().sum() > 0


def small_moco(**overrides):
    torch.manual_seed(0)
    kwargs = dict(projector_hidden_dim=64, feature_dim=16, queue_size=40, momentum=0.9, temperature=0.2,
                  symmetric=True)
    kwargs.update(overrides)
    return build_method(MoCoConfig(**kwargs), backbone="small_cnn", norm="batch", data=DATA)


def small_moco_encoders_apart(**overrides):
    """small_moco with its query and key encoders apart, as after some training."""
    method = small_moco(**overrides)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return method


def test_moco_trains_on_cpu(monkeypatch):
    method = small_moco()
    assert method.key_backbone is not method.backbone
    assert not any(p.requires_grad for p in method.key_parameters())
    # On one fixed batch the queue would fill with this batch's own earlier keys, negatives as close to
    # the query as its positive, and the loss would rise: measure learning against the initial queue.
    monkeypatch.setattr(method, "enqueue", lambda keys: None)
    losses = train_losses(method, steps=8)
    assert losses[-1] < losses[0] - 0.05, losses
    key_params = list(method.key_parameters())
    assert not all(torch.equal(a, b) for a, b in zip(key_params, method.backbone.parameters()))


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-sided"])
def test_moco_step_is_info_nce_written_out(symmetric):
    """InfoNCE of the query q1 = |f(x1)| against its key k2 = |f_k(x2)| (the positive, logit 0) and the queue
    (negatives), at temperature T, as cross-entropy written out here; with `symmetric`, the mean with
    (q2, k1). The step's keys, k2 (or k1 then k2), are what the next enqueue writes; the keys, the queue
    and the key encoder take no gradient, and the EMA moves the key encoder towards the query encoder."""
    method = small_moco_encoders_apart(symmetric=symmetric, temperature=0.3)
    method.train()
    views, indices = fixed_views()
    queue = method.queue.clone()
    loss = method.training_step(views, indices, progress())["loss"]

    def info_nce(q, k):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.3
        return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()

    with torch.no_grad():
        k1, k2 = (F.normalize(method.key_projector(method.key_backbone(x)), dim=1) for x in views)
    q1, q2 = (F.normalize(method.projector(method.backbone(x)), dim=1) for x in views)
    expected = (info_nce(q1, k2) + info_nce(q2, k1)) / 2 if symmetric else info_nce(q1, k2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is None for p in method.key_parameters()) and not method.queue.requires_grad
    assert all(p.grad is not None for p in method.backbone.parameters())
    key_before = [p.clone() for p in method.key_parameters()]
    online = list(method.backbone.parameters()) + list(method.projector.parameters())
    method.after_optimizer_step(progress())
    for key, before, query in zip(method.key_parameters(), key_before, online):
        torch.testing.assert_close(key, 0.9 * before + 0.1 * query)
    written = torch.cat([k1, k2]) if symmetric else k2
    torch.testing.assert_close(method.queue[:written.shape[0]], written, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method.queue[written.shape[0]:], queue[written.shape[0]:])
    assert [g["lr_scale"] for g in method.parameter_groups()] == [1.0]
    assert {id(p) for p in method.parameter_groups()[0]["params"]} == {id(p) for p in online}


@pytest.mark.parametrize("norm, shuffling_bn, shuffled", [("batch", True, True), ("batch", False, False),
                                                          ("none", True, False)])
def test_the_key_batch_is_shuffled_only_with_batch_norm(norm, shuffling_bn, shuffled):
    cfg = MoCoConfig(projector_hidden_dim=8, feature_dim=4, queue_size=8, shuffling_bn=shuffling_bn)
    assert build_method(cfg, backbone="small_cnn", norm=norm, data=DATA).shuffle_key_bn is shuffled


def test_moco_read_outs():
    method = small_moco_encoders_apart()
    method.eval()
    images = fixed_views()[0][0][:5]
    with torch.no_grad():
        torch.testing.assert_close(method.eval_features(images, "backbone"), method.backbone(images))
        torch.testing.assert_close(method.eval_features(images, "key_backbone"), method.key_backbone(images))
        torch.testing.assert_close(method.eval_features(images, "projector"),
                                   F.normalize(method.projector(method.backbone(images)), dim=1))
        assert not torch.allclose(method.backbone(images), method.key_backbone(images))


def test_moco_steps_fill_the_queue():
    method = small_moco()
    before = method.queue.clone()
    losses = train_losses(method, steps=3)
    assert all(math.isfinite(v) for v in losses)
    # 3 steps x 2 views x 16 keys = 96 rows written into a 40-row queue: the pointer wrapped to 96 % 40
    assert int(method.queue_ptr) == 96 % 40
    assert not torch.equal(method.queue, before)
    torch.testing.assert_close(method.queue.norm(dim=1), torch.ones(40))


def test_moco_enqueue_wraps_in_order():
    method = small_moco(queue_size=5, feature_dim=2)
    method.enqueue(torch.arange(6.0).view(3, 2))
    method.enqueue(torch.arange(6.0, 12.0).view(3, 2))   # rows 3, 4, then wraps to 0
    expected_rows = {0: [10.0, 11.0], 1: [2.0, 3.0], 2: [4.0, 5.0], 3: [6.0, 7.0], 4: [8.0, 9.0]}
    for row, value in expected_rows.items():
        assert method.queue[row].tolist() == value
    assert int(method.queue_ptr) == 1
    with pytest.raises(RuntimeError, match="method.queue_size"):
        method.enqueue(torch.zeros(6, 2))


@pytest.mark.parametrize("symmetric", [True, False])
def test_moco_refuses_a_batch_its_queue_cannot_hold_before_training(symmetric):
    """check_batch counts the keys a real step enqueues (16 images: 32 keys when symmetric, else 16)."""
    method = small_moco(symmetric=symmetric)
    views, indices = fixed_views()
    method.train()
    method.training_step(views, indices, progress(0))
    enqueued = method._pending_keys.shape[0]
    assert enqueued == views[0].shape[0] * (2 if symmetric else 1)
    for queue_size in (enqueued, enqueued + 1):
        small_moco(queue_size=queue_size, symmetric=symmetric).check_batch(batch_size_per_rank=views[0].shape[0] // 2,
                                                                           world_size=2)
    views_note = " x 2 views, method.symmetric" if symmetric else ""
    with pytest.raises(ValueError, match=rf"^method.queue_size: {enqueued - 1} rows, fewer than the {enqueued} keys "
                                         rf"enqueued per step \(train.batch_size_per_rank=8 x 2 "
                                         rf"rank\(s\){views_note}\); expected at least {enqueued}$"):
        small_moco(queue_size=enqueued - 1, symmetric=symmetric).check_batch(batch_size_per_rank=8, world_size=2)


@pytest.mark.parametrize("config", ["moco", "pcl"])
def test_a_queue_smaller_than_a_step_is_a_one_line_error_before_training(tmp_path, config):
    import main as launcher

    argv = [str(REPO_ROOT / "config" / f"mnist_cnn_{config}.yml"), f"run.output_dir={tmp_path}", "run.name=run",
            "data.name=mnist", f"data.root={SHARED_DATA / 'mnist.npz'}", "data.limit=128", "method.symmetric=true",
            "train.batch_size_per_rank=32", "method.queue_size=63", "logging.progress_bar=false",
            *(["method.num_clusters_per_level=[10, 20]"] if config == "pcl" else [])]
    with pytest.raises(SystemExit, match=r"^error: method.queue_size: 63 rows, fewer than the 64 keys enqueued per "
                                         r"step \(train.batch_size_per_rank=32 x 1 rank\(s\) x 2 views, "
                                         r"method.symmetric\); expected at least 64$"):
        launcher.main(argv)
    assert not (tmp_path / "run").exists()


def test_moco_queue_round_trips_through_state_dict(tmp_path):
    method = small_moco()
    train_losses(method, steps=2)
    path = tmp_path / "state.pt"
    torch.save(method.state_dict(), path)
    restored = small_moco()
    assert not torch.equal(restored.queue, method.queue)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(restored.queue, method.queue)
    assert int(restored.queue_ptr) == int(method.queue_ptr) == 64 % 40


def test_moco_config_names_the_bad_key():
    with pytest.raises(ConfigError, match="method.queue_size"):
        MoCoConfig(queue_size=0).validate()
    with pytest.raises(ConfigError, match="method.temperature"):
        MoCoConfig(temperature=0).validate()


def test_moco_queue_holds_both_ranks_keys_in_rank_order(tmp_path):
    run_torchrun(SCRIPTS / "moco_queue.py", tmp_path / "out", nproc=2)
    ranks = [torch.load(tmp_path / f"out.rank{r}.pt") for r in range(2)]
    rows = ranks[0]["step_keys"].shape[0]
    step_keys = torch.cat([r["step_keys"] for r in ranks])       # rank 0's keys, then rank 1's
    explicit = torch.cat([r["explicit_keys"] for r in ranks])
    for r in ranks:
        assert r["ptr_after_step"] == 2 * rows and r["ptr"] == 4 * rows
        torch.testing.assert_close(r["queue_after_step"][:2 * rows], step_keys)
        torch.testing.assert_close(r["queue"][:2 * rows], step_keys)
        torch.testing.assert_close(r["queue"][2 * rows:4 * rows], explicit)
    torch.testing.assert_close(ranks[0]["queue"], ranks[1]["queue"])  # every rank holds the same queue


def test_moco_resume_reproduces_the_next_epochs_losses(tmp_path):
    """The queue and its pointer are checkpointed: a run stopped after epoch 0 and resumed takes the same
    epoch-1 steps as the uninterrupted run (a queue lost at the restart would change every loss)."""
    import main as launcher

    def step_losses(run_dir, epoch):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["step/loss"] for r in rows if "step/loss" in r and r["epoch"] == epoch]

    config = str(REPO_ROOT / "config" / "mnist_cnn_moco.yml")
    small = ["data.name=mnist", f"data.root={SHARED_DATA / 'mnist.npz'}", "data.limit=128", "augment.elastic_p=0", "run.threads_per_rank=1",
             "train.batch_size_per_rank=32", "train.epochs=2", "train.log_every_steps=1", "train.time_budget_minutes=0",
             "method.projector_hidden_dim=32", "method.feature_dim=16", "method.queue_size=100",
             "eval.every_epochs=2", "eval.n_init=1", "cluster.n_init=1", "logging.progress_bar=false"]
    launcher.main([config, f"run.output_dir={tmp_path}", "run.name=straight", *small])
    launcher.main([config, f"run.output_dir={tmp_path}", "run.name=split", *small, "train.time_budget_minutes=1e-6"])
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and int(state["model"]["queue_ptr"]) == (4 * 64) % 100
    launcher.main([config, f"run.output_dir={tmp_path}", "run.name=split", *small, "--resume", "auto"])
    straight, resumed = step_losses(tmp_path / "straight", 1), step_losses(tmp_path / "split", 1)
    assert len(straight) == 4
    assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-7)
