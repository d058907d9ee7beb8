"""Training stages in one run, through the launcher (DEC on 640 real digits, a small autoencoder):
resuming inside and across pretraining stages reproduces the uninterrupted run, the target is
refreshed exactly every update_interval steps, the tol rule ends the stage, and a clustering run
starts from an earlier run's autoencoder."""
import json
import re
from pathlib import Path

import pytest
import torch

import main as launcher
from tests.stop_util import assert_same_weights, train_step_signalling_after
from tests.torchrun_util import REPO_ROOT, SHARED_DATA
from utils.stop import EXIT_STOPPED
from utils.trainer import Trainer

DEC = REPO_ROOT / "config" / "mnist_mlp_dec.yml"
SMALL = ["data.name=mnist", f"data.root={SHARED_DATA / 'mnist.npz'}", "data.limit=640", "run.threads_per_rank=1",
         "train.batch_size_per_rank=64", "train.log_every_steps=1", "method.hidden_dims=[64, 64, 128]",
         "cluster.n_init=2", "cluster.extract_batch_size=640", "eval.n_init=1", "logging.progress_bar=false"]
LAYERWISE = ["method.pretrain=layerwise", "method.layerwise_epochs=2", "method.pretrain_epochs=1",
             "method.cluster=false"]  # 4 pairs x 2 epochs, 1 fine-tuning epoch: 9 epochs of 10 steps


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["step/loss"] for r in records(run_dir) if "step/loss" in r}


def test_resume_inside_layerwise_pretraining_continues_the_same_run(tmp_path):
    launcher.main([str(DEC), f"run.output_dir={tmp_path}", "run.name=straight", *SMALL, *LAYERWISE])
    # stopped after the first epoch (inside stage layer1) by a tiny time budget, then resumed twice
    launcher.main([str(DEC), f"run.output_dir={tmp_path}", "run.name=split", *SMALL, *LAYERWISE,
                   "train.time_budget_minutes=1e-6"])
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (state["stage_name"], state["stage_epoch"], state["global_step"]) == ("layer1", 1, 10)
    launcher.main([str(DEC), f"run.output_dir={tmp_path}", "run.name=split", *SMALL, *LAYERWISE,
                   "train.time_budget_minutes=1e-6", "--resume", "auto"])   # ends layer1, one more epoch
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert (state["stage_name"], state["stage_epoch"], state["global_step"]) == ("layer1", 2, 20)
    launcher.main([str(DEC), f"run.output_dir={tmp_path}", "run.name=split", *SMALL, *LAYERWISE, "--resume", "auto"])
    straight, split = step_losses(tmp_path / "straight"), step_losses(tmp_path / "split")
    assert sorted(straight) == sorted(split) == list(range(1, 91))   # logged after each step
    assert [split[s] for s in range(1, 91)] == pytest.approx([straight[s] for s in range(1, 91)], rel=1e-6, abs=1e-7)
    final = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert final["stage_name"] == "finetune" and final["global_step"] == 90
    stages = [r["stage"] for r in records(tmp_path / "straight") if "train/loss" in r]
    assert stages == ["layer1"] * 2 + ["layer2"] * 2 + ["layer3"] * 2 + ["layer4"] * 2 + ["finetune"]


def test_target_refreshed_exactly_every_update_interval_and_tol_stops(tmp_path):
    common = [str(DEC), f"run.output_dir={tmp_path}", *SMALL, "method.pretrain_epochs=1",
              "method.cluster_epochs=2", "method.update_interval=3"]
    launcher.main([*common, "run.name=never", "method.tol=0"])   # fewer than 0 changes: never stops
    refreshes = [r for r in records(tmp_path / "never") if "refresh/label_change" in r]
    assert [r["stage_step"] for r in refreshes] == [0, 3, 6, 9, 12, 15, 18]
    assert [r["step"] for r in refreshes] == [10 + s for s in (0, 3, 6, 9, 12, 15, 18)]
    assert all({"eval/acc", "eval/nmi", "eval/ari"} <= set(r) for r in refreshes)
    assert [r["refresh/target_updates"] for r in refreshes] == [1, 2, 3, 4, 5, 6, 7]
    state = torch.load(tmp_path / "never" / "last.pt", weights_only=True)
    assert state["global_step"] == 30 and not state["stage_stopped"] and state["model"]["num_updates"] == 7

    launcher.main([*common, "run.name=stops", "method.tol=0.999"])  # any second update is below tol
    refreshes = [r for r in records(tmp_path / "stops") if "refresh/label_change" in r]
    assert [r["stage_step"] for r in refreshes] == [0, 3]
    state = torch.load(tmp_path / "stops" / "last.pt", weights_only=True)
    assert state["stage_stopped"] and state["global_step"] == 13 and bool(state["model"]["converged"])


def test_a_stop_inside_the_first_clustering_epoch_resumes_without_restarting_the_stage(tmp_path, monkeypatch):
    # Stopped by SIGUSR1 after step 12: stage step 2 of DEC's clustering stage, inside its first epoch,
    # after its k-means start and the target refresh at stage step 0. The resumed run must keep that
    # start (no second k-means of the centroids), refresh at stage step 3, and train as the straight run.
    common = [str(DEC), f"run.output_dir={tmp_path}", *SMALL, "method.pretrain_epochs=1", "method.cluster_epochs=2",
              "method.update_interval=3", "method.tol=0"]
    launcher.main([*common, "run.name=straight"])
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", train_step_signalling_after(12))
        with pytest.raises(SystemExit) as exc:
            launcher.main([*common, "run.name=split"])
    assert exc.value.code == EXIT_STOPPED
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    position = (state["stage_name"], state["stage_epoch"], state["epoch_step"], state["global_step"])
    assert position == ("cluster", 0, 2, 12)
    launcher.main([*common, "run.name=split", "--resume", "auto"])
    straight, split = step_losses(tmp_path / "straight"), step_losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 31))
    assert [split[s] for s in range(1, 31)] == pytest.approx([straight[s] for s in range(1, 31)], rel=1e-6, abs=1e-7)
    refreshes = [r["stage_step"] for r in records(tmp_path / "split") if "refresh/label_change" in r]
    assert refreshes == [0, 3, 6, 9, 12, 15, 18]  # each once, none repeated by the resume
    assert_same_weights(tmp_path / "split", tmp_path / "straight")


def test_clustering_starts_from_an_earlier_runs_autoencoder(tmp_path):
    launcher.main([str(DEC), f"run.output_dir={tmp_path}", "run.name=ae", *SMALL, "method.pretrain_epochs=1",
                   "method.cluster=false"])
    ae = torch.load(tmp_path / "ae" / "last.pt", weights_only=True)["model"]
    for name in ("dec", "idec"):
        config = REPO_ROOT / "config" / f"mnist_mlp_{name}.yml"
        metrics = launcher.main([str(config), f"run.output_dir={tmp_path}", f"run.name={name}", *SMALL,
                                 f"method.pretrained={tmp_path / 'ae' / 'last.pt'}", "method.cluster_epochs=1",
                                 "method.update_interval=5", "method.tol=0"])
        assert set(metrics) == {"nmi", "acc", "ari"}
        state = torch.load(tmp_path / name / "last.pt", weights_only=True)
        assert state["global_step"] == 10 and state["stage_name"] == "cluster"   # no pretraining steps
        changed = [k for k in ae if k.startswith("autoencoder.decoder") and not torch.equal(ae[k], state["model"][k])]
        assert bool(changed) == (name == "idec")                                  # DEC leaves the decoder alone

    # A missing or mismatched autoencoder is one line, and leaves no run directory behind.
    dec = [str(REPO_ROOT / "config" / "mnist_mlp_dec.yml"), f"run.output_dir={tmp_path / 'new'}", "run.name=bad",
           *SMALL, "method.cluster_epochs=1"]
    missing = tmp_path / "ae" / "nowhere.pt"
    with pytest.raises(SystemExit, match=rf"^error: pretrained weights: checkpoint not found: "
                                         rf"{re.escape(str(missing))}$"):
        launcher.main([*dec, f"method.pretrained={missing}"])
    with pytest.raises(SystemExit) as exc:
        launcher.main([*dec, f"method.pretrained={tmp_path / 'ae' / 'last.pt'}", "method.hidden_dims=[64, 64, 64]"])
    message = str(exc.value)
    assert message.startswith(f"error: {tmp_path / 'ae' / 'last.pt'}: the pretrained weights do not match the "
                              f"config (") and "size mismatch" in message and "\n" not in message, message
    assert not (tmp_path / "new").exists()


def test_two_process_dec_run_through_both_stages(tmp_path):
    from tests.torchrun_util import run_torchrun

    proc = run_torchrun(REPO_ROOT / "main.py", str(DEC), f"run.output_dir={tmp_path}", "run.name=ddp", *SMALL,
                        "train.batch_size_per_rank=32", "method.pretrain_epochs=1", "method.cluster_epochs=1",
                        "method.update_interval=4", "method.tol=0", nproc=2)
    assert proc.stdout.count("final (2 epochs") == 1          # rank 0 only
    state = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert state["stage_name"] == "cluster" and state["global_step"] == 20 and len(state["rng"]) == 2
    refreshes = [r for r in records(tmp_path / "ddp") if "refresh/label_change" in r]
    assert [r["stage_step"] for r in refreshes] == [0, 4, 8]
    assert state["model"]["target"].shape == (640, 10) and state["model"]["num_updates"] == 3
