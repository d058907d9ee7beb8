"""Gaussian mixture model fitted by EM, with diagonal or spherical covariances.

Follows scikit-learn's ``GaussianMixture`` step for step, so the two agree from the same
initial parameters: each iteration runs an E-step with the current parameters (its mean
log-likelihood is that iteration's lower bound), then an M-step; it stops when the lower
bound changes by less than `tol`.  A variance floor `reg_covar` is added to every
variance.  One pass over x per iteration computes the responsibilities chunk by chunk
(memory O(chunk_size x K)) and accumulates the M-step statistics in float64 at once.

Sharded data (``distributed=True``): torch.distributed is initialised and every rank
passes its own shard of x (shards may differ in size, even be empty).  Each EM step
all-reduces the M-step statistics and the log-likelihood sum (one float64 buffer of
2 + K + 2 K D values), so every rank holds the same parameters and no rank ever holds
the whole data; `lower_bound` and `score` are those of all the data, `predict` and
`predict_proba` answer for the rows they are given.  Initialisation: "k-means" runs
`KMeans(distributed=True)` on the shards (k-means++ on a bounded sample gathered from
all shards); "random" draws each row's responsibilities from a stream of (seed, global
row block), so it equals one process's draw on the concatenated shards (in rank order);
a dict of parameters is taken from rank 0.  There is no replicated mode: a fit is one EM
run, so ranks holding the same x just fit with ``distributed=False`` and agree.
"""
from __future__ import annotations

import logging
import math

import torch

from ._assign import compute_dtype_for
from ._dist import Comm
from ._init import restart_generator
from .kmeans import KMeans, _all_finite, _as_float_tensor

logger = logging.getLogger(__name__)

_COV_TYPES = ("diag", "spherical")
# Random initial responsibilities are drawn per block of this many global rows, each block
# from its own generator, so a row's draw does not depend on which shard holds it.
_RANDOM_BLOCK = 4096
# Components whose expanded log-density may be off by more than this in the compute dtype
# are recomputed in float64 (see GaussianMixture._chunks_log_prob): on 3,000 MNIST digits in
# 256-d (K=10, spherical, float32), where two components collapse, the lower bound was 3.6e-5
# relative off scikit-learn's without this and 8e-7 with it.
_MAX_ROUNDING_NATS = 0.5
_RANDOM_STREAM = 4          # restart_generator stream for them (KMeans uses 0, 2 and 3)


class GaussianMixture:
    """Mixture of K Gaussians with diagonal or spherical covariances.

    Args:
        n_components: K >= 1.
        covariance_type: "diag" (a variance per component and feature) or "spherical"
            (one variance per component).
        max_iter: EM iterations.
        tol: stop when the lower bound (mean log-likelihood per point) changes by less.
        seed: seeds the initialisation.
        init: "k-means" (responsibilities from the labels of `KMeans` with k-means++, as
            scikit-learn), "random" (random responsibilities), or a dict of initial
            parameters {"weights": (K,), "means": (K, D), "variances": (K, D) for "diag"
            or (K,) for "spherical"}.
        reg_covar: added to every variance (keeps them positive).
        chunk_size: rows per block of the E-step (default: ~16 MiB of float32 per block).
        distributed: False (one process, x is all the data) or True / "sharded" (every
            rank passes its shard; see the module docstring).

    After `fit`: `weights` (K,), `means` (K, D), `variances` ((K, D) or (K,)),
    `lower_bound`, `lower_bound_history` (one per iteration), `n_iter`, `converged`.
    """

    def __init__(self, n_components: int, *, covariance_type: str = "diag", max_iter: int = 100,
                 tol: float = 1e-3, seed: int = 0, init: str | dict = "k-means",
                 reg_covar: float = 1e-6, chunk_size: int | None = None,
                 distributed: bool | str = False) -> None:
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be an integer >= 1, got {n_components!r}")
        if covariance_type not in _COV_TYPES:
            raise ValueError(f"unknown covariance_type {covariance_type!r}; expected one of {list(_COV_TYPES)}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        if not (isinstance(reg_covar, (int, float)) and reg_covar >= 0):
            raise ValueError(f"reg_covar must be >= 0, got {reg_covar!r}")
        if isinstance(init, str):
            if init not in ("k-means", "random"):
                raise ValueError(f"unknown init {init!r}; expected 'k-means', 'random' or a dict of parameters")
        elif isinstance(init, dict):
            missing = {"weights", "means", "variances"} - set(init)
            extra = set(init) - {"weights", "means", "variances"}
            if missing or extra:
                raise ValueError(f"init dict needs exactly the keys weights, means, variances "
                                 f"(missing {sorted(missing)}, unknown {sorted(extra)})")
        else:
            raise ValueError(f"init must be 'k-means', 'random' or a dict, got {type(init).__name__}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size!r}")
        if distributed == "replicated":
            raise ValueError("distributed='replicated' does not apply to GaussianMixture: a fit is one EM "
                             "run, so ranks holding the same x get the same fit with distributed=False")
        if not (distributed is False or distributed is True or distributed == "sharded"):
            raise ValueError(f"distributed must be False, True or 'sharded', got {distributed!r}")
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.max_iter = max_iter
        self.tol = float(tol)
        self.seed = int(seed)
        self.init = init
        self.reg_covar = float(reg_covar)
        self.chunk_size = chunk_size
        self.distributed = distributed
        self.weights = self.means = self.variances = None
        self.lower_bound = -math.inf
        self.lower_bound_history: list[float] = []
        self.n_iter = 0
        self.converged = False

    # -- public API -------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> "GaussianMixture":
        """Fit on x (N, D), any floating dtype and device (the rank's shard when
        distributed); returns self."""
        comm = self._comm()
        x, counts = self._check_x(x, comm, fitting=True)
        k, n_total = self.n_components, sum(counts)
        if n_total < k:
            raise ValueError(f"n_samples={n_total} should be >= n_components={k}")
        cdtype = compute_dtype_for(x.dtype)
        self._set_initial_parameters(x, cdtype, comm, n_total, offset=sum(counts[:comm.rank]))
        history = []
        self.converged = False
        prev = -math.inf
        for it in range(1, self.max_iter + 1):
            lower_bound, stats = self._e_step(x, comm, accumulate=True)
            self._m_step(*stats, n=n_total)
            history.append(lower_bound)
            if abs(lower_bound - prev) < self.tol:
                self.converged = True
                break
            prev = lower_bound
        self.n_iter = it
        self.lower_bound = history[-1]
        self.lower_bound_history = history
        logger.info("GMM (K=%d, %s): lower bound %.6g after %d iterations%s", k, self.covariance_type,
                    self.lower_bound, it, "" if self.converged else " (not converged)")
        return self

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) posterior probabilities of the components, in x's dtype."""
        x = self._check_x(x, Comm(False))[0]
        out = torch.empty((x.shape[0], self.n_components), dtype=self.means.dtype, device=x.device)
        for s, e, lp, _, _ in self._chunks_log_prob(x):
            out[s:e] = _normalize_log_prob_(lp)[1]
        return out.to(x.dtype)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) int64 most probable component of every row."""
        x = self._check_x(x, Comm(False))[0]
        out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        for s, e, lp, _, _ in self._chunks_log_prob(x):
            out[s:e] = lp.argmax(1)
        return out

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> float:
        """Mean log-likelihood of the rows of x (of all ranks' rows when distributed: then
        every rank must call it)."""
        comm = self._comm()
        return self._e_step(self._check_x(x, comm)[0], comm, accumulate=False)[0]

    # -- EM -------------------------------------------------------------------------------------
    def _comm(self) -> Comm:
        return Comm(self.distributed is not False)

    def _chunk(self) -> int:
        return self.chunk_size or max(256, (1 << 22) // self.n_components)

    def _log_density_terms(self, dtype: torch.dtype):
        """(const (K,), weight, prec) of the weighted log-densities in `dtype`: for "diag",
        lp = const + [x, x^2] @ weight with weight (2D, K); for "spherical",
        lp = const + x @ weight - |x|^2 prec / 2 with weight (D, K), prec (K,)."""
        mu, var, w = (t.to(dtype) for t in (self.means, self.variances, self.weights))
        log2pi = math.log(2 * math.pi)
        d = mu.shape[1]
        prec = 1.0 / var                                              # (K, D) or (K,)
        if self.covariance_type == "diag":
            const = -0.5 * (d * log2pi + var.log().sum(1) + (mu * mu * prec).sum(1))
            # [x, x^2] @ [mu / var; -1/(2 var)]: the expanded quadratic form in one GEMM,
            # instead of an (m, K, D) difference tensor.
            weight = torch.cat([(mu * prec).T, -0.5 * prec.T])       # (2D, K)
        else:
            const = -0.5 * (d * (log2pi + var.log()) + (mu * mu).sum(1) * prec)
            weight = (mu * prec[:, None]).T                           # (D, K)
        return const + w.log(), weight, prec

    def _log_density(self, xx: torch.Tensor, x_sq: torch.Tensor | None, terms, cols=None) -> torch.Tensor:
        """(m, K) weighted log-densities (or only the columns `cols`) of rows xx = [x, x^2]
        with squared norms x_sq (m, 1) (needed for "spherical" only)."""
        const, weight, prec = terms
        d = xx.shape[1] // 2
        if cols is not None:
            const, weight = const[cols], weight[:, cols]
        if self.covariance_type == "diag":
            return torch.addmm(const, xx, weight)
        prec = prec if cols is None else prec[cols]
        lp = torch.addmm(const, xx[:, :d], weight)
        return lp.addcmul_(x_sq.to(lp.dtype), prec, value=-0.5)

    def _chunks_log_prob(self, x: torch.Tensor):
        """Yield (start, end, (m, K) weighted log-densities log w_k + log N(x | k), the
        (m, 2 D) block [x, x * x] of those rows in the compute dtype, and `exact`).  The
        block is a reused buffer: use it before asking for the next chunk.

        The expanded quadratic form cancels: its rounding error is about eps sqrt(D)
        max_d(1/var_k) (|x|^2 + |mu_k|^2) / 2 nats.  In float32 that bound is at most
        ~0.03 nats for usual components (60,000 MNIST digits in 256-d, K=100, variances
        down to 0.0075) but hundreds for one that has collapsed onto a point or two
        (variance reg_covar = 1e-6).  Columns whose bound exceeds _MAX_ROUNDING_NATS in
        the chunk are recomputed in float64, and `exact` = (their indices, the block in
        float64) lets the M-step sum them in float64 too; else `exact` is None."""
        cdtype = self.means.dtype
        d = self.means.shape[1]
        terms = self._log_density_terms(cdtype)
        check = cdtype != torch.float64
        terms64 = None                     # float64 terms, built only if some column needs them
        if check:
            prec = terms[2].to(torch.float64)
            scale = prec.amax(1) if prec.dim() == 2 else prec                      # (K,)
            mu_sq = (self.means.to(torch.float64) ** 2).sum(1)
            risk_per_sq = 0.5 * torch.finfo(cdtype).eps * math.sqrt(d) * scale     # nats per unit of |x|^2
        chunk = self._chunk()
        xx_buf = torch.empty((min(chunk, x.shape[0]), 2 * d), dtype=cdtype, device=x.device)
        for s in range(0, x.shape[0], chunk):
            xx = _with_squares(x[s:s + chunk], xx_buf)
            # Row norms serve the spherical densities and the rounding check alike.
            x_sq = xx[:, d:].sum(1, keepdim=True) if check or self.covariance_type == "spherical" else None
            lp = self._log_density(xx, x_sq, terms)
            exact = None
            if check and xx.shape[0]:
                x_sq_max = x_sq.max().to(torch.float64)
                cols = (risk_per_sq * (x_sq_max + mu_sq) > _MAX_ROUNDING_NATS).nonzero().squeeze(1)
                if cols.numel():
                    if terms64 is None:
                        terms64 = self._log_density_terms(torch.float64)
                    # The squares in float64 too: float32's are off by eps |x|^2 each, which the
                    # precision of a collapsed component multiplies into hundreds of nats.
                    x64 = xx[:, :d].to(torch.float64)
                    xx64 = torch.cat([x64, x64 * x64], dim=1)
                    lp[:, cols] = self._log_density(xx64, xx64[:, d:].sum(1, keepdim=True), terms64,
                                                    cols).to(cdtype)
                    exact = (cols, xx64)
            yield s, s + xx.shape[0], lp, xx, exact

    def _e_step(self, x: torch.Tensor, comm: Comm, *, accumulate: bool):
        """Mean log-likelihood over all ranks' rows and, if asked, the M-step statistics
        summed over all ranks (float64): nk (K,), sum_i r_ik x_i (K, D), sum_i r_ik x_i^2
        (K, D)."""
        k, d = self.means.shape
        # One buffer for one all-reduce: [log-likelihood sum, rows, nk, sx, sxx].
        buf = torch.zeros(2 + (k + 2 * k * d if accumulate else 0), dtype=torch.float64, device=x.device)
        buf[1] = x.shape[0]
        nk, sx, sxx = self._stat_views(buf, k, d)
        for _, _, lp, xx, exact in self._chunks_log_prob(x):
            norm, resp = _normalize_log_prob_(lp)
            buf[0] += norm.sum(dtype=torch.float64)
            if accumulate:
                self._accumulate(xx, resp, nk, sx, sxx, exact)
        comm.sum_(buf)
        return float(buf[0].item()) / float(buf[1].item()), (nk, sx, sxx)

    @staticmethod
    def _stat_views(buf: torch.Tensor, k: int, d: int):
        """Views nk (K,), sx (K, D), sxx (K, D) into buf[2:] (None if buf holds no statistics)."""
        if buf.numel() == 2:
            return None, None, None
        return buf[2:2 + k], buf[2 + k:2 + k + k * d].view(k, d), buf[2 + k + k * d:].view(k, d)

    @staticmethod
    def _accumulate(xx, resp, nk, sx, sxx, exact=None) -> None:
        """Add the statistics of rows [x, x * x] = xx (m, 2D) with responsibilities resp
        (m, K): one GEMM gives both sums.  exact = (columns, xx in float64): those
        components' sums are taken in float64 (their variance is tiny, so sxx / nk - mu^2
        would cancel in float32)."""
        d = sx.shape[1]
        nk += resp.sum(0, dtype=torch.float64)
        both = (resp.T @ xx).to(torch.float64)                        # (K, 2D)
        if exact is not None:
            cols, xx64 = exact
            both[cols] = resp[:, cols].T.to(torch.float64) @ xx64
        sx += both[:, :d]
        sxx += both[:, d:]

    def _m_step(self, nk, sx, sxx, *, n: int) -> None:
        cdtype = self.means.dtype if self.means is not None else self._cdtype
        # Same guard as scikit-learn against components without any responsibility, at the
        # precision of the sums (float64), not of the parameters: float32's eps made it 5e8
        # times larger, which shrank the means of nearly empty components towards 0 and
        # changed which ones collapsed (MNIST, K=10, spherical: the lower bound ended 0.56 %
        # off float64's).
        nk = nk + 10 * torch.finfo(torch.float64).eps
        means = sx / nk[:, None]
        var = (sxx / nk[:, None] - means * means).clamp(min=0) + self.reg_covar
        if self.covariance_type == "spherical":
            var = var.mean(1)
        self.weights = (nk / n).to(cdtype)
        self.means = means.to(cdtype)
        self.variances = var.to(cdtype)

    def _set_initial_parameters(self, x: torch.Tensor, cdtype: torch.dtype, comm: Comm, n_total: int,
                                offset: int) -> None:
        """Initial weights, means, variances from `init`; x is this rank's shard, whose
        first row is row `offset` of all the data."""
        k, (n, d) = self.n_components, x.shape
        self._cdtype = cdtype
        if isinstance(self.init, dict):
            self._set_given_parameters(x, cdtype, comm)
            return
        buf = torch.zeros(2 + k + 2 * k * d, dtype=torch.float64, device=x.device)
        nk, sx, sxx = self._stat_views(buf, k, d)
        chunk = self._chunk()
        xx_buf = torch.empty((min(chunk, n), 2 * d), dtype=cdtype, device=x.device)
        if self.init == "k-means":
            labels = KMeans(k, n_init=1, seed=self.seed, chunk_size=self.chunk_size,
                            distributed=comm.active).fit(x).labels
            for s in range(0, n, chunk):
                resp = torch.nn.functional.one_hot(labels[s:s + chunk], k).to(cdtype)
                self._accumulate(_with_squares(x[s:s + chunk], xx_buf), resp, nk, sx, sxx)
        else:
            for lo, resp in self._random_responsibilities(offset, n):
                m = resp.shape[0]
                for s in range(0, m, chunk):
                    xx = _with_squares(x[lo + s:lo + min(m, s + chunk)], xx_buf)
                    self._accumulate(xx, resp[s:s + chunk].to(x.device, cdtype), nk, sx, sxx)
        comm.sum_(buf)
        self.means = None
        self._m_step(nk, sx, sxx, n=n_total)

    def _random_responsibilities(self, offset: int, n: int):
        """Yield (local start row, (m, K) float64 random responsibilities) for global rows
        [offset, offset + n): block b of _RANDOM_BLOCK global rows is always drawn whole
        from its own generator, so the draws do not depend on the sharding."""
        k, size = self.n_components, _RANDOM_BLOCK
        for b in range(offset // size, -(-(offset + n) // size)):
            g = restart_generator(self.seed, b, stream=_RANDOM_STREAM)
            block = torch.rand((size, k), generator=g, dtype=torch.float64)
            lo, hi = max(b * size, offset), min((b + 1) * size, offset + n)
            resp = block[lo - b * size:hi - b * size]
            yield lo - offset, resp / resp.sum(1, keepdim=True)

    def _set_given_parameters(self, x: torch.Tensor, cdtype: torch.dtype, comm: Comm) -> None:
        """Parameters from the init dict (rank 0's when sharded), checked on every rank."""
        k, d = self.n_components, x.shape[1]
        w, mu, var = (torch.as_tensor(self.init[key]).to(device=x.device, dtype=cdtype)
                      for key in ("weights", "means", "variances"))
        var_shape = (k, d) if self.covariance_type == "diag" else (k,)
        error = None
        if w.shape != (k,) or mu.shape != (k, d) or var.shape != var_shape:
            error = (f"initial parameters must have shapes weights {(k,)}, means {(k, d)}, "
                     f"variances {var_shape}; got {tuple(w.shape)}, {tuple(mu.shape)}, {tuple(var.shape)}")
        elif not (_all_finite(w) and _all_finite(mu) and _all_finite(var)):
            error = "initial parameters contain NaN or inf"
        elif not (bool((var > 0).all()) and bool((w > 0).all())):
            error = "initial weights and variances must be positive"
        _raise_together(comm, error, x.device, "init")
        for t in (w, mu, var):
            comm.broadcast_(t, src=0)
        self.weights, self.means, self.variances = w / w.sum(), mu, var

    def _check_x(self, x, comm: Comm, *, fitting: bool = False) -> tuple[torch.Tensor, list[int]]:
        """x as a detached float tensor and every rank's row count; every rank raises
        the same error together (one rank alone would leave the others waiting)."""
        x = _as_float_tensor(x).detach()
        error = None
        if x.dim() != 2:
            error = f"x must be 2-D (N, D), got shape {tuple(x.shape)}"
        elif not fitting and self.means is not None and x.shape[1] != self.means.shape[1]:
            error = f"x must have {self.means.shape[1]} features, got {x.shape[1]}"
        elif not _all_finite(x):
            error = "x contains NaN or inf"
        if not fitting and self.means is None:
            raise RuntimeError("GaussianMixture used before fit")
        n, d = (x.shape[0], x.shape[1]) if x.dim() == 2 else (0, -1)
        info = torch.tensor([n, d], dtype=torch.int64, device=x.device)
        rows = [t.tolist() for t in comm.all_gather(info)]
        _raise_together(comm, error, x.device, "x")
        if len({r[1] for r in rows}) > 1:
            raise ValueError(f"x has a different number of features on different ranks: {[r[1] for r in rows]}")
        return x, [r[0] for r in rows]


def _normalize_log_prob_(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((m, 1) log-sum-exp of each row of lp (m, K), (m, K) posteriors), from one exp;
    lp is overwritten by the posteriors.

    Shifted log-densities are raised to 1 above log(smallest normal float) before the
    exp: the CPU's exp is 10-20x slower from there down, where its result underflows
    (measured on 42,000 x 100 float32: 5 ms at -87.0, 122 ms at -87.34 = log(tiny), 57 ms at
    -200; float64: 7 ms at -700, 51 ms at -800), and most log-densities lie below it (93 %
    on 60,000 MNIST features with K=100: far components lie hundreds to thousands below
    the best one).  Such a posterior becomes ~3e-38 (float32) or ~6e-308 (float64) instead
    of 0, far below the rounding of the row's sum, which is at least 1.
    """
    top = lp.amax(1, keepdim=True)
    floor = math.log(torch.finfo(lp.dtype).tiny) + 1.0
    dens = lp.sub_(top).clamp_(min=floor).exp_()
    mass = dens.sum(1, keepdim=True)
    return mass.log().add_(top), dens.div_(mass)


def _with_squares(rows: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """[rows, rows * rows] (m, 2D) in buf's dtype, written into buf (at least (m, 2D))."""
    m, d = rows.shape
    out = buf[:m]
    out[:, :d].copy_(rows)
    torch.mul(out[:, :d], out[:, :d], out=out[:, d:])
    return out


def _raise_together(comm: Comm, error: str | None, device: torch.device, what: str) -> None:
    """Raise ValueError on every rank if any rank found an error in `what`: a rank's own
    message where it has one, else which ranks did."""
    flag = torch.tensor([error is not None], dtype=torch.int64, device=device)
    bad = [i for i, t in enumerate(comm.all_gather(flag)) if t.item()]
    if error is not None:
        raise ValueError(error + (f" (on ranks {bad})" if comm.active else ""))
    if bad:
        raise ValueError(f"{what} is invalid on ranks {bad} (their errors say why)")
