"""Density-peak clustering with kNN density (DPC-kNN), as FastVID's and PruneVid's released code compute it.

FastVID scores anchor candidates with it (k=4) and its Table 2/4 cluster alternatives cluster with it;
PruneVid clusters frames and token groups with it (k=7). One arithmetic serves both:
distances are Euclidean over sqrt(D) in float32; rho = exp(-mean of the k smallest squared distances,
the point's own 0 included), plus an optional tie-break noise; delta = the distance to the nearest
point of higher rho, and for the densest point the largest distance of its whole batch; score = rho * delta.

Groups of different sizes are scored in one batch, padded to the largest, with `valid` [B, P] marking each
group's points: padding is never a neighbour, never denser, never the farthest, and scores -inf, so a whole
video's groups cost one set of kernels and no host sync. On the CPU each group's figures equal those of the
group alone bit for bit (the pairwise distances do not depend on the batch around them; tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MM_ABOVE = 25  # torch.cdist computes through a matrix product for more points than this, directly otherwise


def _distances(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Pairwise Euclidean distances over sqrt(D) in float32; in a padded batch a group of at most `MM_ABOVE`
    points gets cdist's direct arithmetic, as it would alone (its points are the first `MM_ABOVE`)."""
    x = x.float()
    distance = torch.cdist(x, x)
    if valid is not None and x.shape[-2] > MM_ABOVE:
        head = x[..., :MM_ABOVE, :]
        direct = torch.cdist(head, head, compute_mode="donot_use_mm_for_euclid_dist")
        direct = F.pad(direct, (0, x.shape[-2] - MM_ABOVE, 0, x.shape[-2] - MM_ABOVE))
        distance = torch.where((valid.sum(dim=-1) <= MM_ABOVE)[..., None, None], direct, distance)
    return distance / x.shape[-1] ** 0.5


def _scores_and_distances(
    x: torch.Tensor, k: int, noise: torch.Tensor | None, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    distance = _distances(x, valid)
    if valid is None:
        nearest = distance.topk(min(k, x.shape[-2]), dim=-1, largest=False).values
        rho = (-(nearest**2).mean(dim=-1)).exp()
        farthest = distance.flatten(-2).max(dim=-1).values[..., None, None]
        other = True
    else:
        pair = valid[..., :, None] & valid[..., None, :]
        neighbours = min(k, x.shape[-2])
        nearest = distance.masked_fill(~pair, float("inf")).topk(neighbours, dim=-1, largest=False).values
        counted = valid.sum(dim=-1, keepdim=True).clamp(max=neighbours)  # min(k, group size), as alone
        squares = torch.where(nearest.isfinite(), nearest**2, 0.0)
        rho = (-(squares.sum(dim=-1) / counted)).exp()
        farthest = distance.masked_fill(~pair, float("-inf")).flatten(-2).max(dim=-1).values[..., None, None]
        other = valid[..., None, :]
    if noise is not None:
        rho = rho + noise
    denser = (rho[..., None, :] > rho[..., :, None]) & other  # [.., i, j]: j is denser than i
    delta = torch.where(denser, distance, farthest).min(dim=-1).values
    scores = rho * delta
    return (scores if valid is None else scores.masked_fill(~valid, float("-inf"))), distance


def density_scores(x: torch.Tensor, k: int, noise: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B, P, D] points -> [B, P] density-peak scores rho * delta over each batch's points; `noise` [B, P] is added
    to rho; `valid` [B, P] marks each batch's real points when the groups are padded (padding scores -inf)."""
    return _scores_and_distances(x, k, noise, valid)[0]


def dpc_knn(points: torch.Tensor, clusters: int, k: int, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, C] points -> each point's cluster id [n] and the centres [clusters] (point indices, by rank).

    Centres are the top `clusters` scores, a centre's id its rank; every other point joins its nearest centre
    (the lower rank on ties). Equal scores rank by index, lower first: torch.topk's order among ties differs by
    device and k, and a stable order makes a padded batch (`batched_dpc_knn`) equal each group alone.
    """
    scores, distance = _scores_and_distances(points, k, noise)
    centres = scores.sort(descending=True, stable=True).indices[:clusters]  # ties: the lower index, as batched
    labels = distance[centres].argmin(dim=0)
    labels[centres] = torch.arange(clusters, device=points.device)
    return labels, centres


def batched_dpc_knn(
    points: torch.Tensor, valid: torch.Tensor, clusters: torch.Tensor, k: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dpc_knn` of B padded groups at once: [B, P, C] points, [B, P] valid, [B] clusters per group (<= its size)
    -> labels [B, P] (-1 on padding) and centres [B, K] (K = P; a group's first `clusters` columns are its centres
    by rank, the rest -1). Each group's labels and centres equal `dpc_knn` of the group alone."""
    scores, distance = _scores_and_distances(points, k, noise, valid)
    order = scores.sort(dim=-1, descending=True, stable=True).indices  # rank -> point
    rank = torch.arange(points.shape[-2], device=points.device)
    is_centre = rank[None, :] < clusters[:, None]  # [B, K] over ranks
    centres = torch.where(is_centre, order, -1)
    to_centre = distance.gather(1, order[..., None].expand(-1, -1, distance.shape[-1]))  # [B, rank, P]
    to_centre = to_centre.masked_fill(~is_centre[..., None], float("inf"))
    labels = to_centre.argmin(dim=1)  # [B, P]: the nearest centre's rank, the lower on ties
    centre_rank = torch.full_like(labels, -1).scatter(1, order, rank.expand_as(order))
    labels = torch.where(centre_rank < clusters[:, None], centre_rank, labels)  # a centre is its own cluster
    return labels.masked_fill(~valid, -1), centres


def cluster_means(points: torch.Tensor, labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """[..., P, C] points and their cluster ids [..., P] (-1: padding) -> [..., clusters, C] each cluster's mean in the
    points' dtype (0 for an empty cluster), as a one-hot matrix product per group: padding adds exact zeros."""
    onehot = (labels[..., None] == torch.arange(clusters, device=labels.device)).to(points.dtype)
    counts = onehot.sum(dim=-2)
    means = (onehot.transpose(-1, -2) @ points) / counts.clamp(min=1)[..., None]
    return means.masked_fill((counts == 0)[..., None], 0)
