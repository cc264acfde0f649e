"""Token temporal merging (DyCoke stage 1) as a pure function of [F, N, D] features."""

import pytest
import torch

from dycoke_eval.methods.ttm import tokens_to_keep, ttm_keep_indices, ttm_plan

N = 196


def released_code_ttm(image_feature: torch.Tensor, num_tokens_per_frame: int, merging_ratio: float) -> torch.Tensor:
    """The authors' released TTM (`dycole_ttm`), transcribed literally and returning token indices.

    It returns the indices of the kept tokens instead of the tokens themselves, so that the
    selection can be compared exactly.
    """
    num_frames = image_feature.shape[0] // num_tokens_per_frame
    merging_ratio = 1 - merging_ratio
    index = torch.arange(image_feature.shape[0])
    similarities = []
    for i in range(0, num_frames - 1, 2):
        frame1 = image_feature[i * num_tokens_per_frame : (i + 1) * num_tokens_per_frame]
        frame2 = image_feature[(i + 1) * num_tokens_per_frame : (i + 2) * num_tokens_per_frame]
        frame1_norm = torch.nn.functional.normalize(frame1, p=2, dim=1)
        frame2_norm = torch.nn.functional.normalize(frame2, p=2, dim=1)
        similarities.append(torch.nn.functional.cosine_similarity(frame1_norm, frame2_norm, dim=1))
    similarities = torch.stack(similarities)
    kept_features, kept_index = [], []
    for i in range(0, num_frames - 1, 2):
        span = slice(i * num_tokens_per_frame, (i + 1) * num_tokens_per_frame)
        span2 = slice((i + 1) * num_tokens_per_frame, (i + 2) * num_tokens_per_frame)
        keep = similarities[i // 2].topk(int(merging_ratio * num_tokens_per_frame), largest=False).indices
        kept_features += [image_feature[span], image_feature[span2][keep]]
        kept_index += [index[span], index[span2][keep]]
    odd_similarities = [
        torch.nn.functional.cosine_similarity(kept_features[i], kept_features[i + 2], dim=1) for i in range(0, num_frames - 4, 4)
    ]
    for i in range(0, num_frames - 4, 4):
        keep = odd_similarities[i // 4].topk(int(merging_ratio * num_tokens_per_frame), largest=False).indices
        kept_features[i + 2], kept_index[i + 2] = kept_features[i + 2][keep], kept_index[i + 2][keep]
    return torch.cat(kept_index)


def features(frames, tokens=N, dim=32, seed=0):
    return torch.randn(frames, tokens, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "frames, expected",
    [(32, {0.3: 4915, 0.5: 4018, 0.7: 3098, 0.9: 2201}), (16, {0.3: 2487, 0.5: 2058, 0.7: 1618, 0.9: 1189})],
)
def test_official_mode_keeps_the_counts_of_the_released_code(frames, expected):
    assert {k: len(ttm_keep_indices(features(frames), k, "official")) for k in expected} == expected


@pytest.mark.parametrize("frames", [8, 16, 32])
@pytest.mark.parametrize("k", [0.3, 0.5, 0.7, 0.9])
def test_official_mode_selects_exactly_what_the_released_code_selects_in_its_order(frames, k):
    x = features(frames, seed=frames)
    assert torch.equal(ttm_keep_indices(x, k, "official"), released_code_ttm(x.reshape(-1, x.shape[-1]), N, k))


@pytest.mark.parametrize("frames", [4, 8, 32])
@pytest.mark.parametrize("k", [0.0, 0.3, 0.7])
def test_paper_mode_keeps_one_whole_frame_and_three_pruned_frames_per_window(frames, k):
    kept = ttm_keep_indices(features(frames), k, "paper")
    assert len(kept) == frames // 4 * (N + 3 * tokens_to_keep(N, k))
    assert len(kept) / (frames * N) == pytest.approx(1 / 4 + 3 / 4 * (1 - k), abs=1 / N)


@pytest.mark.parametrize("frames", [7, 8, 10])
def test_paper_mode_keeps_the_least_similar_tokens_against_the_planned_reference_in_spatial_order(frames):
    x = features(frames, tokens=16, dim=8)
    kept = ttm_keep_indices(x, 0.5, "paper")
    per_frame = {f: sorted(int(i) % 16 for i in kept if int(i) // 16 == f) for f in range(frames)}
    reference = ttm_plan(frames, "paper").reference
    cosine = torch.nn.functional.cosine_similarity(x.double()[:, None], x.double()[None], dim=-1)  # [F, F, N]
    for frame in range(frames):
        if reference[frame] < 0:
            assert per_frame[frame] == list(range(16))
        else:
            least_similar = cosine[frame, reference[frame]].argsort()[:8].sort().values.tolist()
            assert per_frame[frame] == least_similar
    assert kept.tolist() == sorted(kept.tolist())  # frame order, then spatial order


def test_official_mode_emits_pruned_frames_in_ascending_similarity_order():
    x = features(8, tokens=16, dim=8)
    frame_one = [int(i) - 16 for i in ttm_keep_indices(x, 0.5, "official") if 16 <= int(i) < 32]
    similarity = torch.nn.functional.cosine_similarity(x[1], x[0], dim=-1)
    assert similarity[frame_one].tolist() == sorted(similarity[frame_one].tolist())


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 6, 7, 9, 31])
def test_any_frame_count_gives_unique_in_range_indices_without_dropping_a_frame(mode, frames):
    kept = ttm_keep_indices(features(frames, tokens=16), 0.5, mode)
    assert len(set(kept.tolist())) == len(kept) and 0 <= kept.min() and kept.max() < frames * 16
    assert {int(i) // 16 for i in kept} == set(range(frames))


def test_paper_mode_ranks_half_precision_features_in_fp32():
    x = features(8, dim=64).bfloat16()
    assert torch.equal(ttm_keep_indices(x, 0.7, "paper"), ttm_keep_indices(x.float(), 0.7, "paper"))


def test_paper_mode_prunes_every_window_including_a_short_last_one():
    assert ttm_plan(7, "paper").reference == (-1, 0, 0, 2, -1, 4, 4)
    assert ttm_plan(10, "paper").reference == (-1, 0, 0, 2, -1, 4, 4, 6, -1, 8)


def test_compiled_similarity_selects_what_the_eager_one_selects():
    x = features(32, dim=64)
    assert torch.equal(ttm_keep_indices(x, 0.7, "paper", compiled=True), ttm_keep_indices(x, 0.7, "paper"))


def test_compiling_official_mode_is_refused():
    with pytest.raises(ValueError, match="compiled=True applies to mode='paper'"):
        ttm_keep_indices(features(4), 0.5, "official", compiled=True)


def test_official_mode_says_where_it_departs_from_the_released_code():
    assert ttm_plan(32, "official").notes == ()
    assert any("crashes" in note for note in ttm_plan(4, "official").notes)
    assert any("drops the last frame" in note for note in ttm_plan(7, "official").notes)
    assert ttm_plan(32, "official").reference[30] == -1  # the last window's frame 2 stays whole


@pytest.mark.parametrize("k", [-0.1, 1.01, 1.5])
def test_k_outside_zero_one_is_refused(k):
    with pytest.raises(ValueError, match=r"k=.*\[0, 1\]"):
        ttm_keep_indices(features(4), k)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="paper, official"):
        ttm_keep_indices(features(4), 0.5, "exact")


def test_k_one_keeps_exactly_the_frames_kept_whole():
    kept = ttm_keep_indices(features(8), 1.0, "paper")
    assert kept.tolist() == list(range(0, N)) + list(range(4 * N, 5 * N))  # frames 0 and 4, the windows' first


@pytest.mark.parametrize(
    "k, mode, share",  # docs/methods.md#ttm-only: FastVID's DyCoke rows on LLaVA-OV, 32 frames of 196 tokens
    [(0.9, "paper", 0.323), (1.0, "paper", 0.25), (0.9, "official", 0.351), (1.0, "official", 0.281)],
)
def test_fastvids_dycoke_rows_keep_the_share_of_video_tokens_the_spec_gives(k, mode, share):
    from omegaconf import OmegaConf

    from dycoke_eval.config import compose_option
    from dycoke_eval.plans import plan_row

    method = compose_option("method", "dycoke_ttm", {"method.k": k, "method.mode": mode})
    cfg = OmegaConf.create({"model": compose_option("model", "llava_ov_7b"), "method": method, "frames": 32})
    assert plan_row(cfg)["retained_ratio"] == pytest.approx(share, abs=5e-4)
