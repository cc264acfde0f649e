"""FlashVID: DySeg, ADTS, TSTM and the spatial merge against a literal transcription of the released code, the in-LLM
prune's count, and the method on the tiny model under both LLaVA layouts.

The transcription below is Fanziyang-v/FlashVID@1d37422c5afcaa15ee46b5355f5ba798fa93290a, `flashvid/utils.py:23-349`
and `flashvid/token_selection.py:14-130`, copied as released (loops, in-place writes and all). Changed only: the
`FlashVidConfig` is a namespace, the methods table holds the two ADTS functions, and `dpc_knn`'s
`torch.rand_like(density)` draws from the generator the namespace carries (the noise given).
"""

import math
from types import SimpleNamespace

import pytest
import torch
from layouts import tokens_of
from torch.nn import functional as F

from dycoke_eval.compression.stages import PlannedCounts, PrefillStage, PreLLMStage, per_sample_seed
from dycoke_eval.config import ConfigError, instantiate_method
from dycoke_eval.geometry import ModelInfo
from dycoke_eval.methods.flashvid import (
    MODES,
    SELECTIONS,
    FlashVID,
    FlashVIDCompression,
    FlashVIDPrune,
    TemporalLinks,
    adts_distances,
    density_peak_clusters,
    dyseg_lengths,
    flashvid_compress,
    flashvid_keep_count,
    frame_budgets,
    max_min_selection,
    temporal_links,
    tree_merge,
)
from dycoke_eval.methods.stprune import transition_similarity
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.wrapper import CompressedVideoLM, SampleRecord

# --- the released code, transcribed (token_selection.py:14-130) -------------------------------------------------------


def pairwise_cosine_distances(image_features: torch.Tensor) -> torch.Tensor:
    normed_features = image_features / image_features.norm(p=2, dim=-1, keepdim=True)
    similarities = torch.bmm(normed_features, normed_features.transpose(-1, -2))
    return 1.0 - similarities


def attn_div_based_token_selection(features, cls_attention, num_retained_tokens):
    original_features = features
    features = features.float()
    cls_attention = cls_attention.float() * 1e6  # Scale attention to avoid numerical issues
    bsz, num_visual_tokens, feat_dim = features.shape
    dist_matrix = pairwise_cosine_distances(features)
    dist_matrix = dist_matrix * cls_attention.unsqueeze(1)  # (bsz, num_visual_tokens, num_visual_tokens)
    keep_indices = torch.zeros(bsz, num_retained_tokens, dtype=torch.long, device=features.device)
    min_dist = torch.topk(dist_matrix, k=2, dim=1, largest=False).values[:, 1, :]  # (bsz, num_visual_tokens)
    keep_indices[:, 0] = torch.argmax(min_dist, dim=-1)  # (bsz,)
    for i in range(1, num_retained_tokens):
        dist_sub_matrix = torch.gather(
            dist_matrix,
            dim=1,
            index=keep_indices[:, :i].unsqueeze(-1).expand(-1, -1, num_visual_tokens),
        )
        min_dist = torch.min(dist_sub_matrix, dim=1).values
        min_dist.scatter_(1, keep_indices[:, :i], -1)  # (bsz, num_visual_tokens)
        keep_indices[:, i] = torch.argmax(min_dist, dim=-1)
    keep_indices = keep_indices.sort().values
    selected_features = torch.gather(original_features, dim=1, index=keep_indices.unsqueeze(-1).expand(-1, -1, feat_dim))
    return selected_features, keep_indices


def attn_div_v2_based_token_selection(features, cls_attention, num_retained_tokens):
    original_features = features
    features = features.float()
    pooled_features = features.mean(1)  # (num_frames, feat_dim)
    global_cls_attention = cls_attention.float() * 1e6  # Scale attention to avoid numerical issues
    bsz, num_visual_tokens, feat_dim = features.shape
    dist_matrix = pairwise_cosine_distances(features)
    calibration_term1 = global_cls_attention.unsqueeze(1)
    local_cls_attention = torch.einsum("b n d, c d -> b c n", features, pooled_features).mean(1)
    calibration_term2 = local_cls_attention.unsqueeze(1)
    dist_matrix = dist_matrix * calibration_term1 * calibration_term2
    keep_indices = torch.zeros(bsz, num_retained_tokens, dtype=torch.long, device=features.device)
    min_dist = torch.topk(dist_matrix, k=2, dim=1, largest=False).values[:, 1, :]  # (bsz, num_visual_tokens)
    keep_indices[:, 0] = torch.argmax(min_dist, dim=-1)  # (bsz,)
    for i in range(1, num_retained_tokens):
        dist_sub_matrix = torch.gather(
            dist_matrix,
            dim=1,
            index=keep_indices[:, :i].unsqueeze(-1).expand(-1, -1, num_visual_tokens),
        )
        min_dist = torch.min(dist_sub_matrix, dim=1).values
        keep_indices[:, i] = torch.argmax(min_dist, dim=-1)
    keep_indices = keep_indices.sort().values
    selected_features = torch.gather(original_features, dim=1, index=keep_indices.unsqueeze(-1).expand(-1, -1, feat_dim))
    return selected_features, keep_indices


ALL_TOKEN_SELECTION_METHOD = {"attn_div": attn_div_based_token_selection, "attn_div_v2": attn_div_v2_based_token_selection}


# --- the released code, transcribed (utils.py:23-349) -----------------------------------------------------------------


def flashvid_compression(video_features, cls_attention, flashvid_config):
    num_frames, num_visual_tokens, feat_dim = video_features.shape
    if flashvid_config.do_segment:
        segment_lengths = segment(
            video_features=video_features.mean(1),
            segment_threshold=flashvid_config.segment_threshold,
            min_segment_num=flashvid_config.min_segment_num,
            complementary_segment=flashvid_config.complementary_segment,
        )
    else:
        segment_lengths = torch.tensor([num_frames], dtype=torch.long, device=video_features.device)
    num_segments = segment_lengths.shape[0]
    global_indices = torch.arange(num_frames * num_visual_tokens, dtype=torch.long, device=video_features.device)
    token_budget = math.ceil(num_visual_tokens * flashvid_config.retention_ratio * flashvid_config.expansion)
    num_attn_div_tokens = math.ceil(token_budget * flashvid_config.alpha)
    num_sttm_tokens = token_budget - num_attn_div_tokens
    flashvid_config.num_attn_div_tokens = num_attn_div_tokens
    flashvid_config.num_sttm_tokens = num_sttm_tokens
    all_segment_features = []
    all_segment_indices = []
    offset = 0
    for seg_idx in range(num_segments):
        seg_len = segment_lengths[seg_idx]
        segment_features = video_features[offset : offset + seg_len]
        segment_cls_attention = cls_attention[offset : offset + seg_len]
        segment_global_indices = global_indices.view(num_frames, num_visual_tokens)[offset : offset + seg_len]
        segment_features, segment_global_indices = segment_compression(
            segment_features=segment_features,
            segment_global_indices=segment_global_indices,
            cls_attention=segment_cls_attention,
            flashvid_config=flashvid_config,
        )
        all_segment_features.append(segment_features)
        all_segment_indices.append(segment_global_indices)
        offset += seg_len
    final_tokens = torch.cat(all_segment_features, dim=0)  # (num_final_tokens, feat_dim)
    final_global_indices = torch.cat(all_segment_indices, dim=0)  # (num_final_tokens,)
    sorted_indices = final_global_indices.argsort()
    sorted_tokens = final_tokens[sorted_indices]  # Sort by global indices.
    flashvid_config.visual_token_length = sorted_tokens.shape[0]
    return sorted_tokens, final_global_indices[sorted_indices]


def segment_compression(segment_features, segment_global_indices, cls_attention, flashvid_config):
    num_frames, num_visual_tokens, feat_dim = segment_features.shape
    if flashvid_config.alpha > 0:
        additional_kwargs = {"cls_attention": cls_attention} if "attn" in flashvid_config.token_selection_method else {}
        selected_features, selected_indices = ALL_TOKEN_SELECTION_METHOD[flashvid_config.token_selection_method](
            features=segment_features,
            num_retained_tokens=flashvid_config.num_attn_div_tokens,
            **additional_kwargs,
        )
        selected_global_indices = segment_global_indices.gather(1, index=selected_indices).view(-1)
    else:
        selected_features = torch.tensor([]).to(segment_features)
        selected_indices = torch.tensor([]).to(segment_global_indices)
        selected_global_indices = torch.tensor([]).to(segment_global_indices)
    mask = torch.ones(num_frames, num_visual_tokens, dtype=torch.bool, device=segment_features.device)
    mask.scatter_(1, selected_indices, False)
    num_other_tokens = flashvid_config.num_sttm_tokens * num_frames
    if num_other_tokens > 0 and flashvid_config.temporal_threshold < 1.0:
        if num_frames > 1:
            temp_merged_token_list, temp_merged_indices_list = spatiotemporal_compression(
                video_features=segment_features,
                temporal_threshold=flashvid_config.temporal_threshold,
                token_mask=mask,
                flashvid_config=flashvid_config,
            )
            temp_merged_global_indices_list = [
                segment_global_indices.view(num_frames, -1)[i][temp_merged_indices]
                for i, temp_merged_indices in enumerate(temp_merged_indices_list)
            ]
        else:
            temp_merged_token_list = [segment_features[0]]
            temp_merged_global_indices_list = [segment_global_indices[0]]
    else:
        temp_merged_token_list = []
        temp_merged_global_indices_list = []
    all_tokens = [selected_features.view(-1, feat_dim)]
    all_global_indices = [selected_global_indices]
    if num_other_tokens > 0:
        num_current_retained_tokens = sum(len(tokens) for tokens in temp_merged_token_list)
        adapative_contextual_ratio = num_other_tokens / num_current_retained_tokens
        for temp_merged_tokens, temp_merged_global_indices in zip(temp_merged_token_list, temp_merged_global_indices_list):  # noqa: B905
            num_tokens, _ = temp_merged_tokens.shape
            aggregated_tokens = temp_merged_tokens
            global_token_indices = temp_merged_global_indices
            num_clusters = math.ceil(num_tokens * adapative_contextual_ratio)
            if num_clusters > 0 and adapative_contextual_ratio < 1.0:
                cluster_indices, cluster_center_indices = dpc_knn(
                    features=temp_merged_tokens.unsqueeze(0),
                    num_clusters=num_clusters,
                    k=min(num_clusters, 7),
                    noise_generator=flashvid_config.noise_generator,
                )
                assigned_one_hot = F.one_hot(cluster_indices[0], num_classes=num_clusters).to(segment_features.dtype)
                aggregated_tokens = torch.einsum("n c, n d -> c d", assigned_one_hot, temp_merged_tokens)
                aggregated_tokens = aggregated_tokens / assigned_one_hot.sum(dim=0).unsqueeze(-1)
                global_token_indices = temp_merged_global_indices[cluster_center_indices[0]]
            all_tokens.append(aggregated_tokens)
            all_global_indices.append(global_token_indices)
    segment_final_tokens = torch.cat(all_tokens, dim=0)  # (num_final_tokens, feat_dim)
    segment_final_global_indices = torch.cat(all_global_indices, dim=0)  # (num_final_tokens,)
    return segment_final_tokens, segment_final_global_indices


def segment(video_features, segment_threshold, min_segment_num, complementary_segment=True):
    num_frames, feat_dim = video_features.shape
    normed_video_features = video_features / video_features.norm(p=2, dim=-1, keepdim=True)
    transition_similarities = torch.sum(normed_video_features[:-1] * normed_video_features[1:], dim=-1)
    cut_indices = torch.where(transition_similarities < segment_threshold)[0]
    segment_lengths = additional_segment(
        cut_indices=cut_indices,
        num_frames=num_frames,
        min_segment_num=min_segment_num,
        transition_similarities=transition_similarities,
        segment_threshold=segment_threshold,
        complementary_segment=complementary_segment,
    )
    return segment_lengths


def additional_segment(
    cut_indices, num_frames, min_segment_num, transition_similarities, segment_threshold, complementary_segment=True
):
    num_segments = cut_indices.numel() + 1
    if num_segments < min_segment_num and complementary_segment:
        num_remaining_cut_indices = min_segment_num - num_segments
        transition_similarities[transition_similarities < segment_threshold] = 1.0
        complementary_cut_indices = torch.topk(
            transition_similarities, k=min(num_remaining_cut_indices, transition_similarities.shape[0]), largest=False
        ).indices
        cut_indices = torch.cat([cut_indices, complementary_cut_indices]).sort().values
    padded_cut_indices = F.pad(cut_indices, (1, 1), value=0)
    padded_cut_indices[0] = -1
    padded_cut_indices[-1] = num_frames - 1
    segment_lengths = torch.diff(padded_cut_indices, n=1, dim=0)
    return segment_lengths


@torch.no_grad()
def dpc_knn(features, num_clusters, k=7, valid_token_mask=None, noise_generator=None):
    invalid_token_mask = ~valid_token_mask if valid_token_mask is not None else None
    bsz, seq_len, feat_dim = features.shape
    dists = torch.cdist(features.float(), features.float()) / math.sqrt(feat_dim)
    if valid_token_mask is not None:
        dists = torch.masked_fill(dists, invalid_token_mask.unsqueeze(1).expand(-1, seq_len, -1), dists.max() + 1)
    nearest_dist = torch.topk(dists, k=k, dim=-1, largest=False).values
    density = torch.mean(-(nearest_dist**2), dim=-1).exp()
    density = density + torch.rand(density.shape, generator=noise_generator, dtype=density.dtype) * 1e-6  # rand_like
    if valid_token_mask is not None:
        density = torch.masked_fill(density, invalid_token_mask, 0.0)
    mask = density[:, None, :] > density[:, :, None]
    max_dist = dists.view(bsz, -1).max(dim=-1)[0].view(-1, 1, 1)
    modified_dists = torch.where(mask, dists, max_dist)
    dist, _ = torch.min(modified_dists, dim=-1)
    score = dist * density
    cluster_center_indices = torch.topk(score, k=num_clusters, dim=-1).indices
    dists = torch.gather(dists, dim=-1, index=cluster_center_indices.unsqueeze(1).expand(-1, seq_len, -1))
    cluster_indices = torch.argmin(dists, dim=-1)
    cluster_indices.scatter_(
        dim=-1,
        index=cluster_center_indices,
        src=torch.arange(num_clusters).to(cluster_indices).unsqueeze(0).expand(bsz, -1),
    )
    return cluster_indices, cluster_center_indices


def spatiotemporal_compression(video_features, temporal_threshold, token_mask, flashvid_config):
    num_frames, num_visual_tokens, feat_dim = video_features.shape
    lower_bound = (flashvid_config.num_attn_div_tokens + flashvid_config.num_sttm_tokens) * num_frames
    normed_video_features = video_features / video_features.norm(p=2, dim=-1, keepdim=True)
    cosine_similarities = torch.einsum("b n d, b m d -> b n m", normed_video_features[1:], normed_video_features[:-1])
    cosine_similarities[~token_mask[1:].unsqueeze(-1).expand(-1, -1, num_visual_tokens)] = -1.0
    cosine_similarities[~token_mask[:-1].unsqueeze(1).expand(-1, num_visual_tokens, -1)] = -1.0
    max_sims, max_sim_indices = torch.max(cosine_similarities, dim=-1)
    padded_max_sims = F.pad(max_sims, (0, 0, 1, 0), value=-1)
    padded_max_sim_indices = F.pad(max_sim_indices, (0, 0, 1, 0), value=-1)
    token_counts = torch.ones(num_frames, num_visual_tokens).to(video_features)
    mask = padded_max_sims > temporal_threshold
    retaining_token_mask = ~mask
    if retaining_token_mask.int().sum() < lower_bound:
        soft_threshold = padded_max_sims.view(-1).topk(k=(num_frames * num_visual_tokens) - lower_bound).values[-1]
        soft_threshold = max(soft_threshold, -1.0 + 1e-6)
        mask = padded_max_sims > soft_threshold
        retaining_token_mask = ~mask
        flashvid_config.raised += 1  # (added: counts the segments whose threshold was raised)
    for frame_idx in range(num_frames - 1, -1, -1):
        frame_features = video_features[frame_idx]
        frame_token_counts = token_counts[frame_idx]
        frame_max_sim_indices = padded_max_sim_indices[frame_idx]
        tokens_to_merge = frame_features[~mask[frame_idx]]
        to_merge_token_counts = frame_token_counts[~mask[frame_idx]]
        if tokens_to_merge.numel() > 0:
            aggregated_tokens = tokens_to_merge / to_merge_token_counts.unsqueeze(-1).to(tokens_to_merge.dtype)
            video_features[frame_idx][~mask[frame_idx]] = aggregated_tokens
            token_counts[frame_idx][~mask[frame_idx]] = 1
        other_tokens = frame_features[mask[frame_idx]]
        if other_tokens.numel() > 0:
            anchor_token_indices = frame_max_sim_indices[mask[frame_idx]]
            assigned_one_hot = F.one_hot(anchor_token_indices, num_classes=num_visual_tokens).to(video_features.dtype)
            aggregated_tokens = torch.einsum("m n, m d -> n d", assigned_one_hot, other_tokens)
            aggregated_token_counts = assigned_one_hot.sum(dim=0)  # (num_visual_tokens,)
            video_features[frame_idx - 1] += aggregated_tokens
            token_counts[frame_idx - 1] += aggregated_token_counts
            token_counts[frame_idx][mask[frame_idx]] = 0
    final_tokens = []
    retained_token_indices = []
    for i in range(num_frames):
        frame_mask = retaining_token_mask[i] & token_mask[i]
        frame_retained_tokens = video_features[i][frame_mask]  # (frame_retained_tokens_num, feat_dim)
        frame_retained_indices = torch.where(frame_mask)[0]  # (frame_retained_tokens_num,)
        final_tokens.append(frame_retained_tokens)
        retained_token_indices.append(frame_retained_indices)
    return final_tokens, retained_token_indices


def released_config(seed=0, **settings):
    """The scripts' LLaVA settings (`scripts/llava_ov.sh`) as the release's `FlashVidConfig`, with the noise generator."""
    config = dict(
        retention_ratio=0.25,
        alpha=0.7,
        token_selection_method="attn_div_v2",
        temporal_threshold=0.8,
        do_segment=True,
        segment_threshold=0.9,
        min_segment_num=8,
        complementary_segment=True,
        expansion=1.25,
    )
    config.update(settings)
    return SimpleNamespace(**config, noise_generator=torch.Generator().manual_seed(seed), raised=0)


# --- inputs -----------------------------------------------------------------------------------------------------------


def scene_video(frames, tokens, dim=32, scenes=4, drift=0.3, seed=0, dtype=torch.float32):
    """[F, N, D] frames of `scenes` scenes, each frame its scene plus `drift` noise, and [F, N] attention (rows sum to 1).

    Small drift links tokens across many frames (deep trees, the raised threshold); larger drift leaves more roots."""
    generator = torch.Generator().manual_seed(seed)
    scene = torch.randn(scenes, tokens, dim, generator=generator)
    video = scene.repeat_interleave(-(-frames // scenes), dim=0)[:frames] + drift * torch.randn(
        frames, tokens, dim, generator=generator
    )
    attention = torch.rand(frames, tokens, generator=generator).softmax(dim=-1)
    return video.to(dtype), attention


def ours(video, attention, seed=0, mode="official", **settings):
    config = released_config(**settings)
    kept = flashvid_compress(
        video,
        attention,
        retention_ratio=config.retention_ratio,
        alpha=config.alpha,
        token_selection_method=config.token_selection_method,
        temporal_threshold=config.temporal_threshold,
        segment_threshold=config.segment_threshold,
        min_segment_num=config.min_segment_num,
        expansion=config.expansion,
        generator=torch.Generator().manual_seed(seed),
        mode=mode,
    )
    return kept


def released(video, attention, seed=0, **settings):
    config = released_config(seed, **settings)
    tokens, index = flashvid_compression(video.clone(), attention, config)
    return tokens, index, config


# --- budgets and DySeg ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "retention", "budgets"),
    [(196, 0.25, (44, 18)), (196, 0.10, (18, 7)), (196, 0.15, (26, 11)), (169, 0.25, (38, 15)), (169, 0.10, (16, 6))],
)
def test_a_frame_keeps_ceil_n_r_expansion_split_ceil_alpha_for_adts_and_the_rest_for_tstm(tokens, retention, budgets):
    assert frame_budgets(tokens, retention, 1.25, 0.7) == budgets


def test_dyseg_cuts_below_the_threshold_then_the_lowest_uncut_transitions_up_to_min_segment_num():
    similarity = torch.tensor([0.5, 0.95, 0.99, 0.97, 0.85, 0.96])
    assert dyseg_lengths(similarity, 0.9, 2) == [1, 4, 2]  # enough cuts: only those below 0.9
    assert dyseg_lengths(similarity, 0.9, 4) == [1, 1, 3, 2]  # + the lowest uncut one (0.95); 0.5 is not cut again
    assert similarity.tolist() == pytest.approx([0.5, 0.95, 0.99, 0.97, 0.85, 0.96])  # the caller's copy is untouched


def test_a_transition_cut_twice_makes_an_empty_segment_as_released():
    similarity = torch.tensor([0.5, 1.0 + 2**-23])  # an uncut similarity rounded above the lifted 1.0
    assert (
        dyseg_lengths(similarity, 0.9, 3)
        == [1, 0, 2]
        == additional_segment(torch.tensor([0]), 3, 3, similarity.clone(), 0.9).tolist()
    )
    assert dyseg_lengths(torch.tensor([0.95, 0.97]), 0.9, 8) == [1, 1, 1]  # more wanted than transitions: every one


@pytest.mark.parametrize("seed", range(6))
def test_dyseg_equals_the_released_segmentation(seed):
    video, _ = scene_video(24, 8, scenes=3 + seed, drift=0.2 + 0.3 * seed, seed=seed)
    frame_means = video.mean(1)
    for minimum in (1, 4, 8, 12):
        expected = segment(frame_means, 0.9, minimum).tolist()
        assert dyseg_lengths(transition_similarity(frame_means), 0.9, minimum) == expected


# --- ADTS -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["attn_div", "attn_div_v2"])
@pytest.mark.parametrize("seed", range(3))
def test_adts_picks_the_released_tokens(method, seed):
    video, attention = scene_video(5, 49, dim=16, drift=0.5, seed=seed)
    expected_features, expected = ALL_TOKEN_SELECTION_METHOD[method](video, attention, 12)
    chosen = max_min_selection(adts_distances(video, attention, method), 12, exclude_chosen=method == "attn_div")
    assert torch.equal(chosen, expected)
    assert torch.equal(video.gather(1, chosen[..., None].expand(-1, -1, 16)), expected_features)


def test_adts_v1_starts_from_the_largest_second_smallest_distance_and_adds_the_farthest_token():
    distances = torch.tensor([[[0.0, 1.0, 4.0], [1.0, 0.0, 2.0], [4.0, 3.0, 0.0]]])
    assert max_min_selection(distances, 1, exclude_chosen=True).tolist() == [[2]]  # column 2's second smallest: 2.0
    assert max_min_selection(distances, 2, exclude_chosen=True).tolist() == [[0, 2]]  # row 2's farthest: column 0


def test_adts_v2_has_no_guard_and_picks_a_token_again_when_its_distances_are_negative_as_released():
    """Frame 0's tokens point away from frame 1's mean: their event relevance, hence their distances, are negative, so
    the chosen token's own distance (0) is the largest and v2 picks it again; v1 never does."""
    generator = torch.Generator().manual_seed(0)
    frame = torch.randn(9, 8, generator=generator) + 3.0
    video = torch.stack([frame, -4.0 * frame])
    attention = torch.rand(2, 9, generator=generator)
    again = max_min_selection(adts_distances(video, attention, "attn_div_v2"), 4, exclude_chosen=False)
    assert torch.equal(again, attn_div_v2_based_token_selection(video, attention, 4)[1])
    assert again[0].unique().numel() < 4
    assert max_min_selection(adts_distances(video, attention, "attn_div"), 4, exclude_chosen=True)[0].unique().numel() == 4


# --- TSTM and the spatial merge ---------------------------------------------------------------------------------------


def test_a_deep_tree_is_divided_by_its_root_and_direct_children_count_not_its_members():
    """x2 -> x1 -> x0 (one chain, a second token never merged): the root sums all three but counts 1 + its one child."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 5.0]], [[4.0, 0.0], [0.0, 7.0]]])
    links = TemporalLinks(
        merged=torch.tensor([[False, False], [True, False], [True, False]]),
        parent=torch.tensor([[-1, -1], [0, 1], [0, 1]]),
        raised=torch.tensor(False),
    )
    values = tree_merge(x, links, [0, 1, 1])
    assert values[0, 0].tolist() == [(1.0 + 2.0 + 4.0) / 2, 0.0]  # the tree mean would be 7/3
    assert values[1:, 1].tolist() == [[0.0, 5.0], [0.0, 7.0]] and values[0, 1].tolist() == [0.0, 1.0]
    assert x[0, 0].tolist() == [1.0, 0.0]  # a copy: the input is not summed into


def test_tstm_raises_its_threshold_when_too_few_tokens_would_stay():
    video, _ = scene_video(6, 16, scenes=1, drift=0.05)  # nearly still: every token has a match above 0.8
    free = torch.ones(6, 16, dtype=torch.bool)
    links = temporal_links(video, free, 0.8, 5 * 6)
    # merged only strictly above the (96 - 30)-th largest similarity, so that token stays too: 31, as released
    assert bool(links.raised) and int((~links.merged).sum()) == 5 * 6 + 1
    assert not links.merged[0].any()  # frame 0 has no previous frame
    relaxed = temporal_links(video, free, 0.8, 16)  # a bound frame 0's tokens meet alone
    assert not bool(relaxed.raised) and int((~relaxed.merged).sum()) == 16


def test_adts_tokens_neither_merge_nor_take_children():
    video, _ = scene_video(4, 16, drift=0.05)
    free = torch.ones(4, 16, dtype=torch.bool)
    free[:, :5] = False
    links = temporal_links(video, free, 0.8, 8)
    assert not links.merged[:, :5].any()
    assert not (links.merged[1:] & (links.parent[1:] < 5)).any()


@pytest.mark.parametrize("seed", range(3))
def test_the_density_peak_clusters_are_the_released_dpc_knn(seed):
    points = torch.randn(40, 24, generator=torch.Generator().manual_seed(seed))
    noise = torch.rand(40, generator=torch.Generator().manual_seed(seed + 10)) * 1e-6
    labels, centres = density_peak_clusters(points, 9, 7, noise)
    expected_labels, expected_centres = dpc_knn(points[None], 9, 7, noise_generator=torch.Generator().manual_seed(seed + 10))
    assert torch.equal(centres, expected_centres[0]) and torch.equal(labels, expected_labels[0])


# --- the whole vision side against the release -------------------------------------------------------------------------

CASES = {  # name: (scene_video settings, FlashVID settings): each reaches a part of the released arithmetic
    "deep trees, raised threshold": ({"frames": 16, "scenes": 1, "drift": 0.05}, {"min_segment_num": 1, "alpha": 0.3}),
    "deep trees, three scenes": ({"frames": 16, "scenes": 3, "drift": 0.05}, {"min_segment_num": 4}),
    "drifting, one-frame segments": ({"frames": 16, "scenes": 12, "drift": 0.6}, {}),
    "8 segments of few frames": ({"frames": 32, "scenes": 4, "drift": 0.3}, {"retention_ratio": 0.1}),
    "one long segment": ({"frames": 12, "scenes": 1, "drift": 0.4}, {"min_segment_num": 1, "segment_threshold": 0.0}),
    "ADTS only": ({"frames": 8, "scenes": 2, "drift": 0.3}, {"alpha": 1.0, "min_segment_num": 2}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["attn_div_v2", "attn_div"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_vision_side_equals_the_released_arithmetic_bit_for_bit(case, method, dtype):
    video_settings, settings = CASES[case]
    video, attention = scene_video(tokens=49, **video_settings, dtype=dtype)
    tokens, index, config = released(video, attention, token_selection_method=method, **settings)
    kept = ours(video, attention, token_selection_method=method, **settings)
    assert torch.equal(kept.index, index)
    assert kept.features.dtype == dtype and torch.equal(kept.features, tokens)
    assert kept.raised == config.raised


def test_the_cases_reach_deep_trees_the_raised_threshold_and_one_frame_segments():
    video, attention = scene_video(tokens=49, **CASES["deep trees, raised threshold"][0])
    kept = ours(video, attention, **CASES["deep trees, raised threshold"][1])
    assert kept.segments == [16] and kept.raised == 1
    links = temporal_links(video, torch.ones(16, 49, dtype=torch.bool), 0.8, 16 * 16)
    assert (links.merged[2:] & links.merged[1:-1].gather(1, links.parent[2:].clamp(min=0))).any()  # a child's parent merged
    video, attention = scene_video(tokens=49, **CASES["drifting, one-frame segments"][0])
    assert 1 in ours(video, attention).segments


def test_a_one_frame_segment_can_keep_an_adts_token_twice_as_released():
    """Its spatial clusters are drawn from all N tokens, ADTS ones included: a centre can be an ADTS token."""
    video, attention = scene_video(8, 16, scenes=8, drift=0.6, seed=3)
    settings = {"retention_ratio": 0.5, "alpha": 0.5, "min_segment_num": 8}
    kept = ours(video, attention, **settings)
    assert kept.segments == [1] * 8
    assert kept.index.unique().numel() < kept.index.numel()
    assert torch.equal(kept.index, released(video, attention, **settings)[1])


def test_the_video_keeps_at_least_its_budget_and_at_most_one_more_per_frame():
    video, attention = scene_video(32, 49, scenes=6, drift=0.3)
    kept = ours(video, attention)
    adts, tstm = frame_budgets(49, 0.25, 1.25, 0.7)
    assert 32 * (adts + tstm) <= kept.index.numel() <= 32 * (adts + tstm + 1)
    assert torch.equal(kept.index, kept.index.sort().values)


def test_a_video_waits_for_the_device_twice_in_at_most_1700_kernels():
    """The host reads DySeg's similarities (on an accelerator one copy, then read on the host) and then the TSTM counts
    once; 32 frames, every segment one frame (the most DPC-kNN calls) or a few long ones (TSTM's frame steps)."""
    from dycoke_eval.plumbing.counting import count_ops

    for scenes, drift in ((32, 0.6), (4, 0.1)):
        video, attention = scene_video(32, 196, dim=64, scenes=scenes, drift=drift)
        with torch.inference_mode(), count_ops() as counted:
            FlashVIDCompression().select(tokens_of(video, 14, 14), {"attention_received": attention}, "t/0")
        assert counted.counts.syncs <= 2 and counted.counts.ops <= 1700, (counted.counts.ops, dict(counted.counts.syncing))


# --- mode: paper (each difference against an expectation written from the paper's text) ------------------------------


def paper_distances(frame, attention, video):
    """Eqs. 6-8 in float64, column j calibrated (the reading under which the release's greedy is Alg. 3's): D_ij =
    (1 - cos(x_i, x_j)) * A_j * 1e6 * S_j, with S_j = (1/F) sum_f <x_j, f_f>, f_f the mean token of each video frame."""
    x, frame_means = frame.double(), video.double().mean(1)
    unit = x / x.norm(dim=-1, keepdim=True)
    relevance = torch.stack([x @ mean for mean in frame_means]).mean(0)
    return (1 - unit @ unit.T) * (attention.double() * 1e6 * relevance)[None, :]


def paper_adts(distances, count):
    """Alg. 3 on one frame: the first pick as released (the column's second-smallest distance, T:57), then each step
    the token of R = not yet chosen farthest from I, min over the chosen ones: never a token twice."""
    d, n = distances.tolist(), distances.shape[0]
    chosen = [max(range(n), key=lambda i: sorted(d[j][i] for j in range(n))[1])]
    while len(chosen) < count:
        chosen.append(max((i for i in range(n) if i not in chosen), key=lambda i: min(d[j][i] for j in chosen)))
    return sorted(chosen)


def test_paper_mode_aggregates_a_tree_by_the_mean_of_all_its_members():
    """x00 <- x10, x00 <- x11 <- x22 (frame 2's token 2 into frame 1's token 1), the rest never merged."""
    x = torch.tensor([[[1.0], [0.0], [0.0]], [[2.0], [4.0], [0.0]], [[0.0], [0.0], [8.0]]])
    links = TemporalLinks(
        merged=torch.tensor([[False, False, False], [True, True, False], [False, False, True]]),
        parent=torch.tensor([[-1, -1, -1], [0, 0, 0], [0, 0, 1]]),
        raised=torch.tensor(False),
    )
    assert tree_merge(x, links, [0, 2, 1], tree_mean=True)[0, 0].item() == (1 + 2 + 4 + 8) / 4
    assert tree_merge(x, links, [0, 2, 1])[0, 0].item() == (1 + 2 + 4 + 8) / 3  # released: 1 + 2 direct children
    chain = TemporalLinks(torch.tensor([[False], [True], [True]]), torch.tensor([[-1], [0], [0]]), torch.tensor(False))
    a, b, c = torch.tensor([[[1.0, 0.5]], [[2.0, 1.5]], [[4.0, -3.0]]]).unbind(0)
    values = tree_merge(torch.stack([a, b, c]), chain, [0, 1, 1], tree_mean=True)
    assert torch.equal(values[0], (a + b + c) / 3)
    assert torch.equal(tree_merge(torch.stack([a, b, c]), chain, [0, 1, 1])[0], (a + b + c) / 2)


def test_paper_mode_adts_never_picks_a_token_twice_where_v2_released_does():
    generator = torch.Generator().manual_seed(0)  # the released v2's repeat case above: negative event relevance
    frame = torch.randn(9, 8, generator=generator) + 3.0
    video = torch.stack([frame, -4.0 * frame])
    attention = torch.rand(2, 9, generator=generator)
    distances = adts_distances(video, attention, "attn_div_v2")  # one segment: the video's frames are the segment's
    assert max_min_selection(distances, 4, exclude_chosen=False)[0].unique().numel() < 4  # released
    paper = max_min_selection(distances, 4, exclude_chosen=True, chosen_score=-math.inf)
    assert paper.tolist() == [paper_adts(paper_distances(video[f], attention[f], video), 4) for f in range(2)]
    assert max_min_selection(distances, 4, exclude_chosen=True)[0].unique().numel() < 4  # v1's -1 guard is not enough


def test_paper_mode_averages_v2_event_relevance_over_every_frame_of_the_video():
    """Two segments of two frames, ADTS only (alpha 1): each frame keeps Alg. 3's picks under the video's relevance."""
    video, attention = scene_video(4, 16, dim=8, scenes=2, drift=0.3, seed=1)
    settings = {"alpha": 1.0, "min_segment_num": 2, "segment_threshold": 0.0}
    kept = ours(video, attention, mode="paper", **settings)
    assert kept.segments == [2, 2]
    budget = frame_budgets(16, 0.25, 1.25, 1.0)[0]
    expected = [16 * f + i for f in range(4) for i in paper_adts(paper_distances(video[f], attention[f], video), budget)]
    assert kept.index.tolist() == expected and torch.equal(kept.features, video.view(-1, 8)[expected])
    assert not torch.equal(ours(video, attention, **settings).index, kept.index)  # released: the segment's relevance


def test_paper_mode_clusters_a_one_frame_segments_tokens_without_its_adts_ones():
    """The released case of a token kept twice: in paper mode each frame's spatial clusters come from R = E minus I."""
    video, attention = scene_video(8, 16, scenes=8, drift=0.6, seed=3)
    settings = {"retention_ratio": 0.5, "alpha": 0.5, "min_segment_num": 8}
    kept = ours(video, attention, mode="paper", **settings)
    adts, tstm = frame_budgets(16, 0.5, 1.25, 0.5)
    assert kept.segments == [1] * 8 and kept.roots == 8 * (16 - adts)
    generator, index, features = torch.Generator().manual_seed(0), [], []
    for f in range(8):
        picks = paper_adts(paper_distances(video[f], attention[f], video), adts)
        rest = torch.tensor([i for i in range(16) if i not in picks])
        clusters = math.ceil(rest.numel() * (tstm / rest.numel()))
        labels, centres = dpc_knn(video[f, rest][None], clusters, min(clusters, 7), noise_generator=generator)
        onehot = F.one_hot(labels[0], clusters).float()
        index += [16 * f + i for i in picks] + (16 * f + rest[centres[0]]).tolist()
        features += [video[f, picks], onehot.T @ video[f, rest] / onehot.sum(0)[:, None]]
    order = torch.tensor(index).argsort()
    assert kept.index.tolist() == torch.tensor(index)[order].tolist() and kept.index.unique().numel() == len(index)
    torch.testing.assert_close(kept.features, torch.cat(features)[order])


def test_paper_mode_merges_at_the_threshold_in_float32():
    """cos([1, 0], [4, 3]) = 0.8: the paper merges (>= 0.8), the release does not (bf16 0.80078125 > bf16(0.8) fails);
    cos([1, 0], [105, 79]) = 0.79909 in float32, 0.80078125 in bf16: >= would merge it in bf16, not in float32."""
    free = torch.ones(2, 1, dtype=torch.bool)
    for second, paper_merges in (([4.0, 3.0], True), ([105.0, 79.0], False)):
        frames = torch.tensor([[[1.0, 0.0]], [second]], dtype=torch.bfloat16)
        assert bool(temporal_links(frames, free, 0.8, 1, paper=True).merged[1, 0]) is paper_merges
        assert not temporal_links(frames, free, 0.8, 1).merged[1, 0]


@pytest.mark.parametrize("case", list(CASES))
def test_paper_mode_keeps_the_planned_count_and_no_token_twice(case):
    """Planned F * budget is a lower bound in paper mode too (each frame's ceil adds at most one)."""
    video_settings, settings = CASES[case]
    video, attention = scene_video(tokens=49, **video_settings, dtype=torch.bfloat16)
    adts, tstm = frame_budgets(49, settings.get("retention_ratio", 0.25), 1.25, settings.get("alpha", 0.7))
    frames = video_settings["frames"]
    for method in SELECTIONS:
        kept = ours(video, attention, mode="paper", token_selection_method=method, **settings)
        assert frames * (adts + tstm) <= kept.index.numel() <= frames * (adts + tstm + 1)
        assert kept.index.unique().numel() == kept.index.numel() and torch.equal(kept.index, kept.index.sort().values)
        assert kept.features.dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["llava_onevision", "llava_video"])
def test_the_paper_mode_stage_keeps_its_planned_count_with_the_released_host_reads(family):
    from layouts import layout

    from dycoke_eval.plumbing.counting import count_ops

    video, attention = scene_video(8, 16, scenes=3, drift=0.3)
    kept, syncs = {}, {}
    for mode in MODES:
        stage = FlashVIDCompression(mode=mode, min_segment_num=4)
        with torch.inference_mode(), count_ops() as counted:
            kept[mode] = stage.select(tokens_of(video, 4, 4, family), {"attention_received": attention}, "t/0")
        syncs[mode] = counted.counts.syncs
    planned = stage.planned_tokens(PlannedCounts.full(layout(8, 4, 4, family), 8))
    count = kept["paper"].figures["flashvid_tokens_out"]
    assert planned == 8 * sum(frame_budgets(16, 0.25, 1.25, 0.7)) <= count <= planned + 8
    assert syncs["paper"] == syncs["official"] <= 2
    assert not torch.equal(kept["paper"].features, kept["official"].features)


# --- the stages -------------------------------------------------------------------------------------------------------


def test_the_in_llm_prune_keeps_ceil_of_the_span_and_everything_after_it():
    attention = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3, 0.05, 0.01])
    prune = FlashVIDPrune(layer=2, ratio=0.3)
    assert flashvid_keep_count(6, 0.3) == 2 and flashvid_keep_count(2196, 0.3) == 659  # ceil, not FastV's round
    assert prune.keep(attention, {"flashvid_llm_span": 6}).tolist() == [1, 3, 6]  # the OneVision newline stays
    assert prune.keep(attention, {"flashvid_llm_span": 7}).tolist() == [1, 3, 4]  # LLaVA-Video: newlines in the span
    with pytest.raises(ConfigError, match="needs the flashvid pre-LLM stage"):
        prune.keep(attention, {})


def test_the_method_is_the_vision_side_then_the_in_llm_prune_with_the_settings_it_was_given():
    method = FlashVID(retention_ratio=0.1, pruning_layer=3, llm_retention_ratio=0.2, token_selection_method="attn_div")
    vision, prune = method.stages()
    assert isinstance(vision, PreLLMStage) and isinstance(prune, PrefillStage)
    assert (vision.retention_ratio, vision.token_selection_method, prune.layer, prune.ratio) == (0.1, "attn_div", 3, 0.2)
    assert method.signals() == {"attention_received"}


def test_the_stage_lays_llava_video_out_frame_by_frame_with_one_newline_and_reports_its_span():
    video, attention = scene_video(8, 16, scenes=2, drift=0.3)
    stage = FlashVIDCompression(min_segment_num=2)
    onevision = stage.select(tokens_of(video, 4, 4), {"attention_received": attention}, "t/0")
    llava_video = stage.select(tokens_of(video, 4, 4, "llava_video"), {"attention_received": attention}, "t/0")
    count = onevision.figures["flashvid_tokens_out"]
    assert onevision.frame_newlines is None and onevision.figures["flashvid_llm_span"] == count
    assert llava_video.frame_newlines == 1 and llava_video.figures["flashvid_llm_span"] == count + 8
    assert torch.equal(onevision.features, llava_video.features)


def test_the_density_noise_is_drawn_per_sample_from_the_seed():
    video, attention = scene_video(8, 16, scenes=8, drift=0.6)
    stage = FlashVIDCompression(min_segment_num=8)
    first = stage.select(tokens_of(video, 4, 4), {"attention_received": attention}, "t/0")
    again = stage.select(tokens_of(video, 4, 4), {"attention_received": attention}, "t/0")
    assert torch.equal(first.features, again.features)
    kept = ours(video, attention, seed=per_sample_seed(0, "t/0"))
    assert torch.equal(first.features, kept.features)


def test_the_plan_is_the_budget_before_the_llm_and_ceil_of_the_share_from_the_pruning_layer_on():
    from layouts import layout

    planned = FlashVID(pruning_layer=3).plan(PlannedCounts.full(layout(32, 14, 14), 8))
    assert planned.prefill == planned.decode == [32 * 62] * 3 + [math.ceil(32 * 62 * 0.3)] * 5  # earlier caches hold all


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"retention_ratio": 0.8}, "retention_ratio=0.8, expansion=1.25"),
        ({"alpha": 0}, "alpha=0"),
        ({"token_selection_method": "attn"}, "token_selection_method='attn'"),
        ({"temporal_threshold": 1.0}, "temporal_threshold=1.0"),
        ({"segment_threshold": 2}, "segment_threshold=2"),
        ({"min_segment_num": 0}, "min_segment_num=0"),
        ({"llm_retention_ratio": 0}, "llm_retention_ratio=0"),
        ({"pruning_layer": 0}, "pruning_layer=0"),
        ({"mode": "papers"}, "^mode='papers'; use one of official, paper$"),
    ],
)
def test_bad_settings_fail_at_config_time_in_one_line_naming_the_value(settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        FlashVID(**settings)
    assert "\n" not in str(error.value)


def test_qwen3_vl_is_refused_in_one_line_naming_the_family_and_an_alternative():
    info = ModelInfo(layers=36, signals=frozenset(), family="qwen3_vl", video_in_one_span=False)
    with pytest.raises(ConfigError, match=r"not on the 'qwen3_vl' model family, where .* \(random, pooling\)$") as error:
        FlashVID(pruning_layer=28).validate_for(info)
    assert "\n" not in str(error.value)


def test_the_config_holds_the_scripts_settings_and_leaves_the_family_ones_to_each_family():
    method = instantiate_method("flashvid")
    assert method == FlashVID()
    settings = {
        "name": "flashvid",
        "retention_ratio": 0.25,
        "alpha": 0.7,
        "token_selection_method": None,
        "temporal_threshold": 0.8,
        "segment_threshold": 0.9,
        "min_segment_num": None,
        "expansion": 1.25,
        "pruning_layer": 20,
        "llm_retention_ratio": 0.3,
        "mode": "official",
        "seed": 0,
    }
    assert method.describe() == settings
    llava = {"token_selection_method": "attn_div_v2", "min_segment_num": 8}
    assert method.describe("llava_onevision") == method.describe("llava_video") == {**settings, **llava}
    assert method.describe("qwen2_5_vl") == {**settings, "token_selection_method": "attn_div", "min_segment_num": 4}
    assert FlashVID(min_segment_num=2).describe("qwen2_5_vl")["min_segment_num"] == 2  # a given setting stays
    paper = FlashVID(mode="paper")
    assert paper.describe("llava_video") == {**settings, **llava, "mode": "paper"}  # family settings as released
    assert paper.stages()[0].mode == "paper"


# --- on the tiny model ------------------------------------------------------------------------------------------------

FRAMES = 16
TINY = {"pruning_layer": 3}  # the release's layer 20 does not exist in the tiny model's 8


@pytest.fixture(scope="module", params=["llava_onevision", "llava_video"])
def lm(request, tiny_checkpoint):
    adapter = None if request.param == "llava_onevision" else "llava_video"
    return CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=FRAMES, device="cpu", adapter=adapter)


def test_the_release_pruning_layer_is_refused_on_a_shallower_model(tiny_checkpoint):
    with pytest.raises(ConfigError, match="^pruning_layer=20: the language model has 8 layers; choose 1 <= pruning_layer < 8$"):
        CompressedVideoLM(pretrained=str(tiny_checkpoint), method=FlashVID(), device="cpu")


def test_the_tiny_model_sees_the_vision_side_tokens_then_ceil_of_the_share_from_the_pruning_layer(lm):
    lm.method = FlashVID(retention_ratio=0.5, **TINY)
    record = SampleRecord("t", 0)
    lm.run_sample(synthetic_frames("flashvid")[:FRAMES], "What moves?", {"max_new_tokens": 3, "do_sample": False}, record, "t/0")
    stats = record.method_stats
    count, span = stats["flashvid_tokens_out"], stats["flashvid_llm_span"]
    newlines = 1 if lm.adapter.family == "llava_onevision" else FRAMES  # one after the video | one after each frame
    kept = math.ceil(span * 0.3) + (1 if lm.adapter.family == "llava_onevision" else 0)
    assert record.visual_tokens_in == count + newlines
    assert record.visual_tokens_by_stage == {"flashvid": count, "flashvid_llm": kept}
    assert record.prefill_visual_by_layer == [count + newlines] * 3 + [kept] * 5
    layout = lm.adapter.layout(FRAMES)
    adts, tstm = frame_budgets(layout.tokens_per_frame, 0.5, 1.25, 0.7)
    assert FRAMES * (adts + tstm) <= count <= FRAMES * (adts + tstm + 1)


# --- Qwen2.5-VL -------------------------------------------------------------------------------------------------------


def released_received_attention(query_states, key_states, num_heads, head_dim, num_frames, window_index):
    """`flashvid/modeling_qwen2_5_vl.py:576-584` (the last block's weights; `query_states`, `key_states` [1, H, S, d]
    after the vision RoPE) and `:254, 259-263` (merge units' mean, raster order), as released."""
    q, k = query_states.squeeze(0), key_states.squeeze(0)
    q, k = q.transpose(0, 1), k.transpose(0, 1)
    q = q.reshape(num_frames, -1, num_heads, head_dim).permute(0, 2, 1, 3).contiguous()
    k = k.reshape(num_frames, -1, num_heads, head_dim).permute(0, 2, 1, 3).contiguous()
    attn_weights = torch.matmul(q, k.transpose(-1, -2)) / head_dim**0.5
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
    attn_weights = attn_weights.mean(1).mean(1)
    reverse_indices = torch.argsort(window_index)
    seq_len = attn_weights.shape[-1] // 4
    attn_weights = attn_weights.view(num_frames, seq_len, -1).mean(-1).view(-1)
    attn_weights = attn_weights[reverse_indices].view(num_frames, -1)
    return attn_weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_qwen_attention_received_is_the_released_last_block_computation(dtype):
    from transformers.vision_utils import get_vision_window_index

    from dycoke_eval.models.qwen_salience import mean_received_attention, rotary

    grid, heads, head_dim = (2, 8, 12), 2, 4  # 2 temporal patches of 8 x 12 patches (4 x 6 merged tokens)
    window_index, _ = get_vision_window_index(torch.tensor([grid]), 2, 56, 14)
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(192, 3 * heads * head_dim, generator=generator).to(dtype)
    cos, sin = torch.randn(192, head_dim, generator=generator), torch.randn(192, head_dim, generator=generator)
    received = mean_received_attention(qkv, cos, sin, grid, heads, window_index)
    q, k, _ = qkv.reshape(192, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, cos, sin)
    expected = released_received_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], heads, head_dim, 2, window_index)
    assert received.shape == (2, 24) and received.dtype == torch.float32
    assert torch.equal(received, expected.float())


def test_on_qwen_a_token_kept_twice_enters_once_as_the_copy_the_release_writes_last():
    from dycoke_eval.methods.flashvid import once_per_position

    features = torch.arange(5.0)[:, None]
    kept, index = once_per_position(features, torch.tensor([1, 3, 3, 5, 6]))
    assert index.tolist() == [1, 3, 5, 6] and kept.flatten().tolist() == [0.0, 2.0, 3.0, 4.0]


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    from dycoke_eval.offline.tiny_qwen import build_tiny_qwen_checkpoint

    return build_tiny_qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen2_5_vl"), "qwen2_5_vl")


def test_on_tiny_qwen2_5_vl_the_family_settings_run_and_the_prune_keeps_ceil_of_the_share(qwen_checkpoint):
    lm = CompressedVideoLM(pretrained=str(qwen_checkpoint), frames=FRAMES, device="cpu", method=FlashVID(**TINY))
    record = SampleRecord("t", 0)
    lm.run_sample(synthetic_frames("flashvid")[:FRAMES], "What moves?", {"max_new_tokens": 3, "do_sample": False}, record, "t/0")
    count = record.method_stats["flashvid_tokens_out"]
    assert record.method_stats["flashvid_llm_span"] == count == record.visual_tokens_in
    assert record.visual_tokens_by_stage == {"flashvid": count, "flashvid_llm": math.ceil(count * 0.3)}
    frames, rows, cols = record.token_grid
    adts, tstm = frame_budgets(rows * cols, 0.25, 1.25, 0.7)
    assert frames * adts <= count <= frames * (adts + tstm + 1)
    with torch.no_grad():
        encoded = lm.adapter.encode(
            lm.adapter.preprocess(synthetic_frames("flashvid")[:FRAMES]), frozenset({"attention_received"})
        )
    received = encoded.signals["attention_received"]
    assert received.shape == (frames, rows * cols) and torch.all(received > 0)
