"""FrameFusion: the pure functions and the per-sample walk against a literal transcription of the released code, and
the mid-layer plumbing against the release's decoder-layer flow, run by hand on the tiny model's own modules.

Transcribed from thu-nics/FrameFusion@fbec1d2e6bd383361c2c87ca13e73f80a8c1a9e9: `framefusion/main.py:8-380` (the
`FrameFusion` module, `cosine_similarity`, `find_contigious_latter_index`), `framefusion/utils.py:27-57`
(`scaled_dot_product_attention`), the decoder-layer flow of `framefusion/models/qwen2/modeling_qwen2.py:44-86` (with
the pruning weights of 166-177) and the bookkeeping of `framefusion/models/llava_video/modeling_llava_video.py:321-338`.
"""

import math
from typing import List  # noqa: UP035  (as released)

import numpy as np
import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2.modeling_qwen2 import repeat_kv

from dycoke_eval.compression.dispatcher import Compressor
from dycoke_eval.compression.stages import ModelInfo, PlannedCounts
from dycoke_eval.config import ConfigError, instantiate_method
from dycoke_eval.geometry import VideoLayout
from dycoke_eval.methods.framefusion import (
    FrameFusion,
    frame_slots,
    last_query_attention,
    merge_runs,
    prune_rows,
    pruning_ratio,
    slot_similarity,
)
from dycoke_eval.methods.random_tokens import RandomTokens
from dycoke_eval.plumbing.attention import routed_attention
from dycoke_eval.plumbing.layer_merging import ShortenedLayer
from dycoke_eval.wrapper import CompressedVideoLM, SampleRecord

# --- the release, transcribed (main.py) -----------------------------------------------------------------------------

TEXT_TOKEN = -1
IGNORE_TOKEN = -2


class ReleasedFrameFusion(nn.Module):
    def __init__(self, cost=0.3, similarity_lower_bound=0.6, ratio_lower_bound=0.1):
        super(ReleasedFrameFusion, self).__init__()  # noqa: UP008
        self.cost = cost
        self.similarity_lower_bound = similarity_lower_bound
        self.ratio_lower_bound = ratio_lower_bound

    def prepare(
        self,
        patch_type: torch.Tensor,
        patch_num: int,
        image_token_start_index: torch.Tensor,
        image_token_end_index: torch.Tensor,
        image_token_length: torch.Tensor,
        original_length: int,
        finish_merging: bool = False,
        finish_pruning: bool = False,
        sparsity_list: List[float] = None,  # noqa: UP006, RUF013  (as released)
    ):
        self.patch_type = patch_type
        self.patch_num = patch_num
        self.image_token_start_index = image_token_start_index
        self.image_token_end_index = image_token_end_index
        self.image_token_length = image_token_length
        self.original_length = original_length
        self.finish_merging = finish_merging
        self.finish_pruning = finish_pruning
        if sparsity_list is None:
            self.sparsity_list = []
        else:
            self.sparsity_list = sparsity_list

    def forward(self, hidden_states, position_embeddings, attention_mask, self_attn_weights=None):
        bsz, q_len, hidden_size = hidden_states.size()
        device = hidden_states.device

        # pruning
        if q_len > 1 and self.finish_merging == True and self.finish_pruning == False:  # noqa: E712

            def to_int(x):
                return x.item() if isinstance(x, torch.Tensor) else int(x)

            image_token_pruning_start_index = to_int(self.image_token_start_index)
            image_token_pruning_length = to_int(self.image_token_length - (self.original_length - q_len))

            last_layer_attention = self_attn_weights
            last_layer_attention_avg = torch.mean(last_layer_attention, dim=(1, 2))[0]
            last_layer_attention_avg_image = last_layer_attention_avg[
                image_token_pruning_start_index : image_token_pruning_start_index + image_token_pruning_length
            ]

            pruning_ratio = self._compute_pruning_ratio(self.sparsity_list, self.cost)
            top_attention_rank_index = (
                last_layer_attention_avg_image.topk(round(image_token_pruning_length * (1 - pruning_ratio))).indices
                + image_token_pruning_start_index
            )

            keep_indexs = torch.cat(
                (
                    torch.arange(image_token_pruning_start_index, device=device),
                    top_attention_rank_index,
                    torch.arange(image_token_pruning_start_index + image_token_pruning_length, q_len, device=device),
                )
            )
            keep_indexs = keep_indexs.sort().values

            hidden_states = hidden_states[:, keep_indexs, :]

            position_embeddings = self.position_embedding_handler_at_pruning(position_embeddings, keep_indexs)

            if attention_mask != None:  # noqa: E711
                attention_mask = attention_mask[:, :, keep_indexs, :][:, :, :, keep_indexs]
            self.finish_pruning = True

        # merging
        if q_len > 1 and (not self.finish_merging):
            # align devices
            self.patch_type = self.patch_type.to(device)

            # prefill
            sparsity_upper_bound = self._compute_pruning_ratio(self.sparsity_list, self.cost)
            similarity_by_patch, token_index_by_patch = self.compute_similarity_and_token_index_by_patch(
                hidden_states, self.patch_type, self.patch_num
            )  # only support bsz = 1

            frame_token_num = torch.sum(self.patch_type != TEXT_TOKEN).item()
            merge_index_by_patch = torch.where(similarity_by_patch >= self.similarity_lower_bound)[1]
            above_k_ratio = merge_index_by_patch.shape[0] / frame_token_num

            if above_k_ratio < sparsity_upper_bound:
                self.sparsity_list.append(above_k_ratio)

                if above_k_ratio < self.ratio_lower_bound:
                    self.finish_merging = True
            else:
                topk_values, topk_indices = torch.topk(similarity_by_patch, int(sparsity_upper_bound * frame_token_num))
                topk_indices, _ = torch.sort(topk_indices)
                merge_index_by_patch = topk_indices[0]

                self.finish_merging = True
                self.finish_pruning = True

            hidden_states, token_mask = self.merge_tokens_and_get_mask(
                hidden_states, similarity_by_patch, token_index_by_patch, merge_index_by_patch
            )
            # here only bsz=1
            # update patch type
            self.patch_type = self.patch_type.to(device)[token_mask].reshape(bsz, -1)
            hidden_states = hidden_states[token_mask, :].reshape(bsz, -1, hidden_size)

            position_embeddings = self.position_embedding_handler_at_merging(position_embeddings, token_mask)

            if attention_mask is not None:
                attention_mask = attention_mask[:, :, token_mask[0], :][:, :, :, token_mask[0]]

        return hidden_states, position_embeddings, attention_mask

    def position_embedding_handler_at_pruning(self, position_embeddings, keep_indexs):
        if type(position_embeddings) == list:  # noqa: E721
            assert len(position_embeddings) == 2
            if position_embeddings[0].ndim == 4:
                position_embeddings[0] = position_embeddings[0][:, :, keep_indexs, :]
                position_embeddings[1] = position_embeddings[1][:, :, keep_indexs, :]
            else:
                position_embeddings[0] = position_embeddings[0][:, keep_indexs, :]
                position_embeddings[1] = position_embeddings[1][:, keep_indexs, :]
        else:
            raise NotImplementedError("Only support list or tensor for position embeddings")
        return position_embeddings

    def position_embedding_handler_at_merging(self, position_embeddings, token_mask):
        if type(position_embeddings) == list:  # noqa: E721
            # (cos, sin)
            assert len(position_embeddings) == 2
            if position_embeddings[0].ndim == 4:
                position_embeddings[0] = position_embeddings[0][:, :, token_mask[0], :]
                position_embeddings[1] = position_embeddings[1][:, :, token_mask[0], :]
            else:
                position_embeddings[0] = position_embeddings[0][:, token_mask[0], :]
                position_embeddings[1] = position_embeddings[1][:, token_mask[0], :]
        else:
            raise NotImplementedError("Only support list or tensor for position embeddings")
        return position_embeddings

    @staticmethod
    def compute_similarity_and_token_index_by_patch(hidden_states, token_patch_type, patch_num):
        bsz, q_len, _ = hidden_states.size()
        device = hidden_states.device

        assert bsz == 1, "Only support batch size 1"

        token_patch_type_by_patch, token_index_by_patch = torch.where(
            token_patch_type == torch.arange(patch_num, device=device)[:, None]
        )

        # (released) reshape to batch size = 1, with shape (batch_size, q_len),
        token_patch_type_by_patch = token_patch_type_by_patch[None, :]
        token_index_by_patch = token_index_by_patch[None, :]

        similarity_by_patch = cosine_similarity(
            hidden_states[torch.arange(bsz, device=device), token_index_by_patch[:, :-1], :],
            hidden_states[torch.arange(bsz, device=device), token_index_by_patch[:, 1:], :],
        )

        similarity_by_patch[token_patch_type_by_patch[:, :-1] != token_patch_type_by_patch[:, 1:]] = -2

        similarity_by_patch = torch.cat(
            (
                torch.full(size=(bsz, 1), fill_value=IGNORE_TOKEN, dtype=hidden_states.dtype, device=device),
                similarity_by_patch,
            ),
            dim=1,
        )

        assert similarity_by_patch.shape[1] == token_index_by_patch.shape[1]
        return similarity_by_patch, token_index_by_patch

    @staticmethod
    def merge_tokens_and_get_mask(hidden_states, similarity_by_patch, token_index_by_patch, merge_index_by_patch):
        device = hidden_states.device
        if merge_index_by_patch.shape[0] == 0:
            keep_mask = torch.ones(hidden_states.shape[:-1], dtype=torch.bool, device=device)
            return hidden_states, keep_mask
        bsz, q_len, _ = hidden_states.size()
        bsz_index = torch.arange(bsz, device=hidden_states.device)[:, None]
        merge_mask_by_patch: torch.LongTensor = torch.zeros(
            bsz, similarity_by_patch.shape[1], dtype=hidden_states.dtype, device=hidden_states.device
        )
        merge_mask_by_patch[bsz_index, merge_index_by_patch] = 1
        last_merge_token_by_patch = find_contigious_latter_index(merge_mask_by_patch)

        keep_mask = torch.ones(hidden_states.shape[:-1], dtype=torch.bool, device=device)
        keep_mask[bsz_index, token_index_by_patch[bsz_index, merge_index_by_patch]] = False

        # (released) batch size = 1
        unique_merge_nums = torch.sort(torch.unique(last_merge_token_by_patch.to(torch.long))).values
        unique_merge_nums = unique_merge_nums[1:] if (unique_merge_nums[0] == 0).item() else unique_merge_nums

        merge_num_indices, token_merge_index_in_patch = torch.where(last_merge_token_by_patch == unique_merge_nums[:, None])

        merge_nums = unique_merge_nums[merge_num_indices]
        token_merge_start_index_in_patch = token_merge_index_in_patch - merge_nums
        token_merge_member_start_index_in_patch = torch.repeat_interleave(token_merge_start_index_in_patch, merge_nums)

        merge_member_length = torch.sum(merge_nums)
        merge_member_contigious_sequence = torch.arange(1, merge_member_length + 1, device=device)

        merge_nums_cumulative_counts = torch.cumsum(merge_nums, dim=0)
        merge_nums_start = torch.cat((torch.tensor([0], device=device), merge_nums_cumulative_counts[:-1]))

        contigious_sequence_by_merge_nums = merge_member_contigious_sequence - torch.repeat_interleave(
            merge_nums_start, merge_nums
        )

        token_merge_member_index_in_patch = token_merge_member_start_index_in_patch + contigious_sequence_by_merge_nums

        # (released) this function may have numerical instability
        hidden_states.index_add_(
            dim=1,
            index=token_index_by_patch[0, token_merge_member_start_index_in_patch],
            source=hidden_states[bsz_index, token_index_by_patch[bsz_index, token_merge_member_index_in_patch]],
        )

        # divide to get average
        hidden_states[bsz_index, token_index_by_patch[bsz_index, token_merge_start_index_in_patch]] /= (
            merge_nums[None, :, None] + 1
        )

        return hidden_states, keep_mask

    @staticmethod
    def _compute_pruning_ratio(sparsity_list, cost, num_layers=28):
        list_length = len(sparsity_list)
        s = 1
        total_calcution = 0
        for i in range(list_length):
            s *= 1 - sparsity_list[i]
            total_calcution += s
        remain_calcution = num_layers * cost - total_calcution
        if remain_calcution < 0:
            raise ValueError("The cost is too small")
        if remain_calcution / ((num_layers - list_length) * s) > 1:
            return 0
        return 1 - (remain_calcution / ((num_layers - list_length) * s))


def cosine_similarity(mat1, mat2):
    dot_product = torch.sum(mat1 * mat2, dim=-1)
    norm_vec1 = torch.norm(mat1, dim=-1)
    norm_vec2 = torch.norm(mat2, dim=-1)
    return dot_product / (norm_vec1 * norm_vec2)


def find_contigious_latter_index(index_tensor: torch.LongTensor) -> torch.Tensor:
    bsz, n = index_tensor.shape
    t_prev = torch.cat([torch.zeros((bsz, 1), dtype=index_tensor.dtype, device=index_tensor.device), index_tensor[:, :-1]], dim=1)
    t_next = torch.cat([index_tensor[:, 1:], torch.zeros((bsz, 1), dtype=index_tensor.dtype, device=index_tensor.device)], dim=1)

    # Identify the starts and ends of runs of ones
    run_starts = (index_tensor == 1) & (t_prev == 0)
    run_ends = (index_tensor == 1) & (t_next == 0)

    start_indices = torch.nonzero(run_starts, as_tuple=True)
    end_indices = torch.nonzero(run_ends, as_tuple=True)
    run_lengths = (end_indices[1] - start_indices[1] + 1).to(index_tensor.dtype)

    output = torch.zeros_like(index_tensor, dtype=index_tensor.dtype)
    output[end_indices[0], end_indices[1]] = run_lengths

    return output


def released_scaled_dot_product_attention(
    query, key, value, num=1, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
) -> torch.Tensor:
    """utils.py:27-57."""
    query = query[:, :, -num:, :]
    L, S = query.size(-2), key.size(-2)  # noqa: N806
    scale_factor = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    attn_bias = torch.zeros(L, S, dtype=query.dtype, device=query.device)

    if is_causal:
        assert attn_mask is None
        temp_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).triu(diagonal=S - L + 1)
        attn_bias.masked_fill_(temp_mask, float("-inf"))
        attn_bias.to(query.dtype)

    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_bias.masked_fill_(attn_mask.logical_not(), float("-inf"))
        else:
            attn_bias += attn_mask

    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)

    attn_weight = query @ key.transpose(-2, -1) * scale_factor
    attn_weight += attn_bias
    attn_weight = torch.softmax(attn_weight, dim=-1)
    attn_weight = attn_weight
    attn_weight = torch.dropout(attn_weight, dropout_p, train=True)

    return attn_weight


def released_patch_type(layout: VideoLayout, start: int, prompt_length: int) -> tuple[torch.Tensor, int]:
    """modeling_llava_video.py:322-335 with p = the grid's side (13 on LLaVA-Video-7B); LLaVA-OV's port: N slots and
    the newline's own."""
    if layout.newlines == "row_end":
        patch_num = layout.rows * (layout.rows + 1)
        image_token_length = layout.full_tokens
        n_frames = image_token_length // patch_num
        body = list(range(patch_num)) * n_frames
    else:
        patch_num = layout.tokens_per_frame + 1
        body = list(range(layout.tokens_per_frame)) * layout.frames + [layout.tokens_per_frame]
    patch_type = [TEXT_TOKEN] * start + body + [TEXT_TOKEN] * (prompt_length - start - len(body))
    return torch.tensor([patch_type]), patch_num


# --- the pure functions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sparsities, cost, layers", [([], 0.3, 28), ([0.2], 0.3, 28), ([0.5, 0.05], 0.3, 28), ([0.3], 0.5, 8), ([], 1.0, 28)]
)
def test_the_budget_is_the_releases_pruning_ratio(sparsities, cost, layers):
    assert pruning_ratio(sparsities, cost, layers) == ReleasedFrameFusion._compute_pruning_ratio(sparsities, cost, layers)


def test_a_budget_the_merges_overspent_stops_the_sample_naming_cost():
    with pytest.raises(ValueError, match="The cost is too small"):
        ReleasedFrameFusion._compute_pruning_ratio([0.5], 0.01)
    with pytest.raises(ConfigError, match=r"cost=0.01: .* raise cost"):
        pruning_ratio([0.5], 0.01, 28)


def test_official_counts_28_layers_on_any_depth_and_paper_the_models_own():
    assert FrameFusion().budget_layers(8) == 28 and FrameFusion(mode="paper").budget_layers(8) == 8
    assert FrameFusion(mode="paper").budget_layers(28) == FrameFusion().budget_layers(28)


def video_states(frames=6, slots=5, text=(3, 4), dim=32, dtype=torch.bfloat16, seed=0):
    """[1, L, D] states of `text[0]` text tokens, `frames` frames of `slots` slots drifting from frame to frame (so some
    cosines pass 0.6, others not), then `text[1]` text tokens; and their patch types [1, L]."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(slots, dim, generator=generator)
    drift = torch.randn(frames, slots, dim, generator=generator) * torch.rand(frames, slots, 1, generator=generator) * 4
    video = (first + drift.cumsum(0)).reshape(-1, dim)
    before, after = torch.randn(text[0], dim, generator=generator), torch.randn(text[1], dim, generator=generator)
    hidden = torch.cat([before, video, after])[None].to(dtype)
    types = torch.tensor([[TEXT_TOKEN] * text[0] + list(range(slots)) * frames + [TEXT_TOKEN] * text[1]])
    return hidden, types


def test_slot_similarity_is_the_releases_bit_for_bit_in_bf16():
    hidden, types = video_states()
    released, released_order = ReleasedFrameFusion.compute_similarity_and_token_index_by_patch(hidden, types, 5)
    similarity, order = slot_similarity(hidden[0], types[0], 5, 30)
    assert similarity.dtype == torch.bfloat16
    assert torch.equal(order, released_order[0]) and torch.equal(similarity, released[0])
    assert 0 < int((similarity >= 0.6).sum()) < 25  # some merge, some do not


@pytest.mark.parametrize("candidates", [[6, 7, 8, 13, 20, 26, 27, 28, 29], [1, 2, 3, 4, 5], []])
def test_merging_runs_into_the_earliest_frame_is_the_releases_bit_for_bit_in_bf16(candidates):
    """Runs of one to five tokens (the positions are in slot order: 6 frames per slot, the first of each never merges)."""
    hidden, types = video_states()
    similarity, order = ReleasedFrameFusion.compute_similarity_and_token_index_by_patch(hidden, types, 5)
    merged = torch.tensor(candidates, dtype=torch.long)
    released, released_keep = ReleasedFrameFusion.merge_tokens_and_get_mask(hidden.clone(), similarity, order, merged)
    ours = hidden[0].clone()
    rows = merge_runs(ours, order[0], merged)
    assert torch.equal(rows, released_keep[0].nonzero().flatten())
    assert torch.equal(ours, released[0])


def test_a_merged_token_is_the_uniform_mean_of_its_run_and_the_token_before_it():
    hidden = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # one slot over 6 frames, in frame order
    rows = merge_runs(hidden, torch.arange(6), torch.tensor([1, 2, 4]))
    assert rows.tolist() == [0, 3, 5]
    assert hidden[0].tolist() == [2.0, 3.0] and hidden[3].tolist() == [7.0, 8.0] and hidden[5].tolist() == [10.0, 11.0]


def test_pruning_attention_and_the_kept_rows_are_the_releases_bit_for_bit_in_bf16():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 4, 40, 16, generator=generator).bfloat16()
    key = torch.randn(1, 2, 40, 16, generator=generator).bfloat16()
    released = released_scaled_dot_product_attention(query, repeat_kv(key, 2), None, num=1, is_causal=True)
    ours = last_query_attention(query, key)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, torch.mean(released, dim=(1, 2))[0])
    start, visual, ratio = 5, 30, 0.62
    top = ours[start : start + visual].topk(round(visual * (1 - ratio))).indices + start
    keep = torch.cat((torch.arange(start), top, torch.arange(start + visual, 40))).sort().values
    assert torch.equal(prune_rows(ours, start, visual, ratio), keep) and keep.numel() == 40 - 30 + 11


def test_each_frame_slot_is_its_place_in_the_frame_and_each_row_newline_its_own_on_llava_video():
    video = VideoLayout(2, 2, 2, "row_end", "llava_video")
    assert frame_slots(video).tolist() == [0, 1, 2, 3, 4, 5] * 2
    onevision = VideoLayout(2, 2, 2, "video_end", "llava_onevision")  # the port: the video's one newline its own slot
    assert frame_slots(onevision).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]


WALKS = {  # on `video_states(8 frames, 6 slots)`: which branches each setting takes
    "top_k_at_once": {},
    "top_k_at_a_higher_cost": {"cost": 0.6},
    "merge_stop_prune": {"similarity_lower_bound": 0.9},
    "three_merges_then_prune": {"similarity_lower_bound": 0.9, "ratio_lower_bound": 0.04},
}


@pytest.mark.parametrize("settings", WALKS.values(), ids=WALKS.keys())
def test_the_per_sample_walk_is_the_releases_forward_step_for_step_in_bf16(settings):
    """Fresh states at every call (as layers would give), the last query's weights when pruning: same rows, same states."""
    released = ReleasedFrameFusion(**settings)
    stage = FrameFusion(**settings)
    hidden, types = video_states(frames=8, slots=6, seed=2)
    length = hidden.shape[1]
    released.prepare(types.clone(), 6, torch.tensor([3]), torch.tensor([3 + 48 - 1]), 48, length)
    state = stage.new_fuser(VideoLayout(8, 2, 3, "none", "llava_video"), 3, length, 28)
    state.slots = types[0].clone()  # these states' slot layout (six slots, no newlines)
    generator = torch.Generator().manual_seed(3)
    for call in range(6):
        hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=generator).bfloat16() * (call > 0)
        weights = None
        if state.wants_attention:
            weights = torch.rand(1, 4, 1, hidden.shape[1], generator=generator).bfloat16()
        ours = hidden[0].clone()
        rows = state.step(ours, None if weights is None else torch.mean(weights, dim=(1, 2))[0])
        expected, _, _ = released(hidden.clone(), [torch.zeros(1, hidden.shape[1], 2)] * 2, None, weights)
        hidden = ours[None] if rows is None else ours[rows][None]
        assert torch.equal(hidden, expected)
        assert state.sparsities == released.sparsity_list
        assert (state.merging, state.pruning) == (not released.finish_merging, not released.finish_pruning)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"cost": 0.0}, "cost=0.0"),
        ({"cost": 1.5}, "cost=1.5"),
        ({"similarity_lower_bound": 1.2}, "similarity_lower_bound=1.2"),
        ({"ratio_lower_bound": -0.1}, "ratio_lower_bound=-0.1"),
        ({"mode": "exact"}, "official, paper"),
    ],
)
def test_bad_settings_fail_at_config_time_naming_the_value(settings, message):
    with pytest.raises(ConfigError, match=message):
        FrameFusion(**settings)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_qwen_family_is_refused_in_one_line_naming_it_and_an_alternative(family):
    with pytest.raises(ConfigError, match=rf"the '{family}' model family has no released FrameFusion .* choose fastv") as error:
        instantiate_method("framefusion").validate_for(ModelInfo(layers=28, signals=frozenset(), family=family))
    assert "\n" not in str(error.value)


def test_the_config_is_the_releases_defaults():
    assert instantiate_method("framefusion") == FrameFusion(cost=0.3, similarity_lower_bound=0.6, ratio_lower_bound=0.1)


def test_a_shortened_cache_layer_reports_the_prompts_length():
    layer = ShortenedLayer(10)
    layer.update(torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4))
    layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    assert layer.get_seq_length() == 11 and layer.keys.shape[-2] == 7


# --- through the model ----------------------------------------------------------------------------------------------

FRAMES = 16
GREEDY = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "output_logits": True, "return_dict_in_generate": True}


@pytest.fixture(scope="module")
def noise():
    """Noise frames: the tiny tower's tokens then differ enough from frame to frame for merging to go on past one step."""
    return np.random.default_rng(0).integers(0, 256, size=(FRAMES, 64, 64, 3), dtype=np.uint8)


LAYOUTS = {"llava_onevision": None, "llava_video": "llava_video"}  # the tiny checkpoint under each adapter


@pytest.fixture(scope="module")
def lms(tiny_checkpoint):
    """The tiny model under LLaVA-OneVision's layout (the port) and LLaVA-Video's (the release's)."""
    return {
        family: CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=FRAMES, device="cpu", adapter=adapter)
        for family, adapter in LAYOUTS.items()
    }


def hooks(model) -> dict[str, set[int]]:
    return {name: set(m._forward_pre_hooks) | set(m._forward_hooks) for name, m in model.named_modules()}


def run(lm, method, video, reference=False):
    lm.method = method
    if reference:
        lm.compressor = Compressor(lm.adapter, method, reference=True)
    record = SampleRecord("t", 0)
    output, _ = lm.run_sample(video, "What moves?", dict(GREEDY), record, "t/0")
    return output, record


SETTINGS = {  # on the noise video: a merge, then the top-k branch ends it; merges (once or twice) then a prune
    "bound_0.6": {"similarity_lower_bound": 0.6},
    "bound_0.95": {"similarity_lower_bound": 0.95},
    "paper_bound_0.8": {"similarity_lower_bound": 0.8, "mode": "paper"},
}
OFFICIAL = {name: settings for name, settings in SETTINGS.items() if "mode" not in settings}  # the release's 28 layers


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.parametrize("family", LAYOUTS)
def test_dropping_mid_layer_gives_the_masked_references_logits_and_leaves_the_model_as_it_found_it(lms, noise, family, settings):
    any_lm = lms[family]
    method = FrameFusion(**settings)
    before = hooks(any_lm.model)
    fast, fast_record = run(any_lm, method, noise)
    reference, reference_record = run(any_lm, method, noise, reference=True)
    assert fast_record.method_stats == reference_record.method_stats
    assert fast_record.prefill_visual_by_layer == reference_record.prefill_visual_by_layer
    assert fast_record.visual_tokens_by_stage == reference_record.visual_tokens_by_stage
    for fast_step, reference_step in zip(fast.logits, reference.logits, strict=True):
        torch.testing.assert_close(fast_step, reference_step, atol=1e-4, rtol=0)
    visual = any_lm.adapter.layout(FRAMES).full_tokens
    counts = fast_record.prefill_visual_by_layer
    assert counts == sorted(counts, reverse=True) and counts[-1] < visual
    assert fast_record.decode_visual_by_layer == [float(n) for n in counts]  # each layer decodes over what it cached
    assert hooks(any_lm.model) == before


def test_the_llava_video_run_merges_twice_then_prunes_at_the_next_layer(lms, noise):
    _, record = run(lms["llava_video"], FrameFusion(similarity_lower_bound=0.95), noise)
    stats = record.method_stats
    assert stats["framefusion_merge_steps"] == 2 and len(stats["framefusion_sparsities"]) == 2
    assert stats["framefusion_sparsities"][-1] < 0.1 and stats["framefusion_prune_ratio"] > 0
    entered, after_layer_0, *rest = record.prefill_visual_by_layer
    assert entered > after_layer_0 > rest[0] == rest[-1] == record.visual_tokens_by_stage["framefusion"]


def test_a_model_loaded_eager_drops_and_masks_with_the_eager_kernel(tiny_checkpoint, noise):
    """Eager materialises the mask in prefill and at every decode step: both are narrowed to the keys each layer holds."""
    eager = CompressedVideoLM(
        pretrained=str(tiny_checkpoint), frames=FRAMES, device="cpu", adapter="llava_video", attn_implementation="eager"
    )
    method = FrameFusion(similarity_lower_bound=0.95)
    fast, fast_record = run(eager, method, noise)
    reference, reference_record = run(eager, method, noise, reference=True)
    assert fast_record.method_stats == reference_record.method_stats and fast_record.method_stats["attention_kernel"] == "eager"
    for fast_step, reference_step in zip(fast.logits, reference.logits, strict=True):
        torch.testing.assert_close(fast_step, reference_step, atol=1e-4, rtol=0)


def test_the_plan_spends_cost_over_the_budgets_layers():
    layout = VideoLayout(32, 14, 14, "video_end", "llava_onevision")
    plan = FrameFusion(cost=0.25).plan(PlannedCounts.full(layout, 28))
    assert plan.prefill[0] == 32 * 196 and plan.prefill == plan.decode
    assert sum(plan.prefill) / 28 == pytest.approx(0.25 * 32 * 196)
    assert FrameFusion(cost=0.25).planned_retained_ratio(PlannedCounts.full(layout, 28)) == pytest.approx(0.25)
    shallow = FrameFusion(cost=0.25).plan(PlannedCounts.full(layout, 24))  # official: 28 layers' shares on 24
    assert shallow.prefill[1:] == plan.prefill[1:24]
    assert sum(FrameFusion(cost=0.25, mode="paper").plan(PlannedCounts.full(layout, 24)).prefill) / 24 == pytest.approx(
        0.25 * 32 * 196
    )


def released_prefill_logits(lm, hidden, position_embeddings, mask, framefusion):
    """modeling_qwen2.py:44-86 and 166-177 on the tiny model's own modules: merge at layer 0's entry, then after every
    attention's residual add; the pruning weights from the released helper on that layer's query and keys."""
    decoder = lm.adapter.language_model
    position_embeddings = list(position_embeddings)
    captured = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        if (query.shape[2] > 1) and framefusion.finish_merging and (not framefusion.finish_pruning):
            key_states = repeat_kv(key, module.num_key_value_groups)
            captured["weights"] = released_scaled_dot_product_attention(query, key_states, value, num=1, is_causal=True)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    with routed_attention(decoder, "released_framefusion", attention), torch.inference_mode():
        for layer in decoder.layers:
            if layer.self_attn.layer_idx == 0:
                hidden, position_embeddings, mask = framefusion(hidden, position_embeddings, mask)
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            hidden, _ = layer.self_attn(hidden_states=hidden, position_embeddings=tuple(position_embeddings), attention_mask=mask)
            hidden = residual + hidden
            hidden, position_embeddings, mask = framefusion(hidden, position_embeddings, mask, captured.pop("weights", None))
            residual = hidden
            hidden = layer.post_attention_layernorm(hidden)
            hidden = layer.mlp(hidden)
            hidden = residual + hidden
        hidden = decoder.norm(hidden)
        return lm.model.lm_head(hidden[:, -1:, :])[0, -1], hidden.shape[1]


@pytest.mark.parametrize("settings", OFFICIAL.values(), ids=OFFICIAL.keys())
@pytest.mark.parametrize("family", LAYOUTS)
def test_the_prefill_logits_are_the_released_decoder_flows_bit_for_bit(lms, noise, family, settings):
    """fp32 on the CPU: the hooks' merges, drops and prune give exactly the logits of the release's own layer code."""
    any_lm = lms[family]
    entering = {}

    def capture(module, args, kwargs):
        if args[0].shape[1] > 1:
            entering.update(hidden=args[0].clone(), cos_sin=kwargs["position_embeddings"], mask=kwargs.get("attention_mask"))

    handle = any_lm.adapter.language_model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        run(any_lm, instantiate_method("full"), noise)
    finally:
        handle.remove()
    fast, record = run(any_lm, FrameFusion(**settings), noise)
    layout = any_lm.adapter.layout(FRAMES)
    prompt_length = entering["hidden"].shape[1]
    start = int((fast.sequences[0] == any_lm.model.config.video_token_id).nonzero()[0])
    released = ReleasedFrameFusion(**settings)
    patch_type, patch_num = released_patch_type(layout, start, prompt_length)
    end = start + layout.full_tokens - 1
    released.prepare(patch_type, patch_num, torch.tensor([start]), torch.tensor([end]), layout.full_tokens, prompt_length)
    logits, length = released_prefill_logits(any_lm, entering["hidden"], entering["cos_sin"], entering["mask"], released)
    assert torch.equal(fast.logits[0][0], logits)
    assert length == prompt_length - layout.full_tokens + record.visual_tokens_by_stage["framefusion"]


def test_framefusion_runs_alone():
    class WithRandom(FrameFusion):
        def stages(self):
            return [RandomTokens(ratio=0.5), self]

    with pytest.raises(ConfigError, match="a mid-layer stage works on every video token and runs alone"):
        Compressor(None, WithRandom())


def test_the_slots_built_on_the_host_follow_the_states_to_their_device():
    """The release moves its patch types to the states' device ("align devices"); a CUDA model would otherwise index
    host slots with device rows. The meta device stands in for an accelerator here."""
    state = FrameFusion().new_fuser(VideoLayout(8, 2, 3, "none", "llava_video"), 3, 3 + 48 + 4, 28)
    assert state.slots.device.type == "cpu"
    state.merging = state.pruning = False  # a layer after FrameFusion is done: nothing is read
    assert state.step(torch.empty(3 + 48 + 4, 16, device="meta")) is None
    assert state.slots.device.type == "meta"
