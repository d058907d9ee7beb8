"""Under torchrun: torch_clustering.GaussianMixture with sharded data, for comparison with one process.

Every rank builds the same data (`make_data`) and fits on rows [SPLIT[r], SPLIT[r + 1]) only, so the
two shards differ in size.  Fits:

* "given": diagonal covariances from explicit initial parameters (rank 1 passes different ones:
  rank 0's are used);
* "random": spherical covariances from random responsibilities, with blocks of RANDOM_BLOCK rows
  (so the shard boundary falls inside a block);
* "empty": as "random" with diagonal covariances, but rank 0's shard is empty and rank 1 holds all rows;
* "kmeans": diagonal covariances initialised from sharded KMeans, run to convergence; the labels of
  the same sharded KMeans are saved, so the test can rebuild that initialisation in one process.

Each fit saves its parameters, lower-bound history, `score` on the shard (a global mean) and
`predict_proba` of the shard.  Last, rank 1 passes a NaN: both ranks must raise ValueError (neither
may hang in a collective); the messages are saved.

Usage: gmm_sharded.py OUT_DIR
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import torch_clustering.gmm as gmm_module
from torch_clustering import GaussianMixture, KMeans
from utils.distributed import exit_process

N, D, K = 1501, 5, 4
SPLIT = (0, 600, N)           # rank 0 holds 600 rows, rank 1 holds 901
RANDOM_BLOCK = 256            # 600 is not a multiple: rank 1's first rows share a block with rank 0's
SEED = 3


def make_data() -> tuple[torch.Tensor, dict]:
    """(x (N, D) float64 anisotropic overlapping blobs, initial parameters for the "given" fit)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(K, D, generator=g, dtype=torch.float64) * 3
    scales = 0.3 + 1.7 * torch.rand(K, D, generator=g, dtype=torch.float64)
    owner = torch.randint(K, (N,), generator=g)
    x = centres[owner] + scales[owner] * torch.randn(N, D, generator=g, dtype=torch.float64)
    init = {"weights": torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64),
            "means": x[torch.randperm(N, generator=g)[:K]].clone(),
            "variances": 0.5 + torch.rand(K, D, generator=g, dtype=torch.float64)}
    return x, init


def summary(gmm: GaussianMixture, shard: torch.Tensor) -> dict:
    return {"weights": gmm.weights, "means": gmm.means, "variances": gmm.variances,
            "history": gmm.lower_bound_history, "n_iter": gmm.n_iter, "converged": gmm.converged,
            "score": gmm.score(shard), "proba": gmm.predict_proba(shard)}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    gmm_module._RANDOM_BLOCK = RANDOM_BLOCK
    x, init = make_data()
    shard = x[SPLIT[rank]:SPLIT[rank + 1]]
    out = {}
    if rank == 1:    # only rank 0's initial parameters count
        init = {key: value * 2 for key, value in init.items()}
    gmm = GaussianMixture(K, covariance_type="diag", max_iter=10, tol=0.0, init=init, distributed=True)
    out["given"] = summary(gmm.fit(shard), shard)
    gmm = GaussianMixture(K, covariance_type="spherical", max_iter=10, tol=0.0, init="random", seed=SEED,
                          distributed=True)
    out["random"] = summary(gmm.fit(shard), shard)
    gmm = GaussianMixture(K, covariance_type="diag", init="k-means", seed=SEED, distributed=True)
    out["kmeans"] = summary(gmm.fit(shard), shard)
    out["kmeans"]["init_labels"] = KMeans(K, n_init=1, seed=SEED, distributed=True).fit(shard).labels
    # Rank 0 holds no rows at all.
    everything_on_1 = x[:0] if rank == 0 else x
    gmm = GaussianMixture(K, covariance_type="diag", max_iter=5, tol=0.0, init="random", seed=SEED,
                          distributed=True)
    out["empty"] = summary(gmm.fit(everything_on_1), everything_on_1)
    bad = shard.clone()
    if rank == 1:
        bad[7, 2] = float("nan")
    try:
        GaussianMixture(K, distributed=True).fit(bad)
        out["nan_error"] = None
    except ValueError as err:
        out["nan_error"] = str(err)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # the ranks tear gloo down together: one leaving early can abort the other (SIGABRT)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)  # destroys the group; not through finalization, which can abort a gloo rank (see there)
