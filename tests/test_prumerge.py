"""PruMerge on SigLIP: adaptive IQR count, neighbour merging, scores from the encoder's attention.

`mode: adapted` is checked against the per-frame code it replaced, kept literally here; `mode: official` against a
literal transcription of the released per-image functions.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layouts import tokens_of

from dycoke_eval.config import ConfigError
from dycoke_eval.methods.prumerge import (
    VARIANTS,
    PruMerge,
    adapted_selection,
    iqr_outlier_counts,
    iqr_outliers,
    keep_counts,
    merge_into_kept,
    official_grid,
    official_keep_count,
    official_merge,
    official_selection,
    prumerge_adapted,
    prumerge_official,
    pruned_remainder,
    top_scoring,
)
from dycoke_eval.offline.tiny_model import build_tiny_checkpoint
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.plumbing.counting import count_ops
from dycoke_eval.wrapper import CompressedVideoLM, SampleRecord


def test_the_keep_count_is_the_number_of_iqr_outliers_and_at_least_one():
    scores = torch.cat([torch.linspace(0, 1, 20), torch.tensor([10.0, 12.0])])
    assert keep_counts(scores[None]).tolist() == [2]
    assert keep_counts(torch.ones(1, 16)).tolist() == [1]


def test_prumerge_plus_adds_a_uniform_grid_that_skips_tokens_already_kept():
    scores = torch.zeros(1, 24)
    scores[0, [0, 5]] = torch.tensor([2.0, 1.0])  # two outliers: ratio 1/12 -> stride int(12/3) = 4
    samples = adapted_selection(scores, "plus") & ~adapted_selection(scores, "base")
    assert samples[0].nonzero().flatten().tolist() == [4, 8, 12, 16, 20]


def test_each_kept_token_absorbs_its_nearest_pruned_tokens_weighted_by_score():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    scores = torch.tensor([0.4, 0.3, 0.2, 0.1])
    kept = torch.tensor([[True, True, False, False]])
    merged = merge_into_kept(features[None], scores[None], keys[None], kept, slots=torch.tensor([[0, 1]]), neighbours=1)
    assert torch.allclose(merged[0], torch.tensor([[1.0 + 0.2 * 2.0, 0.0], [0.0, 1.0 + 0.1 * 3.0]]))


def test_a_frame_keeps_its_top_scoring_tokens_in_spatial_order():
    scores = torch.zeros(1, 16)
    scores[0, [3, 9]] = torch.tensor([5.0, 4.0])
    features = torch.arange(16.0)[None, :, None].expand(1, 16, 2).clone()
    kept, index = prumerge_adapted(features, scores, torch.randn(1, 16, 4), "base", neighbours=0)
    assert kept[:, 0].tolist() == [3.0, 9.0] and index.tolist() == [3, 9]
    assert len(prumerge_adapted(features, scores, torch.randn(1, 16, 4), "plus")[0]) > 2


def test_equal_scores_at_the_keep_boundary_go_to_the_lower_index():
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    kept = top_scoring(scores, counts=torch.tensor([2, 1]))
    assert kept.tolist() == [[False, True, False, True, False, False], [True, False, False, False, False, False]]


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", method=PruMerge())


def test_scores_are_the_attention_each_patch_receives_at_the_feature_layer_pooled_like_the_features(lm):
    video = synthetic_frames("prumerge")[:8]
    record = SampleRecord("t", 0)
    encoded = lm.encode_video(video, SampleRecord("t", 0))
    lm.run_sample(video, "What moves?", {"max_new_tokens": 1}, record)
    pixels = lm.processor.video_processor(videos=[video], return_tensors="pt")["pixel_values_videos"][0]
    tower = lm.model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        attentions = tower(pixels, output_attentions=True).attentions[-1]  # [frames, heads, P, P]
    finally:
        tower.set_attn_implementation("sdpa")
    expected = lm.model.model.apply_pooling(attentions.mean(dim=(1, 2)).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(encoded.signals["attention_received"], expected, atol=1e-5, rtol=1e-4)
    stats = record.method_stats
    assert record.visual_tokens_in == stats["prumerge_tokens_out"] + 1 == record.visual_tokens_by_stage["prumerge"] + 1
    assert record.retained_ratio == (stats["prumerge_tokens_out"] + 1) / (8 * 16 + 1) < 1  # every layer, every pass


def test_official_mode_runs_in_the_model_with_one_extra_token_per_frame(tiny_checkpoint):
    method = PruMerge(mode="official", variant="plus")
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", method=method)
    record = SampleRecord("t", 0)
    video = synthetic_frames("official")[:8]
    scores = lm.encode_video(video, SampleRecord("t", 0)).signals["attention_received"]
    lm.run_sample(video, "What moves?", {"max_new_tokens": 1}, record)
    _, new = official_selection(scores, "plus")  # 16 tokens a frame: each merges all 15 others
    assert record.method_stats["prumerge_tokens_out"] == int(new.sum()) + 8 == record.visual_tokens_in - 1


def test_the_pooling_head_score_needs_a_tower_that_kept_its_head(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="vision_use_head=false"):
        CompressedVideoLM(pretrained=str(tiny_checkpoint), device="cpu", method=PruMerge(score_source="pooling_head"))
    with_head = build_tiny_checkpoint(tmp_path / "with-head", vision_use_head=True)
    lm = CompressedVideoLM(pretrained=str(with_head), frames=4, device="cpu", method=PruMerge(score_source="pooling_head"))
    record = SampleRecord("t", 0)
    lm.run_sample(synthetic_frames("head")[:4], "What moves?", {"max_new_tokens": 1}, record)
    assert 0 < record.method_stats["prumerge_tokens_out"] < 4 * 16


@pytest.mark.parametrize(
    "settings, message",
    [({"variant": "plus2"}, "base, plus"), ({"score_source": "cls"}, "mean_received"), ({"mode": "paper"}, "adapted, official")],
)
def test_bad_prumerge_settings_fail_at_config_time(settings, message):
    with pytest.raises(ConfigError, match=message):
        PruMerge(**settings)


# --- mode: adapted, all frames at once --------------------------------------------------------------------------------
# The per-frame code the batched functions replaced, kept literally (only names changed) as their reference.


def frame_iqr_outliers(scores: torch.Tensor) -> int:
    """How many of all the scores lie above Q3 + 1.5 IQR; float32 quartiles, as numpy gives the released code."""
    flat = scores.float().flatten()
    q1, q3 = torch.quantile(flat, torch.tensor([0.25, 0.75], device=flat.device))
    return int((flat > q3 + 1.5 * (q3 - q1)).sum())


def frame_keep_count(scores: torch.Tensor) -> int:
    """The adapted keep count of one frame: its IQR outliers, at least one."""
    return max(1, frame_iqr_outliers(scores))


def frame_uniform_samples(tokens: int, kept: torch.Tensor) -> torch.Tensor:
    """PruMerge+'s extra tokens: a stride of int(int(1/ratio)/3) over the grid, minus those already kept."""
    stride = max(1, int(int(tokens / kept.numel()) / 3))
    grid = torch.arange(0, tokens - 1, stride, device=kept.device)
    return grid[~torch.isin(grid, kept)]


def frame_merge(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor, neighbours: int = 32
) -> torch.Tensor:
    """Each kept token plus the score-weighted sum of its nearest pruned tokens (cosine over keys)."""
    pruned = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    pruned[kept] = False
    if not pruned.any():
        return features[kept]
    others = pruned.nonzero().flatten()
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    nearest = (unit[kept] @ unit[others].T).topk(min(neighbours, others.numel()), dim=-1).indices  # [kept, k]
    weights = torch.zeros(kept.numel(), others.numel(), device=features.device)
    weights.scatter_(1, nearest, scores[others].float()[nearest])
    return (features[kept].float() + weights @ features[others].float()).to(features.dtype)


def prumerge_frame(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, variant: str, neighbours: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] features, [N] scores, [N, Dk] keys of one frame -> its kept, merged tokens in spatial order, and their indices."""
    kept = scores.topk(frame_keep_count(scores)).indices
    if variant == "plus":
        kept = torch.cat([kept, frame_uniform_samples(scores.numel(), kept)])
    kept = kept.sort().values
    return frame_merge(features, scores, keys, kept, neighbours), kept


def frame_by_frame(features, scores, keys, variant, neighbours=32):
    """What the stage returned when it looped over frames."""
    frames = [prumerge_frame(f, s, k, variant, neighbours) for f, s, k in zip(features, scores, keys, strict=True)]
    index = torch.cat([where + i * scores.shape[1] for i, (_, where) in enumerate(frames)])
    return torch.cat([merged for merged, _ in frames]), index


def video_with_outliers(seed: int, frames: int = 16, tokens: int = 49, dim: int = 64, exact: bool = False):
    """[F, N] scores with `f % 6` planted outliers in frame f (none in frame 0) and no equal scores, [F, N, 16] keys,
    [F, N, D] features. `exact`: dyadic scores and small integer features, so every merge sum is exact in float32 and
    equal in any order."""
    g = torch.Generator().manual_seed(seed)
    if exact:
        scores = torch.stack([torch.randperm(tokens, generator=g) + 1 for _ in range(frames)]) / 256
        features = torch.randint(-8, 9, (frames, tokens, dim), generator=g).float()
    else:
        scores = torch.rand(frames, tokens, generator=g)
        features = torch.randn(frames, tokens, dim, generator=g)
    for frame in range(frames):
        planted = torch.randperm(tokens, generator=g)[: frame % 6]
        scores[frame, planted] += 2 + scores[frame, planted]
    return scores, torch.randn(frames, tokens, 16, generator=g), features


def test_the_planted_outlier_counts_differ_by_frame_and_frame_0_has_none():
    scores, _, _ = video_with_outliers(0, exact=True)
    assert iqr_outlier_counts(scores).tolist() == [frame % 6 for frame in range(16)]
    assert keep_counts(scores).tolist() == [max(1, frame % 6) for frame in range(16)]


@pytest.mark.parametrize("neighbours", [32, 4])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_all_frames_at_once_equal_each_frame_alone_exactly_where_the_sums_are_exact(seed, variant, neighbours):
    scores, keys, features = video_with_outliers(seed, exact=True)
    merged, index = prumerge_adapted(features, scores, keys, variant, neighbours)
    expected, expected_index = frame_by_frame(features, scores, keys, variant, neighbours)
    assert torch.equal(index, expected_index) and torch.equal(merged, expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_frames_at_once_select_what_each_frame_alone_does_and_merge_to_the_last_bits(variant):
    scores, keys, features = video_with_outliers(2)
    merged, index = prumerge_adapted(features, scores, keys, variant)
    expected, expected_index = frame_by_frame(features, scores, keys, variant)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(merged, expected)  # BLAS rounds the padded product by its shape


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_adapted_selection_takes_at_most_150_kernels_and_4_waits_for_16_frames(variant):
    scores, keys, features = video_with_outliers(3)
    tokens = tokens_of(features, 7, 7)
    with count_ops() as counted:
        PruMerge(variant=variant).select(tokens, {"attention_received": scores, "keys": keys}, "")
    assert counted.counts.syncs <= 4 and counted.counts.ops <= 150


# --- mode: official --------------------------------------------------------------------------------------------------
# A literal transcription of the released code: 42Shawn/LLaVA-PruMerge @097c041 (Apache-2.0),
# llava/model/multimodal_encoder/clip_encoder.py: `complement_idx`, `outlier_dectection`, and the part of
# `token_prune_merge_advanced` / `token_prune_merge_advanced_plus` (if_adaptive=True) after the CLS attention,
# `desired_layer_k` (CLS key first) and `image_features` are formed. Only `self.device` became `cls_attn.device`.


def complement_idx(idx, dim):
    a = torch.arange(dim, device=idx.device)
    ndim = idx.ndim
    dims = idx.shape
    n_idx = dims[-1]
    dims = dims[:-1] + (-1,)
    for i in range(1, ndim):  # noqa: B007
        a = a.unsqueeze(0)
    a = a.expand(*dims)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1, descending=False)
    compl = compl.permute(-1, *tuple(range(ndim - 1)))
    compl = compl[n_idx:].permute(*(tuple(range(1, ndim)) + (0,)))
    return compl


def outlier_dectection(attn):
    attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()
    Q1 = np.percentile(attn_np, 25)
    Q3 = np.percentile(attn_np, 75)
    IQR = Q3 - Q1
    upper_bound = Q3 + 1.5 * IQR
    outlier_indices = np.where((attn_np > upper_bound))[0]  # noqa: UP034
    ratio = len(outlier_indices) / len(attn_np)
    return ratio


def released_merge(cls_attn, desired_layer_k, image_features, idx):
    B, N, C = image_features.shape
    index = idx.unsqueeze(-1).expand(-1, -1, C)
    Key_wo_cls = desired_layer_k[:, 1:]
    x_others = torch.gather(image_features, dim=1, index=index)
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    Key_others = torch.gather(Key_wo_cls, dim=1, index=index)
    compl = complement_idx(idx, N)
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_Key = torch.gather(Key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
    Key_others_norm = F.normalize(Key_others, p=2, dim=-1)
    non_topk_Key_norm = F.normalize(non_topk_Key, p=2, dim=-1)
    B, left_tokens, C = x_others.size()
    updated_x_others = torch.zeros_like(x_others)
    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b, i, :].unsqueeze(0).unsqueeze(0)
            before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)
            after_i_Key = Key_others_norm[b, i + 1 :, :].unsqueeze(0)
            before_i_x_others = x_others[b, :i, :].unsqueeze(0)
            after_i_x_others = x_others[b, i + 1 :, :].unsqueeze(0)
            rest_x_others = torch.cat([before_i_x_others, after_i_x_others, non_topk[b, :, :].unsqueeze(0)], dim=1)
            before_i_x_others_attn = x_others_attn[b, :i].unsqueeze(0)
            after_i_x_others_attn = x_others_attn[b, i + 1 :].unsqueeze(0)
            rest_x_others_attn = torch.cat(
                [before_i_x_others_attn, after_i_x_others_attn, non_topk_attn[b, :].unsqueeze(0)], dim=1
            )
            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b, :, :].unsqueeze(0)], dim=1)
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))
            _, cluster_indices = torch.topk(cos_sim_matrix, k=int(32), dim=2, largest=True)  # noqa: UP018
            cluster_tokens = rest_x_others[:, cluster_indices.squeeze(), :]
            weights = rest_x_others_attn[:, cluster_indices.squeeze()].unsqueeze(-1)
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1)
            updated_center = weighted_avg + x_others[b, i, :]
            updated_x_others[b, i, :] = updated_center
    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)
    updated_x_others = torch.cat([updated_x_others, extra_one_token], dim=1)
    return updated_x_others


def released_base(cls_attn, desired_layer_k, image_features):
    B, N, C = image_features.shape
    reduction_ratio = outlier_dectection(cls_attn)
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)
    return released_merge(cls_attn, desired_layer_k, image_features, idx)


def released_plus(cls_attn, desired_layer_k, image_features):
    B, N, C = image_features.shape
    reduction_ratio = outlier_dectection(cls_attn)
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)
    step_length = int(1 / reduction_ratio)
    arithmetic_sequence = torch.arange(0, 575, int(step_length / 3)).to(device=cls_attn.device)
    original_tensor_1d = idx.flatten().to(device=cls_attn.device)
    filtered_sequence = torch.tensor([x for x in arithmetic_sequence if x not in original_tensor_1d]).to(device=cls_attn.device)
    concatenated_tensor = torch.cat((idx, filtered_sequence.unsqueeze(0)), dim=1)
    idx = concatenated_tensor
    return released_merge(cls_attn, desired_layer_k, image_features, idx)


# The merge loop above is shared verbatim by both released functions; only the index choice differs.


def clip_like(seed: int, images: int = 1, tokens: int = 576, dim: int = 1024):
    """Released inputs from random CLIP-shaped q/k: CLS attention as the released code forms it, keys, features."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(images, tokens + 1, dim, generator=g), torch.randn(images, tokens + 1, dim, generator=g)
    cls_attn = F.softmax((q @ k.transpose(-2, -1)) * dim**-0.5, dim=-1)[:, 0, 1:]
    return cls_attn, k, torch.randn(images, tokens, dim, generator=g)


def assert_official_matches(released, cls_attn, keys, features, variant):
    ours, _ = prumerge_official(features, cls_attn, keys[:, 1:], variant)
    torch.testing.assert_close(ours, released.flatten(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant, released", [("base", released_base), ("plus", released_plus)])
def test_official_mode_is_the_released_arithmetic_per_image(seed, variant, released):
    cls_attn, keys, features = clip_like(seed)
    expected = released(cls_attn, keys, features)
    assert expected.shape[1] > 10  # a real selection: outliers (and, for plus, grid samples) plus the extra token
    assert_official_matches(expected, cls_attn, keys, features, variant)


@pytest.mark.parametrize("seed", [3, 4])
def test_official_base_takes_one_outlier_ratio_over_all_images_and_floors_the_per_image_count(seed):
    cls_attn, keys, features = clip_like(seed, images=3)
    assert iqr_outliers(cls_attn) % 3  # the mean count per image is fractional: int() drops the remainder
    assert_official_matches(released_base(cls_attn, keys, features), cls_attn, keys, features, "base")


def test_official_base_loses_a_token_where_n_times_the_ratio_falls_below_the_count():
    g = torch.Generator().manual_seed(5)
    cls_attn = torch.rand(1, 196, generator=g)
    cls_attn[0, :27] += 10.0  # 27 outliers of 196; 196 * (27 / 196) = 26.999...
    keys, features = torch.randn(1, 197, 64, generator=g), torch.randn(1, 196, 64, generator=g)
    released = released_base(cls_attn, keys, features)
    assert released.shape[1] == 26 + 1
    assert_official_matches(released, cls_attn, keys, features, "base")


def test_official_plus_over_frames_is_the_released_plus_per_frame_with_the_ratio_of_all_frames(monkeypatch):
    cls_attn, keys, features = clip_like(6, images=3)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        released_plus(cls_attn, keys, features)  # the released plus cannot take a batch of several images
    ratio = outlier_dectection(cls_attn)  # the released ratio of all three images together
    monkeypatch.setitem(globals(), "outlier_dectection", lambda attn: ratio)
    per_frame = [released_plus(cls_attn[i : i + 1], keys[i : i + 1], features[i : i + 1]) for i in range(3)]
    assert len({frame.shape[1] for frame in per_frame}) > 1  # each frame drops the grid points it already keeps
    torch.testing.assert_close(prumerge_official(features, cls_attn, keys[:, 1:], "plus")[0], torch.cat(per_frame, dim=1)[0])


def test_the_official_keep_count_floors_after_the_ratio_is_formed():
    assert official_keep_count(27 / 196, 196) == 26
    assert official_keep_count(1 / 196, 196) == 0
    assert official_keep_count(27 / 576, 576) == 27


def test_the_official_grid_strides_by_a_third_of_the_inverse_ratio_below_the_last_token():
    assert official_grid(9 / 576, 576).tolist() == list(range(0, 575, 21))  # int(int(64) / 3) = 21
    assert official_grid(20 / 196, 196)[-1] == 192  # stride int(9 / 3) = 3, token 195 never sampled
    assert official_grid(0.0, 196).tolist() == [0]


def test_the_official_selection_ranks_by_score_and_shares_one_ratio_across_frames():
    scores = torch.rand(2, 16, generator=torch.Generator().manual_seed(7))
    scores[0, [9, 4, 2]] = torch.tensor([30.0, 20.0, 10.0])  # the only outliers, all in frame 0: 1.5 per frame, floored
    selected, new = official_selection(scores, "base")
    assert selected.shape == (2, 1) and new.all()
    assert selected[:, 0].tolist() == [9, scores[1].argmax().item()]
    selected, new = official_selection(scores, "plus")  # ratio 3/32: stride int(10 / 3) = 3 over [0, 15)
    assert selected[0].tolist() == [9, 0, 3, 6, 9, 12]
    assert new[0].tolist() == [True, True, True, True, False, True]  # frame 0 already keeps 9


def test_official_neighbours_include_kept_tokens_and_merge_their_original_features():
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]])
    keys = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    merged = official_merge(features, scores, keys, torch.tensor([[0, 1]]), neighbours=1)
    torch.testing.assert_close(merged, torch.tensor([[[1.0, 0.3], [0.4, 1.0]]]))  # 0 and 1 absorb each other
    torch.testing.assert_close(pruned_remainder(features, scores, torch.tensor([[0, 1]])), torch.tensor([[0.4, 0.3]]))


def test_official_mode_returns_each_frames_selection_then_its_extra_token_with_stats():
    g = torch.Generator().manual_seed(8)
    frames = torch.randn(4, 64, 8, generator=g)
    method = PruMerge(mode="official", variant="plus")
    scores, keys = torch.rand(4, 64, generator=g) ** 8, torch.randn(4, 64, 16, generator=g)
    out = method.select(tokens_of(frames, 8, 8), {"attention_received": scores, "keys": keys}, "")
    expected, index = prumerge_official(frames, scores, keys, variant="plus")
    torch.testing.assert_close(out.features, expected)
    assert torch.equal(out.index, index) and (index == -1).sum() == 4  # one extra token per frame, at no grid position
    assert out.figures == {"prumerge_tokens_in": 4 * 64, "prumerge_tokens_out": len(expected)}
    assert method.describe()["mode"] == "official"
