"""BYOL and ProPos (clustering terms on): a few CPU steps on a fixed batch lower the loss and keep it
finite. Their losses are checked by hand in test_losses_propos.py, their resume in test_train.py."""
import pytest
import torch

from models import build_method
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
