"""CC's STL-10 epoch, end to end through main.py: the unlabeled images first with the instance loss alone,
then train+test with both losses, on a small STL-10 folder made of real CIFAR-10 test images."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import main as launcher
from models.cc import CC
from tests.torchrun_util import REPO_ROOT, SHARED_DATA, run_torchrun

CONFIG = REPO_ROOT / "config" / "stl10_r34_cc.yml"
PARTS = {"train": 48, "test": 32, "unlabeled": 112}   # 80 labelled rows, then 112 extra
BATCH = 16                                            # global: 7 instance-only steps, then 5 with both losses
SMALL = ["data.image_size=32", "model.backbone=small_cnn", "model.channels_last=false", "method.instance_hidden_dim=64",
         "method.cluster_hidden_dim=64", "method.feature_dim=32", "train.epochs=2", "train.log_every_steps=1",
         "eval.every_epochs=1", "logging.progress_bar=false"]
EXTRA_STEPS, LABELLED_STEPS = PARTS["unlabeled"] // BATCH, (PARTS["train"] + PARTS["test"]) // BATCH


def _stl10_folder(root: Path) -> None:
    """stl10_binary/ in STL-10's layout (column-major 96 x 96 images, 1-based labels) holding real images:
    CIFAR-10 test images, each pixel repeated 3 x 3."""
    with np.load(SHARED_DATA / "cifar10_test.npz") as f:
        images, labels = f["x_test"], f["y_test"]
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    start = 0
    for part, n in PARTS.items():
        block = images[start:start + n].repeat(3, axis=1).repeat(3, axis=2)   # (n, 96, 96, 3)
        block.transpose(0, 3, 2, 1).tofile(base / f"{part}_X.bin")
        if part != "unlabeled":
            (labels[start:start + n] + 1).astype(np.uint8).tofile(base / f"{part}_y.bin")
        start += n


def test_cc_trains_stl10s_unlabeled_images_first_with_the_instance_loss_alone(tmp_path, monkeypatch):
    _stl10_folder(tmp_path / "stl10")
    steps = []   # (epoch, smallest row, largest row, terms, cluster head's weights after the previous step)
    original = CC.training_step

    def recording_step(self, views, indices, progress):
        head = torch.cat([p.detach().flatten() for p in self.cluster_head.parameters()]).clone()
        terms = original(self, views, indices, progress)
        steps.append((progress.epoch, int(indices.min()), int(indices.max()), sorted(terms), head))
        return terms

    monkeypatch.setattr(CC, "training_step", recording_step)
    metrics = launcher.main([str(CONFIG), f"data.root={tmp_path / 'stl10'}", f"run.output_dir={tmp_path}",
                             "run.name=cc", f"train.batch_size_per_rank={BATCH}", *SMALL])
    per_epoch = EXTRA_STEPS + LABELLED_STEPS
    assert len(steps) == 2 * per_epoch
    instance_only, both = ["instance", "loss"], ["cluster", "entropy", "instance", "loss"]
    for number, (epoch, low, high, terms, _) in enumerate(steps):
        assert epoch == number // per_epoch
        if number % per_epoch < EXTRA_STEPS:
            assert low >= 80 and terms == instance_only, (number, low, terms)
        else:
            assert high < 80 and terms == both, (number, high, terms)
    # Adam leaves the cluster head alone in the instance-only steps of epoch 1, although it has moments
    # from epoch 0: the weights each of those steps saw are those the last step of epoch 0 left.
    heads = [head for *_, head in steps]
    for number in range(per_epoch + 1, per_epoch + EXTRA_STEPS + 1):
        assert torch.equal(heads[number], heads[per_epoch]), number
    assert not torch.equal(heads[per_epoch + EXTRA_STEPS + 1], heads[per_epoch])   # and the labelled steps train it
    assert_adam_steps_and_term_averages(tmp_path / "cc")
    assert set(metrics) >= {"nmi", "acc", "ari"}


def assert_adam_steps_and_term_averages(run_dir: Path) -> None:
    """In last.pt, Adam stepped the cluster head in the labelled steps only and the rest of the network in
    every step; each term's epoch average in metrics.jsonl covers the steps that logged it."""
    state = torch.load(run_dir / "last.pt", weights_only=True)
    model_names = list(state["model"])
    params = [name for name in model_names if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    adam_steps = {params[i]: int(v["step"]) for i, v in state["optimizer"]["state"].items()}
    per_epoch = EXTRA_STEPS + LABELLED_STEPS
    assert {name for name, steps in adam_steps.items() if steps == 2 * LABELLED_STEPS} == \
        {name for name in adam_steps if name.startswith("cluster_head.")} != set()
    assert {steps for name, steps in adam_steps.items() if not name.startswith("cluster_head.")} == {2 * per_epoch}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for epoch in (0, 1):
        logged = [r for r in records if r.get("epoch") == epoch and "step/loss" in r]
        assert len(logged) == per_epoch
        [summary] = [r for r in records if r.get("epoch") == epoch and "train/loss" in r]
        for term in ("cluster", "instance", "loss"):
            values = [r[f"step/{term}"] for r in logged if f"step/{term}" in r]
            assert len(values) == (LABELLED_STEPS if term == "cluster" else per_epoch)
            assert summary[f"train/{term}"] == pytest.approx(sum(values) / len(values), rel=1e-6)


def test_two_ranks_train_stl10s_phases_under_distributed_data_parallel(tmp_path):
    # Under DDP every parameter must take part in each step's loss: the cluster head joins the
    # instance-only steps with weight 0, and its gradients are still dropped on every rank.
    _stl10_folder(tmp_path / "stl10")
    proc = run_torchrun(REPO_ROOT / "main.py", str(CONFIG), f"data.root={tmp_path / 'stl10'}",
                        f"run.output_dir={tmp_path}", "run.name=cc2", f"train.batch_size_per_rank={BATCH // 2}", *SMALL,
                        nproc=2)
    assert "final (2 epochs" in proc.stdout
    assert_adam_steps_and_term_averages(tmp_path / "cc2")


def test_a_step_cap_that_ends_every_epoch_on_the_extra_images_is_warned_of(tmp_path):
    _stl10_folder(tmp_path / "stl10")
    common = [str(CONFIG), f"data.root={tmp_path / 'stl10'}", f"run.output_dir={tmp_path}",
              f"train.batch_size_per_rank={BATCH}", *SMALL, "train.epochs=1"]
    warning = (f"WARNING utils.trainer: train.max_steps_per_epoch=7 ends every epoch within its first {EXTRA_STEPS} "
               "steps, on the extra images: the other 80 images are never trained")
    launcher.main([*common, "run.name=capped", "train.max_steps_per_epoch=7"])
    assert warning in (tmp_path / "capped" / "train.log").read_text()
    launcher.main([*common, "run.name=reaches", "train.max_steps_per_epoch=8"])   # one step with both losses
    assert "max_steps_per_epoch" not in (tmp_path / "reaches" / "train.log").read_text()


def test_too_few_unlabeled_images_for_a_batch_of_their_own_is_a_one_line_error(tmp_path):
    _stl10_folder(tmp_path / "stl10")
    with pytest.raises(SystemExit, match=r"^error: train.batch_size_per_rank=16 x 1 rank\(s\): CC trains the 5 extra "
                                         r"\(unlabeled\) images in steps of their own, and they do not fill one batch; "
                                         r"lower the batch size$"):
        launcher.main([str(CONFIG), f"data.root={tmp_path / 'stl10'}", f"run.output_dir={tmp_path}", "run.name=few",
                       f"train.batch_size_per_rank={BATCH}", *SMALL, "data.limit=85"])   # 80 labelled + 5 unlabeled
    assert not (tmp_path / "few").exists()
