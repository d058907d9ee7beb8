"""Under torchrun: torch_clustering.KMeans in its two distributed modes, for comparison with one process.

Every rank builds the same data (`make_data`) and then sees only what its mode gives it:

* "sharded" (``distributed=True``): rank r gets rows [SPLIT[r], SPLIT[r + 1]) of the data, so the two
  shards differ in size.  Three fits: from explicit initial centroids, two of them far from every point
  (two clusters are empty after the first assignment and are re-seeded with planted outliers, one on
  each rank), from the first K_MANY rows as initial centroids, and with k-means++ initialised on a
  sample of at most SAMPLE rows; these keep Lloyd's pruning bounds on both ranks.  Then a fit on a
  subsample of K * 50 rows drawn from both shards that labels every row, and the first fit again
  with rank 0 on the dense path (no bounds) and rank 1 on the bounded one.
* "replicated": every rank gets all rows and the three restarts are split over the ranks.

It also records the absolute tolerance and the sum of squared norms that the sharded fit derives
from the two shards' statistics (of the data offset by 1e4, in float32).

Each rank saves what it got to OUT_DIR/rank{r}.pt, together with the largest number of rows any
`all_gather_rows` call gathered on it (the k-means++ sample must stay bounded).

Usage: kmeans_sharded.py OUT_DIR
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import torch_clustering.kmeans as kmeans_module
from torch_clustering import KMeans
from torch_clustering._dist import Comm
from torch_clustering.kmeans import _prepare
from utils.distributed import exit_process

N, D, K = 1501, 8, 12
SPLIT = (0, 600, N)           # rank 0 holds 600 rows, rank 1 holds 901
OUTLIERS = (100, 1000)        # one planted outlier in each shard
FAR = (0, 5)                  # initial centroids placed far from every point
SAMPLE = 400                  # k-means++ sample size in sharded mode
K_MANY = 240                  # enough clusters for grouped bounds and exact-distance tightening


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (N, D) float64 overlapping blobs with two outliers, explicit initial centroids (K, D),
    well-separated blobs (N, D) for k-means++)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(K, D, generator=g, dtype=torch.float64) * 3
    x = centres[torch.randint(K, (N,), generator=g)] + torch.randn(N, D, generator=g, dtype=torch.float64)
    for i, row in enumerate(OUTLIERS):
        x[row] = 40.0 * (i + 1)
    init = x[torch.randperm(N, generator=g)[:K]].clone()
    for i, row in enumerate(FAR):
        init[row] = -1000.0 * (i + 1)
    separated = centres * 4
    blobs = (separated[torch.randint(K, (N,), generator=g)]
             + 0.5 * torch.randn(N, D, generator=g, dtype=torch.float64))
    return x, init, blobs


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    largest_gather = [0]
    plain_gather = Comm.all_gather_rows

    def counting_gather(self, t):
        out = plain_gather(self, t)
        largest_gather[0] = max(largest_gather[0], out.shape[0])
        return out

    Comm.all_gather_rows = counting_gather
    x, init, blobs = make_data()
    lo, hi = SPLIT[rank], SPLIT[rank + 1]
    out = {}
    # Shards this small would take Lloyd's dense path; these fits are about the pruning bounds
    # (grouped bounds, tightening, bounds reset after a re-seeding), so keep them.
    kmeans_module._DENSE_MAX_WORK = 0
    res = KMeans(K, init=init, max_iter=30, tol=0.0, distributed=True).fit(x[lo:hi])
    out["init"] = res
    res = KMeans(K_MANY, init=x[:K_MANY], max_iter=8, tol=0.0, distributed=True).fit(x[lo:hi])
    out["many"] = res
    res = KMeans(K, n_init=2, seed=3, max_iter=100, distributed=True, init_sample_size=SAMPLE).fit(blobs[lo:hi])
    out["kpp"] = res
    out["kpp_largest_gather"] = largest_gather[0]
    res = KMeans(K, n_init=3, seed=5, max_iter=100, distributed="replicated").fit(x)
    out["replicated"] = res
    out["subsample"] = KMeans(K, n_init=2, seed=1, max_points_per_centroid=50, distributed=True).fit(x[lo:hi])
    # Rank 0 recomputes every distance (as a small shard does), rank 1 keeps bounds: the paths
    # share their collectives, so the fit must still equal one process's.
    kmeans_module._DENSE_MAX_WORK = (1 << 62) if rank == 0 else 0
    out["mixed"] = KMeans(K, init=init, max_iter=30, tol=0.0, distributed=True).fit(x[lo:hi])
    # The tolerance and the sum of squared norms combine the two shards' statistics (each shard
    # shifted by its own first row): they must be those of all the data.  Offset data make any
    # cancellation visible.
    prep = _prepare((x[lo:hi] + 1e4).float(), N, 1e-4, Comm(True), 128, False)
    out["prepare"] = {"tol_abs": prep.tol_abs, "sq_total": prep.sq_total}
    torch.save({name: (vars(r) if hasattr(r, "centroids") else r) for name, r in out.items()},
               Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # the ranks tear gloo down together: one leaving early can abort the other (SIGABRT)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)  # destroys the group; not through finalization, which can abort a gloo rank (see there)
