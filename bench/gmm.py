"""Benchmark torch_clustering.GaussianMixture against scikit-learn's GaussianMixture.

    python bench/gmm.py                          # K=100 on 60,000 x 256, diag and spherical
    python bench/gmm.py --k 10 --iters 20 --rounds 5

Data: the 60,000 MNIST training digits projected to 256 dimensions, as case k100 of
bench/kmeans.py (../shared/data/mnist.npz).  Both libraries start from the same
parameters (K random rows as means, equal weights, the mean per-feature variance of x
as every variance) and run exactly --iters EM iterations (tol=0).  Rounds alternate the
two libraries, so a drift of this machine's speed hits both; the table shows medians of
the seconds, the ratio, and each library's final lower bound (mean log-likelihood per
point).  Ours runs in float32 (x's dtype), scikit-learn in float64.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kmeans import make_data  # noqa: E402  (bench/kmeans.py: the k100 data)
from torch_clustering import GaussianMixture  # noqa: E402


def initial_parameters(x: np.ndarray, k: int, covariance_type: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = x[rng.choice(len(x), k, replace=False)].astype(np.float64)
    var = float(x.var(0).mean())
    variances = np.full((k, x.shape[1]) if covariance_type == "diag" else (k,), var)
    return np.full(k, 1.0 / k), means, variances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--covariance-types", default="diag,spherical")
    args = parser.parse_args()
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    x = make_data("k100", torch.device("cpu"))
    xn = x.numpy().astype(np.float64)
    print(f"data: {tuple(x.shape)} MNIST projection, K={args.k}, {args.iters} EM iterations, "
          f"{args.rounds} alternating rounds, {torch.get_num_threads()} threads")
    print(f"{'covariance':>10}  {'ours s':>8}  {'sklearn s':>9}  {'ours/sklearn':>12}  "
          f"{'ours lower bound':>16}  {'sklearn lower bound':>19}")
    for cov in args.covariance_types.split(","):
        w, mu, var = initial_parameters(xn, args.k, cov)
        times: dict[str, list[float]] = {"ours": [], "sklearn": []}
        bounds = {}
        for _ in range(args.rounds):
            t = time.perf_counter()
            ours = GaussianMixture(args.k, covariance_type=cov, max_iter=args.iters, tol=0.0,
                                   init={"weights": w, "means": mu, "variances": var}).fit(x)
            times["ours"].append(time.perf_counter() - t)
            bounds["ours"] = ours.lower_bound
            sk = SkGaussianMixture(args.k, covariance_type=cov, max_iter=args.iters, tol=0.0,
                                   weights_init=w, means_init=mu, precisions_init=1.0 / var)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")      # "did not converge": the iterations are fixed
                sk.fit(xn)
            times["sklearn"].append(time.perf_counter() - t)
            bounds["sklearn"] = sk.lower_bound_
        ours_s, sk_s = statistics.median(times["ours"]), statistics.median(times["sklearn"])
        print(f"{cov:>10}  {ours_s:8.2f}  {sk_s:9.2f}  {ours_s / sk_s:12.2f}  "
              f"{bounds['ours']:16.6f}  {bounds['sklearn']:19.6f}", flush=True)


if __name__ == "__main__":
    main()
