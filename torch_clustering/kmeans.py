"""k-means (Lloyd's algorithm) in pure PyTorch, on one device or across ranks.

Algorithm
---------
Each restart runs Lloyd iterations: assign every point to its nearest centroid, then
move each centroid to the mean of its points.  Results are those of plain Lloyd; three
things make it fast:

* Distances come from one matrix product per chunk of rows, ``|c|^2 - 2 x.c`` (the
  ``|x|^2`` term is constant per row), so memory is O(chunk_size x K) and the work is a
  GEMM.  Squared norms of x are computed once per `fit` and shared by all restarts.
* Hamerly's bounds (G. Hamerly, "Making k-means even faster", SDM 2010), with the
  lower bound split by groups of centroids as in Yinyang k-means (Y. Ding et al., ICML
  2015): every point keeps an upper bound on the distance to its own centroid and, for
  each of G <= 32 groups of nearby centroids, a lower bound on the distance to any
  other centroid of that group; the upper bound grows by how far its centroid moved,
  a group's bound shrinks by the largest move in the group.  A point whose upper bound
  is below ``max(smallest group bound, half the distance from its centroid to the
  nearest other centroid)`` provably keeps its label and is skipped.  For K >= 200 the
  upper bound of the remaining points is first tightened to the exact distance (O(D)
  per point), which settles many more.  Only the rows left are gathered and sent
  through the GEMM (or, when they are most of the rows, one contiguous pass is made).
  This is exact: it changes how much is computed, not the result (up to float rounding
  at exact ties).  Bounds take O(N G) memory.  A small fit (N K D <= 2^26 on the rank,
  e.g. faiss-style subsamples) keeps no bounds and recomputes every distance, which is
  cheaper there than the bookkeeping.
* Per-cluster sums are kept in float64 and updated only for points that changed label,
  and the inertia of each iteration is computed from them in closed form,
  ``sum|x|^2 - 2 sum_j c_j.S_j + sum_j n_j |c_j|^2``, instead of from every distance.

Semantics follow scikit-learn's ``KMeans(algorithm="lloyd")``: an iteration assigns
labels with the current centroids, then updates them; it stops on strict convergence
(no label changed) or when the total squared centroid shift is at most
``tol * mean(var(x, axis=0))``; if it did not stop strictly, a final assignment makes the
labels match the returned centroids.  ``inertia_history[t]`` is the inertia of the
assignment made at iteration t, measured against the centroids it was made with.

Empty clusters
--------------
When a cluster has no point after an assignment, it is re-seeded with the point
farthest from its own centroid (several empty clusters take the farthest points in
order, largest distance to the lowest empty cluster index).  Points of clusters that
would become empty themselves are never taken.  The moved point becomes the new
centroid exactly.

Metrics
-------
``metric="euclidean"`` minimises squared Euclidean distances.  ``metric="cosine"`` is
spherical k-means: rows of x are L2-normalised, centroids are re-normalised after every
update, and assignment maximises cosine similarity; its inertia is
``sum_i (1 - cos(x_i, c_{label_i}))``.

Distributed modes (``distributed=``)
------------------------------------
* ``False``: one process, x is all the data.
* ``True`` or ``"sharded"``: torch.distributed is initialised and every rank passes its
  own shard of the data (shards may differ in size, even be empty).  Each Lloyd step
  all-reduces per-cluster sums, counts and the number of changed labels (one float64
  buffer of (K + 1) x (D + 1)), so every rank holds identical centroids and no rank ever
  holds the whole data.  ``labels`` are those of the rank's own shard; ``inertia`` is
  global.  k-means++ / random initialisation runs, identically on every rank, on a
  bounded uniform sample gathered from all shards (``init_sample_size`` points, by
  default ``max(64 K, 16384)``), never on the gathered data.  All restarts run on all
  ranks.
* ``"replicated"``: every rank passes the same full x.  The ``n_init`` restarts are split
  over ranks (restart r runs on rank ``r % world_size``), the one with the lowest
  inertia wins and its centroids, labels and history are broadcast to all ranks.  A
  restart's random draws depend only on (seed, restart index), so the result is that
  of one process running all ``n_init`` restarts.

Precision and devices
---------------------
Everything runs on x's device; results have x's dtype.  Distances, bounds and
centroids are computed in float32 (float64 when x is float64); half-precision inputs are
multiplied in half on a GPU and upcast per chunk on the CPU; sums are accumulated in
float64.  A seed gives the same result on a given device.  On CUDA, `index_add_` uses
atomics unless ``torch.use_deterministic_algorithms(True)`` is set; float64 sums make a
difference in the float32 centroids very unlikely, but only that setting guarantees it.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from ._assign import (Assigner, compute_dtype_for, default_chunk_size, exact_sq_dist,
                      group_layout, group_order, half_min_center_dist, row_sq_norms)
from ._dist import Comm
from ._init import kmeans_plusplus, random_init, restart_generator

logger = logging.getLogger(__name__)

_METRICS = ("euclidean", "cosine")
_INITS = ("k-means++", "random")
# float64 copies of x are made this many elements at a time: small enough to stay in
# cache (a 245 MB float64 copy of a chunk is ~10x slower than 2 MB pieces).
_F64_ELEMS = 1 << 18
# Elements per chunk of the statistics pass in `_prepare` (4 MB of float32; chunks half
# or twice this size were 25-40 % slower, measured on 60,000 x 512).
_STATS_ELEMS = 1 << 20
# Below this K, tightening a bound (a gather and a D-long difference) settles too few
# points to pay for itself against the nearest-centroid search (measured on MNIST
# features: it settles ~30% of the candidates).
_TIGHTEN_MIN_K = 200
# Fraction of rows to recompute above which one contiguous pass beats gathering them:
# the search is memory-bound for small K (a gather reads and writes each row once more)
# and compute-bound for large K.
_MEMORY_BOUND_K = 32
_FULL_PASS_SMALL_K = 0.3
_FULL_PASS_LARGE_K = 0.8
_MODES = {False: "local", True: "sharded", "sharded": "sharded", "replicated": "replicated"}
# A restart whose full pass costs at most this many multiply-adds (N_local x K x D) keeps
# no bounds and recomputes every distance each iteration: on small data the bookkeeping
# (about 20 small tensor operations per iteration) costs more than the products it saves.
# Whole fits (3 restarts, 2-core AMD EPYC), bounds -> dense: 2,560 x 512, K=10: 134 ->
# 90 ms; 10,000 x 512, K=10: 507 -> 425 ms; 2,560 x 256, K=100: 247 -> 195 ms; but
# 20,000 x 512, K=10 (102 M): 487 -> 585 ms and 5,000 x 128, K=30 (19 M): 146 -> 159 ms.
_DENSE_MAX_WORK = 1 << 26


@dataclass
class KMeansResult:
    """Outcome of `KMeans.fit`.

    Attributes:
        centroids: (K, D) tensor, x's dtype and device (unit rows for the cosine metric).
        labels: (N,) int64 nearest-centroid index of every row of x (of the rank's own
            shard in sharded mode).
        inertia: sum of squared distances of the points to their centroid (global in
            sharded mode; ``sum(1 - cos)`` for the cosine metric).
        n_iter: Lloyd iterations run by the kept restart.
        converged: whether it stopped before `max_iter` (strictly or by `tol`).
        inertia_history: inertia of each iteration's assignment (length `n_iter`).
        restart: index of the kept restart.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int
    converged: bool
    inertia_history: list[float] = field(default_factory=list)
    restart: int = 0


@dataclass
class _Data:
    """Training data prepared once per fit and shared by all restarts."""

    x: torch.Tensor          # (N_local, D), unit rows for the cosine metric
    x_sq: torch.Tensor       # (N_local,) squared norms, compute dtype
    sq_total: float          # global sum of x_sq, float64
    n_total: int             # global number of rows
    tol_abs: float           # tol * mean per-feature variance
    comm: Comm               # collectives for Lloyd (inactive unless sharded)
    chunk: int
    cosine: bool


class _Lloyd:
    """One restart of Lloyd's algorithm with pruning bounds.

    Internally the centroids are permuted into spatially compact groups (see
    `group_order`); `outputs` maps centroids and labels back to the caller's order.
    """

    def __init__(self, data: _Data, c0: torch.Tensor) -> None:
        self.d = data
        self.k, self.dim = c0.shape
        self.groups, self.group_size = group_layout(self.k)
        self.perm = group_order(c0, self.groups, self.group_size)   # internal -> caller index
        self.c = c0.index_select(0, self.perm)                      # (K, D) compute dtype
        dev = data.x.device
        self.sums = torch.zeros((self.k, self.dim), dtype=torch.float64, device=dev)
        self.counts = torch.zeros(self.k, dtype=torch.float64, device=dev)
        self.n_changed = 0
        self.assigner = Assigner(data.x, data.x_sq, data.chunk)
        self.dense = data.x.shape[0] * self.k * self.dim <= _DENSE_MAX_WORK

    # -- assignment ---------------------------------------------------------------------
    def _first_pass(self) -> None:
        """Full assignment from the initial centroids; builds labels, bounds and sums."""
        self.assigner.set_centroids(self.c)
        labels, d1, d2 = self.assigner.nearest(None, second=not self.dense)
        self.labels = labels
        if not self.dense:
            self.upper, self.lower = d1.sqrt_(), d2.sqrt_()     # lower: (N, G)
        x, ch = self.d.x, _f64_rows(self.d.x)
        for s in range(0, x.shape[0], ch):
            self.sums.index_add_(0, labels[s:s + ch], x[s:s + ch].to(torch.float64))
        self.counts += torch.bincount(labels, minlength=self.k).to(torch.float64)

    def _bounded_pass(self) -> None:
        """Assignment that recomputes distances only where the bounds cannot rule out a
        label change (everywhere, in one contiguous pass, for a dense restart)."""
        x, c, ch = self.d.x, self.c, self.d.chunk
        labels = self.labels
        self.n_changed = 0
        n = x.shape[0]
        if self.dense:
            cand = None
        else:
            upper, lower = self.upper, self.lower
            bound = torch.maximum(half_min_center_dist(c, ch).index_select(0, labels), lower.amin(1))
            cand = (upper > bound).nonzero().squeeze(1)
            if cand.numel() and self.k >= _TIGHTEN_MIN_K:
                # Tighten the (loose) upper bound with the exact distance: O(D) per point,
                # and it settles many candidates without the O(K D) search.  For small K the
                # search costs about the same as this gather, so it is skipped there.
                exact = exact_sq_dist(self.assigner, c, labels, cand).sqrt_()
                upper[cand] = exact
                cand = cand[exact > bound[cand]]
            if not cand.numel():
                return
            # Gathering rows costs a copy; past some fraction a contiguous pass over all
            # rows is cheaper (and leaves every bound tight).
            if cand.numel() > n * (_FULL_PASS_SMALL_K if self.k < _MEMORY_BOUND_K else _FULL_PASS_LARGE_K):
                cand = None
        self.assigner.set_centroids(c)
        if cand is None:
            new, d1, d2 = self.assigner.nearest(None, second=not self.dense)
            if not self.dense:
                self.upper, self.lower = d1.sqrt_(), d2.sqrt_()
            rows = (new != labels).nonzero().squeeze(1)
            new = new[rows]
        else:
            new, d1, d2 = self.assigner.nearest(cand)
            upper[cand] = d1.sqrt_()
            lower[cand] = d2.sqrt_()
            moved = new != labels[cand]
            rows = cand[moved]
            new = new[moved]
        if rows.numel():
            self._move(rows, labels[rows], new)
            self.n_changed = rows.numel()

    def _move(self, rows: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
        """Relabel x[rows] from `old` to `new` and update the local float64 sums."""
        x, ch = self.d.x, _f64_rows(self.d.x)
        for s in range(0, rows.shape[0], ch):
            xr = x.index_select(0, rows[s:s + ch]).to(torch.float64)
            self.sums.index_add_(0, new[s:s + ch], xr)
            self.sums.index_add_(0, old[s:s + ch], xr, alpha=-1)
        self.counts += (torch.bincount(new, minlength=self.k)
                        - torch.bincount(old, minlength=self.k)).to(torch.float64)
        self.labels[rows] = new

    # -- reductions -------------------------------------------------------------------------
    def _reduce(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Global (sums (K, D), counts (K,), number of changed labels), one all-reduce."""
        comm = self.d.comm
        if not comm.active:
            return self.sums, self.counts, self.n_changed
        buf = torch.empty((self.k + 1, self.dim + 1), dtype=torch.float64, device=self.sums.device)
        buf[: self.k, : self.dim] = self.sums
        buf[: self.k, self.dim] = self.counts
        buf[self.k].zero_()
        buf[self.k, 0] = self.n_changed
        comm.sum_(buf)
        return buf[: self.k, : self.dim], buf[: self.k, self.dim], int(buf[self.k, 0].item())

    def _inertia(self, sums: torch.Tensor, counts: torch.Tensor) -> float:
        """Inertia of the current labels against the current centroids, from the sums."""
        c = self.c.to(torch.float64)
        dot = (c * sums).sum()
        if self.d.cosine:
            val = self.d.n_total - dot
        else:
            val = self.d.sq_total - 2 * dot + (counts * (c * c).sum(1)).sum()
        return max(float(val.item()), 0.0)

    # -- empty clusters -----------------------------------------------------------------
    def _relocate(self, empty: list[int], counts: torch.Tensor) -> torch.Tensor:
        """Re-seed the empty clusters with the points farthest from their centroids.

        Returns the local rows that were moved (their bounds are reset by the caller).
        """
        x, comm, n_empty = self.d.x, self.d.comm, len(empty)
        dev = x.device
        dist = exact_sq_dist(self.assigner, self.c, self.labels, None).to(torch.float64)
        # Taking the last point of a cluster would just move the hole elsewhere.
        dist = torch.where(counts.index_select(0, self.labels) >= 2, dist, -1.0)
        # Every rank offers its m farthest points.  A cluster may not give away its last
        # point, so some offers can be refused; then m doubles until every empty cluster
        # is served or no rank has more points to offer (every rank sees the same offers,
        # so all make the same choice and leave the loop together).
        m = n_empty
        while True:
            packed = torch.full((3, m), -1.0, dtype=torch.float64, device=dev)
            packed[0] = -math.inf
            k_loc = min(m, x.shape[0])
            if k_loc:
                vals, idx = dist.topk(k_loc)
                packed[0, :k_loc] = vals
                packed[1, :k_loc] = idx.to(torch.float64)
                packed[2, :k_loc] = self.labels.index_select(0, idx).to(torch.float64)
            cands = []
            exhausted = True
            for rank, part in enumerate(comm.all_gather(packed)):
                rows = part.T.tolist()
                exhausted &= not rows[-1][0] >= 0         # this rank offered all it had
                for j, (val, idx, lab) in enumerate(rows):
                    cands.append((-val, rank, j, int(idx), int(lab)))
            remaining = counts.tolist()
            taken = []
            for negval, rank, _, idx, lab in sorted(cands):
                if len(taken) == n_empty or -negval < 0:
                    break
                if remaining[lab] >= 2:
                    remaining[lab] -= 1
                    taken.append((rank, idx, lab))
            if len(taken) == n_empty or exhausted:
                break
            m *= 2
        mine = [(idx, old, new) for (rank, idx, old), new in zip(taken, empty) if rank == comm.rank]
        if taken:
            logger.debug("re-seeded %d empty cluster(s) with the farthest points", len(taken))
        if not mine:
            return torch.empty(0, dtype=torch.int64, device=dev)
        rows, old, new = (torch.tensor(v, dtype=torch.int64, device=dev) for v in zip(*mine))
        self._move(rows, old, new)
        return rows

    # -- update -------------------------------------------------------------------------------
    def _update(self, sums: torch.Tensor, counts: torch.Tensor) -> float:
        """Move centroids to their means, shift the bounds, return the total squared shift."""
        old = self.c.to(torch.float64)
        has = counts > 0
        new = torch.where(has[:, None], sums / counts.clamp(min=1)[:, None], old)
        if self.d.cosine:
            norm = new.norm(dim=1, keepdim=True)
            new = torch.where(norm > 0, new / norm.clamp(min=1e-300), old)
        self.c = new.to(self.c.dtype)
        shift = (self.c.to(torch.float64) - old).norm(dim=1)
        if self.dense:
            return float((shift * shift).sum().item())
        p = shift.to(self.c.dtype)
        self.upper += p.index_select(0, self.labels)
        # No centroid of group g came closer than the largest shift within g.
        padded = p.new_zeros(self.groups * self.group_size)
        padded[: self.k] = p
        self.lower -= padded.view(self.groups, self.group_size).amax(1)
        return float((shift * shift).sum().item())

    def run(self, max_iter: int) -> KMeansResult:
        d = self.d
        self._first_pass()
        sums, counts, _ = self._reduce()
        history: list[float] = []
        converged = strict = False
        n_iter = max_iter
        for it in range(max_iter):
            if it > 0:
                self._bounded_pass()
                sums, counts, n_changed = self._reduce()
            history.append(self._inertia(sums, counts))
            if it > 0 and n_changed == 0:
                converged = strict = True
                n_iter = it + 1
                break
            empty = (counts == 0).nonzero().squeeze(1)
            # Lowest caller-side index first, whatever the internal order.
            empty = empty[torch.argsort(self.perm.index_select(0, empty))].tolist()
            moved = None
            if empty:
                moved = self._relocate(empty, counts)
                sums, counts, _ = self._reduce()
            shift = self._update(sums, counts)
            if moved is not None and moved.numel() and not self.dense:
                # A re-seeded point is its centroid now: distance 0, no lower bound known.
                self.upper[moved] = 0
                self.lower[moved] = 0
            if shift <= d.tol_abs:
                converged = True
                n_iter = it + 1
                break
        if strict:
            inertia = history[-1]
        else:
            # Final assignment so that the labels match the returned centroids.
            self._bounded_pass()
            sums, counts, _ = self._reduce()
            inertia = self._inertia(sums, counts)
        centroids, labels = self.outputs()
        return KMeansResult(centroids=centroids, labels=labels, inertia=inertia, n_iter=n_iter,
                            converged=converged, inertia_history=history)

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroids (K, D) and labels (N,) in the caller's centroid order."""
        centroids = torch.empty_like(self.c)
        centroids[self.perm] = self.c
        return centroids, self.perm.index_select(0, self.labels)


class KMeans:
    """k-means clustering (Lloyd) with k-means++ restarts, Euclidean or cosine.

    Example::

        km = KMeans(100, n_init=3, seed=0)
        result = km.fit(features)            # features: (N, D) tensor on any device
        result.centroids, result.labels, result.inertia
        km.predict(other_features)           # (M,) int64 labels

    Args:
        n_clusters: K >= 1.
        metric: "euclidean" or "cosine" (spherical k-means, see the module docstring).
        init: "k-means++" (greedy, as scikit-learn), "random" (K distinct points), or a
            (K, D) tensor of initial centroids (then one restart is run; in distributed
            modes rank 0's tensor is used).
        n_init: restarts; the one with the lowest inertia is kept.
        max_iter: Lloyd iterations per restart.
        tol: stop when the total squared centroid shift is at most tol times the mean
            per-feature variance of x (as scikit-learn); 0 stops only on strict
            convergence.
        seed: seeds every random draw (made on the CPU, so devices agree on the draws).
        chunk_size: rows per distance block (memory O(chunk_size x K)); default ~4 MiB
            of float32 on the CPU, ~256 MiB on a GPU.
        distributed: False, True / "sharded" or "replicated" (see the module docstring).
        init_sample_size: sharded mode only: size of the sample gathered for
            initialisation (default max(64 K, 16384), capped at the number of points).
        max_points_per_centroid: None (default) fits on all points.  An int fits on a
            uniform random subsample of at most K times that many points (as faiss does
            by default with 256), then labels all points and reports their inertia;
            `inertia_history` then refers to the subsample.
        refine_iter: with a subsample only: after fitting on it, run at most this many
            Lloyd iterations on all points, started from its centroids and stopped by
            `tol` like any fit (0, the default, only labels all points, as faiss does).
            A few iterations recover most of the inertia lost to subsampling, each much
            cheaper than the early ones of a full fit.  The result's `n_iter`,
            `converged` and `inertia_history` then describe these iterations.
    """

    def __init__(self, n_clusters: int, *, metric: str = "euclidean",
                 init: str | torch.Tensor = "k-means++", n_init: int = 1, max_iter: int = 300,
                 tol: float = 1e-4, seed: int = 0, chunk_size: int | None = None,
                 distributed: bool | str = False, init_sample_size: int | None = None,
                 max_points_per_centroid: int | None = None, refine_iter: int = 0) -> None:
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
            raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
        if metric not in _METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {list(_METRICS)}")
        if isinstance(init, str):
            if init not in _INITS:
                raise ValueError(f"unknown init {init!r}; expected one of {list(_INITS)} "
                                 "or a (n_clusters, D) tensor of centroids")
        elif isinstance(init, torch.Tensor):
            if init.dim() != 2 or init.shape[0] != n_clusters:
                raise ValueError(f"initial centroids must have shape (n_clusters={n_clusters}, D), "
                                 f"got {tuple(init.shape)}")
        else:
            raise ValueError(f"init must be 'k-means++', 'random' or a tensor, got {type(init).__name__}")
        for name, val, low in (("n_init", n_init, 1), ("max_iter", max_iter, 1)):
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")
        if isinstance(refine_iter, bool) or not isinstance(refine_iter, int) or refine_iter < 0:
            raise ValueError(f"refine_iter must be an integer >= 0, got {refine_iter!r}")
        if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
        for name, val in (("chunk_size", chunk_size), ("init_sample_size", init_sample_size),
                          ("max_points_per_centroid", max_points_per_centroid)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {val!r}")
        if distributed not in _MODES:
            raise ValueError(f"distributed must be False, True, 'sharded' or 'replicated', "
                             f"got {distributed!r}")
        self.n_clusters = n_clusters
        self.metric = metric
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = float(tol)
        self.seed = int(seed)
        self.chunk_size = chunk_size
        self.distributed = distributed
        self.init_sample_size = init_sample_size
        self.max_points_per_centroid = max_points_per_centroid
        self.refine_iter = refine_iter
        self.centroids: torch.Tensor | None = None
        self.result: KMeansResult | None = None

    # -- public API -----------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> KMeansResult:
        """Cluster x.

        Args:
            x: (N, D) floating tensor on any device (the rank's shard in sharded mode).
        Returns:
            KMeansResult; the model also keeps `centroids` (K, D) and `result`.
        """
        t0 = time.perf_counter()
        mode = _MODES[self.distributed]
        comm = Comm(mode != "local")
        x, counts_per_rank = self._check_fit_input(x, comm, mode)
        if self.metric == "cosine":
            x = _normalize_rows(x)
        k = self.n_clusters
        chunk = self.chunk_size or default_chunk_size(k, x.device)
        lloyd_comm = comm if mode == "sharded" else Comm(False)
        n_total = sum(counts_per_rank) if mode == "sharded" else x.shape[0]

        x_train, n_train_total = x, n_total
        mppc = self.max_points_per_centroid
        if mppc is not None and n_total > k * mppc:
            x_train, n_train_total = self._subsample(x, k * mppc, n_total, comm, mode)
        data = _prepare(x_train, n_train_total, self.tol, lloyd_comm, chunk, self.metric == "cosine")

        restarts = list(range(self.n_init))
        if isinstance(self.init, torch.Tensor):
            if self.n_init > 1:
                logger.warning("init is an explicit tensor: running 1 restart instead of n_init=%d",
                               self.n_init)
            restarts = [0]
        if mode == "replicated":
            restarts = [r for r in restarts if r % comm.world_size == comm.rank]
        inits = self._initial_centroids(data, restarts, comm, mode, counts_per_rank)

        best: KMeansResult | None = None
        for r, c0 in zip(restarts, inits):
            res = _Lloyd(data, c0).run(self.max_iter)
            res.restart = r
            logger.debug("k-means restart %d: inertia %.6g after %d iterations", r, res.inertia, res.n_iter)
            if best is None or res.inertia < best.inertia:
                best = res
        if mode == "replicated":
            best = self._share_best(best, comm, x)

        if x_train is not x:
            # Fitted on a subsample: refine on (or just label) every point, full inertia.
            if self.refine_iter:
                full = _prepare(x, n_total, self.tol, lloyd_comm, chunk, self.metric == "cosine")
                restart = best.restart
                best = _Lloyd(full, best.centroids).run(self.refine_iter)
                best.restart = restart
            else:
                best.labels, best.inertia = _label_all(x, best.centroids, lloyd_comm, chunk,
                                                       self.metric == "cosine")
        best.centroids = best.centroids.to(x.dtype)
        self.centroids = best.centroids
        self.result = best
        logger.info("k-means (K=%d, N=%d, %s, mode=%s): inertia %.6g, restart %d, %d iterations%s, %.2fs",
                    k, n_total, self.metric, mode, best.inertia, best.restart, best.n_iter,
                    "" if best.converged else " (not converged)", time.perf_counter() - t0)
        return best

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(M,) int64 index of the nearest fitted centroid of every row of x (M, D)."""
        if self.centroids is None:
            raise RuntimeError("KMeans.predict called before fit")
        x = _as_float_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"x must have shape (M, {self.centroids.shape[1]}), got {tuple(x.shape)}")
        if self.metric == "cosine":
            x = _normalize_rows(x)
        chunk = self.chunk_size or default_chunk_size(self.n_clusters, x.device)
        centroids = self.centroids.to(device=x.device, dtype=compute_dtype_for(x.dtype))
        return _nearest_all(x, centroids, chunk)[0]

    def fit_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Fit on x and return its (N,) labels."""
        return self.fit(x).labels

    # -- helpers --------------------------------------------------------------------------
    def _check_fit_input(self, x, comm: Comm, mode: str) -> tuple[torch.Tensor, list[int]]:
        """Validate x (identically on every rank, so all ranks raise together)."""
        x = _as_float_tensor(x)
        ok_dim = x.dim() == 2
        n, d = (x.shape[0], x.shape[1]) if ok_dim else (0, 0)
        finite = _all_finite(x) if ok_dim else True
        info = torch.tensor([int(ok_dim), n, d, int(finite)], dtype=torch.int64, device=x.device)
        rows = [t.tolist() for t in comm.all_gather(info)]
        if not all(r[0] for r in rows):
            bad = [i for i, r in enumerate(rows) if not r[0]]
            raise ValueError(f"x must be 2-D (N, D); got shape {tuple(x.shape)}"
                             + (f" (bad ranks: {bad})" if comm.active else ""))
        if len({r[2] for r in rows}) > 1:
            raise ValueError(f"x has a different number of features on different ranks: "
                             f"{[r[2] for r in rows]}")
        if not all(r[3] for r in rows):
            bad = [i for i, r in enumerate(rows) if not r[3]]
            raise ValueError("x contains NaN or inf" + (f" (on ranks {bad})" if comm.active else ""))
        counts = [r[1] for r in rows]
        if mode == "replicated" and len(set(counts)) > 1:
            raise ValueError(f"replicated mode needs the same x on every rank; row counts {counts}")
        n_total = sum(counts) if mode == "sharded" else n
        if n_total < self.n_clusters:
            raise ValueError(f"n_samples={n_total} should be >= n_clusters={self.n_clusters}")
        if d < 1:
            raise ValueError("x must have at least one feature")
        if isinstance(self.init, torch.Tensor) and self.init.shape[1] != d:
            raise ValueError(f"initial centroids must have shape (n_clusters={self.n_clusters}, D={d}), "
                             f"got {tuple(self.init.shape)}")
        return x.detach(), counts

    def _subsample(self, x, target: int, n_total: int, comm: Comm, mode: str):
        """Uniform random subsample of about `target` rows in total (per rank, sharded)."""
        stream_rank = comm.rank if mode == "sharded" else 0
        g = restart_generator(self.seed, stream_rank, stream=3)
        keep = round(x.shape[0] * target / n_total) if mode == "sharded" else target
        idx = torch.randperm(x.shape[0], generator=g)[:keep].sort().values.to(x.device)
        sub = x.index_select(0, idx)
        if mode == "sharded":
            total = int(comm.sum_(torch.tensor([keep], device=x.device)).item())
        else:
            total = keep
        return sub, total

    def _initial_centroids(self, data: _Data, restarts: list[int], comm: Comm, mode: str,
                           counts_per_rank: list[int]) -> list[torch.Tensor]:
        """(K, D) initial centroids (compute dtype) for each of the given restarts."""
        x, k = data.x, self.n_clusters
        cdtype = data.x_sq.dtype
        if isinstance(self.init, torch.Tensor):
            c0 = self.init.detach().to(device=x.device, dtype=cdtype).clone()
            if not bool(torch.isfinite(c0).all()):
                raise ValueError("initial centroids contain NaN or inf")
            comm.broadcast_(c0, src=0)
            if data.cosine:
                c0 = _normalize_rows(c0)
            return [c0]
        if not restarts:
            return []
        if mode == "sharded":
            # Initialise on a bounded sample gathered from every shard.
            sample = _gather_sample(x, data.n_total, counts_per_rank,
                                    self.init_sample_size or max(64 * k, 16384), comm, self.seed)
            x_init, x_sq_init = sample, row_sq_norms(sample, data.chunk, cdtype)
        else:
            x_init, x_sq_init = x, data.x_sq
        gens = [restart_generator(self.seed, r) for r in restarts]
        if self.init == "random":
            out = random_init(x_init, k, gens, cdtype)
        else:
            out = kmeans_plusplus(x_init, x_sq_init, k, gens, chunk_size=data.chunk)
        if mode == "sharded":
            comm.broadcast_(out, src=0)   # guard against any cross-rank float drift
        return list(out)

    def _share_best(self, best: KMeansResult | None, comm: Comm, x: torch.Tensor) -> KMeansResult:
        """Replicated mode: pick the lowest inertia over ranks and broadcast that result."""
        dev = x.device
        mine = torch.tensor([math.inf if best is None else best.inertia,
                             math.inf if best is None else best.restart],
                            dtype=torch.float64, device=dev)
        table = [t.tolist() for t in comm.all_gather(mine)]
        src = min(range(len(table)), key=lambda i: (table[i][0], table[i][1]))
        k, d = self.n_clusters, x.shape[1]
        cdtype = compute_dtype_for(x.dtype)
        cent = best.centroids.clone() if comm.rank == src else torch.empty((k, d), dtype=cdtype, device=dev)
        labels = best.labels.clone() if comm.rank == src else torch.empty(x.shape[0], dtype=torch.int64,
                                                                          device=dev)
        meta = torch.full((4 + self.max_iter,), math.nan, dtype=torch.float64, device=dev)
        if comm.rank == src:
            meta[:4] = torch.tensor([best.inertia, best.n_iter, float(best.converged), best.restart],
                                    dtype=torch.float64)
            meta[4:4 + len(best.inertia_history)] = torch.tensor(best.inertia_history, dtype=torch.float64)
        for t in (cent, labels, meta):
            comm.broadcast_(t, src=src)
        m = meta.tolist()
        return KMeansResult(centroids=cent, labels=labels, inertia=m[0], n_iter=int(m[1]),
                            converged=bool(m[2]), inertia_history=m[4:4 + int(m[1])], restart=int(m[3]))


def _f64_rows(x: torch.Tensor) -> int:
    return max(1, _F64_ELEMS // max(1, x.shape[1]))


def _all_finite(x: torch.Tensor) -> bool:
    """Whether x has no NaN or inf.  A finite float sum proves it (NaN and inf propagate)
    and is ~10x cheaper than `isfinite`; only a non-finite sum (or overflow) needs the
    exact check."""
    if x.numel() == 0 or bool(torch.isfinite(x.sum()).item()):
        return True
    return bool(torch.isfinite(x).all().item())


def _as_float_tensor(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype} (convert it with .float())")
    return x


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero), computed in float32 or better."""
    xf = x.to(compute_dtype_for(x.dtype))
    return (xf / xf.norm(dim=1, keepdim=True).clamp(min=1e-12)).to(x.dtype)


def _prepare(x: torch.Tensor, n_total: int, tol: float, comm: Comm, search_chunk: int,
             cosine: bool) -> _Data:
    """Squared norms (once per fit) and the absolute tolerance from the global variance.

    One pass over x in the compute dtype, in cache-sized chunks with a reused buffer: row
    norms, a dot product and a column sum per chunk (60,000 x 512 float32: ~11 ms, against
    ~90 ms with a float64 copy of every chunk).  The variance needs no per-feature
    squares: the mean per-feature variance is ``sum_i |x_i - mean|^2 / (N D)``.  Sums are
    taken of x minus its first row, a shift that keeps the float32 sums free of
    cancellation, and accumulated in float64; shards are combined about the global mean.
    """
    cdtype = compute_dtype_for(x.dtype)
    n, d = x.shape
    dev = x.device
    x_sq = torch.empty(n, dtype=cdtype, device=dev)
    local_mean = torch.zeros(d, dtype=torch.float64, device=dev)
    spread = torch.zeros((), dtype=torch.float64, device=dev)      # sum of |x - local mean|^2
    if n:
        chunk = min(n, max(1, _STATS_ELEMS // d))
        shift = x[0].to(cdtype)
        centred = torch.empty((chunk, d), dtype=cdtype, device=dev)
        s1 = torch.zeros(d, dtype=torch.float64, device=dev)    # sum of (x - shift)
        s2 = torch.zeros((), dtype=torch.float64, device=dev)   # sum of |x - shift|^2
        for s in range(0, n, chunk):
            xc = x[s:s + chunk].to(cdtype)
            m = xc.shape[0]
            torch.linalg.vector_norm(xc, dim=1, out=x_sq[s:s + m])
            cen = torch.sub(xc, shift, out=centred[:m]).view(-1)
            s2 += torch.dot(cen, cen)
            s1 += cen.view(m, d).sum(0)
        x_sq.square_()
        local_mean = shift.to(torch.float64) + s1 / n
        spread = (s2 - (s1 * s1).sum() / n).clamp_(min=0)
    # Two small reductions over ranks, so that shards combine without cancellation: the
    # global mean first, then each shard's spread about it.
    mean = comm.sum_(local_mean * n) / n_total
    stats = torch.stack([spread + n * ((local_mean - mean) ** 2).sum(), x_sq.sum(dtype=torch.float64)])
    comm.sum_(stats)
    var_mean = float(stats[0].item()) / (n_total * d)
    return _Data(x=x, x_sq=x_sq, sq_total=float(stats[1].item()), n_total=n_total,
                 tol_abs=tol * var_mean, comm=comm, chunk=search_chunk, cosine=cosine)


def _gather_sample(x: torch.Tensor, n_total: int, counts: list[int], size: int, comm: Comm,
                   seed: int) -> torch.Tensor:
    """A uniform random sample of min(size, n_total) rows drawn across all shards.

    Each rank contributes in proportion to its shard (largest-remainder quotas, which
    every rank computes identically), so only the sample is ever communicated.
    """
    size = min(size, n_total)
    exact = [size * c / n_total for c in counts]
    quota = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - quota[i]), i))
    for i in order[: size - sum(quota)]:
        quota[i] += 1
    g = restart_generator(seed, comm.rank, stream=2)
    idx = torch.randperm(x.shape[0], generator=g)[: quota[comm.rank]].to(x.device)
    return comm.all_gather_rows(x.index_select(0, idx))


def _nearest_all(x: torch.Tensor, centroids: torch.Tensor,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest of centroids (K, D, compute dtype) for every row of x (N, D): labels (N,),
    squared distances (N,) and squared row norms (N,), from one norms pass and one search."""
    x_sq = row_sq_norms(x, chunk, centroids.dtype)
    assigner = Assigner(x, x_sq, chunk)
    assigner.set_centroids(centroids)
    labels, d1, _ = assigner.nearest(None, second=False)
    return labels, d1, x_sq


def _label_all(x: torch.Tensor, centroids: torch.Tensor, comm: Comm, chunk: int,
               cosine: bool) -> tuple[torch.Tensor, float]:
    """Labels (N,) of every row of x (N, D) against centroids (K, D, compute dtype), and
    the (global) inertia they give.

    Sums each point's own distance from the search: no statistics, bounds or per-cluster
    sums, which a fit needs and labelling does not.
    """
    labels, d1, x_sq = _nearest_all(x, centroids, chunk)
    if cosine:
        # 1 - x.c, with x.c = (|x|^2 + |c|^2 - |x - c|^2) / 2 (x unit or zero, c unit).
        c_sq = (centroids * centroids).sum(1)
        d1 = 1 - (x_sq + c_sq.index_select(0, labels) - d1) / 2
    total = d1.sum(dtype=torch.float64).reshape(1)
    comm.sum_(total)
    return labels, max(float(total.item()), 0.0)
