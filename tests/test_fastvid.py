"""FastVID: DySeg, the per-model budgets, ATS + DTM, the released quirks, and the stage.

`mode: official` is checked against literal transcriptions of the released arithmetic
(LunarShen/FastVID@a40a109, `modeling_qwen2.py` of fastvid_llavaonevision and fastvid_llavavideo).
"""

import pytest
import torch
import torch.nn.functional as F
from layouts import layout, tokens_of

from dycoke_eval.compression.dispatcher import Compressor
from dycoke_eval.compression.stages import PlannedCounts
from dycoke_eval.config import ConfigError
from dycoke_eval.geometry import ModelInfo
from dycoke_eval.methods.fastvid import (
    FastVID,
    fastvid_select,
    fastvid_tokens,
    frame_budgets,
    onevision_anchor_plan,
    onevision_budget,
    sizes_from_cuts,
    video_segment_plan,
)
from dycoke_eval.methods.stprune import dyseg_cuts, transition_similarity
from dycoke_eval.models.base import EncodedVideo
from dycoke_eval.plumbing.counting import count_ops

# ---- the released code, transcribed (batch 1, no text around the video, `rand * 1e-6` -> `rand * noise`) ----


def released_onevision(video, frame_attn, global_features, retention, c, tau, d, p, beta, noise):
    """OVQ:900-1061 as released; returns the kept video tokens and their indices in the F*N video span."""
    frame_num, frame_token_len, hidden_states_dim = video.shape
    video_token_len, video_start_idx = frame_num * frame_token_len, 0
    hidden_states = video.reshape(1, video_token_len, hidden_states_dim)
    seq_length = hidden_states.shape[1]

    device_type = hidden_states.device
    batchframe_indices = torch.arange(frame_num, device=device_type).unsqueeze(1)
    alltoken_indices = torch.arange(video_token_len, device=device_type).view(frame_num, frame_token_len) + video_start_idx

    video_hidden_states = hidden_states[:, video_start_idx : video_start_idx + video_token_len, :].squeeze(0)
    video_hidden_states = video_hidden_states.reshape(frame_num, frame_token_len, -1)
    frame_attn_weights = frame_attn.reshape(frame_num, frame_token_len)

    frame_global_features = global_features
    frame_global_features = frame_global_features / frame_global_features.norm(dim=1, keepdim=True)
    similarity_matrix = (frame_global_features[:-1] * frame_global_features[1:]).sum(dim=1)

    cut_indices_topk = torch.topk(similarity_matrix, c - 1, largest=False).indices
    cut_indices_cos = torch.nonzero(similarity_matrix < tau, as_tuple=False).squeeze(1)
    cut_indices = torch.unique(torch.cat([cut_indices_topk, cut_indices_cos])).sort().values
    padded = F.pad(cut_indices, (1, 1), value=-1)
    padded[-1] = frame_num - 1
    segment_sizes = padded.diff().tolist()

    keep_indexs = ()
    keep_indexs += (torch.arange(video_start_idx, device=device_type),)
    keep_indexs += (torch.arange(video_start_idx + video_token_len, seq_length, device=device_type),)
    start_tokens = hidden_states[0, :video_start_idx, :]
    end_tokens = hidden_states[0, video_start_idx + video_token_len :, :]
    final_tokens = [start_tokens, end_tokens]

    frame_retain_num = int(frame_token_len * retention)
    frame_salient_num = frame_retain_num - int(frame_retain_num * d)
    frm_context_num_list = torch.zeros(frame_num, dtype=torch.int, device=device_type)
    frame_context_num = frame_retain_num - frame_salient_num

    offset = 0
    for seg_i_len in segment_sizes:
        seg_context_num = frame_context_num * seg_i_len
        temp_num = (seg_i_len + p - 1) // p
        cur_frm_context_num = seg_context_num // temp_num
        end = offset + seg_i_len
        seg_indices = torch.arange(seg_i_len - 1, -1, -1, device=device_type)
        mask = seg_indices % p == 0
        frm_context_num_list[offset:end][mask] = cur_frm_context_num
        offset = end

    salient_indexes = torch.topk(frame_attn_weights, frame_salient_num, dim=1).indices
    batch_indices = batchframe_indices.expand(-1, frame_salient_num)
    salient_tokens = video_hidden_states[batch_indices, salient_indexes]
    salient_global_indexes = alltoken_indices[batch_indices, salient_indexes]
    final_tokens.append(salient_tokens.view(-1, hidden_states_dim))
    keep_indexs += (salient_global_indexes.view(-1),)

    all_indices = torch.arange(frame_token_len, device=device_type).unsqueeze(0).expand(frame_num, -1)
    all_indices_mask = torch.ones_like(all_indices, dtype=torch.bool)
    all_indices_mask.scatter_(1, salient_indexes, False)
    filtered_indices = all_indices[all_indices_mask].view(frame_num, frame_token_len - frame_salient_num)
    batch_indices = batchframe_indices.expand(-1, frame_token_len - frame_salient_num)
    token_filtered = video_hidden_states[batch_indices, filtered_indices]
    alltoken_filtered_indices = alltoken_indices[batch_indices, filtered_indices]

    tmp_frm_hidden_states = token_filtered
    dist_matrix = torch.cdist(tmp_frm_hidden_states.float(), tmp_frm_hidden_states.float()) / (hidden_states_dim**0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=4, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape, device=device_type, dtype=density.dtype) * noise
    density_mask = density[:, None, :] > density[:, :, None]
    density_mask = density_mask.type(tmp_frm_hidden_states.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist_0, index_parent = (dist_matrix * density_mask + dist_max * (1 - density_mask)).min(dim=-1)
    density_score = dist_0 * density
    sampled_indexs = torch.topk(density_score, k=frame_context_num, dim=-1).indices

    batch_indices = batchframe_indices.expand(-1, frame_context_num)
    frm_context_tokens = token_filtered[batch_indices, sampled_indexs]
    frm_context_global_indexes = alltoken_filtered_indices[batch_indices, sampled_indexs]
    to_be_merge_tokens = token_filtered / token_filtered.norm(dim=-1, keepdim=True)
    merge_target_tokens = to_be_merge_tokens[batch_indices, sampled_indexs]
    similarity = torch.bmm(to_be_merge_tokens, merge_target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(
        frame_num, frame_token_len - frame_salient_num, frame_context_num, dtype=token_filtered.dtype, device=device_type
    )
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    avg_weights = (1 / (assign_one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=beta)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), token_filtered) / counts
    frm_context_tokens = avg_weights * frm_context_tokens + (1 - avg_weights) * aggregated_hidden

    context_for_frame_mask = frm_context_num_list == frame_context_num
    context_for_frame_tokens = frm_context_tokens[context_for_frame_mask]
    context_for_frame_global_indexes = frm_context_global_indexes[context_for_frame_mask]
    final_tokens.append(context_for_frame_tokens.view(-1, hidden_states_dim))
    keep_indexs += (context_for_frame_global_indexes.view(-1),)

    idx_seg_start = 0
    for seg_i_len in segment_sizes:
        if seg_i_len > 1:
            cur_seg_context_num_list = frm_context_num_list[idx_seg_start : idx_seg_start + seg_i_len]
            cur_seg_context_num = cur_seg_context_num_list[-1]
            cur_seg_target_mask = cur_seg_context_num_list > frame_context_num
            cur_seg_target_num = cur_seg_target_mask.sum()
            cur_seg_density_score = density_score[idx_seg_start : idx_seg_start + seg_i_len]
            cur_seg_density_score = cur_seg_density_score[cur_seg_target_mask]
            cur_seg_token_filtered = token_filtered[idx_seg_start : idx_seg_start + seg_i_len]
            cur_seg_token_target = cur_seg_token_filtered[cur_seg_target_mask]
            cur_seg_token_filtered = cur_seg_token_filtered.view(1, -1, hidden_states_dim).expand(cur_seg_target_num, -1, -1)
            cur_seg_alltoken_indices = alltoken_filtered_indices[idx_seg_start : idx_seg_start + seg_i_len]
            cur_seg_alltoken_indices = cur_seg_alltoken_indices[cur_seg_target_mask]
            sampled_indexs = torch.topk(cur_seg_density_score, k=cur_seg_context_num, dim=-1).indices
            batch_indices = batchframe_indices[:cur_seg_target_num].expand(-1, cur_seg_context_num)
            cur_context_tokens = cur_seg_token_target[batch_indices, sampled_indexs]
            cur_context_global_indexes = cur_seg_alltoken_indices[batch_indices, sampled_indexs]
            to_be_merge_tokens = cur_seg_token_filtered / cur_seg_token_filtered.norm(dim=-1, keepdim=True)
            merge_target_tokens = cur_context_tokens / cur_context_tokens.norm(dim=-1, keepdim=True)
            similarity = torch.bmm(to_be_merge_tokens, merge_target_tokens.transpose(1, 2))
            assign_one_hot = torch.zeros(
                cur_seg_target_num,
                to_be_merge_tokens.shape[1],
                cur_seg_context_num,
                dtype=token_filtered.dtype,
                device=device_type,
            )
            assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
            avg_weights = (1 / (assign_one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=beta)
            counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
            aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), cur_seg_token_filtered) / counts
            cur_context_tokens = avg_weights * cur_context_tokens + (1 - avg_weights) * aggregated_hidden
            final_tokens.append(cur_context_tokens.view(-1, hidden_states_dim))
            keep_indexs += (cur_context_global_indexes.view(-1),)
        idx_seg_start += seg_i_len

    hidden_states = torch.cat(final_tokens, dim=0)
    keep_indexs = torch.cat(keep_indexs, dim=0)
    sorted_indexs = torch.argsort(keep_indexs)
    return hidden_states[sorted_indexs], keep_indexs[sorted_indexs]


def released_video_split(segment_sizes, frame_retain_num, d, p):
    """VIQ:935-969: (salient, anchors) per frame as released."""
    per_frame = []
    for cur_seg_len in segment_sizes:
        seg_retain_num = frame_retain_num * cur_seg_len
        seg_context_num = int(seg_retain_num * d)
        seg_salient_num = seg_retain_num - seg_context_num
        if cur_seg_len == 1:
            frm_salient_num = [seg_salient_num]
            frm_context_num = [seg_context_num]
        else:
            chunk_size = seg_salient_num // cur_seg_len
            remainder = seg_salient_num % cur_seg_len
            frm_salient_num = [chunk_size + (1 if i < remainder else 0) for i in range(cur_seg_len)]
            temp_num = (cur_seg_len + p - 1) // p
            chunk_size = seg_context_num // temp_num
            remainder = seg_context_num % temp_num
            temp_context_num = [chunk_size + (1 if i < remainder else 0) for i in range(temp_num)]
            tmp_ctx_idx = 0
            frm_context_num = []
            for tmp_i in range(cur_seg_len):
                if tmp_i % p == 0:
                    frm_context_num.append(temp_context_num[tmp_ctx_idx])
                    tmp_ctx_idx += 1
                else:
                    frm_context_num.append(0)
            frm_context_num.reverse()
        per_frame += list(zip(frm_salient_num, frm_context_num, strict=True))
    return per_frame


def released_video(video, frame_attn, global_features, retention, c, tau, d, p, beta, noise):
    """VIQ:894-1065 as released, 64 frames generalised to F, from the 13x13 grid with its row newlines; returns the
    kept video tokens and their indices among the F*169 grid tokens (before the newlines are put back)."""
    frame_num, _, dim = video.shape
    rows = video.reshape(frame_num * 13, 13, dim)
    with_newlines = torch.cat([rows, torch.full((frame_num * 13, 1, dim), 7.0, dtype=video.dtype)], dim=1).reshape(1, -1, dim)
    hidden_states, video_start_idx, video_token_len = with_newlines, 0, with_newlines.shape[1]

    device = hidden_states.device
    video_hidden_states = hidden_states[:, video_start_idx : video_start_idx + video_token_len, :].squeeze(0)
    video_all_indexs = torch.arange(video_token_len, device=device)
    newline_mask = (video_all_indexs + 1) % 14 != 0
    real_video_token_len = frame_num * 13 * 13
    video_hidden_states = video_hidden_states[newline_mask]
    video_hidden_states = video_hidden_states.reshape(frame_num, real_video_token_len // frame_num, -1)
    frame_attn_weights = frame_attn.reshape(frame_num, real_video_token_len // frame_num)

    frame_global_features = global_features
    frame_global_features = frame_global_features / frame_global_features.norm(dim=1, keepdim=True)
    similarity_matrix = (frame_global_features[:-1] * frame_global_features[1:]).sum(dim=1)
    cut_indices = torch.topk(similarity_matrix, c - 1, largest=False).indices
    cos_indices = torch.nonzero(similarity_matrix < tau).squeeze(1)
    cut_indices = torch.unique(torch.cat([cut_indices, cos_indices]))
    cut_indices = cut_indices.sort().values
    segment_sizes = [cut_indices[0].item() + 1]
    for i in range(1, cut_indices.shape[0]):
        segment_sizes.append(cut_indices[i].item() - cut_indices[i - 1].item())
    segment_sizes.append(frame_num - cut_indices[-1].item() - 1)

    segments_hidden_states = torch.split(video_hidden_states, segment_sizes)
    segments_attn_weights = torch.split(frame_attn_weights, segment_sizes)
    segment_num = len(segment_sizes)
    vision_tokens = []
    vision_indexs = []
    frame_retain_num = int(real_video_token_len // frame_num * retention)

    seg_index_start = 0
    for seg_i in range(segment_num):
        cur_hidden_states = segments_hidden_states[seg_i]
        cur_attn_weights = segments_attn_weights[seg_i]
        cur_seg_len, frm_len = cur_attn_weights.shape
        split = released_video_split([cur_seg_len], frame_retain_num, d, p)
        frm_salient_num, frm_context_num = [s for s, _ in split], [a for _, a in split]

        cur_salient_indexs = []
        cur_context_indexs = []
        for frame_i in range(cur_seg_len):
            if frm_salient_num[frame_i] > 0:
                frm_top_indexes = torch.topk(cur_attn_weights[frame_i], frm_salient_num[frame_i]).indices
            else:
                frm_top_indexes = None
            if frm_context_num[frame_i] > 0:
                frm_all_indexs = torch.arange(frm_len, device=device)
                if frm_top_indexes is not None:
                    tmp_mask = torch.isin(frm_all_indexs, frm_top_indexes)
                    remaining_indexs = frm_all_indexs[~tmp_mask]
                else:
                    remaining_indexs = frm_all_indexs
                tmp_frm_hidden_states = cur_hidden_states[frame_i]
                tmp_frm_hidden_states = tmp_frm_hidden_states[remaining_indexs].unsqueeze(0)
                _, tmp_N, tmp_D = tmp_frm_hidden_states.shape
                dist_matrix = torch.cdist(tmp_frm_hidden_states.float(), tmp_frm_hidden_states.float()) / (tmp_D**0.5)
                dist_nearest, index_nearest = torch.topk(dist_matrix, k=4, dim=-1, largest=False)
                density = (-(dist_nearest**2).mean(dim=-1)).exp()
                density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * noise
                mask = density[:, None, :] > density[:, :, None]
                mask = mask.type(tmp_frm_hidden_states.dtype)
                dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
                dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
                score = dist * density
                _, sampled_indexs = torch.topk(score, k=frm_context_num[frame_i], dim=-1)
                sampled_indexs = sampled_indexs[0].sort().values
                frm_context_indexes = remaining_indexs[sampled_indexs]
            else:
                frm_context_indexes = None
            if frm_top_indexes is not None:
                cur_salient_indexs.append(frm_top_indexes + frame_i * frm_len)
            if frm_context_indexes is not None:
                cur_context_indexs.append(frm_context_indexes + frame_i * frm_len)

        cur_tome_hidden_states = cur_hidden_states.reshape(cur_seg_len * frm_len, -1)
        cur_salient_indexs = torch.cat(cur_salient_indexs)
        cur_salient_hidden_states = cur_tome_hidden_states[cur_salient_indexs]
        cur_all_indexs = torch.arange(cur_seg_len * frm_len, device=device)
        cur_tome_tokens = cur_tome_hidden_states / cur_tome_hidden_states.norm(dim=-1, keepdim=True)
        cur_context_hidden_states = []
        for tmp_context_indexs in cur_context_indexs:
            tmp_retain_index = torch.cat([cur_salient_indexs, tmp_context_indexs])
            tmp_mask = torch.isin(cur_all_indexs, tmp_retain_index)
            tmp_merge_indexs = cur_all_indexs[~tmp_mask]
            tmp_target_tokens = cur_tome_tokens[tmp_context_indexs]
            tmp_to_merge_tokens = cur_tome_tokens[tmp_merge_indexs]
            similarity = torch.mm(tmp_to_merge_tokens, tmp_target_tokens.T)
            assign_one_hot = torch.zeros(
                tmp_to_merge_tokens.shape[0], tmp_context_indexs.shape[0], dtype=cur_hidden_states.dtype, device=device
            )
            assign_one_hot.scatter_(1, similarity.argmax(dim=1).unsqueeze(-1), 1)
            avg_weights = (1 / (assign_one_hot.sum(dim=0).unsqueeze(-1) + 1)).clamp(min=beta)
            counts = assign_one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
            hidden_to_merge = cur_tome_hidden_states[tmp_merge_indexs]
            aggregated_hidden = torch.mm(assign_one_hot.T, hidden_to_merge) / counts
            target_hidden = cur_tome_hidden_states[tmp_context_indexs]
            target_hidden = avg_weights * target_hidden + (1 - avg_weights) * aggregated_hidden
            cur_context_hidden_states.append(target_hidden)

        cur_context_indexs = torch.cat(cur_context_indexs)
        cur_context_hidden_states = torch.cat(cur_context_hidden_states, dim=0)
        cur_index_combined = torch.cat([cur_salient_indexs, cur_context_indexs])
        cur_hidden_combined = torch.cat([cur_salient_hidden_states, cur_context_hidden_states], dim=0)
        sorted_indexs = torch.argsort(cur_index_combined)
        cur_index_combined = cur_index_combined[sorted_indexs]
        cur_hidden_combined = cur_hidden_combined[sorted_indexs]
        vision_tokens.append(cur_hidden_combined)
        vision_indexs.append(cur_index_combined + seg_index_start)
        seg_index_start = seg_index_start + cur_seg_len * frm_len

    return torch.cat(vision_tokens, dim=0), torch.cat(vision_indexs, dim=0)


# ---- inputs ----


def scenes(lengths, channels=24, seed=0):
    """[F, C] global features of consecutive scenes of these lengths: cosine ~1 within a scene, ~0 across."""
    generator = torch.Generator().manual_seed(seed)
    scene = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    base = torch.randn(len(lengths), channels, generator=generator)
    return base[scene] + 0.02 * torch.randn(len(scene), channels, generator=generator)


def random_video(frames, tokens, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(frames, tokens, dim, generator=generator), torch.rand(frames, tokens, generator=generator)


def kept_per_frame(index, frames, tokens):
    return torch.bincount(index // tokens, minlength=frames).tolist()


SCENES = [1, 3, 5, 7, 2, 9, 5]  # 32 frames: single- and multi-frame segments, some longer than p


# ---- budgets (Table 1 settings) ----


@pytest.mark.parametrize(("retention", "salient", "anchors"), [(0.25, 30, 19), (0.20, 24, 15), (0.15, 18, 11), (0.10, 12, 7)])
def test_onevision_frames_keep_the_spec_salient_and_anchor_counts(retention, salient, anchors):
    assert onevision_budget(196, retention, 0.4) == (salient + anchors, salient, anchors)
    video, attention = random_video(32, 196, dim=8)
    frame_features = torch.randn(32, 24)  # c = F: every frame its own segment, so each keeps s + m
    _, index = fastvid_tokens(video, attention, frame_features, retention=retention, c=32, density_noise=0)
    assert kept_per_frame(index, 32, 196) == [salient + anchors] * 32


@pytest.mark.parametrize(("retention", "retain"), [(0.25, 42), (0.10, 16)])
def test_llava_video_splits_per_segment_and_keeps_exactly_64_times_retain(retention, retain):
    lengths = [1, 3, 5, 7, 2, 9, 5, 6, 4, 8, 14]  # 64 frames
    segments = [list(range(sum(lengths[:i]), sum(lengths[: i + 1]))) for i in range(len(lengths))]
    salient, anchors = frame_budgets(segments, 169, retention, 0.4, 4, "official", "video")
    assert list(zip(salient, anchors, strict=True)) == released_video_split(lengths, retain, 0.4, 4)
    video, attention = random_video(64, 169, dim=8)
    _, index = fastvid_tokens(video, attention, scenes(lengths), retention=retention, c=11, variant="video", density_noise=0)
    assert index.numel() == 64 * retain
    assert kept_per_frame(index, 64, 169) == [s + a for s, a in zip(salient, anchors, strict=True)]


# ---- DySeg ----


def test_dyseg_cuts_are_the_c_minus_1_least_similar_transitions_and_all_below_tau_sorted():
    similarity = torch.tensor([0.95, 0.5, 0.99, 0.85, 0.97, 0.96, 0.92])

    def cuts(c, tau):
        return dyseg_cuts(similarity, c, tau).nonzero().flatten().tolist()

    assert cuts(c=4, tau=0.9) == [1, 3, 6]  # least three: 1, 3, 6; below tau: 1, 3
    assert cuts(c=2, tau=0.9) == [1, 3]  # least one: 1; below tau: 1, 3
    assert cuts(c=1, tau=0.96) == [0, 1, 3, 6]  # tau alone
    assert sizes_from_cuts([1, 3, 6], frames=8) == [2, 2, 3, 1]


def test_transition_similarity_is_the_cosine_of_each_frame_with_the_next():
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(transition_similarity(features), torch.tensor([1.0, 2**-0.5]))


def test_fewer_frames_than_c_is_an_error_naming_the_fix():
    video, attention = random_video(4, 16)
    with pytest.raises(ConfigError, match=r"c=8.*4 frames.*c <= 4"):
        fastvid_tokens(video, attention, torch.randn(4, 8), retention=0.5)


# ---- released quirks, one test each ----


def test_anchor_frames_count_from_the_segments_end_officially_and_from_its_start_in_the_paper():
    assert onevision_anchor_plan(6, anchors=7, p=4, mode="official") == [0, 21, 0, 0, 0, 21]
    assert onevision_anchor_plan(6, anchors=7, p=4, mode="paper") == [21, 0, 0, 0, 21, 0]
    video, attention = random_video(6, 196, dim=8)
    same_scene = torch.ones(6, 4)  # c=1 and no transition below tau: one 6-frame segment
    for mode, anchor_frames in [("official", {1, 5}), ("paper", {0, 4})]:
        _, index = fastvid_tokens(video, attention, same_scene, retention=0.1, c=1, mode=mode, density_noise=0)
        counts = kept_per_frame(index, 6, 196)
        assert {f for f, n in enumerate(counts) if n > 12} == anchor_frames
        assert counts == [12 + 21 * (f in anchor_frames) for f in range(6)]


def test_the_anchor_floor_keeps_fewer_than_f_times_retain_at_r_10_percent():
    video, attention = random_video(32, 196, dim=8)
    lengths = [5, 5, 5, 5, 4, 4, 2, 2]  # DySeg (c=8) cuts at exactly these scene changes
    selection = fastvid_select(video, attention, scenes(lengths), retention=0.1, density_noise=0)
    assert [len(s) for s in selection.segments] == lengths
    # m=7: a 5-frame segment has 2 anchor frames of 35 // 2 = 17 anchors (34, not 35)
    assert selection.salient == 32 * 12 and selection.anchors == 4 * 34 + 2 * 28 + 2 * 14
    assert selection.index.numel() == 604 < 32 * 19


def two_direction_frames(frames, first_anchor_rest=3):
    """[F, 8, 2] tokens: 0-2 most attended (salient), then A-like tokens (x >> y) at 3-5 and B-like (y >> x) at 6-7."""
    step = torch.arange(frames * 8, dtype=torch.float32).view(frames, 8) * 0.001
    video = torch.stack([torch.ones(frames, 8), step], dim=-1)
    video[:, 6:] = video[:, 6:].flip(-1)
    video[:, :3] = torch.tensor([-1.0, -2.0]) + step[:, :3, None]
    attention = torch.linspace(1, 0, 8).expand(frames, 8)
    return video, attention


def a_like(tokens):
    return tokens[:, 0] > tokens[:, 1]


def test_officially_a_single_frame_anchor_is_in_its_own_mean_with_w_beta_and_the_paper_uses_eq5():
    video, attention = two_direction_frames(1)
    video[:, 6:] = video[:, 3:5] + 0.01  # all five non-salient tokens A-like: the one anchor takes them all
    rest = video[0, 3:]
    for mode in ("official", "paper"):
        tokens, index = fastvid_tokens(
            video, attention, torch.ones(1, 4), retention=0.5, d=0.25, c=1, mode=mode, density_noise=0
        )  # retain 4: 3 salient, 1 anchor
        assert index[:3].tolist() == [0, 1, 2] and index.numel() == 4
        anchor = video[0, index[3]]
        others = rest[torch.arange(3, 8) != index[3]]
        assigned = rest if mode == "official" else others
        torch.testing.assert_close(tokens[3], 0.6 * anchor + 0.4 * assigned.mean(dim=0))


def test_officially_each_anchor_frame_of_a_segment_takes_the_whole_pool_separately():
    video, attention = two_direction_frames(5)  # one 5-frame segment: anchor frames 0 and 4, two anchors each
    tokens, index = fastvid_tokens(video, attention, torch.ones(5, 4), retention=0.5, d=0.25, c=1, density_noise=0)
    pool = video[:, 3:].reshape(-1, 2)  # every non-salient token of the segment, anchors included
    anchors = index % 8 >= 3
    assert (index[anchors] // 8).tolist() == [0, 0, 4, 4]
    for token, at in zip(tokens[anchors], index[anchors], strict=True):
        original = video.view(-1, 2)[at]
        same_side = pool[a_like(pool) == a_like(original[None])]
        torch.testing.assert_close(token, 0.6 * original + 0.4 * same_side.mean(dim=0))
    paper, paper_index = fastvid_tokens(
        video, attention, torch.ones(5, 4), retention=0.5, d=0.25, c=1, mode="paper", density_noise=0
    )
    assert (paper_index[paper_index % 8 >= 3] // 8).tolist() == [0, 0, 4, 4]  # paper: frames 0 and 4 from the start
    assert not torch.allclose(paper, tokens)  # the paper assigns each token to one anchor of the segment


def test_llava_video_anchor_counts_are_split_per_segment_and_the_list_reversed():
    salient, anchors = video_segment_plan(9, retain=42, d=0.4, p=4, mode="official")  # 378: 151 anchors, 227 salient
    assert salient == [26, 26] + [25] * 7
    assert anchors == [50, 0, 0, 0, 50, 0, 0, 0, 51]  # 51, 50, 50 laid on 0, 4, 8, then reversed
    assert video_segment_plan(9, retain=42, d=0.4, p=4, mode="paper")[1] == [51, 0, 0, 0, 50, 0, 0, 0, 50]
    assert video_segment_plan(1, retain=42, d=0.4, p=4, mode="official") == ([26], [16])


def test_llava_video_pool_excludes_own_anchors_and_the_segments_salient_tokens_but_not_other_frames_anchors():
    video, attention = two_direction_frames(5)
    # retain 4 per frame, 20 per segment: 4 anchors (2 on frame 0, 2 on frame 4 after the reversal), 16 salient
    # shared 4, 3, 3, 3, 3: frame 0's token 3 is salient, so out of every pool
    tokens, index = fastvid_tokens(
        video, attention, torch.ones(5, 4), retention=0.5, d=0.2, c=1, variant="video", density_noise=0
    )
    assert kept_per_frame(index, 5, 8) == [6, 3, 3, 3, 5]
    anchors = index[(index % 8 >= 3) & ~((index // 8 == 0) & (index % 8 == 3))]
    assert (anchors // 8).tolist() == [0, 0, 4, 4]
    flat = video.view(-1, 2)
    rest = torch.tensor([i for i in range(40) if i % 8 >= 3 and i != 3])
    for frame in (0, 4):
        own = anchors[anchors // 8 == frame]
        assert a_like(flat[own]).sum() == 1  # one A-like and one B-like anchor
        pool = rest[~torch.isin(rest, own)]
        for at in own:
            same_side = pool[a_like(flat[pool]) == a_like(flat[at][None])]
            merged = tokens[(index == at).nonzero().item()]
            torch.testing.assert_close(merged, 0.6 * flat[at] + 0.4 * flat[same_side].mean(dim=0))


@pytest.mark.parametrize("variant", ["onevision", "video"])
def test_d_zero_keeps_only_the_most_attended_tokens(variant):
    """Table 3's ATS-only row; the released OneVision code crashes on it (argmax over zero anchors)."""
    video, attention = random_video(8, 16)
    tokens, index = fastvid_tokens(video, attention, scenes([4, 4]), retention=0.5, d=0.0, c=2, variant=variant)
    expected = (attention.topk(8, dim=1).indices + torch.arange(8)[:, None] * 16).flatten().sort().values
    assert torch.equal(index, expected)
    torch.testing.assert_close(tokens, video.view(-1, 16)[expected])


# ---- against the released code on random tensors ----


@pytest.mark.parametrize(
    ("retention", "p", "beta"),
    [(0.25, 4, 0.6), (0.10, 4, 0.6), (0.15, 2, 0.3), (0.02, 2, 0.6)],  # 0.02, p=2: m=1, a 3-frame segment is per frame
)
def test_onevision_matches_the_released_code(retention, p, beta):
    video, attention = random_video(32, 196)
    frame_features = scenes(SCENES)
    expected_tokens, expected_index = released_onevision(video, attention, frame_features, retention, 8, 0.9, 0.4, p, beta, 0)
    tokens, index = fastvid_tokens(video, attention, frame_features, retention=retention, p=p, beta=beta, density_noise=0)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-5, rtol=1e-5)


def tied_video(frames, tokens, seed=0):
    """Tokens drawn from 40 prototypes: many exact duplicates, so density ties that only the noise breaks."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(40, 16, generator=generator)
    return prototypes[torch.randint(0, 40, (frames, tokens), generator=generator)], torch.rand(
        frames, tokens, generator=generator
    )


def test_onevision_draws_the_density_noise_as_released():
    video, attention = tied_video(32, 196)
    frame_features = scenes(SCENES)
    torch.manual_seed(5)
    expected_tokens, expected_index = released_onevision(video, attention, frame_features, 0.25, 8, 0.9, 0.4, 4, 0.6, 1e-6)
    torch.manual_seed(5)
    tokens, index = fastvid_tokens(video, attention, frame_features, retention=0.25)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-5, rtol=1e-5)
    torch.manual_seed(6)
    assert not torch.equal(fastvid_tokens(video, attention, frame_features, retention=0.25)[1], expected_index)


@pytest.mark.parametrize(("retention", "p", "noise"), [(0.25, 4, 0), (0.10, 4, 0), (0.10, 2, 0), (0.25, 4, 1e-6)])
def test_llava_video_matches_the_released_code(retention, p, noise):
    """With noise: tied tokens, one draw per anchor frame in frame order, as released."""
    video, attention = tied_video(16, 169) if noise else random_video(16, 169)
    frame_features = scenes([1, 3, 5, 7])
    torch.manual_seed(3)
    expected_tokens, expected_index = released_video(video, attention, frame_features, retention, 3, 0.9, 0.4, p, 0.6, noise)
    torch.manual_seed(3)
    tokens, index = fastvid_tokens(
        video, attention, frame_features, retention=retention, c=3, p=p, variant="video", density_noise=noise
    )
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_the_released_code_bit_for_bit(dtype):
    """The merge runs in the features' dtype as released (fp16: beta 0.6 is 0.6001), the density in float32."""
    video, attention = (x.to(dtype) for x in random_video(32, 196))
    frame_features = scenes(SCENES).to(dtype)
    expected_tokens, expected_index = released_onevision(video, attention, frame_features, 0.1, 8, 0.9, 0.4, 4, 0.6, 0)
    tokens, index = fastvid_tokens(video, attention, frame_features, retention=0.1, density_noise=0)
    assert torch.equal(index, expected_index) and torch.equal(tokens, expected_tokens)
    video, attention = (x.to(dtype) for x in random_video(16, 169))
    frame_features = scenes([1, 3, 5, 7]).to(dtype)
    expected_tokens, expected_index = released_video(video, attention, frame_features, 0.25, 3, 0.9, 0.4, 4, 0.6, 0)
    tokens, index = fastvid_tokens(video, attention, frame_features, retention=0.25, c=3, variant="video", density_noise=0)
    assert torch.equal(index, expected_index) and torch.equal(tokens, expected_tokens)


# ---- ablation alternatives ----


def test_fixed_segmentation_cuts_equal_intervals_and_cluster_segmentation_groups_similar_frames():
    video, attention = random_video(12, 16)
    fixed = fastvid_select(video, attention, scenes([12]), retention=0.25, c=4, segmentation="fixed")
    assert fixed.segments == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    revisited = scenes([3, 3, 3, 3])[[0, 1, 2, 3, 4, 5, 0, 1, 2, 9, 10, 11]]  # frames 6-8 show the first scene again
    clustered = fastvid_select(video, attention, revisited, retention=0.25, c=3, segmentation="cluster")
    assert clustered.segments == [[0, 1, 2, 6, 7, 8], [3, 4, 5], [9, 10, 11]]


@pytest.mark.parametrize("merging", ["uniform", "cluster"])
def test_merging_alternatives_keep_the_dtm_token_count(merging):
    video, attention = random_video(32, 196)
    dtm = fastvid_select(video, attention, scenes(SCENES), retention=0.1)
    other = fastvid_select(video, attention, scenes(SCENES), retention=0.1, merging=merging)
    assert (other.salient, other.anchors) == (dtm.salient, dtm.anchors)
    assert bool((other.index.diff() > 0).all())


def test_uniform_merging_takes_evenly_spaced_anchors_among_the_non_salient_tokens():
    video, attention = random_video(1, 16)
    attention = torch.linspace(1, 0, 16)[None]  # tokens 0-3 salient
    _, index = fastvid_tokens(video, attention, torch.ones(1, 4), retention=0.5, d=0.5, c=1, merging="uniform")
    assert index.tolist() == [0, 1, 2, 3, 4, 7, 10, 13]  # 12 non-salient, 4 anchors: step 3 from token 4


def test_cluster_merging_puts_cluster_means_at_the_segments_last_free_positions():
    video, attention = random_video(1, 16)
    groups = torch.arange(12) // 3  # non-salient tokens 0-11 in four tight groups of three
    video[0, :12] = 5 * F.one_hot(groups, 16).float() + 0.01 * video[0, :12]
    attention = torch.linspace(0, 1, 16)[None]  # tokens 12-15 salient
    tokens, index = fastvid_tokens(video, attention, torch.ones(1, 4), retention=0.5, d=0.5, c=1, merging="cluster")
    assert index.tolist() == [8, 9, 10, 11, 12, 13, 14, 15]
    means = torch.stack([video[0, :12][groups == g].mean(dim=0) for g in range(4)])
    order = (tokens[:4] @ means.T).argmax(dim=1)  # the centre-rank order is the density's
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(tokens[:4], means[order])


# ---- the stage ----


def grid_tokens(family="llava_onevision", frames=16, side=4, dim=8):
    video, attention = random_video(frames, side * side, dim)
    tokens = tokens_of(video, side, side, family)
    return tokens, {"probe_attention": attention, "probe_features": scenes([4, 4, 4, 4])}


def test_the_stage_keeps_ascending_original_positions_and_reports_its_figures():
    stage = FastVID()
    tokens, signals = grid_tokens()
    kept = stage.select(tokens, signals, "task/0")
    assert stage.keeps_positions() and stage.needs() == {"probe_attention", "probe_features"}
    assert bool((kept.index.diff() > 0).all()) and kept.features.shape == (kept.index.numel(), 8)
    figures = kept.figures
    assert figures["fastvid_variant"] == "onevision" and sum(figures["fastvid_segment_sizes"]) == 16
    assert figures["fastvid_salient"] == 16 * 3 and figures["fastvid_salient"] + figures["fastvid_anchors"] == kept.index.numel()
    again = stage.select(tokens, signals, "task/0")
    assert torch.equal(again.index, kept.index) and torch.equal(again.features, kept.features)


def test_the_stage_uses_the_released_arithmetic_of_the_model_family():
    tokens, signals = grid_tokens("llava_video", side=13)
    kept = FastVID().select(tokens, signals, "s")
    assert kept.figures["fastvid_variant"] == "video" and kept.layout.family == "llava_video"
    assert kept.index.numel() == 16 * 42


def test_a_model_family_without_released_arithmetic_is_refused_naming_the_method_the_family_and_the_ones_it_has():
    qwen = ModelInfo(layers=28, signals=frozenset({"probe_attention", "probe_features"}), family="qwen3_vl")
    with pytest.raises(ConfigError, match=r"fastvid: .*llava_video, qwen2_5_vl, not for the 'qwen3_vl' model family"):
        FastVID().validate_for(qwen)


def test_the_compressor_hands_the_layouts_family_to_the_stage():
    video, attention = random_video(16, 169, 8)
    encoded = EncodedVideo(
        video, layout(16, 13, 13, "llava_video"), signals={"probe_attention": attention, "probe_features": scenes([16])}
    )
    selected = Compressor(None, FastVID()).select(encoded, "s")
    assert selected.figures["fastvid_variant"] == "video" and selected.by_stage["fastvid"] == 16 * 42


def test_planned_tokens_are_f_times_retain_and_exact_for_fixed_segments():
    onevision = PlannedCounts.full(layout(32, 14, 14), layers=2)
    assert FastVID(retention=0.1).planned_tokens(onevision) == 32 * 19
    fixed = FastVID(retention=0.1, c=6, segmentation="fixed")  # lengths 6, 6, 5, 5, 5, 5: the floor drops 1 per 5
    video, attention = random_video(32, 196, dim=8)
    _, index = fastvid_tokens(video, attention, scenes([32]), retention=0.1, c=6, segmentation="fixed")
    assert fixed.planned_tokens(onevision) == index.numel() == 32 * 12 + 2 * 42 + 4 * 34
    llava_video = PlannedCounts.full(layout(64, 13, 13, "llava_video"), layers=2)
    assert FastVID(retention=0.25).planned_tokens(llava_video) == 64 * 42


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("retention", 0),
        ("retention", 1.5),
        ("c", 0),
        ("tau", 2.0),
        ("d", -0.1),
        ("p", 0),
        ("beta", 1.2),
        ("mode", "offical"),
        ("segmentation", "kmeans"),
        ("merging", "tome"),
        ("density_noise", -1.0),
    ],
)
def test_bad_settings_are_config_errors_naming_the_value(setting, value):
    with pytest.raises(ConfigError, match=f"{setting}={value!r}" if isinstance(value, str) else f"{setting}={value}"):
        FastVID(**{setting: value})


# ---- on an accelerator ----


@pytest.mark.parametrize("variant", ["onevision", "video"])
@pytest.mark.parametrize(
    ("mode", "segmentation", "merging"),
    [
        ("official", "dyseg", "dtm"),
        ("paper", "dyseg", "dtm"),
        ("official", "fixed", "uniform"),
        ("official", "cluster", "cluster"),
    ],
)
def test_a_video_is_selected_in_at_most_150_kernels_and_one_host_read(variant, mode, segmentation, merging):
    """Every frame and segment at once: the segments are the one value the host reads; the counts follow from them."""
    video, attention = random_video(32, 49, dim=32)
    frame_features = scenes(SCENES)
    settings = {"variant": variant, "mode": mode, "segmentation": segmentation, "merging": merging}
    with torch.inference_mode(), count_ops() as counted:  # as the wrapper runs it
        fastvid_select(video, attention, frame_features, retention=0.25, **settings)
    assert counted.counts.syncs <= 1 and counted.counts.ops <= 150, (counted.counts.ops, dict(counted.counts.syncing))
