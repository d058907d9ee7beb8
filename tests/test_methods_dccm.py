"""DCCM: its losses against values worked out by hand, the network (batch norm without running
statistics), the step's targets read from the refreshed clean predictions, the critic's partners, and a
run through the launcher stopped between two refreshes resuming to the uninterrupted run."""
import math

import pytest
import torch

import main as launcher
from losses.dccm import graph_loss, jsd_mutual_information_loss, pseudo_graph, pseudo_label_loss
from models import DataInfo, Progress, build_method
from models.backbones import build_backbone
from models.dccm import DCCMConfig, critic_partners
from tests.stop_util import assert_same_weights, train_step_signalling_after
from tests.test_methods_scan import records, step_losses
from tests.torchrun_util import REPO_ROOT, SHARED_DATA
from utils.config import ConfigError
from utils.stop import EXIT_STOPPED
from utils import trainer as trainer_module
from utils.features import extract_features
from utils.trainer import Trainer

P = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])


def _bce(x, y):
    return -(y * math.log(x) + (1 - y) * math.log(1 - x))


def test_the_losses_by_hand():
    cos = lambda a, b: float(a @ b) / (float(a.norm()) * float(b.norm()))  # noqa: E731
    sims = [[cos(P[i], P[j]) for j in range(3)] for i in range(3)]
    assert sims[0][1] > 0.95 > sims[0][2]
    graph = pseudo_graph(P, threshold=0.95)
    assert graph.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    top = max(max(row) for row in sims)
    by_hand = sum(_bce(min(max(sims[i][j] / top, 1e-7), 1 - 1e-7), graph[i][j].item())
                  for i in range(3) for j in range(3)) / 9
    assert graph_loss(P, graph).item() == pytest.approx(by_hand, rel=1e-5)
    targets, trusted = torch.tensor([0, 0, 1]), torch.tensor([1.0, 0.0, 1.0])
    rows = [(_bce(0.9, 1) + _bce(0.1, 0)) / 2, 0.0, (_bce(0.1, 0) + _bce(0.9, 1)) / 2]
    assert pseudo_label_loss(P, targets, trusted).item() == pytest.approx(sum(rows) / 3, rel=1e-5)
    positive, negative = torch.tensor([[[0.5, -1.0]]]), torch.tensor([[[2.0, 0.0]], [[-3.0, 1.0]]])
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = (softplus(-0.5) + softplus(1.0)) / 2 + (softplus(2.0) + softplus(0.0) + softplus(-3.0)
                                                          + softplus(1.0)) / 4
    assert jsd_mutual_information_loss(positive, negative).item() == pytest.approx(expected, rel=1e-6)
    assert jsd_mutual_information_loss(positive, negative[:0]).item() == pytest.approx(
        (softplus(-0.5) + softplus(1.0)) / 2, rel=1e-6)


INFO = DataInfo(in_channels=1, image_size=28, num_classes=4, num_samples=40, num_clusters=4)


def build_dccm(**options):
    torch.manual_seed(0)
    return build_method(DCCMConfig(critic_hidden_dim=16, **options), backbone="dccm_cnn", norm="batch", data=INFO)


def test_the_network_normalises_with_each_batch_and_other_backbones_are_refused():
    method = build_dccm()
    batch_norms = [m for m in method.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(batch_norms) == 4 and all(not m.track_running_stats for m in batch_norms)
    method.eval()
    images = torch.rand(6, 1, 28, 28)
    with torch.no_grad():  # no running statistics: evaluation too normalises with the batch it sees
        alone = method.eval_features(images[:3], "cluster")
        together = method.eval_features(images, "cluster")[:3]
    assert not torch.allclose(alone, together)
    linears = [m for m in method.head if isinstance(m, torch.nn.Linear)]   # DCCM's identity start
    assert [tuple(m.weight.shape) for m in linears] == [(64, 256), (4, 64)]
    assert all(torch.equal(m.weight, torch.eye(*m.weight.shape)) and not m.bias.any() for m in linears)
    cnn = build_backbone("dccm_cnn", in_channels=3, image_size=32, norm="batch")
    with torch.no_grad():   # DCCM's shapes at 32 px: 30, 28, pool 14 (the local map), 12, pool 6, 4, average
        features, local = cnn.forward_local(torch.rand(2, 3, 32, 32))
        last_map = cnn.rest[:-2](local)
    assert local.shape == (2, 64, 14, 14) and last_map.shape == (2, 256, 4, 4)
    torch.testing.assert_close(features, last_map.mean(dim=(2, 3)))
    build_backbone("dccm_cnn", in_channels=1, image_size=20, norm="batch")
    with pytest.raises(ValueError, match=r"dccm_cnn: image_size 19 is too small \(at least 20 px\)"):
        build_backbone("dccm_cnn", in_channels=1, image_size=19, norm="batch")
    with pytest.raises(ValueError, match=r"dccm: model.backbone must be dccm_cnn .*, got 'small_cnn'"):
        build_method(DCCMConfig(), backbone="small_cnn", norm="batch", data=INFO)
    with pytest.raises(ConfigError, match="method.graph_threshold"):
        DCCMConfig(graph_threshold=0.0).validate()


def test_critic_partners_are_drawn_among_linked_and_unlinked_images():
    graph = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    graph[3] = 1.0   # row 3 is linked to everything: no unlinked partner
    torch.manual_seed(0)
    drawn_for_row_0 = set()
    for _ in range(50):
        linked, rows, unlinked = critic_partners(graph)
        assert linked[:2].tolist() == [1, 0] and linked[2] == 2   # another linked image, else itself
        assert linked[3] in (0, 1, 2)
        assert rows.tolist() == [0, 1, 2] and unlinked.shape == (3, 2)
        assert all(graph[i, j] == 0 for i, pair in zip(rows, unlinked) for j in pair)
        drawn_for_row_0.update(unlinked[0].tolist())
    assert drawn_for_row_0 == {2, 3}
    linked, rows, unlinked = critic_partners(torch.ones(3, 3))   # all linked: no negatives to draw
    assert all(int(linked[i]) != i for i in range(3)) and rows.shape == (0,) and unlinked.shape == (0, 2)
    # one unlinked image: both negatives are that image (drawn with replacement)
    linked, rows, unlinked = critic_partners(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]))
    assert linked.tolist() == [1, int(linked[1]), 1] and int(linked[1]) in (0, 2)
    assert rows.tolist() == [0, 2] and unlinked.tolist() == [[2, 2], [0, 0]]


def test_the_read_outs_and_the_smallest_k_and_the_network_without_normalisation():
    method = build_dccm()
    method.eval()
    images = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        features = method.backbone(images)
        logits = method.logit_norm(method.head(features))
        torch.testing.assert_close(method.eval_features(images, "backbone"), features)
        probabilities = method.eval_features(images, "cluster")
        torch.testing.assert_close(probabilities, torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True)))
    assert torch.equal(method.predict_from_features(probabilities), logits.argmax(dim=1))
    with pytest.raises(ValueError, match=r"^unknown feature kind 'projector'; expected one of "):
        method.eval_features(images, "projector")
    two = DataInfo(in_channels=1, image_size=28, num_classes=2, num_samples=40, num_clusters=2)
    plain = build_method(DCCMConfig(critic_hidden_dim=16), backbone="dccm_cnn", norm="none", data=two)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert isinstance(plain.logit_norm, torch.nn.Identity) and plain.head[-1].out_features == 2
    with pytest.raises(ValueError, match=r"^DCCM needs at least 2 clusters, got num_clusters=1$"):
        build_method(DCCMConfig(), backbone="dccm_cnn", norm="batch",
                     data=DataInfo(in_channels=1, image_size=28, num_classes=2, num_samples=40, num_clusters=1))


def test_the_critic_scores_each_map_position_with_the_code_written_out():
    """score(b, y, x) = w3 . relu(W2 relu(Wl m_b(y, x) + Wc c_b)), bias-free 1x1 layers (DCCM's critic)."""
    from models.dccm import LocalCritic

    torch.manual_seed(4)
    critic = LocalCritic(local_channels=5, code_dim=3, hidden=7)
    assert sorted(name for name, _ in critic.named_parameters()) == [
        "code_in.weight", "local_in.weight", "rest.1.weight", "rest.3.weight"]   # no biases
    local, code = torch.randn(2, 5, 4, 6), torch.randn(2, 3)
    w_local = critic.local_in.weight[:, :, 0, 0]          # (7, 5)
    w_code = critic.code_in.weight                        # (7, 3)
    w2, w3 = critic.rest[1].weight[:, :, 0, 0], critic.rest[3].weight[0, :, 0, 0]
    expected = torch.empty(2, 4, 6)
    for b in range(2):
        for y in range(4):
            for x in range(6):
                hidden = torch.relu(w_local @ local[b, :, y, x] + w_code @ code[b])
                expected[b, y, x] = w3 @ torch.relu(w2 @ hidden)
    torch.testing.assert_close(critic(local, code), expected.detach())


def test_the_step_reads_its_targets_from_the_refreshed_clean_predictions():
    method = build_dccm()
    assert torch.equal(method.clean_predictions, torch.full((40, 4), 0.25))   # before the first refresh: uniform
    clean = torch.softmax(6 * torch.randn(40, 4, generator=torch.Generator().manual_seed(1)), 1)
    clean[[5, 12]] = torch.tensor([0.1, 0.9, 0.0, 0.0])   # exactly at label_threshold: trusted (max >= 0.9)
    stats = method.refresh(clean)
    assert torch.equal(method.clean_predictions, clean)
    assert stats["trusted_labels"] == pytest.approx(float((clean.max(1).values >= 0.9).float().mean()))
    assert method.refresh_every_steps == 620 and method.has_head
    images, indices = torch.rand(8, 1, 28, 28), torch.tensor([5, 1, 30, 7, 7, 12, 39, 0])
    method.train()
    torch.manual_seed(3)
    terms = method.training_step([images], indices, Progress(epoch=0, global_step=0, steps_per_epoch=1,
                                                              total_steps=1))
    with torch.no_grad():   # batch statistics: the same forward pass
        features, local = method.backbone.forward_local(images)
        code = method.head(features)
        p = torch.softmax(method.logit_norm(code), 1)
    rows = clean[indices]
    torch.manual_seed(3)   # the step's draws again: each image's code against its own and a linked image's
    linked, unlinked_rows, unlinked = critic_partners(pseudo_graph(rows, threshold=0.95))   # map, and two others
    with torch.no_grad():
        positive = [method.critic(local[j:j + 1], code[i:i + 1]) for i in range(8) for j in (i, int(linked[i]))]
        negative = [method.critic(local[j:j + 1], code[i:i + 1])
                    for i, pair in zip(unlinked_rows.tolist(), unlinked.tolist()) for j in pair]
    assert len(negative) > 0
    local_mi = jsd_mutual_information_loss(torch.cat(positive), torch.cat(negative))
    assert terms["local_mi"].item() == pytest.approx(local_mi.item(), rel=1e-5)
    graph = graph_loss(p, pseudo_graph(rows, threshold=0.95))
    label = pseudo_label_loss(p, rows.argmax(1), rows.max(1).values >= 0.9)
    assert terms["graph"].item() == pytest.approx(graph.item(), rel=1e-5)
    assert terms["pseudo_label"].item() == pytest.approx(label.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(graph.item() + 5 * label.item() + 0.05 * terms["local_mi"].item(),
                                                 rel=1e-5)
    terms["loss"].backward()
    assert all(p.grad is not None for p in method.critic.parameters())


CONFIG = REPO_ROOT / "config" / "mnist_dccm.yml"
SMALL = ["data.name=mnist", f"data.root={SHARED_DATA / 'mnist.npz'}", "data.limit=512", "run.threads_per_rank=1",
         "train.batch_size_per_rank=64", "train.log_every_steps=1", "train.epochs=2", "method.refresh_steps=5",
         "method.critic_hidden_dim=16", "cluster.n_init=1", "eval.n_init=1", "eval.every_epochs=1"]


def test_a_run_stopped_between_two_refreshes_resumes_to_the_same_run(tmp_path, monkeypatch):
    common = [str(CONFIG), f"run.output_dir={tmp_path}", "run.seed=5", *SMALL]
    seen_seeds = []

    def recording(*args, shuffle_seed=None, **kwargs):
        seen_seeds.append(shuffle_seed)
        return extract_features(*args, shuffle_seed=shuffle_seed, **kwargs)

    with monkeypatch.context() as patch:   # its whole-set passes are shuffled (batch statistics in evaluation)
        patch.setattr(trainer_module, "extract_features", recording)
        straight = launcher.main([*common, "run.name=straight"])
    assert len(seen_seeds) > 4 and set(seen_seeds) == {5}
    with monkeypatch.context() as patch:   # 8 steps per epoch; refreshes at steps 0, 5, 10, 15
        patch.setattr(Trainer, "train_step", train_step_signalling_after(12))
        with pytest.raises(SystemExit) as exc:
            launcher.main([*common, "run.name=split"])
    assert exc.value.code == EXIT_STOPPED
    resumed = launcher.main([*common, "run.name=split", "--resume", "auto"])
    one, two = step_losses(tmp_path / "straight"), step_losses(tmp_path / "split")
    assert sorted(two) == list(range(1, 17))
    assert [two[s] for s in range(1, 17)] == pytest.approx([one[s] for s in range(1, 17)], rel=1e-6, abs=1e-7)
    assert_same_weights(tmp_path / "straight", tmp_path / "split")
    assert resumed == pytest.approx(straight)
    refreshes = [r["stage_step"] for r in records(tmp_path / "split") if "refresh/trusted_labels" in r]
    assert refreshes == [0, 5, 10, 15]   # each once, none repeated by the resume
