"""Peak memory of loading a dataset into memory: the loader (data.datasets: each file read in blocks
straight into one channels-first tensor, the channel statistics in 8 MB chunks) against the loader
before, each in a process of its own, alternating.

    python bench/load_memory.py                          # STL-10: 13,000 labelled + 10,000 unlabeled images
    python bench/load_memory.py --unlabeled 100000       # STL-10's real counts (3.1 GB)
    python bench/load_memory.py --format npz             # an npz of 13,000 64 x 64 RGB images (x_train, x_test)

STL-10 (`data.name=stl10`, with the unlabeled images): before, each binary was read whole, transposed
and the parts concatenated, the statistics taken in chunks of 4,096 images. npz (`data.name=npz`, whose
statistics cover every image of the file): before, each array was loaded whole, transposed into a copy
and concatenated with the others, for the statistics and again for the images.

The files are random pixels in the format's layout, made once under --folder. Each child reports the
growth of its peak resident memory (ru_maxrss) over the load, after its imports; the table gives
them as multiples of the images' bytes, with the seconds, and checks the two tensors are equal.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGE_BYTES = 3 * 96 * 96


def make_binaries(base: Path, labeled: int, unlabeled: int) -> None:
    """train/test/unlabeled _X.bin (and the label files) of random pixels, unless they are there."""
    counts = {"train": labeled * 5 // 13, "test": labeled - labeled * 5 // 13, "unlabeled": unlabeled}
    if all((base / f"{part}_X.bin").is_file() and (base / f"{part}_X.bin").stat().st_size == n * IMAGE_BYTES
           for part, n in counts.items()):
        return
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for part, n in counts.items():
        with open(base / f"{part}_X.bin", "wb") as file:
            for start in range(0, n, 1000):
                rng.integers(0, 256, (min(1000, n - start), IMAGE_BYTES), dtype=np.uint8).tofile(file)
        if part != "unlabeled":
            rng.integers(1, 11, n).astype(np.uint8).tofile(base / f"{part}_y.bin")


def load_whole_files(base: Path):
    """The loader before: each file read whole, transposed into a contiguous copy, the parts concatenated;
    the labelled images' channel statistics in float64 chunks of 4,096 images."""
    import torch

    from data.datasets import channel_stats

    images, labeled = [], 0
    for part in ("train", "test", "unlabeled"):
        pixels = np.fromfile(base / f"{part}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        images.append(np.ascontiguousarray(pixels))
        labeled += len(pixels) if part != "unlabeled" else 0
    tensor = torch.from_numpy(np.concatenate(images))
    channel_stats(tensor[:labeled], chunk_bytes=4096 * IMAGE_BYTES * 8)
    return tensor


NPZ_SIDE = 64


def make_npz(path: Path, count: int) -> None:
    """An uncompressed npz of `count` random 64 x 64 RGB images (N, H, W, C), 5/6 of them in x_train and the
    rest in x_test, with labels, unless it is there."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_train = count * 5 // 6
    images = rng.integers(0, 256, (count, NPZ_SIDE, NPZ_SIDE, 3), dtype=np.uint8)
    np.savez(path, x_train=images[:n_train], y_train=rng.integers(0, 10, n_train, dtype=np.uint8),
             x_test=images[n_train:], y_test=rng.integers(0, 10, count - n_train, dtype=np.uint8))


def load_npz_whole_arrays(path: Path):
    """The npz loader before: the statistics of x_train and x_test loaded whole, transposed and concatenated,
    then the images the same way again."""
    import torch

    from data.datasets import channel_stats

    def to_nchw(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))

    with np.load(path) as archive:
        channel_stats(torch.cat([to_nchw(archive[key]) for key in ("x_train", "x_test")]))
        return to_nchw(np.concatenate([archive["x_train"], archive["x_test"]]))


def child(way: str, root: str) -> None:
    from data.config import DataConfig
    from data.datasets import build_train_dataset

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if way == "loader":
        cfg = (DataConfig(name="npz", root=root, split="train+test") if root.endswith(".npz")
               else DataConfig(name="stl10", root=root, stl10_unlabeled=True))
        images = build_train_dataset(cfg).images
    elif root.endswith(".npz"):
        images = load_npz_whole_arrays(Path(root))
    else:
        images = load_whole_files(Path(root) / "stl10_binary")
    seconds = time.perf_counter() - start
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"bytes": images.numel(), "growth": growth, "seconds": seconds, "digest": images_digest(images)}))


def images_digest(images) -> int:
    """A checksum of every 97th image and the last, position-weighted, so that pixels in the wrong places
    (a transposition) change it too."""
    import torch

    sample = torch.cat([images[::97], images[-1:]]).reshape(-1).to(torch.int64)
    return int((sample * (torch.arange(sample.numel()) % 251 + 1)).sum())


def print_medians(runs: dict[str, list[dict]], size: int, labels: dict[str, str], measure: str,
                  ratio: str) -> dict[str, float]:
    """A line per way of `labels` (in its order): the median of the runs' "growth" in multiples of `size`
    bytes and of their "seconds"; then the ratio of the last way's growth to the first's. Returns the
    medians of the growth per way, in multiples of `size`."""
    medians = {}
    width = max(map(len, labels.values()))
    for way, label in labels.items():
        medians[way] = statistics.median(run["growth"] for run in runs[way]) / size
        seconds = statistics.median(run["seconds"] for run in runs[way])
        print(f"  {label:{width}s} {measure} {medians[way]:5.2f}x the images   {seconds:6.2f} s")
    first, last = list(labels)[0], list(labels)[-1]
    print(f"  ratio, {ratio}: {medians[last] / medians[first]:.2f}")
    return medians


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=("stl10", "npz"), default="stl10")
    parser.add_argument("--labeled", type=int, default=13000,
                        help="train + test images (5:8 as STL-10's; 5:1 in the npz)")
    parser.add_argument("--unlabeled", type=int, default=10000, help="STL-10's unlabeled images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "bench_load_memory"),
                        help="where the binaries are made (kept, and reused by a later run of the same size)")
    parser.add_argument("--child", choices=("loader", "whole"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.folder)
        return
    for name, least in (("labeled", 2), ("unlabeled", 0), ("repeats", 1)):
        if getattr(args, name) < least:
            raise SystemExit(f"error: --{name} must be >= {least}, got {getattr(args, name)}")
    if args.format == "npz":
        root = Path(args.folder) / f"images_{args.labeled}.npz"
        make_npz(root, args.labeled)
        what = f"{args.labeled} images in an npz"
    else:
        root = Path(args.folder) / f"{args.labeled}_{args.unlabeled}"
        make_binaries(root / "stl10_binary", args.labeled, args.unlabeled)
        what = f"{args.labeled + args.unlabeled} STL-10 images"
    runs: dict[str, list[dict]] = {"loader": [], "whole": []}
    for _ in range(args.repeats):
        for way in runs:
            out = subprocess.run([sys.executable, __file__, "--child", way, "--folder", str(root)],
                                 capture_output=True, text=True, check=True).stdout
            runs[way].append(json.loads(out.strip().splitlines()[-1]))
    if len({run["digest"] for way in runs.values() for run in way}) != 1:
        raise SystemExit("error: the two ways loaded different images")
    size = runs["loader"][0]["bytes"]
    print(f"{what}, {size / 1e6:.1f} MB; medians of {args.repeats}")
    print_medians(runs, size, {"whole": "the loader before", "loader": "the loader, in blocks"}, "peak memory",
                  "the loader / the loader before")


if __name__ == "__main__":
    main()
