"""ToMe per frame before the LLM: rounds of the released bipartite soft matching and size-weighted merging.

The batched arithmetic is checked against a literal transcription of the released `tome/merge.py`, run one frame
at a time: tokens bit for bit in float32 and bfloat16, sizes and source sets equal.
"""

import math

import pytest
import torch
from layouts import layout, tokens_of

from dycoke_eval.compression.stages import PlannedCounts
from dycoke_eval.config import ConfigError, instantiate_method
from dycoke_eval.geometry import ModelInfo
from dycoke_eval.methods.tome import (
    ToMe,
    bipartite_matching,
    first_sources,
    in_grid_order,
    kept_per_frame,
    merge_sum,
    output_slots,
    round_sizes,
    tome_frames,
)
from dycoke_eval.methods.visionzip import key_head_mean
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.wrapper import CompressedVideoLM, SampleRecord

# --- facebookresearch/ToMe@af95e4b1befa172dadccd8c81e223b10090f9579, tome/merge.py, as released ---


def do_nothing(x, mode=None):  # merge.py:14-15
    return x


def bipartite_soft_matching(metric, r, class_token=False, distill_token=False):  # merge.py:18-97
    protected = 0
    if class_token:
        protected += 1
    if distill_token:
        protected += 1

    # We can only reduce by a maximum of 50% tokens
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)

    if r <= 0:
        return do_nothing, do_nothing

    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)

        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf

        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]

        unm_idx = edge_idx[..., r:, :]  # Unmerged Tokens
        src_idx = edge_idx[..., :r, :]  # Merged Tokens
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

        if class_token:
            # Sort to ensure the class token is at the start
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)

        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        else:
            return torch.cat([unm, dst], dim=1)

    return merge, None  # `unmerge` (82-95) is not used by merging


def merge_wavg(merge, x, size=None):  # merge.py:210-224
    if size is None:
        size = torch.ones_like(x[..., 0, None])

    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")

    x = x / size
    return x, size


def merge_source(merge, x, source=None):  # merge.py:227-239
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None, ...].expand(n, t, t)

    source = merge(source, mode="amax")
    return source


def released_tome_frame(x, kept, metric=None):
    """One frame [1, N, D] down to `kept` tokens: the ToMeBlock step (patch/timm.py:40-53) repeated, each call asking
    for every token still to go and capped by the release; `metric` (keys) merged like the tokens, None: the tokens."""
    size = source = None
    while x.shape[1] > kept:
        merge, _ = bipartite_soft_matching(x if metric is None else metric, x.shape[1] - kept)
        source = merge_source(merge, x, source)
        if metric is not None:
            metric, _ = merge_wavg(merge, metric, size)
        x, size = merge_wavg(merge, x, size)
    return x, size, source


# --- the specification ---


def random_frames(frames, tokens, dim=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(frames, tokens, dim, generator=generator).to(dtype)


@pytest.mark.parametrize(
    "tokens, kept, removed",
    [
        (196, 49, [98, 49]),  # LLaVA-OV at 25%
        (196, 29, [98, 49, 20]),  # 15%
        (196, 19, [98, 49, 24, 6]),  # 10%: 49 -> 25 (at most half) -> 19
        (169, 42, [84, 42, 1]),  # LLaVA-Video at 25%: 169 -> 85 -> 43 -> 42
        (16, 16, []),
        (3, 1, [1, 1]),
    ],
)
def test_each_round_removes_what_is_left_to_remove_but_at_most_half_the_tokens(tokens, kept, removed):
    assert round_sizes(tokens, kept) == removed


def test_a_round_splits_by_alternation_and_merges_the_most_similar_a_tokens_into_their_best_b():
    # Unit vectors at these angles; slots 0 2 4 are A, 1 3 5 are B. Best matches: A0 -> B2 (5 degrees apart),
    # A2 -> B0 (10), A1 -> B1 (20). r = 2 merges A0 and A2, in that order; A1 stays.
    degrees = torch.tensor([0.0, 50.0, 90.0, 70.0, 40.0, 5.0]).deg2rad()
    metric = torch.stack([degrees.cos(), degrees.sin()], dim=-1)[None]
    matching = bipartite_matching(metric, 2)
    assert matching.unmerged.flatten().tolist() == [1]
    assert matching.merged.flatten().tolist() == [0, 2]
    assert matching.into.flatten().tolist() == [2, 0]
    values = torch.arange(6.0).view(1, 6, 1)
    assert merge_sum(values, matching).flatten().tolist() == [2.0, 1.0 + 4.0, 3.0, 5.0 + 0.0]  # [unmerged A, B...]
    assert output_slots(matching, 6).tolist() == [[3, 1, 0, 2, 1, 3]]  # the slot each input slot went to


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["features", "keys"])
@pytest.mark.parametrize("tokens, kept", [(196, 49), (196, 29), (196, 19), (169, 42), (169, 16), (15, 4), (16, 1)])
def test_the_batched_rounds_equal_the_released_code_frame_by_frame_bit_for_bit(dtype, metric, tokens, kept):
    frames = 5
    features = random_frames(frames, tokens, seed=tokens + kept, dtype=dtype)
    keys = random_frames(frames, tokens, dim=4, seed=tokens - kept, dtype=dtype) if metric == "keys" else None
    merged = tome_frames(features, kept, keys)
    assert merged.tokens.dtype == dtype and merged.tokens.shape == (frames, kept, 8)
    for f in range(frames):
        frame_keys = None if keys is None else keys[f : f + 1]
        tokens_f, sizes_f, source_f = released_tome_frame(features[f : f + 1], kept, frame_keys)
        assert torch.equal(merged.tokens[f], tokens_f[0])
        assert torch.equal(merged.sizes[f], sizes_f[0])
        assert torch.equal(torch.nn.functional.one_hot(merged.sources[f], kept).T.float(), source_f[0])


def test_sizes_carry_across_rounds_so_each_token_is_the_mean_of_all_its_sources():
    features = random_frames(3, 49, seed=3, dtype=torch.float64)
    merged = tome_frames(features, 7)  # 49 -> 25 -> 13 -> 7
    for f in range(3):
        for slot in range(7):
            sources = merged.sources[f] == slot
            assert merged.sizes[f, slot, 0] == sources.sum()
            torch.testing.assert_close(merged.tokens[f, slot], features[f, sources].mean(dim=0), rtol=1e-12, atol=1e-12)


def test_each_frame_goes_out_in_grid_order_each_token_at_the_smallest_index_of_its_sources():
    features = random_frames(4, 196, seed=5)
    merged = tome_frames(features, 49)
    tokens, where = in_grid_order(merged)
    for f in range(4):
        firsts = [min(i for i in range(196) if merged.sources[f, i] == slot) for slot in range(49)]
        assert where[f].tolist() == sorted(firsts)
        assert torch.equal(tokens[f], merged.tokens[f, torch.tensor(firsts).argsort()])
    assert first_sources(torch.tensor([[1, 0, 1, 0, 2]]), 3).tolist() == [[1, 0, 4]]


def test_the_metric_decides_what_merges():
    # A 1x4 frame of nearly equal tokens; the keys pair slot 0 with 3 and 2 with 1, the tokens 0 with 1.
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [1.0, 0.03]]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])
    assert tome_frames(features, 2, keys).sources.tolist() == [[1, 0, 0, 1]]
    by_features = tome_frames(features, 2).sources
    assert by_features[0, 0] == by_features[0, 1]


@pytest.mark.parametrize("family, rows", [("llava_onevision", 14), ("llava_video", 13)])
@pytest.mark.parametrize("retention, kept", [(0.25, {14: 49, 13: 42}), (0.15, {14: 29, 13: 25}), (0.10, {14: 19, 13: 16})])
def test_the_stage_keeps_int_r_n_tokens_per_frame_at_their_grid_positions_as_planned(family, rows, retention, kept):
    frames, tokens, keep = 3, rows * rows, kept[rows]
    features = random_frames(frames, tokens, seed=rows)
    keys = random_frames(frames, tokens, dim=6, seed=rows + 1)
    stage = ToMe(retention=retention, metric="keys", key_heads=2)
    out = stage.select(tokens_of(features, rows, rows, family), {"keys": keys}, "t/0")
    expected, where = in_grid_order(tome_frames(features, keep, key_head_mean(keys, 2)))
    assert torch.equal(out.features, expected.reshape(-1, 8))
    assert torch.equal(out.index, (where + torch.arange(frames)[:, None] * tokens).flatten())
    assert out.figures == {"tome_tokens_in": frames * tokens, "tome_rounds": len(round_sizes(tokens, keep))}
    assert stage.planned_tokens(PlannedCounts.full(layout(32, rows, rows, family), layers=28)) == 32 * keep


def test_the_config_is_the_feature_metric_at_25_percent():
    method = instantiate_method("tome")
    assert method == ToMe()
    assert method.describe() == {"name": "tome", "retention": 0.25, "metric": "features", "key_heads": 16}
    assert method.needs() == frozenset() and ToMe(metric="keys").needs() == {"keys"}
    assert not method.keeps_positions()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"retention": 0.0}, r"retention=0.0: ToMe keeps a fraction of each frame's tokens in \(0, 1\]"),
        ({"retention": 1.5}, "retention=1.5"),
        ({"metric": "queries"}, "metric='queries'; use one of features, keys"),
        ({"key_heads": 0}, "key_heads=0"),
    ],
)
def test_bad_settings_fail_at_config_time_naming_the_value(settings, message):
    with pytest.raises(ConfigError, match=message):
        ToMe(**settings)


def test_a_frame_keeps_at_least_one_token_whatever_its_size():
    assert kept_per_frame(196, 0.25) == 49 and kept_per_frame(196, 0.001) == 1 and kept_per_frame(1, 0.25) == 1
    assert ToMe(retention=0.05).planned_tokens(PlannedCounts.full(layout(4, 4, 4), layers=8)) == 4


@pytest.mark.parametrize("family", ["llava_onevision", "llava_video", "qwen2_5_vl", "qwen3_vl"])
def test_every_family_takes_the_feature_metric_and_only_llava_the_keys(family):
    signals = frozenset({"keys"} if family in ("llava_onevision", "llava_video") else ())
    model = ModelInfo(layers=28, signals=signals, family=family)
    ToMe().validate_for(model)
    if signals:
        ToMe(metric="keys").validate_for(model)
    else:
        with pytest.raises(ConfigError, match=f"tome: metric=keys .* the '{family}' model family .* use metric=features"):
            ToMe(metric="keys").validate_for(model)


@pytest.mark.parametrize("adapter", [None, "llava_video"])
@pytest.mark.parametrize("metric", ["features", "keys"])
def test_on_the_tiny_llava_models_the_llm_reads_the_merged_tokens_in_grid_order(tiny_checkpoint, adapter, metric):
    method = ToMe(metric=metric, key_heads=2)
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", adapter=adapter, method=method)
    encoded = lm.encode_video(synthetic_frames("tome")[:8], SampleRecord("t", 0))
    tokens = lm.compressor.select(encoded, "t/0").tokens
    frames, per_frame = encoded.grid.shape[:2]
    kept = int(0.25 * per_frame)
    keys = key_head_mean(encoded.signals["keys"], 2) if metric == "keys" else None
    expected, where = in_grid_order(tome_frames(encoded.grid, kept, keys))
    assert torch.equal(tokens.features, expected.reshape(-1, expected.shape[-1]))
    assert torch.equal(tokens.index, (where + torch.arange(frames)[:, None] * per_frame).flatten())
    visual, _ = lm.adapter.assemble(encoded, tokens.features, tokens.index)
    if adapter is None:  # LLaVA-OV: the stage's order, one newline after the video
        assert torch.equal(visual[:-1], tokens.features) and torch.equal(visual[-1], encoded.newline)
    else:  # LLaVA-Video: the same order (already the grid's), a newline after each row that keeps a token
        rows = tokens.index.div(encoded.layout.cols, rounding_mode="floor").unique().numel()
        assert visual.shape[0] == tokens.features.shape[0] + rows
        assert torch.equal(visual[~(visual == encoded.newline).all(dim=-1)], tokens.features)


@pytest.fixture(scope="module")
def tiny_qwen2_5_vl(tmp_path_factory):
    from dycoke_eval.offline.tiny_qwen import build_tiny_qwen_checkpoint

    return build_tiny_qwen_checkpoint(tmp_path_factory.mktemp("qwen2_5_vl"), "qwen2_5_vl")


def test_on_a_tiny_qwen2_5_vl_each_temporal_patch_is_merged_and_keeps_its_tokens_grid_positions(tiny_qwen2_5_vl):
    lm = CompressedVideoLM(pretrained=str(tiny_qwen2_5_vl), frames=8, device="cpu", method=ToMe())
    video = synthetic_frames("tome")[:8]
    encoded = lm.encode_video(video, SampleRecord("t", 0))
    tokens = lm.compressor.select(encoded, "t/0").tokens
    patches, per_patch = encoded.grid.shape[:2]
    assert patches == 4  # 8 frames in temporal patches of two
    expected, where = in_grid_order(tome_frames(encoded.grid, int(0.25 * per_patch)))
    assert torch.equal(tokens.features, expected.reshape(-1, expected.shape[-1]))
    assert torch.equal(tokens.index, (where + torch.arange(patches)[:, None] * per_patch).flatten())
    record = SampleRecord("t", 0)
    generate = {"max_new_tokens": 2, "do_sample": False, "eos_token_id": None, "return_dict_in_generate": True}
    output, _ = lm.run_sample(video, "What moves?", generate, record, "t/0")
    assert record.visual_tokens_by_stage == {"tome": patches * int(0.25 * per_patch)}
    assert output.sequences.shape[1] > 0
