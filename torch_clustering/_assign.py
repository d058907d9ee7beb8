"""Nearest-centroid search by chunked matrix products (the inner loop of k-means).

Squared distances are expanded as ``|x|^2 - 2 x.c + |c|^2``: the ``x.c`` term is one
GEMM per chunk of rows, ``|c|^2`` is folded into it (``addmm``, or oneDNN's linear op on
the CPU where it is faster, see `linear`), and ``|x|^2`` is constant per row, so it is
added only to the selected minima.  Memory is
O(chunk_size x K) for the distance block, never O(N x K).
"""
from __future__ import annotations

import functools
import platform

import torch

# Centroids are laid out in G groups of B consecutive columns (the last group padded).
# The groups serve twice:
# * On the CPU, `Tensor.min(dim)` with indices over rows of ~1000 floats is about as
#   slow as the GEMM that produced them, while `amin` (values only) is vectorised and
#   ~8x faster.  So we take the minimum of each group with `amin`, find the winning
#   group (a narrow min-with-index), and only then search inside that one group.  The
#   result equals `argmin` (first minimal index).
# * Each point keeps one lower bound per group (Yinyang k-means, Ding et al., ICML
#   2015), which prunes far more than a single bound when K is large.  G is capped, so
#   bounds take O(N G) = O(N) memory, never O(N K).
# Sizes measured with bench/kmeans.py (2-core CPU, MNIST projections): at K=100, 20
# groups of 5 run 10-15 % faster than 4 of 25 (fewer candidates per pass, for fit and
# for the subsample + refine option); at K=1000, 64 groups are ~4 % slower than 32; at
# K=10, 2, 5 or 10 groups (10 = Elkan's per-centroid bounds) gain nothing over one
# (Hamerly's algorithm): 10-20 % of the points stay candidates either way.
_MAX_GROUPS = 32
_MIN_GROUP = 5
_GROUPED_FROM_K = 20


def group_layout(k: int) -> tuple[int, int]:
    """(G, B): number of centroid groups and columns per group (G * B >= K)."""
    g = 1 if k < _GROUPED_FROM_K else min(_MAX_GROUPS, k // _MIN_GROUP)
    return g, -(-k // g)


def group_order(c: torch.Tensor, n_groups: int, size: int) -> torch.Tensor:
    """(K,) permutation of the centroids c (K, D) that makes each run of `size`
    consecutive centroids a spatially compact group (recursive bisection along the
    principal axis), so that group lower bounds are tight."""
    def split(idx: torch.Tensor, groups: int) -> list[torch.Tensor]:
        if groups == 1 or idx.numel() <= 1:
            return [idx]
        left = groups // 2
        n_left = min(idx.numel(), left * size)
        sub = c.index_select(0, idx).to(torch.float64)
        sub = sub - sub.mean(0)
        # Principal axis by a few power iterations (an SVD is overkill and can fail).
        v = sub.abs().sum(0) + 1.0
        for _ in range(8):
            v = sub.T @ (sub @ v)
            v = v / v.norm().clamp(min=1e-300)
        order = idx[torch.argsort(sub @ v, stable=True)]
        return split(order[:n_left], left) + split(order[n_left:], groups - left)

    if n_groups == 1:
        return torch.arange(c.shape[0], device=c.device)
    return torch.cat(split(torch.arange(c.shape[0], device=c.device), n_groups))


# On the CPU, torch's oneDNN linear kernel computes the skinny products of k-means (many
# rows against a few to a few hundred centroids) faster than the BLAS behind `addmm`
# (MKL).  Measured on a 2-core AMD EPYC, 60,000 rows, chunked as in a Lloyd pass, MKL /
# oneDNN ms: D=512: K=10 21.5/9.4, K=100 73/46, K=1000 465/409; D=256: K=10 12.1/7.8,
# K=100 36/24; D=128: K=10 6.7/5.8, K=24 8.4/8.5, K=48 12.6/13.2, and inside k-means++
# at K=1000 (24 columns) oneDNN was 20 % slower.  So it is used where it wins: D >= 256,
# or at most 16 columns.  That CPU had AVX-512; on a 2-core EPYC with AVX2 only the two
# kernels were even (oneDNN / MKL 0.93-1.11 over the same sizes: D=512 K=10 0.96, D=256
# K=10 1.11), so there addmm is kept.  The op is private (torch.compile emits it), so it is
# used only for float32 and after a probe shows that it exists and agrees with addmm; set
# this (or torch.backends.mkldnn.enabled) to False to always use addmm.
USE_ONEDNN = True
_ONEDNN_MIN_D = 256
_ONEDNN_MAX_K_SMALL_D = 16


@functools.lru_cache(maxsize=None)
def _onednn_linear_works() -> bool:
    # Measured on x86-64 only (other CPUs keep the BLAS they were measured with).
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(64, 48, generator=g), torch.randn(5, 48, generator=g), torch.randn(5, generator=g)
        y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return bool(torch.allclose(y, torch.addmm(b, x, w.T), rtol=1e-5, atol=1e-5))
    except Exception:       # op missing or unsupported in this build: use addmm
        return False


def _onednn_wins_here() -> bool:
    """Whether this CPU is of the kind where oneDNN's products were measured faster."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def uses_onednn(weight: torch.Tensor) -> bool:
    """Whether `linear` computes products against weight (K, D) with oneDNN."""
    k, d = weight.shape
    return (USE_ONEDNN and torch.backends.mkldnn.enabled and weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and (d >= _ONEDNN_MIN_D or k <= _ONEDNN_MAX_K_SMALL_D) and _onednn_wins_here()
            and _onednn_linear_works())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) ``bias + x @ weight.T`` for x (M, D), weight (K, D), bias (K,), all one
    dtype.  addmm writes it to `out` when given; oneDNN has no `out=` and returns a new
    tensor (a copy would cost as much as its speed-up), so use the returned tensor."""
    if not uses_onednn(weight):
        return torch.addmm(bias, x, weight.T, out=out)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def default_chunk_size(n_clusters: int, device: torch.device) -> int:
    """Rows per distance block: ~4 MiB of float32 on the CPU (the block stays in cache
    for the reductions that follow the GEMM; measured best for K = 10..1000), ~256 MiB
    on a GPU (large enough to keep it busy)."""
    budget = (1 << 20) if device.type == "cpu" else (1 << 26)
    return max(256, budget // max(n_clusters, 1))


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Distances, bounds and centroids are kept in float32 unless x is float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# On the CPU, gathered rows (the candidates of a bounded pass) are searched this many
# elements at a time, so that the copy is still in cache when the product reads it: 15,000
# random rows of 60,000 x 512 took 5.8 ms in blocks of 4,096 rows against 8.1 ms in one
# block.  A GPU keeps the large blocks it needs to be busy.
_GATHER_ELEMS = 1 << 21


def row_sq_norms(x: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(N,) squared L2 norms of the rows of x (N, D), computed in `dtype` chunk by chunk
    (the same formula as the statistics pass of a fit, with no (chunk, D) temporary)."""
    out = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    for s in range(0, x.shape[0], chunk_size):
        torch.linalg.vector_norm(x[s:s + chunk_size].to(dtype), dim=1, out=out[s:s + chunk_size])
    return out.square_()


class Assigner:
    """Chunked nearest / second-nearest centroid search against a fixed centroid set.

    Args:
        x: (N, D) data, any floating dtype, on any device.
        x_sq: (N,) squared norms of x in the compute dtype.
        chunk_size: rows per distance block.
    """

    def __init__(self, x: torch.Tensor, x_sq: torch.Tensor, chunk_size: int) -> None:
        self.x = x
        self.x_sq = x_sq
        self.chunk_size = chunk_size
        self.gather_chunk = chunk_size
        if x.device.type == "cpu":
            self.gather_chunk = min(chunk_size, max(256, _GATHER_ELEMS // max(1, x.shape[1])))
        self.cdtype = x_sq.dtype
        # The CPU has no fast half-precision GEMM: upcast each chunk instead.  On a GPU
        # the product runs in x's own dtype (tensor cores) and is upcast afterwards.
        self.mm_dtype = self.cdtype if x.device.type == "cpu" else x.dtype
        self._buf: torch.Tensor | None = None
        # Gathered rows land in a reused buffer: fresh multi-MB allocations cost page
        # faults that are as slow as the arithmetic.
        self._rows = torch.empty((min(self.gather_chunk, x.shape[0]), x.shape[1]), dtype=x.dtype,
                                 device=x.device)

    def gather(self, r: torch.Tensor) -> torch.Tensor:
        """x[r] for at most gather_chunk indices r, in the reused row buffer."""
        out = self._rows[: r.shape[0]]
        return torch.index_select(self.x, 0, r, out=out)

    def set_centroids(self, c: torch.Tensor) -> None:
        """c: (K, D) centroids in the compute dtype, in group order (see group_order)."""
        k = c.shape[0]
        self.k = k
        self.groups, self.block = group_layout(k)
        kp = self.groups * self.block
        c_sq = (c * c).sum(1)
        # Padding columns get |c|^2 = +inf, so they can never win a minimum.
        self.c_sq = torch.full((kp,), float("inf"), dtype=self.cdtype, device=c.device)
        self.c_sq[:k] = c_sq
        cp = torch.zeros((kp, c.shape[1]), dtype=self.mm_dtype, device=c.device)
        cp[:k] = c
        self.onednn = uses_onednn(cp)
        if self.onednn:
            self.w = cp.mul_(-2)        # exact: the same products as addmm's alpha=-2
        else:
            # MKL is ~2x faster with the transposed view for a handful of centroids, and
            # slightly faster with a contiguous (D, K) operand for many.
            self.ct = cp.T if kp < 32 else cp.T.contiguous()
        if not self.onednn and (self._buf is None or self._buf.shape[1] != kp):
            self._buf = torch.empty((self.chunk_size, kp), dtype=self.cdtype, device=c.device)

    def _partial_dists(self, xc: torch.Tensor) -> torch.Tensor:
        """(m, Kp) values of |c|^2 - 2 x.c for a chunk xc (m, D); |x|^2 is not added."""
        if self.onednn:
            return linear(xc.to(self.cdtype), self.w, self.c_sq)
        out = self._buf[: xc.shape[0]]
        if self.mm_dtype == self.cdtype:
            torch.addmm(self.c_sq, xc.to(self.cdtype), self.ct, beta=1, alpha=-2, out=out)
        else:
            torch.add(self.c_sq, torch.mm(xc.to(self.mm_dtype), self.ct).to(self.cdtype),
                      alpha=-2, out=out)
        return out

    def _top2(self, d: torch.Tensor, second: bool):
        """Row minimum, its index and (optionally) the per-group minima excluding it.

        Args:
            d: (m, G * B) scratch block (it may be overwritten).
        Returns:
            v1 (m,), idx (m,), lb (m, G) or None: lb[:, g] is the smallest value in group
            g other than the row's minimum itself (+inf if there is none).
        """
        m = d.shape[0]
        inf = float("inf")
        if self.groups == 1:
            v1, idx = d.min(1)
            if not second:
                return v1, idx, None
            d.scatter_(1, idx[:, None], inf)
            return v1, idx, d.amin(1, keepdim=True)
        d3 = d.view(m, self.groups, self.block)
        gmin = d3.amin(2)                                   # (m, G)
        v1, gi = gmin.min(1)
        rows = torch.arange(m, device=d.device)
        sub = d3[rows, gi]                                  # (m, B) copy of the winning group
        j = sub.argmin(1)
        idx = gi * self.block + j
        if not second:
            return v1, idx, None
        sub[rows, j] = inf
        gmin[rows, gi] = sub.amin(1)
        return v1, idx, gmin

    def nearest(self, rows: torch.Tensor | None = None, *, second: bool = True):
        """Nearest centroid of the selected rows of x.

        Args:
            rows: (M,) int64 row indices into x, or None for all rows.
            second: also return the per-group lower distances.
        Returns:
            labels (M,) int64, d1 (M,) squared distance to the nearest centroid,
            lb (M, G) squared distance to the nearest centroid of each group other than
            the nearest one (+inf where there is none), or None.  Distances are clamped
            at 0 (the expansion can round slightly below).
        """
        n = self.x.shape[0] if rows is None else rows.shape[0]
        dev = self.x.device
        labels = torch.empty(n, dtype=torch.int64, device=dev)
        d1 = torch.empty(n, dtype=self.cdtype, device=dev)
        d2 = torch.empty((n, self.groups), dtype=self.cdtype, device=dev) if second else None
        step = self.chunk_size if rows is None else self.gather_chunk
        for s in range(0, n, step):
            e = min(n, s + step)
            if rows is None:
                xc, xs = self.x[s:e], self.x_sq[s:e]
            else:
                r = rows[s:e]
                xc, xs = self.gather(r), self.x_sq.index_select(0, r)
            v1, idx, v2 = self._top2(self._partial_dists(xc), second)
            labels[s:e] = idx
            torch.add(v1, xs, out=d1[s:e]).clamp_(min=0)
            if second:
                torch.add(v2, xs[:, None], out=d2[s:e]).clamp_(min=0)
        return labels, d1, d2


def exact_sq_dist(assigner: Assigner, c: torch.Tensor, labels: torch.Tensor,
                  rows: torch.Tensor | None) -> torch.Tensor:
    """Squared distance of x[rows] (M, D) to c[labels[rows]], by direct differences.

    More accurate than the norm expansion (no cancellation); used to tighten bounds and
    to pick the points farthest from their centroids.  Works in place in the assigner's
    row buffer (a version with fresh temporaries was 5x slower on the CPU).
    """
    x, chunk = assigner.x, assigner.gather_chunk
    n = x.shape[0] if rows is None else rows.shape[0]
    out = torch.empty(n, dtype=c.dtype, device=x.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        if rows is None:
            buf = assigner._rows[: e - s]
            buf.copy_(x[s:e])
            lab = labels[s:e]
        else:
            r = rows[s:e]
            buf = assigner.gather(r)
            lab = labels.index_select(0, r)
        if buf.dtype != c.dtype:
            buf = buf.to(c.dtype)
        buf.sub_(c.index_select(0, lab))
        out[s:e] = buf.pow_(2).sum(1)
    return out


def half_min_center_dist(c: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(K,) half the distance from each centroid to its nearest other centroid.

    A point within this distance of its own centroid cannot be closer to any other
    centroid (triangle inequality).  +inf when K == 1.  Chunked over rows so memory is
    O(chunk_size x K).
    """
    k = c.shape[0]
    c_sq = (c * c).sum(1)
    out = torch.empty(k, dtype=c.dtype, device=c.device)
    for s in range(0, k, chunk_size):
        e = min(k, s + chunk_size)
        d = torch.addmm(c_sq, c[s:e], c.T, beta=1, alpha=-2).add_(c_sq[s:e, None])
        d[torch.arange(e - s, device=c.device), torch.arange(s, e, device=c.device)] = float("inf")
        out[s:e] = d.amin(1)
    return out.clamp_(min=0).sqrt_().mul_(0.5)
