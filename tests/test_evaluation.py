"""kNN monitor and linear probe on synthetic features; evaluation-only runs of a saved checkpoint."""
import json
import math
import re

import pytest
import torch
import yaml

from utils.evaluation import knn_accuracy, knn_predict, linear_probe, nearest_neighbours


def separable(n_per_class: int, num_classes: int = 5, dim: int = 16, seed: int = 0, noise: float = 0.1):
    """Clusters around random unit directions: (n, dim) features, (n,) labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return feats[perm], labels[perm]


def brute_force_knn(train, train_labels, queries, *, k, temperature, num_classes, leave_one_out=False):
    predictions = []
    for i, q in enumerate(queries):
        scores = []
        for j, m in enumerate(train):
            if leave_one_out and i == j:
                continue
            sim = float(q @ m) / (float(q.norm()) * float(m.norm()))
            scores.append((sim, int(train_labels[j])))
        scores.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, label in scores[:k]:
            votes[label] += math.exp(sim / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(predictions)


def test_knn_separable_features_are_near_perfect_and_shuffled_labels_are_chance():
    train, train_labels = separable(100, seed=0)
    test, test_labels = separable(40, seed=0)  # same centres (same seed), fresh permutation
    test = test + 0.05 * torch.randn_like(test)
    assert knn_accuracy(train, train_labels, test, test_labels, k=20, num_classes=5) > 0.98
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(1))]
    acc = knn_accuracy(train, shuffled, test, test_labels, k=20, num_classes=5)
    assert 0.05 < acc < 0.4  # chance is 0.2


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_knn_matches_brute_force_and_chunking_does_not_change_it(leave_one_out):
    g = torch.Generator().manual_seed(3)
    train, train_labels = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    queries = train.clone() if leave_one_out else torch.randn(17, 4, generator=g)
    reference = brute_force_knn(train, train_labels, queries, k=5, temperature=0.5, num_classes=3,
                                leave_one_out=leave_one_out)
    for chunk in (1, 4, 7, 1000):
        got = knn_predict(train, train_labels, queries, k=5, temperature=0.5, num_classes=3, chunk_size=chunk,
                          leave_one_out=leave_one_out)
        assert torch.equal(got, reference), chunk
    # k beyond the memory: every row votes (every other row, leaving one out)
    every = brute_force_knn(train, train_labels, queries, k=30, temperature=0.5, num_classes=3,
                            leave_one_out=leave_one_out)
    assert not torch.equal(every, reference)   # the two k differ on these rows
    for k in (30 - int(leave_one_out), 30, 45):
        assert torch.equal(knn_predict(train, train_labels, queries, k=k, temperature=0.5, num_classes=3,
                                       chunk_size=7, leave_one_out=leave_one_out), every), k
    with pytest.raises(ValueError, match=r"need k >= 1, temperature > 0, chunk_size >= 1 \(got 5, 0.0, 7\)"):
        knn_predict(train, train_labels, queries, k=5, temperature=0.0, num_classes=3, chunk_size=7)


def test_knn_leave_one_out_excludes_the_query_itself():
    # Each point's only neighbour of its own label is itself: with it excluded, 1-NN is always wrong.
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 0, 1])
    assert knn_accuracy(feats, labels, feats, labels, k=1, num_classes=2) == 1.0
    assert knn_accuracy(feats, labels, feats, labels, k=1, num_classes=2, leave_one_out=True) == 0.0


def test_linear_probe_separable_is_near_perfect_and_shuffled_labels_are_chance():
    train, train_labels = separable(200, dim=32, seed=0, noise=0.1)
    test, test_labels = separable(100, dim=32, seed=0, noise=0.1)
    assert linear_probe(train, train_labels, test, test_labels, epochs=30, lr=0.01, batch_size=256, seed=0) > 0.98
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(1))]
    acc = linear_probe(train, shuffled, test, test_labels, epochs=30, lr=0.01, batch_size=256, seed=0)
    assert 0.05 < acc < 0.4
    # Deterministic for a seed.
    again = linear_probe(train, train_labels, test, test_labels, epochs=5, lr=0.01, batch_size=256, seed=4)
    assert again == linear_probe(train, train_labels, test, test_labels, epochs=5, lr=0.01, batch_size=256, seed=4)


def test_linear_probe_with_augmented_epochs():
    train, train_labels = separable(200, dim=32, seed=0, noise=0.1)
    test, test_labels = separable(100, dim=32, seed=0, noise=0.1)
    calls = []

    def same_rows(epoch):
        calls.append(epoch)
        return train, train_labels

    # "Augmentation" that returns the clean rows is the plain probe, to the last bit.
    plain = linear_probe(train, train_labels, test, test_labels, epochs=4, lr=0.01, batch_size=64, seed=2)
    assert linear_probe(train, train_labels, test, test_labels, epochs=4, lr=0.01, batch_size=64, seed=2,
                        augmented_train=same_rows) == plain
    assert calls == [0, 1, 2, 3]  # re-extracted once per epoch

    # Each epoch's rows are used: noisy copies (a different subset size each epoch) still train the
    # probe; rows whose labels are shuffled each epoch leave it at chance.
    def noisy(epoch):
        g = torch.Generator().manual_seed(100 + epoch)
        keep = torch.randperm(len(train), generator=g)[:150 + epoch]
        return train[keep] + 0.05 * torch.randn(len(keep), train.shape[1], generator=g), train_labels[keep]

    def shuffled(epoch):
        g = torch.Generator().manual_seed(200 + epoch)
        return train, train_labels[torch.randperm(len(train), generator=g)]

    assert linear_probe(train, train_labels, test, test_labels, epochs=30, lr=0.01, batch_size=64, seed=0,
                        augmented_train=noisy) > 0.98
    assert linear_probe(train, train_labels, test, test_labels, epochs=30, lr=0.01, batch_size=64, seed=0,
                        augmented_train=shuffled) < 0.4


@pytest.mark.parametrize("chunk_size", [1024, 7])
def test_nearest_neighbours_match_scikit_learn(chunk_size):
    from sklearn.neighbors import NearestNeighbors

    g = torch.Generator().manual_seed(3)
    features = torch.randn(300, 12, generator=g) * torch.rand(300, 1, generator=g)  # norms differ: cosine, not L2
    mined = nearest_neighbours(features, 9, chunk_size=chunk_size)
    # scikit-learn's cosine search over the other rows: asked for 10, its first is the row itself
    distances, rows = NearestNeighbors(n_neighbors=10, metric="cosine", algorithm="brute").fit(
        features.double().numpy()).kneighbors(features.double().numpy())
    assert (rows[:, 0] == range(300)).all()
    assert mined.dtype == torch.long and mined.shape == (300, 9)
    assert (mined.numpy() == rows[:, 1:]).all()


def test_nearest_neighbours_refuse_bad_k():
    with pytest.raises(ValueError, match=r"need 1 <= k < N = 5"):
        nearest_neighbours(torch.randn(5, 3), 5)
    with pytest.raises(ValueError, match=r"need 1 <= k < N = 5"):
        nearest_neighbours(torch.randn(5, 3), 0)
    # the least k: each row's one nearest other row, by hand
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]])
    assert nearest_neighbours(features, 1).squeeze(1).tolist() == [1, 0, 3, 2, 2]
    with pytest.raises(ValueError, match=r"expected features \(N, D\)"):
        nearest_neighbours(torch.randn(5), 2)


def test_knn_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="features"):
        knn_accuracy(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 4),
                     torch.zeros(2, dtype=torch.long), num_classes=2)


# ------------------------------------------------------------------ the kNN monitor and --eval runs
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch, 4-step run of the reduced demo (test_train.SMALL) with the kNN monitor on."""
    import main as launcher
    from tests.test_train import DEMO, SMALL

    out = tmp_path_factory.mktemp("runs")
    launcher.main([str(DEMO), f"run.output_dir={out}", "run.name=tiny", *SMALL, "train.epochs=1",
                   "train.max_steps_per_epoch=4", "eval.knn_every_epochs=1", "eval.knn_k=20"])
    return out / "tiny"


def test_knn_monitor_is_logged(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    knn = [r["eval/knn_acc"] for r in records if "eval/knn_acc" in r]
    assert len(knn) == 1 and 0.3 < knn[0] <= 1.0  # well above chance (0.1) after one epoch on digits


@pytest.mark.parametrize("mode", ["knn", "linear", "cluster", "assign"])
def test_eval_only_run_writes_json_and_leaves_the_checkpoint_alone(trained, mode, capsys):
    import main as launcher
    from tests.test_train import DEMO, SMALL

    checkpoint = trained / "last.pt"
    before = checkpoint.read_bytes()
    files_before = sorted(p.name for p in trained.iterdir())
    results = launcher.main([str(DEMO), *SMALL, "eval.knn_k=20", "eval.linear_epochs=20",
                             "--eval", mode, "--checkpoint", str(checkpoint)])
    assert checkpoint.read_bytes() == before
    out_file = trained / f"last.eval_{mode}.json"
    csv_name = {"cluster": "last.clusters.csv", "assign": "last.assigned.csv"}.get(mode)
    new_files = [out_file.name] + ([csv_name] if csv_name else [])
    assert sorted(p.name for p in trained.iterdir()) == sorted(files_before + new_files)
    written = json.loads(out_file.read_text())
    assert written == results and written["mode"] == mode and written["epoch"] == 1
    key = {"knn": "knn_acc", "linear": "linear_acc", "cluster": "acc", "assign": "acc"}[mode]
    assert 0.3 < written[key] <= 1.0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"eval {mode} of ") and f"{written[key]:.4f}" in line
    if csv_name:  # every image's cluster, scoring as reported
        from tests.test_train import assert_scores_match_clusters, read_clusters

        rows = read_clusters(trained / csv_name)
        assert len(rows) == 640 and f"-> {out_file}, {trained / csv_name}" in line
        assert_scores_match_clusters(rows, written)
        from tests.test_train import sizes_of_clusters

        assert written["cluster_sizes"] == pytest.approx(sizes_of_clusters(rows, 10))
        from tests.test_train import assert_matching_of_clusters

        assert_matching_of_clusters(written["class_matching"], rows, written["acc"], 10)
    if mode == "assign":  # the checkpoint's own k-means clusters: the training run's clusters.csv, not a new fit
        from tests.test_train import read_clusters

        assert rows == read_clusters(trained / "clusters.csv")
        records = [json.loads(r) for r in (trained / "metrics.jsonl").read_text().splitlines()]
        assert written["acc"] == [r["eval/acc"] for r in records if "eval/acc" in r][-1]
        config = yaml.safe_load((trained / "config.yml").read_text())
        assert written["readout"] == {"features": config["eval"]["features"], "metric": config["cluster"]["metric"],
                                      "num_clusters": 10}
        assert (f"; the run's 10 clusters of {config['eval']['features']} features ({config['cluster']['metric']}) "
                f"-> {out_file}") in line
    if mode == "knn":  # the same number as the monitor logged at the end of training (same weights, same rows)
        records = [json.loads(r) for r in (trained / "metrics.jsonl").read_text().splitlines()]
        assert written["knn_acc"] == pytest.approx([r["eval/knn_acc"] for r in records if "eval/knn_acc" in r][-1])
    if mode == "linear":
        assert written["protocol"] == "train/test" and written["train_rows"] == written["test_rows"] == 640


@pytest.mark.parametrize("overrides, asked", [
    (["eval.features=projector"], "eval.features=projector"),
    (["eval.num_clusters=20"], "eval.num_clusters=20"),
    (["eval.features=online_backbone", "eval.num_clusters=3"], "eval.features=online_backbone eval.num_clusters=3"),
])
def test_assign_refuses_eval_settings_its_read_out_was_not_fitted_with(trained, overrides, asked):
    """The read-out's features and K are the checkpoint's: asking for others would be silently ignored."""
    import main as launcher
    from tests.test_train import DEMO, SMALL

    checkpoint = trained / "last.pt"
    config = yaml.safe_load((trained / "config.yml").read_text())
    files_before = sorted(p.name for p in trained.iterdir())
    message = (f"error: --eval assign: {asked}, but {checkpoint}'s k-means read-out has 10 clusters of "
               f"{config['eval']['features']} features ({config['cluster']['metric']}); assign uses those (drop the "
               "override), --eval cluster fits k-means again")
    with pytest.raises(SystemExit, match=f"^{re.escape(message)}$"):
        launcher.main([str(DEMO), *SMALL, *overrides, "--eval", "assign", "--checkpoint", str(checkpoint)])
    assert sorted(p.name for p in trained.iterdir()) == files_before


def test_exported_features_are_those_the_run_clustered(trained, capsys):
    import numpy as np
    from sklearn.metrics import pairwise_distances_argmin

    import main as launcher
    from tests.test_train import DEMO, SMALL, read_clusters

    checkpoint = trained / "last.pt"
    before = checkpoint.read_bytes()
    results = launcher.main([str(DEMO), *SMALL, "--eval", "features", "--checkpoint", str(checkpoint)])
    assert checkpoint.read_bytes() == before
    exported = np.load(trained / "last.features.npz")
    features, readout = exported["features"], torch.load(checkpoint, weights_only=True)["readout"]
    assert sorted(exported.files) == ["features", "kind", "labels"]  # no files: MNIST comes from an array
    assert features.dtype == np.float32 and features.shape == (640, readout["centroids"].shape[1])
    kind = readout["features"]  # the demo config's eval.features
    assert str(exported["kind"]) == results["features"] == kind
    assert results["shape"] == [640, features.shape[1]]
    rows = read_clusters(trained / "clusters.csv")
    assert exported["labels"].tolist() == [int(r["label"]) for r in rows]
    # Row i is image i: the run's cluster of every image is the nearest of its k-means centroids to
    # the exported row (scikit-learn's nearest centroid).
    nearest = pairwise_distances_argmin(features, readout["centroids"].numpy(), metric=readout["metric"])
    assert nearest.tolist() == [int(r["cluster"]) for r in rows] and len(set(nearest.tolist())) > 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith(f"{kind} features of 640 images, {features.shape[1]}-d -> "
                         f"{trained / 'last.eval_features.json'}, {trained / 'last.features.npz'}")


def test_linear_eval_with_augmentation_re_extracts(trained):
    import main as launcher
    from tests.test_train import DEMO, SMALL

    plain = json.loads((trained / "last.eval_linear.json").read_text()) if (trained / "last.eval_linear.json").exists() \
        else launcher.main([str(DEMO), *SMALL, "eval.linear_epochs=20", "--eval", "linear", "--checkpoint",
                            str(trained / "last.pt")])
    augmented = launcher.main([str(DEMO), *SMALL, "eval.linear_epochs=20", "eval.linear_augment=true",
                               "--eval", "linear", "--checkpoint", str(trained / "last.pt")])
    assert plain["augment"] is False and augmented["augment"] is True
    # Trained on other (augmented) rows: a different classifier, still far above chance on the clean test rows.
    assert augmented["linear_acc"] != plain["linear_acc"] and 0.3 < augmented["linear_acc"] <= 1.0


def test_best_checkpoint_can_follow_the_knn_monitor(tmp_path):
    import main as launcher
    from tests.test_train import DEMO, SMALL
    from utils.checkpoint import load_checkpoint

    launcher.main([str(DEMO), f"run.output_dir={tmp_path}", "run.name=knnbest", *SMALL, "train.epochs=3",
                   "train.max_steps_per_epoch=2", "eval.every_epochs=3", "eval.knn_every_epochs=1",
                   "eval.knn_k=20", "eval.best_metric=knn_acc"])
    records = [json.loads(r) for r in (tmp_path / "knnbest" / "metrics.jsonl").read_text().splitlines()]
    knn = {r["epoch"]: r["eval/knn_acc"] for r in records if "eval/knn_acc" in r}
    assert sorted(knn) == [0, 1, 2]
    best_epoch = max(knn, key=lambda e: (knn[e], -e))  # the first epoch that reached the maximum
    best = load_checkpoint(tmp_path / "knnbest" / "best.pt", map_location="cpu")
    assert best["epoch"] == best_epoch + 1 and best["best"]["knn_acc"] == pytest.approx(knn[best_epoch])


def test_several_eval_modes_in_one_run_give_what_each_gives_alone(trained, tmp_path, capsys):
    """One --eval with every mode writes the files each mode writes on its own, with the same contents,
    from one extraction per (image set, feature kind)."""
    import shutil

    import numpy as np

    import main as launcher
    from tests.test_train import DEMO, SMALL

    modes = ["cluster", "knn", "linear", "assign", "features"]
    args = [str(DEMO), *SMALL, "eval.knn_k=20", "eval.linear_epochs=20"]
    together, alone = tmp_path / "together", tmp_path / "alone"
    for folder in (together, alone):
        folder.mkdir()
        shutil.copy(trained / "last.pt", folder / "last.pt")
    capsys.readouterr()
    results = launcher.main([*args, "--eval", ",".join(modes), "--checkpoint", str(together / "last.pt")])
    extractions = [line for line in capsys.readouterr().err.splitlines() if " utils.trainer: extracted " in line]
    # The evaluation set (also the training set: train+test) once for cluster, knn, assign and features,
    # and the probe's train and test splits once each.
    assert len(extractions) == 3
    for mode in modes:
        launcher.main([*args, "--eval", mode, "--checkpoint", str(alone / "last.pt")])
    assert sorted(p.name for p in together.iterdir()) == sorted(p.name for p in alone.iterdir())
    assert list(results) == modes
    for mode in modes:
        one, other = (json.loads((folder / f"last.eval_{mode}.json").read_text()) for folder in (together, alone))
        assert one == results[mode] and one["mode"] == mode
        assert {**one, "checkpoint": None} == {**other, "checkpoint": None}
    for name in ("last.clusters.csv", "last.assigned.csv"):
        assert (together / name).read_text() == (alone / name).read_text()
    features = [np.load(folder / "last.features.npz") for folder in (together, alone)]
    assert features[0].files == features[1].files
    for key in features[0].files:
        np.testing.assert_array_equal(features[0][key], features[1][key])


def test_linear_probe_reuses_the_runs_train_and_test_features(trained, tmp_path, capsys):
    """With data.split=train and data.eval_split=test, --eval linear,knn extracts each split once: the
    probe reads the features kNN extracted from the run's own sets, and scores what it scores when it
    builds both splits itself."""
    import shutil

    import main as launcher
    from tests.test_train import DEMO, SMALL

    shutil.copy(trained / "last.pt", tmp_path / "last.pt")
    args = [str(DEMO), *SMALL, "eval.knn_k=20", "eval.linear_epochs=20"]
    capsys.readouterr()
    results = launcher.main([*args, "data.split=train", "data.eval_split=test", "--eval", "linear,knn",
                             "--checkpoint", str(tmp_path / "last.pt")])
    extractions = [line for line in capsys.readouterr().err.splitlines() if " utils.trainer: extracted " in line]
    assert len(extractions) == 2  # the train split and the test split, 640 rows each
    assert (results["linear"]["train_rows"], results["linear"]["test_rows"]) == (640, 640)
    # The default split (train+test) is neither probe split: the probe builds both, as it always did.
    built = launcher.main([*args, "--eval", "linear", "--checkpoint", str(tmp_path / "last.pt")])
    assert built["protocol"] == results["linear"]["protocol"] == "train/test"
    assert built["linear_acc"] == results["linear"]["linear_acc"]


def test_the_eval_sections_knn_and_probe_settings_reach_them(trained, tmp_path, monkeypatch):
    """--eval knn,linear hands each eval.knn_* and eval.linear_* value (and run.seed) to the function it sets,
    none swapped with another, and returns what those functions return."""
    import shutil

    import main as launcher
    import utils.evaluation as evaluation
    from tests.test_train import DEMO, SMALL

    calls = {}

    def recording(name, function):
        def record(*args, **kwargs):
            calls[name] = kwargs
            calls[name + "_result"] = function(*args, **kwargs)
            return calls[name + "_result"]
        return record

    monkeypatch.setattr(evaluation, "knn_accuracy", recording("knn", evaluation.knn_accuracy))
    monkeypatch.setattr(evaluation, "linear_probe", recording("linear", evaluation.linear_probe))
    shutil.copy(trained / "last.pt", tmp_path / "last.pt")
    results = launcher.main([str(DEMO), *SMALL, "eval.knn_k=7", "eval.knn_temperature=0.3", "eval.knn_chunk_size=50",
                             "eval.linear_epochs=3", "eval.linear_lr=0.002", "eval.linear_weight_decay=0.04",
                             "eval.linear_batch_size=33", "run.seed=5", "--eval", "knn,linear",
                             "--checkpoint", str(tmp_path / "last.pt")])
    assert {key: calls["knn"][key] for key in ("k", "temperature", "chunk_size")} == {
        "k": 7, "temperature": 0.3, "chunk_size": 50}
    assert {key: calls["linear"][key] for key in ("epochs", "lr", "weight_decay", "batch_size", "seed")} == {
        "epochs": 3, "lr": 0.002, "weight_decay": 0.04, "batch_size": 33, "seed": 5}
    assert (results["knn"]["knn_acc"], results["linear"]["linear_acc"]) == (calls["knn_result"],
                                                                           calls["linear_result"])


def test_eval_beside_a_checkpoint_in_a_read_only_folder_is_one_line_before_the_data_load(trained, tmp_path,
                                                                                         monkeypatch):
    """--eval writes its results beside the checkpoint: a folder rank 0 may not write (a read-only copy of
    the runs) is refused before the data load and the passes, not at the first file written after them."""
    import shutil
    from pathlib import Path

    import main as launcher
    from tests.test_train import DEMO, SMALL

    checkpoint = tmp_path / "last.pt"
    shutil.copy(trained / "last.pt", checkpoint)
    real_access = launcher.os.access
    monkeypatch.setattr(launcher.os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode))
    monkeypatch.setattr(launcher, "build_datasets", lambda cfg: pytest.fail("the data were loaded"))
    with pytest.raises(SystemExit, match=rf"^error: --eval: cannot write its results beside "
                                         rf"{re.escape(str(checkpoint))} \({re.escape(str(tmp_path))} is not "
                                         r"writable\)$"):
        launcher.main([str(DEMO), *SMALL, "--eval", "cluster", "--checkpoint", str(checkpoint)])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_eval_only_run_under_two_processes_matches_one(trained, tmp_path):
    """--eval knn,assign,features under torchrun (2 ranks): each mode's numbers, clusters and gathered
    features are the one-process run's."""
    import shutil

    import numpy as np

    import main as launcher
    from tests.test_train import DEMO, SMALL, read_clusters
    from tests.torchrun_util import REPO_ROOT, run_torchrun

    checkpoint = tmp_path / "last.pt"
    shutil.copy(trained / "last.pt", checkpoint)
    before = checkpoint.read_bytes()
    proc = run_torchrun(REPO_ROOT / "main.py", str(DEMO), *SMALL, "train.batch_size_per_rank=32", "eval.knn_k=20",
                        "--eval", "knn,assign,features", "--checkpoint", str(checkpoint), nproc=2)
    assert checkpoint.read_bytes() == before
    one = [json.loads(r) for r in (trained / "metrics.jsonl").read_text().splitlines() if "eval/acc" in r]
    two = {}
    for mode in ("knn", "assign", "features"):
        assert proc.stdout.count(f"eval {mode} of ") == 1  # rank 0 only
        two[mode] = json.loads((tmp_path / f"last.eval_{mode}.json").read_text())
        assert two[mode]["world_size"] == 2 and two[mode]["mode"] == mode
    assert two["knn"]["knn_acc"] == pytest.approx(one[-1]["eval/knn_acc"], abs=1e-6)
    # every image in the cluster the one-process run gave it
    assert read_clusters(tmp_path / "last.assigned.csv") == read_clusters(trained / "clusters.csv")
    assert two["assign"]["acc"] == pytest.approx(one[-1]["eval/acc"], abs=1e-12)
    # gathered from both ranks: every image's row, in dataset order, as one process extracts them
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(trained / "last.pt", alone / "last.pt")
    launcher.main([str(DEMO), *SMALL, "--eval", "features", "--checkpoint", str(alone / "last.pt")])
    one_process = np.load(alone / "last.features.npz")["features"]
    two_processes = np.load(tmp_path / "last.features.npz")
    assert two_processes["features"].shape == one_process.shape == (640, one_process.shape[1])
    np.testing.assert_allclose(two_processes["features"], one_process, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--eval", "knn"], r"^error: --eval needs --checkpoint PATH$"),
    (["--eval", "probe", "--checkpoint", "x.pt"],
     r"^error: --eval: expected one of cluster, assign, knn, linear, features, or several comma-separated, "
     r"got 'probe'$"),
    (["--eval", "knn,probe", "--checkpoint", "x.pt"], r"^error: --eval: expected one of .*, got 'probe'$"),
    (["--eval", "knn,", "--checkpoint", "x.pt"], r"^error: --eval: expected one of .*, got ''$"),
    (["--eval", "cluster,knn,cluster", "--checkpoint", "x.pt"],
     r"^error: --eval: cluster appears twice in 'cluster,knn,cluster'; each mode runs once$"),
    (["--eval", "knn", "--checkpoint", "/nonexistent/last.pt"],
     r"^error: --checkpoint: no such file /nonexistent/last.pt$"),
])
def test_eval_bad_input_is_a_one_line_error(args, message):
    import main as launcher
    from tests.test_train import DEMO

    with pytest.raises(SystemExit, match=message):
        launcher.main([str(DEMO), *args])


@pytest.mark.parametrize("override, message", [
    ("eval.knn_temperature=0", r"^eval.knn_temperature: expected a value > 0, got 0.0$"),
    ("eval.knn_k=0", r"^eval.knn_k: expected a value >= 1, got 0$"),
    ("eval.linear_features=head", r"^eval.linear_features: expected one of .* got 'head'$"),
    ("eval.knn_topk=5", r"^unknown key 'eval.knn_topk' \(did you mean 'eval.knn_k'\?\)$"),
    ("eval.best_metric=knn_acc", r"^eval.best_metric: knn_acc needs the kNN monitor on \(eval.knn_every_epochs > 0\)$"),
])
def test_eval_config_is_validated(override, message):
    from tests.test_train import DEMO
    from utils.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_assign_to_centroids_is_the_nearest_centroid(metric):
    from sklearn.metrics import pairwise_distances_argmin

    from utils.features import assign_to_centroids

    g = torch.Generator().manual_seed(0)
    features, centroids = torch.randn(300, 8, generator=g), torch.randn(7, 8, generator=g)
    labels = assign_to_centroids(features, centroids, metric=metric)
    assert labels.dtype == torch.int64 and labels.shape == (300,)
    # scikit-learn's nearest centroid (Euclidean; cosine distance for the cosine metric).
    expected = pairwise_distances_argmin(features.numpy(), centroids.numpy(), metric=metric)
    assert labels.tolist() == expected.tolist()
    assert len(set(expected.tolist())) == 7


def test_neighbour_precision_counts_pairs_with_known_labels():
    from utils.evaluation import neighbour_precision

    labels = torch.tensor([0, 0, 1, 1, -1])
    neighbours = torch.tensor([[1, 2], [0, 4], [3, 0], [2, 1], [0, 1]])
    # known pairs: (0,1) same, (0,2) diff, (1,0) same, (2,3) same, (2,0) diff, (3,2) same, (3,1) diff
    assert neighbour_precision(neighbours, labels) == pytest.approx(4 / 7)
    assert math.isnan(neighbour_precision(neighbours, torch.full((5,), -1)))
