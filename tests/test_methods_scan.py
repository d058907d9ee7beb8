"""SCAN: mining against scikit-learn, head selection against a hand-written loss, the frozen-backbone
option, pretrained pretext weights, and whole runs through the launcher on real digits (a run stopped
inside the clustering stage resumes to the uninterrupted run's steps and weights)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import main as launcher
from models import DataInfo, Progress, StageContext, build_method
from models.scan import SCAN, SCANConfig
from tests.stop_util import assert_same_weights, train_step_signalling_after
from tests.torchrun_util import REPO_ROOT, SHARED_DATA
from utils.config import ConfigError
from utils.stop import EXIT_STOPPED
from utils.trainer import Trainer

INFO = DataInfo(in_channels=1, image_size=28, num_classes=4, num_samples=40, num_clusters=4)


def build_scan(**options):
    torch.manual_seed(0)
    cfg = SCANConfig(projector_hidden_dim=32, feature_dim=16, num_neighbours=5, **options)
    return build_method(cfg, backbone="small_cnn", norm="batch", data=INFO)


def context(features: torch.Tensor) -> StageContext:
    return StageContext(features=lambda kind: features, cluster=None, num_clusters=4)


def test_mining_lists_each_image_then_its_nearest_neighbours():
    from sklearn.neighbors import NearestNeighbors

    method = build_scan()
    method.enter_stage("pretext")
    assert not method.has_head and method.training_partners() is None
    features = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    method.enter_stage("scan")
    method.start_stage("scan", context(features))
    _, rows = NearestNeighbors(n_neighbors=6, metric="cosine", algorithm="brute").fit(
        features.double().numpy()).kneighbors(features.double().numpy())
    assert (method.neighbours.numpy() == rows).all()   # column 0: the image itself, then 5 neighbours
    assert method.has_head and torch.equal(method.training_partners(), method.neighbours)


def test_too_few_images_for_the_neighbours_is_one_line():
    method = build_scan()
    method.enter_stage("scan")
    with pytest.raises(ValueError, match=r"method.num_neighbours: 5 neighbours per image need more than 5 images, "
                                         r"the training set has 5"):
        method.start_stage("scan", context(torch.randn(5, 8)))


def scan_loss_by_hand(probabilities: np.ndarray, neighbours: np.ndarray, entropy_weight: float) -> float:
    pairs = [math.log(max(float(probabilities[i] @ probabilities[j]), 1e-8))
             for i in range(len(probabilities)) for j in neighbours[i, 1:]]
    mean = probabilities.mean(axis=0)
    return -sum(pairs) / len(pairs) + entropy_weight * float((mean * np.log(mean)).sum())


def test_the_head_with_the_lowest_scan_loss_on_the_training_set_is_selected():
    method = build_scan(num_heads=4)
    method.enter_stage("scan")
    features = torch.randn(40, 512, generator=torch.Generator().manual_seed(4))
    method.start_stage("scan", context(features[:, :8]))
    with torch.no_grad():  # scale the heads apart so that their losses differ clearly
        for k, head in enumerate(method.heads):
            head.weight.mul_(0.2 + k)
    assert method.selects_readout() and not method.wants_pseudo_labels(0) and not method.head_selected
    method.select_readout(features)
    by_hand = [scan_loss_by_hand(torch.softmax(head(features), 1).detach().double().numpy(),
                                 method.neighbours.numpy(), 5.0) for head in method.heads]
    assert method.head_losses.tolist() == pytest.approx(by_hand, rel=1e-9)
    assert int(method.head_index) == int(np.argmin(by_hand)) and method.head_selected
    images = torch.rand(6, 1, 28, 28)
    method.eval()
    with torch.no_grad():
        chosen = method.heads[int(np.argmin(by_hand))]
        expected = torch.softmax(chosen(method.backbone(images)), 1)
        torch.testing.assert_close(method.eval_features(images, "cluster"), expected)
        assert torch.equal(method.head_predictions(images), expected.argmax(1))
    one_head = build_scan()
    one_head.enter_stage("scan")
    assert not one_head.selects_readout()   # nothing to select: no whole-dataset pass


def clustering_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 groups of 4 noisy copies of a pattern (16, 1, 28, 28), and for each image another of its group."""
    gen = torch.Generator().manual_seed(0)
    patterns = 3 * torch.rand(4, 1, 28, 28, generator=gen)
    anchors = patterns.repeat_interleave(4, 0) + 0.1 * torch.randn(16, 1, 28, 28, generator=gen)
    return anchors, anchors[torch.arange(16).view(4, 4).roll(1, dims=1).flatten()]


@torch.no_grad()
def set_batch_norm_statistics(method, images: torch.Tensor) -> None:
    """The backbone's batch-norm statistics of `images`, as a pretext stage would have left them."""
    training = method.backbone.training
    method.backbone.train()
    for module in method.backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0
    method.backbone(images)
    method.backbone.train(training)


def clustering_steps(method, steps: int = 15) -> list[float]:
    anchors, neighbours = clustering_batch()
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        terms = method.training_step([anchors, neighbours], torch.arange(16),
                                     Progress(epoch=0, global_step=step, steps_per_epoch=steps, total_steps=steps))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    return losses


@pytest.mark.parametrize("update_backbone", [True, False])
def test_clustering_steps_train_the_heads_and_the_backbone_unless_frozen(update_backbone):
    method = build_scan(num_heads=2, update_backbone=update_backbone)
    method.enter_stage("scan")
    set_batch_norm_statistics(method, clustering_batch()[0])
    method.train()
    backbone = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    projector = {k: v.clone() for k, v in method.projector.state_dict().items()}
    heads = [h.weight.detach().clone() for h in method.heads]
    losses = clustering_steps(method)
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(not torch.equal(h.weight, before) for h, before in zip(method.heads, heads))
    assert all(torch.equal(v, method.projector.state_dict()[k]) for k, v in projector.items())
    unchanged = [torch.equal(v, method.backbone.state_dict()[k]) for k, v in backbone.items()]
    # frozen: weights and batch-norm statistics (eval mode) stay those of the pretext
    assert all(unchanged) if not update_backbone else not all(unchanged)


@pytest.mark.parametrize("num_heads", [1, 3])
def test_the_clustering_step_sums_each_heads_scan_loss_written_out(num_heads):
    """Each head: -(1/B) sum_i log <p(x_i), p(n_i)> - w H((1/B) sum_i p(x_i)), p the softmax over the K
    clusters of one backbone pass over anchors and neighbours together; the loss sums the heads, the
    logged terms average them. Only read-out selection needs several heads."""
    method = build_scan(num_heads=num_heads, entropy_weight=2.5)
    method.enter_stage("scan")
    method.train()
    anchors, neighbours = clustering_batch()
    for head in method.heads:                           # distinct heads, so that a mixed-up head shows
        torch.nn.init.normal_(head.weight, std=0.5)
    terms = method.training_step([anchors, neighbours], torch.arange(16),
                                 Progress(epoch=0, global_step=0, steps_per_epoch=1, total_steps=1))
    h = method.backbone(torch.cat([anchors, neighbours]))   # the same batch-norm batch as the step's
    totals, consistencies, entropies = [], [], []
    for head in method.heads:
        logits = head(h)
        p = torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))   # row-wise softmax
        p_anchor, p_neighbour = p[:16], p[16:]
        consistency = -torch.log((p_anchor * p_neighbour).sum(dim=1)).mean()
        mean = p_anchor.mean(dim=0)
        entropy = -(mean * torch.log(mean)).sum()
        totals.append(consistency - 2.5 * entropy)
        consistencies.append(consistency)
        entropies.append(entropy)
    torch.testing.assert_close(terms["loss"], sum(totals))
    torch.testing.assert_close(terms["consistency"], sum(consistencies) / num_heads)
    torch.testing.assert_close(terms["entropy"], sum(entropies) / num_heads)
    assert terms["loss"].requires_grad and not terms["consistency"].requires_grad
    method.neighbours_ready.fill_(True)
    assert method.selects_readout() == (num_heads > 1)


def test_the_read_outs_are_the_backbone_the_unit_projector_rows_and_the_selected_heads_softmax():
    method = build_scan(num_heads=3)
    method.eval()
    method.head_index.fill_(2)
    x = clustering_batch()[0][:5]
    with torch.no_grad():
        h = method.backbone(x)
        z = method.projector(h)
        torch.testing.assert_close(method.eval_features(x, "backbone"), h)
        torch.testing.assert_close(method.eval_features(x, "projector"), z / z.norm(dim=1, keepdim=True))
        logits = method.heads[2](h)
        probabilities = method.eval_features(x, "cluster")
        torch.testing.assert_close(probabilities, torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True)))
        assert torch.equal(method.predict_from_features(probabilities), logits.argmax(dim=1))
    with pytest.raises(ValueError, match=r"^unknown feature kind 'embedding'; expected one of "):
        method.eval_features(x, "embedding")


def test_each_stage_trains_with_its_own_optimizer_settings():
    method = build_scan(scan_optimizer="sgd", scan_lr=0.3, scan_weight_decay=0.01, scan_momentum=0.5,
                        selflabel_epochs=3, selflabel_optimizer="rmsprop", selflabel_lr=0.2,
                        selflabel_weight_decay=0.02, selflabel_momentum=0.7)
    pretext, scan, selflabel = method.training_stages()
    assert (pretext.name, pretext.optimizer, pretext.lr) == ("pretext", None, None)   # the `optim` section's
    assert (scan.name, scan.epochs, scan.optimizer, scan.lr, scan.weight_decay, scan.momentum) == (
        "scan", 50, "sgd", 0.3, 0.01, 0.5)
    assert (selflabel.name, selflabel.epochs, selflabel.optimizer, selflabel.lr, selflabel.weight_decay,
            selflabel.momentum) == ("selflabel", 3, "rmsprop", 0.2, 0.02, 0.7)
    # SCAN's clustering and self-labelling: a constant lr from the first step; the pretext follows `optim`
    assert [(s.schedule, s.warmup_epochs) for s in (pretext, scan, selflabel)] == [
        (None, None), ("constant", 0.0), ("constant", 0.0)]


def test_two_clusters_are_the_fewest_scan_builds():
    def data(k: int) -> DataInfo:
        return DataInfo(in_channels=1, image_size=28, num_classes=2, num_samples=40, num_clusters=k)

    method = build_method(SCANConfig(num_heads=3), backbone="small_cnn", norm="batch", data=data(2))
    assert [tuple(h.weight.shape) for h in method.heads] == [(2, method.backbone.out_dim)] * 3
    assert method.train() is method and method.eval() is method   # nn.Module's chaining
    with pytest.raises(ValueError, match=r"^SCAN needs at least 2 clusters, got num_clusters=1$"):
        build_method(SCANConfig(), backbone="small_cnn", norm="batch", data=data(1))


@pytest.mark.parametrize("class_balance, threshold", [(True, 0.99), (False, 0.9)])
def test_self_labelling_trains_the_selected_head_on_its_confident_clean_predictions(class_balance, threshold):
    method = build_scan(num_heads=2, selflabel_epochs=3, selflabel_class_balance=class_balance,
                        selflabel_threshold=threshold)
    assert [s.name for s in method.training_stages()] == ["pretext", "scan", "selflabel"]
    method.enter_stage("scan")
    assert method.clean_training_views() == ()
    method.head_index.fill_(1)
    method.enter_stage("selflabel")
    assert method.clean_training_views() == (0,) and method.training_partners() is None
    trainable = {name for name, p in method.named_parameters() if p.requires_grad}
    assert any(n.startswith("heads.1.") for n in trainable) and any(n.startswith("backbone.") for n in trainable)
    assert not any(n.startswith(("heads.0.", "projector.")) for n in trainable)
    clean, augmented = clustering_batch()
    set_batch_norm_statistics(method, clean)
    with torch.no_grad():
        method.heads[1].weight.mul_(20.0)   # confident enough that some rows pass either threshold, not all
    method.train()
    terms = method.training_step([clean, augmented], torch.arange(16), Progress(
        epoch=0, global_step=0, steps_per_epoch=1, total_steps=1, stage="selflabel"))
    # the oracle: torch's class-weighted cross-entropy on the confident rows of the same forward pass
    with torch.no_grad():
        logits = method.heads[1](method.backbone(torch.cat([clean, augmented])))
    confidence, target = torch.softmax(logits[:16], 1).max(1)
    confident = confidence > threshold
    assert 0 < int(confident.sum()) < 16
    counts = torch.bincount(target[confident], minlength=4).float()
    class_weights = torch.where(counts > 0, confident.sum() / counts.clamp_min(1), torch.zeros(4))
    balanced, plain = (torch.nn.functional.cross_entropy(logits[16:][confident], target[confident], weight=weight)
                       for weight in (class_weights, None))
    assert balanced.item() != pytest.approx(plain.item(), rel=1e-2)   # the two settings differ on this batch
    assert terms["loss"].item() == pytest.approx((balanced if class_balance else plain).item(), rel=1e-4)
    assert terms["confident"].item() == pytest.approx(float(confident.float().mean()))
    terms["loss"].backward()
    assert method.heads[0].weight.grad is None and method.heads[1].weight.grad.abs().sum() > 0


def test_pretrained_weights_come_from_a_simclr_run_and_a_dec_checkpoint_is_refused():
    from models.simclr import SimCLRConfig

    torch.manual_seed(5)
    simclr = build_method(SimCLRConfig(projector_hidden_dim=32, feature_dim=16), backbone="small_cnn", norm="batch",
                          data=INFO)
    method = build_scan(pretrained="x.pt")
    assert [s.name for s in method.training_stages()] == ["scan"]
    method.load_pretrained(simclr.state_dict())
    for part in ("backbone", "projector"):
        theirs = getattr(simclr, part).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(method, part).state_dict().items())
    with pytest.raises(ValueError, match=r"holds no backbone weights \(backbone\.\*\); expected a simclr or scan run"):
        method.load_pretrained({"autoencoder.encoder.0.weight": torch.zeros(1)})


def test_config_validation_names_the_key():
    for options, key in [({"pretext_epochs": 0}, "pretext_epochs"), ({"mining_features": "pixels"}, "mining_features"),
                         ({"num_heads": 0}, "num_heads"), ({"scan_optimizer": "lamb"}, "scan_optimizer"),
                         ({"entropy_weight": -1.0}, "entropy_weight"), ({"selflabel_threshold": 1.0},
                                                                         "selflabel_threshold"),
                         ({"selflabel_epochs": -1}, "selflabel_epochs")]:
        with pytest.raises(ConfigError, match=f"method.{key}"):
            SCANConfig(**options).validate()
    SCANConfig(pretext_epochs=0, pretrained="runs/x/last.pt").validate()


# ------------------------------------------------------------------------------ runs through the launcher
CONFIG = REPO_ROOT / "config" / "mnist_cnn_scan.yml"
SMALL = ["data.name=mnist", f"data.root={SHARED_DATA / 'mnist.npz'}", "data.limit=512", "run.threads_per_rank=1",
         "train.batch_size_per_rank=64", "train.log_every_steps=1", "method.pretext_epochs=1",
         "method.scan_epochs=2", "method.num_heads=2", "method.num_neighbours=5", "method.scan_lr=1e-3",
         "method.selflabel_epochs=0", "cluster.n_init=1", "eval.n_init=1", "eval.every_epochs=1",
         "logging.progress_bar=false"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["step/loss"] for r in records(run_dir) if "step/loss" in r}


STRONG_VIEWS = ["augment.strong_ops=2", "augment.cutout_size=6", "data.num_workers=0"]


@pytest.mark.parametrize("config, options, stop_at, stage", [
    (CONFIG, [], 11, "scan"),                                    # 8 steps per epoch: inside the first scan epoch
    (CONFIG, STRONG_VIEWS, 11, "scan"),                          # the same through the workers loader
    (CONFIG, ["method.selflabel_epochs=1"], 27, "selflabel"),   # inside self-labelling (steps 25-32)
    # NNM (models/nnm.py): scan steps 9-24, its bank counts from the stage's second epoch (step 17) on
    (REPO_ROOT / "config" / "mnist_cnn_nnm.yml", [], 19, "scan"),
], ids=["scan", "scan-strong-views", "selflabel", "nnm-bank"])
def test_a_run_stopped_inside_a_stage_resumes_to_the_same_run(tmp_path, monkeypatch, config, options, stop_at,
                                                               stage):
    common = [str(config), f"run.output_dir={tmp_path}", *SMALL, *options]
    straight = launcher.main([*common, "run.name=straight"])
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", train_step_signalling_after(stop_at))
        with pytest.raises(SystemExit) as exc:
            launcher.main([*common, "run.name=split"])
    assert exc.value.code == EXIT_STOPPED
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (state["stage_name"], state["epoch_step"], state["global_step"]) == (stage, 3, stop_at)
    assert bool(state["model"].get("bank_ready", True))   # NNM's bank is saved with the position
    resumed = launcher.main([*common, "run.name=split", "--resume", "auto"])
    one, two = step_losses(tmp_path / "straight"), step_losses(tmp_path / "split")
    steps = 32 if stage == "selflabel" else 24
    assert sorted(two) == list(range(1, steps + 1))
    assert [two[s] for s in range(1, steps + 1)] == pytest.approx([one[s] for s in range(1, steps + 1)],
                                                                   rel=1e-6, abs=1e-7)
    assert_same_weights(tmp_path / "straight", tmp_path / "split")
    assert resumed == pytest.approx(straight)
    # the head selection (an E-step per scan epoch) is in the checkpoint: the resume does not redo it mid-epoch
    selections = [(run / "train.log").read_text().count("scan heads:") for run in (tmp_path / "straight",
                                                                                 tmp_path / "split")]
    assert selections[0] == selections[1] == 2
    final = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    assert final["neighbours_ready"] and final["head_selected"] and final["neighbours"].shape == (512, 6)


def test_a_clustering_run_starts_from_a_simclr_run_and_trains_on_the_views_of_each_stage(tmp_path, monkeypatch):
    simclr = REPO_ROOT / "config" / "mnist_cnn_simclr.yml"
    launcher.main([str(simclr), f"run.output_dir={tmp_path}", "run.name=pretext", *SMALL[:5], "train.epochs=1",
                   "cluster.n_init=1", "eval.n_init=1", "logging.progress_bar=false"])
    pretext = torch.load(tmp_path / "pretext" / "last.pt", weights_only=True)["model"]
    seen = []
    train_step = Trainer.train_step

    def recording_train_step(self, views, indices, epoch):   # what the loader was told to make
        seen.append((self.stage.name, self.method.neighbours.clone(), self.loader.partners, self.loader.clean_views))
        return train_step(self, views, indices, epoch)

    monkeypatch.setattr(Trainer, "train_step", recording_train_step)
    scores = launcher.main([str(CONFIG), f"run.output_dir={tmp_path}", "run.name=scan", *SMALL,
                            f"method.pretrained={tmp_path / 'pretext' / 'last.pt'}", "method.scan_epochs=1",
                            "method.selflabel_epochs=1"])
    assert [stage for stage, *_ in seen] == ["scan"] * 8 + ["selflabel"] * 8
    for stage, neighbours, partners, clean in seen:
        if stage == "scan":   # second views drawn from the mined table, both augmented
            assert partners is not None and torch.equal(partners, neighbours) and clean == frozenset()
        else:                 # self-labelling: the image itself, the first view clean
            assert partners is None and clean == {0}
    assert set(scores) >= {"nmi", "acc", "ari"}
    state = torch.load(tmp_path / "scan" / "last.pt", weights_only=True)
    assert state["stage_name"] == "selflabel" and state["global_step"] == 16    # no pretext stage
    # the projector is not trained after the pretext: still the pretext run's
    assert all(torch.equal(state["model"][k], v) for k, v in pretext.items() if k.startswith("projector."))
    # the mining check: the share of (image, neighbour) pairs of one class, from the saved table and labels
    labels = np.loadtxt(tmp_path / "scan" / "clusters.csv", delimiter=",", skiprows=1, usecols=2, dtype=np.int64)
    table = state["model"]["neighbours"][:, 1:].numpy()
    by_hand = float((labels[table] == labels[:, None]).mean())
    logged = [r for r in records(tmp_path / "scan") if "mining/neighbour_precision" in r]
    assert len(logged) == 1 and logged[0]["mining/neighbour_precision"] == pytest.approx(by_hand)
    assert logged[0]["stage"] == "scan" and 0.5 < by_hand < 1.0


def test_the_head_is_selected_on_the_weights_each_read_out_sees(tmp_path, monkeypatch):
    # SCAN scores its heads after each epoch: the choice after the scan stage's last epoch is the read-out
    # and the head self-labelling trains (an E-step before each epoch chose on the weights one epoch old)
    seen = []
    select_head = SCAN.select_head

    def recording(self, probabilities):
        seen.append({f"heads.{k}.weight": head.weight.detach().clone() for k, head in enumerate(self.heads)})
        return select_head(self, probabilities)

    monkeypatch.setattr(SCAN, "select_head", recording)
    launcher.main([str(CONFIG), f"run.output_dir={tmp_path}", "run.name=r", *SMALL, "method.selflabel_epochs=1"])
    assert len(seen) == 2   # one per evaluation of the scan stage (eval.every_epochs=1), none in self-labelling
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    chosen = int(state["model"]["head_index"])
    assert state["stage_name"] == "selflabel"
    assert chosen == int(state["model"]["head_losses"].argmin())
    # the head self-labelling leaves alone holds the scan stage's final weights, and so did the last
    # selection: it scored the heads after the stage's last epoch, which trained every head
    other = f"heads.{1 - chosen}.weight"
    assert torch.equal(state["model"][other], seen[-1][other].cpu())
    assert not torch.equal(seen[0][other], seen[-1][other])
