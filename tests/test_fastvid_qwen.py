"""FastVID on Qwen2.5-VL: the ViT salience and the segment arithmetic against literal transcriptions of the released code
(LunarShen/FastVID@a40a109, fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py, "MQ"),
and the method through the wrapper on the tiny Qwen2.5-VL.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from dycoke_eval.compression.stages import VideoTokens
from dycoke_eval.config import ConfigError
from dycoke_eval.geometry import ModelInfo, PlannedCounts, VideoLayout
from dycoke_eval.methods.fastvid import FastVID
from dycoke_eval.methods.fastvid_qwen import RELEASED, fastvid_qwen_select, segment_budget, segments_and_runs
from dycoke_eval.models.qwen2_5_vl import Qwen2_5_VLAdapter
from dycoke_eval.models.qwen_salience import SIGNAL, captured_scores, mean_query_attention
from dycoke_eval.offline.tiny_qwen import build_tiny_qwen_checkpoint
from dycoke_eval.plumbing.counting import count_ops

# ---- the released ViT salience, transcribed (MQ:104-114, 162-233, 461-594; flash attention's own output omitted) ----


class ReleasedRotary(torch.nn.Module):
    """MQ:104-114 `Qwen2_5_VisionRotaryEmbedding`."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seqlen: int) -> torch.Tensor:
        seq = torch.arange(seqlen, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(seq, self.inv_freq)
        return freqs


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb_vision(q, k, cos, sin):
    """MQ:221-233."""
    orig_q_dtype = q.dtype
    orig_k_dtype = k.dtype
    q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    q_embed = q_embed.to(orig_q_dtype)
    k_embed = k_embed.to(orig_k_dtype)
    return q_embed, k_embed


def released_rot_pos_emb(rotary_pos_emb, spatial_merge_size, grid_thw):
    """MQ:461-488 `rot_pos_emb`."""
    pos_ids = []
    for t, h, w in grid_thw:
        hpos_ids = torch.arange(h).unsqueeze(1).expand(-1, w)
        hpos_ids = hpos_ids.reshape(h // spatial_merge_size, spatial_merge_size, w // spatial_merge_size, spatial_merge_size)
        hpos_ids = hpos_ids.permute(0, 2, 1, 3)
        hpos_ids = hpos_ids.flatten()
        wpos_ids = torch.arange(w).unsqueeze(0).expand(h, -1)
        wpos_ids = wpos_ids.reshape(h // spatial_merge_size, spatial_merge_size, w // spatial_merge_size, spatial_merge_size)
        wpos_ids = wpos_ids.permute(0, 2, 1, 3)
        wpos_ids = wpos_ids.flatten()
        pos_ids.append(torch.stack([hpos_ids, wpos_ids], dim=-1).repeat(t, 1))
    pos_ids = torch.cat(pos_ids, dim=0)
    max_grid_size = grid_thw[:, 1:].max()
    rotary_pos_emb_full = rotary_pos_emb(max_grid_size)
    return rotary_pos_emb_full[pos_ids].flatten(1)


def released_window_index(grid_thw, window_size, spatial_merge_size, patch_size):
    """MQ:490-531 `get_window_index` (the window order of the merge units)."""
    window_index: list = []
    window_index_id = 0
    vit_merger_window_size = window_size // spatial_merge_size // patch_size
    for grid_t, grid_h, grid_w in grid_thw:
        llm_grid_h, llm_grid_w = grid_h // spatial_merge_size, grid_w // spatial_merge_size
        index = torch.arange(grid_t * llm_grid_h * llm_grid_w).reshape(grid_t, llm_grid_h, llm_grid_w)
        pad_h = vit_merger_window_size - llm_grid_h % vit_merger_window_size
        pad_w = vit_merger_window_size - llm_grid_w % vit_merger_window_size
        num_windows_h = (llm_grid_h + pad_h) // vit_merger_window_size
        num_windows_w = (llm_grid_w + pad_w) // vit_merger_window_size
        index_padded = F.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
        index_padded = index_padded.reshape(grid_t, num_windows_h, vit_merger_window_size, num_windows_w, vit_merger_window_size)
        index_padded = index_padded.permute(0, 1, 3, 2, 4).reshape(
            grid_t, num_windows_h * num_windows_w, vit_merger_window_size, vit_merger_window_size
        )
        index_padded = index_padded.reshape(-1)
        index_new = index_padded[index_padded != -100]
        window_index.append(index_new + window_index_id)
        window_index_id += (grid_t * llm_grid_h * llm_grid_w).item()
    return torch.cat(window_index, dim=0)


def released_salience(tower, last_block_input, grid_thw):
    """MQ:548-560 (RoPE and window order), MQ:183-203 (the last block's salience), MQ:583-592 (un-permuted), from the
    last block's input states (window order); the tower's own weights."""
    config = tower.config
    spatial_merge_size, spatial_merge_unit = config.spatial_merge_size, config.spatial_merge_size**2
    head_dim = config.hidden_size // config.num_heads
    rotary = ReleasedRotary(head_dim // 2)
    rotary_pos_emb = released_rot_pos_emb(rotary, spatial_merge_size, grid_thw)
    window_index = released_window_index(grid_thw, config.window_size, spatial_merge_size, config.patch_size)
    seq_len = last_block_input.shape[0]
    rotary_pos_emb = rotary_pos_emb.reshape(seq_len // spatial_merge_unit, spatial_merge_unit, -1)
    rotary_pos_emb = rotary_pos_emb[window_index, :, :]
    rotary_pos_emb = rotary_pos_emb.reshape(seq_len, -1)
    emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
    position_embeddings = (emb.cos(), emb.sin())

    block = tower.blocks[-1]
    hidden_states = block.norm1(last_block_input)  # the block hands its attention norm1(states)
    attn = block.attn
    num_heads = attn.num_heads
    seq_length = hidden_states.shape[0]
    q, k, v = attn.qkv(hidden_states).reshape(seq_length, 3, num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q_attn, k_attn = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q_attn = q_attn.transpose(0, 1)
    k_attn = k_attn.transpose(0, 1)
    grid_t, grid_h, grid_w = grid_thw[0, 0], grid_thw[0, 1], grid_thw[0, 2]
    q_attn = q_attn.view(num_heads, grid_t, grid_h * grid_w, head_dim).mean(-2, keepdim=True)
    k_attn = k_attn.view(num_heads, grid_t, grid_h * grid_w // 4, 4, head_dim).mean(-2)
    attn_weights = torch.matmul(q_attn, k_attn.transpose(-2, -1)) / math.sqrt(head_dim)
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q_attn.dtype)
    attn_weights = attn_weights.mean(2).mean(0)

    reverse_indices = torch.argsort(window_index)
    attn_weights = attn_weights.view(-1)
    attn_weights = attn_weights[reverse_indices]
    return attn_weights.reshape(grid_thw[0, 0], -1)


# ---- the released FastVID block, transcribed (MQ:1836, 1880-2092; batch 1, no text around the video) ----


def released_fastvid(video_embeds, frame_attn_weights, rows, cols, retention, c, tau, ignore, d, p, beta, noise):
    """MQ's FastVID as released, `rand * 1e-6` -> `rand * noise`; returns the kept video tokens and their indices among
    the T * N merged tokens."""
    frame_num = video_embeds.shape[0]
    video_embeds = video_embeds.reshape(-1, video_embeds.shape[-1])
    frame_global_features = video_embeds.view(frame_num, rows * cols, -1).mean(1)  # MQ:1836
    inputs_embeds = video_embeds[None]
    video_len = video_embeds.shape[0]
    prompt_start_len, seq_length = 0, video_len

    frame_num, frame_w, frame_h = frame_num, rows, cols
    device_type = inputs_embeds.device
    video_hidden_states = inputs_embeds[:, prompt_start_len : prompt_start_len + video_len, :].reshape(
        frame_num, frame_w * frame_h, -1
    )
    keep_indexs = ()
    keep_indexs += (torch.arange(prompt_start_len, device=device_type),)
    keep_indexs += (torch.arange(prompt_start_len + video_len, seq_length, device=device_type),)

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
    segments_global_features = torch.split(frame_global_features, segment_sizes)
    vision_tokens = []
    frame_retain_num = int(frame_w * frame_h * retention)

    seg_index_start = prompt_start_len
    for seg_i in range(segment_num):
        cur_hidden_states = segments_hidden_states[seg_i]
        cur_attn_weights = segments_attn_weights[seg_i]
        cur_global_features = segments_global_features[seg_i]
        cur_seg_len, frm_len = cur_attn_weights.shape

        seg_retain_num = frame_retain_num * cur_seg_len
        seg_context_num = max(int(seg_retain_num * d), 1)
        seg_salient_num = seg_retain_num - seg_context_num

        if cur_seg_len == 1:
            frm_salient_num = [seg_salient_num]
            frm_context_num = [seg_context_num]
        else:
            cur_global_similarity_matrix = (cur_global_features[:-1] * cur_global_features[1:]).sum(dim=1)
            cur_cut_indices = torch.nonzero(cur_global_similarity_matrix < ignore).squeeze(1)
            cur_cut_indices = cur_cut_indices.sort().values
            if cur_cut_indices.shape[0] > 0:
                cur_segment_sizes = [cur_cut_indices[0].item() + 1]
                for i in range(1, cur_cut_indices.shape[0]):
                    cur_segment_sizes.append(cur_cut_indices[i].item() - cur_cut_indices[i - 1].item())
                cur_segment_sizes.append(cur_seg_len - cur_cut_indices[-1].item() - 1)
            else:
                cur_segment_sizes = [cur_seg_len]

            valid_seg_len = len(cur_segment_sizes)

            chunk_size = seg_salient_num // valid_seg_len
            remainder = seg_salient_num % valid_seg_len
            frm_salient_num = [chunk_size + (1 if i < remainder else 0) for i in range(valid_seg_len)]

            temp_num = (valid_seg_len + p - 1) // p

            chunk_size = seg_context_num // temp_num
            remainder = seg_context_num % temp_num
            temp_context_num = [chunk_size + (1 if i < remainder else 0) for i in range(temp_num)]

            tmp_ctx_idx = 0
            frm_context_num = []
            for tmp_i in range(valid_seg_len):
                if tmp_i % p == 0:
                    frm_context_num.append(min(temp_context_num[tmp_ctx_idx], frm_len // 2))
                    if temp_context_num[tmp_ctx_idx] + frm_context_num[-1] > frm_len:
                        temp_context_num[tmp_ctx_idx] = frm_len - frm_context_num[-1]
                    tmp_ctx_idx += 1
                else:
                    frm_context_num.append(0)
            frm_context_num.reverse()

            valid_frm_salient_num = []
            valid_frm_context_num = []
            for tmp_tmp_tmp_i in range(valid_seg_len):
                valid_frm_salient_num.extend([0] * (cur_segment_sizes[tmp_tmp_tmp_i] - 1))
                valid_frm_context_num.extend([0] * (cur_segment_sizes[tmp_tmp_tmp_i] - 1))

                if frm_context_num[tmp_tmp_tmp_i] == 0:
                    valid_frm_salient_num.append(min(frm_salient_num[tmp_tmp_tmp_i], frm_len))
                    valid_frm_context_num.append(0)
                elif frm_context_num[tmp_tmp_tmp_i] > 0:
                    valid_frm_context_num.append(min(frm_context_num[tmp_tmp_tmp_i], frm_len // 2))
                    valid_frm_salient_num.append(min(frm_salient_num[tmp_tmp_tmp_i], frm_len - valid_frm_context_num[-1]))
                else:
                    valid_frm_salient_num.append(frm_len - int(frm_len * d))
                    valid_frm_context_num.append(int(frm_len * d))

            frm_salient_num = valid_frm_salient_num
            frm_context_num = valid_frm_context_num

        cur_salient_indexs = []
        cur_context_indexs = []

        for frame_i in range(cur_seg_len):
            if frm_salient_num[frame_i] > 0:
                frm_top_indexes = torch.topk(cur_attn_weights[frame_i], frm_salient_num[frame_i]).indices
            else:
                frm_top_indexes = None

            if frm_context_num[frame_i] > 0:
                frm_all_indexs = torch.arange(frm_len, device=device_type)
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
                density = density + torch.rand(density.shape, device=device_type, dtype=density.dtype) * noise

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

        cur_all_indexs = torch.arange(cur_seg_len * frm_len, device=device_type)
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
                tmp_to_merge_tokens.shape[0], tmp_context_indexs.shape[0], dtype=cur_hidden_states.dtype, device=device_type
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
        keep_indexs += (cur_index_combined + seg_index_start,)
        seg_index_start = seg_index_start + cur_seg_len * frm_len

    vision_tokens = torch.cat(vision_tokens, dim=0).unsqueeze(0)
    keep_indexs = torch.cat(keep_indexs)
    keep_indexs = keep_indexs.sort().values
    return vision_tokens[0], keep_indexs


# ---- inputs: patch means on a circle, so each transition's cosine is chosen ----

STEP_DEGREES = {"r": (1.0, 8.0), "s": (20.0, 30.0), "x": (40.0, 80.0)}  # redundant (>= 0.95), same segment, a cut


def patches(transitions, tokens=48, dim=16, seed=0, tied=False):
    """V [T, N, D] whose patch means turn by a drawn angle per transition (`transitions`: one of r/s/x each, see
    `STEP_DEGREES`) around which the tokens spread with zero mean; A [T, N] random. `tied`: tokens from 40 prototypes
    (exact duplicates: density ties only the noise breaks)."""
    generator = torch.Generator().manual_seed(seed)
    steps = [lo + (hi - lo) * float(torch.rand(1, generator=generator)) for lo, hi in (STEP_DEGREES[t] for t in transitions)]
    angles = torch.tensor([0.0, *np.cumsum(steps)]) * math.pi / 180
    means = torch.zeros(len(angles), dim)
    means[:, 0], means[:, 1] = angles.cos(), angles.sin()
    if tied:
        spread = torch.randn(40, dim, generator=generator)[torch.randint(0, 40, (len(angles), tokens), generator=generator)]
    else:
        spread = torch.randn(len(angles), tokens, dim, generator=generator)
    video = 6 * means[:, None] + spread - spread.mean(dim=1, keepdim=True)
    return video, torch.rand(len(angles), tokens, generator=generator)


# 24 patches: single-patch segments (xx), runs of redundant patches (r) inside multi-patch segments (s), a segment of
# 9 patches in 6 runs (two anchor patches at p = 4), a segment ending in a redundant run
MIXED = "xrrsrxxsssxrrsrssrsxrrr"
CASES = {
    "mixed": (MIXED, 6),
    "all_single": ("xxxxxxxxx", 10),
    "one_redundant_run": ("rrrrrrrrrrx", 2),
    "long_segment": ("srrsrsrsrrsssrsxrrrssrx", 3),
}


def kept_per_patch(index, count, tokens):
    return torch.bincount(index // tokens, minlength=count).tolist()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("retention", "p", "beta"), [(0.27, 4, 0.6), (0.10, 2, 0.3), (0.5, 1, 0.6)])
def test_fastvid_qwen_matches_the_released_code(case, retention, p, beta):
    transitions, c = CASES[case]
    video, salience = patches(transitions)
    expected_tokens, expected_index = released_fastvid(video, salience, 6, 8, retention, c, 0.84, 0.95, 0.4, p, beta, 0)
    selection = fastvid_qwen_select(video, salience, video.mean(1), retention=retention, c=c, p=p, beta=beta, density_noise=0)
    count = video.shape[0]
    assert kept_per_patch(selection.index, count, 48) == kept_per_patch(expected_index, count, 48)
    assert torch.equal(selection.index, expected_index)
    torch.testing.assert_close(selection.tokens, expected_tokens, atol=1e-5, rtol=1e-5)


def test_the_inputs_cover_single_patch_segments_redundant_runs_and_both_caps():
    video, _ = patches(MIXED)
    segments, runs = segments_and_runs(video.mean(1), 6, 0.84, 0.95)
    sizes = [len(s) for s in segments]
    assert 1 in sizes and any(len(r) > 1 for r in runs) and any(max(r) > 1 for r in runs)
    assert sum(sizes) == 24 and [sum(r) for r in runs] == sizes
    video, _ = patches(CASES["one_redundant_run"][0])
    segments, runs = segments_and_runs(video.mean(1), 2, 0.84, 0.95)
    assert runs == [[11], [1]]
    # retain 12 of 48 per patch: 132 over the 11 patches, 52 DTM and 80 ATS, all on the last patch: capped at
    # N // 2 = 24 DTM, then N - 24 = 24 ATS
    salient, anchors = segment_budget(runs[0], 48, 12, 0.4, 4)
    assert salient == [0] * 10 + [24] and anchors == [0] * 10 + [24]
    selection = fastvid_qwen_select(video, torch.rand(12, 48), video.mean(1), retention=0.27, c=2, density_noise=0)
    assert kept_per_patch(selection.index, 12, 48) == [0] * 10 + [48, 12] and selection.empty_patches == 10


def test_anchor_patches_count_from_the_segments_end_with_the_larger_share_on_the_last():
    # 6 valid patches (no redundant run), p = 4: anchor patches 5 and 1; ctx = max(int(6 * 12 * 0.4), 1) = 28 in
    # shares 14, 14; sal = 44 over 6 patches: 8, 8, 7, 7, 7, 7
    assert segment_budget([1] * 6, 48, 12, 0.4, 4) == ([8, 8, 7, 7, 7, 7], [0, 14, 0, 0, 0, 14])
    assert segment_budget([1] * 7, 48, 12, 0.4, 4)[1] == [0, 0, 16, 0, 0, 0, 17]  # 33 = 17 + 16, laid 0, 4, reversed
    assert segment_budget([1], 48, 12, 0.4, 4) == ([8], [4])  # one patch: (retain - ctx, ctx), no caps
    assert segment_budget([1], 48, 0, 0.4, 4) == ([-1], [1])  # int(N R) = 0: max(., 1) DTM, salient -1 (none)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_the_released_code_bit_for_bit(dtype):
    """Merged features and the salience in the model's dtype, as released (the signal is float32 holding its values)."""
    for case in ("mixed", "long_segment"):
        transitions, c = CASES[case]
        video, salience = patches(transitions)
        video, salience = video.to(dtype), salience.to(dtype)  # bf16: tied saliences, as the released ones are
        expected_tokens, expected_index = released_fastvid(video, salience, 6, 8, 0.27, c, 0.84, 0.95, 0.4, 4, 0.6, 0)
        selection = fastvid_qwen_select(video, salience.float(), video.mean(1), retention=0.27, c=c, density_noise=0)
        assert torch.equal(selection.index, expected_index) and torch.equal(selection.tokens, expected_tokens)


def test_the_density_noise_is_drawn_as_released():
    """Tied tokens: only the `rand * 1e-6` noise, one draw per anchor patch in order, breaks the density ties.

    Seed 5: with seeds 4 and 10 two duplicate tokens' scores tie exactly at an anchor patch's k-th place, and the CPU's
    topk picks another of them in our padded rows than in the release's one row of that patch (its choice among ties
    depends on the row's length)."""
    video, salience = patches(MIXED, tied=True)
    torch.manual_seed(5)
    expected_tokens, expected_index = released_fastvid(video, salience, 6, 8, 0.27, 6, 0.84, 0.95, 0.4, 4, 0.6, 1e-6)
    torch.manual_seed(5)
    selection = fastvid_qwen_select(video, salience, video.mean(1), retention=0.27, c=6)
    assert torch.equal(selection.index, expected_index)
    torch.testing.assert_close(selection.tokens, expected_tokens, atol=1e-5, rtol=1e-5)
    torch.manual_seed(6)
    assert not torch.equal(fastvid_qwen_select(video, salience, video.mean(1), retention=0.27, c=6).index, expected_index)


def test_fewer_temporal_patches_than_c_is_an_error_naming_the_fix():
    video, salience = patches("xxx")
    with pytest.raises(ConfigError, match=r"c=8: .* 4 temporal patches \(8 frames\); choose c <= 4 or sample at least 16"):
        fastvid_qwen_select(video, salience, video.mean(1), retention=0.27)


def test_a_video_is_selected_in_at_most_180_kernels_and_one_host_read():
    """All patches and merge groups at once; the kernels grow by one topk per distinct per-patch count (142-164 at the
    real sizes, fastvid_qwen.py). G, each patch's mean token, comes from the encoder (`probe_features`)."""
    video, salience = patches(MIXED)
    frame_features = video.mean(1)
    with torch.inference_mode(), count_ops() as counted:
        fastvid_qwen_select(video, salience, frame_features, retention=0.27, c=6)
    assert counted.counts.syncs == 1 and counted.counts.ops <= 180, (counted.counts.ops, dict(counted.counts.syncing))


# ---- the stage ----

PROBE = frozenset({"probe_attention", "probe_features"})
QWEN = ModelInfo(layers=2, signals=PROBE, family="qwen2_5_vl")


def qwen_tokens(transitions=MIXED):
    video, salience = patches(transitions)
    layout = VideoLayout(video.shape[0], 6, 8, "none", "qwen2_5_vl")
    return VideoTokens.from_grid(video, layout), {"probe_attention": salience, "probe_features": video.mean(1)}


def test_the_stage_runs_the_released_qwen_arithmetic_with_its_tau_and_the_users_retention():
    stage = FastVID(retention=0.27, c=6)
    stage.validate_for(QWEN)
    assert stage.needs() == PROBE and stage.signals() == PROBE  # LLaVA's names: the same whatever the family
    tokens, signals = qwen_tokens()
    kept = stage.select(tokens, signals, "task/0")
    video, salience = patches(MIXED)
    _, expected_index = released_fastvid(video, salience, 6, 8, 0.27, 6, RELEASED["tau"], 0.95, 0.4, 4, 0.6, 0)
    assert kept.figures["fastvid_variant"] == "qwen2_5_vl" and kept.figures["fastvid_tokens_out"] == expected_index.numel()
    assert kept.figures["fastvid_empty_patches"] > 0 and bool((kept.index.diff() > 0).all())
    again = stage.select(tokens, signals, "task/0")
    assert torch.equal(again.index, kept.index) and torch.equal(again.features, kept.features)
    assert FastVID(retention=0.27, c=6, tau=0.5).tau_for("qwen2_5_vl") == 0.5 and stage.tau_for("video") == 0.9


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mode": "paper"}, r"^mode='paper': FastVID on Qwen2.5-VL exists only as its released code \(mode=official\)"),
        ({"segmentation": "fixed"}, r"^segmentation='fixed', merging='dtm': FastVID's Qwen2.5-VL code has DySeg and DTM"),
        ({"merging": "uniform"}, r"^segmentation='dyseg', merging='uniform': .*use segmentation=dyseg merging=dtm$"),
    ],
)
def test_paper_mode_and_ablations_are_refused_on_qwen_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        FastVID(**settings).validate_for(QWEN)
    assert "\n" not in str(error.value)


def test_the_plan_is_nominal_and_exact_when_every_segment_is_one_patch():
    counts = PlannedCounts.full(VideoLayout(10, 6, 8, "none", "qwen2_5_vl"), layers=2)
    assert FastVID(retention=0.27, c=10).planned_tokens(counts) == 10 * 12
    video, salience = patches(CASES["all_single"][0])
    assert fastvid_qwen_select(video, salience, video.mean(1), retention=0.27, c=10).index.numel() == 10 * 12
    with pytest.raises(ConfigError, match="temporal patches"):
        FastVID(c=12).planned_tokens(counts)


# ---- the ViT salience on the tiny Qwen2.5-VL ----


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen2_5_vl"), "qwen2_5_vl")


def tiny_adapter(checkpoint, attention="sdpa", dtype=torch.float32):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        checkpoint, local_files_only=True, attn_implementation=attention, dtype=dtype
    ).eval()
    return Qwen2_5_VLAdapter(model, AutoProcessor.from_pretrained(checkpoint, local_files_only=True))


def frames(count=8, height=112, width=84):
    return np.random.default_rng(0).integers(0, 255, (count, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(("attention", "dtype"), [("sdpa", torch.float32), ("eager", torch.float32), ("sdpa", torch.bfloat16)])
def test_the_probe_attention_is_the_released_salience_bit_for_bit(checkpoint, attention, dtype):
    adapter = tiny_adapter(checkpoint, attention, dtype)
    pixels = adapter.preprocess(frames())  # 4 x 8 x 6 patches: 4 x 3 merged tokens, in 2 x 2 windows (permuted)
    tower = adapter.vision_tower
    assert tower.fullatt_block_indexes == [len(tower.blocks) - 1]  # the last block attends over the whole patch
    inputs: dict = {}

    def keep_input(_module, args):
        inputs["states"] = args[0]

    handle = tower.blocks[-1].register_forward_pre_hook(keep_input)
    try:
        with torch.no_grad():
            encoded = adapter.encode(pixels, frozenset({"probe_attention"}))
            grid_thw = torch.tensor([pixels.grid_thw])
            expected = released_salience(tower, inputs["states"], grid_thw)
    finally:
        handle.remove()
    salience = encoded.signals["probe_attention"]
    assert salience.dtype == torch.float32 and salience.shape == (encoded.layout.frames, encoded.layout.tokens_per_frame)
    assert expected.dtype == dtype and torch.equal(salience, expected.float())
    torch.testing.assert_close(salience.sum(dim=1), torch.ones(4), atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)


def test_capturing_the_salience_leaves_the_features_and_no_hooks(checkpoint):
    adapter = tiny_adapter(checkpoint)
    pixels = adapter.preprocess(frames())
    tower = adapter.vision_tower
    modules = [tower, tower.blocks[-1].attn, tower.blocks[-1].attn.qkv]
    with torch.no_grad():
        plain, captured = adapter.encode(pixels), adapter.encode(pixels, frozenset({"probe_attention"}))
    assert torch.equal(plain.grid, captured.grid) and plain.signals == {}
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in modules)
    gives = r"\(it gives \['attention_received', 'probe_attention', 'probe_"
    with pytest.raises(ValueError, match=r"\['keys'\] are not available from Qwen2.5-VL " + gives):
        adapter.encode(pixels, frozenset({"keys"}))
    assert adapter.model_info(adapter.config).signals == PROBE | {"attention_received"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probe_features_are_each_patchs_mean_token_and_the_stage_selects_from_them_as_released(checkpoint, dtype):
    """`probe_features` [T, D] is each temporal patch's mean merged token in the model's dtype, bit for bit the frame
    feature FastVID takes the mean of the stage's own tokens for before it normalises (MQ:1836); from the encoder's
    two signals the stage keeps what the released block keeps given only the merged tokens and the salience."""
    adapter = tiny_adapter(checkpoint, dtype=dtype)
    with torch.no_grad():
        encoded = adapter.encode(adapter.preprocess(frames()), PROBE)
    layout, features = encoded.layout, encoded.signals["probe_features"]
    tokens = VideoTokens.from_grid(encoded.grid, layout)
    assert features.dtype == dtype and features.shape == (layout.frames, encoded.grid.shape[-1])
    assert torch.equal(features, tokens.grid().mean(1))
    kept = FastVID(retention=0.5, c=2, density_noise=0).select(tokens, encoded.signals, "t/0")
    salience = encoded.signals["probe_attention"].to(dtype)
    expected_tokens, expected_index = released_fastvid(
        encoded.grid, salience, layout.rows, layout.cols, 0.5, 2, RELEASED["tau"], 0.95, 0.4, 4, 0.6, 0
    )
    assert torch.equal(kept.index, expected_index)
    torch.testing.assert_close(kept.features, expected_tokens, atol=0 if dtype == torch.bfloat16 else 1e-5, rtol=0)


def test_the_salience_is_in_raster_order_and_sums_to_one_per_patch():
    """A hand-built last block: every query along one axis, the key of the merged token at raster position r at r
    times that axis (its 4 patches alike), laid out in the tower's window order; RoPE off (cos 1, sin 0)."""
    grid, heads, head_dim = (2, 8, 12), 2, 4  # 2 temporal patches of 4 x 6 merged tokens, windows of 2 x 2
    window_index = released_window_index(torch.tensor([grid]), 56, 2, 14)
    assert not torch.equal(window_index, torch.arange(48))
    raster = torch.arange(48, dtype=torch.float32) % 24 * 0.1  # per temporal patch, raster position r -> 0.1 r
    key = raster[window_index].repeat_interleave(4)  # [S] in window order
    q = torch.zeros(192, heads, head_dim)
    q[..., 0] = 1.0
    k = torch.zeros(192, heads, head_dim)
    k[..., 0] = key[:, None]
    qkv = torch.cat([q, k, torch.zeros_like(q)], dim=1).flatten(1)  # [S, (q, k, v) x heads x head_dim]
    salience = mean_query_attention(qkv, torch.ones(192, head_dim), torch.zeros(192, head_dim), grid, heads, window_index)
    expected = torch.softmax(torch.arange(24, dtype=torch.float32) * 0.1 / math.sqrt(head_dim), dim=0)
    torch.testing.assert_close(salience, expected.expand(2, -1))
    torch.testing.assert_close(salience.sum(dim=1), torch.ones(2))


def test_the_hook_refuses_two_videos_in_one_tower_call(checkpoint):
    adapter = tiny_adapter(checkpoint)
    pixels = adapter.preprocess(frames())
    grid = torch.tensor([pixels.grid_thw, pixels.grid_thw])
    hooks = captured_scores(adapter.vision_tower, {}, {SIGNAL: mean_query_attention})
    with torch.no_grad(), hooks, pytest.raises(ValueError, match="one video"):
        adapter.vision_tower(torch.cat([pixels.pixel_values_videos] * 2), grid_thw=grid)


# ---- through the wrapper ----


def test_fastvid_runs_through_the_wrapper_with_its_planned_tokens_at_grid_positions(checkpoint, tmp_path):
    """16 frames: 8 temporal patches, c = 8 (every patch its own segment): the plan, F * int(N R), is exact."""
    from test_wrapper import GREEDY, make_requests

    from dycoke_eval.offline.videos import write_video
    from dycoke_eval.video_frames import sample_video
    from dycoke_eval.wrapper import CompressedVideoLM

    method = FastVID(retention=0.5)
    lm = CompressedVideoLM(pretrained=str(checkpoint), frames=16, device="cpu", method=method)
    assert method.signals() == PROBE
    video = str(write_video(tmp_path / "clip.mp4"))
    lm.generate_until(make_requests(lm, [video], GREEDY))
    (record,) = lm.sample_records
    adapter = lm.adapter
    with torch.no_grad():
        encoded = adapter.encode(adapter.preprocess(sample_video(video, 16).frames), method.signals())
    layout = encoded.layout
    planned = method.plan(PlannedCounts.full(layout, adapter.dims().layers))
    assert layout.frames == 8 and record.visual_tokens_full == layout.grid_tokens
    assert record.visual_tokens_in == planned.prefill[0] == layout.frames * int(layout.tokens_per_frame * 0.5)
    assert record.prefill_visual_by_layer == planned.prefill
    selected = lm.compressor.select(encoded, "t/0")
    index = selected.tokens.index
    assert index.numel() == record.visual_tokens_in and bool((index.diff() > 0).all()) and int(index[-1]) < layout.grid_tokens
    prompt_ids = adapter.tokenizer(adapter.render_prompt("checkpoint", "What moves?"), return_tensors="pt")["input_ids"][0]
    full = adapter.generation_inputs(prompt_ids, encoded.grid.flatten(0, 1), None, layout.full_tokens, encoded=encoded)
    visual, positions = adapter.assemble(encoded, selected.tokens.features, index)
    pruned = adapter.generation_inputs(prompt_ids, visual, positions, layout.full_tokens, encoded=encoded)
    start = full.visual_start
    full_ids, pruned_ids = full.kwargs["position_ids"][1:, 0], pruned.kwargs["position_ids"][1:, 0]
    assert torch.equal(pruned_ids[:, start : start + index.numel()], full_ids[:, start + index])  # their grid positions
