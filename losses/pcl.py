"""PCL's ProtoNCE term and prototype concentration (Li, Zhou, Xiong & Hoi, ICLR 2021).

Notation: q are normalised query embeddings, c_k the normalised prototypes (k-means centroids) of one
granularity, s(i) the prototype (cluster) of sample i, phi_k the concentration of prototype k, which
acts as a per-prototype temperature: a tight cluster (small phi) sharpens its logits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def prototype_concentration(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, *,
                            temperature: float, smoothing: float = 10.0,
                            clip_quantiles: tuple[float, float] = (0.1, 0.9)) -> torch.Tensor:
    """The concentration phi (K,) of each of K clusters, as the paper estimates it.

    features: (N, D) the clustered features v' (PCL: normalised key embeddings); labels: (N,) cluster
    ids in [0, K); centroids: (K, D) the centroids the distances are measured to.
    1. phi_k = mean_{z in k} ||v'_z - c_k||_2 / log(Z_k + smoothing), Z_k the cluster's size;
    2. a cluster with Z_k <= 1 (one member, or empty) has no spread to measure: it gets the largest
       phi of the clusters with at least two members;
    3. phi is clipped to its `clip_quantiles` (10th and 90th percentiles, linear interpolation as
       numpy's default), so that outliers cannot dominate;
    4. phi is rescaled so that its mean is `temperature` (the InfoNCE temperature tau).
    Degenerate inputs (no cluster with two members, or every member on its centroid, so phi would be
    all zero) give phi = temperature for every cluster instead of a division by zero.
    """
    if features.dim() != 2 or centroids.dim() != 2 or features.shape[1] != centroids.shape[1]:
        raise ValueError(f"features (N, D) and centroids (K, D) expected, got {tuple(features.shape)} "
                         f"and {tuple(centroids.shape)}")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({features.shape[0]},), got {tuple(labels.shape)}")
    num_clusters = centroids.shape[0]
    features = features.float()
    centroids = centroids.to(features)
    labels = labels.to(features.device)
    distances = (features - centroids[labels]).norm(dim=1)                                   # (N,)
    counts = torch.bincount(labels, minlength=num_clusters).to(features.dtype)               # (K,)
    sums = torch.zeros(num_clusters, dtype=features.dtype, device=features.device).index_add_(0, labels, distances)
    phi = sums / counts.clamp_min(1) / torch.log(counts + smoothing)
    measured = counts > 1
    if not bool(measured.any()):
        return torch.full_like(phi, temperature)
    phi = torch.where(measured, phi, phi[measured].max())
    bounds = torch.quantile(phi, torch.tensor(clip_quantiles, dtype=phi.dtype, device=phi.device))
    phi = phi.clamp(bounds[0], bounds[1])
    mean = phi.mean()
    if not float(mean) > 0:
        return torch.full_like(phi, temperature)
    return phi * (temperature / mean)


def sample_negative_prototypes(positive_ids: torch.Tensor, num_prototypes: int, count: int, *,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """Up to `count` distinct prototype ids (R,) that are no sample's positive in `positive_ids` (B,).

    Drawn uniformly without replacement from the torch RNG (`generator`, or the default generator of
    the ids' device); when fewer than `count` such prototypes exist, all of them are returned (in
    increasing order), so R = min(count, prototypes not in the batch). The reference's `random.sample`
    raises instead in that case.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    free = torch.ones(num_prototypes, dtype=torch.bool, device=positive_ids.device)
    free[positive_ids] = False
    candidates = free.nonzero().squeeze(1)
    if count >= candidates.numel():
        return candidates
    order = torch.randperm(candidates.numel(), generator=generator, device=candidates.device)
    return candidates[order[:count]]


def proto_nce_level(q: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, concentration: torch.Tensor,
                    negative_ids: torch.Tensor) -> torch.Tensor:
    """One granularity's term: mean over i of
    -log[exp(q_i.c_{s(i)} / phi_{s(i)}) / (exp(q_i.c_{s(i)} / phi_{s(i)}) + sum_{j in neg} exp(q_i.c_j / phi_j))].

    q: (B, D) normalised queries (with gradient); labels: (B,) s(i), each row's positive prototype;
    prototypes: (K, D) normalised; concentration: (K,) phi; negative_ids: (R,) prototype ids shared
    by every row as negatives (see `sample_negative_prototypes`; R may be 0). A cross-entropy over B
    rows of 1 + R logits whose target is column 0.
    """
    if q.dim() != 2 or prototypes.dim() != 2 or q.shape[1] != prototypes.shape[1]:
        raise ValueError(f"q (B, D) and prototypes (K, D) expected, got {tuple(q.shape)} and {tuple(prototypes.shape)}")
    if labels.shape != q.shape[:1] or concentration.shape != prototypes.shape[:1]:
        raise ValueError(f"labels must be (B,) and concentration (K,), got {tuple(labels.shape)} and "
                         f"{tuple(concentration.shape)}")
    prototypes = prototypes.to(q.dtype)
    concentration = concentration.to(q.dtype)
    positives = (q * prototypes[labels]).sum(dim=1, keepdim=True) / concentration[labels].unsqueeze(1)  # (B, 1)
    negatives = (q @ prototypes[negative_ids].t()) / concentration[negative_ids]                        # (B, R)
    logits = torch.cat([positives, negatives], dim=1)
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, targets)


def proto_nce_loss(q: torch.Tensor, labels: Sequence[torch.Tensor], prototypes: Sequence[torch.Tensor],
                   concentrations: Sequence[torch.Tensor], negative_ids: Sequence[torch.Tensor]) -> torch.Tensor:
    """ProtoNCE's prototype part: the mean over the M granularities of `proto_nce_level`.

    Each argument after q holds one entry per granularity m: labels[m] (B,), prototypes[m] (K_m, D),
    concentrations[m] (K_m,), negative_ids[m] (R_m,). The full ProtoNCE of the paper is InfoNCE plus
    this (weight 1); the caller adds the weighted sum.
    """
    levels = len(prototypes)
    if levels == 0 or not len(labels) == len(concentrations) == len(negative_ids) == levels:
        raise ValueError(f"one labels/prototypes/concentration/negatives entry per granularity expected, got "
                         f"{len(labels)}, {levels}, {len(concentrations)}, {len(negative_ids)}")
    terms = [proto_nce_level(q, s, c, phi, neg)
             for s, c, phi, neg in zip(labels, prototypes, concentrations, negative_ids)]
    return torch.stack(terms).sum() / levels

