"""utils.summarize: mean and spread of the final scores of real runs, grouped by config."""
import json

import numpy as np
import pytest
from PIL import Image

import main as launcher
from tests.test_train import TINY
from tests.torchrun_util import REPO_ROOT, SHARED_DATA
from utils import summarize

BYOL = str(REPO_ROOT / "config" / "mnist_cnn_byol.yml")
ONE_EPOCH = [*TINY, "train.epochs=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three seeds of one config (one of them decoding its images once, which changes nothing it
    computes) and one run with another learning rate: run directory -> the final scores main.py returned."""
    out = tmp_path_factory.mktemp("runs")
    returned = {}
    for name, overrides in (("s0", ["run.seed=0"]), ("s1", ["run.seed=1"]),
                            ("s2", ["run.seed=2", "data.decode_once=true"]),
                            ("lr", ["run.seed=0", "optim.lr=0.01"])):
        returned[out / name] = launcher.main([BYOL, f"run.output_dir={out}", f"run.name={name}", *ONE_EPOCH,
                                              "eval.knn_every_epochs=1", *overrides])
    return out, returned


def test_groups_and_statistics_match_the_runs_own_scores(runs, tmp_path, capsys):
    out, returned = runs
    (out / "started").mkdir()
    (out / "started" / "config.yml").write_text((out / "s0" / "config.yml").read_text())  # no metrics yet
    dirs = [out / "s0", out / "lr", out / "started", out / "s1", out / "s2"]
    groups = summarize.main([*map(str, dirs), "--json", str(tmp_path / "summary.json")])
    captured = capsys.readouterr()
    assert f"skipped {out / 'started'}: no evaluation yet" in captured.err
    assert "skipped" not in captured.out and "a seed repeats" not in captured.out  # the table alone; distinct seeds
    assert [[r.path.name for r in g.runs] for g in groups] == [["s0", "s1", "s2"], ["lr"]]
    seeds = [returned[out / name] for name in ("s0", "s1", "s2")]
    for metric in ("nmi", "acc", "ari"):
        values = np.array([scores[metric] for scores in seeds])
        stats = groups[0].stats(metric)
        assert stats["mean"] == pytest.approx(values.mean(), abs=1e-9)
        assert stats["std"] == pytest.approx(values.std(ddof=1), abs=1e-9)
        assert (stats["min"], stats["max"], stats["n"]) == (values.min(), values.max(), 3)
        assert f"{metric.upper()} {values.mean():.4f} ± {values.std(ddof=1):.4f}" in captured.out
        assert groups[1].stats(metric)["mean"] == pytest.approx(returned[out / "lr"][metric], abs=1e-9)
    assert groups[0].stats("knn_acc")["n"] == 3
    assert "byol mnist small_cnn: 3 run(s), seeds [0, 1, 2], 1 epochs: " in captured.out
    assert "differs from [0] in optim.lr=0.01" in captured.out
    written = json.loads((tmp_path / "summary.json").read_text())
    assert [len(g["runs"]) for g in written] == [3, 1] and written[0]["acc"]["mean"] == groups[0].stats("acc")["mean"]


def test_a_repeated_seed_is_flagged(runs, capsys):
    out, _ = runs
    summarize.main([str(out / "s0"), str(out / "s0")])
    assert "a seed repeats" in capsys.readouterr().out


def test_what_is_not_a_run_is_one_line(runs, tmp_path):
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path}: not a run directory \(no config.yml\)$"):
        summarize.main([str(tmp_path)])
    (tmp_path / "config.yml").write_text("run: [unclosed\n")
    with pytest.raises(SystemExit, match=r"^error: .*config.yml: not readable YAML"):
        summarize.main([str(tmp_path)])


def test_a_finished_run_on_unlabeled_images_is_skipped_as_such(runs, tmp_path, capsys):
    out, _ = runs
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(np.load(SHARED_DATA / "mnist.npz")["x_train"][:128]):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    launcher.main([BYOL, f"run.output_dir={tmp_path}", "run.name=unlabeled", *ONE_EPOCH, "data.name=imagefolder",
                   f"data.root={folder}", "data.num_workers=0", "cluster.num_clusters=10"])
    capsys.readouterr()
    groups = summarize.main([str(out / "s0"), str(tmp_path / "unlabeled")])
    assert [[r.path.name for r in g.runs] for g in groups] == [["s0"]]
    assert (f"skipped {tmp_path / 'unlabeled'}: finished without scores: unlabeled data (its clusters are in "
            "clusters.csv)") in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: none of the runs has scores to summarize \(see the lines above\)$"):
        summarize.main([str(tmp_path / "unlabeled")])
