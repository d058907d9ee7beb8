"""A node's memory while the ranks of a distributed run load the sets held in memory (`main.build_datasets`):
one rank per node reads them straight into the copies the node's ranks share (`utils.trainer.load_once_per_node`),
against two earlier ways: every rank loading them and then the node keeping one copy, and one rank loading them
into memory of its own and then copying them into the shared copies. Each way runs in a torchrun job of its own,
alternating.

    python bench/load_node.py                  # 2 ranks, STL-10's layout, 13,000 + 10,000 images (636 MB)
    python bench/load_node.py --ranks 4 --unlabeled 100000

The binaries are random pixels in STL-10's layout, made once under --folder (bench/load_memory.py's).
This process samples the node's anonymous and shared pages (AnonPages + Shmem in /proc/meminfo) every
10 ms; a figure is the highest sample while the ranks load, less the last sample before they start
(after their imports), as multiples of the bytes of the images the node keeps (the training set and the
evaluated set: 1.00x is the least a node can hold). Every rank's copy is checked equal.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.load_memory import images_digest, make_binaries, print_medians  # noqa: E402


def node_memory() -> int:
    """The node's anonymous and shared-memory pages, in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[name].split()[0]) * 1024 for name in ("AnonPages", "Shmem"))


def child(way: str, root: str, out: str) -> None:
    """One rank: load (the launcher's way; one rank, then a copy; or every rank, then one copy kept), and
    write OUT/rankR.json with the load's start and end times, a digest of the images and their bytes."""
    import torch

    import main as launcher
    from data.datasets import build_eval_dataset, build_train_dataset
    from utils import distributed as du
    from utils.config import load_config
    from utils.trainer import load_once_per_node  # imported before the start, as every way's imports

    info = du.init_distributed("cpu", threads_per_rank=1)
    cfg = load_config(REPO / "config" / "mnist_cnn_propos.yml",
                      ["data.name=stl10", f"data.root={root}", "data.stl10_unlabeled=true"])
    du.barrier()
    start = time.time()
    if way == "once":
        built = launcher.build_datasets(cfg)
        sets = [built.train, built.eval]
    elif way == "copy":  # builds that read into memory of their own: the node's first rank copies it into a shared one
        sets = load_once_per_node([lambda _: build_train_dataset(cfg.data), lambda _: build_eval_dataset(cfg.data)])
    else:  # every rank loads both sets, then the node's first rank copies each into a shared copy
        sets = []
        for data in [build_train_dataset(cfg.data), build_eval_dataset(cfg.data)]:
            shared, sharers = du.node_shared_empty(tuple(data.images.shape), torch.uint8)
            if info.rank == sharers[0]:
                shared.copy_(data.images)
            du.barrier()
            sets.append(shared)
        sets = [SimpleNamespace(images=images) for images in sets]
    du.barrier()
    end = time.time()
    time.sleep(0.1)  # the digests' temporaries come after the sampled window (which ends 50 ms after `end`)
    Path(out, f"rank{info.rank}.json").write_text(json.dumps({
        "start": start, "end": end, "digest": [images_digest(data.images) for data in sets],
        "bytes": sum(data.images.numel() for data in sets)}))
    du.barrier()
    du.cleanup_distributed()


def run_job(way: str, root: Path, ranks: int) -> dict:
    """One torchrun job of `ranks` ranks loading `way`; its peak node-memory growth and seconds."""
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), node_memory()))
            time.sleep(0.01)

    with tempfile.TemporaryDirectory() as out:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                        __file__, "--child", way, "--folder", str(root), "--out", out],
                       check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        done.set()
        sampler.join()
        results = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    base = [m for t, m in samples if t <= start][-1]
    peak = max(m for t, m in samples if start <= t <= end + 0.05)
    return {"growth": peak - base, "seconds": end - start, "digests": {tuple(r["digest"]) for r in results},
            "bytes": results[0]["bytes"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--labeled", type=int, default=13000, help="train + test images (5:8, as STL-10's)")
    parser.add_argument("--unlabeled", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "bench_load_memory"),
                        help="where the binaries are made (kept, and reused by a later run of the same size)")
    parser.add_argument("--child", choices=("once", "copy", "every"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from utils.distributed import exit_process

        child(args.child, args.folder, args.out)
        exit_process(0)  # not through the interpreter's finalization, which can abort a gloo rank (see there)
    for name, least in (("ranks", 2), ("labeled", 2), ("unlabeled", 0), ("repeats", 1)):
        if getattr(args, name) < least:
            raise SystemExit(f"error: --{name} must be >= {least}, got {getattr(args, name)}")
    root = Path(args.folder) / f"{args.labeled}_{args.unlabeled}"
    make_binaries(root / "stl10_binary", args.labeled, args.unlabeled)
    runs: dict[str, list[dict]] = {"every": [], "copy": [], "once": []}
    for _ in range(args.repeats):
        for way in runs:
            runs[way].append(run_job(way, root, args.ranks))
    if len(set().union(*(run["digests"] for way in runs.values() for run in way))) != 1:
        raise SystemExit("error: the ranks' copies differ")
    size = runs["once"][0]["bytes"]
    print(f"{args.labeled + args.unlabeled} STL-10 images to train on, {args.labeled} to evaluate: "
          f"{size / 1e6:.1f} MB, {args.ranks} ranks on one node; medians of {args.repeats}")
    medians = print_medians(runs, size, {"every": "every rank loads, one kept", "copy": "one rank loads, then copies",
                                         "once": "one rank reads into it"}, "node peak", "one rank reads / every rank")
    print(f"  ratio, one rank reads / one rank copies: {medians['once'] / medians['copy']:.2f}")


if __name__ == "__main__":
    main()
