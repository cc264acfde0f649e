"""HoliTom: the pre-LLM holistic merge and the in-LLM merge M, checked against a literal transcription of the release.

`Released` below is cokeshao/HoliTom@e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0:holitom/llava_arch.py, lines 29-311
(the methods, as released, loops and all) and 370-407 (their driver in `prepare_inputs_labels_for_multimodal`, from
the pooled features on), and `released_merge` holitom/modeling_qwen2.py:164-181 (M's merge loop). Two changes only:
the density noise `torch.rand(...) * 1e-6` (line 39) is the given `noise`'s next draw, and `repaired=True` replaces
line 174, which fails for any d > 0, by the positions of the non-dominant tokens.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from layouts import layout, tokens_of

from dycoke_eval.compression.dispatcher import Compressor
from dycoke_eval.compression.stages import PlannedCounts
from dycoke_eval.config import ConfigError, instantiate_method
from dycoke_eval.geometry import ModelInfo
from dycoke_eval.methods.holitom import (
    DensityNoise,
    HoliTom,
    HoliTomInLLMMerge,
    holitom_merge,
    merge_keep_count,
    pairwise_halving_merge,
    rescaled_retention,
    select_static_windows,
    static_window_savings,
)
from dycoke_eval.models.base import EncodedVideo
from dycoke_eval.models.llava_video import LlavaVideoAdapter
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.wrapper import CompressedVideoLM, SampleRecord


class Released:
    """llava_arch.py's methods, as released; `self.noise.draw(shape)` stands for the unseeded draw."""

    def __init__(self, noise, newline=None, repaired=False):
        self.noise, self.repaired = noise, repaired
        self.model = SimpleNamespace(image_newline=newline)

    def cluster_dpc_knn(self, x, cluster_num, k=7):
        with torch.no_grad():
            batch_size, seq_len, embed_dim = x.shape
            dist_matrix = torch.cdist(x.float(), x.float()) / (embed_dim**0.5)  # (batch_size, seq_len, seq_len)
            # get local density
            dist_nearest, index_nearest = torch.topk(dist_matrix, k, dim=-1, largest=False)  # (batch_size, seq_len, k)
            density = (-(dist_nearest**2).mean(dim=-1)).exp()  # (batch_size, seq_len)
            # add a little noise to ensure no tokens have the same density.
            density = density + self.noise.draw(density.shape)
            # get distance indicator
            mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
            dist_max = dist_matrix.flatten(1).max(dim=-1).values[:, None, None]
            dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
            # select the cluster center according to the score
            score = dist * density
            _, index_center = score.topk(cluster_num, dim=-1)
            return index_center, dist_matrix

    def select_static_windows(self, feature_sim, batch_size, tau, max_window_size):
        # pruned_static_count[s,e]
        def get_pruned_static_count_vectorized(feature_sim, batch_size, tau):
            similarity_matrix = torch.ones((batch_size, batch_size, feature_sim.shape[1]), device=feature_sim.device)
            for start in range(batch_size - 1):
                cum_similarity = torch.cumprod(feature_sim[start:] > tau, dim=0)
                similarity_matrix[start, start + 1 : start + 1 + len(cum_similarity)] = cum_similarity
            window_lengths = torch.arange(batch_size, device=feature_sim.device).unsqueeze(0) - torch.arange(
                batch_size, device=feature_sim.device
            ).unsqueeze(1)
            window_lengths = window_lengths.clamp(min=0)
            pruned_static_count = (similarity_matrix.sum(dim=-1) * window_lengths).float()
            return pruned_static_count

        pruned_static_count = get_pruned_static_count_vectorized(feature_sim, batch_size, tau)
        dp = torch.zeros(batch_size, device=pruned_static_count.device)
        prev = torch.zeros(batch_size, dtype=torch.long, device=pruned_static_count.device)
        # [prev[i], i]
        for i in range(batch_size):
            max_val = dp[i - 1] if i > 0 else 0
            best_j = i
            for window_size in range(2, min(i + 1, max_window_size) + 1):
                j = i - window_size
                current_val = (dp[j] if j >= 0 else 0) + pruned_static_count[j + 1, i]  # [-, j] + [j+1, i]
                if current_val > max_val:
                    max_val = current_val
                    best_j = j + 1
            dp[i] = max_val
            prev[i] = best_j  # [best_j, i]
        selected_frames = []
        i = batch_size - 1
        while i >= 0:
            selected_frames.append((prev[i].item(), i))
            i = prev[i].item() - 1
        selected_frames = selected_frames[::-1]
        total_reduced = dp[-1].item()
        return selected_frames, total_reduced

    def merge_tokens_by_clustering(self, feat, target_indices, dist_matrix, cluster_num, Beta):
        batch_size, seq_len, embed_dim = feat.shape
        all_indices = torch.arange(seq_len, device=feat.device)
        all_indices = all_indices.unsqueeze(0).expand(batch_size, -1)  # (batch_size, seq_len)
        non_target_indices = torch.zeros((batch_size, seq_len - cluster_num), dtype=torch.long, device=feat.device)
        for b in range(batch_size):
            non_target_mask = ~torch.isin(all_indices[b], target_indices[b])
            non_target_indices[b] = all_indices[b][non_target_mask]
        non_target_feat = torch.gather(feat, dim=1, index=non_target_indices.unsqueeze(-1).expand(-1, -1, feat.size(-1)))
        dist_matrix = torch.gather(
            dist_matrix, dim=1, index=non_target_indices.unsqueeze(-1).expand(-1, -1, dist_matrix.size(-1))
        )
        dist_matrix = torch.gather(dist_matrix, dim=2, index=target_indices.unsqueeze(1).expand(-1, dist_matrix.size(1), -1))
        idx_cluster = torch.argmin(dist_matrix, dim=-1)  # (batch_size, seq_len-cluster_num)
        cluster_tokens = []
        for b in range(batch_size):
            batch_tokens = []
            for i in range(cluster_num):
                mask = idx_cluster[b] == i
                if mask.any():
                    cluster_features = non_target_feat[b][mask]
                    import os

                    if os.environ.get("NO_BETA", "0") == "0":
                        cluster_means = cluster_features.mean(dim=0)
                        batch_tokens.append(Beta * feat[b][target_indices[b][i]] + (1 - Beta) * cluster_means)
                    else:
                        all_features = torch.cat([feat[b][target_indices[b][i]].unsqueeze(0), cluster_features], dim=0)
                        batch_tokens.append(all_features.mean(dim=0))
                else:
                    batch_tokens.append(feat[b][target_indices[b][i]])
            cluster_tokens.append(torch.stack(batch_tokens))
        cluster_tokens = torch.stack(cluster_tokens)  # shape: (batch_size, cluster_num, embed_dim)
        return cluster_tokens

    def merge_tokens_by_attention_density(self, feat, attn, pos, retain_ratio, D, Beta, K):
        batch_size, seq_len, embed_dim = feat.shape
        dominant_num = round(math.ceil(seq_len * retain_ratio) * (1 - D))
        contextual_num = math.ceil(seq_len * retain_ratio) - dominant_num
        ## Dominant Visual Tokens
        if dominant_num > 0:
            all_indices = attn.topk(dominant_num, dim=1).indices
            mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool, device=feat.device).scatter_(1, all_indices, False)
            dominant_tokens = feat.masked_select(~mask.unsqueeze(-1)).view(batch_size, dominant_num, embed_dim)
            dominant_pos = pos.masked_select(~mask).view(batch_size, dominant_num)
        else:
            mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool, device=feat.device)
            dominant_tokens = torch.empty((batch_size, 0, embed_dim), device=feat.device)
            dominant_pos = torch.empty((batch_size, 0), device=feat.device)
        ## Contextual Visual Tokens
        if contextual_num > 0:
            feat_filtered = feat.masked_select(mask.unsqueeze(-1)).view(batch_size, seq_len - dominant_num, embed_dim)
            if self.repaired:  # line 174 broadcasts pos [W, n] against [W, n, 1] and fails
                contextual_pos = pos.masked_select(mask).view(batch_size, seq_len - dominant_num)
            else:
                contextual_pos = pos.masked_select(mask.unsqueeze(-1)).view(batch_size, seq_len - dominant_num)
            target_indices, dist_matrix = self.cluster_dpc_knn(feat_filtered, contextual_num, k=min(K, contextual_num))
            target_indices = torch.sort(target_indices, dim=-1)[0]
            contextual_pos = torch.stack([contextual_pos[b][target_indices[b]] for b in range(batch_size)])
            contextual_tokens = self.merge_tokens_by_clustering(feat_filtered, target_indices, dist_matrix, contextual_num, Beta)
        else:
            contextual_tokens = torch.empty((batch_size, 0, embed_dim), device=feat.device)
            contextual_pos = torch.empty((batch_size, 0), device=feat.device)
        image_feat = []
        image_pos = []
        for b in range(batch_size):
            batch_tokens = torch.cat([dominant_tokens[b], contextual_tokens[b]], dim=0)
            batch_pos = torch.cat([dominant_pos[b], contextual_pos[b]], dim=0)
            image_feat.append(batch_tokens)
            image_pos.append(batch_pos)
        image_feat = torch.stack(image_feat)  # shape: (batch_size, dominant_num + contextual_num, embed_dim)
        image_pos = torch.stack(image_pos)
        return image_feat, image_pos

    def merge_tokens_by_density(self, feat, pos, retain_ratio, Beta, K):
        batch_size, seq_len, embed_dim = feat.shape
        cluster_num = round(seq_len * retain_ratio)
        if cluster_num > 0:
            target_indices, dist_matrix = self.cluster_dpc_knn(feat, cluster_num, k=min(K, cluster_num))
            target_indices = torch.sort(target_indices, dim=-1)[0]
            image_pos = torch.stack([pos[b][target_indices[b]] for b in range(batch_size)])
            cluster_tokens = self.merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, Beta)
            image_feat = cluster_tokens
        else:
            image_feat = torch.empty((batch_size, 0, embed_dim), device=feat.device)
            image_pos = torch.empty((batch_size, 0), device=feat.device)
        return image_feat, image_pos

    def add_newline_token(self, feat, pos, grid_size, newline_token):
        row_pos = pos // grid_size
        expanded_feat_list = []
        for cur_feat, cur_row_pos in zip(feat, row_pos):  # noqa: B905 (as released)
            expanded_feat = []
            for row in range(grid_size):
                find_row_feat = cur_feat[cur_row_pos == row]
                if len(find_row_feat) > 0:
                    expanded_feat.append(torch.cat((find_row_feat, newline_token), dim=0))
                else:
                    expanded_feat.append(find_row_feat)
            batch_feat = torch.cat(expanded_feat, dim=0)
            expanded_feat_list.append(batch_feat)
        image_feat = torch.cat(expanded_feat_list, dim=0)
        return image_feat

    def holitom(
        self, static_feat, dynamic_feat, dynamic_attn, static_pos, dynamic_pos, window_size, retain_ratio, D, Beta, K,
        images_dtype, mm_newline_position,
    ):  # fmt: skip
        newline_token = self.model.image_newline[None].to(static_feat.device) if mm_newline_position == "grid" else None
        grid_size = int(math.sqrt(dynamic_feat.shape[1] + static_feat.shape[0]))
        if window_size == 1:
            dynamic_feat, dynamic_pos = self.merge_tokens_by_attention_density(
                dynamic_feat, dynamic_attn, dynamic_pos, retain_ratio, D, Beta, K
            )
            if mm_newline_position != "grid":
                feat = dynamic_feat.flatten(0, 1)
            else:
                dynamic_pos, sorted_indices = torch.sort(dynamic_pos, dim=1)
                dynamic_feat = torch.gather(dynamic_feat, 1, sorted_indices.unsqueeze(-1).expand(-1, -1, dynamic_feat.shape[-1]))
                dynamic_feat = self.add_newline_token(dynamic_feat, dynamic_pos, grid_size, newline_token)
                feat = dynamic_feat
            return feat.to(images_dtype)
        else:
            dynamic_feat, dynamic_pos = self.merge_tokens_by_attention_density(
                dynamic_feat, dynamic_attn, dynamic_pos, retain_ratio, D, Beta, K
            )
            static_feat, static_pos = self.merge_tokens_by_density(static_feat.unsqueeze(0), static_pos, retain_ratio, Beta, K)
            if mm_newline_position != "grid":
                feat = torch.cat([static_feat.flatten(0, 1), dynamic_feat.flatten(0, 1)])
            else:
                first_dynamic_feat = dynamic_feat[0:1, :]
                first_dynamic_pos = dynamic_pos[0:1, :]
                first_feat = torch.cat([static_feat, first_dynamic_feat], dim=1)
                first_pos = torch.cat([static_pos, first_dynamic_pos], dim=1)
                first_pos, first_sorted_indices = torch.sort(first_pos, dim=1)
                first_feat = torch.gather(first_feat, 1, first_sorted_indices.unsqueeze(-1).expand(-1, -1, first_feat.shape[-1]))
                first_feat = self.add_newline_token(first_feat, first_pos, grid_size, newline_token)
                other_feat = dynamic_feat[1:, :]
                other_pos = dynamic_pos[1:, :]
                other_pos, other_sorted_indices = torch.sort(other_pos, dim=1)
                other_feat = torch.gather(other_feat, 1, other_sorted_indices.unsqueeze(-1).expand(-1, -1, other_feat.shape[-1]))
                other_feat = self.add_newline_token(other_feat, other_pos, grid_size, newline_token)
                feat = torch.cat([first_feat, other_feat])
            return feat.to(images_dtype)

    def get_static_dynamic_features(self, image_feat, attn_weights, selected_frames, feature_sim, tau):
        batch_size, seq_len, embed_dim = image_feat.shape
        static_feat_list, dynamic_feat_list, _, dynamic_attn_list = [], [], [], []
        static_pos_list, dynamic_pos_list = [], []
        for start, end in selected_frames:
            all_indices = torch.arange(seq_len, device=image_feat.device).unsqueeze(0)  # (1, seq_len)
            if start == end:
                static_feat_list.append(torch.empty((0, embed_dim), device=image_feat.device))
                dynamic_feat_list.append(image_feat[start : end + 1])
                dynamic_attn_list.append(attn_weights[start : end + 1])
                static_pos_list.append(torch.empty((0, seq_len), device=image_feat.device))
                dynamic_pos_list.append(all_indices)
            else:
                windows_size = end - start + 1
                mask = torch.all(feature_sim[start:end, :] > tau, dim=0)
                static_feat = image_feat[start : end + 1, mask]
                dynamic_feat = image_feat[start : end + 1, ~mask]
                dynamic_attn = attn_weights[start : end + 1, ~mask]
                static_feat_list.append(static_feat.mean(dim=0))
                dynamic_feat_list.append(dynamic_feat)
                dynamic_attn_list.append(dynamic_attn)
                static_pos_list.append(all_indices[:, mask].expand(1, -1))
                dynamic_pos_list.append(all_indices[:, ~mask].expand(windows_size, -1))
        return static_feat_list, dynamic_feat_list, _, dynamic_attn_list, static_pos_list, dynamic_pos_list

    def video(self, pooled_image_feat, attn_weights, retain_ratio, tau, Beta, D, K, max_window_size, mm_newline_position):
        """llava_arch.py:375-407, from the pooled features and attention on (`images_dtype`: the features')."""
        images_dtype = pooled_image_feat.dtype
        batch_size, seq_len, embed_dim = pooled_image_feat.shape
        pooled_image_feat_normed = torch.nn.functional.normalize(pooled_image_feat, p=2, dim=-1)
        feature_sim = torch.nn.functional.cosine_similarity(pooled_image_feat_normed[:-1], pooled_image_feat_normed[1:], dim=-1)
        selected_frames, total_reduced = self.select_static_windows(feature_sim, batch_size, tau, max_window_size)
        total_tokens = batch_size * seq_len
        retain_ratio = min(retain_ratio / ((total_tokens - total_reduced) / total_tokens), 1)
        static_feat, dynamic_feat, _, dynamic_attn, static_pos, dynamic_pos = self.get_static_dynamic_features(
            pooled_image_feat, attn_weights, selected_frames, feature_sim, tau
        )
        segment_features = []
        for idx, (start, end) in enumerate(selected_frames):
            window_size = end - start + 1
            segment_features.append(
                self.holitom(
                    static_feat[idx],
                    dynamic_feat[idx],
                    dynamic_attn[idx],
                    static_pos[idx],
                    dynamic_pos[idx],
                    window_size,
                    retain_ratio,
                    D,
                    Beta,
                    K,
                    images_dtype,
                    mm_newline_position,
                )  # fmt: skip
            )
        return torch.cat(segment_features, dim=0), selected_frames, total_reduced


def released_merge(hidden_states, top_attention_rank_index, start, length):
    """modeling_qwen2.py:164-181 (HOLITOM_image_token_start_index = start, HOLITOM_image_token_length = length)."""
    HOLITOM_image_token_start_index, HOLITOM_image_token_length = start, length
    device = hidden_states.device
    all_indices = torch.arange(HOLITOM_image_token_length, device=device)
    non_topk_mask = ~torch.isin(all_indices, top_attention_rank_index - HOLITOM_image_token_start_index)
    non_topk_indices = all_indices[non_topk_mask] + HOLITOM_image_token_start_index
    non_topk_states = hidden_states[:, non_topk_indices, :]  # [batch_size, len(non_topk), hidden_size]
    topk_states = hidden_states[:, top_attention_rank_index, :]  # [batch_size, len(topk), hidden_size]
    non_topk_norm = torch.norm(non_topk_states, dim=-1, keepdim=True)  # [batch_size, len(non_topk), 1]
    topk_norm = torch.norm(topk_states, dim=-1, keepdim=True)  # [batch_size, len(topk), 1]
    dot_product = torch.bmm(non_topk_states, topk_states.transpose(1, 2))  # [batch_size, len(non_topk), len(topk)]
    sim_matrix = dot_product / (non_topk_norm * topk_norm.transpose(1, 2))
    sim_max, sim_max_index = torch.max(sim_matrix, dim=-1)
    for b in range(hidden_states.size(0)):
        for i in range(len(non_topk_indices)):
            non_topk_idx = non_topk_indices[i]
            most_similar_topk_idx = top_attention_rank_index[sim_max_index[b, i]]
            hidden_states[b, most_similar_topk_idx, :] = (
                hidden_states[b, most_similar_topk_idx, :] + hidden_states[b, non_topk_idx, :]
            ) / 2
    return hidden_states


def video_features(frames=12, side=7, dim=24, dtype=torch.float32, seed=0):
    """Pooled features [F, side^2, D] with runs of near-still frames (so static windows form) and attention [F, N]."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn(frames, side * side, dim, generator=generator)
    for first, last in [(0, 4), (6, 9)]:
        grid[first + 1 : last + 1] = grid[first] + 0.25 * torch.randn(last - first, side * side, dim, generator=generator)
    attention = torch.rand(frames, side * side, generator=generator)
    return grid.to(dtype), attention.to(dtype)


def ours(grid, attention, retention=0.25, tau=0.8, beta=0.6, d=0.0, knn=7, max_window_size=1024, seed=3):
    return holitom_merge(grid, attention, retention, tau, beta, d, knn, max_window_size, DensityNoise(seed, "s", grid.device))


def theirs(grid, attention, retention=0.25, tau=0.8, beta=0.6, d=0.0, knn=7, max_window_size=1024, seed=3, **kwargs):
    released = Released(DensityNoise(seed, "s", grid.device), **kwargs)
    return released.video(grid, attention, retention, tau, beta, d, knn, max_window_size, "one_token")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"retention": 0.1, "tau": 0.65},
        {"retention": 0.4, "beta": 0.3, "knn": 3},
        {"max_window_size": 3},
        {"retention": 0.15, "tau": 0.95},  # hardly a static position: the windows are single frames
    ],
)
def test_the_pre_llm_tokens_are_the_released_ones_bit_for_bit_in_their_order(dtype, settings):
    grid, attention = video_features(dtype=dtype)
    released, windows, saved = theirs(grid, attention, **settings)
    merged = ours(grid, attention, **settings)
    assert merged.windows == windows and merged.saved == saved
    assert merged.features.dtype == dtype and torch.equal(merged.features, released)


def test_the_fixture_video_has_static_windows_and_static_tokens_merged():
    """The cases above exercise every branch: windows of several frames, static merges, single frames."""
    grid, attention = video_features()
    merged = ours(grid, attention)
    sizes = [last - first + 1 for first, last in merged.windows]
    assert max(sizes) > 1 and 1 in sizes and merged.static > 0
    assert merged.share == rescaled_retention(0.25, grid.shape[0] * grid.shape[1], merged.saved) > 0.25


def test_contextual_merges_crash_the_release_and_take_their_centres_positions_here():
    grid, attention = video_features()
    with pytest.raises(RuntimeError):
        theirs(grid, attention, d=0.5)
    released, _, _ = theirs(grid, attention, d=0.5, repaired=True)
    merged = ours(grid, attention, d=0.5)
    assert torch.equal(merged.features, released)


def test_the_llava_video_adapters_row_end_layout_is_holitoms_newline_rule():
    """The adapter sorts the tokens by grid index (static ones at their window's first frame) and puts a newline after
    every row that keeps one: the release's `add_newline_token` sequence, newline for newline."""
    grid, attention = video_features()
    newline = torch.full((grid.shape[-1],), 7.0)
    released = Released(DensityNoise(3, "s", grid.device), newline=newline)
    expected, _, _ = released.video(grid, attention, 0.25, 0.8, 0.6, 0.0, 7, 1024, "grid")
    merged = ours(grid, attention)
    encoded = EncodedVideo(grid=grid, layout=layout(grid.shape[0], 7, 7, "llava_video"), newline=newline)
    visual, _ = LlavaVideoAdapter.assemble(None, encoded, merged.features, merged.index)
    assert torch.equal(visual, expected)


def test_the_windows_savings_and_dp_are_the_released_ones_on_a_long_video():
    generator = torch.Generator().manual_seed(1)
    similarity = torch.rand(31, 40, generator=generator) * 0.4 + 0.6
    released = Released(None).select_static_windows(similarity, 32, 0.75, 1024)
    savings = static_window_savings(similarity, 0.75)
    assert select_static_windows(savings.tolist(), 1024) == released
    assert select_static_windows(savings.tolist(), 2) == Released(None).select_static_windows(similarity, 32, 0.75, 2)


def test_tau_is_compared_in_the_features_dtype():
    """bfloat16 rounds 0.8 up to 0.80078125: a cosine of exactly 0.80078125 is not above it."""
    similarity = torch.full((1, 1), 0.80078125, dtype=torch.bfloat16)
    assert static_window_savings(similarity, 0.8).sum() == 0
    assert static_window_savings(similarity.float(), 0.8).sum() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_in_llm_merge_is_the_released_sequential_halving_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 60, 32, generator=generator).to(dtype)
    hidden[0, 10:50] += 2 * torch.randn(4, 32, generator=generator).to(dtype).repeat(10, 1)  # groups with many members
    start, length = 10, 40
    attention = torch.rand(length, generator=generator)
    top = attention.topk(merge_keep_count(length, 0.5)).indices + start
    released = released_merge(hidden.clone(), top, start, length)
    dropped = torch.tensor([i for i in range(start, start + length) if i not in top.tolist()])
    merged = pairwise_halving_merge(hidden[0, top], hidden[0, dropped])
    assert torch.equal(merged, released[0, top])
    assert not torch.equal(merged, hidden[0, top])


def test_the_merge_keeps_the_released_rounded_count():
    assert merge_keep_count(6273, 0.5) == 3136  # round(3136.5): half to even
    assert merge_keep_count(1569, 0.5) == 784  # round(784.5)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"retention": 0}, "retention=0"),
        ({"tau": 1.5}, "tau=1.5"),
        ({"beta": -0.1}, "beta=-0.1"),
        ({"d": 2}, "d=2"),
        ({"knn": 0}, "knn=0"),
        ({"max_window_size": 0}, "max_window_size=0"),
        ({"merge_ratio": 1}, "merge_ratio=1"),
        ({"merge_layer": 0}, "merge_layer=0"),
    ],
)
def test_bad_settings_fail_at_config_time_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        HoliTom(**settings)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_families_are_refused_naming_the_family_and_an_alternative(family):
    info = ModelInfo(layers=28, signals=frozenset({"attention_received"}), family=family)
    with pytest.raises(ConfigError, match=rf"holitom: .* {family} model family .* method=fastvid"):
        HoliTom().validate_for(info)


def test_the_config_is_the_release_with_m_and_a_merge_layer_beyond_the_tiny_model_is_refused():
    method = instantiate_method("holitom")
    assert method == HoliTom()
    assert [stage.name for stage in method.stages()] == ["holitom", "holitom_llm"]
    assert [stage.name for stage in HoliTom(in_llm=False).stages()] == ["holitom"]
    with pytest.raises(ConfigError, match="^merge_layer=18: the language model has 8 layers; choose 1 <= merge_layer < 8$"):
        method.validate_for(ModelInfo(layers=8, signals=frozenset({"attention_received"}), family="llava_onevision"))


def test_the_plan_is_the_retention_before_the_llm_and_half_of_it_from_the_merge_layer():
    counts = PlannedCounts.full(layout(32, 14, 14), 28)
    plan = HoliTom(retention=0.25).plan(counts)
    assert plan.prefill[:18] == [1568.0] * 18 and plan.prefill[18:] == [784.0] * 10
    assert plan.decode == plan.prefill  # the layers before the merge decode over every token they cached
    assert HoliTom(retention=0.25, in_llm=False).plan(counts).prefill == [1568.0] * 28
    assert HoliTom(retention=0.25).planned_retained_ratio(counts) == 0.25  # the paper's column, with or without M


def test_the_stage_gives_the_merge_its_tokens_at_grid_positions_with_its_figures():
    grid, attention = video_features()
    tokens = tokens_of(grid, 7, 7)
    out = HoliTom(retention=0.25).select(tokens, {"attention_received": attention}, "t/0")
    again = HoliTom(retention=0.25).select(tokens, {"attention_received": attention}, "t/0")
    assert torch.equal(out.features, again.features) and torch.equal(out.index, again.index)
    assert out.figures["holitom_tokens_out"] == out.features.shape[0] and sum(out.figures["holitom_windows"]) == 12
    assert out.index.unique().numel() == out.index.numel() and int(out.index.max()) < 12 * 49


FRAMES = 8
GREEDY = {"max_new_tokens": 4, "do_sample": False, "eos_token_id": None, "output_logits": True, "return_dict_in_generate": True}


@pytest.fixture(scope="module", params=[None, "llava_video"])
def lm(request, tiny_checkpoint):
    """The tiny model under LLaVA-OneVision's layout and LLaVA-Video's."""
    return CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=FRAMES, device="cpu", adapter=request.param)


def generate(lm, method, reference=False):
    lm.method = method
    if reference:
        lm.compressor = Compressor(lm.adapter, method, reference=True)
    record = SampleRecord("t", 0)
    output, _ = lm.run_sample(synthetic_frames("holitom")[:FRAMES], "What moves?", dict(GREEDY), record, "t/0")
    return output, record


class WithoutStateMerge(HoliTomInLLMMerge):
    merges_states = False


class Unmerged(HoliTom):
    """HoliTom whose M only drops (FastV-like): what the merge changes."""

    def merge(self):
        return WithoutStateMerge(layer=self.merge_layer, merge_ratio=self.merge_ratio)


@pytest.mark.parametrize("method", [HoliTom(retention=0.5, merge_layer=3), HoliTomInLLMMerge(layer=2)], ids=["holitom", "m"])
def test_m_on_the_tiny_model_matches_its_masked_reference_keeping_the_rounded_count(lm, method):
    fast, record = generate(lm, method)
    reference, reference_record = generate(lm, method, reference=True)
    assert record.method_stats == reference_record.method_stats
    for fast_step, reference_step in zip(fast.logits, reference.logits, strict=True):
        torch.testing.assert_close(fast_step, reference_step, atol=1e-4, rtol=0)
    layer = method.stages()[-1].layer
    kept = merge_keep_count(record.visual_tokens_in, 0.5)
    assert record.prefill_visual_by_layer == [record.visual_tokens_in] * layer + [kept] * (8 - layer)
    assert record.decode_visual_by_layer == record.prefill_visual_by_layer  # what the plan says: no earlier cache trimmed


def test_the_merged_states_reach_the_logits(lm):
    merged, _ = generate(lm, HoliTom(retention=0.5, merge_layer=3))
    dropped, _ = generate(lm, Unmerged(retention=0.5, merge_layer=3))
    assert not torch.allclose(dropped.logits[0], merged.logits[0])
