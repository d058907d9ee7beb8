"""Config loading: validation, suggestions, coercion, bases, overrides, and every shipped YAML."""
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from models import DataInfo, build_method
from utils.config import ConfigError, load_config, save_resolved_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "config").glob("*.yml"))


def write(tmp_path: Path, text: str, name: str = "c.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = "method:\n  name: propos\n"


def test_minimal_config_gets_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.method.name == "propos" and cfg.method.temperature == 0.5
    assert cfg.train.batch_size_per_rank == 128


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(write(tmp_path, MINIMAL + "optim:\n  lrr: 0.1\n"))


def test_unknown_method_key_and_section(tmp_path):
    with pytest.raises(ConfigError, match=r"method.temprature.*did you mean 'method.temperature'"):
        load_config(write(tmp_path, MINIMAL + "  temprature: 0.2\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config(write(tmp_path, MINIMAL + "trian:\n  epochs: 3\n"))


def test_a_config_without_a_method_says_it_is_a_fragment_for_base(tmp_path):
    """A data fragment run on its own names the file and what it is for; a method section without a name
    keeps the plain message."""
    fragment = REPO / "config" / "base" / "data_imagenet10.yml"
    with pytest.raises(ConfigError, match=rf"^method.name: required, and {re.escape(str(fragment))} names no "
                                          r"method \(with its bases\): a fragment such as config/base/\*.yml goes in "
                                          r"the base: list of a config that names one$"):
        load_config(fragment)
    with pytest.raises(ConfigError, match=r"^method.name: required \(the registered method to train, e.g. propos\)$"):
        load_config(write(tmp_path, "method:\n  temperature: 0.5\n"))
    assert len(load_config(fragment, ["method.name=propos"]).data.classes) == 10  # with a method it runs


def test_unknown_method_name_lists_known(tmp_path):
    with pytest.raises(ConfigError, match=r"method.name: unknown method 'propoz'.*did you mean 'propos'"):
        load_config(write(tmp_path, "method:\n  name: propoz\n"))


def test_unknown_backbone_is_refused_when_the_config_is_read(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.backbone: unknown backbone 'resnet81' \(did you mean "
                                          r"'resnet18'\?\); known: .*resnet18, .*small_cnn.* \(method 'propos'\)$"):
        load_config(write(tmp_path, MINIMAL), ["model.backbone=resnet81"])
    # DEC and IDEC take an autoencoder: a ResNet is refused, an autoencoder accepted.
    dec = "method:\n  name: idec\n"
    with pytest.raises(ConfigError, match=r"^model.backbone: unknown autoencoder 'resnet18'; known: "
                                          r"conv_autoencoder, mlp_autoencoder \(method 'idec'\)$"):
        load_config(write(tmp_path, dec), ["model.backbone=resnet18"])
    assert load_config(write(tmp_path, dec), ["model.backbone=conv_autoencoder"]).model.backbone == "conv_autoencoder"


def test_scalars_are_coerced_and_wrong_types_name_the_key(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string
    cfg = load_config(write(tmp_path, MINIMAL + "optim:\n  weight_decay: 1e-4\ntrain:\n  epochs: '3'\n"))
    assert cfg.optim.weight_decay == pytest.approx(1e-4) and isinstance(cfg.optim.weight_decay, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 2.5"):
        load_config(write(tmp_path, MINIMAL + "train:\n  epochs: 2.5\n"))
    with pytest.raises(ConfigError, match=r"logging.wandb: expected true or false"):
        load_config(write(tmp_path, MINIMAL + "logging:\n  wandb: maybe\n"))


def test_invalid_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.amp: expected one of none, bf16, fp16, got 'fp8'"):
        load_config(write(tmp_path, MINIMAL + "train:\n  amp: fp8\n"))
    with pytest.raises(ConfigError, match=r"data.split"):
        load_config(write(tmp_path, MINIMAL + "data:\n  split: tran\n"))
    with pytest.raises(ConfigError, match=r"method.temperature: expected a value > 0"):
        load_config(write(tmp_path, MINIMAL + "  temperature: 0\n"))
    with pytest.raises(ConfigError, match=r"eval.features: expected one of projector, backbone"):
        load_config(write(tmp_path, MINIMAL + "eval:\n  features: logits\n"))
    with pytest.raises(ConfigError, match=r"method.pseudo_label_features: expected one of projector, backbone"):
        load_config(write(tmp_path, MINIMAL + "  pseudo_label_features: logits\n"))


# One shipped config per method: between them, every setting of every section and method.
ONE_PER_METHOD = [REPO / "config" / name for name in (
    "mnist_cnn_propos.yml", "mnist_cnn_byol.yml", "mnist_cnn_simclr.yml", "mnist_cnn_moco.yml",
    "mnist_cnn_simsiam.yml", "mnist_cnn_pcl.yml", "mnist_cnn_cc.yml", "mnist_cnn_scan.yml", "mnist_cnn_nnm.yml",
    "mnist_mlp_dec.yml", "mnist_mlp_idec.yml", "mnist_dccm.yml")]


def float_keys(cfg) -> list[str]:
    """The dotted keys of every float setting of `cfg` (lists of floats: their first item)."""
    import dataclasses

    keys = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for field in dataclasses.fields(values) if dataclasses.is_dataclass(values) else ():
            value = getattr(values, field.name)
            if isinstance(value, float):
                keys.append(f"{section.name}.{field.name}")
            elif isinstance(value, list) and value and isinstance(value[0], float):
                keys.append(f"{section.name}.{field.name}[0]")
    return keys


@pytest.mark.parametrize("path", ONE_PER_METHOD, ids=[p.stem for p in ONE_PER_METHOD])
def test_no_setting_takes_nan_or_infinity(path):
    """NaN passes every `value < minimum` check (an lr of NaN trained on silently): each float setting refuses
    it, and infinities, in one line that names the key."""
    cfg = load_config(path)
    keys = float_keys(cfg)
    assert {"optim.lr", "optim.betas[0]", "cluster.tol", "method.temperature"} & set(keys)
    for key in keys:
        for bad in ("nan", "-inf"):
            if key.endswith("[0]"):   # a list: the override replaces it whole
                name, first = key[:-3], bad
                override = f"{name}=[{first}, 0.5]"
            else:
                override = f"{key}={bad}"
            with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected a finite number, got "):
                load_config(path, [override])


@pytest.mark.parametrize("override, message", [
    ("run.seed=-1", "run.seed: expected a value >= 0, got -1"),
    ("cluster.tol=-0.1", "cluster.tol: expected a value >= 0.0, got -0.1"),
    ("eval.max_iter=0", "eval.max_iter: expected a value >= 1, got 0"),
    ("optim.lr_reference_batch=-256", "optim.lr_reference_batch: expected a value >= 0, got -256"),
    ("optim.min_lr=-0.001", "optim.min_lr: expected a value >= 0.0, got -0.001"),
    ("optim.grad_clip_norm=-1", "optim.grad_clip_norm: expected a value >= 0.0, got -1.0"),
    ("optim.momentum=-0.9", "optim.momentum: expected a value in [0, 1), got -0.9"),
    ("optim.momentum=1", "optim.momentum: expected a value in [0, 1), got 1.0"),
    ("optim.betas=[0.9, 1.5]", "optim.betas[1]: expected a value in [0, 1), got 1.5"),
    ("method.feature_dim=0", "method.feature_dim: expected a width >= 1, got 0"),
    ("method.projector_hidden_dim=-1", "method.projector_hidden_dim: expected a width >= 1, got -1"),
    ("method.predictor_hidden_dim=0", "method.predictor_hidden_dim: expected a width >= 1, got 0"),
])
def test_settings_out_of_their_range_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=rf"^{re.escape(message)}$"):
        load_config(REPO / "config" / "mnist_cnn_propos.yml", [override])


@pytest.mark.parametrize("config, override, message", [
    ("mnist_cnn_scan.yml", "method.scan_momentum=-0.5", "method.scan_momentum: expected a value in [0, 1), got -0.5"),
    ("mnist_cnn_nnm.yml", "method.selflabel_momentum=1.2",
     "method.selflabel_momentum: expected a value in [0, 1), got 1.2"),
    ("mnist_mlp_dec.yml", "method.pretrain_momentum=-1",
     "method.pretrain_momentum: expected a value in [0, 1), got -1.0"),
    ("mnist_mlp_idec.yml", "method.cluster_momentum=1", "method.cluster_momentum: expected a value in [0, 1), got 1.0"),
    ("mnist_mlp_dec.yml", "method.pretrain_lr_step_iters=0",
     "method.pretrain_lr_step_iters: expected >= 1 iteration, got 0"),
])
def test_method_momenta_and_steps_out_of_range_are_refused_in_one_line(config, override, message):
    with pytest.raises(ConfigError, match=rf"^{re.escape(message)}$"):
        load_config(REPO / "config" / config, [override])


def test_base_chain_and_overrides(tmp_path):
    write(tmp_path, MINIMAL + "train:\n  epochs: 10\n  batch_size_per_rank: 64\n", "base.yml")
    child = write(tmp_path, "base: base.yml\ntrain:\n  epochs: 20\n", "child.yml")
    cfg = load_config(child)
    assert (cfg.train.epochs, cfg.train.batch_size_per_rank) == (20, 64)
    cfg = load_config(child, ["train.epochs=2", "method.temperature=0.2", "augment.crop_scale=[0.2, 1.0]"])
    assert cfg.train.epochs == 2 and cfg.method.temperature == 0.2 and cfg.augment.crop_scale == [0.2, 1.0]
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)"):
        load_config(child, ["train.epoch=2"])
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 'two'"):
        load_config(child, ["train.epochs=two"])
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        load_config(child, ["epochs"])


def test_a_list_of_bases_merges_left_to_right_then_the_file(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path, MINIMAL + "train:\n  epochs: 10\n  batch_size_per_rank: 64\n", "common.yml")
    write(tmp_path, "base: common.yml\ntrain:\n  epochs: 30\noptim:\n  lr: 0.2\n", "method.yml")
    # a fragment in another folder that extends the same common file (a diamond, not a cycle)
    write(tmp_path, "base: ../common.yml\ndata:\n  name: stl10\n  image_size: 96\noptim:\n  lr: 0.3\n",
          "base/data.yml")
    child = write(tmp_path, "base: [method.yml, base/data.yml]\ndata:\n  image_size: 64\n", "child.yml")
    cfg = load_config(child)
    # data.yml's copy of common.yml (epochs 10) comes after method.yml's epochs 30: later bases win
    assert (cfg.train.epochs, cfg.train.batch_size_per_rank, cfg.optim.lr) == (10, 64, 0.3)
    assert (cfg.data.name, cfg.data.image_size) == ("stl10", 64)
    swapped = write(tmp_path, "base: [base/data.yml, method.yml]\n", "swapped.yml")
    cfg = load_config(swapped)
    assert (cfg.train.epochs, cfg.optim.lr, cfg.data.name) == (30, 0.2, "stl10")
    for bad in ("[]", "[method.yml, 3]", "{a: b}"):
        with pytest.raises(ConfigError, match=r"bad.yml: base: expected a file name or a list of file names"):
            load_config(write(tmp_path, f"base: {bad}\n", "bad.yml"))
    write(tmp_path, "base: [common.yml, loop.yml]\n", "loop.yml")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.yml")


def test_circular_base_and_missing_file(tmp_path):
    write(tmp_path, "base: b.yml\n" + MINIMAL, "a.yml")
    write(tmp_path, "base: a.yml\n", "b.yml")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.epochs=7"])
    save_resolved_config(cfg, tmp_path / "resolved.yml")
    again = load_config(tmp_path / "resolved.yml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_builds(path):
    cfg = load_config(path)
    image_size = 96 if cfg.data.image_size == 96 else 32
    method = build_method(cfg.method, backbone=cfg.model.backbone, norm=cfg.model.norm,
                          data=DataInfo(in_channels=1 if "mnist" in cfg.data.name else 3, image_size=image_size,
                                        # CIFAR-10's train+test: PCL refuses more clusters than images
                                        num_classes=10, num_samples=60000, num_clusters=10))
    assert cfg.method.name in path.stem
    method.eval()
    channels = 1 if "mnist" in cfg.data.name else 3
    with torch.no_grad():
        feats = method.eval_features(torch.rand(2, channels, image_size, image_size), method.default_eval_features)
    assert feats.shape[0] == 2 and torch.isfinite(feats).all()


def test_config_changes_names_each_changed_key_with_both_values():
    from utils.config import config_changes, flatten

    saved = {"train": {"epochs": 10, "amp": "none"}, "optim": {"lr": 0.05, "betas": [0.9, 0.999]},
             "data": {"root": "/a"}, "old": {"gone": 1}}
    current = {"train": {"epochs": 20, "amp": "none"}, "optim": {"lr": 0.05, "betas": [0.9, 0.99]},
               "data": {"root": "/a"}, "eval": {"new_key": True}}
    assert flatten(current) == {"train.epochs": 20, "train.amp": "none", "optim.lr": 0.05, "optim.betas": [0.9, 0.99],
                                "data.root": "/a", "eval.new_key": True}
    assert config_changes(saved, current) == ["train.epochs: 10 -> 20", "optim.betas: [0.9, 0.999] -> [0.9, 0.99]",
                                              "eval.new_key: (absent) -> True", "old.gone: 1 -> (absent)"]
    assert config_changes(current, current) == []
    # A run's real config against itself with one override.
    demo = Path(__file__).resolve().parents[1] / "config" / "cifar10_r18_propos.yml"  # base: base/propos_paper.yml
    base = load_config(demo).to_dict()
    assert config_changes(base, load_config(demo, ["cluster.n_init=7"]).to_dict()) == [
        f"cluster.n_init: {base['cluster']['n_init']!r} -> 7"]


def test_print_config_prints_the_resolved_config_that_loads_back_to_itself(tmp_path, capsys):
    """--print-config: bases and overrides applied, the YAML read back by load_config gives the same
    config (the oracle), and nothing is created; a bad override is the usual one-line error."""
    import main as launcher

    demo = Path(__file__).resolve().parents[1] / "config" / "cifar10_r18_propos.yml"  # base: base/propos_paper.yml
    overrides = ["train.epochs=3", f"run.output_dir={tmp_path / 'runs'}", "cluster.n_init=2"]
    assert launcher.main([str(demo), *overrides, "--print-config"]) == {}
    printed = capsys.readouterr().out
    expected = load_config(demo, overrides)
    assert load_config(write(tmp_path, printed, "printed.yml")).to_dict() == expected.to_dict()
    assert expected.train.epochs == 3 and expected.cluster.n_init == 2
    assert expected.run.name == "cifar10_r18_propos" and load_config(demo, ["run.name=x"]).run.name == "x"
    assert not re.search(r"^base:", printed, re.M) and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit, match=r"^error: unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)"):
        launcher.main([str(demo), "train.epoch=3", "--print-config"])


METHODS_MD = REPO.parent / "shared" / "docs" / "methods.md"
SUBSET_CONFIGS = [p for p in SHIPPED if p.name.startswith(("imagenet10_", "imagenetdogs_"))]


def _listed_synsets(subset: str) -> list[str]:
    """The synsets methods.md lists for `subset` (its line '- ImageNet-10: n02056570 king penguin, ...')."""
    lists = [re.findall(r"\bn\d{8}\b", line) for line in METHODS_MD.read_text(encoding="utf-8").splitlines()
             if line.startswith(f"- {subset}:")]
    return next(synsets for synsets in lists if synsets)  # the protocol section's line has none


@pytest.mark.skipif(not METHODS_MD.is_file(), reason="needs ../shared/docs/methods.md")
@pytest.mark.parametrize("path", SUBSET_CONFIGS, ids=[p.name for p in SUBSET_CONFIGS])
def test_imagenet_subset_configs_read_the_classes_methods_md_lists(tmp_path, path):
    """Each ImageNet-10 / ImageNet-Dogs config (on its data fragment) picks, out of an ILSVRC-like tree
    (train/ and val/ class folders), exactly the synsets that methods.md lists for its subset, in that
    order: the training images, and those it scores (train, or val/ for NNM's train -> val protocol)."""
    from PIL import Image

    from data.datasets import build_eval_dataset, build_train_dataset

    expected = _listed_synsets("ImageNet-10" if path.name.startswith("imagenet10_") else "ImageNet-Dogs")
    assert len(expected) == (10 if path.name.startswith("imagenet10_") else 15)
    everything = sorted(set(_listed_synsets("ImageNet-10") + _listed_synsets("ImageNet-Dogs")) | {"n01440764"})
    for part in ("train", "val"):
        for k, synset in enumerate(everything):
            (tmp_path / part / synset).mkdir(parents=True)
            Image.new("RGB", (8, 8), (k, 0, 0)).save(tmp_path / part / synset / f"{synset}_1.JPEG", format="JPEG")
    cfg = load_config(path, [f"data.root={tmp_path}"])
    scored_part = "val" if cfg.data.eval_split == "test" else "train"
    for data, part in ((build_train_dataset(cfg.data), "train"), (build_eval_dataset(cfg.data), scored_part)):
        assert data.class_names == expected and data.labels.tolist() == list(range(len(expected)))
        assert [Path(f).parent.name for f in data.files] == expected
        assert all(Path(f).parent.parent.name == part for f in data.files)
    assert (scored_part == "val") == (cfg.method.name == "nnm")


PROPOS_MD = REPO.parent / "shared" / "docs" / "propos.md"


@lru_cache(maxsize=None)
def shipped_config(path: Path):
    """The shipped config at `path`, loaded once for the tests below that read every one (only read)."""
    return load_config(path)

# The reported-results tables' row names -> the method a config of that row runs, and their dataset
# columns -> (config file prefix, what such a config must read).
REPORTED_METHODS = {"DEC (DAC)": "dec", "DCCM": "dccm", "SimCLR + k-means": "simclr", "MoCo": "moco",
                    "SimSiam": "simsiam", "BYOL": "byol", "PCL": "pcl", "CC": "cc", "SCAN-loss": "scan",
                    "SCAN + self-label": "scan", "NNM": "nnm", "ProPos": "propos"}
REPORTED_DATASETS = {"CIFAR-10": "cifar10_", "CIFAR-20": "cifar20_", "STL-10": "stl10_", "ImageNet-10": "imagenet10_",
                     "Dogs": "imagenetdogs_", "ImageNet-Dogs": "imagenetdogs_", "Tiny": "tinyimagenet_"}


def _reported_results() -> list[tuple[str, str, list[str]]]:
    """(method row, dataset column, [NMI, ACC, ARI] as written) of every figure in methods.md's
    "Reported results" table and in propos.md's table of the paper's results."""
    cells = []
    lines = METHODS_MD.read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("|method|"))
    columns = lines[header].strip("|").split("|")[1:]
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        row, *values = line.strip("|").split("|")
        cells += [(row, column, re.findall(r"\.\d{3}", value)) for column, value in zip(columns, values)
                  if value.strip() != "–"]
    for line in PROPOS_MD.read_text(encoding="utf-8").splitlines():
        if re.match(r"\| [\w-]+ \| 0\.\d{3} \|", line):
            dataset, *values = [part.strip() for part in line.strip("|").split("|")]
            cells.append(("ProPos", dataset, [value[1:] for value in values]))
    return cells


@pytest.mark.skipif(not (METHODS_MD.is_file() and PROPOS_MD.is_file()), reason="needs ../shared/docs/")
def test_every_reported_result_has_a_config_that_quotes_it_and_reads_that_protocol():
    """Each figure of the reported-results tables (methods.md: the baselines, propos.md: ProPos) has a
    shipped config of that method on that dataset, which reads the dataset and split of the protocol
    (train+test on CIFAR and STL-10; the train images of the ImageNet subsets and Tiny-ImageNet; SCAN
    and NNM train on train and score test), and one such config quotes the three figures."""
    cells = _reported_results()
    assert len(cells) >= 50 and {row for row, _, _ in cells} == set(REPORTED_METHODS)
    missing, unquoted = [], []
    for row, column, figures in cells:
        assert len(figures) == 3, (row, column, figures)
        method, prefix = REPORTED_METHODS[row], REPORTED_DATASETS[column]
        configs = [(path, shipped_config(path)) for path in SHIPPED if path.name.startswith(prefix)]
        configs = [(path, cfg) for path, cfg in configs if cfg.method.name == method]
        if not configs:
            missing.append(f"{row} on {column}")
            continue
        for path, cfg in configs:
            data = cfg.data
            named = {"cifar10_": "cifar10", "cifar20_": "cifar100", "stl10_": "stl10"}.get(prefix, "imagefolder")
            assert data.name == named, path.name
            assert data.cifar100_superclasses or prefix != "cifar20_", path.name
            assert len(data.classes) == {"imagenet10_": 10, "imagenetdogs_": 15}.get(prefix, 0), path.name
            if method in ("scan", "nnm"):
                assert (data.split, data.resolved_eval_split) == ("train", "test"), path.name
            else:
                whole = "train+test" if prefix in ("cifar10_", "cifar20_", "stl10_") else "train"
                assert (data.split, data.resolved_eval_split) == (whole, whole), path.name
        if not any(all(re.search(rf"(?<![\d.])0?{re.escape(figure)}(?!\d)", path.read_text()) for figure in figures)
                   for path, _ in configs):
            unquoted.append(f"{row} on {column} ({'/'.join(figures)}): {', '.join(p.name for p, _ in configs)}")
    assert not missing, f"no config for: {missing}"
    assert not unquoted, f"no config quotes: {unquoted}"


# The images each full-size DEC / IDEC config trains on (methods.md's dataset protocols), by file prefix.
DEC_TRAINING_IMAGES = {"mnist70k_": 70_000, "cifar10_": 60_000, "cifar20_": 60_000, "stl10_": 13_000,
                       "imagenet10_": 13_000, "imagenetdogs_": 19_500, "tinyimagenet_": 100_000}


def test_dec_and_idec_configs_run_the_papers_iterations_on_their_dataset():
    """DEC's schedule is counted in iterations of batch 256 (methods.md): 50,000 per layer-wise pair and
    100,000 end to end; IDEC clusters for at most 20,000. Each full-size config sets those as epochs of
    its own dataset (N // 256 steps each), rounded down, rather than inheriting MNIST's."""
    checked = []
    for path in SHIPPED:
        cfg = shipped_config(path)
        prefix = next((p for p in DEC_TRAINING_IMAGES if path.name.startswith(p)), None)
        if cfg.method.name not in ("dec", "idec") or prefix is None:
            continue
        assert cfg.train.batch_size_per_rank == 256 and cfg.method.pretrain == "layerwise", path.name
        steps = DEC_TRAINING_IMAGES[prefix] // 256
        assert (cfg.method.layerwise_epochs, cfg.method.pretrain_epochs) == (50_000 // steps, 100_000 // steps), path
        if cfg.method.name == "idec":
            assert cfg.method.cluster_epochs == 20_000 // steps, path.name
        checked.append(path.name)
    assert len(checked) == 2 * len(DEC_TRAINING_IMAGES), checked
