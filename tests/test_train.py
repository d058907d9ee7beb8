"""End-to-end runs of the launcher: demo config at a reduced size, resume, two processes, errors."""
import csv
import errno
import functools
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import main as launcher
from tests.stop_util import (assert_same_weights, feature_pass_signalling_at_batch, logged_steps,
                             train_step_signalling_after)
from utils import distributed as du
from utils.checkpoint import CHECKPOINT_KEYS
from utils.config import ConfigError, load_config
from utils.stop import EXIT_STOPPED
from utils.trainer import Trainer
from tests.torchrun_util import REPO_ROOT, SHARED_DATA, run_torchrun

DEMO = REPO_ROOT / "config" / "mnist_cnn_propos.yml"
SCRIPTS = REPO_ROOT / "tests" / "dist_scripts"
# The demo at a reduced size: 640 real digits from the official MNIST order (all classes mixed),
# smaller heads, 2 epochs with the clustering terms from the second one.
SMALL = ["data.name=mnist", f"data.root={SHARED_DATA / 'mnist.npz'}", "data.limit=640",
         "train.batch_size_per_rank=64", "train.epochs=2", "train.log_every_steps=1", "train.time_budget_minutes=0",
         "method.warmup_epochs=1", "method.projector_hidden_dim=64", "method.predictor_hidden_dim=64",
         "method.feature_dim=32", "eval.every_epochs=1", "eval.n_init=1", "cluster.n_init=1",
         "logging.progress_bar=false"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_scores(run_dir: Path) -> list[tuple[int, float, float]]:
    """(epoch, ACC, NMI) of each evaluation the run logged, in order."""
    return [(r["epoch"], r["eval/acc"], r["eval/nmi"]) for r in records(run_dir) if "eval/acc" in r]


def step_losses(run_dir: Path, epoch: int) -> list[float]:
    return [r["step/loss"] for r in records(run_dir) if "step/loss" in r and r["epoch"] == epoch]


def epoch_term_averages(run_dir: Path, epoch: int) -> dict[str, float]:
    """The epoch record's averages of the method's terms (`train/*` without the speed figures)."""
    [record] = [r for r in records(run_dir) if r["epoch"] == epoch and "train/loss" in r]
    return {k: v for k, v in record.items()
            if k.startswith("train/") and k not in ("train/images_per_s", "train/epoch_seconds")}


def read_clusters(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_scores_match_clusters(rows: list[dict[str, str]], metrics: dict[str, float]) -> None:
    """scikit-learn's NMI and ARI of the CSV's (label, cluster) columns are the run's reported scores."""
    labels, clusters = [int(r["label"]) for r in rows], [int(r["cluster"]) for r in rows]
    assert normalized_mutual_info_score(labels, clusters) == pytest.approx(metrics["nmi"], abs=1e-6)
    assert adjusted_rand_score(labels, clusters) == pytest.approx(metrics["ari"], abs=1e-6)


def sizes_of_clusters(rows: list[dict[str, str]], num_clusters: int) -> dict[str, float]:
    """The CSV's cluster column counted by hand: what `cluster_size_stats` should report."""
    counts = Counter(r["cluster"] for r in rows)
    empty = num_clusters - len(counts)
    return {"empty_clusters": empty, "largest_cluster_fraction": max(counts.values()) / len(rows),
            "smallest_cluster_fraction": 0.0 if empty else min(counts.values()) / len(rows)}


def assert_matching_of_clusters(matching: dict, rows: list[dict[str, str]], acc: float, num_classes: int) -> None:
    """`matching` (utils.assignments.class_matching) is the confusion counted from the CSV's (label,
    cluster) columns, with K = C clusters mapped one-to-one, and its matched cells are what ACC scored."""
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for r in rows:
        confusion[int(r["label"])][int(r["cluster"])] += 1
    assert matching["confusion"] == confusion and len(matching["class_names"]) == num_classes
    assert sorted(matching["cluster_class"]) == list(range(num_classes))  # K = C: a one-to-one map
    matched = {cls: confusion[cls][cluster] for cluster, cls in enumerate(matching["cluster_class"])}
    assert sum(matched.values()) / len(rows) == pytest.approx(acc, abs=1e-12)
    assert matching["class_accuracy"] == pytest.approx([matched[c] / sum(confusion[c]) for c in range(num_classes)])


def logged_sizes(record: dict) -> dict[str, float]:
    return {k: record[f"eval/{k}"] for k in ("empty_clusters", "largest_cluster_fraction", "smallest_cluster_fraction")}


def test_demo_config_end_to_end_at_reduced_size(tmp_path, capsys):
    metrics = launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=demo", *SMALL])
    run_dir = tmp_path / "demo"
    assert set(metrics) == {"nmi", "acc", "ari"} and all(0.0 <= v <= 1.0 for v in metrics.values())
    out = capsys.readouterr().out
    assert f"ACC {metrics['acc']:.4f}" in out and "NMI" in out and "ARI" in out
    assert f"clusters -> {run_dir / 'clusters.csv'}, {run_dir / 'class_matching.json'}" in out
    rows = read_clusters(run_dir / "clusters.csv")  # the final read-out of every image, in dataset order
    assert [r["index"] for r in rows] == [str(i) for i in range(640)] and "file" not in rows[0]
    labels = np.load(SHARED_DATA / "mnist.npz")["y_train"][:640]
    assert [int(r["label"]) for r in rows] == labels.tolist()
    assert_scores_match_clusters(rows, metrics)
    # which digits the final clusters merged: the confusion of the same read-out
    matching = json.loads((run_dir / "class_matching.json").read_text())
    assert matching["class_names"] == [str(d) for d in range(10)]
    assert_matching_of_clusters(matching, rows, metrics["acc"], 10)
    assert (run_dir / "config.yml").is_file() and (run_dir / "train.log").is_file()
    evals = [r for r in records(run_dir) if "eval/acc" in r]
    assert [r["epoch"] for r in evals] == [0, 1]
    assert logged_sizes(evals[-1]) == pytest.approx(sizes_of_clusters(rows, 10))  # how the clusters spread
    assert len(step_losses(run_dir, 1)) == 10 and "step/psl" in records(run_dir)[-2]  # clustering terms ran
    for name in ("last.pt", "best.pt"):
        state = torch.load(run_dir / name, weights_only=True)
        assert not any(k.startswith("module.") for k in state["model"])
        assert state["config"]["method"]["name"] == "propos" and len(state["rng"]) == 1
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 20
    labels = last["model"]["pseudo_labels"]
    assert labels.shape == (640,) and labels.min() >= 0 and labels.unique().numel() == 10


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """The reduced demo run from start to end in one go: the oracle of the interrupted runs."""
    out = tmp_path_factory.mktemp("straight")
    launcher.main([str(DEMO), f"run.output_dir={out}", "run.name=straight", *SMALL])
    return out / "straight"


def config_change_lines(run_dir: Path) -> list[str]:
    """The messages of train.log's "resuming with another config" warnings."""
    marker = " WARNING main: "
    return [line.split(marker, 1)[1] for line in (run_dir / "train.log").read_text().splitlines()
            if marker + "resuming with another config" in line]


def test_resume_reproduces_the_uninterrupted_next_step_losses(tmp_path, straight_run):
    # The same run, stopped after its first epoch by a tiny time budget, then resumed.
    launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=split", *SMALL, "train.time_budget_minutes=1e-6"])
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["epoch"] == 1
    assert step_losses(tmp_path / "split", 1) == []
    launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=split", *SMALL, "--resume", "auto"])
    # The one key the resume changed (the time budget) is named in train.log, with both values.
    assert config_change_lines(tmp_path / "split") == [
        f"resuming with another config than {tmp_path / 'split' / 'last.pt'} was saved with (1 key(s)): "
        "train.time_budget_minutes: 1e-06 -> 0.0"]
    straight, resumed = step_losses(straight_run, 1), step_losses(tmp_path / "split", 1)
    assert len(straight) == 10
    assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-7)


# SMALL: 10 steps per epoch, the E-step and clustering terms from epoch 1 on. Step 13 is inside
# epoch 1, after its E-step; step 10 ends epoch 0.
@pytest.mark.parametrize("stop_after, epoch, epoch_step", [(13, 1, 3), (10, 1, 0)])
def test_a_run_stopped_by_sigusr1_resumes_as_if_never_stopped(tmp_path, monkeypatch, capsys, straight_run,
                                                              stop_after, epoch, epoch_step):
    argv = [str(DEMO), f"run.output_dir={tmp_path}", "run.name=split", *SMALL]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", train_step_signalling_after(stop_after))
        with pytest.raises(SystemExit) as exc:
            launcher.main(argv)
    assert exc.value.code == EXIT_STOPPED
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the launcher's handler is gone again
    assert (f"stopped by SIGUSR1 at epoch {epoch}, step {epoch_step} of 10: saved {tmp_path / 'split' / 'last.pt'}"
            in capsys.readouterr().err)
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"], state["global_step"]) == (epoch, epoch_step, stop_after)
    if epoch_step:  # saved after steps that no k-means read-out has seen: none to assign other images to
        assert state["readout"] is None
    assert len(step_losses(tmp_path / "split", 1)) == epoch_step  # the steps before the stop, no more
    assert not any("eval/acc" in r for r in records(tmp_path / "split") if r["epoch"] == 1)  # no evaluation
    if epoch_step:  # a position the config cannot reach: 640 / 256 is 2 steps per epoch
        with pytest.raises(SystemExit, match=r"^error: .*last.pt: stopped at step 3 of its epoch, but this config "
                                             r"has 2 steps per epoch; resume with the data, batch size and ranks"):
            launcher.main([*argv, "train.batch_size_per_rank=256", "--resume", "auto"])
    capsys.readouterr()
    launcher.main([*argv, "--resume", "auto"])
    # The final line counts the run's 2 epochs, and says from where this process's seconds count
    resumed_at = f"epoch {epoch}" + (f", step {epoch_step}" if epoch_step else "")
    assert re.search(rf"^final \(2 epochs, \d+s since the resume at {resumed_at}\): NMI ", capsys.readouterr().out,
                     flags=re.M)
    # The epoch's pseudo-labels come from the checkpoint, not from a new E-step on the half-trained
    # network, and the loader starts at the next batch: the uninterrupted run's every step and weight.
    assert step_losses(tmp_path / "split", 1) == pytest.approx(step_losses(straight_run, 1), rel=1e-6, abs=1e-7)
    assert_same_weights(tmp_path / "split", straight_run)
    assert config_change_lines(tmp_path / "split") == []  # resumed with the config it was saved with
    # One record for epoch 1, averaging its 10 steps (those before the stop too), as uninterrupted.
    straight_averages = epoch_term_averages(straight_run, 1)
    assert len(straight_averages) >= 3 and "train/psl" in straight_averages
    assert epoch_term_averages(tmp_path / "split", 1) == pytest.approx(straight_averages, rel=1e-6, abs=1e-7)
    final = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (final["epoch"], final["epoch_step"], final["global_step"]) == (2, 0, 20)
    # The final evaluation's k-means read-out is kept with the final weights: the uninterrupted run's.
    straight = torch.load(straight_run / "last.pt", weights_only=True)["readout"]
    assert final["readout"]["features"] == straight["features"] and final["readout"]["metric"] == straight["metric"]
    assert final["readout"]["centroids"].shape[0] == 10
    torch.testing.assert_close(final["readout"]["centroids"], straight["centroids"], rtol=1e-5, atol=1e-6)


def test_a_killed_run_loses_only_the_steps_since_its_last_mid_epoch_save(tmp_path, straight_run):
    # train.save_every_minutes tiny: last.pt after every step. SIGKILL (no chance to save) once step 13,
    # inside epoch 1, is logged; the resumed run redoes at most the step after the last save and
    # ends with the uninterrupted run's weights.
    argv = [str(DEMO), f"run.output_dir={tmp_path}", "run.name=killed", *SMALL, "train.save_every_minutes=1e-9"]
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "main.py"), *argv], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while max(logged_steps(run_dir), default=0) < 13 and proc.poll() is None:
            time.sleep(0.02)
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read()[-3000:]
    finally:
        proc.kill()
        proc.stderr.close()
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert 12 <= state["global_step"] < 20 and (state["epoch"], state["epoch_step"]) == (1, state["global_step"] - 10)
    launcher.main([*argv, "--resume", "auto"])
    assert_same_weights(run_dir, straight_run)
    straight = {r["step"]: r["step/loss"] for r in records(straight_run) if "step/loss" in r}
    logged = [(r["step"], r["step/loss"]) for r in records(run_dir) if "step/loss" in r]
    assert sorted({step for step, _ in logged}) == list(range(1, 21))
    assert len(logged) - 20 <= 2  # redone: only the steps after the last save
    assert [loss for _, loss in logged] == pytest.approx([straight[step] for step, _ in logged], rel=1e-6, abs=1e-7)
    # The redone steps count once in the epoch's averages: the sums were saved with the position.
    assert epoch_term_averages(run_dir, 1) == pytest.approx(epoch_term_averages(straight_run, 1), rel=1e-6, abs=1e-7)


def test_a_stop_signal_at_the_last_step_lets_the_run_finish(tmp_path, monkeypatch, straight_run):
    monkeypatch.setattr(Trainer, "train_step", train_step_signalling_after(20))
    metrics = launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=done", *SMALL])  # no SystemExit
    assert set(metrics) == {"nmi", "acc", "ari"}
    assert [r["epoch"] for r in records(tmp_path / "done") if "eval/acc" in r] == [0, 1]
    assert_same_weights(tmp_path / "done", straight_run)


def test_a_stop_signal_during_the_e_step_saves_the_epoch_start_and_the_resumed_run_runs_it_again(
        tmp_path, monkeypatch, digit_folders):
    """SIGUSR1 after the first batch of epoch 1's feature pass (image files, whose DataLoader draws its
    seed from the global RNG): the pass ends at its next batch and last.pt is epoch 1's start, with the
    RNG state from before the pass. The resumed run ends with the uninterrupted run's weights and RNG."""
    run = [str(DEMO), f"run.output_dir={tmp_path}", *FOLDER_RUN, f"data.root={digit_folders[1]}",
           "eval.every_epochs=2", "cluster.extract_batch_size=32"]  # no evaluation's features for the E-step to reuse
    launcher.main([*run, "run.name=straight"])
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "update_pseudo_labels", feature_pass_signalling_at_batch("update_pseudo_labels", 0))
        with pytest.raises(SystemExit) as exc:
            launcher.main([*run, "run.name=stopped"])
    assert exc.value.code == EXIT_STOPPED
    state = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"], state["global_step"]) == (1, 0, 5)
    assert ("stop requested during the E-step of epoch 1 (stop requested at batch 1 of the feature pass)"
            in (tmp_path / "stopped" / "train.log").read_text())
    launcher.main([*run, "run.name=stopped", "--resume", "auto"])
    assert_same_weights(tmp_path / "stopped", tmp_path / "straight")
    straight, resumed = (torch.load(tmp_path / name / "last.pt", weights_only=True)["rng"][0]
                         for name in ("straight", "stopped"))
    assert torch.equal(straight["torch"], resumed["torch"])


def test_a_stop_signal_during_an_evaluation_runs_it_on_resume_as_the_uninterrupted_run_did(tmp_path, monkeypatch,
                                                                                            straight_run):
    """SIGUSR1 after the first of the two batches of epoch 0's evaluation pass: the pass ends, last.pt
    is epoch 1's start and lists the evaluation, which the resumed run runs first, on the same weights:
    its scores, best.pt and every later step and weight are the uninterrupted run's."""
    argv = [str(DEMO), f"run.output_dir={tmp_path}", "run.name=split", *SMALL]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "evaluate", feature_pass_signalling_at_batch("evaluate", 0))
        with pytest.raises(SystemExit, match=f"^{EXIT_STOPPED}$"):
            launcher.main(argv)
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"], state["global_step"]) == (1, 0, 10)
    assert state["pending_evaluations"] == ["cluster"] and state["best"] == {} and state["readout"] is None
    assert not any("eval/acc" in r for r in records(tmp_path / "split"))
    assert not (tmp_path / "split" / "best.pt").exists()
    saved = (tmp_path / "split" / "last.pt").read_bytes()
    with monkeypatch.context() as patch:  # stopped again, in the resumed run's first pass: last.pt stays as it was
        patch.setattr(Trainer, "evaluate", feature_pass_signalling_at_batch("evaluate", 0))
        with pytest.raises(SystemExit, match=f"^{EXIT_STOPPED}$"):
            launcher.main([*argv, "--resume", "auto"])
    assert (tmp_path / "split" / "last.pt").read_bytes() == saved
    launcher.main([*argv, "--resume", "auto"])
    assert eval_scores(tmp_path / "split") == pytest.approx(eval_scores(straight_run), rel=1e-6)
    assert step_losses(tmp_path / "split", 1) == pytest.approx(step_losses(straight_run, 1), rel=1e-6, abs=1e-7)
    assert_same_weights(tmp_path / "split", straight_run)
    best = [torch.load(run / "best.pt", weights_only=True) for run in (tmp_path / "split", straight_run)]
    assert best[0]["global_step"] == best[1]["global_step"] and best[0]["best"] == pytest.approx(best[1]["best"])
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["pending_evaluations"] == []


def test_a_stop_signal_during_the_last_evaluation_waits_for_the_run_s_result(tmp_path, monkeypatch):
    run = [str(DEMO), f"run.output_dir={tmp_path}", "run.name=r", *SMALL, "train.epochs=1"]
    monkeypatch.setattr(Trainer, "evaluate", feature_pass_signalling_at_batch("evaluate", 0))
    assert set(launcher.main(run)) == {"nmi", "acc", "ari"}  # no SystemExit
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["pending_evaluations"] == []


def test_a_stage_stopped_in_its_first_e_step_is_not_started_again_on_resume(tmp_path, monkeypatch):
    """With the E-step at the stage's first step (no warm-up), a stop during it saves step 0 of the
    stage; the resumed run must not run the method's one-time `start_stage` a second time."""
    from models.propos import ProPos

    started = []
    monkeypatch.setattr(ProPos, "start_stage", lambda self, name, context: started.append(name))
    run = [str(DEMO), f"run.output_dir={tmp_path}", "run.name=r", *SMALL, "method.warmup_epochs=0", "train.epochs=1",
           "cluster.extract_batch_size=128"]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "update_pseudo_labels", feature_pass_signalling_at_batch("update_pseudo_labels", 1))
        with pytest.raises(SystemExit, match=str(EXIT_STOPPED)):
            launcher.main(run)
    state = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"], state["stage_started"]) == (0, 0, True) and started == ["train"]
    launcher.main([*run, "--resume", "auto"])
    assert started == ["train"]


def test_a_diverging_loss_ends_the_run_with_one_line_naming_its_last_checkpoint(tmp_path):
    """optim.lr=1e12 makes the loss NaN within two steps: one line saying so, and which checkpoint is
    the last (there is none in a fresh run), which the failed steps leave as it was."""
    run = [str(DEMO), f"run.output_dir={tmp_path}", *SMALL]
    with pytest.raises(SystemExit) as raised:
        launcher.main([*run, "run.name=fresh", "optim.lr=1e12"])
    assert re.fullmatch(r"error: loss is (nan|-?inf) at epoch 0, step [01]: lower optim.lr or check the data; "
                        r"no checkpoint was saved yet", str(raised.value.code))
    launcher.main([*run, "run.name=r", "train.epochs=1"])
    last = tmp_path / "r" / "last.pt"
    saved = last.read_bytes()
    with pytest.raises(SystemExit) as raised:
        launcher.main([*run, "run.name=r", "--resume", "auto", "optim.lr=1e12"])
    assert re.fullmatch(rf"error: loss is (nan|-?inf) at epoch 1, step 1[01]: lower optim.lr or check the data; "
                        rf"the last checkpoint, {re.escape(str(last))}, is from global step 10", str(raised.value.code))
    assert last.read_bytes() == saved
    assert "ERROR main: loss is" in (tmp_path / "r" / "train.log").read_text()


@pytest.mark.parametrize("cudnn_benchmark,deterministic", [(True, False), (False, False), (True, True)])
def test_run_flags_set_cudnns_benchmark_mode_and_torchs_deterministic_mode(monkeypatch, cudnn_benchmark, deterministic):
    from utils.config import load_config

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not cudnn_benchmark)   # restored after the test
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    try:
        launcher.start_distributed(load_config(DEMO, [f"run.cudnn_benchmark={str(cudnn_benchmark).lower()}",
                                                      f"run.deterministic={str(deterministic).lower()}",
                                                      "run.device=cpu"]))
        assert torch.backends.cudnn.benchmark is (cudnn_benchmark and not deterministic)
        assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert ("CUBLAS_WORKSPACE_CONFIG" in os.environ) is deterministic
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_deterministic_run_repeats_bit_for_bit_on_two_threads(tmp_path):
    # Without run.deterministic, two such runs differed from step 2 (threaded float sums), and DCCM's
    # thresholds carried the difference on to different clusters.
    from tests.test_methods_dccm import CONFIG as DCCM_CONFIG, SMALL as DCCM_SMALL

    common = [str(DCCM_CONFIG), f"run.output_dir={tmp_path}", *DCCM_SMALL, "run.deterministic=true",
              "run.threads_per_rank=2", "train.batch_size_per_rank=32", "train.epochs=1"]
    try:
        first = launcher.main([*common, "run.name=first"])
        second = launcher.main([*common, "run.name=second"])
    finally:
        torch.use_deterministic_algorithms(False)
    losses = [step_losses(tmp_path / name, epoch=0) for name in ("first", "second")]
    assert len(losses[0]) == 16 and losses[0] == losses[1] and first == second   # equal floats, not close ones
    weights = [torch.load(tmp_path / name / "last.pt", weights_only=True)["model"] for name in ("first", "second")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_existing_run_directory_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"precious")
    with pytest.raises(SystemExit, match=r"already holds checkpoints; pass --resume auto"):
        launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=taken", *SMALL])
    assert (run_dir / "last.pt").read_bytes() == b"precious"


@pytest.mark.parametrize("argv", [
    ["c.yml", "--resume", "auto", "train.epochs=2", "data.limit=64"],
    ["c.yml", "train.epochs=2", "--resume", "auto", "data.limit=64"],
])
def test_overrides_may_follow_the_options(argv):
    # The same command with every option last is the reference.
    assert launcher.parse_args(argv) == launcher.parse_args(["c.yml", "train.epochs=2", "data.limit=64",
                                                             "--resume", "auto"])


# The reduced demo on an image folder of 160 real digits, sorted by label so that the flat (unlabeled)
# folder and the class-folder copy list the same images in the same order.
FOLDER_RUN = ["data.name=imagefolder", "data.num_workers=0", "train.batch_size_per_rank=32", "train.epochs=2",
              "train.time_budget_minutes=0", "method.warmup_epochs=1", "method.projector_hidden_dim=64",
              "method.predictor_hidden_dim=64", "method.feature_dim=32", "cluster.n_init=1", "eval.n_init=1",
              "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory) -> tuple[Path, Path, list[int], Path]:
    """(flat folder, class-folder copy, labels in file order, a flat folder of every third image)."""
    root = tmp_path_factory.mktemp("digits")
    mnist = np.load(SHARED_DATA / "mnist.npz")
    images, labels = mnist["x_train"][:160], mnist["y_train"][:160]
    order = np.argsort(labels, kind="stable")
    for position, i in enumerate(order):
        name = f"{labels[i]}_{position:03d}.png"
        for path in (root / "flat" / name, root / "classes" / str(labels[i]) / name):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
        if position % 3 == 0:
            (root / "subset").mkdir(exist_ok=True)
            Image.fromarray(images[i]).save(root / "subset" / name)
    return root / "flat", root / "classes", labels[order].tolist(), root / "subset"


def test_an_unlabeled_image_folder_is_clustered_as_its_labelled_copy(tmp_path, capsys, digit_folders):
    flat, classes, labels, subset = digit_folders
    common = [str(DEMO), f"run.output_dir={tmp_path}", *FOLDER_RUN, "cluster.num_clusters=10"]
    assert launcher.main([*common, "run.name=flat", f"data.root={flat}"]) == {}  # nothing to score
    unlabeled_rows = read_clusters(tmp_path / "flat" / "clusters.csv")
    sizes = sizes_of_clusters(unlabeled_rows, 10)  # what there is to say instead: how the images spread
    assert (f"no labels to score (largest cluster {100 * sizes['largest_cluster_fraction']:.1f}%, smallest "
            f"{100 * sizes['smallest_cluster_fraction']:.1f}%, {sizes['empty_clusters']} empty); clusters -> "
            f"{tmp_path / 'flat' / 'clusters.csv'}") in capsys.readouterr().out
    labelled = launcher.main([*common, "run.name=classes", f"data.root={classes}"])
    labelled_rows = read_clusters(tmp_path / "classes" / "clusters.csv")
    assert [r["file"] for r in unlabeled_rows] == sorted(str(p) for p in flat.iterdir())
    assert {r["label"] for r in unlabeled_rows} == {"-1"}
    assert [int(r["label"]) for r in labelled_rows] == labels
    assert [Path(r["file"]).name for r in labelled_rows] == [Path(r["file"]).name for r in unlabeled_rows]
    # The labels play no part in training: the same images in the same order give the same clusters,
    # and those score as the labelled run reported.
    assert [r["cluster"] for r in unlabeled_rows] == [r["cluster"] for r in labelled_rows]
    assert not (tmp_path / "flat" / "class_matching.json").exists()  # no classes to match clusters to
    assert_matching_of_clusters(json.loads((tmp_path / "classes" / "class_matching.json").read_text()),
                                labelled_rows, labelled["acc"], 10)
    assert len({r["cluster"] for r in unlabeled_rows}) > 1
    assert_scores_match_clusters([{**r, "label": str(y)} for r, y in zip(unlabeled_rows, labels)], labelled)
    # --eval cluster of the checkpoint writes the same clusters beside it.
    results = launcher.main([*common, "run.name=flat", f"data.root={flat}", "--eval", "cluster",
                             "--checkpoint", str(tmp_path / "flat" / "last.pt")])
    assert read_clusters(tmp_path / "flat" / "last.clusters.csv") == unlabeled_rows
    assert "class_matching" not in results and "cluster_sizes" in results  # no classes to match clusters to
    # ... and of other images (another N than the pseudo-labels in the checkpoint): k-means of their features.
    launcher.main([*common, "run.name=flat", f"data.root={subset}", "--eval", "cluster",
                   "--checkpoint", str(tmp_path / "flat" / "last.pt")])
    rows = read_clusters(tmp_path / "flat" / "last.clusters.csv")
    assert [r["file"] for r in rows] == sorted(str(p) for p in subset.iterdir()) and len(rows) == 54
    assert len({r["cluster"] for r in rows}) > 1
    # --eval assign puts them in the checkpoint's clusters instead: the ids the run gave those images.
    trained = {Path(r["file"]).name: r["cluster"] for r in unlabeled_rows}
    few = tmp_path / "few"  # fewer images than clusters: nothing to fit k-means to, but they can be assigned
    few.mkdir()
    for path in sorted(subset.iterdir())[::12]:
        shutil.copy(path, few / path.name)
    for folder, count in ((subset, 54), (flat, 160), (few, 5)):
        launcher.main([*common, "run.name=flat", f"data.root={folder}", "--eval", "assign",
                       "--checkpoint", str(tmp_path / "flat" / "last.pt")])
        rows = read_clusters(tmp_path / "flat" / "last.assigned.csv")
        assert len(rows) == count and [r["cluster"] for r in rows] == [trained[Path(r["file"]).name] for r in rows]
    # Every mode's precondition is checked before the first mode runs: features (first) writes nothing.
    with pytest.raises(SystemExit, match=r"^error: --eval cluster: eval.num_clusters: 10 clusters, but the data have "
                                         r"only 5 images \(--eval assign puts them into the checkpoint's clusters\)$"):
        launcher.main([*common, f"data.root={few}", "--eval", "features,cluster",
                       "--checkpoint", str(tmp_path / "flat" / "last.pt")])
    assert not (tmp_path / "flat" / "last.features.npz").exists()
    # --eval features exports their features, in the same order, with their files.
    launcher.main([*common, f"data.root={subset}", "--eval", "features", "--checkpoint", str(tmp_path / "flat" / "last.pt")])
    exported = np.load(tmp_path / "flat" / "last.features.npz")
    assert exported["files"].tolist() == sorted(str(p) for p in subset.iterdir())
    assert exported["labels"].tolist() == [-1] * 54 and exported["features"].shape[0] == 54
    # A checkpoint without the read-out (written before it was kept) is one line, and nothing is written.
    state = torch.load(tmp_path / "flat" / "last.pt", weights_only=True)
    del state["readout"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match=rf"^error: --eval assign: {re.escape(str(tmp_path / 'old.pt'))} has no k-means read-out "
                                         r"to assign to \(a checkpoint keeps the one fitted with its weights: use "
                                         r"best.pt, or a last.pt saved at an evaluation; --eval cluster fits k-means "
                                         r"again\)$"):
        launcher.main([*common, f"data.root={subset}", "--eval", "features,assign", "--checkpoint",
                       str(tmp_path / "old.pt")])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("old")] == ["old.pt"]
    exported_at = (tmp_path / "flat" / "last.features.npz").stat().st_mtime_ns
    with pytest.raises(SystemExit, match=r"^error: --eval knn: needs labels, and flat has none \(--eval "
                                         r"cluster\|assign\|features write the clusters or features of unlabeled data\)$"):
        launcher.main([*common, f"data.root={flat}", "--eval", "features,knn",
                       "--checkpoint", str(tmp_path / "flat" / "last.pt")])
    assert (tmp_path / "flat" / "last.features.npz").stat().st_mtime_ns == exported_at


# A method that reads clusters out per image (CC's head, DEC's soft assignment) gives a checkpoint's
# images the same clusters whatever else is evaluated with them.
PER_IMAGE_READ_OUT = {
    "cc": ["train.epochs=1"],
    "mnist_mlp_dec": ["method.pretrain_epochs=1", "method.cluster_epochs=1", "method.hidden_dims=[64, 64, 128]"],
}


@pytest.mark.parametrize("config", list(PER_IMAGE_READ_OUT))
def test_a_checkpoint_clusters_other_images_as_it_clustered_its_own(tmp_path, digit_folders, config):
    flat, _, _, subset = digit_folders
    path = REPO_ROOT / "config" / (f"mnist_cnn_{config}.yml" if config == "cc" else f"{config}.yml")
    common = [str(path), f"run.output_dir={tmp_path}", "run.name=run", "data.name=imagefolder", "data.num_workers=0",
              "train.batch_size_per_rank=32", "cluster.num_clusters=10", "cluster.n_init=1", "eval.n_init=1",
              "logging.progress_bar=false", *PER_IMAGE_READ_OUT[config]]
    launcher.main([*common, f"data.root={flat}"])
    trained = {Path(r["file"]).name: r["cluster"] for r in read_clusters(tmp_path / "run" / "clusters.csv")}
    # A training batch larger than the 54 images does not matter to an evaluation.
    launcher.main([*common, f"data.root={subset}", "train.batch_size_per_rank=64", "--eval", "cluster",
                   "--checkpoint", str(tmp_path / "run" / "last.pt")])
    rows = read_clusters(tmp_path / "run" / "last.clusters.csv")
    assert len(rows) == 54 and len(set(trained.values())) > 1
    assert [r["cluster"] for r in rows] == [trained[Path(r["file"]).name] for r in rows]
    # --eval assign reads out the same per-image clusters (it needs no k-means read-out here).
    launcher.main([*common, f"data.root={subset}", "--eval", "assign", "--checkpoint", str(tmp_path / "run" / "last.pt")])
    assert read_clusters(tmp_path / "run" / "last.assigned.csv") == rows


def test_a_pcl_checkpoint_assigns_fewer_images_than_its_levels_have_clusters(tmp_path, digit_folders):
    flat, _, _, subset = digit_folders
    common = [str(REPO_ROOT / "config" / "mnist_cnn_pcl.yml"), f"run.output_dir={tmp_path}", "run.name=pcl",
              "data.name=imagefolder", "data.num_workers=0", "train.batch_size_per_rank=32", "train.epochs=2",
              "method.warmup_epochs=1", "method.num_clusters_per_level=[10, 40]", "method.queue_size=64",
              "cluster.num_clusters=10", "cluster.n_init=1", "eval.n_init=1", "logging.progress_bar=false"]
    launcher.main([*common, f"data.root={flat}"])
    trained = {Path(r["file"]).name: r["cluster"] for r in read_clusters(tmp_path / "pcl" / "clusters.csv")}
    # 18 images: fewer than the 40 clusters of PCL's second level, which only training needs.
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(subset.iterdir())[::3]:
        shutil.copy(path, few / path.name)
    launcher.main([*common, f"data.root={few}", "--eval", "assign", "--checkpoint", str(tmp_path / "pcl" / "last.pt")])
    rows = read_clusters(tmp_path / "pcl" / "last.assigned.csv")
    assert len(rows) == 18 and len(set(trained.values())) > 1
    assert [r["cluster"] for r in rows] == [trained[Path(r["file"]).name] for r in rows]


NO_K = (r"^error: cluster.num_clusters: the training data have no classes to take the number of clusters from "
        r"\(flat is unlabeled\); set cluster.num_clusters=K$")


def _truncate_one_image(tree: Path) -> Path:
    """Replace one image of `tree`/3 by the first half of its JPEG encoding; the new file's path."""
    broken = sorted((tree / "3").iterdir())[2]
    buffer = io.BytesIO()
    Image.open(broken).save(buffer, "JPEG")
    broken.unlink()
    broken = broken.with_suffix(".jpg")
    broken.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return broken


def test_an_unreadable_image_is_a_one_line_error_naming_it(tmp_path, digit_folders):
    """A truncated file in a folder the device loader decodes up front: the error names the file
    (Pillow's own message does not) and the run directory is not left behind."""
    tree = tmp_path / "classes"
    shutil.copytree(digit_folders[1], tree)
    broken = _truncate_one_image(tree)
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(broken))}: not a readable image \([^\n]*"
                                         r"[Tt]runcated[^\n]*\); remove or replace the file$"):
        launcher.main([str(DEMO), f"run.output_dir={tmp_path / 'runs'}", "run.name=b", *FOLDER_RUN,
                       f"data.root={tree}", "data.loader=device"])
    assert not (tmp_path / "runs").exists()


def counting_calls(function, counter: Counter):
    """`function(path, ...)`, counting its calls per file name in `counter`."""
    def call(path, *args, **kwargs):
        counter[Path(path).name] += 1
        return function(path, *args, **kwargs)
    return call


def test_the_device_loader_decodes_an_image_folder_once_for_training_and_every_feature_pass(tmp_path, digit_folders,
                                                                                          monkeypatch):
    """data.loader=device on image files: each file is decoded once, although the run clusters and
    scores every image several times (k-means each epoch after the warm-up, evaluations, the final
    read-out). The oracle for that copy: --eval cluster of the checkpoint through the workers loader,
    which decodes the files on its single pass, gives the clusters the run wrote (same features)."""
    import data.datasets
    import data.loaders

    decoded = Counter()
    for module in (data.datasets, data.loaders):
        monkeypatch.setattr(module, "load_image_file", counting_calls(module.load_image_file, decoded))
    classes = digit_folders[1]
    common = [str(DEMO), f"run.output_dir={tmp_path}", "run.name=dev", *FOLDER_RUN, f"data.root={classes}",
              "eval.every_epochs=1"]
    launcher.main([*common, "data.loader=device"])
    files = sorted(p.name for p in classes.rglob("*.png"))
    assert sorted(decoded) == files and set(decoded.values()) == {1}
    rows = read_clusters(tmp_path / "dev" / "clusters.csv")
    assert sorted(Path(r["file"]).name for r in rows) == files   # the files still name the images
    log = (tmp_path / "dev" / "train.log").read_text()
    assert "decoding the 160 files of classes into memory at 28 px (data.loader=device), once" in log
    decoded.clear()
    launcher.main([*common, "data.loader=workers", "--eval", "cluster",
                   "--checkpoint", str(tmp_path / "dev" / "last.pt")])
    assert sorted(decoded) == files and set(decoded.values()) == {1}
    assert read_clusters(tmp_path / "dev" / "last.clusters.csv") == rows
    assert len({r["cluster"] for r in rows}) > 1


def test_decode_once_serves_the_feature_passes_from_memory_and_leaves_training_on_the_files(tmp_path, digit_folders,
                                                                                         monkeypatch):
    """data.decode_once with the workers loader: the feature passes decode each file once in all, the
    training batches still read the files, and the run is the run without it (the oracle): the same
    metrics at every epoch and the same clusters."""
    import data.datasets
    import data.loaders

    decoded, trained = Counter(), Counter()
    for module in (data.datasets, data.loaders):
        monkeypatch.setattr(module, "load_image_file", counting_calls(module.load_image_file, decoded))
    monkeypatch.setattr(data.loaders, "read_image_file", counting_calls(data.loaders.read_image_file, trained))
    classes = digit_folders[1]
    common = [str(DEMO), f"run.output_dir={tmp_path}", *FOLDER_RUN, f"data.root={classes}", "eval.every_epochs=1",
              "data.loader=workers"]
    files = sorted(p.name for p in classes.rglob("*.png"))
    runs, decodes = {}, {}
    for name, decode in (("files", "false"), ("once", "true")):
        decoded.clear(), trained.clear()
        launcher.main([*common, f"run.name={name}", f"data.decode_once={decode}"])
        runs[name] = (read_clusters(tmp_path / name / "clusters.csv"),
                      [{k: v for k, v in r.items() if k.startswith(("eval/", "train/loss")) and k != "eval/seconds"}
                       for r in records(tmp_path / name)])
        assert sorted(trained) == files   # every training image read from its file (2 epochs of batches)
        assert sorted(decoded) == files and len(set(decoded.values())) == 1
        decodes[name] = decoded[files[0]]
    assert decodes["once"] == 1 and decodes["files"] >= 2   # without it, every pass decoded every file again
    assert runs["once"] == runs["files"] and len({r["cluster"] for r in runs["once"][0]}) > 1
    assert "decoding the 160 files of classes into memory at 28 px (data.decode_once), once" in \
        (tmp_path / "once" / "train.log").read_text()


def test_decoding_more_than_the_memory_available_is_refused_in_one_line_before_any_file(tmp_path, digit_folders,
                                                                                      monkeypatch):
    """160 files of 3 x 28 x 28 bytes take 376,320 bytes per rank. With 400,000 bytes available (80%:
    320,000) decode_once is refused in one line that gives the sizes and what to set, before any file
    is decoded, and no run directory is left; with 500,000 (80%: 400,000) the same run trains."""
    import data.datasets
    import utils.trainer

    decoded = Counter()
    monkeypatch.setattr(data.datasets, "load_image_file", counting_calls(data.datasets.load_image_file, decoded))
    run = [str(DEMO), f"run.output_dir={tmp_path / 'runs'}", "run.name=m", *FOLDER_RUN, "train.epochs=1",
           f"data.root={digit_folders[1]}", "data.decode_once=true"]
    monkeypatch.setattr(utils.trainer, "available_memory_bytes", lambda: 400_000)
    with pytest.raises(SystemExit, match=r"^error: data.decode_once: decoding 160 files at 28 px takes 0.000376 GB "
                                         r"\(one copy on this node\), more than 80% of the 0.0004 GB of memory "
                                         r"available; set data.decode_once=false and data.loader=workers, or a "
                                         r"smaller data.image_size$"):
        launcher.main(run)
    assert not decoded and not (tmp_path / "runs").exists()
    monkeypatch.setattr(utils.trainer, "available_memory_bytes", lambda: 500_000)
    launcher.main(run)
    assert sum(decoded.values()) == 160 and (tmp_path / "runs" / "m" / "clusters.csv").is_file()
    # The 4 ranks of a node share one copy: 376,320 bytes fit in 80% of 1,000,000. Where the node's shared
    # memory has too little room, each rank holds a copy, and 4 do not fit.
    from data.datasets import build_train_dataset

    folder = build_train_dataset(load_config(DEMO, run[1:]).data)
    monkeypatch.setattr(utils.trainer, "available_memory_bytes", lambda: 1_000_000)
    four_on_node = du.DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=4, device=torch.device("cpu"))
    decode = functools.partial(utils.trainer.decode_once, folder, folder, "data.decode_once", dist_info=four_on_node)
    assert decode()[0].images.shape == (160, 3, 28, 28)
    monkeypatch.setattr(du, "shared_memory_free_bytes", lambda: 376_319)
    with pytest.raises(ValueError, match=r"takes 0.000376 GB \(0.00151 GB for the 4 ranks on this node, a copy each: "
                                         r"/dev/shm has too little room to share one\), more than 80%"):
        decode()


def test_a_set_beyond_the_memory_available_is_refused_in_one_line_before_any_image_is_read(tmp_path, monkeypatch):
    """64 digits of 784 bytes take 50,176 bytes: refused with 60,000 bytes available (80%: 48,000), before
    an image is read and with no run directory left; loaded with 70,000 (80%: 56,000)."""
    import data.datasets
    import utils.trainer

    read = []
    monkeypatch.setattr(data.datasets, "_npz_image_blocks",
                        lambda *args, _blocks=data.datasets._npz_image_blocks: read.append(args) or _blocks(*args))
    run = [str(DEMO), f"run.output_dir={tmp_path / 'runs'}", "data.name=mnist",
           f"data.root={SHARED_DATA / 'mnist.npz'}", "data.limit=64"]
    monkeypatch.setattr(utils.trainer, "available_memory_bytes", lambda: 60_000)
    with pytest.raises(SystemExit, match=r"^error: data: loading 64 images of 1x28x28 takes 5.02e-05 GB \(one copy on "
                                         r"this node\), more than 80% of the 6e-05 GB of memory available; set "
                                         r"data.limit to hold fewer images$"):
        launcher.main(run)
    assert not read and not (tmp_path / "runs").exists()
    monkeypatch.setattr(utils.trainer, "available_memory_bytes", lambda: 70_000)
    assert launcher.build_datasets(load_config(DEMO, run[1:])).train.images.shape == (64, 1, 28, 28) and read


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("pass_overrides", [
    pytest.param(["method.warmup_epochs=2", "eval.every_epochs=2"], id="training-batch"),
    pytest.param([], id="feature-pass"),  # epoch 1 starts with k-means of every image's features
])
def test_an_unreadable_image_met_while_training_is_a_one_line_error_and_the_run_continues(tmp_path, digit_folders,
                                                                                         pass_overrides, workers):
    """The workers loader decodes files only when a batch or a feature pass needs them: a file that
    breaks in the middle of a run (here after epoch 0's checkpoint) ends it with one line naming the
    file, raised in the main process or re-raised from a DataLoader worker. The checkpoint is left as
    it was, and once the file is replaced the run continues from it to its end."""
    tree = tmp_path / "classes"
    shutil.copytree(digit_folders[1], tree)
    run = [str(DEMO), f"run.output_dir={tmp_path / 'runs'}", "run.name=r", *FOLDER_RUN, *pass_overrides,
           f"data.root={tree}", "data.loader=workers", f"data.num_workers={workers}"]
    launcher.main([*run, "train.epochs=1"])
    last = tmp_path / "runs" / "r" / "last.pt"
    saved = last.read_bytes()
    original = sorted((tree / "3").iterdir())[2]
    kept = original.read_bytes()
    broken = _truncate_one_image(tree)
    with pytest.raises(SystemExit) as raised:
        launcher.main([*run, "--resume", "auto"])
    assert re.fullmatch(rf"error: {re.escape(str(broken))}: not a readable image \([^\n]*[Tt]runcated[^\n]*\); "
                        r"remove or replace the file, then continue the run with --resume auto", str(raised.value.code))
    assert last.read_bytes() == saved
    broken.unlink()
    original.write_bytes(kept)
    assert set(launcher.main([*run, "--resume", "auto"])) >= {"nmi", "acc", "ari"}
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 2
    broken = _truncate_one_image(tree)  # --eval decodes the files as its passes reach them, too
    with pytest.raises(SystemExit) as raised:
        launcher.main([*run, "--eval", "cluster", "--checkpoint", str(last)])
    assert re.fullmatch(rf"error: {re.escape(str(broken))}: not a readable image \([^\n]*[Tt]runcated[^\n]*\); "
                        r"remove or replace the file", str(raised.value.code))
    assert not last.with_suffix(".eval_cluster.json").exists()


@pytest.mark.parametrize("config, overrides, message", [
    pytest.param(DEMO, FOLDER_RUN, NO_K, id="no-k"),
    pytest.param(REPO_ROOT / "config" / "mnist_cnn_cc.yml", ["data.name=imagefolder"], NO_K, id="no-k-head"),
    pytest.param(DEMO, [*FOLDER_RUN, "cluster.num_clusters=10", "eval.knn_every_epochs=1"],
                 r"^error: eval.knn_every_epochs: the kNN monitor needs labels, and flat has none; "
                 r"set eval.knn_every_epochs=0$", id="knn"),
])
def test_what_unlabeled_data_cannot_give_is_one_line_before_training(tmp_path, digit_folders, config, overrides,
                                                                     message):
    with pytest.raises(SystemExit, match=message):
        launcher.main([str(config), f"run.output_dir={tmp_path / 'runs'}", "run.name=u", *overrides,
                       f"data.root={digit_folders[0]}"])
    assert not (tmp_path / "runs").exists()


def test_config_errors_exit_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)$"):
        launcher.main([str(DEMO), "train.epoch=3"])
    assert not (tmp_path / "mnist_cnn_propos").exists()


def test_unknown_backbone_is_one_line_before_the_dataset_loads(tmp_path):
    # The data file does not exist either: the backbone's error must come first, from the config.
    with pytest.raises(SystemExit, match=r"^error: model.backbone: unknown backbone 'small_cn' \(did you mean "
                                         r"'small_cnn'\?\); known: .* \(method 'propos'\)$"):
        launcher.main([str(DEMO), f"run.output_dir={tmp_path}", *SMALL, f"data.root={tmp_path / 'missing.npz'}",
                       "model.backbone=small_cn"])
    assert not any(tmp_path.iterdir())


def test_missing_dataset_exits_with_one_line_and_leaves_no_run_directory(tmp_path):
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(SystemExit) as exc:
        launcher.main([str(DEMO), f"run.output_dir={tmp_path / 'runs'}", "run.name=nodata", *SMALL,
                       f"data.root={missing}"])
    message = str(exc.value)
    assert message.startswith("error: data: mnist: ") and str(missing) in message and "\n" not in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_without_a_usable_device_exits_with_one_line_and_writes_nothing(tmp_path, monkeypatch, mode):
    # What a CPU-only machine, or a driver older than torch's CUDA build, reports.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [str(DEMO), f"run.output_dir={tmp_path / 'runs'}", "run.name=nogpu", *SMALL, "run.device=cuda"]
    if mode == "eval":
        checkpoint = tmp_path / "last.pt"
        torch.save({key: None for key in CHECKPOINT_KEYS} | {"model": {}, "epoch": 1}, checkpoint)
        argv += ["--eval", "cluster", "--checkpoint", str(checkpoint)]
    with pytest.raises(SystemExit) as exc:
        launcher.main(argv)
    message = str(exc.value)
    assert message.startswith("error: run.device=cuda: torch ") and "\n" not in message, message
    assert message.endswith("sees no usable CUDA device (torch.cuda.is_available() is False); "
                            "use run.device=auto or cpu"), message
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in tmp_path.iterdir()) == \
        (["last.pt"] if mode == "eval" else [])


@pytest.mark.parametrize("cause", ["a-file", "not-writable"])
def test_an_unwritable_run_directory_is_one_line_before_the_data_load(tmp_path, monkeypatch, cause):
    """Rank 0 could not create or write the run directory: refused before the data are read (which can take
    minutes), naming the folder and why, and nothing is created."""
    blocker = tmp_path / "runs"
    if cause == "a-file":
        blocker.write_text("")
        why = f"{blocker} is not a folder"
    else:
        blocker.mkdir()
        real_access = os.access
        monkeypatch.setattr(launcher.os, "access", lambda path, mode: Path(path) != blocker and real_access(path, mode))
        why = f"{blocker} is not writable"
    monkeypatch.setattr(launcher, "build_datasets", lambda cfg: pytest.fail("the data were loaded"))
    run_dir = blocker / "group" / "r"
    with pytest.raises(SystemExit, match=rf"^error: run.output_dir: cannot write the run directory "
                                         rf"{re.escape(str(run_dir))} \({re.escape(why)}\)$"):
        launcher.main([str(DEMO), f"run.output_dir={blocker / 'group'}", "run.name=r", *SMALL])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and (
        blocker.is_file() or not any(blocker.iterdir()))


def test_a_run_directory_that_cannot_be_made_after_the_data_load_is_one_line(tmp_path, monkeypatch):
    """The folder became unusable while the data loaded (a full disk, a mount gone): the mkdir's error, in one
    line, and the parents this run made are removed again."""
    real_mkdir = Path.mkdir

    def failing_mkdir(self, *args, **kwargs):
        if self.name == "r":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", failing_mkdir)
    run_dir = tmp_path / "runs" / "group" / "r"
    with pytest.raises(SystemExit, match=rf"^error: run.output_dir: cannot write the run directory "
                                         rf"{re.escape(str(run_dir))} \(No space left on device\)$"):
        launcher.main([str(DEMO), f"run.output_dir={run_dir.parent}", "run.name=r", *SMALL])
    assert not (tmp_path / "runs").exists()


def test_an_unwritable_run_directory_stops_both_ranks_with_its_line(tmp_path):
    (tmp_path / "runs").write_text("")
    proc = run_torchrun(REPO_ROOT / "main.py", str(DEMO), f"run.output_dir={tmp_path / 'runs'}", "run.name=r",
                        *SMALL, nproc=2, timeout=300, check=False)
    line = f"error: run.output_dir: cannot write the run directory {tmp_path / 'runs' / 'r'} " \
           f"({tmp_path / 'runs'} is not a folder)"
    assert proc.returncode != 0 and (proc.stdout + proc.stderr).count(line) == 2, proc.stderr[-3000:]


def test_a_batch_larger_than_the_data_is_one_line_and_leaves_no_run_directory(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: 640 images on 1 rank\(s\) do not fill one batch of 1000 per rank; "
                                         r"lower the batch size$"):
        launcher.main([str(DEMO), f"run.output_dir={tmp_path / 'runs'}", "run.name=big", *SMALL,
                       "train.batch_size_per_rank=1000"])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config, overrides, message", [
    pytest.param(DEMO, [*SMALL, "cluster.num_clusters=1000"],
                 r"^error: cluster.num_clusters: 1000 clusters, but the data have only 640 images$", id="cluster"),
    pytest.param(DEMO, [*SMALL, "data.eval_split=test", "eval.num_clusters=2000"],
                 r"^error: eval.num_clusters: 2000 clusters, but the data have only 640 images$", id="eval"),
    pytest.param(REPO_ROOT / "config" / "mnist_cnn_pcl.yml", [*SMALL[:2], "data.limit=300"],  # K: 100, 200, 400
                 r"^error: method.num_clusters_per_level: 400 clusters, but the data have only 300 images$", id="pcl"),
])
def test_more_clusters_than_images_is_one_line_before_training(tmp_path, config, overrides, message):
    with pytest.raises(SystemExit, match=message):
        launcher.main([str(config), f"run.output_dir={tmp_path / 'runs'}", "run.name=k", *overrides])
    assert not (tmp_path / "runs").exists()


def test_wandb_without_the_package_is_one_line_and_leaves_no_run_directory(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, installed or not
    with pytest.raises(SystemExit, match=r"^error: logging.wandb=true but the wandb package is not installed: "
                                         r"pip install wandb$"):
        launcher.main([str(DEMO), f"run.output_dir={tmp_path / 'runs'}", "run.name=w", *SMALL, "logging.wandb=true"])
    assert not (tmp_path / "runs").exists()


def test_removing_a_failed_run_directory_keeps_what_another_run_wrote_beside_it(tmp_path):
    run_dir = tmp_path / "runs" / "group" / "failed"
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").write_text("setup failed\n")
    (tmp_path / "runs" / "other").mkdir()  # another job's run, started in the same new output folder
    launcher.remove_created_run_dir(run_dir, created=tmp_path / "runs")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["runs", "runs/other"]


def test_corrupt_or_missing_resume_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "bad"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"^error: \S+last.pt: not a readable checkpoint \([^\n]*\)$"):
        launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=bad", *SMALL, "--resume", "auto"])
    assert (run_dir / "last.pt").read_bytes() == b"not a checkpoint"
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(SystemExit, match=rf"^error: checkpoint not found: {re.escape(str(missing))}$"):
        launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=fresh", *SMALL, "--resume", str(missing)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"] and [p.name for p in run_dir.iterdir()] == ["last.pt"]


def test_resuming_with_another_config_is_one_line_and_leaves_the_run_directory_as_it_was(tmp_path):
    launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=r", *SMALL, "train.epochs=1"])
    run_dir = tmp_path / "r"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    # Another head size: the checkpoint's projector cannot load. The resolved config must still
    # describe the checkpoints (it used to be overwritten before the load failed).
    with pytest.raises(SystemExit) as exc:
        launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=r", *SMALL, "train.epochs=2",
                       "method.feature_dim=16", "--resume", "auto"])
    message = str(exc.value)
    assert re.match(rf"^error: {re.escape(str(run_dir))}/(last|best).pt: the checkpoint's model does not match "
                    r"the config \(.*size mismatch for projector", message) and "\n" not in message, message
    after = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert after.keys() == before.keys()
    assert all(after[name] == before[name] for name in before if name not in ("train.log",)), \
        [name for name in before if after[name] != before[name]]
    # Another optimizer: torch would load AdamW's state into SGD silently and fail at the first step.
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(run_dir))}/(last|best).pt: written by AdamW, but "
                                         r"this config's stage 'train' trains with SGD; resume with the optimizer"):
        launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=r", *SMALL, "train.epochs=2",
                       "optim.name=sgd", "--resume", "auto"])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != "train.log"} == \
        {name: data for name, data in before.items() if name != "train.log"}
    # --eval reads the weights through the same check, and writes no results file on a mismatch.
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(run_dir / 'last.pt'))}: the checkpoint's model "
                                         r"does not match the config \(.*size mismatch for projector"):
        launcher.main([str(DEMO), *SMALL, "method.feature_dim=16", "--eval", "cluster",
                       "--checkpoint", str(run_dir / "last.pt")])
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(before)


DDP = [*SMALL, "train.batch_size_per_rank=32"]  # 2 ranks x 32: the same 10 steps per epoch


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp")
    proc = run_torchrun(REPO_ROOT / "main.py", str(DEMO), f"run.output_dir={out}", "run.name=ddp", *DDP, nproc=2)
    return out / "ddp", proc


def test_two_process_training_run(two_process_run):
    run_dir, proc = two_process_run
    assert "final (2 epochs" in proc.stdout and proc.stdout.count("final (") == 1  # rank 0 only
    rows = read_clusters(run_dir / "clusters.csv")  # rank 0's copy of the read-out every rank holds
    final = [r for r in records(run_dir) if "eval/acc" in r][-1]
    assert len(rows) == 640
    assert_scores_match_clusters(rows, {k: final[f"eval/{k}"] for k in ("nmi", "ari")})
    assert logged_sizes(final) == pytest.approx(sizes_of_clusters(rows, 10))
    assert proc.stdout.count("class_matching.json") == 1  # written and named by rank 0 alone
    assert_matching_of_clusters(json.loads((run_dir / "class_matching.json").read_text()), rows, final["eval/acc"], 10)
    assert "Warning" not in proc.stderr  # e.g. DDP's broadcast_buffers deprecation, once per rank and stage
    # the ranks keep one copy of the in-memory digits, and rank 0 says so (before train.log exists)
    assert proc.stderr.count("640 images (0.000502 GB) loaded once for the 2 ranks of this node") == 1
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["global_step"] == 20
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert any("eval/acc" in r for r in records(run_dir))


def test_a_stop_signal_to_one_rank_stops_both_at_the_same_step(tmp_path, two_process_run):
    # Only rank 1 gets SIGUSR1 (after step 13): both ranks end step 13 and save it, and the resumed
    # two-process run ends with the uninterrupted one's weights.
    argv = [str(DEMO), f"run.output_dir={tmp_path}", "run.name=ddp", *DDP]
    proc = run_torchrun(SCRIPTS / "stop_one_rank.py", *argv, nproc=2, check=False,
                        env={"STOP_RANK": "1", "STOP_AFTER_STEP": "13"})
    assert proc.returncode != 0  # torchrun reports the workers' EXIT_STOPPED as a failure
    assert "stopped by a signal to another rank at epoch 1, step 3 of 10" in proc.stderr
    assert proc.stderr.count("stopped by") == 1  # rank 0 only
    state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"], state["global_step"], len(state["rng"])) == (1, 3, 13, 2)
    run_torchrun(REPO_ROOT / "main.py", *argv, "--resume", "auto", nproc=2)
    assert step_losses(tmp_path / "ddp", 1) == pytest.approx(step_losses(two_process_run[0], 1), rel=1e-6, abs=1e-7)
    assert_same_weights(tmp_path / "ddp", two_process_run[0])


# Two feature passes an epoch (the E-step's and the evaluation's features differ), in small batches.
FEATURE_PASS_RUN = [str(DEMO), *DDP, "method.pseudo_label_features=online_backbone", "cluster.extract_batch_size=128"]


@pytest.fixture(scope="module")
def feature_pass_straight_run(tmp_path_factory) -> Path:
    """The run directory of an uninterrupted two-process FEATURE_PASS_RUN (made once per module)."""
    out = tmp_path_factory.mktemp("feature_pass")
    run_torchrun(REPO_ROOT / "main.py", *FEATURE_PASS_RUN, f"run.output_dir={out}", "run.name=straight", nproc=2)
    return out / "straight"


@pytest.mark.parametrize("stop_in, pending", [("update_pseudo_labels", []), ("evaluate", ["cluster"])])
def test_a_stop_signal_to_one_rank_during_a_feature_pass_stops_both_at_the_same_batch(tmp_path, stop_in, pending,
                                                                                     feature_pass_straight_run):
    # Only rank 1 gets SIGUSR1, after the first batch of its shard in the feature pass of epoch 1's E-step
    # or of epoch 0's evaluation (the two kinds of features differ, so both passes run): both ranks end
    # the pass at the next batch and save epoch 1's start; the resumed run ends with the weights and
    # scores of the uninterrupted one.
    stopped = [*FEATURE_PASS_RUN, f"run.output_dir={tmp_path}", "run.name=stopped"]
    proc = run_torchrun(SCRIPTS / "stop_one_rank.py", *stopped, nproc=2, check=False,
                        env={"STOP_RANK": "1", "STOP_IN": stop_in, "STOP_AT_FEATURE_BATCH": "0"})
    assert proc.returncode != 0  # torchrun reports the workers' EXIT_STOPPED as a failure
    assert "stopped by a signal to another rank at epoch 1, step 0 of 10" in proc.stderr
    state = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"], state["global_step"], state["pending_evaluations"],
            len(state["rng"])) == (1, 0, 10, pending, 2)
    run_torchrun(REPO_ROOT / "main.py", *stopped, "--resume", "auto", nproc=2)
    assert_same_weights(tmp_path / "stopped", feature_pass_straight_run)
    assert eval_scores(tmp_path / "stopped") == pytest.approx(eval_scores(feature_pass_straight_run), rel=1e-6)


# Every other single-stage method through the launcher: stopped after one epoch (MoCo, PCL and DEC/IDEC
# have their own tests of that, next to their queues, prototypes and stages) or inside one, and
# resumed, the step losses are those of the uninterrupted run.
TINY = ["data.name=mnist", f"data.root={SHARED_DATA / 'mnist.npz'}", "data.limit=256",
        "train.batch_size_per_rank=64", "train.epochs=2", "train.log_every_steps=1", "train.time_budget_minutes=0",
        "eval.every_epochs=1", "eval.n_init=1", "cluster.n_init=1", "logging.progress_bar=false"]


# Per method: TINY's overrides (PCL's levels must fit 256 images, and its clustering starts at epoch 1).
METHOD_RUN = {"byol": [], "simsiam": [], "simclr": [], "cc": [], "moco": [],
              "pcl": ["method.num_clusters_per_level=[10, 20]", "method.warmup_epochs=1"]}


@pytest.fixture(scope="module")
def straight_method_run(tmp_path_factory):
    """method -> run directory of its uninterrupted TINY run (made once per module)."""
    runs: dict[str, Path] = {}

    def run(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp(f"straight_{method}")
            launcher.main([str(REPO_ROOT / "config" / f"mnist_cnn_{method}.yml"), f"run.output_dir={out}",
                           "run.name=straight", *TINY, *METHOD_RUN[method]])
            runs[method] = out / "straight"
        return runs[method]

    return run


@pytest.mark.parametrize("method", ["byol", "simsiam", "simclr", "cc"])
def test_each_method_resumes_through_the_launcher(tmp_path, method, straight_method_run):
    config = str(REPO_ROOT / "config" / f"mnist_cnn_{method}.yml")
    launcher.main([config, f"run.output_dir={tmp_path}", "run.name=split", *TINY, "train.time_budget_minutes=1e-6"])
    assert step_losses(tmp_path / "split", 1) == []
    # The resume names the one key it changed.
    launcher.main([config, f"run.output_dir={tmp_path}", "run.name=split", *TINY, "--resume", "auto"])
    assert [line.split("): ", 1)[1] for line in config_change_lines(tmp_path / "split")] == [
        "train.time_budget_minutes: 1e-06 -> 0.0"]
    straight, resumed = step_losses(straight_method_run(method), 1), step_losses(tmp_path / "split", 1)
    assert len(straight) == 4 and all(torch.isfinite(torch.tensor(straight)))
    assert resumed == pytest.approx(straight, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("method", list(METHOD_RUN))
def test_each_method_stopped_mid_epoch_resumes_exactly(tmp_path, monkeypatch, method, straight_method_run):
    # SIGUSR1 after step 6, the middle of epoch 1 (4 steps per epoch): EMA targets, predictors, the MoCo
    # queue and its pointer, PCL's prototypes and CC's head all continue as in the uninterrupted run.
    argv = [str(REPO_ROOT / "config" / f"mnist_cnn_{method}.yml"), f"run.output_dir={tmp_path}", "run.name=split",
            *TINY, *METHOD_RUN[method]]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", train_step_signalling_after(6))
        with pytest.raises(SystemExit) as exc:
            launcher.main(argv)
    assert exc.value.code == EXIT_STOPPED
    assert torch.load(tmp_path / "split" / "last.pt", weights_only=True)["epoch_step"] == 2
    launcher.main([*argv, "--resume", "auto"])
    straight = straight_method_run(method)
    for epoch in (0, 1):
        assert step_losses(tmp_path / "split", epoch) == pytest.approx(step_losses(straight, epoch), rel=1e-6,
                                                                       abs=1e-7)
    assert epoch_term_averages(tmp_path / "split", 1) == pytest.approx(epoch_term_averages(straight, 1), rel=1e-6,
                                                                       abs=1e-7)
    assert_same_weights(tmp_path / "split", straight)


# train.amp=bf16 and fp16 (autocast; what a GPU run may set) through each kind of method: an EMA target with
# prototypes and pseudo-labels (ProPos), a queue with ProtoNCE (PCL), a cluster head (CC), and an
# autoencoder with Student-t assignment and a decoder (IDEC). CPUs run bf16 autocast too.
AMP_RUN = {"mnist_cnn_propos": ["method.warmup_epochs=1", "method.projector_hidden_dim=64",
                                "method.predictor_hidden_dim=64", "method.feature_dim=32"],
           "mnist_cnn_pcl": METHOD_RUN["pcl"], "mnist_cnn_cc": [],
           "mnist_conv_idec": ["method.pretrain_epochs=1", "method.cluster_epochs=1"]}


@pytest.mark.parametrize("config, amp", [*((config, "bf16") for config in AMP_RUN), ("mnist_cnn_propos", "fp16")])
def test_autocast_trains_each_kind_of_method_as_fp32_does(tmp_path, config, amp):
    """fp16 (with its gradient scaler) runs on a CPU too, so a GPU config can be debugged on one."""
    losses = {}
    for precision in ("none", amp):
        launcher.main([str(REPO_ROOT / "config" / f"{config}.yml"), f"run.output_dir={tmp_path}",
                       f"run.name={precision}", *TINY, "data.limit=128", "train.max_steps_per_epoch=1",
                       "eval.every_epochs=2", *AMP_RUN[config], f"train.amp={precision}"])
        losses[precision] = [step_losses(tmp_path / precision, epoch) for epoch in (0, 1)]
        assert len(losses[precision][0]) == len(losses[precision][1]) == 1
        assert all(math.isfinite(v) for epoch in losses[precision] for v in epoch)
        assert "eval/acc" in records(tmp_path / precision)[-1]
    # The same weights and batch: the first loss is fp32's to bf16's precision (8 bits of mantissa;
    # fp16 has 11), and not equal to it (autocast was on).
    assert losses[amp][0][0] == pytest.approx(losses["none"][0][0], rel=0.03)
    assert losses[amp][0][0] != losses["none"][0][0]


def test_gpu_config_options_run_on_one_cpu_process(tmp_path):
    """What the GPU configs set, on a CPU: sync_batch is refused across CPU ranks but is batch norm in
    one process, and channels_last (the ResNet configs and the demo) changes the memory format, not
    the losses."""
    from utils.trainer import check_sync_batch_device

    with pytest.raises(ValueError, match=r"^model.norm: sync_batch needs CUDA, and this run's 2 ranks are on cpu "
                                         r"\(run.device=auto found no GPU, or run.device=cpu\); use model.norm=batch$"):
        check_sync_batch_device(torch.device("cpu"), 2)
    check_sync_batch_device(torch.device("cuda", 1), 2)
    # One process never converts: a GPU config's sync_batch trains on the CPU as plain batch norm.
    common = [str(DEMO), f"run.output_dir={tmp_path}", *TINY, "data.limit=128", "train.epochs=1",
              "train.max_steps_per_epoch=2", "method.warmup_epochs=1", "run.device=cpu"]
    for name, options in (("batch", ["model.channels_last=false"]),
                          ("sync_batch", ["model.channels_last=false", "model.norm=sync_batch"]),
                          ("channels_last", ["model.channels_last=true"])):
        launcher.main([*common, f"run.name={name}", *options])
    assert step_losses(tmp_path / "sync_batch", 0) == step_losses(tmp_path / "batch", 0)
    assert len(step_losses(tmp_path / "batch", 0)) == 2
    assert step_losses(tmp_path / "channels_last", 0) == pytest.approx(step_losses(tmp_path / "batch", 0), rel=1e-4)
    convs = {run: [t for t in torch.load(tmp_path / run / "last.pt", weights_only=True)["model"].values()
                   if t.dim() == 4 and t.shape[1] > 1] for run in ("batch", "channels_last")}
    assert convs["batch"] and all(t.is_contiguous() for t in convs["batch"])
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
               for t in convs["channels_last"])


def test_cluster_size_stats_count_every_cluster_including_empty_ones():
    from utils.assignments import cluster_size_stats

    clusters = torch.tensor([0, 0, 0, 2, 2, 5])  # K=7: clusters 1, 3, 4 and 6 are empty
    assert cluster_size_stats(clusters, 7) == {"empty_clusters": 4, "largest_cluster_fraction": 0.5,
                                               "smallest_cluster_fraction": 0.0}
    assert cluster_size_stats(torch.tensor([1, 0, 1, 0]), 2) == {"empty_clusters": 0, "largest_cluster_fraction": 0.5,
                                                                  "smallest_cluster_fraction": 0.5}
    rows = [{"cluster": str(c)} for c in np.random.default_rng(0).integers(0, 9, size=500)]
    assert cluster_size_stats(torch.tensor([int(r["cluster"]) for r in rows]), 12) == pytest.approx(
        sizes_of_clusters(rows, 12))
    with pytest.raises(ValueError, match=r"^cluster ids: expected a non-empty \(N,\) tensor, got shape \(0,\)$"):
        cluster_size_stats(torch.tensor([], dtype=torch.long), 3)


def test_a_run_under_an_ascii_locale_reads_and_writes_utf8(tmp_path):
    """Config files are read as UTF-8 whatever the locale. Under LC_ALL=C with Python's UTF-8 mode off (its
    text files default to ASCII), a config with a non-ASCII comment failed with a UnicodeDecodeError
    traceback; the run's own text files are written as UTF-8 too (config.yml escapes non-ASCII text)."""
    config = tmp_path / "digits.yml"
    config.write_text(f"# digits → clusters\nbase: {DEMO}\nlogging:\n  wandb_project: chiffres-été\n",
                      encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    command = [sys.executable, str(REPO_ROOT / "main.py"), str(config), f"run.output_dir={tmp_path}", "run.name=ascii",
               *SMALL, "train.epochs=1"]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, encoding="utf-8")
    assert proc.returncode == 0 and "Logging error" not in proc.stderr, proc.stderr[-3000:]
    assert "final (1 epochs" in proc.stdout
    # the run directory's config reads back to the same value (escaped as ASCII on disk)
    assert load_config(tmp_path / "ascii" / "config.yml", []).logging.wandb_project == "chiffres-été"
    # a config that is not UTF-8 is one line naming the file and the byte
    config.write_bytes("# chiffres \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError,
                       match=rf"^{re.escape(str(config))}: expected UTF-8 text, got byte 0xe9 at offset 11$"):
        load_config(config, [])


def test_image_file_names_that_are_not_utf8_reach_clusters_csv_as_they_are_on_disk(tmp_path, digit_folders):
    """A file name's bytes that are not UTF-8 (a Latin-1 'é') reach Python as surrogate escapes; the run
    reads those images and writes their names to clusters.csv as the same bytes, instead of failing
    at its very end, and train.log shows them escaped."""
    _, _, _, subset = digit_folders
    folder = tmp_path / os.fsdecode(b"noms_\xe9")  # in every path too
    folder.mkdir()
    for k, path in enumerate(sorted(subset.iterdir())):
        stem = os.fsdecode(b"chiffre_\xe9_") if k % 3 == 0 else ("chiffre_\u00e9_" if k % 3 == 1 else "digit_")
        shutil.copy(path, folder / f"{stem}{k:02d}.png")
    assert any("\udce9" in name for name in os.listdir(folder))  # the file system holds the raw byte
    launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=run", *FOLDER_RUN, "train.epochs=1",
                   "cluster.num_clusters=10", f"data.root={folder}"])
    raw = (tmp_path / "run" / "clusters.csv").read_bytes()
    assert b"chiffre_\xe9_00.png" in raw and "chiffre_\u00e9_01.png".encode() in raw
    with (tmp_path / "run" / "clusters.csv").open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == sorted(str(folder / name) for name in os.listdir(folder))
    # An unreadable image of such a name: a one-line error, and train.log holds it escaped (strict UTF-8).
    (folder / os.fsdecode(b"z_\xe9_broken.png")).write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    with pytest.raises(SystemExit, match=r"/z_\udce9_broken\.png: not a readable image"):  # the escape itself
        launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=broken", *FOLDER_RUN, "train.epochs=1",
                       "cluster.num_clusters=10", f"data.root={folder}"])
    log = (tmp_path / "broken" / "train.log").read_text(encoding="utf-8")
    assert "ERROR main: " + str(folder).replace("\udce9", "\\udce9") + "/z_\\udce9_broken.png: not a readable" in log
