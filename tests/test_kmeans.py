"""torch_clustering.KMeans against scikit-learn's Lloyd, a hand-written spherical k-means, constructed
empty-cluster cases, its input checks, and real two-process runs (torchrun, gloo) against one process."""
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SkKMeans
from sklearn.datasets import make_blobs

from tests.torchrun_util import REPO_ROOT, load_script, run_torchrun
import torch_clustering._assign as assign_module
import torch_clustering.kmeans as kmeans_module
from torch_clustering import KMeans, KMeansResult
from torch_clustering._dist import Comm
from torch_clustering.kmeans import _prepare

SCRIPTS = REPO_ROOT / "tests" / "dist_scripts"


def overlapping_blobs(n, d, k, seed, dtype=np.float64):
    """Blobs that overlap (unit noise, centres ~2 apart), so Lloyd keeps moving labels for many
    iterations; plus K distinct rows as initial centroids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k // 2 + 1, d)) * 2
    x = (centres[rng.integers(len(centres), size=n)] + rng.normal(size=(n, d))).astype(dtype)
    return x, x[rng.choice(n, k, replace=False)].copy()


def inertia_np(x, centroids, labels):
    x, c = np.asarray(x, np.float64), np.asarray(centroids, np.float64)
    return float(((x - c[labels]) ** 2).sum())


def nearest_np(x, centroids):
    x, c = np.asarray(x, np.float64), np.asarray(centroids, np.float64)
    return ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)


@pytest.fixture(params=["bounds", "dense"])
def lloyd_path(request, monkeypatch):
    """Runs a test twice: Lloyd with its pruning bounds, and the dense path that small fits take
    (every distance recomputed each iteration)."""
    monkeypatch.setattr(kmeans_module, "_DENSE_MAX_WORK", 0 if request.param == "bounds" else 1 << 62)
    return request.param


def sklearn_lloyd(x, init, max_iter, tol=0.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # "max_iter reached" is what these tests ask for
        return SkKMeans(init.shape[0], init=init, n_init=1, max_iter=max_iter, tol=tol,
                        algorithm="lloyd").fit(x)


# -- against scikit-learn's Lloyd from the same initial centroids -----------------------------------

# (K, dtype, chunk_size, max_iter, tol): K=8 is one centroid group; K=100 (20 groups of 5) and K=300
# (32 groups of 10, the last padded) use group lower bounds, K=300 also the exact-distance tightening;
# a chunk size of 97 splits every pass into blocks.
LLOYD_CASES = [
    (8, np.float64, None, 1, 0.0),
    (8, np.float64, None, 5, 0.0),
    (8, np.float64, 31, 300, 0.0),        # runs to strict convergence
    (100, np.float64, None, 6, 0.0),
    (100, np.float64, None, 300, 1e-2),   # stop on sklearn's tolerance rule (at 1e-4 both converge strictly
    (8, np.float64, None, 300, 1e-3),     # first, at the same iteration, and the rule went unchecked)
    (300, np.float64, 97, 4, 0.0),
    (300, np.float32, None, 300, 0.0),
    (8, np.float32, None, 300, 0.0),      # float32 with few centroids: oneDNN products on the CPU
]


@pytest.mark.parametrize("k,dtype,chunk,max_iter,tol", LLOYD_CASES)
def test_lloyd_matches_sklearn_from_same_init(k, dtype, chunk, max_iter, tol, lloyd_path):
    x, c0 = overlapping_blobs(4000, 12, k, seed=k + max_iter)
    x, c0 = x.astype(dtype), c0.astype(dtype)
    sk = sklearn_lloyd(x, c0, max_iter, tol)
    res = KMeans(k, init=torch.from_numpy(c0), max_iter=max_iter, tol=tol, chunk_size=chunk).fit(torch.from_numpy(x))
    assert isinstance(res, KMeansResult)
    assert res.labels.dtype == torch.int64 and res.labels.shape == (4000,)
    assert res.centroids.dtype == torch.from_numpy(x).dtype and res.centroids.shape == (k, 12)
    assert res.n_iter == sk.n_iter_ and len(res.inertia_history) == res.n_iter
    np.testing.assert_array_equal(res.labels.numpy(), sk.labels_)
    np.testing.assert_allclose(res.centroids.numpy(), sk.cluster_centers_, rtol=0, atol=1e-4)
    assert res.inertia == pytest.approx(sk.inertia_, rel=1e-5 if dtype == np.float32 else 1e-9)
    assert res.converged == (res.n_iter < max_iter)
    if tol > 0:   # the case really stops on the tolerance: without it, Lloyd runs on
        assert res.n_iter < sklearn_lloyd(x, c0, max_iter, 0.0).n_iter_
    # Lloyd never increases the objective from one assignment to the next.
    hist = np.array(res.inertia_history)
    assert (np.diff(hist) <= 1e-6 * hist[0]).all()


@pytest.mark.parametrize("offset,dtype", [(0.0, torch.float32), (1e4, torch.float32),
                                          (-30.0, torch.float16), (1e6, torch.float64)])
def test_tolerance_and_norms_match_numpy(offset, dtype):
    """The tolerance (tol times the mean per-feature variance, as sklearn) and the squared row
    norms come from one chunked pass; with a large offset a plain float32 E[x^2] - E[x]^2 would
    lose the variance to cancellation."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(5000, 37)) * rng.uniform(0.5, 2, size=37) + offset).to(dtype)
    ref = x.numpy().astype(np.float64)
    data = _prepare(x, 5000, 1e-4, Comm(False), 128, False)
    rel = 1e-10 if dtype == torch.float64 else 1e-4
    assert data.tol_abs == pytest.approx(1e-4 * ref.var(0).mean(), rel=rel)
    assert data.sq_total == pytest.approx((ref ** 2).sum(), rel=1e-6 if dtype != torch.float64 else 1e-12)
    np.testing.assert_allclose(data.x_sq.numpy(), (ref ** 2).sum(1), rtol=1e-6 if dtype != torch.float64 else 1e-12)


def test_labels_are_nearest_centroids_and_inertia_is_theirs(lloyd_path):
    x, c0 = overlapping_blobs(3000, 6, 40, seed=1)
    res = KMeans(40, init=torch.from_numpy(c0), max_iter=7, tol=0.0).fit(torch.from_numpy(x))
    np.testing.assert_array_equal(res.labels.numpy(), nearest_np(x, res.centroids.numpy()))
    assert res.inertia == pytest.approx(inertia_np(x, res.centroids.numpy(), res.labels.numpy()), rel=1e-10)


# -- k-means++ with restarts: quality against scikit-learn -------------------------------------------

def greedy_kmeans_plusplus_by_hand(x: np.ndarray, k: int, generator: torch.Generator) -> np.ndarray:
    """Greedy k-means++ in numpy, one restart, from the draws `generator` gives in the order the package takes
    them (one randint for the first centre, then 2 + ln K uniforms per later centre): the D^2 sampling over the
    cumulative sum of the squared distances to the nearest centre, and the candidate with the lowest potential."""
    n, trials = len(x), 2 + int(math.log(k))
    chosen = [int(torch.randint(n, (1,), generator=generator)[0])]
    closest = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        cumulative = np.cumsum(closest)
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).numpy() * cumulative[-1]
        candidates = np.minimum(np.searchsorted(cumulative, draws), n - 1)
        with_each = [np.minimum(closest, ((x - x[c]) ** 2).sum(1)) for c in candidates]
        best = int(np.argmin([d.sum() for d in with_each]))
        chosen.append(int(candidates[best]))
        closest = with_each[best]
    return x[chosen]


@pytest.mark.parametrize("chunk_size", [7, 4096])
def test_kmeans_plusplus_takes_the_centres_a_greedy_reference_takes_from_the_same_draws(chunk_size):
    """Exact, where the inertia tests only bound the result after Lloyd (which repairs a poor start): three
    restarts at once, in blocks of rows smaller and larger than the data, each against the numpy reference."""
    from torch_clustering._init import kmeans_plusplus, restart_generator

    rng = np.random.default_rng(5)
    # Small scale: most squared distances are below 1, so a clamp or an offset of them changes the draws.
    x = 0.2 * (rng.normal(size=(300, 5)) + 4 * rng.normal(size=(6, 5))[rng.integers(6, size=300)])
    xt = torch.from_numpy(x)
    got = kmeans_plusplus(xt, (xt * xt).sum(1), 6, [restart_generator(3, r) for r in range(3)], chunk_size=chunk_size)
    for r in range(3):
        np.testing.assert_allclose(got[r].numpy(), greedy_kmeans_plusplus_by_hand(x, 6, restart_generator(3, r)),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_kmeans_plusplus_restarts_within_one_percent_of_sklearn_on_blobs(seed):
    x = make_blobs(4000, 10, centers=15, cluster_std=1.0, random_state=seed)[0]
    sk = SkKMeans(15, n_init=3, max_iter=100, random_state=seed).fit(x)
    res = KMeans(15, n_init=3, max_iter=100, seed=seed).fit(torch.from_numpy(x))
    assert res.inertia <= 1.01 * sk.inertia_
    # The reported inertia is that of the returned labels and centroids (not a stale figure).
    assert res.inertia == pytest.approx(inertia_np(x, res.centroids.numpy(), res.labels.numpy()), rel=1e-9)


def mnist_features(shared_data, n):
    """The first n MNIST training digits: pixels in [0, 1], centred, projected to 64-d by a fixed
    Gaussian matrix (float32)."""
    with np.load(shared_data / "mnist.npz", allow_pickle=False) as z:
        pixels = z["x_train"][:n].reshape(n, -1).astype(np.float32) / 255
    proj = np.random.default_rng(0).normal(size=(784, 64)).astype(np.float32) / 8
    return (pixels - pixels.mean(0)) @ proj


@pytest.mark.parametrize("k", [10, 50])
def test_kmeans_plusplus_restarts_within_one_percent_of_sklearn_on_mnist(shared_data, k):
    x = mnist_features(shared_data, 10_000)
    sk = SkKMeans(k, n_init=3, max_iter=100, random_state=0).fit(x)
    res = KMeans(k, n_init=3, max_iter=100, seed=0).fit(torch.from_numpy(x))
    assert res.inertia <= 1.01 * sk.inertia_
    assert res.inertia == pytest.approx(inertia_np(x, res.centroids.numpy(), res.labels.numpy()), rel=1e-5)


@pytest.mark.parametrize("k,d", [(10, 64), (10, 512), (100, 256)])
def test_linear_matches_float64_products_on_both_paths(monkeypatch, k, d):
    """bias + x @ w.T through oneDNN (where this build has it) and through addmm, against numpy
    in float64; a +inf bias (padding columns) stays +inf."""
    rng = np.random.default_rng(k + d)
    x, w, b = (rng.normal(size=s).astype(np.float32) for s in ((700, d), (k, d), (k,)))
    b[-1] = np.inf
    ref = b.astype(np.float64) + x.astype(np.float64) @ w.astype(np.float64).T
    paths = [False] + ([True] if assign_module._onednn_linear_works() else [])
    monkeypatch.setattr(assign_module, "_onednn_wins_here", lambda: True)   # any x86-64 CPU
    for use in paths:
        monkeypatch.setattr(assign_module, "USE_ONEDNN", use)
        wt = torch.from_numpy(w)
        assert assign_module.uses_onednn(wt) == use
        out = torch.empty(700, k)
        y = assign_module.linear(torch.from_numpy(x), wt, torch.from_numpy(b), out=out)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-4 * np.abs(ref[:, :-1]).max())
        assert np.isposinf(y.numpy()[:, -1]).all()


def test_onednn_is_used_only_on_cpus_where_it_was_measured_faster(monkeypatch):
    """AVX-512 CPUs get oneDNN's products (where this build has the op); an AVX2-only CPU,
    where the two kernels measured even, keeps addmm."""
    w = torch.empty(10, 512)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not assign_module.uses_onednn(w)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert assign_module.uses_onednn(w) == assign_module._onednn_linear_works()


@pytest.mark.parametrize("k,d", [(10, 512), (100, 256)])
def test_fit_with_onednn_products_equals_fit_with_addmm(shared_data, monkeypatch, k, d):
    """The same k-means++ restarts and Lloyd iterations on MNIST features whichever kernel
    computes the distance products (they differ only in float rounding)."""
    if not assign_module._onednn_linear_works():
        pytest.skip("this torch build has no working oneDNN linear op")
    monkeypatch.setattr(assign_module, "_onednn_wins_here", lambda: True)   # any x86-64 CPU
    with np.load(shared_data / "mnist.npz", allow_pickle=False) as z:
        pixels = z["x_train"][:6000].reshape(6000, -1).astype(np.float32) / 255
    proj = np.random.default_rng(1).normal(size=(784, d)).astype(np.float32) / np.sqrt(d)
    x = torch.from_numpy((pixels - pixels.mean(0)) @ proj)
    fits = []
    for use in (True, False):
        monkeypatch.setattr(assign_module, "USE_ONEDNN", use)
        assert assign_module.uses_onednn(torch.empty(k, d)) == use
        fits.append(KMeans(k, n_init=2, max_iter=40, tol=0.0, seed=0).fit(x))
    fast, plain = fits
    monkeypatch.setattr(assign_module, "USE_ONEDNN", True)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)   # torch's own switch counts too
    assert not assign_module.uses_onednn(torch.empty(k, d))
    assert fast.n_iter == plain.n_iter and fast.restart == plain.restart
    np.testing.assert_array_equal(fast.labels.numpy(), plain.labels.numpy())
    np.testing.assert_allclose(fast.centroids.numpy(), plain.centroids.numpy(), rtol=0, atol=1e-5)
    assert fast.inertia == pytest.approx(plain.inertia, rel=1e-6)


def test_more_restarts_keep_the_best():
    x, _ = overlapping_blobs(3000, 8, 30, seed=2, dtype=np.float32)
    one = KMeans(30, n_init=1, seed=4, max_iter=50).fit(torch.from_numpy(x))
    four = KMeans(30, n_init=4, seed=4, max_iter=50).fit(torch.from_numpy(x))
    # Restart 0 draws the same numbers in both fits: the best of four is no worse.
    assert four.inertia <= one.inertia * (1 + 1e-6)
    assert 0 <= four.restart < 4


# -- cosine (spherical) k-means against a hand-written reference ------------------------------------

def spherical_kmeans_reference(x, c0, max_iter):
    """Plain numpy in float64: assign by largest cosine, centroid = normalised sum of its points
    (an empty cluster keeps its centroid), stop when no label changes; final assignment otherwise."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = c0 / np.linalg.norm(c0, axis=1, keepdims=True)
    prev, converged = None, False
    n_iter = max_iter
    for it in range(max_iter):
        labels = (x @ c.T).argmax(1)
        if prev is not None and (labels == prev).all():
            converged, n_iter = True, it + 1
            break
        for j in range(len(c)):
            members = x[labels == j]
            if len(members):
                s = members.sum(0)
                c[j] = s / np.linalg.norm(s)
        prev = labels
    if not converged:
        labels = (x @ c.T).argmax(1)
    inertia = float((1 - (x * c[labels]).sum(1)).sum())
    return c, labels, inertia, n_iter


@pytest.mark.parametrize("k,max_iter", [(6, 1), (6, 3), (6, 50), (60, 4), (60, 50)])
def test_cosine_matches_hand_written_spherical_kmeans(k, max_iter, lloyd_path):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(600, 5)) + np.array([1.0, 0.5, 0, 0, 0])
    x *= rng.uniform(0.1, 10, size=(600, 1))          # norms must not matter
    c0 = x[rng.choice(600, k, replace=False)]
    c, labels, inertia, n_iter = spherical_kmeans_reference(x, c0, max_iter)
    res = KMeans(k, metric="cosine", init=torch.from_numpy(c0), max_iter=max_iter, tol=0.0).fit(torch.from_numpy(x))
    np.testing.assert_array_equal(res.labels.numpy(), labels)
    np.testing.assert_allclose(res.centroids.numpy(), c, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(res.centroids.numpy(), axis=1), 1.0, atol=1e-12)
    assert res.inertia == pytest.approx(inertia, rel=1e-9)
    assert res.n_iter == n_iter


# -- empty clusters ------------------------------------------------------------------------------------

def test_empty_cluster_takes_the_farthest_point_like_sklearn(lloyd_path):
    # After the first assignment cluster 2 (centroid 1000) is empty; the point farthest from its own
    # centroid is 50 (distance 40 from centroid 10), which becomes centroid 2 exactly.
    x = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [50.0]])
    c0 = np.array([[0.0], [10.0], [1000.0]])
    one = KMeans(3, init=torch.from_numpy(c0), max_iter=1, tol=0.0).fit(torch.from_numpy(x))
    np.testing.assert_allclose(one.centroids.numpy().ravel(), [0.1, 10.05, 50.0], atol=1e-12)
    np.testing.assert_array_equal(one.labels.numpy(), [0, 0, 0, 1, 1, 2])
    full = KMeans(3, init=torch.from_numpy(c0), tol=0.0).fit(torch.from_numpy(x))
    sk = sklearn_lloyd(x, c0, 300)
    np.testing.assert_allclose(full.centroids.numpy(), sk.cluster_centers_, atol=1e-12)
    np.testing.assert_array_equal(full.labels.numpy(), sk.labels_)


def test_several_empty_clusters_take_the_farthest_points_in_order(lloyd_path):
    # Clusters 2 and 3 start empty; the farthest point (50) goes to the lower index (2), the next
    # farthest (0.2, distance 0.2 from centroid 0) to cluster 3.
    x = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [50.0]])
    c0 = np.array([[0.0], [10.0], [1000.0], [2000.0]])
    res = KMeans(4, init=torch.from_numpy(c0), max_iter=1, tol=0.0).fit(torch.from_numpy(x))
    np.testing.assert_allclose(res.centroids.numpy().ravel(), [0.05, 10.05, 50.0, 0.2], atol=1e-12)
    np.testing.assert_array_equal(res.labels.numpy(), [0, 0, 3, 1, 1, 2])


def test_empty_cluster_never_takes_the_last_point_of_a_cluster(lloyd_path):
    # 100 is the farthest point from its centroid (110) but the only point of cluster 1: taking it
    # would only move the hole, so cluster 2 gets 1.5, the farthest point of cluster 0.
    x = np.array([[0.0], [1.5], [100.0]])
    c0 = np.array([[0.5], [110.0], [5000.0]])
    res = KMeans(3, init=torch.from_numpy(c0), tol=0.0).fit(torch.from_numpy(x))
    np.testing.assert_allclose(res.centroids.numpy().ravel(), [0.0, 100.0, 1.5], atol=1e-12)
    np.testing.assert_array_equal(res.labels.numpy(), [0, 2, 1])
    assert res.inertia == pytest.approx(0.0, abs=1e-12)



def test_empty_clusters_do_not_drain_a_cluster_between_them(lloyd_path):
    # Clusters 2 and 3 start empty.  The two points farthest from their centroid (105, then 100)
    # are the only two of cluster 1: the first goes to cluster 2, the second would leave cluster 1
    # empty, so cluster 3 gets the next farthest point, 2.5 from cluster 0.
    x = np.array([[0.0], [1.0], [2.5], [100.0], [105.0]])
    c0 = np.array([[1.0], [102.0], [5000.0], [6000.0]])
    res = KMeans(4, init=torch.from_numpy(c0), max_iter=1, tol=0.0).fit(torch.from_numpy(x))
    np.testing.assert_allclose(res.centroids.numpy().ravel(), [0.5, 100.0, 105.0, 2.5], atol=1e-12)
    np.testing.assert_array_equal(res.labels.numpy(), [0, 0, 3, 1, 2])

# -- determinism, API, dtypes ------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_same_seed_same_result_other_seed_other_result(init):
    x = torch.from_numpy(overlapping_blobs(2000, 8, 20, seed=5, dtype=np.float32)[0])
    a = KMeans(20, init=init, n_init=2, seed=11, max_iter=30).fit(x)
    b = KMeans(20, init=init, n_init=2, seed=11, max_iter=30).fit(x)
    c = KMeans(20, init=init, n_init=2, seed=12, max_iter=30).fit(x)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    assert a.inertia == b.inertia and a.inertia_history == b.inertia_history
    assert not torch.equal(a.centroids, c.centroids)


def test_centroid_groups_are_spatially_compact_runs_of_the_permutation():
    """The pruning bounds keep one lower bound per group of centroids: groups start at K = 20 (5 columns
    each, at most 32 groups), and the permutation puts each spatial cluster of centroids in one run."""
    from torch_clustering._assign import group_layout, group_order

    assert [group_layout(k) for k in (1, 19, 20, 21, 100, 300, 1000)] == [
        (1, 1), (1, 19), (4, 5), (4, 6), (20, 5), (32, 10), (32, 32)]
    for k, groups, size in ((20, 4, 5), (60, 12, 5), (160, 32, 5)):
        assert group_layout(k) == (groups, size)
        # `groups` tight blobs of `size` centroids, 100 apart along a random direction, shuffled
        gen = torch.Generator().manual_seed(k)
        direction = torch.nn.functional.normalize(torch.randn(7, generator=gen, dtype=torch.float64), dim=0)
        corners = 100.0 * torch.arange(groups, dtype=torch.float64)[:, None] * direction
        blob = torch.arange(k) // size
        order = torch.randperm(k, generator=gen)
        c = (corners[blob] + torch.randn(k, 7, generator=gen, dtype=torch.float64))[order]
        perm = group_order(c, groups, size)
        assert sorted(perm.tolist()) == list(range(k))                  # a permutation of the K centroids
        runs = [blob[order[perm[s:s + size]]] for s in range(0, k, size)]
        assert all(len(set(run.tolist())) == 1 for run in runs), runs  # each run is one blob
    assert torch.equal(group_order(torch.randn(19, 3), 1, 19), torch.arange(19))   # one group: as given


def test_random_init_draws_k_distinct_rows_uniformly_from_all_n():
    """init="random": K distinct rows of x, every row equally likely (a chi-square test over 600 draws),
    restart r's rows the same whether it is drawn alone or beside others."""
    from scipy.stats import chisquare

    from torch_clustering._init import random_init, restart_generator

    n, k = 40, 5
    x = torch.arange(n * 3, dtype=torch.float64).view(n, 3)           # row i is (3i, 3i + 1, 3i + 2)
    counts = np.zeros(n)
    for seed in range(120):
        centroids = random_init(x, k, [restart_generator(seed, 0)], torch.float64)[0]
        rows = (centroids[:, 0] / 3).long()
        assert torch.equal(centroids, x[rows]) and len(set(rows.tolist())) == k
        np.add.at(counts, rows.numpy(), 1)
    assert counts.min() > 0 and chisquare(counts).pvalue > 1e-3         # rows past D = 3 are drawn too
    together = random_init(x, k, [restart_generator(7, r) for r in range(3)], torch.float32)
    assert together.shape == (3, k, 3) and together.dtype == torch.float32
    torch.testing.assert_close(together[2], random_init(x, k, [restart_generator(7, 2)], torch.float32)[0])


def test_predict_fit_predict_and_fitted_centroids():
    x = torch.from_numpy(overlapping_blobs(1500, 4, 9, seed=3)[0])
    km = KMeans(9, seed=1)
    with pytest.raises(RuntimeError, match="before fit"):
        km.predict(x)
    res = km.fit(x)
    assert km.centroids is res.centroids
    assert torch.equal(km.predict(x), res.labels)
    assert torch.equal(km.predict(x[:10]), res.labels[:10])
    assert torch.equal(KMeans(9, seed=1).fit_predict(x), res.labels)
    with pytest.raises(ValueError, match="shape"):
        km.predict(x[:, :3])


def test_array_input_and_float64_follow_the_input():
    x = overlapping_blobs(500, 3, 5, seed=0)[0]
    res = KMeans(5, seed=0).fit(x)                    # a numpy array is accepted
    assert res.centroids.dtype == torch.float64 and res.labels.dtype == torch.int64


def test_half_precision_input_gives_half_centroids_close_to_float32():
    x, c0 = overlapping_blobs(2000, 8, 10, seed=9, dtype=np.float32)
    x16 = torch.from_numpy(x).half()
    c16 = torch.from_numpy(c0).half()
    res16 = KMeans(10, init=c16, max_iter=20, tol=0.0).fit(x16)
    res32 = KMeans(10, init=c16.float(), max_iter=20, tol=0.0).fit(x16.float())
    assert res16.centroids.dtype == torch.float16
    torch.testing.assert_close(res16.centroids.float(), res32.centroids, rtol=0, atol=2e-3)
    assert (res16.labels == res32.labels).float().mean() > 0.999
    assert res16.inertia == pytest.approx(res32.inertia, rel=1e-4)


def test_subsample_option_labels_every_point():
    x = torch.from_numpy(make_blobs(6000, 5, centers=6, cluster_std=0.5, random_state=0)[0])
    full = KMeans(6, n_init=2, seed=0).fit(x)
    sub = KMeans(6, n_init=2, seed=0, max_points_per_centroid=100).fit(x)   # fits on 600 points
    assert sub.labels.shape == (6000,)
    assert sub.inertia == pytest.approx(inertia_np(x.numpy(), sub.centroids.numpy(), sub.labels.numpy()),
                                        rel=1e-9)
    np.testing.assert_array_equal(sub.labels.numpy(), nearest_np(x.numpy(), sub.centroids.numpy()))
    assert sub.inertia <= 1.01 * full.inertia


def test_subsample_option_cosine_labels_and_inertia_of_every_point():
    """Labelling after a subsample fit sums each point's 1 - cos to its centroid (a zero row has
    cosine 0 to every centroid)."""
    x = make_blobs(3000, 6, centers=5, cluster_std=1.0, random_state=2)[0]
    x[17] = 0.0
    res = KMeans(5, metric="cosine", seed=0, max_points_per_centroid=60).fit(torch.from_numpy(x))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.where(norms > 0, x / np.maximum(norms, 1e-300), 0.0)
    cos = unit @ res.centroids.numpy().T
    others = np.arange(3000) != 17                  # the zero row ties with every centroid
    np.testing.assert_array_equal(res.labels.numpy()[others], cos.argmax(1)[others])
    assert res.inertia == pytest.approx(float((1 - cos[np.arange(3000), res.labels.numpy()]).sum()), rel=1e-9)


def test_refinement_after_subsample_is_lloyd_on_all_points_from_the_subsample_centroids(lloyd_path):
    x = torch.from_numpy(overlapping_blobs(5000, 6, 10, seed=8)[0])
    sub = KMeans(10, n_init=2, seed=1, max_points_per_centroid=50).fit(x)
    refined = KMeans(10, n_init=2, seed=1, max_points_per_centroid=50, refine_iter=6, tol=0.0).fit(x)
    again = KMeans(10, init=sub.centroids, max_iter=6, tol=0.0).fit(x)
    torch.testing.assert_close(refined.centroids, again.centroids, rtol=0, atol=1e-12)
    assert torch.equal(refined.labels, again.labels)
    assert refined.inertia == pytest.approx(again.inertia, rel=1e-12)
    assert refined.n_iter == again.n_iter and refined.inertia_history == pytest.approx(again.inertia_history)
    assert refined.inertia < sub.inertia


def test_one_cluster_is_the_mean():
    x = torch.randn(100, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = KMeans(1).fit(x)
    torch.testing.assert_close(res.centroids[0], x.mean(0))
    assert res.converged and (res.labels == 0).all()


# -- bad input ----------------------------------------------------------------------------------------

GOOD_X = torch.randn(20, 3)


@pytest.mark.parametrize("make,x,match", [
    (lambda: KMeans(3), torch.randn(20), "2-D"),
    (lambda: KMeans(3), torch.randn(4, 5, 3), "2-D"),
    (lambda: KMeans(30), GOOD_X, "n_samples=20 should be >= n_clusters=30"),
    (lambda: KMeans(3), torch.where(torch.arange(60).view(20, 3) == 7, float("nan"), GOOD_X), "NaN or inf"),
    (lambda: KMeans(3), torch.where(torch.arange(60).view(20, 3) == 7, float("inf"), GOOD_X), "NaN or inf"),
    (lambda: KMeans(3, init=torch.zeros(3, 4)), GOOD_X, r"shape \(n_clusters=3, D=3\)"),
    (lambda: KMeans(3), torch.arange(60).view(20, 3), "floating-point"),
])
def test_bad_input_raises_value_error_at_fit(make, x, match):
    with pytest.raises(ValueError, match=match):
        make().fit(x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_clusters=0), "n_clusters must be an integer >= 1"),
    (dict(n_clusters=-2), "n_clusters must be an integer >= 1"),
    (dict(n_clusters=2.5), "n_clusters must be an integer >= 1"),
    (dict(n_clusters=3, metric="manhattan"), "unknown metric 'manhattan'"),
    (dict(n_clusters=3, init="kmeans++"), "unknown init 'kmeans\\+\\+'"),
    (dict(n_clusters=3, init=torch.zeros(2, 3)), r"shape \(n_clusters=3, D\)"),
    (dict(n_clusters=3, init=torch.zeros(3)), r"shape \(n_clusters=3, D\)"),
    (dict(n_clusters=3, n_init=0), "n_init"),
    (dict(n_clusters=3, max_iter=0), "max_iter"),
    (dict(n_clusters=3, tol=-1.0), "tol"),
    (dict(n_clusters=3, distributed="ring"), "distributed"),
    (dict(n_clusters=3, refine_iter=-1), "refine_iter"),
])
def test_bad_options_raise_value_error_at_construction(kwargs, match):
    k = kwargs.pop("n_clusters")
    with pytest.raises(ValueError, match=match):
        KMeans(k, **kwargs)


def test_distributed_without_process_group_says_so():
    with pytest.raises(RuntimeError, match="init_process_group"):
        KMeans(3, distributed=True).fit(GOOD_X)


# -- two real processes (torchrun, gloo) against one process -----------------------------------------

def test_two_ranks_with_unequal_shards_equal_one_process(tmp_path):
    path = SCRIPTS / "kmeans_sharded.py"
    script = load_script(path)
    run_torchrun(path, tmp_path, nproc=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    x, init, blobs = script.make_data()
    lo, mid, hi = script.SPLIT

    # Sharded, explicit init, with two empty clusters re-seeded from different ranks.
    one = KMeans(script.K, init=init, max_iter=30, tol=0.0).fit(x)
    for r in ranks:
        torch.testing.assert_close(r["init"]["centroids"], one.centroids, rtol=0, atol=1e-10)
        assert r["init"]["inertia"] == pytest.approx(one.inertia, rel=1e-10)
        assert r["init"]["n_iter"] == one.n_iter
        assert r["init"]["inertia_history"] == pytest.approx(one.inertia_history, rel=1e-10)
    assert torch.equal(ranks[0]["init"]["centroids"], ranks[1]["init"]["centroids"])
    assert ranks[0]["init"]["labels"].shape == (mid - lo,) and ranks[1]["init"]["labels"].shape == (hi - mid,)
    assert torch.equal(torch.cat([r["init"]["labels"] for r in ranks]), one.labels)
    # The far initial centroids were re-seeded with the planted outliers, the farther one (on rank 1)
    # going to the lower cluster index; each outlier stays alone in its cluster.
    for row, cluster in zip(script.OUTLIERS[::-1], script.FAR):
        assert int(one.labels[row]) == cluster and int((one.labels == cluster).sum()) == 1
        assert torch.equal(one.centroids[cluster], x[row])

    # Sharded, fitted on a subsample drawn from both shards, then every row of each shard labelled;
    # the inertia is that of all rows.
    sub = [r["subsample"] for r in ranks]
    assert torch.equal(sub[0]["centroids"], sub[1]["centroids"]) and sub[0]["inertia"] == sub[1]["inertia"]
    labels = torch.cat([r["labels"] for r in sub])
    np.testing.assert_array_equal(labels.numpy(), nearest_np(x.numpy(), sub[0]["centroids"].numpy()))
    assert sub[0]["inertia"] == pytest.approx(inertia_np(x, sub[0]["centroids"], labels.numpy()), rel=1e-10)

    # The same fit with rank 0 on the dense path and rank 1 on the bounded one.
    for r in ranks:
        torch.testing.assert_close(r["mixed"]["centroids"], one.centroids, rtol=0, atol=1e-10)
        assert r["mixed"]["inertia"] == pytest.approx(one.inertia, rel=1e-10)
        assert r["mixed"]["n_iter"] == one.n_iter
    assert torch.equal(torch.cat([r["mixed"]["labels"] for r in ranks]), one.labels)

    # Sharded, many clusters (grouped bounds, tightening), a fixed number of iterations.
    many = KMeans(script.K_MANY, init=x[:script.K_MANY], max_iter=8, tol=0.0).fit(x)
    for r in ranks:
        torch.testing.assert_close(r["many"]["centroids"], many.centroids, rtol=0, atol=1e-10)
        assert r["many"]["inertia"] == pytest.approx(many.inertia, rel=1e-10)
    assert torch.equal(torch.cat([r["many"]["labels"] for r in ranks]), many.labels)

    # Sharded, k-means++ on a bounded sample: all ranks agree, the result is a Lloyd fixed point on
    # the concatenated data, and it is as good as one process's k-means++.
    kpp = [r["kpp"] for r in ranks]
    assert torch.equal(kpp[0]["centroids"], kpp[1]["centroids"]) and kpp[0]["inertia"] == kpp[1]["inertia"]
    labels = torch.cat([r["labels"] for r in kpp])
    assert labels.shape == (script.N,)
    np.testing.assert_array_equal(labels.numpy(), nearest_np(blobs.numpy(), kpp[0]["centroids"].numpy()))
    assert kpp[0]["inertia"] == pytest.approx(inertia_np(blobs, kpp[0]["centroids"], labels.numpy()), rel=1e-10)
    assert kpp[0]["converged"]
    one_kpp = KMeans(script.K, n_init=2, seed=3, max_iter=100).fit(blobs)
    assert kpp[0]["inertia"] <= 1.01 * one_kpp.inertia
    assert all(0 < r["kpp_largest_gather"] <= script.SAMPLE for r in ranks)

    # Replicated: restarts split over the ranks give one process's result with all restarts.
    one_rep = KMeans(script.K, n_init=3, seed=5, max_iter=100).fit(x)
    for r in ranks:
        torch.testing.assert_close(r["replicated"]["centroids"], one_rep.centroids, rtol=0, atol=1e-10)
        assert torch.equal(r["replicated"]["labels"], one_rep.labels)
        assert r["replicated"]["inertia"] == pytest.approx(one_rep.inertia, rel=1e-10)
        assert r["replicated"]["restart"] == one_rep.restart

    # Sharded statistics: sklearn's tolerance (tol * mean per-feature variance) and the sum of
    # squared norms of all rows, from float64 numpy on the whole offset data.
    whole = (x + 1e4).float().numpy().astype(np.float64)
    for r in ranks:
        assert r["prepare"]["tol_abs"] == pytest.approx(1e-4 * whole.var(0).mean(), rel=1e-4)
        assert r["prepare"]["sq_total"] == pytest.approx((whole ** 2).sum(), rel=1e-6)
