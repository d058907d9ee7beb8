"""Benchmark torch_clustering.KMeans against scikit-learn's KMeans and faiss-cpu's Kmeans.

    python bench/kmeans.py                       # the three CPU cases, all libraries
    python bench/kmeans.py --case k100 --libs ours,faiss
    python bench/kmeans.py --case imagenet --device cuda --libs ours
    python bench/kmeans.py --case imagenet --libs ours --points 20000 --n-init 1   # CPU smoke run
    python bench/kmeans.py --case k10 --libs ours-sub-refine,faiss --refine-iter 2   # cap the refinement
    python bench/kmeans.py --seeds 0,1,2         # means over seeds: inertia differences of a few 0.01 %
                                                 # between libraries are often one seed's luck

Every library gets the same data, K, n_init=3 restarts and max_iter=100; what else each
one does is printed with the table (faiss subsamples and initialises at random by
default; it also runs every iteration, having no tolerance).  The inertia column is
recomputed here for every library's centroids on ALL points, in float64, by one
evaluator, so the figures compare like with like.  Times cover producing centroids and
the labels of every point: our `fit` and scikit-learn's `fit` return labels; for faiss
the time of `index.search` over all points is added to `train` (shown separately).

Rows "ours-sub" and "ours-sub-refine" are the documented speed option of our KMeans: fit
on a K*256 uniform subsample as faiss does (`max_points_per_centroid=256`), then only label
all points (like faiss), or also run Lloyd on all points from those centroids
(`refine_iter`), which recovers the inertia lost to subsampling.  They are skipped when
N <= K*256 (k1000), where they would equal "ours".

Data (cases k10, k100, k1000): the 60,000 MNIST training digits from
../shared/data/mnist.npz, pixels scaled to [0, 1] and centred, projected to D dimensions
by a fixed Gaussian random matrix (seed 0); for k10 the rows are L2-normalised.
Case imagenet is synthetic (no ImageNet features ship with the repository): 1,281,167
points in 256-d around 1,000 Gaussian centres, generated on the device from seed 0.

scikit-learn and faiss-cpu are benchmark-only dependencies (`pip install faiss-cpu`).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from data.datasets import shared_data_dir  # noqa: E402
from torch_clustering import KMeans  # noqa: E402
from utils import distributed as du  # noqa: E402

logger = logging.getLogger("bench.kmeans")

CASES = {
    # name: (N, D, K, L2-normalised, source)
    "k10": (60_000, 512, 10, True, "mnist"),
    "k100": (60_000, 256, 100, False, "mnist"),
    "k1000": (60_000, 128, 1000, False, "mnist"),
    "imagenet": (1_281_167, 256, 1000, False, "synthetic"),
}


def make_data(case: str, device: torch.device, points: int | None = None) -> torch.Tensor:
    """The (N, D) float32 data of `case` on `device`; `points` caps N (the first `points`
    MNIST digits, or only `points` synthetic points: not a prefix of the full case's rows)."""
    n, d, k, normalise, source = CASES[case]
    n = n if points is None else min(n, points)
    g = torch.Generator().manual_seed(0)
    if source == "mnist":
        with np.load(shared_data_dir() / "mnist.npz", allow_pickle=False) as z:
            digits = z["x_train"][:n]   # each z[...] access reads and decompresses the array again
        pixels = torch.from_numpy(digits.reshape(len(digits), -1)).float() / 255.0
        pixels = pixels - pixels.mean(0)
        proj = torch.randn(pixels.shape[1], d, generator=g) / math.sqrt(d)
        x = pixels @ proj
    else:
        gd = torch.Generator(device=device).manual_seed(0)
        centres = torch.randn(k, d, generator=gd, device=device)
        x = torch.empty((n, d), device=device)
        for s in range(0, n, 1 << 18):
            e = min(n, s + (1 << 18))
            owner = torch.randint(k, (e - s,), generator=gd, device=device)
            x[s:e] = centres[owner] + 0.5 * torch.randn(e - s, d, generator=gd, device=device)
    if normalise:
        x = torch.nn.functional.normalize(x, dim=1)
    return x.to(device).contiguous()


def inertia_f64(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> float:
    """Sum over all points of the squared distance to the nearest centroid, in float64
    with direct differences for the winner (independent of every library's own report)."""
    c = centroids.to(device=x.device, dtype=torch.float64)
    c_sq = (c * c).sum(1)
    total = 0.0
    for s in range(0, x.shape[0], chunk):
        xc = x[s:s + chunk].to(torch.float64)
        idx = torch.addmm(c_sq, xc, c.T, alpha=-2).argmin(1)
        total += float(((xc - c[idx]) ** 2).sum().item())
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(x, k, args, seed: int, subsample: int | None, refine_iter: int = 0):
    km = KMeans(k, n_init=args.n_init, max_iter=args.max_iter, tol=args.tol, seed=seed,
                max_points_per_centroid=subsample, refine_iter=refine_iter)
    sync(x.device)
    t = time.perf_counter()
    res = km.fit(x)
    sync(x.device)
    secs = time.perf_counter() - t
    what = "refinement on all points" if refine_iter else "best restart"
    note = f"n_iter {res.n_iter} ({what}), converged {res.converged}"
    return secs, res.centroids, note


def run_sklearn(x, k, args, seed: int):
    from sklearn.cluster import KMeans as SkKMeans
    xn = x.cpu().numpy()
    km = SkKMeans(k, init="k-means++", n_init=args.n_init, max_iter=args.max_iter, tol=args.tol,
                  algorithm="lloyd", random_state=seed)
    t = time.perf_counter()
    km.fit(xn)
    secs = time.perf_counter() - t
    return secs, torch.from_numpy(km.cluster_centers_), f"n_iter {km.n_iter_} (best restart)"


def run_faiss(x, k, args, seed: int, max_points_per_centroid: int | None):
    import faiss
    xn = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    kw = {} if max_points_per_centroid is None else {"max_points_per_centroid": max_points_per_centroid}
    km = faiss.Kmeans(xn.shape[1], k, niter=args.max_iter, nredo=args.n_init, seed=seed,
                      verbose=False, **kw)
    t = time.perf_counter()
    km.train(xn)
    t_train = time.perf_counter() - t
    km.index.search(xn, 1)
    secs = time.perf_counter() - t
    used = min(xn.shape[0], k * km.cp.max_points_per_centroid)
    note = f"train {t_train:.2f}s + search {secs - t_train:.2f}s; trained on {used} points"
    return secs, torch.from_numpy(km.centroids), note


SETTINGS = {
    "ours": "torch_clustering: greedy k-means++, n_init={n}, max_iter={it}, tol={tol} (sklearn rule), all points",
    "ours-sub": "torch_clustering, max_points_per_centroid=256: as above on a K*256 uniform subsample, then labels all points",
    "ours-sub-refine": "torch_clustering, max_points_per_centroid=256, refine_iter={rit}: as ours-sub, then Lloyd on all "
                       "points from those centroids until tol or {rit} iterations",
    "sklearn": "scikit-learn KMeans(algorithm='lloyd'): greedy k-means++, n_init={n}, max_iter={it}, tol={tol}",
    "faiss": "faiss Kmeans defaults: random init, nredo={n}, niter={it} (no tolerance), max_points_per_centroid=256",
    "faiss-full": "faiss Kmeans: as above with max_points_per_centroid large enough to train on all points",
}


def run_lib(lib: str, x, k, args, seed: int):
    if lib == "ours":
        return run_ours(x, k, args, seed, None)
    if lib == "ours-sub":
        return run_ours(x, k, args, seed, 256)
    if lib == "ours-sub-refine":
        return run_ours(x, k, args, seed, 256, refine_iter=args.refine_iter)
    if lib == "sklearn":
        return run_sklearn(x, k, args, seed)
    if lib == "faiss":
        return run_faiss(x, k, args, seed, None)
    if lib == "faiss-full":
        return run_faiss(x, k, args, seed, x.shape[0])
    raise SystemExit(f"unknown library {lib!r}; expected some of {list(SETTINGS)}")


def bench_case(case: str, args, device: torch.device) -> None:
    _, d, k, normalise, source = CASES[case]
    x = make_data(case, device, args.points)
    n = x.shape[0]
    what = source + (", --points" if args.points else "") + (", L2-normalised" if normalise else "")
    print(f"\n=== case {case}: {n} x {d} ({what}), K={k}, "
          f"device {device}, torch threads {torch.get_num_threads()}, seeds {args.seeds} ===", flush=True)
    libs = []
    for lib in args.libs:
        if lib in ("sklearn", "faiss", "faiss-full") and device.type != "cpu":
            continue
        if lib == "faiss-full" and n <= k * 256:
            continue   # faiss trains on all points by default here: identical to "faiss"
        if lib.startswith("ours-sub") and n <= k * 256:
            continue
        libs.append(lib)
    # Seeds outside, libraries inside: on a shared machine whose speed drifts over minutes,
    # every library then meets the same slow and fast phases.
    times = {lib: [] for lib in libs}
    inertias = {lib: [] for lib in libs}
    for seed in args.seeds:
        for lib in list(libs):
            try:
                secs, cent, note = run_lib(lib, x, k, args, seed)
            except ImportError as e:
                print(f"  {lib}: skipped ({e})")
                libs.remove(lib)
                continue
            times[lib].append(secs)
            inertias[lib].append(inertia_f64(x, cent))
            print(f"  {lib:15s} seed {seed}: {secs:8.2f} s  inertia {inertias[lib][-1]:.8g}  ({note})", flush=True)
    rows = [(lib, sum(times[lib]) / len(times[lib]), sum(inertias[lib]) / len(inertias[lib]), inertias[lib])
            for lib in libs]   # (lib, mean seconds, mean inertia, per-seed inertias)
    if not rows:
        return
    t_sk = next((r[1] for r in rows if r[0] == "sklearn"), None)
    t_fa = next((r[1] for r in rows if r[0] == "faiss"), None)
    best = min(r[2] for r in rows)
    several_seeds = len(args.seeds) > 1
    label = "mean " if several_seeds else ""
    print(f"\n  {'library':15s} {label + 'seconds':>14s} {'/sklearn':>9s} {'/faiss':>8s} "
          f"{label + 'inertia (all points)':>27s} {'vs best':>9s}" + ("   per seed vs best" if several_seeds else ""))
    for lib, secs, inertia, per_seed in rows:
        r_sk = f"{secs / t_sk:9.2f}" if t_sk else f"{'-':>9s}"
        r_fa = f"{secs / t_fa:8.2f}" if t_fa else f"{'-':>8s}"
        spread = ("   " + " ".join(f"{100 * (i / best - 1):+.3f}%" for i in per_seed)) if several_seeds else ""
        print(f"  {lib:15s} {secs:14.2f} {r_sk} {r_fa} {inertia:27.8g} {100 * (inertia / best - 1):+8.3f}%{spread}")
    print("  vs best: against the lowest mean inertia of the rows above (only the libraries run here)")
    print("  settings:")
    for lib, *_ in rows:
        print("   ", lib + ":", SETTINGS[lib].format(n=args.n_init, it=args.max_iter, rit=args.refine_iter, tol=args.tol))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="k10,k100,k1000",
                   help="comma-separated cases among " + ", ".join(CASES) + " (default: the three CPU cases)")
    p.add_argument("--libs", default="ours,ours-sub,ours-sub-refine,sklearn,faiss,faiss-full",
                   help="comma-separated among " + ", ".join(SETTINGS))
    p.add_argument("--device", default="cpu", help="device for torch_clustering (cpu or cuda)")
    p.add_argument("--n-init", type=int, default=3)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--refine-iter", type=int, default=None,
                   help="Lloyd iterations on all points for ours-sub-refine (default: --max-iter); a few "
                   "values trace its time/inertia tradeoff (include sklearn in --libs: 'vs best' compares "
                   "only the rows run)")
    p.add_argument("--points", type=int, default=None,
                   help="use only N points of each case (the first N digits, or N synthetic points): a quick "
                   "smoke run (e.g. of the imagenet case on a CPU before spending GPU time), whose figures "
                   "are not the cases' own")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; figures are means over them "
                   "(k-means++ and faiss's random init differ per seed)")
    args = p.parse_args(argv)
    if args.refine_iter is None:
        args.refine_iter = args.max_iter
    if args.refine_iter < 1:
        raise SystemExit(f"--refine-iter must be >= 1, got {args.refine_iter} (ours-sub is the row without refinement)")
    # Every argument is checked before the first case runs (each can take minutes).
    args.libs = args.libs.split(",")
    for lib in args.libs:
        if lib not in SETTINGS:
            raise SystemExit(f"unknown library {lib!r}; expected some of {list(SETTINGS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    cases = args.case.split(",")
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; expected one of {list(CASES)}")
        k = CASES[case][2]
        if args.points is not None and args.points < k:
            raise SystemExit(f"--points {args.points} is below case {case}'s K={k}: k-means needs at least K points")
    try:
        device = du.check_device(args.device, "--device")
    except (ValueError, du.DeviceUnavailableError) as exc:
        raise SystemExit(str(exc)) from None
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    for case in cases:
        bench_case(case, args, device)


if __name__ == "__main__":
    main()
