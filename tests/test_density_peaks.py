"""Padded batches of DPC-kNN groups give each group what it gets alone, bit for bit."""

import pytest
import torch

from dycoke_eval.methods.density_peaks import batched_dpc_knn, density_scores, dpc_knn

SIZES = [20, 3, 50, 49, 7, 25, 26, 1]  # both sides of cdist's switch to a matrix product at 25 points


def padded_groups(dim, seed):
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(len(SIZES), max(SIZES), dim, generator=generator)
    valid = torch.arange(max(SIZES))[None] < torch.tensor(SIZES)[:, None]
    return points, valid, torch.rand(len(SIZES), max(SIZES), generator=generator) * 1e-6


@pytest.mark.parametrize("dim", [16, 1152])
def test_each_padded_groups_scores_equal_its_scores_alone_and_padding_scores_minus_infinity(dim):
    points, valid, noise = padded_groups(dim, seed=0)
    scores = density_scores(points, 4, noise, valid)
    for group, size in enumerate(SIZES):
        alone = density_scores(points[group : group + 1, :size], 4, noise[group : group + 1, :size])[0]
        assert torch.equal(scores[group, :size], alone), f"group of {size}"
        assert torch.isneginf(scores[group, size:]).all()


def test_batched_clusters_equal_each_groups_clusters_alone():
    points, valid, noise = padded_groups(16, seed=1)
    clusters = torch.tensor([5, 2, 10, 1, 3, 4, 4, 1])
    labels, centres = batched_dpc_knn(points, valid, clusters, 7, noise)
    for group, size in enumerate(SIZES):
        alone_labels, alone_centres = dpc_knn(points[group, :size], int(clusters[group]), 7, noise[group, :size])
        assert torch.equal(labels[group, :size], alone_labels) and (labels[group, size:] == -1).all()
        assert torch.equal(centres[group, : int(clusters[group])], alone_centres)
        assert (centres[group, int(clusters[group]) :] == -1).all()


def test_tied_scores_rank_by_index_alone_and_in_a_batch():
    """Duplicate points without noise tie; the lower index ranks first in both, so the batch still equals each alone."""
    points = torch.tensor([[0.0], [0.0], [5.0], [5.0], [9.0]]).expand(2, 5, 1).contiguous()
    labels, centres = dpc_knn(points[0], clusters=2, k=2)
    assert centres.tolist() == [0, 1]  # four tied peaks (no point is denser): the two lowest indices
    batched_labels, batched_centres = batched_dpc_knn(points, torch.ones(2, 5, dtype=torch.bool), torch.tensor([2, 2]), 2)
    assert torch.equal(batched_labels[1], labels) and torch.equal(batched_centres[1, :2], centres)
