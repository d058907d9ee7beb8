"""PCL: ProtoNCE and the concentration phi against hand-computed values, negative sampling, the E-step's
buffers, warm-up, a few CPU steps, and resumption through the launcher with checkpointed prototypes."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from losses.pcl import proto_nce_level, proto_nce_loss, prototype_concentration, sample_negative_prototypes
from models import DataInfo, Progress, build_method
from models.pcl import PCLConfig
from tests.torchrun_util import REPO_ROOT, SHARED_DATA
from utils.config import ConfigError

DATA = DataInfo(in_channels=1, image_size=28, num_classes=10, num_samples=32, num_clusters=10)


def progress(epoch: int = 0, step: int = 0) -> Progress:
    return Progress(epoch=epoch, global_step=step, steps_per_epoch=10, total_steps=100)


def fixed_views(batch: int = 16):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=gen)
    noisy = [(x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1) for _ in range(2)]
    return noisy, 2 * torch.arange(batch)   # even positions: under round_robin_cluster, odd clusters are negatives


def small_pcl(**overrides):
    torch.manual_seed(0)
    kwargs = dict(projector_hidden_dim=64, feature_dim=16, queue_size=40, momentum=0.9, temperature=0.2,
                  symmetric=True, num_clusters_per_level=[4, 6], num_negative_prototypes=4, warmup_epochs=1)
    kwargs.update(overrides)
    return build_method(PCLConfig(**kwargs), backbone="small_cnn", norm="batch", data=DATA)


def round_robin_cluster(calls: list):
    """A stand-in for k-means: sample n goes to cluster n % K; centroids are that cluster's mean."""
    def cluster(features, k):
        calls.append(k)
        labels = torch.arange(features.shape[0]) % k
        centroids = torch.stack([features[labels == j].mean(dim=0) for j in range(k)])
        return labels, centroids
    return cluster


# ---------------------------------------------------------------- concentration phi
def test_concentration_by_hand():
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [20.0, 20.0]])
    features = torch.tensor([
        [1.0, 0.0], [-3.0, 0.0],                           # cluster 0: distances 1, 3
        [11.0, 0.0], [9.0, 0.0], [10.0, 1.0],              # cluster 1: 1, 1, 1
        [0.0, 11.0],                                       # cluster 2: one member
        [12.0, 10.0], [8.0, 10.0], [10.0, 12.0], [10.0, 8.0],  # cluster 3: 2, 2, 2, 2
    ])                                                     # cluster 4: empty
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])
    a, b, d = 2 / math.log(2 + 10), 1 / math.log(3 + 10), 2 / math.log(4 + 10)
    raw = [a, b, a, d, a]                 # clusters 2 and 4 (Z <= 1) take the largest measured phi, a
    ordered = sorted(raw)                 # b < d < a = a = a; quantiles at positions 0.1 x 4 and 0.9 x 4
    low = ordered[0] + 0.4 * (ordered[1] - ordered[0])
    high = ordered[3] + 0.6 * (ordered[4] - ordered[3])
    clipped = [min(max(v, low), high) for v in raw]
    tau = 0.5
    expected = torch.tensor([tau * v / (sum(clipped) / 5) for v in clipped])
    phi = prototype_concentration(features, labels, centroids, temperature=tau)
    torch.testing.assert_close(phi, expected.float())
    assert float(phi.mean()) == pytest.approx(tau)
    assert float(phi[2]) == pytest.approx(float(phi.max()))   # the one-member cluster gets the maximum


def test_concentration_without_a_measurable_cluster_is_the_temperature():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    phi = prototype_concentration(features, torch.tensor([0, 1]), features.clone(), temperature=0.3)
    torch.testing.assert_close(phi, torch.full((2,), 0.3))
    # every member on its centroid: phi would be all zeros (a division by zero in the loss)
    phi = prototype_concentration(torch.ones(4, 2), torch.tensor([0, 0, 1, 1]), torch.ones(2, 2), temperature=0.3)
    torch.testing.assert_close(phi, torch.full((2,), 0.3))


# ---------------------------------------------------------------- negatives
def test_negatives_are_nobodys_positive_and_capped_at_what_exists():
    positives = torch.tensor([0, 2, 2])
    assert sample_negative_prototypes(positives, 5, 10).tolist() == [1, 3, 4]   # only 3 exist: no error
    assert sample_negative_prototypes(positives, 5, 0).numel() == 0
    assert sample_negative_prototypes(torch.tensor([0, 1]), 2, 3).numel() == 0
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = sample_negative_prototypes(positives, 5, 2, generator=gen).tolist()
        assert len(ids) == 2 and len(set(ids)) == 2 and set(ids) <= {1, 3, 4}
        seen.update(ids)
    assert seen == {1, 3, 4}
    torch.manual_seed(3)
    first = sample_negative_prototypes(torch.tensor([5]), 100, 10)
    torch.manual_seed(3)
    assert torch.equal(first, sample_negative_prototypes(torch.tensor([5]), 100, 10))   # seeded from the torch RNG


# ---------------------------------------------------------------- ProtoNCE
def test_proto_nce_with_two_granularities_by_hand():
    s = 1 / math.sqrt(2)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # level A: K = 3, both rows have their own prototype, prototype 2 is the negative
    proto_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    phi_a = torch.tensor([0.5, 1.0, 0.25])
    # row 0: positive 1/0.5 = 2, negative -1/0.25 = -4 -> log(1 + e^-6)
    # row 1: positive 1/1 = 1, negative 0/0.25 = 0     -> log(1 + e^-1)
    level_a = 0.5 * (math.log(1 + math.exp(-6)) + math.log(1 + math.exp(-1)))
    # level B: K = 4, both rows in prototype 3, negatives 0 and 2
    proto_b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [s, s]])
    phi_b = torch.tensor([1.0, 0.5, 0.5, 2.0])
    # row 0: positive s/2, negatives 1/1 = 1 and 0/0.5 = 0  -> -log(e^(s/2) / (e^(s/2) + e + 1))
    # row 1: positive s/2, negatives 0/1 = 0 and -1/0.5 = -2 -> -log(e^(s/2) / (e^(s/2) + 1 + e^-2))
    p = math.exp(s / 2)
    level_b = 0.5 * (-math.log(p / (p + math.e + 1)) - math.log(p / (p + 1 + math.exp(-2))))
    labels = [torch.tensor([0, 1]), torch.tensor([3, 3])]
    negatives = [torch.tensor([2]), torch.tensor([0, 2])]
    assert float(proto_nce_level(q, labels[0], proto_a, phi_a, negatives[0])) == pytest.approx(level_a, rel=1e-6)
    assert float(proto_nce_level(q, labels[1], proto_b, phi_b, negatives[1])) == pytest.approx(level_b, rel=1e-6)
    total = proto_nce_loss(q, labels, [proto_a, proto_b], [phi_a, phi_b], negatives)
    assert float(total) == pytest.approx(0.5 * (level_a + level_b), rel=1e-6)


def test_proto_nce_without_negatives_is_zero_and_reaches_only_the_queries():
    q = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    prototypes = F.normalize(torch.randn(5, 4), dim=1)
    no_negatives = torch.tensor([], dtype=torch.long)
    loss = proto_nce_level(q, torch.tensor([0, 1, 1]), prototypes, torch.full((5,), 0.2), no_negatives)
    assert float(loss.detach()) == 0.0
    loss = proto_nce_level(q, torch.tensor([0, 1, 1]), prototypes, torch.full((5,), 0.2), torch.tensor([2, 4]))
    loss.backward()
    assert q.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one labels/prototypes"):
        proto_nce_loss(q, [torch.tensor([0, 1, 1])], [prototypes, prototypes], [torch.ones(5)], [torch.tensor([2])])


# ---------------------------------------------------------------- the method
def test_e_step_fills_every_level_with_normalised_prototypes_and_phi():
    method = small_pcl()
    assert method.pseudo_labels.shape == (2, 32) and bool((method.pseudo_labels == -1).all())
    features = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    calls = []
    method.update_from_features(features, round_robin_cluster(calls), num_clusters=10)
    assert calls == [4, 6]                                     # one k-means per level; cluster.num_clusters unused
    unit = F.normalize(features, dim=1)                        # v' is clustered normalised
    for m, k in enumerate([4, 6]):
        labels = torch.arange(32) % k
        centroids = torch.stack([unit[labels == j].mean(dim=0) for j in range(k)])
        assert torch.equal(method.pseudo_labels[m], labels)
        torch.testing.assert_close(method.prototypes(m), F.normalize(centroids, dim=1))
        torch.testing.assert_close(method.concentration(m),
                                   prototype_concentration(unit, labels, centroids, temperature=0.2))
    names = set(method.state_dict())
    assert {"pseudo_labels", "prototypes_0", "prototypes_1", "concentration_0", "concentration_1"} <= names
    # Training needs K <= N for every level (the Trainer refuses less before it starts); the weights
    # of a level larger than the data evaluated can still be built.
    assert small_pcl(num_clusters_per_level=[40, 8]).training_cluster_counts() == {"method.num_clusters_per_level": 40}


def test_warm_up_is_plain_info_nce():
    method = small_pcl(warmup_epochs=2)
    assert not method.wants_pseudo_labels(1) and method.wants_pseudo_labels(2)
    assert not small_pcl(proto_loss_weight=0.0, warmup_epochs=0).wants_pseudo_labels(5)
    views, indices = fixed_views()
    method.train()
    terms = method.training_step(views, indices, progress(epoch=1))
    assert "proto_nce" not in terms and torch.equal(terms["loss"], terms["info_nce"])
    with pytest.raises(RuntimeError, match="pseudo-labels"):
        method.training_step(views, indices, progress(epoch=2))


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-sided"])
def test_proto_term_is_added_with_its_weight(monkeypatch, symmetric):
    """The ProtoNCE term is the mean over the queries (both views' with `symmetric`, else view 1's) of each
    query's ProtoNCE, and enters the loss with its weight."""
    import models.pcl as pcl_module

    method = small_pcl(warmup_epochs=0, proto_loss_weight=0.5, symmetric=symmetric)
    method.update_from_features(torch.randn(32, 16), round_robin_cluster([]), num_clusters=10)
    views, indices = fixed_views()
    method.train()
    per_query = []

    def recording(*args, **kwargs):
        per_query.append(proto_nce_loss(*args, **kwargs))
        return per_query[-1]

    monkeypatch.setattr(pcl_module, "proto_nce_loss", recording)
    terms = method.training_step(views, indices, progress())
    assert len(per_query) == (2 if symmetric else 1) and float(terms["proto_nce"]) > 0
    torch.testing.assert_close(terms["proto_nce"], (sum(per_query) / len(per_query)).detach())
    torch.testing.assert_close(terms["loss"].detach(), terms["info_nce"] + 0.5 * terms["proto_nce"])


def test_pcl_trains_on_cpu(monkeypatch):
    method = small_pcl(warmup_epochs=0)
    method.update_from_features(torch.randn(32, 16, generator=torch.Generator().manual_seed(2)),
                                round_robin_cluster([]), num_clusters=10)
    # as for MoCo: on one fixed batch the queue would fill with the batch's own keys; keep the initial queue
    monkeypatch.setattr(method, "enqueue", lambda keys: None)
    views, indices = fixed_views()
    optimizer = torch.optim.Adam([g["params"] for g in method.parameter_groups()][0], lr=1e-3)
    method.train()
    losses, protos = [], []
    for step in range(8):
        terms = method.training_step(views, indices, progress(step=step))
        assert all(torch.isfinite(v) for v in terms.values()), terms
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        method.after_optimizer_step(progress(step=step))
        losses.append(float(terms["loss"].detach()))
        protos.append(float(terms["proto_nce"]))
    assert losses[-1] < losses[0] - 0.05, losses
    assert protos[-1] < protos[0], protos


def test_state_dict_round_trip_gives_the_same_next_loss(tmp_path):
    method = small_pcl(warmup_epochs=0)
    method.update_from_features(torch.randn(32, 16), round_robin_cluster([]), num_clusters=10)
    views, indices = fixed_views()
    method.train()
    method.training_step(views, indices, progress())["loss"].backward()
    method.after_optimizer_step(progress())
    torch.save(method.state_dict(), tmp_path / "state.pt")
    restored = small_pcl(warmup_epochs=0)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for name in ("pseudo_labels", "prototypes_1", "concentration_1", "queue"):
        assert torch.equal(getattr(restored, name), getattr(method, name))
    restored.train()
    torch.manual_seed(5)
    expected = method.training_step(views, indices, progress(step=1))["loss"]
    torch.manual_seed(5)
    torch.testing.assert_close(restored.training_step(views, indices, progress(step=1))["loss"], expected)


def test_pcl_config_names_the_bad_key():
    with pytest.raises(ConfigError, match="method.num_clusters_per_level"):
        PCLConfig(num_clusters_per_level=[]).validate()
    with pytest.raises(ConfigError, match="method.num_clusters_per_level"):
        PCLConfig(num_clusters_per_level=[10, 1]).validate()
    with pytest.raises(ConfigError, match="method.num_negative_prototypes"):
        PCLConfig(num_negative_prototypes=-1).validate()
    with pytest.raises(ConfigError, match="method.queue_size"):   # MoCo's checks still run
        PCLConfig(queue_size=0).validate()
    assert "key_projector" in PCLConfig.eval_feature_choices()


def test_pcl_resume_reproduces_the_next_epochs_losses(tmp_path):
    """Labels, prototypes and phi are checkpointed: with k-means every 2 epochs, epoch 1 reuses epoch 0's
    prototypes, and a run stopped after epoch 0 and resumed takes the same epoch-1 steps as the
    uninterrupted run (prototypes lost at the restart would be re-clustered from other features)."""
    import main as launcher

    def step_losses(run_dir, epoch, key):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in rows if key in r and r["epoch"] == epoch]

    config = str(REPO_ROOT / "config" / "mnist_cnn_pcl.yml")
    small = ["data.name=mnist", f"data.root={SHARED_DATA / 'mnist.npz'}", "data.limit=128", "augment.elastic_p=0",
             "run.threads_per_rank=1", "train.batch_size_per_rank=32", "train.epochs=2", "train.log_every_steps=1",
             "train.time_budget_minutes=0", "method.projector_hidden_dim=32", "method.feature_dim=16",
             "method.queue_size=100", "method.num_clusters_per_level=[4, 8, 16]", "method.warmup_epochs=0",
             "cluster.every_epochs=2", "eval.every_epochs=2", "eval.n_init=1", "cluster.n_init=1",
             "logging.progress_bar=false"]
    launcher.main([config, f"run.output_dir={tmp_path}", "run.name=straight", *small])
    launcher.main([config, f"run.output_dir={tmp_path}", "run.name=split", *small, "train.time_budget_minutes=1e-6"])
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and bool((state["model"]["pseudo_labels"] >= 0).all())
    assert state["model"]["prototypes_2"].shape == (16, 16)
    launcher.main([config, f"run.output_dir={tmp_path}", "run.name=split", *small, "--resume", "auto"])
    straight = step_losses(tmp_path / "straight", 1, "step/loss")
    resumed = step_losses(tmp_path / "split", 1, "step/loss")
    assert len(straight) == 4 and len(step_losses(tmp_path / "straight", 1, "step/proto_nce")) == 4
    assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-7)
