"""Initial centroids: greedy k-means++ (as scikit-learn does it) and uniform random points.

Several restarts are initialised together: at every step the candidate centres of all
restarts are scored with ONE matrix product against x, so x is read once per step
instead of once per restart and per candidate.  Each restart draws from its own
generator, so restart r gets the same draws whether it runs alone or beside others
(the scores can still differ in the last float bits between batch compositions).
"""
from __future__ import annotations

import math

import torch

from ._assign import linear


def restart_generator(seed: int, restart: int, stream: int = 0) -> torch.Generator:
    """CPU generator for one restart.  Random draws are made on the CPU and moved to the
    data's device, so a seed gives the same draws on every device."""
    g = torch.Generator(device="cpu")
    # Distinct, reproducible streams per (seed, restart, purpose).
    g.manual_seed((seed * 1_000_003 + restart * 7_919 + stream * 104_729) % (2**63 - 1))
    return g


def random_init(x: torch.Tensor, n_clusters: int, generators: list[torch.Generator],
                cdtype: torch.dtype) -> torch.Tensor:
    """(R, K, D) centroids: K distinct rows of x (N, D) drawn uniformly, per restart."""
    n = x.shape[0]
    out = []
    for g in generators:
        idx = torch.randperm(n, generator=g)[:n_clusters].to(x.device)
        out.append(x.index_select(0, idx).to(cdtype))
    return torch.stack(out)


def kmeans_plusplus(x: torch.Tensor, x_sq: torch.Tensor, n_clusters: int,
                    generators: list[torch.Generator], *, chunk_size: int) -> torch.Tensor:
    """Greedy k-means++ for R restarts at once.

    As in scikit-learn: the first centre is a uniformly drawn point; each later centre is
    the best of ``2 + floor(ln K)`` candidates drawn with probability proportional to the
    squared distance to the nearest centre chosen so far ("D^2 sampling"), where best
    means lowest resulting potential (sum of squared distances to the nearest centre).

    Args:
        x: (N, D) points; x_sq: (N,) their squared norms in the compute dtype.
        generators: one CPU generator per restart (R of them).
        chunk_size: rows per block of the Lloyd search, whose blocks are K wide; blocks
            here are R * trials wide and get proportionally more rows (same memory).
    Returns:
        (R, K, D) centroids in the compute dtype of x_sq.
    """
    n, dev, cdtype = x.shape[0], x.device, x_sq.dtype
    r_count = len(generators)
    n_trials = 2 + int(math.log(n_clusters))
    m = r_count * n_trials
    # Few, large blocks: this loop runs K times, and each op has a fixed cost.
    rows = max(chunk_size, chunk_size * n_clusters // m)
    chosen = torch.empty((r_count, n_clusters), dtype=torch.int64)

    def scores(ids: torch.Tensor, s: int, e: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """(e - s, len(ids)) squared distances from x[s:e] to x[ids], not clamped at 0."""
        cand = x.index_select(0, ids).to(cdtype).mul_(-2)   # exact, like addmm's alpha=-2
        d = linear(x[s:e].to(cdtype), cand, x_sq.index_select(0, ids), out=out)
        return d.add_(x_sq[s:e, None])

    first = torch.stack([torch.randint(n, (1,), generator=g)[0] for g in generators])
    chosen[:, 0] = first
    closest = torch.empty((n, r_count), dtype=cdtype, device=dev)       # (N, R)
    for s in range(0, n, rows):
        closest[s:s + rows] = scores(first.to(dev), s, s + rows).clamp_(min=0)

    mins = torch.empty((n, r_count, n_trials), dtype=cdtype, device=dev)
    for k in range(1, n_clusters):
        # D^2 sampling of the candidates of every restart.  The cumulative sum is in
        # float64: in float32 the tail of a 10^6-term sum loses the small terms.
        cum = closest.T.to(torch.float64).cumsum(1)                       # (R, N)
        u = torch.stack([torch.rand(n_trials, generator=g, dtype=torch.float64) for g in generators])
        u = u.to(dev) * cum[:, -1:]
        ids = torch.searchsorted(cum, u).clamp_(max=n - 1).view(-1)       # (R * trials,)
        # One GEMM scores all candidates of all restarts against x.
        pots = torch.zeros(m, dtype=torch.float64, device=dev)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            block = mins[s:e]                                              # (rows, R, trials)
            d = scores(ids, s, e, out=block.view(e - s, m))
            torch.minimum(d.view_as(block), closest[s:e, :, None], out=block)
            # float32 column sums (cascade summation inside torch) are accurate enough to
            # rank candidates and 10x faster than a float64 reduction of a skinny matrix.
            pots += block.view(e - s, m).sum(0).to(torch.float64)
        best = pots.view(r_count, n_trials).argmin(1)                      # (R,)
        closest = mins[:, torch.arange(r_count, device=dev), best].clamp_(min=0)
        chosen[:, k] = ids.view(r_count, n_trials).gather(1, best[:, None]).squeeze(1).cpu()
    return x.index_select(0, chosen.view(-1).to(dev)).to(cdtype).view(r_count, n_clusters, -1)
