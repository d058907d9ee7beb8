"""Every range a method's config checks, at its edge: the bound itself where the message says it is allowed,
and the nearest value past it refused with the whole one-line message (a `<` written for `<=`, or a bound
the message misstates, fails here). load_config runs these same `validate` methods (test_config checks
that path with a few of them)."""
from __future__ import annotations

import re

import pytest

from models import method_config_class
from utils.config import ConfigError

# (method, settings): each is accepted as it stands, at the edge of a checked range.
ACCEPTED = [
    # DEC (IDEC shares these)
    ("dec", dict(pretrain_lr_step_iters=1, pretrain_lr_step_factor=1.0)),
    ("dec", dict(pretrain_lr_step_factor=1e-9)),
    ("dec", dict(hidden_dims=[1], embedding_dim=1)),
    ("dec", dict(pretrained="runs/ae/last.pt", pretrain_epochs=0, layerwise_epochs=0)),
    ("dec", dict(pretrain="layerwise", layerwise_epochs=1, pretrain_epochs=0)),   # fine-tuning is optional
    ("dec", dict(pretrain="end_to_end", pretrain_epochs=1, layerwise_epochs=0)),
    ("dec", dict(cluster=False, cluster_epochs=0)),          # pretraining only
    ("dec", dict(cluster_epochs=1)),
    ("dec", dict(layerwise_dropout=0.0, pretrain_input_dropout=0.0)),
    ("dec", dict(layerwise_dropout=0.999, pretrain_input_dropout=0.999)),
    ("dec", dict(input_scale=1e-9, alpha=1e-9, update_interval=1, tol=0.0)),
    ("dec", dict(tol=0.999, pretrain_lr=1e-9, cluster_lr=1e-9)),
    ("dec", dict(pretrain_momentum=0.0, cluster_momentum=0.999)),
    ("idec", dict(gamma=0.0)),
    # SCAN / NNM
    ("scan", dict(temperature=1e-9, projector_hidden_dim=1, feature_dim=1, num_neighbours=1, num_heads=1,
                  scan_epochs=1, pretext_epochs=1)),
    ("scan", dict(pretrained="runs/simclr/last.pt", pretext_epochs=0)),
    ("scan", dict(scan_lr=1e-9, selflabel_lr=1e-9, entropy_weight=0.0, scan_weight_decay=0.0,
                  selflabel_weight_decay=0.0, selflabel_epochs=0)),
    ("scan", dict(scan_momentum=0.0, selflabel_momentum=0.0, selflabel_threshold=1e-9)),
    ("nnm", dict(selflabel_threshold=0.999999, num_heads=1)),
    # CC
    ("cc", dict(instance_temperature=1e-9, cluster_temperature=1e-9, entropy_weight=0.0,
                instance_hidden_dim=1, feature_dim=1, cluster_hidden_dim=1)),
    # DCCM
    ("dccm", dict(head_hidden_dim=1, critic_hidden_dim=1, refresh_steps=1, graph_threshold=1.0,
                  label_threshold=1.0, label_weight=0.0, local_weight=0.0)),
    ("dccm", dict(graph_threshold=1e-9, label_threshold=1e-9)),
    # MoCo
    ("moco", dict(queue_size=1, momentum=0.0, temperature=1e-9, projector_hidden_dim=1, feature_dim=1)),
    ("moco", dict(momentum=1.0)),
    # PCL
    ("pcl", dict(num_clusters_per_level=[2], num_negative_prototypes=0, proto_loss_weight=0.0, warmup_epochs=0)),
    # ProPos / BYOL
    ("propos", dict(projector_hidden_dim=1, feature_dim=1, predictor_hidden_dim=1, momentum_base=0.0,
                    latent_std=0.0, cluster_loss_weight=0.0, predictor_lr_scale=0.0, temperature=1e-9,
                    warmup_epochs=0)),
    ("propos", dict(momentum_base=1.0, momentum_schedule="constant")),
    ("byol", dict(cluster_loss_weight=0.0, latent_std=0.0)),
    # SimCLR / SimSiam
    ("simclr", dict(temperature=1e-9, projector_hidden_dim=1, feature_dim=1)),
    ("simsiam", dict(feature_dim=1, projector_hidden_dim=1, predictor_hidden_dim=1, predictor_lr_scale=0.0)),
]

# (method, settings, the whole message)
REFUSED = [
    ("dec", dict(pretrain="greedy"), "method.pretrain: expected one of layerwise, end_to_end, got 'greedy'"),
    ("dec", dict(pretrain_lr_step_iters=0), "method.pretrain_lr_step_iters: expected >= 1 iteration, got 0"),
    ("dec", dict(pretrain_lr_step_factor=1.001),
     "method.pretrain_lr_step_factor: expected a factor in (0, 1], got 1.001"),
    ("dec", dict(pretrain_lr_step_factor=0.0), "method.pretrain_lr_step_factor: expected a factor in (0, 1], got 0.0"),
    ("dec", dict(hidden_dims=[500, 0]),
     "method.hidden_dims: expected positive widths and embedding_dim, got [500, 0], 10"),
    ("dec", dict(hidden_dims=[]), "method.hidden_dims: expected positive widths and embedding_dim, got [], 10"),
    ("dec", dict(embedding_dim=0),
     "method.hidden_dims: expected positive widths and embedding_dim, got [500, 500, 2000], 0"),
    ("dec", dict(pretrain_epochs=-1, pretrain="layerwise", layerwise_epochs=1),
     "method.pretrain_epochs: expected epochs >= 0"),
    ("dec", dict(pretrain="layerwise", layerwise_epochs=0),
     "method.layerwise_epochs: layerwise pretraining needs >= 1 epoch per pair, got 0"),
    ("dec", dict(pretrain_epochs=0), "method.pretrain_epochs: expected >= 1 (or set method.pretrained), got 0"),
    ("dec", dict(cluster=False, pretrained="runs/ae/last.pt"),
     "method.cluster: false with method.pretrained set leaves nothing to train"),
    ("dec", dict(cluster_epochs=0), "method.cluster_epochs: expected >= 1, got 0"),
    ("dec", dict(layerwise_dropout=1.0), "method.layerwise_dropout: expected a probability in [0, 1), got 1.0"),
    ("dec", dict(pretrain_input_dropout=-0.001),
     "method.pretrain_input_dropout: expected a probability in [0, 1), got -0.001"),
    ("dec", dict(input_scale=0.0), "method.input_scale: expected a value > 0, got 0.0"),
    ("dec", dict(alpha=0.0), "method.alpha: expected a value > 0, got 0.0"),
    ("dec", dict(update_interval=0), "method.update_interval: expected >= 1 step, got 0"),
    ("dec", dict(tol=1.0), "method.tol: expected a fraction in [0, 1), got 1.0"),
    ("dec", dict(tol=-0.001), "method.tol: expected a fraction in [0, 1), got -0.001"),
    ("dec", dict(pretrain_lr=0.0), "method.pretrain_lr: expected a value > 0, got 0.0"),
    ("dec", dict(cluster_lr=0.0), "method.cluster_lr: expected a value > 0, got 0.0"),
    ("dec", dict(cluster_optimizer="lars"), "method.cluster_optimizer: expected one of sgd, adam, adamw, rmsprop, "
                                            "got 'lars'"),
    ("dec", dict(pretrain_schedule="linear"), "method.pretrain_schedule: expected one of cosine, constant, step, "
                                              "got 'linear'"),
    ("idec", dict(gamma=-0.001), "method.gamma: expected a value >= 0, got -0.001"),
    ("idec", dict(alpha=0.0), "method.alpha: expected a value > 0, got 0.0"),     # DEC's checks run too
    ("scan", dict(temperature=0.0), "method.temperature: expected a value > 0, got 0.0"),
    ("scan", dict(num_neighbours=0), "method.num_neighbours: expected a value >= 1, got 0"),
    ("scan", dict(scan_epochs=0), "method.scan_epochs: expected a value >= 1, got 0"),
    ("scan", dict(pretext_epochs=0), "method.pretext_epochs: expected >= 1 (or set method.pretrained), got 0"),
    ("scan", dict(mining_features="cluster"),
     "method.mining_features: expected one of projector, backbone, got 'cluster'"),
    ("scan", dict(scan_lr=0.0), "method.scan_lr: expected a value > 0, got 0.0"),
    ("scan", dict(selflabel_lr=0.0), "method.selflabel_lr: expected a value > 0, got 0.0"),
    ("scan", dict(entropy_weight=-0.001), "method.entropy_weight: expected a value >= 0, got -0.001"),
    ("scan", dict(selflabel_epochs=-1), "method.selflabel_epochs: expected a value >= 0, got -1"),
    ("scan", dict(selflabel_threshold=0.0), "method.selflabel_threshold: expected a probability in (0, 1), got 0.0"),
    ("nnm", dict(selflabel_threshold=1.0), "method.selflabel_threshold: expected a probability in (0, 1), got 1.0"),
    ("nnm", dict(num_heads=0), "method.num_heads: expected a value >= 1, got 0"),
    ("cc", dict(cluster_temperature=0.0), "method.cluster_temperature: expected a value > 0, got 0.0"),
    ("cc", dict(instance_temperature=0.0), "method.instance_temperature: expected a value > 0, got 0.0"),
    ("cc", dict(entropy_weight=-0.001), "method.entropy_weight: expected a value >= 0, got -0.001"),
    ("cc", dict(cluster_hidden_dim=0), "method.cluster_hidden_dim: expected a value >= 1, got 0"),
    ("dccm", dict(refresh_steps=0), "method.refresh_steps: expected a value >= 1, got 0"),
    ("dccm", dict(graph_threshold=0.0), "method.graph_threshold: expected a value in (0, 1], got 0.0"),
    ("dccm", dict(label_threshold=1.001), "method.label_threshold: expected a value in (0, 1], got 1.001"),
    ("dccm", dict(local_weight=-0.001), "method.local_weight: expected a value >= 0, got -0.001"),
    ("moco", dict(queue_size=0), "method.queue_size: expected a positive integer, got 0"),
    ("moco", dict(momentum=1.001), "method.momentum: expected a value in [0, 1], got 1.001"),
    ("moco", dict(momentum=-0.001), "method.momentum: expected a value in [0, 1], got -0.001"),
    ("moco", dict(temperature=0.0), "method.temperature: expected a value > 0, got 0.0"),
    ("moco", dict(feature_dim=0), "method.feature_dim: expected a positive integer, got 0"),
    ("pcl", dict(num_clusters_per_level=[]), "method.num_clusters_per_level: expected at least one K, got []"),
    ("pcl", dict(num_clusters_per_level=[10, 1]), "method.num_clusters_per_level: every K must be >= 2, got [10, 1]"),
    ("pcl", dict(num_negative_prototypes=-1), "method.num_negative_prototypes: expected a value >= 0, got -1"),
    ("pcl", dict(proto_loss_weight=-0.001), "method.proto_loss_weight: expected a value >= 0, got -0.001"),
    ("pcl", dict(warmup_epochs=-1), "method.warmup_epochs: expected a value >= 0, got -1"),
    ("pcl", dict(temperature=0.0), "method.temperature: expected a value > 0, got 0.0"),   # MoCo's checks run too
    ("propos", dict(momentum_schedule="linear"), "method.momentum_schedule: expected constant or cosine, got 'linear'"),
    ("propos", dict(predictor_hidden_dim=0), "method.predictor_hidden_dim: expected a width >= 1, got 0"),
    ("propos", dict(momentum_base=1.001), "method.momentum_base: expected a value in [0, 1], got 1.001"),
    ("propos", dict(momentum_base=-0.001), "method.momentum_base: expected a value in [0, 1], got -0.001"),
    ("propos", dict(latent_std=-0.001), "method.latent_std: expected a value >= 0, got -0.001"),
    ("propos", dict(predictor_lr_scale=-0.001), "method.predictor_lr_scale: expected a value >= 0, got -0.001"),
    ("propos", dict(temperature=0.0), "method.temperature: expected a value > 0, got 0.0"),
    ("propos", dict(warmup_epochs=-1), "method.warmup_epochs: expected a value >= 0, got -1"),
    ("propos", dict(pseudo_label_features="cluster"),
     "method.pseudo_label_features: expected one of projector, backbone, online_backbone, got 'cluster'"),
    ("byol", dict(cluster_loss_weight=0.001), "method.cluster_loss_weight / method.latent_std: BYOL has no "
                                              "clustering terms; use method.name=propos to turn them on"),
    ("byol", dict(latent_std=0.001), "method.cluster_loss_weight / method.latent_std: BYOL has no "
                                     "clustering terms; use method.name=propos to turn them on"),
    ("byol", dict(temperature=0.0), "method.temperature: expected a value > 0, got 0.0"),   # ProPos's checks run too
    ("simclr", dict(temperature=0.0), "method.temperature: expected a value > 0, got 0.0"),
    ("simclr", dict(projector_hidden_dim=0), "method.projector_hidden_dim: expected a value >= 1, got 0"),
    ("simsiam", dict(predictor_hidden_dim=0), "method.predictor_hidden_dim: expected a positive integer, got 0"),
    ("simsiam", dict(predictor_lr_scale=-0.001), "method.predictor_lr_scale: expected a value >= 0, got -0.001"),
]


def case_id(case: tuple) -> str:
    return f"{case[0]}-" + "-".join(f"{k}={v}" for k, v in case[1].items())


@pytest.mark.parametrize("method, settings", ACCEPTED, ids=[case_id(c) for c in ACCEPTED])
def test_each_checked_range_accepts_its_edge(method, settings):
    cfg = method_config_class(method)(**settings)
    cfg.validate()
    assert all(getattr(cfg, key) == value for key, value in settings.items())


@pytest.mark.parametrize("method, settings, message", REFUSED, ids=[case_id(c) for c in REFUSED])
def test_the_nearest_value_past_each_edge_is_refused_in_one_line(method, settings, message):
    cfg = method_config_class(method)(**settings)
    with pytest.raises(ConfigError, match=rf"^{re.escape(message)}$"):
        cfg.validate()
