"""The benchmarks still run (one step, or a few points; not timed), and their figures agree with independent oracles."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.torchrun_util import REPO_ROOT, SHARED_DATA, load_script


def _run_bench(script: str, *args: str) -> str:
    """stdout of `python bench/<script> *args`; fails the test with its stderr if it exits non-zero."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_train_step_bench_runs_both_feeds_through_the_launchers_builders():
    stdout = _run_bench("train_step.py", "--steps", "1", "--warmup", "0", "--workers", "1",
                        "train.batch_size_per_rank=32")
    rates = dict(re.findall(r"^(device|workers) +feed: +([0-9.]+) images/s", stdout, re.M))
    assert set(rates) == {"device", "workers"} and all(float(v) > 0 for v in rates.values()), stdout
    assert "batch 32," in stdout                      # the override reached the launcher's config
    ratio = float(re.search(r"device feed / workers feed: ([0-9.]+)x", stdout).group(1))
    device, workers = float(rates["device"]), float(rates["workers"])
    # The rates are printed to within 0.05 and the ratio to within 0.005, so the printed ratio must
    # lie in what the printed rates allow: on a loaded machine one step can run at a few images/s,
    # where that interval is far wider than any fixed tolerance.
    low = (device - 0.05) / (workers + 0.05) - 0.005
    high = (device + 0.05) / (workers - 0.05) + 0.005 if workers > 0.05 else float("inf")
    assert low <= ratio <= high, (ratio, device, workers)


def _seed0_inertias(stdout: str) -> dict[str, float]:
    """{library: inertia} from the bench's per-fit lines for seed 0."""
    return {lib: float(v) for lib, v in re.findall(r"^  (\S+) +seed 0: +[0-9.]+ s  inertia ([0-9.e+]+)", stdout, re.M)}


def test_kmeans_bench_inertia_column_matches_sklearns_own_and_refinement_only_lowers_it():
    """The bench's float64 inertia evaluator against scikit-learn's `inertia_` for the same fit,
    and Lloyd on all points from ours-sub's centroids can only lower ours-sub's inertia."""
    from sklearn.cluster import KMeans as SkKMeans
    bench = load_script(REPO_ROOT / "bench" / "kmeans.py")

    points = 6000   # > K*256 = 2560, so both subsample rows run
    out = _run_bench("kmeans.py", "--case", "k10", "--points", str(points), "--refine-iter", "3",
                     "--libs", "ours-sub,ours-sub-refine,sklearn")
    assert f"=== case k10: {points} x 512" in out, out
    inertia = _seed0_inertias(out)
    assert set(inertia) == {"ours-sub", "ours-sub-refine", "sklearn"}, out

    x = bench.make_data("k10", torch.device("cpu"), points).numpy()
    sk = SkKMeans(10, init="k-means++", n_init=3, max_iter=100, tol=1e-4, algorithm="lloyd",
                  random_state=0).fit(x)
    assert abs(inertia["sklearn"] / sk.inertia_ - 1) < 1e-4, (inertia["sklearn"], sk.inertia_)
    assert inertia["ours-sub-refine"] <= inertia["ours-sub"] * (1 + 1e-7), inertia


def test_kmeans_bench_imagenet_case_runs_end_to_end_on_a_few_synthetic_points():
    """The GPU case's code path (synthetic data made on the device, K=1000), on the CPU: what a
    session lent a GPU runs first must not fail on the bench itself."""
    out = _run_bench("kmeans.py", "--case", "imagenet", "--points", "3000", "--libs", "ours",
                     "--n-init", "1", "--max-iter", "3")
    assert "=== case imagenet: 3000 x 256 (synthetic, --points), K=1000, device cpu" in out, out
    inertia = _seed0_inertias(out)["ours"]
    # Points are centre + 0.5 * N(0, I_256): about 0.25 * 256 = 64 per point around the true
    # centres.  k-means fits ~3 points per centroid, so it ends below that but far above zero.
    assert 10 * 3000 < inertia < 64 * 3000, inertia


def _bad_input_exit(script: str, argv: list[str], monkeypatch, *, never_reached: str) -> str:
    """The one-line message `bench/<script>`'s main(argv) exits with on a GPU-less torch, with
    `never_reached` (what loads data or measures) patched to fail the test if the check came late."""
    bench = load_script(REPO_ROOT / "bench" / script)

    def fail(*_, **__):
        raise AssertionError(f"{never_reached} ran before the input was checked")

    monkeypatch.setattr(bench, never_reached, fail)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CUDA cases, on any machine
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    text = str(exit_info.value.code)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("argv, message", [
    pytest.param(["train.epoch=3"], r"^error: unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)$", id="key"),
    pytest.param(["data.limit=64", "--steps", "1", "train.epoch=3"],  # an override after an option
                 r"^error: unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)$", id="key-after-option"),
    pytest.param(["--device", "gpu"], r"^error: run.device: expected one of .*got 'gpu'", id="device-typo"),
    pytest.param(["--device", "cuda"], r"^error: run.device=cuda: torch \S+ sees no usable CUDA device", id="cuda"),
])
def test_train_step_bench_rejects_bad_input_in_one_line_before_measuring(argv, message, monkeypatch):
    text = _bad_input_exit("train_step.py", argv, monkeypatch, never_reached="images_per_second")
    assert re.search(message, text), text


_BAD_ARGUMENTS = [
    pytest.param(["--libs", "ours,bogus"], "unknown library 'bogus'", id="libs"),
    pytest.param(["--seeds", "0,x"], "--seeds must be comma-separated integers, got '0,x'", id="seeds"),
    pytest.param(["--case", "k10,k7"], "unknown case 'k7'", id="case"),
    pytest.param(["--case", "k100", "--points", "50"], "--points 50 is below case k100's K=100", id="points"),
    pytest.param(["--refine-iter", "0"], "--refine-iter must be >= 1, got 0", id="refine-iter"),
    pytest.param(["--device", "cuad"], "--device: expected cpu, cuda or cuda:N, got 'cuad'", id="device-typo"),
    pytest.param(["--device", "mps"], "--device: expected cpu, cuda or cuda:N, got 'mps'", id="device-mps"),
    pytest.param(["--device", "cuda"], "--device=cuda: torch .* sees no usable CUDA device", id="device-cuda"),
]


@pytest.mark.parametrize("argv, message", _BAD_ARGUMENTS)
def test_kmeans_bench_rejects_a_bad_argument_in_one_line_before_loading_any_case(argv, message, monkeypatch):
    text = _bad_input_exit("kmeans.py", argv, monkeypatch, never_reached="make_data")
    assert re.search(message, text), text


@pytest.mark.parametrize("device, message", [
    pytest.param("cuad", "^--device: expected cpu, cuda or cuda:N, got 'cuad'$", id="typo"),
    pytest.param("cuda", r"^--device=cuda: torch \S+ sees no usable CUDA device", id="cuda"),
])
def test_augment_bench_rejects_a_bad_device_in_one_line_before_measuring(device, message, monkeypatch):
    text = _bad_input_exit("augment.py", ["--device", device], monkeypatch, never_reached="batched_rate")
    assert re.search(message, text), text


def test_methods_bench_checks_overrides_and_earlier_runs_before_any_training(tmp_path, monkeypatch):
    bench = load_script(REPO_ROOT / "bench" / "methods.py")

    def no_training(*_, **__):
        raise AssertionError("a method trained before the inputs were checked")

    monkeypatch.setattr(bench, "bench_method", no_training)
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["data.limit=64", "--methods", "propos,cc", "train.epoch=3", "--output-dir", str(fresh)])
    assert str(exit_info.value.code) == "error: propos: unknown key 'train.epoch' (did you mean 'train.epochs'?)"
    assert not fresh.exists()

    earlier = tmp_path / "earlier"
    (earlier / "cc_budget").mkdir(parents=True)
    (earlier / "cc_budget" / "last.pt").write_bytes(b"an earlier bench's run")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--methods", "propos,cc", "--output-dir", str(earlier)])
    text = str(exit_info.value.code)
    assert text.startswith(f"error: --output-dir {earlier} already holds checkpoints of an earlier bench (cc_budget)")
    assert (earlier / "cc_budget" / "last.pt").read_bytes() == b"an earlier bench's run"
    assert sorted(p.name for p in earlier.iterdir()) == ["cc_budget"]

    from utils.config import load_config
    for method in bench.METHODS:   # each method's demo config is found and names that method
        assert load_config(bench.config_path(method), []).method.name == method


def test_methods_bench_reports_the_launchers_error_when_a_run_fails(tmp_path):
    missing = tmp_path / "nowhere.npz"
    out = tmp_path / "out"
    bench = load_script(REPO_ROOT / "bench" / "methods.py")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--methods", "propos", "--output-dir", str(out), "data.name=mnist", f"data.root={missing}"])
    text = str(exit_info.value.code)
    assert text.startswith("error: mnist_cnn_propos.yml exited 1: error: data: mnist: ") and str(missing) in text
    assert "\n" not in text and f"(log: {out / 'propos_calibration.log'})" in text


def test_methods_bench_prices_stages_from_the_seconds_between_epoch_records():
    bench = load_script(REPO_ROOT / "bench" / "methods.py")
    records = [  # a step record and a refresh record carry a time and a stage too, but end no epoch
        {"time": 5.0, "step": 3, "epoch": 0, "step/loss": 1.0},
        {"time": 10.0, "epoch": 0, "stage": "pretext", "train/epoch_seconds": 4.0},
        {"time": 13.0, "epoch": 1, "stage": "pretext", "train/epoch_seconds": 1.5, "eval/seconds": 1.0},
        {"time": 16.0, "epoch": 2, "stage": "pretext", "train/epoch_seconds": 1.5, "eval/seconds": 1.0},
        {"time": 18.0, "epoch": 3, "stage": "scan", "stage_step": 0, "refresh/loss": 0.5},
        {"time": 21.0, "epoch": 3, "stage": "scan", "train/epoch_seconds": 1.0, "eval/seconds": 2.0},
        {"time": 23.0, "epoch": 4, "stage": "scan", "train/epoch_seconds": 1.0},
        {"time": 27.0, "epoch": 5, "stage": "selflabel", "train/epoch_seconds": 1.0},
    ]
    # By hand: the first epoch spans 31 - (27 - 10) = 14 s. Less their evaluations: pretext 14, 2, 2 ->
    # 2 s an epoch, 12 s fixed, 1 s an evaluation; scan 3, 2 -> 2, 1, and its one evaluation 2 s;
    # selflabel's one epoch of 4 s is all per-epoch, with no evaluation.
    costs = bench.stage_costs(records, run_seconds=31)
    assert costs == {"pretext": (12.0, 2.0, 1.0), "scan": (1.0, 2.0, 2.0), "selflabel": (0.0, 4.0, 0.0)}
    demo = {"pretext_epochs": 20, "scan_epochs": 10, "selflabel_epochs": 1}
    # Evaluating every 4 epochs and at each stage's end, the demo's epochs cost 20 * (2 + 1/4) +
    # 10 * (2 + 2/4) + 1 * 4 = 74 s on top of 12 + 1 + 1 + 2 = 16 s: a 90 s budget scales them by
    # (90 - 16) / 74 = 1, 164 s by 2, 20 s by 4/74 (each stage keeps one epoch).
    assert bench.plan_stage_epochs(demo, costs, 90, eval_every=4) == demo
    assert bench.plan_stage_epochs(demo, costs, 164, eval_every=4) == {
        "pretext_epochs": 40, "scan_epochs": 20, "selflabel_epochs": 2}
    assert bench.plan_stage_epochs(demo, costs, 20, eval_every=4) == {
        "pretext_epochs": 1, "scan_epochs": 1, "selflabel_epochs": 1}
    # 100 s: scale 84/74 = 1.135 gives 22.7, 11.35, 1.135 -> 22, 11, 1 (97 s planned); of the 3 s left, the
    # stage rounding cut most (pretext, 0.7) takes one more epoch (2.25 s); scan's 2.5 s would not fit.
    assert bench.plan_stage_epochs(demo, costs, 100, eval_every=4) == {
        "pretext_epochs": 23, "scan_epochs": 11, "selflabel_epochs": 1}
    # One stage (train.epochs), whose records name no stage: 10 - (13 - 5) = 2 s and 8 - 1 s.
    one_stage = [{"time": 5.0, "epoch": 0, "train/epoch_seconds": 1.0},
                 {"time": 13.0, "epoch": 1, "train/epoch_seconds": 1.0, "eval/seconds": 1.0}]
    assert bench.stage_costs(one_stage, run_seconds=10) == {"train": (0.0, 7.0, 1.0)}
    # (30 - 3 - 1) / (2 + 1/4) = 11.6 -> 11 epochs.
    assert bench.plan_stage_epochs({"train.epochs": 1}, {"train": (3.0, 2.0, 1.0)}, 30, eval_every=4,
                                   key_of=lambda stage: "train.epochs") == {"train.epochs": 11}
    # Records from before eval/seconds: evaluations are priced into the epochs, as they used to be.
    old = [{k: v for k, v in r.items() if k != "eval/seconds"} for r in records]
    assert bench.stage_costs(old, run_seconds=31)["pretext"] == (11.0, 3.0, 0.0)
    assert bench.stage_epoch_key("layer3") == "layerwise_epochs"
    with pytest.raises(SystemExit, match="stage 'warmup' has no epochs key"):
        bench.stage_epoch_key("warmup")


@pytest.mark.parametrize("method, overrides", [
    ("scan", []), ("nnm", []), ("dec", []), ("idec", []), ("propos", []), ("dccm", []),
    ("dec", ["method.pretrain=layerwise", "method.layerwise_epochs=3"]),
    ("scan", ["method.selflabel_epochs=0"]),
])
def test_methods_bench_reads_the_epochs_of_every_stage_the_method_builds(method, overrides):
    """The stages the method itself builds from the config against the bench's reading of its keys."""
    from models import DataInfo, build_method
    from utils.config import load_config
    bench = load_script(REPO_ROOT / "bench" / "methods.py")
    cfg = load_config(bench.config_path(method), overrides)
    built = build_method(cfg.method, backbone=cfg.model.backbone, norm=cfg.model.norm,
                         data=DataInfo(in_channels=1, image_size=28, num_classes=10, num_samples=5000, num_clusters=10))
    stages = built.training_stages()
    demo = bench.demo_stage_epochs(cfg.method)
    assert {stage.name: demo[bench.stage_epoch_key(stage.name)] for stage in stages} == \
        {stage.name: stage.epochs for stage in stages}
    assert bool(demo) == (len(stages) > 1)  # a method in one stage keeps train.epochs


def test_methods_bench_trains_a_method_in_stages_with_the_planned_epochs_of_each(tmp_path, capsys):
    bench = load_script(REPO_ROOT / "bench" / "methods.py")
    out = tmp_path / "out"
    bench.main(["--methods", "dec", "--budget-minutes", "0.15", "--output-dir", str(out), "data.limit=256",
                "method.pretrain_epochs=8", "method.cluster_epochs=4", "cluster.n_init=2", "eval.n_init=2"])
    # the table's header names the data the runs trained on: the override's 256 images, not the demo's 5,000
    assert "\ndata mnist_5k, split train+test, data.limit=256; 0.15 min of training each" in capsys.readouterr().out
    (row,) = json.loads((out / "bench_methods.json").read_text())
    calibration = bench.read_metric_records(out / "dec_calibration")
    measured = bench.read_metric_records(out / "dec_budget")

    def epochs_by_stage(records):
        stages = [r["stage"] for r in records if "train/epoch_seconds" in r]
        return {stage: stages.count(stage) for stage in dict.fromkeys(stages)}

    assert epochs_by_stage(calibration) == {"pretrain": 2, "cluster": 2}  # min(demo, 2) each
    # evaluated at each stage's end only (eval.every_epochs=2 falls there too), and timed there
    ends = [r for r in calibration if "train/epoch_seconds" in r]  # DEC's refresh records score too, untimed
    timed = {r["epoch"]: r["eval/seconds"] for r in calibration if "eval/seconds" in r}
    assert set(timed) == {r["epoch"] for r in ends if "eval/acc" in r} == {1, 3}
    spans = {b["epoch"]: b["time"] - a["time"] for a, b in zip(ends, ends[1:])}
    assert 0 < timed[3] < spans[3]
    assert [row["calibration_stage_seconds"][stage]["per_evaluation"] for stage in ("pretrain", "cluster")] == \
        [round(timed[1], 2), round(timed[3], 2)]
    planned = row["stage_epochs"]
    assert set(planned) == {"pretrain_epochs", "cluster_epochs"}
    # the demo's 8 : 4 kept to within the rounding down of each
    assert abs(planned["pretrain_epochs"] / 2 - planned["cluster_epochs"]) <= 1, planned
    done = epochs_by_stage(measured)
    assert done["pretrain"] == planned["pretrain_epochs"]
    assert 1 <= done["cluster"] <= planned["cluster_epochs"]  # the tol rule may end it earlier
    assert row["epochs"] == sum(done.values()) and row["planned_epochs"] == sum(planned.values())
    assert 0 <= row["acc"] <= 1 and row["knn_acc"] == [r for r in measured if "eval/knn_acc" in r][-1]["eval/knn_acc"]


def test_dec_bench_shares_one_pretraining_and_gives_idec_its_configs_iterations(tmp_path, monkeypatch, capsys):
    """bench/dec_mnist.py on 256 CIFAR-10 images: the autoencoder run, then DEC and IDEC from its
    checkpoint; IDEC's epochs default to its config's cluster_epochs (20,000 iterations on CIFAR-10's
    60,000 images: 85, not MNIST's 73), and the printed table holds each stage's scores."""
    import yaml

    from utils.config import load_config

    bench = load_script(REPO_ROOT / "bench" / "dec_mnist.py")
    out = tmp_path / "dec"
    monkeypatch.setattr(sys, "argv", ["dec_mnist.py", "--dataset", "cifar10", "--data-limit", "256",
                                      "--pretrain-epochs", "1", "--dec-epochs", "1", "--output-dir", str(out)])
    bench.main()
    resolved = {run: yaml.safe_load((out / f"{run}_seed0" / "config.yml").read_text())["method"]
                for run in ("ae", "dec", "idec")}
    expected = load_config(REPO_ROOT / "config" / "cifar10_mlp_idec.yml").method.cluster_epochs
    assert expected == 20_000 // (60_000 // 256) and resolved["idec"]["cluster_epochs"] == expected
    assert resolved["dec"]["cluster_epochs"] == 1 and resolved["ae"]["cluster"] is False
    pretrained = str(out / "ae_seed0" / "last.pt")
    assert resolved["dec"]["pretrained"] == resolved["idec"]["pretrained"] == pretrained
    summary = json.loads((out / "summary_seed0.json").read_text())
    assert [row["stage"] for row in summary["rows"]][-2:] == ["DEC", "IDEC"]
    assert all(0 <= row["acc"] <= 1 for row in summary["rows"]) and "IDEC" in capsys.readouterr().out


def test_gpu_checks_run_their_commands_and_summarise_each_one(tmp_path, capsys):
    # the prepared run for a lent GPU, small on the CPU: its commands must work before device time is spent
    checks = load_script(REPO_ROOT / "bench" / "gpu_checks.py")
    argv = ["--out", str(tmp_path / "ok"), "--device", "cpu", "--quick", "--data", str(SHARED_DATA)]
    assert checks.main([*argv, "--only", "env,kmeans_agreement,run_propos"]) == 0
    summary = (tmp_path / "ok" / "summary.txt").read_text()
    assert [line.split("]")[0][1:] for line in summary.splitlines() if line.startswith("[")] == [
        "env", "kmeans_agreement", "run_propos"]
    assert summary.count("exit 0") == 3 and summary.rstrip().endswith("3 of 3 checks passed")
    assert "agreement cpu vs cpu: labels 1.000000" in summary and "final (2 epochs" in summary
    assert "===== run_propos: exit 0" in (tmp_path / "ok" / "logs.txt").read_text()   # the whole output kept
    # a check that fails (no GPU here) is named with the end of its output; one the budget leaves is skipped
    assert checks.main([*argv, "--device", "cuda", "--only", "run_propos"]) == 1
    failed = (tmp_path / "ok" / "summary.txt").read_text()
    assert "[run_propos] exit 1" in failed and "failed: run_propos" in failed and "| error: run.device" in failed
    assert checks.main([*argv, "--only", "env", "--budget-s", "0"]) == 1
    assert "0 of 0 checks passed; skipped (budget of 0 s spent): env" in (tmp_path / "ok" / "summary.txt").read_text()
    with pytest.raises(SystemExit):
        checks.main([*argv, "--only", "no_such_check"])
    assert "--only: no check named ['no_such_check']" in capsys.readouterr().err


def test_decode_bench_times_both_ways_on_two_ranks_and_checks_the_copies_agree(tmp_path):
    # The workers compare the exchanged copy with every rank's own decode and exit non-zero if they differ.
    out = _run_bench("decode.py", "--files", "12", "--width", "64", "--height", "48", "--image-size", "32",
                     "--repeats", "1", "--folder", str(tmp_path))
    assert "12 files at 32 px (0.0 MB a copy), 2 ranks" in out
    assert re.search(r"median: \d+\.\d\d s -> \d+\.\d\d s, ratio \d+\.\d\d; "
                     r"node memory -?\d+\.\d MB -> -?\d+\.\d MB", out), out
    assert len(list((tmp_path / "12_64x48").rglob("*.jpg"))) == 12
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "decode.py"), "--files", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == "error: --files must be >= 1, got 0"


def test_load_memory_bench_loads_stl10_and_an_npz_both_ways_and_checks_they_agree(tmp_path):
    # The bench exits non-zero if the two ways load different images.
    out = _run_bench("load_memory.py", "--labeled", "26", "--unlabeled", "20", "--repeats", "1",
                     "--folder", str(tmp_path))
    assert "46 STL-10 images, 1.3 MB; medians of 1" in out
    growths = re.findall(r"peak memory +(\d+\.\d\d)x the images +\d+\.\d\d s", out)
    ratio = re.search(r"ratio, the loader / the loader before: (\d+\.\d\d)", out)
    assert len(growths) == 2 and ratio, out
    assert sorted(p.name for p in (tmp_path / "26_20" / "stl10_binary").iterdir()) == [
        "test_X.bin", "test_y.bin", "train_X.bin", "train_y.bin", "unlabeled_X.bin"]
    out = _run_bench("load_memory.py", "--format", "npz", "--labeled", "30", "--repeats", "1",
                     "--folder", str(tmp_path))
    assert "30 images in an npz, 0.4 MB; medians of 1" in out
    assert len(re.findall(r"peak memory +(\d+\.\d\d)x the images +\d+\.\d\d s", out)) == 2, out
    with np.load(tmp_path / "images_30.npz") as archive:
        assert archive["x_train"].shape == (25, 64, 64, 3) and archive["x_test"].shape == (5, 64, 64, 3)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "load_memory.py"), "--labeled", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == "error: --labeled must be >= 2, got 1"


def test_load_node_bench_loads_on_two_ranks_three_ways_and_checks_every_copy_agrees(tmp_path):
    # The bench exits non-zero if any rank's copy differs, in any way.
    out = _run_bench("load_node.py", "--labeled", "26", "--unlabeled", "20", "--repeats", "1",
                     "--folder", str(tmp_path))
    assert "46 STL-10 images to train on, 26 to evaluate: 2.0 MB, 2 ranks on one node; medians of 1" in out
    assert len(re.findall(r"node peak +-?\d+\.\d\dx the images +\d+\.\d\d s", out)) == 3, out
    assert re.search(r"ratio, one rank reads / every rank: -?\d+\.\d\d", out), out
    assert re.search(r"ratio, one rank reads / one rank copies: -?\d+\.\d\d", out), out
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "load_node.py"), "--ranks", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == "error: --ranks must be >= 2, got 1"


def test_every_config_check_runs_each_config_small_and_names_the_ones_that_fail(tmp_path, capsys):
    check = load_script(REPO_ROOT / "bench" / "every_config.py")
    argv = ["--data", str(SHARED_DATA), "--out", str(tmp_path)]
    # a demo and MNIST 70k's DEC (its layer-wise stages, one epoch each, on 600 digits)
    assert check.main([*argv, "--only", "mnist_cnn_propos,mnist70k_mlp_dec"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^OK   mnist70k_mlp_dec\.yml .* NMI \d\.\d{4}  ACC", out, re.MULTILINE), out
    assert out.rstrip().endswith("2 of 2 configs ran")
    assert len(list((tmp_path / "runs" / "mnist70k_mlp_dec").glob("*.pt"))) >= 1
    # SCAN alone: the SimCLR run it starts from was not made, and the line says why
    assert check.main([*argv, "--only", "cifar10_r18_scan"]) == 1
    out = capsys.readouterr().out
    assert "FAIL cifar10_r18_scan.yml" in out and "pretrained weights: checkpoint not found" in out
    assert out.rstrip().endswith("0 of 1 configs ran; failed: cifar10_r18_scan.yml")
    with pytest.raises(SystemExit, match="--only no_such: no config"):
        check.main([*argv, "--only", "no_such"])
