"""torch_clustering.GaussianMixture against scikit-learn's GaussianMixture from the same initial parameters."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from torch_clustering import GaussianMixture


def anisotropic_blobs(n=2000, d=5, k=4, seed=0, dtype=np.float64):
    """Overlapping blobs with a different scale per component and feature."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    scales = rng.uniform(0.3, 2.0, size=(k, d))
    owner = rng.integers(k, size=n)
    return (centres[owner] + scales[owner] * rng.normal(size=(n, d))).astype(dtype)


def initial_parameters(x, k, covariance_type, seed=1):
    """Deliberately rough starting point: random rows as means, unequal weights, unit variances."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 1.5, size=k)
    weights /= weights.sum()
    means = x[rng.choice(len(x), k, replace=False)].astype(np.float64)
    shape = (k, x.shape[1]) if covariance_type == "diag" else (k,)
    variances = rng.uniform(0.5, 2.0, size=shape)
    return weights, means, variances


def sklearn_from(x, weights, means, variances, covariance_type, max_iter):
    sk = SkGaussianMixture(len(weights), covariance_type=covariance_type, max_iter=max_iter, tol=0.0,
                           weights_init=weights, means_init=means, precisions_init=1.0 / variances,
                           reg_covar=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # not converged after max_iter: the point of these tests
        return sk.fit(x)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
@pytest.mark.parametrize("max_iter", [1, 5, 25])
def test_em_matches_sklearn_from_same_initial_parameters(covariance_type, max_iter):
    x = anisotropic_blobs(seed=max_iter)
    w, mu, var = initial_parameters(x, 4, covariance_type)
    sk = sklearn_from(x, w, mu, var, covariance_type, max_iter)
    gmm = GaussianMixture(4, covariance_type=covariance_type, max_iter=max_iter, tol=0.0,
                          init={"weights": torch.from_numpy(w), "means": torch.from_numpy(mu),
                                "variances": torch.from_numpy(var)}).fit(torch.from_numpy(x))
    assert gmm.n_iter == sk.n_iter_ == max_iter and len(gmm.lower_bound_history) == max_iter
    assert gmm.converged is sk.converged_ is False     # tol 0: stopped by max_iter, not converged
    assert gmm.lower_bound == pytest.approx(sk.lower_bound_, rel=1e-9)
    if hasattr(sk, "lower_bounds_"):      # scikit-learn >= 1.6 keeps the whole history
        np.testing.assert_allclose(gmm.lower_bound_history, sk.lower_bounds_, rtol=1e-9)
    np.testing.assert_allclose(gmm.weights.numpy(), sk.weights_, rtol=1e-8)
    np.testing.assert_allclose(gmm.means.numpy(), sk.means_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(gmm.variances.numpy(), sk.covariances_, rtol=1e-8)
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(gmm.predict_proba(xt).numpy(), sk.predict_proba(x), atol=1e-9)
    np.testing.assert_array_equal(gmm.predict(xt).numpy(), sk.predict(x))
    assert gmm.score(xt) == pytest.approx(sk.score(x), rel=1e-9)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_random_init_is_the_m_step_of_uniform_random_responsibilities(covariance_type):
    """init="random": responsibilities drawn uniformly and normalised per row (in blocks of 4096 global rows,
    each from its own generator), then one M-step; the fit from there is scikit-learn's from those parameters,
    computed here by hand. 5000 rows: a whole block and a part of the next."""
    from torch_clustering._init import restart_generator
    from torch_clustering.gmm import _RANDOM_BLOCK, _RANDOM_STREAM

    x = anisotropic_blobs(n=5000, seed=9)
    blocks = [torch.rand((_RANDOM_BLOCK, 4), generator=restart_generator(3, b, stream=_RANDOM_STREAM),
                         dtype=torch.float64).numpy() for b in range(2)]
    resp = np.concatenate(blocks)[:5000]
    resp /= resp.sum(1, keepdims=True)
    nk = resp.sum(0) + 10 * np.finfo(np.float64).eps
    means = resp.T @ x / nk[:, None]
    variances = resp.T @ (x * x) / nk[:, None] - means ** 2 + 1e-6
    if covariance_type == "spherical":
        variances = variances.mean(1)
    sk = sklearn_from(x, nk / 5000, means, variances, covariance_type, 3)
    gmm = GaussianMixture(4, covariance_type=covariance_type, max_iter=3, tol=0.0, init="random",
                          seed=3).fit(torch.from_numpy(x))
    assert gmm.lower_bound == pytest.approx(sk.lower_bound_, rel=1e-9)
    np.testing.assert_allclose(gmm.means.numpy(), sk.means_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(gmm.variances.numpy(), sk.covariances_, rtol=1e-7)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_float32_lower_bound_within_1e3_of_sklearn(covariance_type):
    x = anisotropic_blobs(seed=3, dtype=np.float32)
    w, mu, var = initial_parameters(x, 4, covariance_type)
    sk = sklearn_from(x, w, mu, var, covariance_type, 10)
    gmm = GaussianMixture(4, covariance_type=covariance_type, max_iter=10, tol=0.0,
                          init={"weights": w, "means": mu, "variances": var}).fit(torch.from_numpy(x))
    assert gmm.means.dtype == torch.float32
    assert gmm.lower_bound == pytest.approx(sk.lower_bound_, rel=1e-3)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_kmeans_init_converges_like_sklearn_on_separated_blobs(covariance_type):
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(5, 6)) * 8
    x = centres[rng.integers(5, size=3000)] + rng.uniform(0.5, 1.5, size=(3000, 1)) * rng.normal(size=(3000, 6))
    gmm = GaussianMixture(5, covariance_type=covariance_type, seed=0).fit(torch.from_numpy(x))
    sk = SkGaussianMixture(5, covariance_type=covariance_type, random_state=0).fit(x)
    assert gmm.converged and gmm.n_iter == len(gmm.lower_bound_history)
    assert gmm.lower_bound == pytest.approx(sk.lower_bound_, rel=1e-3)
    # EM never decreases the lower bound.
    assert (np.diff(gmm.lower_bound_history) >= -1e-9).all()
    proba = gmm.predict_proba(torch.from_numpy(x))
    assert proba.shape == (3000, 5)
    torch.testing.assert_close(proba.sum(1), torch.ones(3000, dtype=proba.dtype))
    assert torch.equal(gmm.predict(torch.from_numpy(x)), proba.argmax(1))


def test_same_seed_same_fit():
    x = torch.from_numpy(anisotropic_blobs(seed=6, dtype=np.float32))
    a = GaussianMixture(4, seed=2, max_iter=20).fit(x)
    b = GaussianMixture(4, seed=2, max_iter=20).fit(x)
    assert torch.equal(a.means, b.means) and a.lower_bound_history == b.lower_bound_history


X = torch.randn(30, 3)


@pytest.mark.parametrize("make,match", [
    (lambda: GaussianMixture(0), "n_components must be an integer >= 1"),
    (lambda: GaussianMixture(3, covariance_type="full"), "unknown covariance_type 'full'"),
    (lambda: GaussianMixture(3, init="kmeans"), "unknown init 'kmeans'"),
    (lambda: GaussianMixture(3, init={"weights": None, "means": None}), "missing \\['variances'\\]"),
    (lambda: GaussianMixture(3, max_iter=0), "max_iter"),
])
def test_bad_options_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make,x,match", [
    (lambda: GaussianMixture(3), torch.randn(30), "2-D"),
    (lambda: GaussianMixture(40), X, "n_samples=30 should be >= n_components=40"),
    (lambda: GaussianMixture(3), torch.where(torch.arange(90).view(30, 3) == 4, float("nan"), X), "NaN or inf"),
    (lambda: GaussianMixture(3, init={"weights": torch.ones(3), "means": torch.zeros(3, 2),
                                      "variances": torch.ones(3, 3)}), X, "initial parameters must have shapes"),
])
def test_bad_input_raises_value_error_at_fit(make, x, match):
    with pytest.raises(ValueError, match=match):
        make().fit(x)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_the_least_values_each_option_allows_fit(covariance_type):
    """One component with reg_covar=0 is the data's own Gaussian (its mean and biased variance, scored as
    scikit-learn scores it); chunk_size=1 fits what the default chunks fit; as many points as components
    give each point a component."""
    x = anisotropic_blobs(n=300, d=4, k=3, seed=2)
    one = GaussianMixture(1, covariance_type=covariance_type, reg_covar=0.0, max_iter=5).fit(torch.from_numpy(x))
    variance = x.var(0) if covariance_type == "diag" else np.atleast_1d(x.var(0).mean())
    np.testing.assert_allclose(one.weights.numpy(), [1.0], rtol=1e-12)
    np.testing.assert_allclose(one.means.numpy(), x.mean(0, keepdims=True), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(one.variances.numpy(), variance.reshape(one.variances.shape), rtol=1e-9)
    sk = SkGaussianMixture(1, covariance_type=covariance_type, reg_covar=0.0).fit(x)
    assert one.score(torch.from_numpy(x)) == pytest.approx(sk.score(x), rel=1e-9)

    weights, means, variances = initial_parameters(x, 3, covariance_type)
    init = {"weights": torch.from_numpy(weights), "means": torch.from_numpy(means),
            "variances": torch.from_numpy(variances)}
    fits = [GaussianMixture(3, covariance_type=covariance_type, init=init, max_iter=4, tol=0.0,
                            chunk_size=chunk_size).fit(torch.from_numpy(x)) for chunk_size in (1, None)]
    assert fits[0].lower_bound_history == pytest.approx(fits[1].lower_bound_history, rel=1e-12)

    points = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    each = GaussianMixture(3, covariance_type=covariance_type).fit(points)
    assert sorted(each.predict(points).tolist()) == [0, 1, 2]


def test_predict_before_fit_raises():
    with pytest.raises(RuntimeError, match="before fit"):
        GaussianMixture(2).predict(X)


def test_distributed_options():
    with pytest.raises(ValueError, match="'replicated' does not apply to GaussianMixture"):
        GaussianMixture(3, distributed="replicated")
    with pytest.raises(ValueError, match="distributed must be False, True or 'sharded', got 1"):
        GaussianMixture(3, distributed=1)
    with pytest.raises(RuntimeError, match=r"a distributed fit \(KMeans or GaussianMixture with "
                                           r"distributed set\) needs torch.distributed to be initialised"):
        GaussianMixture(3, distributed=True).fit(X)


def test_two_ranks_with_unequal_shards_equal_one_process(tmp_path, monkeypatch):
    """`torchrun --nproc_per_node=2` (gloo): each rank fits on its own, unequal shard; every fit
    equals one process's on the concatenated data (parameters, lower bounds, score, posteriors)."""
    import torch_clustering.gmm as gmm_module
    from tests.torchrun_util import REPO_ROOT, load_script, run_torchrun

    path = REPO_ROOT / "tests" / "dist_scripts" / "gmm_sharded.py"
    script = load_script(path)
    run_torchrun(path, tmp_path, nproc=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    x, init = script.make_data()
    monkeypatch.setattr(gmm_module, "_RANDOM_BLOCK", script.RANDOM_BLOCK)

    def compare(name, one):
        for r in ranks:
            got = r[name]
            assert got["n_iter"] == one.n_iter and got["converged"] == one.converged
            np.testing.assert_allclose(got["history"], one.lower_bound_history, rtol=1e-10)
            for key in ("weights", "means", "variances"):
                torch.testing.assert_close(got[key], getattr(one, key), rtol=1e-9, atol=1e-10)
            assert got["score"] == pytest.approx(one.score(x), rel=1e-10)
        assert torch.equal(ranks[0][name]["means"], ranks[1][name]["means"])
        proba = torch.cat([r[name]["proba"] for r in ranks])
        torch.testing.assert_close(proba, one.predict_proba(x), rtol=1e-9, atol=1e-10)

    compare("given", GaussianMixture(script.K, covariance_type="diag", max_iter=10, tol=0.0,
                                     init=init).fit(x))
    compare("random", GaussianMixture(script.K, covariance_type="spherical", max_iter=10, tol=0.0,
                                      init="random", seed=script.SEED).fit(x))
    compare("empty", GaussianMixture(script.K, covariance_type="diag", max_iter=5, tol=0.0,
                                     init="random", seed=script.SEED).fit(x))

    # k-means initialisation: rebuild it in numpy from the sharded KMeans labels of all rows.
    labels = torch.cat([r["kmeans"]["init_labels"] for r in ranks]).numpy()
    assert labels.shape == (script.N,) and len(np.unique(labels)) == script.K
    xn = x.numpy()
    nk = np.bincount(labels, minlength=script.K).astype(np.float64)
    means = np.stack([xn[labels == j].mean(0) for j in range(script.K)])
    variances = np.stack([xn[labels == j].var(0) for j in range(script.K)]) + 1e-6
    one = GaussianMixture(script.K, covariance_type="diag",
                          init={"weights": nk / nk.sum(), "means": means, "variances": variances}).fit(x)
    assert one.converged
    compare("kmeans", one)

    # A NaN on rank 1 only: both ranks raise instead of one waiting for the other.
    assert "x contains NaN or inf (on ranks [1])" in ranks[1]["nan_error"]
    assert ranks[0]["nan_error"] == "x is invalid on ranks [1] (their errors say why)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_posteriors_of_far_components_match_exact_softmax(dtype):
    """The E-step's one-exp normalisation (which raises shifted log-densities that would underflow
    to just above the underflow point, for speed) against float64 logsumexp / softmax, on rows whose
    components lie 0 to 1e5 below the best one."""
    from torch_clustering.gmm import _normalize_log_prob_

    rng = np.random.default_rng(0)
    lp = np.stack([np.array([0.0, -50.0, -86.0, -90.0, -700.0, -720.0, -1e3, -1e5]) + 3.0 * i
                   for i in range(6)])
    lp = np.concatenate([lp, rng.normal(scale=300.0, size=(50, 8)), np.full((1, 8), -4.0)])
    exact = torch.from_numpy(lp).to(dtype).double()        # the rounded inputs, in float64
    norm, post = _normalize_log_prob_(exact.to(dtype).clone())   # it overwrites its input
    # float32 rounding of the shift (values up to ~1e3) moves exp's argument by up to ~3e-5.
    tol = 5e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(norm.squeeze(1).double().numpy(), torch.logsumexp(exact, 1).numpy(),
                               rtol=tol)
    # Relative accuracy where a posterior is a normal float; an underflowing one may only become
    # the smallest normal floats (~1e-38 / ~1e-308), not anything a sum could notice.
    tiny = 1e-37 if dtype == torch.float32 else 1e-306
    np.testing.assert_allclose(post.double().numpy(), torch.softmax(exact, 1).numpy(), rtol=tol, atol=tiny)
    np.testing.assert_allclose(post.double().sum(1).numpy(), 1.0, rtol=tol)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_float32_posteriors_beside_a_collapsed_component_match_float64_by_hand(covariance_type):
    """A component collapsed onto a point (variance 1e-6) far from the origin: float32's expanded quadratic
    form is off by up to ~1e5 nats there, so its columns are recomputed in float64. Rows at distances where
    it competes with a broad component sharing its mean must get the posteriors of the float64 densities,
    written out by hand."""
    rng = np.random.default_rng(4)
    d, mean = 64, 100.0 + rng.normal(size=64)
    means = np.stack([mean, mean, -mean])                           # |mu|^2 ~ 6.4e5
    variances = np.array([1.0, 1e-6, 1.0])
    if covariance_type == "diag":
        variances = np.repeat(variances[:, None], d, axis=1)
    weights = np.array([0.5, 0.2, 0.3])
    # noise scales around the crossing of the collapsed and the broad component (about 3.7e-3)
    x = mean + np.concatenate([s * rng.normal(size=(8, d)) for s in (1e-3, 2e-3, 3e-3, 4e-3, 6e-3, 1e-2)])
    gmm = GaussianMixture(3, covariance_type=covariance_type)
    gmm.weights, gmm.means, gmm.variances = (torch.tensor(v, dtype=torch.float32) for v in (weights, means, variances))
    got = gmm.predict_proba(torch.tensor(x, dtype=torch.float32)).double().numpy()
    x64, mu64, var64, w64 = (torch.tensor(v, dtype=torch.float32).double().numpy()   # the float32 inputs, exactly
                             for v in (x, means, variances, weights))
    var_full = var64 if covariance_type == "diag" else np.repeat(var64[:, None], d, axis=1)
    log_density = np.stack([np.log(w64[k]) - 0.5 * np.log(2 * np.pi * var_full[k]).sum()
                            - 0.5 * ((x64 - mu64[k]) ** 2 / var_full[k]).sum(1) for k in range(3)], axis=1)
    expected = np.exp(log_density - log_density.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert 0.05 < expected[:, 1].mean() < 0.95                      # the two components really compete
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_float32_em_on_mnist_features_matches_sklearn(shared_data, covariance_type):
    """Real data: 3,000 MNIST digits projected to 256-d, K=10, 20 EM steps from the same
    parameters.  Far components lie hundreds below the best one here, so the E-step's
    underflow guard is exercised; float32 against scikit-learn's float64."""
    with np.load(shared_data / "mnist.npz", allow_pickle=False) as z:
        pixels = z["x_train"][:3000].reshape(3000, -1).astype(np.float64) / 255
    proj = np.random.default_rng(2).normal(size=(784, 256)) / 16.0
    x = ((pixels - pixels.mean(0)) @ proj).astype(np.float32)
    w, mu, var = initial_parameters(x, 10, covariance_type, seed=3)
    sk = sklearn_from(x.astype(np.float64), w, mu, var, covariance_type, 20)
    gmm = GaussianMixture(10, covariance_type=covariance_type, max_iter=20, tol=0.0,
                          init={"weights": w, "means": mu, "variances": var}).fit(torch.from_numpy(x))
    lp = next(gmm._chunks_log_prob(torch.from_numpy(x)))[2]
    assert float(((lp - lp.amax(1, keepdim=True)) < -87).float().mean()) > 0.3   # the guard matters here
    assert gmm.lower_bound == pytest.approx(sk.lower_bound_, rel=1e-5)
    if hasattr(sk, "lower_bounds_"):
        np.testing.assert_allclose(gmm.lower_bound_history, sk.lower_bounds_, rtol=1e-5)
    np.testing.assert_allclose(gmm.weights.numpy(), sk.weights_, rtol=1e-3, atol=1e-5)
    agree = (gmm.predict(torch.from_numpy(x)).numpy() == sk.predict(x.astype(np.float64))).mean()
    assert agree > 0.999
    np.testing.assert_allclose(gmm.predict_proba(torch.from_numpy(x)).numpy(),
                               sk.predict_proba(x.astype(np.float64)), atol=1e-3)
