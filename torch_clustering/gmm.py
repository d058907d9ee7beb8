"""Gaussian mixture model fitted by EM, with diagonal or spherical covariances.

Follows scikit-learn's ``GaussianMixture`` step for step, so the two agree from the same
initial parameters: each iteration runs an E-step with the current parameters (its mean
log-likelihood is that iteration's lower bound), then an M-step; it stops when the lower
bound changes by less than `tol`.  A variance floor `reg_covar` is added to every
variance.  One pass over x per iteration computes the responsibilities chunk by chunk
(memory O(chunk_size x K)) and accumulates the M-step statistics in float64 at once.
"""
from __future__ import annotations

import logging
import math

import torch

from ._assign import compute_dtype_for
from .kmeans import KMeans, _as_float_tensor

logger = logging.getLogger(__name__)

_COV_TYPES = ("diag", "spherical")


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

    After `fit`: `weights` (K,), `means` (K, D), `variances` ((K, D) or (K,)),
    `lower_bound`, `lower_bound_history` (one per iteration), `n_iter`, `converged`.
    """

    def __init__(self, n_components: int, *, covariance_type: str = "diag", max_iter: int = 100,
                 tol: float = 1e-3, seed: int = 0, init: str | dict = "k-means",
                 reg_covar: float = 1e-6, chunk_size: int | None = None) -> None:
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
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.max_iter = max_iter
        self.tol = float(tol)
        self.seed = int(seed)
        self.init = init
        self.reg_covar = float(reg_covar)
        self.chunk_size = chunk_size
        self.weights = self.means = self.variances = None
        self.lower_bound = -math.inf
        self.lower_bound_history: list[float] = []
        self.n_iter = 0
        self.converged = False

    # -- public API -------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> "GaussianMixture":
        """Fit on x (N, D), any floating dtype and device; returns self."""
        x = self._check_x(x, fitting=True)
        k = self.n_components
        if x.shape[0] < k:
            raise ValueError(f"n_samples={x.shape[0]} should be >= n_components={k}")
        cdtype = compute_dtype_for(x.dtype)
        self._set_initial_parameters(x, cdtype)
        history = []
        self.converged = False
        prev = -math.inf
        for it in range(1, self.max_iter + 1):
            lower_bound, stats = self._e_step(x, accumulate=True)
            self._m_step(*stats, n=x.shape[0])
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
        x = self._check_x(x)
        out = torch.empty((x.shape[0], self.n_components), dtype=self.means.dtype, device=x.device)
        for s, e, lp in self._chunks_log_prob(x):
            out[s:e] = (lp - torch.logsumexp(lp, dim=1, keepdim=True)).exp()
        return out.to(x.dtype)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) int64 most probable component of every row."""
        x = self._check_x(x)
        out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        for s, e, lp in self._chunks_log_prob(x):
            out[s:e] = lp.argmax(1)
        return out

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> float:
        """Mean log-likelihood of the rows of x."""
        return self._e_step(self._check_x(x), accumulate=False)[0]

    # -- EM -------------------------------------------------------------------------------------
    def _chunk(self) -> int:
        return self.chunk_size or max(256, (1 << 22) // self.n_components)

    def _chunks_log_prob(self, x: torch.Tensor):
        """Yield (start, end, (m, K) weighted log-densities log w_k + log N(x | k))."""
        mu, var = self.means, self.variances
        cdtype = mu.dtype
        log2pi = math.log(2 * math.pi)
        d = mu.shape[1]
        if self.covariance_type == "diag":
            prec = 1.0 / var                                          # (K, D)
            const = -0.5 * (d * log2pi + var.log().sum(1) + (mu * mu * prec).sum(1))
            lin, quad = (mu * prec).T, prec.T                         # (D, K) each
        else:
            prec = 1.0 / var                                          # (K,)
            const = -0.5 * (d * (log2pi + var.log()) + (mu * mu).sum(1) * prec)
            lin = (mu * prec[:, None]).T
        const = const + self.weights.log()
        for s in range(0, x.shape[0], self._chunk()):
            xc = x[s:s + self._chunk()].to(cdtype)
            # Expanded quadratic form: two GEMMs instead of an (m, K, D) difference tensor.
            if self.covariance_type == "diag":
                lp = torch.addmm(const, xc, lin) - 0.5 * ((xc * xc) @ quad)
            else:
                lp = torch.addmm(const, xc, lin) - 0.5 * (xc * xc).sum(1, keepdim=True) * prec
            yield s, s + xc.shape[0], lp

    def _e_step(self, x: torch.Tensor, *, accumulate: bool):
        """Mean log-likelihood and, if asked, the M-step statistics (float64):
        nk (K,), sum_i r_ik x_i (K, D), sum_i r_ik x_i^2 (K, D)."""
        k, d = self.means.shape
        f64 = dict(dtype=torch.float64, device=x.device)
        total = torch.zeros((), **f64)
        nk, sx, sxx = torch.zeros(k, **f64), torch.zeros((k, d), **f64), torch.zeros((k, d), **f64)
        for s, e, lp in self._chunks_log_prob(x):
            norm = torch.logsumexp(lp, dim=1, keepdim=True)
            total += norm.sum(dtype=torch.float64)
            if accumulate:
                self._accumulate(x[s:e].to(lp.dtype), (lp - norm).exp(), nk, sx, sxx)
        return float(total.item()) / x.shape[0], (nk, sx, sxx)

    @staticmethod
    def _accumulate(xc, resp, nk, sx, sxx) -> None:
        nk += resp.sum(0, dtype=torch.float64)
        sx += (resp.T @ xc).to(torch.float64)
        sxx += (resp.T @ (xc * xc)).to(torch.float64)

    def _m_step(self, nk, sx, sxx, *, n: int) -> None:
        cdtype = self.means.dtype if self.means is not None else self._cdtype
        # Same guard as scikit-learn against components without any responsibility.
        nk = nk + 10 * torch.finfo(cdtype).eps
        means = sx / nk[:, None]
        var = (sxx / nk[:, None] - means * means).clamp(min=0) + self.reg_covar
        if self.covariance_type == "spherical":
            var = var.mean(1)
        self.weights = (nk / n).to(cdtype)
        self.means = means.to(cdtype)
        self.variances = var.to(cdtype)

    def _set_initial_parameters(self, x: torch.Tensor, cdtype: torch.dtype) -> None:
        k, (n, d) = self.n_components, x.shape
        self._cdtype = cdtype
        if isinstance(self.init, dict):
            w, mu, var = (torch.as_tensor(self.init[key]).to(device=x.device, dtype=cdtype)
                          for key in ("weights", "means", "variances"))
            var_shape = (k, d) if self.covariance_type == "diag" else (k,)
            if w.shape != (k,) or mu.shape != (k, d) or var.shape != var_shape:
                raise ValueError(f"initial parameters must have shapes weights {(k,)}, means {(k, d)}, "
                                 f"variances {var_shape}; got {tuple(w.shape)}, {tuple(mu.shape)}, "
                                 f"{tuple(var.shape)}")
            if not (bool((var > 0).all()) and bool((w > 0).all())):
                raise ValueError("initial weights and variances must be positive")
            self.weights, self.means, self.variances = w / w.sum(), mu, var
            return
        f64 = dict(dtype=torch.float64, device=x.device)
        nk, sx, sxx = torch.zeros(k, **f64), torch.zeros((k, d), **f64), torch.zeros((k, d), **f64)
        chunk = self._chunk()
        if self.init == "k-means":
            labels = KMeans(k, n_init=1, seed=self.seed, chunk_size=self.chunk_size).fit(x).labels
            for s in range(0, n, chunk):
                xc = x[s:s + chunk].to(cdtype)
                resp = torch.nn.functional.one_hot(labels[s:s + chunk], k).to(cdtype)
                self._accumulate(xc, resp, nk, sx, sxx)
        else:
            g = torch.Generator().manual_seed(self.seed)
            for s in range(0, n, chunk):
                xc = x[s:s + chunk].to(cdtype)
                resp = torch.rand((xc.shape[0], k), generator=g, dtype=torch.float64).to(x.device, cdtype)
                self._accumulate(xc, resp / resp.sum(1, keepdim=True), nk, sx, sxx)
        self.means = None
        self._m_step(nk, sx, sxx, n=n)

    def _check_x(self, x, *, fitting: bool = False) -> torch.Tensor:
        x = _as_float_tensor(x).detach()
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D (N, D), got shape {tuple(x.shape)}")
        if not fitting:
            if self.means is None:
                raise RuntimeError("GaussianMixture used before fit")
            if x.shape[1] != self.means.shape[1]:
                raise ValueError(f"x must have {self.means.shape[1]} features, got {x.shape[1]}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf")
        return x
