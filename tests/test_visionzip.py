"""VisionZip in FastVID's two Table 1 forms: after pooling (FastVID's baseline) and in the encoder (the original).

The selection and the contextual sums are checked against a literal transcription of the released
`visionzip/clip_encoder.py` arithmetic, adapted to SigLIP's missing CLS token as HoliTom's port does.
"""

import pytest
import torch
from layouts import layout, tokens_of

from dycoke_eval.compression.stages import PlannedCounts
from dycoke_eval.config import ConfigError, instantiate_method
from dycoke_eval.methods.visionzip import (
    VisionZip,
    contextual_merge,
    contextual_targets,
    dominant_indices,
    frame_split,
    kept_per_frame,
    key_head_mean,
    patch_cells,
    visionzip_frames,
)
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.wrapper import CompressedVideoLM, SampleRecord


def released_visionzip(hidden_states, attention, metric, dominant_num, contextual_num):
    """clip_encoder.py:43-85 (dvlab-research/VisionZip@3151f6d), batch = frames, with no CLS token: the scores are
    `attention` [B, N] (HoliTom's SigLIP port) and `dominant_num` counts patches only. `metric`: key head mean."""
    batch, tokens, dim = hidden_states.shape
    topk_indices = attention.topk(dominant_num, dim=1).indices
    all_indices = topk_indices
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(batch, dominant_num, dim)
    metric_filtered = metric[mask].view(batch, tokens - dominant_num, metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(batch, tokens - dominant_num, dim)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(
        tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype
    )
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1]), target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1)


def expected_index(scores: torch.Tensor, dominant: int, contextual: int) -> list[list[int]]:
    """Per frame: the top `dominant` by score in ascending order, then the targets among the rest, written out."""
    out = []
    for frame in scores.tolist():
        top = sorted(sorted(range(len(frame)), key=lambda i: -frame[i])[:dominant])
        rest = [i for i in range(len(frame)) if i not in top]
        step = max(1, len(rest) // contextual) if contextual else 1
        out.append(top + rest[::step][:contextual])
    return out


def signals(frames: int, tokens: int, dim: int = 6, heads: int = 2, head_dim: int = 3, seed: int = 0):
    """Random features [F, N, D], scores [F, N] and per-head keys [F, N, H, d]."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(frames, tokens, dim, generator=generator)
    scores = torch.rand(frames, tokens, generator=generator)
    keys = torch.randn(frames, tokens, heads, head_dim, generator=generator)
    return features, scores, keys


def test_dominant_tokens_are_the_top_scores_in_ascending_index_order():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.7], [0.5, 0.1, 0.6, 0.2, 0.3]])
    assert dominant_indices(scores, 3).tolist() == [[1, 3, 4], [0, 2, 4]]


def test_a_dominant_share_of_one_keeps_only_the_top_tokens_where_the_released_code_divides_by_zero():
    features, scores, keys = signals(2, 16)
    stage = VisionZip(dominant_share=1.0, key_heads=2)  # S = 4 dominant, 0 contextual
    out = stage.select(tokens_of(features, 4, 4), {"attention_received": scores, "keys": keys.flatten(2)}, "")
    assert out.index.tolist() == [i + 16 * f for f, frame in enumerate(expected_index(scores, 4, 0)) for i in frame]
    assert out.figures["visionzip_contextual"] == 0


@pytest.mark.parametrize(
    "remaining, count, targets",
    [(10, 3, [0, 3, 6]), (7, 3, [0, 2, 4]), (5, 5, [0, 1, 2, 3, 4]), (4, 3, [0, 1, 2]), (155, 8, list(range(0, 152, 19)))],
)
def test_contextual_targets_sit_at_every_step_th_remaining_token_the_first_n_of_them(remaining, count, targets):
    assert contextual_targets(remaining, count).tolist() == targets  # step = max(1, remaining // count)


def test_each_contextual_token_is_its_target_plus_the_mean_of_the_tokens_assigned_to_it():
    # Remaining tokens 0..4 of one frame; targets 0 and 3. Keys: 1, 2 point like 0; 4 points like 3.
    features = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 3.0]]])
    keys = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0]]])
    targets = torch.tensor([0, 3])
    official = contextual_merge(features, keys, targets, "official")
    assert official.tolist() == [[[1.0 + (2.0 + 4.0) / 2, 0.0], [0.0, 1.0 + 3.0]]]  # a sum, not an average (quirk)
    mean = contextual_merge(features, keys, targets, "mean")
    torch.testing.assert_close(mean, torch.tensor([[[(1.0 + 2.0 + 4.0) / 3, 0.0], [0.0, (1.0 + 3.0) / 2]]]))


def test_a_target_with_nothing_assigned_stays_as_it_is():
    features = torch.tensor([[[1.0, 0.0], [5.0, 0.0], [0.0, 7.0]]])
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]])  # token 2 is a target; token 1 goes to target 0
    merged = contextual_merge(features, keys, torch.tensor([0, 2]), "official")
    assert merged.tolist() == [[[1.0 + 5.0, 0.0], [0.0, 7.0]]]


@pytest.mark.parametrize(
    "tokens, dominant, contextual", [(16, 3, 1), (16, 2, 2), (49, 8, 4), (196, 24, 5), (169, 35, 7), (196, 0, 19)]
)
def test_the_tokens_and_their_order_equal_the_released_arithmetic(tokens, dominant, contextual):
    features, scores, keys = signals(3, tokens, seed=tokens + dominant)
    kept, index = visionzip_frames(features, scores, key_head_mean(keys.flatten(2), 2), dominant, contextual, "official")
    torch.testing.assert_close(kept, released_visionzip(features, scores, keys.mean(dim=2), dominant, contextual))
    assert index.tolist() == expected_index(scores, dominant, contextual)


def test_the_metric_is_the_key_head_mean_of_the_captured_concatenated_keys():
    keys = torch.arange(12.0).view(1, 1, 12)  # heads of 3: [0 1 2], [3 4 5], [6 7 8], [9 10 11]
    assert key_head_mean(keys, 4).tolist() == [[[4.5, 5.5, 6.5]]]
    with pytest.raises(ConfigError, match="key_heads=5 does not divide the keys' width 12"):
        key_head_mean(keys, 5)


def test_every_dominant_token_carries_its_own_grid_position_not_holitoms_score_ordered_one():
    tokens = 16
    features = torch.arange(2 * tokens, dtype=torch.float32).view(2, tokens, 1).expand(-1, -1, 2).contiguous()
    scores = torch.rand(2, tokens, generator=torch.Generator().manual_seed(1))
    stage = VisionZip(retention=0.5, key_heads=1)  # S = 8: 6 dominant + 2 contextual
    out = stage.select(tokens_of(features, 4, 4), {"attention_received": scores, "keys": torch.randn(2, tokens, 4)}, "")
    dominant = torch.cat([torch.arange(6), torch.arange(8, 14)])
    assert out.features[dominant, 0].long().tolist() == out.index[dominant].tolist()  # feature value = its flat position


# S = int(R * N) per frame, split int(S * 54/64) dominant + the rest; written out: OV 196 -> 49 = 41+8, 39 = 32+7,
# 29 = 24+5, 19 = 16+3; LLaVA-Video 169 -> 42 = 35+7, 16 = 13+3.
COUNTS = [(196, 0.25, 49, 41, 8), (196, 0.20, 39, 32, 7), (196, 0.15, 29, 24, 5), (196, 0.10, 19, 16, 3)]
COUNTS += [(169, 0.25, 42, 35, 7), (169, 0.10, 16, 13, 3)]


@pytest.mark.parametrize("tokens, retention, kept, dominant, contextual", COUNTS)
def test_each_frame_keeps_int_r_n_tokens_split_54_to_10(tokens, retention, kept, dominant, contextual):
    assert (kept, dominant, contextual) == (int(retention * tokens), int(int(retention * tokens) * 54 / 64), kept - dominant)
    assert kept_per_frame(tokens, retention) == kept and frame_split(kept, 54 / 64) == (dominant, contextual)
    side = {196: 14, 169: 13}[tokens]
    frames = 4
    features, scores, keys = signals(frames, tokens, seed=kept)
    stage = VisionZip(retention=retention, key_heads=2)
    out = stage.select(tokens_of(features, side, side), {"attention_received": scores, "keys": keys.flatten(2)}, "")
    assert out.features.shape == (frames * kept, features.shape[-1])
    assert out.figures == {
        "visionzip_tokens_in": frames * tokens,
        "visionzip_dominant": frames * dominant,
        "visionzip_contextual": frames * contextual,
    }
    expected = torch.tensor(expected_index(scores, dominant, contextual)) + torch.arange(frames)[:, None] * tokens
    assert out.index.tolist() == expected.flatten().tolist()  # [dominant asc, contextual] per frame, never re-sorted
    planned = stage.planned_tokens(PlannedCounts.full(layout(32, side, side), layers=28))
    assert planned == 32 * kept


def test_frame_tokens_sets_s_itself_as_holitom_runs_it():
    stage = VisionZip(frame_tokens=50)  # HoliTom's 25%: 42 + 8
    assert frame_split(stage.kept_per_frame(196), stage.dominant_share) == (42, 8)
    with pytest.raises(ConfigError, match="frame_tokens=200: a frame has 196 tokens; choose 1 to 196"):
        VisionZip(frame_tokens=200).kept_per_frame(196)


def test_patches_map_to_the_pooled_cell_at_the_same_relative_place():
    # 7x7 patches onto 4x4 cells: patch row r -> r * 4 // 7 = 0 0 1 1 2 2 3, the same for columns.
    cells = patch_cells(49, 4, 4).view(7, 7)
    along = [0, 0, 1, 1, 2, 2, 3]
    assert cells.tolist() == [[4 * r + c for c in along] for r in along]
    for rows, in_range in [(14, range(196)), (13, range(169))]:  # 27x27 real patches onto OV's 14x14, Video's 13x13
        assert sorted(set(patch_cells(729, rows, rows).tolist())) == list(in_range)  # every cell reached, none outside
    with pytest.raises(ValueError, match="50 patches per frame do not form a square grid"):
        patch_cells(50, 4, 4)


def test_in_encoder_selects_among_the_unpooled_patches_and_returns_their_projected_features():
    frames, patches = 3, 49
    features, scores, keys = signals(frames, patches, dim=8, seed=7)
    grid = torch.randn(frames, 16, 8)  # the pooled 4x4 tokens the stage replaces
    stage = VisionZip(form="in_encoder", key_heads=2)  # S = int(0.25 * 16) = 4: 3 dominant + 1 contextual
    assert stage.needs() == {"patch_features", "patch_attention_received", "patch_keys"}
    patch_signals = {"patch_features": features, "patch_attention_received": scores, "patch_keys": keys.flatten(2)}
    out = stage.select(tokens_of(grid, 4, 4), patch_signals, "")
    expected = released_visionzip(features, scores, keys.mean(dim=2), 3, 1)
    torch.testing.assert_close(out.features, expected.reshape(-1, 8))
    cells = patch_cells(49, 4, 4)
    where = [[int(cells[i]) + 16 * f for i in frame] for f, frame in enumerate(expected_index(scores, 3, 1))]
    assert out.index.tolist() == sum(where, [])
    assert out.figures == {"visionzip_tokens_in": 3 * 49, "visionzip_dominant": 3 * 3, "visionzip_contextual": 3 * 1}
    assert stage.planned_tokens(PlannedCounts.full(layout(3, 4, 4), layers=8)) == 3 * 4


def test_the_form_picks_the_signals_and_positions_stay_consecutive():
    assert VisionZip().needs() == {"attention_received", "keys"}
    assert VisionZip(score="probe_attention").needs() == {"probe_attention", "keys"}
    assert not VisionZip().keeps_positions() and not VisionZip(form="in_encoder").keeps_positions()


def test_the_config_is_the_after_pooling_baseline_at_25_percent():
    method = instantiate_method("visionzip")
    assert method == VisionZip()
    assert method.describe() == {
        "name": "visionzip",
        "form": "after_pooling",
        "retention": 0.25,
        "frame_tokens": None,
        "dominant_share": 54 / 64,
        "score": "attention_received",
        "key_heads": 16,
        "merge": "official",
    }
    assert instantiate_method("visionzip", {"method.form": "in_encoder", "method.retention": 0.1}).form == "in_encoder"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"form": "before"}, "form='before'; use one of after_pooling, in_encoder"),
        ({"retention": 0.0}, "retention=0.0"),
        ({"retention": 1.5}, "retention=1.5"),
        ({"frame_tokens": 0}, "frame_tokens=0"),
        ({"dominant_share": 1.2}, "dominant_share=1.2"),
        ({"score": "cls"}, "score='cls'; use one of attention_received, probe_attention"),
        ({"form": "in_encoder", "score": "probe_attention"}, "form=in_encoder uses score=attention_received"),
        ({"key_heads": 0}, "key_heads=0"),
        ({"merge": "sum"}, "merge='sum'; use one of official, mean"),
    ],
)
def test_bad_settings_fail_at_config_time_naming_the_value(settings, message):
    with pytest.raises(ConfigError, match=message):
        VisionZip(**settings)


def test_a_retention_that_keeps_nothing_fails_naming_the_smallest_that_works():
    with pytest.raises(
        ConfigError, match=r"retention=0.05 keeps int\(0.05 \* 16\) = 0 tokens per frame; choose retention >= 0.0625"
    ):
        VisionZip(retention=0.05).planned_tokens(PlannedCounts.full(layout(4, 4, 4), layers=8))


def test_on_the_tiny_model_the_llm_reads_the_tokens_in_the_order_the_stage_gives(tiny_checkpoint):
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", method=VisionZip(key_heads=2))
    encoded = lm.encode_video(synthetic_frames("visionzip")[:8], SampleRecord("t", 0))
    tokens = lm.compressor.select(encoded, "t/0").tokens
    signals = encoded.signals
    kept, where = visionzip_frames(
        encoded.grid, signals["attention_received"], key_head_mean(signals["keys"], 2), 3, 1, "official"
    )
    assert torch.equal(tokens.features, kept.reshape(-1, kept.shape[-1]))
    assert torch.equal(tokens.index, (where + torch.arange(8)[:, None] * 16).flatten())
    visual, _ = lm.adapter.assemble(encoded, tokens.features, tokens.index)
    assert torch.equal(visual[:-1], tokens.features) and torch.equal(visual[-1], encoded.newline)  # not re-sorted
