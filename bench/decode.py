"""Decoding an image folder once for a distributed run (`data.decode_once`, `data.loader=device`):
every rank decoding every file (the baseline) against each rank decoding its share and the ranks
exchanging the shares into one copy per node in shared memory (`utils.trainer.decode_once`), in one
torchrun job, alternating.

    python bench/decode.py                       # 2,000 JPEGs of 500 x 375 at 96 px, 2 ranks
    python bench/decode.py --files 13000 --nproc 4 --threads 16

The folder is made once under --folder from the first --files CIFAR-10 JPEGs of ../shared/data
(cifar10_jpeg.npz), upscaled to --width x --height (bicubic) and saved as quality-90 JPEGs, about
the size of ImageNet's. Rank 0 prints each repeat's seconds (the slowest rank's) and the median
ratio sharded / baseline, and the node's memory that each way's copies take (the growth of the
kernel's anonymous and shared pages in /proc/meminfo while they are held). The two copies are
compared: they must be equal.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_folder(folder: Path, files: int, width: int, height: int) -> None:
    """`files` JPEGs in class folders (CIFAR-10's classes), unless the folder already holds them."""
    import io

    import numpy as np
    from PIL import Image

    from data.datasets import shared_data_dir

    if len(list(folder.rglob("*.jpg"))) == files:
        return
    source = np.load(shared_data_dir() / "cifar10_jpeg.npz")
    jpeg, offsets, labels = source["jpeg"], source["offsets"], source["y"]
    if files > len(labels):
        raise SystemExit(f"error: --files {files}: cifar10_jpeg.npz has {len(labels)} images")
    for i in range(files):
        image = Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB")
        path = folder / f"class_{labels[i]}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)


def worker(folder: str, image_size: int, repeats: int, threads: int) -> None:
    import torch

    from data.config import DataConfig
    from data.datasets import build_dataset, decode_files
    from utils import distributed as du
    from utils.trainer import decode_once

    info = du.init_distributed("cpu")
    data = build_dataset(DataConfig(name="imagefolder", root=folder, image_size=image_size), split="train")

    def slowest(seconds: float) -> float:
        return max(du.all_gather_object(seconds))

    def node_memory() -> int:
        """Bytes of the node's anonymous and shared (tmpfs) pages, read by every rank once all are here."""
        du.barrier()
        fields = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
        return sum(int(fields[name].split()[0]) * 1024 for name in ("AnonPages", "Shmem"))

    baseline, sharded, baseline_bytes, sharded_bytes = [], [], [], []
    for _ in range(repeats):
        before = node_memory()
        start = time.perf_counter()
        whole = decode_files(data, num_threads=threads)  # what every rank did before: all files, all cores
        baseline.append(slowest(time.perf_counter() - start))
        baseline_bytes.append(node_memory() - before)
        before = node_memory()
        start = time.perf_counter()
        shared, _ = decode_once(data, data, "bench", dist_info=info)
        sharded.append(slowest(time.perf_counter() - start))
        sharded_bytes.append(node_memory() - before)
        if not torch.equal(whole.images, shared.images):
            raise SystemExit(f"rank {info.rank}: the exchanged copy differs from the decoded one")
        del whole, shared
    if info.is_main:
        copy = len(data) * data.channels * image_size ** 2
        print(f"{len(data)} files at {image_size} px ({copy / 1e6:.1f} MB a copy), {info.world_size} ranks, "
              f"{os.cpu_count()} cores")
        for i, (a, b) in enumerate(zip(baseline, sharded)):
            print(f"  repeat {i}: every rank decodes all {a:6.2f} s, {baseline_bytes[i] / 1e6:7.1f} MB   "
                  f"shares + exchange {b:6.2f} s, {sharded_bytes[i] / 1e6:7.1f} MB   ratio {b / a:.2f}")
        print(f"  median: {statistics.median(baseline):.2f} s -> {statistics.median(sharded):.2f} s, "
              f"ratio {statistics.median(s / b for s, b in zip(sharded, baseline)):.2f}; node memory "
              f"{statistics.median(baseline_bytes) / 1e6:.1f} MB -> {statistics.median(sharded_bytes) / 1e6:.1f} MB")
    du.cleanup_distributed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="decoding threads of each rank in the baseline (before: every core)")
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "bench_decode_jpegs"),
                        help="where the JPEGs are made (kept, and reused by a later run of the same size)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("files", "width", "height", "image_size", "nproc", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.worker:
        from utils.distributed import exit_process

        worker(args.folder, args.image_size, args.repeats, args.threads)
        exit_process(0)  # not through the interpreter's finalization, which can abort a gloo rank (see there)
    folder = Path(args.folder) / f"{args.files}_{args.width}x{args.height}"
    make_folder(folder, args.files, args.width, args.height)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                    __file__, "--worker", "--folder", str(folder), "--image-size", str(args.image_size),
                    "--repeats", str(args.repeats), "--threads", str(args.threads)], env=env, check=True)


if __name__ == "__main__":
    main()
