"""Density-peak clustering with kNN density (DPC-kNN), as FastVID's and PruneVid's released code compute it.

FastVID scores anchor candidates with it (k=4) and its Table 2/4 cluster alternatives cluster with it;
PruneVid clusters frames and token groups with it (k=7). One arithmetic serves both:
distances are Euclidean over sqrt(D) in float32; rho = exp(-mean of the k smallest squared distances,
the point's own 0 included), plus an optional tie-break noise; delta = the distance to the nearest
point of higher rho, and for the densest point the largest distance of its whole batch; score = rho * delta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _scores_and_distances(x: torch.Tensor, k: int, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    distance = torch.cdist(x.float(), x.float()) / x.shape[-1] ** 0.5
    nearest = distance.topk(min(k, x.shape[-2]), dim=-1, largest=False).values
    rho = (-(nearest**2).mean(dim=-1)).exp()
    if noise is not None:
        rho = rho + noise
    denser = rho[..., None, :] > rho[..., :, None]  # [.., i, j]: j is denser than i
    farthest = distance.flatten(-2).max(dim=-1).values[..., None, None]
    delta = torch.where(denser, distance, farthest).min(dim=-1).values
    return rho * delta, distance


def density_scores(x: torch.Tensor, k: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """[B, P, D] points -> [B, P] density-peak scores rho * delta over each batch's points; `noise` [B, P] is added to rho."""
    return _scores_and_distances(x, k, noise)[0]


def dpc_knn(points: torch.Tensor, clusters: int, k: int, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, C] points -> each point's cluster id [n] and the centres [clusters] (point indices, by rank).

    Centres are the top `clusters` scores, a centre's id its rank; every other point joins its nearest centre
    (the lower rank on ties).
    """
    scores, distance = _scores_and_distances(points, k, noise)
    centres = scores.topk(clusters).indices
    labels = distance[centres].argmin(dim=0)
    labels[centres] = torch.arange(clusters, device=points.device)
    return labels, centres


def cluster_means(points: torch.Tensor, labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """[clusters, C] the mean of each cluster's points in the points' dtype (0 for an empty cluster)."""
    onehot = F.one_hot(labels, clusters).to(points.dtype)  # [n, clusters]
    counts = onehot.sum(dim=0)
    means = (onehot.T @ points) / counts.clamp(min=1)[:, None]
    return means.masked_fill((counts == 0)[:, None], 0)
