"""PruneVid: the released arithmetic (Visual-AI/PruneVid@b12600c, docs/methods.md#prunevid), rule by rule and as a whole."""

from itertools import accumulate
from statistics import mean

import pytest
import torch
import torch.nn.functional as F
from layouts import layout, tokens_of
from torch import einsum

from dycoke_eval.compression.stages import PlannedCounts
from dycoke_eval.config import ConfigError, instantiate_method
from dycoke_eval.methods.density_peaks import cluster_means, dpc_knn
from dycoke_eval.methods.kv_selection import max_attention
from dycoke_eval.methods.prunevid import (
    NEIGHBOURS,
    DensityNoise,
    PruneVid,
    cluster_count,
    merge_groups,
    prunevid_merge,
    prunevid_selection,
    refine_clusters,
    static_positions,
    window_means,
)
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.plumbing.counting import count_ops
from dycoke_eval.wrapper import CompressedVideoLM, SampleRecord

NO_NOISE = DensityNoise(0.0, 0, "")


# --- The released code, transcribed (models/pllava/modeling_pllava.py, elastic_cache.py), batch of one. -------------
# `rand` replaces the global `torch.rand` of cluster_dpc_knn so a test can feed it the draws it wants.


def released_cluster_dpc_knn(x, cluster_num, k, rand):
    B, N, C = x.shape
    dist_matrix = torch.cdist(x.float(), x.float()) / (C**0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=k, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    density = density + rand(density.shape) * 1e-6
    mask = density[:, None, :] > density[:, :, None]
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dist_matrix = dist_matrix[torch.arange(B)[:, None], index_down]
    idx_cluster = dist_matrix.argmin(dim=1)
    idx_batch = torch.arange(B)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    return idx_cluster, cluster_num


def released_refine_clusters(cluster_idx):
    B, N = cluster_idx.shape
    refined = cluster_idx.clone()
    for b in range(B):
        segment_info = {}
        for label in torch.unique(cluster_idx[b]):
            indices = (cluster_idx[b] == label).nonzero(as_tuple=True)[0]
            segments, start, prev = [], indices[0].item(), indices[0].item()
            for idx in indices[1:]:
                idx = idx.item()
                if idx == prev + 1:
                    prev = idx
                else:
                    segments.append((start, prev))
                    start = prev = idx
            segments.append((start, prev))
            segment_info[label.item()] = segments
        for segments in segment_info.values():
            max_length = max(end - start + 1 for start, end in segments)
            for start, end in segments:
                if max_length == 1 or end - start + 1 != max_length:
                    refined[b, start : end + 1] = -1
        idx = 0
        while idx < N:
            if refined[b, idx] == -1:
                start = idx
                while idx < N and refined[b, idx] == -1:
                    idx += 1
                end = idx - 1
                left_label, left_length = None, 0
                if start > 0:
                    left_label = refined[b, start - 1].item()
                    l_idx = start - 1
                    while l_idx >= 0 and refined[b, l_idx] == left_label:
                        l_idx -= 1
                    left_length = start - l_idx - 1
                right_label, right_length = None, 0
                if end < N - 1:
                    right_label = refined[b, end + 1].item()
                    r_idx = end + 1
                    while r_idx < N and refined[b, r_idx] == right_label:
                        r_idx += 1
                    right_length = r_idx - end - 1
                if left_length > right_length:
                    new_label = left_label
                elif right_length > left_length:
                    new_label = right_label
                else:
                    new_label = left_label if left_label is not None else right_label
                refined[b, start : end + 1] = 0 if new_label is None else new_label
            else:
                idx += 1
    return refined


def released_segment_lengths(tensor):
    seq = tensor[0]
    change_points = torch.where(seq[1:] != seq[:-1])[0] + 1
    boundaries = torch.cat([torch.tensor([0]), change_points, torch.tensor([seq.shape[0]])])
    return (boundaries[1:] - boundaries[:-1])[None]


def released_compute_cluster_vectors(image_key_vectors, cluster_key_idx, num_cluster):
    onehot = F.one_hot(cluster_key_idx, num_classes=num_cluster).to(dtype=image_key_vectors.dtype)
    cluster_sums = torch.bmm(onehot.permute(0, 2, 1), image_key_vectors)
    cluster_counts = onehot.sum(dim=1)
    nonzero = cluster_counts.clone()
    nonzero[nonzero == 0] = 1
    features = cluster_sums / nonzero.unsqueeze(-1)
    return features.masked_fill((cluster_counts == 0).unsqueeze(-1), 0)


def released_merge_frames_dynamic(frames, num_frames, tokens, tau, temporal_segment_ratio, cluster_ratio, rand, k=7):
    B, L, C = frames.shape
    frames = frames.view(B, num_frames, tokens, C)

    def spatial_merge_tokens(feature, num_cluster):
        cluster_idx, _ = released_cluster_dpc_knn(feature, num_cluster, k, rand)
        return released_compute_cluster_vectors(feature, cluster_idx, num_cluster)

    idx_clusters, _ = released_cluster_dpc_knn(frames.mean(dim=2), int(num_frames * temporal_segment_ratio), k, rand)
    window_list = released_segment_lengths(released_refine_clusters(idx_clusters))
    L = tokens
    static_features, dynamic_features, static_sizes, dynamic_sizes = [], [], [], []
    start_idx = 0
    for window_size in window_list[0]:
        current_frames = frames[:, start_idx : start_idx + window_size, :, :]
        frames_normed = F.normalize(current_frames, p=2, dim=-1)
        frames_sim = einsum("b w l c, b t l c -> b w t l", frames_normed, frames_normed)
        frames_sim = (frames_sim.sum(dim=-2) - 1).sum(dim=-2) / (window_size * (window_size - 1))
        mask = frames_sim > tau
        mask_expand = mask.view(B, 1, L, 1).expand(-1, window_size, -1, C)
        static_feat = torch.masked_select(current_frames, mask_expand).view(B, window_size, -1, C).mean(dim=1)
        if static_feat.shape[1] > 14:
            static_feat = spatial_merge_tokens(static_feat, int(static_feat.shape[1] * cluster_ratio))
        static_features.append(static_feat)
        static_sizes.append(static_feat.shape[1])
        dynamic_feat = torch.masked_select(current_frames, ~mask_expand).view(B, window_size, -1, C)
        dynamic_window_list = []
        for i in range(window_size):
            dynamic_feat_window = dynamic_feat[:, i, :, :]
            if dynamic_feat_window.shape[1] > 14:
                dynamic_feat_window = spatial_merge_tokens(dynamic_feat_window, int(dynamic_feat_window.shape[1] * cluster_ratio))
            dynamic_window_list.append(dynamic_feat_window)
        dynamic_feat = torch.cat(dynamic_window_list, dim=1)
        dynamic_features.append(dynamic_feat)
        dynamic_sizes.append(dynamic_feat.shape[1])
        start_idx += window_size
    final = []
    for static_feature, dynamic_feature in zip(static_features, dynamic_features, strict=True):
        final += [static_feature, dynamic_feature]
    return torch.cat(final, dim=1), static_sizes, dynamic_sizes, window_list[0].tolist()


def released_process_attention(text_to_image_attentions, static_sizes, dynamic_sizes, window_sizes, alpha):
    text_to_image_attentions = text_to_image_attentions[0].max(dim=0)[0].max(dim=0)[0]
    start_idx, topk_indices_list = 0, []
    for static_size, dynamic_size, window_size in zip(static_sizes, dynamic_sizes, window_sizes, strict=True):
        end_idx = start_idx + static_size + dynamic_size
        window_attentions = text_to_image_attentions[start_idx:end_idx]
        _, static_topk = torch.topk(window_attentions[:static_size], k=int(static_size * alpha), dim=-1)
        topk_indices_list.append(static_topk + start_idx)
        dynamic_attentions = window_attentions[static_size:].view(window_size, -1)
        _, dynamic_topk = torch.topk(dynamic_attentions, k=int(dynamic_attentions.shape[-1] * alpha), dim=-1)
        dynamic_topk = dynamic_topk + start_idx + static_size
        topk_indices_list.append(torch.cat([dynamic_topk[i] + dynamic_attentions.shape[-1] * i for i in range(window_size)]))
        start_idx = end_idx
    return torch.cat(topk_indices_list).sort()[0]


def scenes(frames_per_scene: list[int], tokens: int, dim: int, static: list[int], seed: int, dtype=torch.float32) -> torch.Tensor:
    """[T, N, D]: scenes of frames whose `static` positions hold one vector per scene and the rest fresh noise."""
    generator = torch.Generator().manual_seed(seed)
    grid = []
    for frames in frames_per_scene:
        still = 4 * torch.randn(len(static), dim, generator=generator)
        for _ in range(frames):
            frame = torch.randn(tokens, dim, generator=generator)
            frame[static] = still + 0.05 * torch.randn(len(static), dim, generator=generator)
            grid.append(frame)
    return torch.stack(grid).to(dtype)


# --- refine_clusters, rule by rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, refined, rule",
    [
        ([0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0], "ties between a label's longest runs: all kept"),
        ([0, 0, 0, 1, 1, 0, 2, 2], [0, 0, 0, 1, 1, 1, 2, 2], "a shorter run of a label dissolves; equal neighbours: left"),
        ([0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 2, 2], "a label whose longest run is 1 dissolves into the longer neighbour (left)"),
        ([0, 0, 1, 2, 2, 2], [0, 0, 2, 2, 2, 2], "into the longer neighbour (right)"),
        ([0, 0, 1, 2, 2], [0, 0, 0, 2, 2], "neighbours of equal length: the left one"),
        ([1, 2, 2], [2, 2, 2], "no left neighbour: the right one"),
        ([0, 0, 0, 1, 2, 3, 3], [0, 0, 0, 0, 0, 3, 3], "adjacent dissolved runs form one stretch"),
        ([0, 0, 1, 2, 2, 2, 5, 3, 3, 3, 3], [0, 0, 2, 2, 2, 2, 2, 3, 3, 3, 3], "neighbour lengths as currently labelled"),
        ([2, 1, 3], [0, 0, 0], "no neighbour at all: 0"),
        ([3], [0], "a single frame: 0"),
    ],
)
def test_refine_clusters_keeps_longest_runs_and_gives_the_rest_to_the_longer_neighbour(labels, refined, rule):
    assert refine_clusters(labels) == refined, rule
    assert released_refine_clusters(torch.tensor([labels])).tolist() == [refined], rule  # the transcription agrees


def test_refine_clusters_matches_the_released_code_on_random_label_sequences():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        frames, clusters = (
            int(torch.randint(1, 20, (1,), generator=generator)),
            int(torch.randint(1, 6, (1,), generator=generator)),
        )
        labels = torch.randint(0, clusters, (1, frames), generator=generator)
        assert refine_clusters(labels[0].tolist()) == released_refine_clusters(labels)[0].tolist()


# --- DPC-kNN ------------------------------------------------------------------------------------------------------


def test_dpc_knn_centres_are_the_density_peaks_ranked_and_every_point_joins_the_nearest():
    spread = torch.tensor([0.0, 0.05, -0.05, 0.15, -0.15, 0.3, -0.3, 0.5, -0.5])  # densest in the middle
    tight, loose = spread, 100 + 2 * spread  # 9 points around 0 (the densest of all) and 9 twice as spread around 100
    points = torch.cat([tight, loose])
    order = torch.randperm(18, generator=torch.Generator().manual_seed(1))
    labels, centres = dpc_knn(points[order, None], clusters=2, k=7)
    shuffled = points[order]
    assert shuffled[centres].tolist() == [0.0, 100.0]  # rank 0: the higher density (and the largest delta)
    assert labels.tolist() == [0 if p < 50 else 1 for p in shuffled.tolist()]


def test_dpc_knn_gives_each_point_the_nearest_centre_and_each_centre_its_rank():
    points = torch.tensor([[0.0], [0.1], [-0.1], [10.0], [10.1], [9.9], [4.0]])  # 4.0 is nearer 0 than 10
    labels, centres = dpc_knn(points, clusters=2, k=3)
    assert sorted(points[centres].flatten().tolist()) == [0.0, 10.0]
    zero = int((points[centres].flatten() == 0).nonzero())
    assert labels[centres].tolist() == [0, 1]
    assert labels[[0, 1, 2, 6]].tolist() == [zero] * 4 and labels[[3, 4, 5]].tolist() == [1 - zero] * 3


# --- static / dynamic, clustering, order ---------------------------------------------------------------------------


def test_a_position_is_static_when_its_mean_pairwise_cosine_over_the_window_exceeds_tau():
    window = torch.randn(3, 4, 2).abs()
    window[:, 0] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # pairwise cosines 0, -1, 0: mean -1/3
    window[:, 1] = torch.tensor([2.0, 1.0])  # the same direction in every frame: mean 1
    window[:, 2] = torch.tensor([[1.0, 0.0], [0.5, 3**0.5 / 2], [1.0, 0.0]])  # cosines 0.5, 1, 0.5: mean 2/3
    window[:, 3] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # cosines 0, 0, 1: mean 1/3
    valid = torch.ones(1, 3, dtype=torch.bool)
    assert static_positions(window[None], valid, 0.8).tolist() == [[False, True, False, False]]
    assert static_positions(window[None], valid, 0.6).tolist() == [[False, True, True, False]]
    one_frame = torch.stack([window, torch.cat([window[:1], torch.zeros(2, 4, 2)])])  # beside it, padded with 0 frames
    static = static_positions(one_frame, torch.tensor([[True] * 3, [True, False, False]]), -1.0)
    assert static.tolist() == [[True] * 4, [False] * 4]  # one frame: nothing is static


def released_static_positions(window, tau):
    """The released per-window static test (modeling_pllava.py), one window [W, N, D] -> [N]."""
    frames = window.shape[0]
    unit = F.normalize(window, p=2, dim=-1)
    similarity = einsum("w l c, t l c -> w t l", unit, unit)
    return (similarity.sum(dim=-2) - 1).sum(dim=-2) / (frames * (frames - 1)) > tau


def padded_windows(sizes, tokens, dim, seed, dtype):
    """Windows of `sizes` frames of random tokens, some positions alike over each window, zero-padded: [K, W, N, D]."""
    generator = torch.Generator().manual_seed(seed)
    windows = torch.zeros(len(sizes), max(sizes), tokens, dim)
    for k, size in enumerate(sizes):
        still = 2 * torch.randn(tokens, dim, generator=generator) * (torch.arange(tokens) % 3 == 0)[:, None]
        windows[k, :size] = torch.randn(size, tokens, dim, generator=generator) + still
    return windows.to(dtype), torch.arange(max(sizes)) < torch.tensor(sizes)[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_windows_padded_together_give_each_window_its_own_static_positions_and_means(dtype):
    sizes = [5, 2, 17, 3, 1, 8]  # 17: past the 16 rows a float sum adds before it sums in levels
    windows, valid = padded_windows(sizes, tokens=30, dim=48, seed=5, dtype=dtype)
    static, means = static_positions(windows, valid, 0.5), window_means(windows, valid)
    for k, size in enumerate(sizes):
        alone = windows[k, :size]
        expected = released_static_positions(alone, 0.5) if size > 1 else torch.zeros(30, dtype=torch.bool)
        assert torch.equal(static[k], expected), f"window of {size}"
        assert torch.equal(means[k], alone.mean(dim=0)), f"window of {size}"
    assert 0 < static.sum() < static.numel()


def test_groups_of_more_than_14_tokens_become_int_n_times_cluster_ratio_cluster_means():
    assert [cluster_count(n, 0.5) for n in (0, 14, 15, 36)] == [0, 0, 7, 18] and cluster_count(15, 0.2) == 3
    features, index = torch.randn(15, 8), torch.arange(100, 115)
    sizes = torch.tensor([14, 15])  # the first 14 tokens (padded with the 15th), then all 15
    merged, where = merge_groups(features.expand(2, -1, -1), index.expand(2, -1), sizes, torch.tensor([0, 7]), None)
    assert torch.equal(merged[0, :14], features[:14]) and torch.equal(where[0, :14], index[:14])  # 14: as they are
    labels, centres = dpc_knn(features, 7, NEIGHBOURS)
    assert torch.equal(where[1, :7], index[centres])  # int(15 * 0.5) means, at the centres, by rank
    for cluster in range(7):
        torch.testing.assert_close(merged[1, cluster], features[labels == cluster].mean(dim=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_groups_merge_as_each_group_alone(dtype):
    sizes = [40, 3, 15, 25, 26, 14, 0, 33]  # kept (<= 14) and clustered, both sides of cdist's switch at 25 points
    generator = torch.Generator().manual_seed(2)
    points = torch.randn(len(sizes), max(sizes), 24, generator=generator).to(dtype)
    index = torch.randperm(len(sizes) * max(sizes), generator=generator).view(len(sizes), -1)
    noise = torch.rand(len(sizes), max(sizes), generator=generator) * 1e-6
    clusters = [cluster_count(n, 0.5) for n in sizes]
    merged, where = merge_groups(points, index, torch.tensor(sizes), torch.tensor(clusters), noise)
    labels = torch.full((len(sizes), max(sizes)), -1)
    for group, (size, count) in enumerate(zip(sizes, clusters, strict=True)):
        if not count:
            assert torch.equal(merged[group, :size], points[group, :size])
            assert torch.equal(where[group, :size], index[group, :size])
            continue
        alone, centres = dpc_knn(points[group, :size], count, NEIGHBOURS, noise[group, :size])
        assert torch.equal(merged[group, :count], cluster_means(points[group, :size], alone, count)), f"group of {size}"
        assert torch.equal(where[group, :count], index[group, centres])
        labels[group, :size] = alone
    means = cluster_means(points, labels, max(clusters))  # padded groups at once: the same sums as each alone
    for group, (size, count) in enumerate(zip(sizes, clusters, strict=True)):
        if count:
            assert torch.equal(means[group, :count], cluster_means(points[group, :size], labels[group, :size], count))


def test_one_draw_of_the_groups_total_equals_the_released_draws_one_per_group_in_order():
    sizes = [36, 0, 20, 15, 5000, 1]  # each clustered group's noise, in the released order
    released, batched = DensityNoise(1e-6, 7, "t/3"), DensityNoise(1e-6, 7, "t/3")
    draws = [released.draw(n) for n in sizes]
    rows = batched.draw_rows(torch.tensor([0, *accumulate(sizes[:-1])]), sum(sizes), max(sizes))
    for row, draw in zip(rows, draws, strict=True):
        assert torch.equal(row[: draw.numel()], draw)
    assert torch.equal(batched.draw(9), released.draw(9))  # and the generator goes on where the released one does
    assert DensityNoise(0.0, 7, "t/3").draw_rows(torch.tensor([0]), 5, 5) is None


def test_the_pre_llm_merge_waits_for_the_device_at_most_4_times_in_at_most_150_kernels():
    grid = torch.randn(16, 49, 64, generator=torch.Generator().manual_seed(0))
    tokens = tokens_of(grid, 7, 7)
    with torch.inference_mode(), count_ops() as counted:
        PruneVid().select(tokens, {}, "t/0")
    assert counted.counts.syncs <= 4 and counted.counts.ops <= 150, counted.counts  # a loop per group: 583 ops, 36 syncs


def test_each_window_gives_its_static_tokens_then_each_frames_dynamic_tokens():
    grid = scenes([4, 4], tokens=4, dim=64, static=[0], seed=3)  # groups of <= 14 tokens: nothing is clustered
    merged = prunevid_merge(grid, tau=0.8, temporal_segment_ratio=0.25, cluster_ratio=0.5, noise=NO_NOISE)
    assert merged.windows == [4, 4] and merged.static == [1, 1] and merged.dynamic == [3, 3]
    expected, index = [], []
    for start in (0, 4):
        expected.append(grid[start : start + 4, 0].mean(dim=0, keepdim=True))
        index.append(start * 4)  # a static token sits at its position in the window's first frame
        for frame in range(start, start + 4):
            expected.append(grid[frame, 1:])
            index += [frame * 4 + 1, frame * 4 + 2, frame * 4 + 3]
    assert torch.equal(merged.features, torch.cat(expected))
    assert merged.index.tolist() == index


# --- the whole pre-LLM merge against the released code ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_pre_llm_merge_equals_the_released_arithmetic(seed, dtype):
    grid = scenes([5, 3, 6, 2], tokens=36, dim=32, static=list(range(0, 36, 2)), seed=seed, dtype=dtype)  # 16 frames, 6x6
    expected, static, dynamic, windows = released_merge_frames_dynamic(
        grid.reshape(1, -1, 32), 16, 36, 0.8, 0.25, 0.5, rand=lambda shape: torch.zeros(shape)
    )
    merged = prunevid_merge(grid, 0.8, 0.25, 0.5, NO_NOISE)
    assert merged.windows == windows and merged.static == static
    assert [f * d for f, d in zip(merged.windows, merged.dynamic, strict=True)] == dynamic
    assert len(windows) > 1 and min(merged.static_positions) > 14 and max(merged.dynamic) < 36 - 14  # both groups clustered
    assert torch.equal(merged.features, expected[0])


def test_the_density_noise_is_drawn_per_sample_in_the_released_order():
    grid = scenes([5, 3, 6, 2], tokens=36, dim=32, static=list(range(0, 36, 2)), seed=4)
    generator = torch.Generator().manual_seed(DensityNoise(1e-6, 7, "t/3").generator.initial_seed())
    expected, *_ = released_merge_frames_dynamic(
        grid.reshape(1, -1, 32), 16, 36, 0.8, 0.25, 0.5, rand=lambda shape: torch.rand(shape[-1], generator=generator)
    )
    stage = PruneVid(seed=7)
    first = stage.select(tokens_of(grid, 6, 6), {}, "t/3")
    assert torch.equal(first.features, expected[0])
    assert torch.equal(stage.select(tokens_of(grid, 6, 6), {}, "t/3").features, first.features)  # reruns agree


def test_the_stage_reports_its_groups_and_the_measured_ratio():
    grid = scenes([5, 3, 6, 2], tokens=36, dim=32, static=list(range(0, 36, 2)), seed=0)
    tokens = PruneVid(density_noise=0.0).select(tokens_of(grid, 6, 6), {}, "")
    figures = tokens.figures
    assert figures["prunevid_tokens_in"] == 16 * 36 and figures["prunevid_tokens_out"] == tokens.features.shape[0]
    assert figures["prunevid_ratio"] == tokens.features.shape[0] / (16 * 36)
    assert figures["prunevid_window_count"] == len(figures["prunevid_windows"]) and sum(figures["prunevid_windows"]) == 16
    assert figures["prunevid_static_tokens"] + figures["prunevid_dynamic_tokens"] == tokens.features.shape[0]
    assert all(0 <= i < 16 * 36 for i in tokens.index.tolist())


def test_the_plan_is_the_no_static_token_estimate_and_alpha_of_it_after_the_selected_layer():
    counts = PlannedCounts.full(layout(32, 14, 14), layers=28)
    assert PruneVid().plan(counts).prefill == [32 * 98.0] * 28
    planned = PruneVid(in_llm=True, selected_layer=10).plan(counts)
    assert planned.prefill == [32 * 98.0] * 11 + [32 * 98 * 0.4] * 17
    assert planned.decode == [32 * 98 * 0.4] * 28  # the selected layer and those before it are trimmed too


# --- the in-LLM selection ----------------------------------------------------------------------------------------


def test_the_in_llm_selection_keeps_alpha_of_each_group_by_max_attention_as_released():
    generator = torch.Generator().manual_seed(0)
    windows, static, dynamic = [3, 2, 4], [20, 0, 9], [6, 11, 3]
    tokens = sum(s + w * d for w, s, d in zip(windows, static, dynamic, strict=True))
    probabilities = torch.rand(1, 4, 5, tokens, generator=generator)  # [batch, heads, text queries, video tokens]
    expected = released_process_attention(
        probabilities, static, [w * d for w, d in zip(windows, dynamic, strict=True)], windows, 0.4
    )
    scores = probabilities[0].amax(dim=(0, 1))
    kept = prunevid_selection(scores, windows, static, dynamic, 0.4)
    assert torch.equal(kept, expected)
    assert kept.numel() == int(20 * 0.4) + 0 + int(9 * 0.4) + 3 * int(6 * 0.4) + 2 * int(11 * 0.4) + 4 * int(3 * 0.4)


def test_max_attention_is_the_max_over_heads_then_queries_of_the_causal_softmax():
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 4, 9, 8, generator=generator), torch.randn(1, 2, 9, 8, generator=generator)  # grouped heads
    full = (query @ key.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.3
    full = full.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf")).softmax(dim=-1)  # [1, H, 9, 9]
    after = torch.arange(6, 9)  # the queries after a visual span ending at 6
    expected = full[:, :, 6:, :][0].max(dim=0)[0].max(dim=0)[0]  # the released reduction
    torch.testing.assert_close(max_attention(query[:, :, after], key, 0.3, None, after, torch.arange(9)), expected)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tau": 1.5}, "tau=1.5"),
        ({"temporal_segment_ratio": 0.0}, "temporal_segment_ratio=0.0"),
        ({"cluster_ratio": 0.05}, r"cluster_ratio=0.05: .* \[1/15, 1\]"),
        ({"cluster_ratio": 1.5}, "cluster_ratio=1.5"),
        ({"alpha": 0.0}, "alpha=0.0"),
        ({"selected_layer": -1}, "selected_layer=-1"),
        ({"density_noise": -1e-6}, "density_noise=-1e-06"),
    ],
)
def test_bad_prunevid_settings_fail_at_config_time(settings, message):
    with pytest.raises(ConfigError, match=message):
        PruneVid(**settings)


def test_the_config_holds_the_released_defaults_with_the_in_llm_stage_off():
    method = instantiate_method("prunevid")
    assert (method.tau, method.temporal_segment_ratio, method.cluster_ratio) == (0.8, 0.25, 0.5)
    assert (method.alpha, method.selected_layer, method.in_llm) == (0.4, 10, False)
    assert [stage.name for stage in method.stages()] == ["prunevid"]
    assert [stage.name for stage in PruneVid(in_llm=True).stages()] == ["prunevid", "prunevid_llm"]


# --- on the tiny model -----------------------------------------------------------------------------------------------

FRAMES = 16


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=FRAMES, device="cpu")


def test_a_selected_layer_without_a_later_layer_fails_when_the_model_is_known(tiny_checkpoint):
    with pytest.raises(ConfigError, match="selected_layer=7: the language model has 8 layers"):
        CompressedVideoLM(pretrained=str(tiny_checkpoint), method=PruneVid(in_llm=True, selected_layer=7), device="cpu")


def test_the_in_llm_stage_keeps_alpha_of_each_group_from_the_next_layer_and_trims_the_earlier_caches(lm):
    lm.method, lm.measure = PruneVid(in_llm=True, selected_layer=2, cluster_ratio=0.5), True
    record = SampleRecord("t", 0)
    try:
        output, prompt_length = lm.run_sample(
            synthetic_frames("prunevid")[:FRAMES], "What moves?", {"max_new_tokens": 4, "do_sample": False}, record, "t/0"
        )
    finally:
        lm.measure = False
    stats = record.method_stats
    merged = stats["prunevid_tokens_out"]
    kept = sum(
        int(s * 0.4) + w * int(d * 0.4)
        for w, s, d in zip(stats["prunevid_windows"], stats["prunevid_static"], stats["prunevid_dynamic"], strict=True)
    )
    assert record.visual_tokens_in == merged + 1  # the newline after the video
    assert record.visual_tokens_by_stage == {"prunevid": merged, "prunevid_llm": kept + 1}  # the newline is always kept
    assert record.prefill_visual_by_layer == [merged + 1] * 3 + [kept + 1] * 5
    assert record.decode_visual_by_layer == [kept + 1] * 8  # the layers up to the selected one cached the kept tokens only
    steps = output.shape[1] - prompt_length - 1
    text = lm.model.config.text_config
    entry = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4  # key and value, fp32
    assert record.kv_cache_bytes == 8 * (prompt_length - merged + kept + steps) * entry  # every layer: the kept tokens only
    per_layer = [(merged + 1 + steps * (kept + 1)) / (1 + steps)] * 3 + [kept + 1] * 5
    assert record.retained_ratio == pytest.approx(mean(per_layer) / (FRAMES * 16 + 1))
