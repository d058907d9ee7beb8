"""torch_clustering: k-means, Gaussian mixtures and clustering metrics in pure PyTorch.

The clustering engine of this framework (methods re-cluster the features of the whole
dataset every epoch), usable on its own::

    import torch_clustering as tc

    km = tc.KMeans(1000, n_init=3, seed=0)          # keyword-only options, faiss-like
    res = km.fit(features)                           # (N, D) tensor on any device
    res.centroids, res.labels, res.inertia, res.inertia_history
    tc.evaluate_clustering(targets, res.labels)      # {"nmi": .., "acc": .., "ari": ..}

    gmm = tc.GaussianMixture(10, covariance_type="diag").fit(features)
    gmm.predict_proba(features)

What is where:

* `KMeans` / `KMeansResult` (`torch_clustering.kmeans`): Lloyd's algorithm with exact
  (Hamerly / Yinyang-style) pruning, greedy k-means++ or random init, Euclidean or
  cosine (spherical) metric, chunked GEMM distances (memory O(chunk_size x K)), one
  process, sharded data across ranks (``distributed=True``) or restarts split across
  ranks over replicated data (``distributed="replicated"``).  See that module's
  docstring for the exact semantics (convergence, empty clusters, precision,
  distributed modes).
* `GaussianMixture` (`torch_clustering.gmm`): EM for diagonal or spherical covariances,
  initialised from k-means like scikit-learn; one process or sharded data across ranks
  (``distributed=True``: the EM statistics are all-reduced, see that module).
* `evaluate_clustering` (`torch_clustering.metrics`): NMI, ACC (Hungarian matching) and
  ARI as python floats.

Only torch, numpy and scipy are needed at run time; scikit-learn serves as the test
oracle and faiss only in ``bench/kmeans.py``.
"""
from .gmm import GaussianMixture
from .kmeans import KMeans, KMeansResult
from .metrics import evaluate_clustering

__all__ = ["KMeans", "KMeansResult", "GaussianMixture", "evaluate_clustering"]
