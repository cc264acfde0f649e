"""PruMerge adapted to SigLIP: adaptive IQR count, neighbour merging, scores from the encoder's attention."""

import pytest
import torch

from dycoke_eval.config import ConfigError
from dycoke_eval.methods.prumerge import PruMerge, iqr_outlier_count, merge_into_kept, prumerge_frame, uniform_samples
from dycoke_eval.offline.tiny_model import build_tiny_checkpoint
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.wrapper import LlavaOneVisionCompressed, SampleRecord


def test_the_keep_count_is_the_number_of_iqr_outliers_and_at_least_one():
    scores = torch.cat([torch.linspace(0, 1, 20), torch.tensor([10.0, 12.0])])
    assert iqr_outlier_count(scores) == 2
    assert iqr_outlier_count(torch.ones(16)) == 1


def test_prumerge_plus_adds_a_uniform_grid_that_skips_tokens_already_kept():
    samples = uniform_samples(24, kept=torch.tensor([0, 5]))  # ratio 1/12 -> stride int(12/3) = 4
    assert samples.tolist() == [4, 8, 12, 16, 20]


def test_each_kept_token_absorbs_its_nearest_pruned_tokens_weighted_by_score():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    scores = torch.tensor([0.4, 0.3, 0.2, 0.1])
    merged = merge_into_kept(features, scores, keys, kept=torch.tensor([0, 1]), neighbours=1)
    assert torch.allclose(merged, torch.tensor([[1.0 + 0.2 * 2.0, 0.0], [0.0, 1.0 + 0.1 * 3.0]]))


def test_a_frame_keeps_its_top_scoring_tokens_in_spatial_order():
    scores = torch.zeros(16)
    scores[[3, 9]] = torch.tensor([5.0, 4.0])
    features = torch.arange(16.0)[:, None].expand(16, 2).clone()
    kept = prumerge_frame(features, scores, torch.randn(16, 4), "base", neighbours=0)
    assert kept[:, 0].tolist() == [3.0, 9.0]
    assert len(prumerge_frame(features, scores, torch.randn(16, 4), "plus")) > 2


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return LlavaOneVisionCompressed(pretrained=str(tiny_checkpoint), frames=8, device="cpu", method=PruMerge())


def test_scores_are_the_attention_each_patch_receives_at_the_feature_layer_pooled_like_the_features(lm):
    video = synthetic_frames("prumerge")[:8]
    record = SampleRecord("t", 0)
    lm.run_sample(video, "What moves?", {"max_new_tokens": 1}, record)
    pixels = lm.processor.video_processor(videos=[video], return_tensors="pt")["pixel_values_videos"][0]
    tower = lm.model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        attentions = tower(pixels, output_attentions=True).attentions[-1]  # [frames, heads, P, P]
    finally:
        tower.set_attn_implementation("sdpa")
    expected = lm.model.model.apply_pooling(attentions.mean(dim=(1, 2)).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lm.method._captured["scores"], expected, atol=1e-5, rtol=1e-4)
    stats = record.method_stats
    assert record.visual_tokens_in == stats["prumerge_tokens_out"] + 1
    assert stats["retained_ratio"] == stats["prumerge_tokens_out"] / (8 * 16) < 1


def test_the_pooling_head_score_needs_a_tower_that_kept_its_head(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="vision_use_head=false"):
        LlavaOneVisionCompressed(pretrained=str(tiny_checkpoint), device="cpu", method=PruMerge(score_source="pooling_head"))
    with_head = build_tiny_checkpoint(tmp_path / "with-head", vision_use_head=True)
    lm = LlavaOneVisionCompressed(pretrained=str(with_head), frames=4, device="cpu", method=PruMerge(score_source="pooling_head"))
    record = SampleRecord("t", 0)
    lm.run_sample(synthetic_frames("head")[:4], "What moves?", {"max_new_tokens": 1}, record)
    assert 0 < record.method_stats["prumerge_tokens_out"] < 4 * 16


@pytest.mark.parametrize("settings, message", [({"variant": "plus2"}, "base, plus"), ({"score_source": "cls"}, "mean_received")])
def test_bad_prumerge_settings_fail_at_config_time(settings, message):
    with pytest.raises(ConfigError, match=message):
        PruMerge(**settings)
