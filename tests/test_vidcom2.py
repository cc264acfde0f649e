"""VidCom2 before the LLM, on every family: each step on its own, then the whole selection against a literal
transcription of the released code, then through the wrapper on the tiny LLaVA (both layouts) and Qwen-VL models."""

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from layouts import layout, tokens_of

from dycoke_eval.compression.stages import VideoTokens
from dycoke_eval.config import ConfigError, instantiate_method
from dycoke_eval.geometry import ModelInfo, PlannedCounts, VideoLayout
from dycoke_eval.methods.vidcom2 import (
    VidCom2,
    centre_similarities,
    frame_budgets,
    frame_counts,
    low_variance_channels,
    multi_scale_gaussian,
    paper_frame_budgets,
    paper_frame_counts,
    smallest_per_frame,
    vidcom2_kept,
)
from dycoke_eval.models.llava_video import frame_end_layout
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.plumbing.counting import count_ops
from dycoke_eval.wrapper import CompressedVideoLM, SampleRecord

# ---- the released code, transcribed literally ----
# xuyang-liu16/VidCom2@944a17d14f4848ad080a65eab2b0711a760fa154:token_compressor/vidcom2/vidcom2.py:7-115 (the same
# file on the qwen branch @a85d485c). Only the type hints are left out.

MODEL_SPECS = {
    "llava_ov": {"tpf": 196, "mapper": "linear"},
    "llava_vid": {"tpf": 169, "mapper": "grid_vid", "grid": 13},
    "qwen2_vl": {"tpf": None, "mapper": "linear"},  # tpf provided dynamically
    "qwen2_5_vl": {"tpf": None, "mapper": "linear"},  # tpf provided dynamically
    "qwen3_vl": {"tpf": None, "mapper": "linear"},  # tpf provided dynamically
}


def vidcom2_compression(flattened_feat, model="llava_ov", base_scale=0.25, frame_token_len=None, img_feat=None):
    if model not in MODEL_SPECS:
        raise ValueError(f"Unknown model: {model}")
    spec = MODEL_SPECS[model]
    tpf = frame_token_len if model in {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"} else spec["tpf"]
    if tpf is None:
        raise ValueError(f"frame_token_len required for {model}")
    sel_feat = select_low_var_channels(flattened_feat)
    vid_score, frame_score = compute_gaussian_scores(sel_feat, tpf)
    scales = compute_scales(-vid_score.mean(dim=-1), base_scale)
    indices = select_outlier_indices(vid_score + frame_score, scales, tpf)
    return map_features(indices, flattened_feat, img_feat, spec)


def select_low_var_channels(x, ratio=0.5):
    variances = x.var(dim=0, unbiased=False)
    k = int(x.shape[-1] * ratio)
    _, topk_idx = torch.topk(variances, k=k, largest=False)
    return x[:, topk_idx]


def compute_gaussian_scores(x, tpf):
    frames = x.view(-1, tpf, x.shape[-1])
    frames = F.normalize(frames, dim=-1)
    vid_center = frames.mean(dim=(0, 1), keepdim=True)
    frame_center = frames.mean(dim=1, keepdim=True)
    alphas = [2**k for k in range(-3, 2)]
    v_score = _multi_scale_gaussian(frames, vid_center, alphas)
    f_score = _multi_scale_gaussian(frames, frame_center, alphas)
    return v_score, f_score


def _multi_scale_gaussian(x, center, alphas):
    dist_sq = ((x - center) ** 2).sum(dim=-1)
    return sum(torch.exp(-dist_sq / (2 * a)) for a in alphas)


def compute_scales(scores, base, temp=0.01):
    probs = F.softmax((scores - scores.max()) / temp, dim=0)
    scales = base * (1 + probs - probs.mean())
    return scales.clamp(max=1.0)


def select_outlier_indices(scores, scales, tpf):
    ks = (scales * tpf).round().long().clamp(min=1).tolist()
    batch_indices = []
    for i, k in enumerate(ks):
        _, idx = torch.topk(scores[i], k=k, largest=False, sorted=False)
        batch_indices.append(idx.sort().values)
    return batch_indices


def map_features(indices, flat, img, spec):
    if spec["mapper"] == "linear":
        stride = flat.shape[0] // len(indices)
        global_idx = _map_linear_offset(indices, stride)
        return flat[global_idx]
    elif spec["mapper"] == "grid_vid":
        if img is None:
            raise ValueError("img_feat required for grid mapping")
        global_idx = _map_grid_vid(indices, spec["grid"])
        return img[global_idx]
    return flat


def _map_linear_offset(indices, tpf):
    device = indices[0].device
    offsets = torch.arange(len(indices), device=device) * tpf
    return torch.cat([idx + off for idx, off in zip(indices, offsets, strict=True)])


def _map_grid_vid(indices, h):
    w_new = h + 1
    stride = h * w_new
    global_idx = []
    for i, idx in enumerate(indices):
        local_mapped = (idx // h) * w_new + (idx % h)
        start = i * stride
        global_idx.append(start + local_mapped)
        global_idx.append(start + (torch.arange(h, device=idx.device) * w_new + h))
    return torch.cat(global_idx)


def add_token_per_grid(image_feature, image_newline):
    """VidCom2@944a17d1:llava/model/llava_arch.py:222-244 (`self.model.image_newline` passed in; no faster-video
    tokens): the LLaVA-Video layout the grid mapping picks from, a newline after every row of every frame."""
    resize_h = int(math.sqrt(image_feature.shape[1]))
    num_frames = image_feature.shape[0]
    image_feature = image_feature.view(num_frames, 1, resize_h, resize_h, -1)
    image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
    image_feature = image_feature.flatten(1, 2).flatten(2, 3)
    image_feature = torch.cat(
        (image_feature, image_newline[:, None, None].expand(*image_feature.shape[:-1], 1).to(image_feature.device)), dim=-1
    )
    image_feature = image_feature.flatten(1, 2).transpose(0, 1)
    return image_feature


def _compute_keep_indices(flat_features, grid_thw, spatial_merge_size, base_scale):
    """VidCom2@a85d485c (qwen branch):token_compressor/vidcom2/models/qwen2_5_vl.py:20-33 (qwen3_vl.py:20-33 alike)."""
    t, h, w = grid_thw.tolist()
    frame_tokens = (h * w) // (spatial_merge_size**2)
    if frame_tokens <= 0 or flat_features.numel() == 0:
        return torch.arange(flat_features.shape[0], device=flat_features.device)
    sel_feat = select_low_var_channels(flat_features)
    vid_score, frame_score = compute_gaussian_scores(sel_feat, frame_tokens)
    scales = compute_scales(-vid_score.mean(dim=-1), base_scale)
    indices = select_outlier_indices(vid_score + frame_score, scales, frame_tokens)
    return _map_linear_offset(indices, frame_tokens)


# ---- inputs ----


def video(frames: int, tokens: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """[F, N, D] random tokens with a per-frame offset, so frames differ in their mean as a real video's do."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn(frames, tokens, dim, generator=generator) + torch.randn(frames, 1, dim, generator=generator)
    return grid.to(dtype)


def qwen_layout(frames: int, rows: int, cols: int, family: str = "qwen2_5_vl") -> VideoLayout:
    return VideoLayout(frames, rows, cols, "none", family)


def cuda_topk_smallest(row: torch.Tensor, k: int) -> list[int]:
    """The k smallest of a row as CUDA's topk gathers them (TensorTopK.cu, gatherTopK): every value below the k-th, then
    the values equal to it in index order; sorted by index."""
    kth = sorted(row.tolist())[k - 1]
    below = [i for i, v in enumerate(row.tolist()) if v < kth]
    equal = [i for i, v in enumerate(row.tolist()) if v == kth]
    return sorted(below + equal[: k - len(below)])


# ---- each step ----


def test_the_scored_channels_are_the_lowest_variance_half_over_the_whole_video():
    # Channel variances over the 4 tokens: 0 (constant), 4, 1, 0.25 -> the two lowest, ascending: channels 0, 3.
    tokens = torch.tensor([[5.0, 2.0, 1.0, 0.5], [5.0, -2.0, -1.0, 0.0], [5.0, 2.0, 1.0, 0.5], [5.0, -2.0, -1.0, 0.0]])
    assert low_variance_channels(tokens, 0.5).tolist() == tokens[:, [0, 3]].tolist()
    assert low_variance_channels(tokens, 0.75).tolist() == tokens[:, [0, 3, 2]].tolist()  # int(4 * 0.75) = 3


def test_too_small_a_channel_share_fails_naming_the_smallest_that_works():
    with pytest.raises(ConfigError, match=r"channel_share=0.1 scores int\(0.1 \* 4\) = 0 channels; choose channel_share >= 0.25"):
        low_variance_channels(torch.randn(6, 4), 0.1)


def test_the_similarity_to_a_centre_is_five_gaussians_of_bandwidths_one_eighth_to_two():
    tokens = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    similarity = multi_scale_gaussian(tokens, torch.zeros(1, 1, 2), (0.125, 0.25, 0.5, 1.0, 2.0))
    expected = [sum(math.exp(-d / (2 * a)) for a in (0.125, 0.25, 0.5, 1.0, 2.0)) for d in (0.0, 1.0, 4.0)]
    assert expected[0] == 5.0
    torch.testing.assert_close(similarity, torch.tensor([expected]), rtol=1e-6, atol=0)


def test_the_centres_are_means_of_the_normalised_tokens_not_normalised_again():
    # Frame 0: (3, 0) and (0, 4) normalise to e1 and e2; frame 1: e1 twice. Video centre (3/4, 1/4), frame 0's (1/2, 1/2).
    features = torch.tensor([[3.0, 0.0], [0.0, 4.0], [2.0, 0.0], [5.0, 0.0]])
    to_video, to_frame = centre_similarities(features, 2, bandwidths=(0.5,))  # exp(-d) with d the squared distance
    video_d = [(1 / 4) ** 2 + (1 / 4) ** 2, (3 / 4) ** 2 + (3 / 4) ** 2, 1 / 8, 1 / 8]
    frame_d = [1 / 2, 1 / 2, 0.0, 0.0]  # a normalised frame 0 centre would be (0.71, 0.71): 0.59 away, not 0.5
    torch.testing.assert_close(to_video.flatten(), torch.exp(-torch.tensor(video_d)))
    torch.testing.assert_close(to_frame.flatten(), torch.exp(-torch.tensor(frame_d)))


def test_the_budgets_average_r_and_the_most_unlike_frame_takes_nearly_all_the_softmax():
    # Mean similarities 3.0, 2.9, 3.0, 2.95: frame 1 is the least similar by 0.05 = 5 temperatures.
    similarity = torch.tensor([[3.0, 3.0], [2.8, 3.0], [3.1, 2.9], [2.95, 2.95]])
    budgets = frame_budgets(similarity, 0.25, 0.01)
    probs = torch.softmax(torch.tensor([-0.1, 0.0, -0.1, -0.05]) / 0.01, dim=0)
    torch.testing.assert_close(budgets, 0.25 * (1 + probs - 0.25))
    assert probs[1] > 0.99 and budgets.sum().item() == pytest.approx(4 * 0.25)
    capped = frame_budgets(similarity, 0.75, 0.01)  # 0.75 * (1 + 0.99 - 0.25) > 1: capped, the excess dropped
    assert capped[1].item() == 1.0 and capped.sum().item() < 4 * 0.75


def test_counts_round_half_to_even_in_the_budgets_dtype_and_keep_at_least_one():
    budgets = torch.tensor([0.125, 0.375, 0.625, 0.0001])  # x 4 tokens: 0.5, 1.5, 2.5, 0.0004
    assert frame_counts(budgets, 4).tolist() == [1, 2, 2, 1]  # 0 -> 1 (the floor), 2 (even), 2 (even), 0 -> 1
    budget = 0.25 * (1 - 1 / 32)  # the budget of every frame but the one taking the softmax, at 32 frames
    assert frame_counts(torch.tensor([budget]), 196).tolist() == [47]  # 47.47
    assert frame_counts(torch.tensor([budget], dtype=torch.bfloat16), 196).tolist() == [48]  # 47.5 in bf16, to even


def test_each_frame_keeps_its_smallest_scores_and_on_ties_the_lower_index():
    scores = torch.tensor([[0.3, 0.1, 0.2, 0.1, 0.5], [1.0, 1.0, 1.0, 0.0, 1.0]])
    kept = smallest_per_frame(scores, torch.tensor([2, 3]))
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, True, False]]
    assert [cuda_topk_smallest(row, k) for row, k in zip(scores, (2, 3), strict=True)] == [[1, 3], [0, 1, 3]]


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_the_selection_costs_one_host_read_and_the_same_kernels_at_any_frame_count(mode):
    launched = []
    for frames in (8, 32):
        features = video(frames, 196, 64, seed=frames).flatten(0, 1)
        with torch.inference_mode(), count_ops() as counted:
            vidcom2_kept(features, 196, 0.25, 0.5, 0.01, mode)
        assert counted.counts.syncs == 1 and dict(counted.counts.syncing) == {"nonzero": 1}
        launched.append(counted.counts.ops)
    assert launched[0] == launched[1]  # no loop over frames


# ---- mode: paper ----


def paper_kept(frames: list[list[list[float]]], retention: float, temperature: float) -> list[int]:
    """The paper's selection, written out from its equations (arXiv 2505.14454) in float64 Python: raw centres (Eqs. 3,
    7), cosines to them (Eqs. 4, 8), sigma with its epsilon (Eq. 5), r_t = R (1 + sigma_t - 1/T) (Eq. 6), k_t =
    ceil(r_t M) (Algorithm 1 line 32), the k_t largest u^frame + u^video = smallest summed cosines (Eqs. 9, 10)."""
    T, M = len(frames), len(frames[0])

    def mean(vectors):
        return [sum(column) / len(vectors) for column in zip(*vectors, strict=True)]

    def cos(x, y):
        return sum(a * b for a, b in zip(x, y, strict=True)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))

    g_v = mean([x for frame in frames for x in frame])
    s_video = [[cos(x, g_v) for x in frame] for frame in frames]
    s_frame = [[cos(x, mean(frame)) for x in frame] for frame in frames]
    u = [-sum(s) / M for s in s_video]
    exps = [math.exp((u_t - max(u)) / temperature) for u_t in u]
    sigma = [e / (sum(exps) + 1e-8) for e in exps]
    k = [min(M, max(1, math.ceil(retention * (1 + s - 1 / T) * M))) for s in sigma]
    kept = []
    for t in range(T):
        by_uniqueness = sorted(range(M), key=lambda m: s_video[t][m] + s_frame[t][m])
        kept += sorted(t * M + m for m in by_uniqueness[: k[t]])
    return kept


# Two frames of three tokens in 4 channels, R = 0.5: r_t * M is 2.25 for the frame the softmax favours, 0.75 for the
# other. The paper (cosines on all channels, raw centres) favours frame 1 and keeps ceil(2.25) = 3 of its tokens; the
# release (Gaussians on the 2 lowest-variance channels, normalised centres) favours frame 0, keeping round(2.24) = 2.
HAND_BUILT = [
    [[1.0, 1.0, 1.0, 2.0], [1.0, -2.0, -2.0, 2.0], [2.0, -1.0, -1.0, 0.0]],
    [[0.0, -1.0, 1.0, -1.0], [-1.0, -1.0, -2.0, 2.0], [1.0, -1.0, -1.0, 2.0]],
]


def test_paper_mode_keeps_what_the_papers_equations_keep_where_the_release_keeps_other_tokens():
    assert paper_kept(HAND_BUILT, 0.5, 0.01) == [0, 3, 4, 5]
    features = torch.tensor(HAND_BUILT).flatten(0, 1)
    assert vidcom2_kept(features, 3, 0.5, 0.5, 0.01, "paper").tolist() == [0, 3, 4, 5]
    assert vidcom2_kept(features, 3, 0.5, 0.5, 0.01).tolist() == [0, 1, 4]  # official
    # Through the stage, from bf16 features (these are exact in bf16): scored in float32, the kept values the model's.
    grid = torch.tensor(HAND_BUILT, dtype=torch.bfloat16)
    kept = VidCom2(retention=0.5, mode="paper").select(stage_input("qwen2_5_vl", grid, 1, 3), {}, "")
    assert kept.index.tolist() == [0, 3, 4, 5] and kept.features.dtype == torch.bfloat16
    assert kept.figures == {"vidcom2_tokens_in": 6, "vidcom2_kept": 4}


def test_paper_counts_are_the_ceiling_of_uncapped_budgets_at_least_one_and_at_most_the_frame():
    # 32 frames x 196, one frame taking the softmax: r M = 196 * 0.25 * (2 - 1/32) = 96.47 and 196 * 0.25 * (1 - 1/32) = 47.47.
    budgets = torch.tensor([0.25 * (2 - 1 / 32), 0.25 * (1 - 1 / 32)])
    assert paper_frame_counts(budgets, 196).tolist() == [97, 48]  # ceil
    assert frame_counts(budgets, 196).tolist() == [96, 47]  # official, in float32: round
    similarity = torch.tensor([[3.0, 3.0], [2.8, 3.0], [3.1, 2.9], [2.95, 2.95]])  # frame 1 takes the softmax
    uncapped = paper_frame_budgets(similarity, 0.75, 0.01)
    probs = torch.softmax(torch.tensor([-0.1, 0.0, -0.1, -0.05]) / 0.01, dim=0)
    torch.testing.assert_close(uncapped, 0.75 * (1 + probs - 1 / 4))
    assert uncapped[1].item() > 1.3  # not capped: the count is, at the frame's 4 tokens
    assert paper_frame_counts(uncapped, 4).tolist() == [3, 4, 3, 3]  # ceil of 2.25, 5.23 (-> 4), 2.25, 2.27
    assert frame_counts(frame_budgets(similarity, 0.75, 0.01), 4).tolist() == [2, 4, 2, 2]  # official: round, capped


# ---- against the released code ----

CASES = {  # name: (release's model, frames, rows, cols, channels, retention)
    "ov": ("llava_ov", 8, 14, 14, 64, 0.25),
    "ov_32_frames_15": ("llava_ov", 32, 14, 14, 32, 0.15),
    "ov_capped": ("llava_ov", 6, 14, 14, 16, 0.75),  # the most unlike frame's budget 0.75 * (2 - 1/6) > 1
    "ov_floor": ("llava_ov", 8, 14, 14, 16, 0.002),  # 196 * 0.002 rounds to 0: one token per frame
    "video": ("llava_vid", 8, 13, 13, 64, 0.25),
    "video_10": ("llava_vid", 16, 13, 13, 32, 0.10),
    "qwen": ("qwen2_5_vl", 8, 9, 16, 64, 0.25),  # a 16:9 clip: 9 x 16 merged tokens per temporal patch
    "qwen3": ("qwen3_vl", 6, 6, 10, 32, 0.3),
}
FAMILY_OF = {"llava_ov": "llava_onevision", "llava_vid": "llava_video", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}


def stage_input(model: str, grid: torch.Tensor, rows: int, cols: int) -> VideoTokens:
    family = FAMILY_OF[model]
    if family.startswith("qwen"):
        return VideoTokens.from_grid(grid, qwen_layout(grid.shape[0], rows, cols, family))
    return tokens_of(grid, rows, cols, family)


def released_sequence(model: str, grid: torch.Tensor, retention: float, newline: torch.Tensor) -> torch.Tensor:
    """What the release hands on: LLaVA-OV its kept tokens and the newline (models/llava.py:161-168), LLaVA-Video the
    grid mapping of the newline-laid video (117-127), Qwen-VL its kept tokens (qwen2_5_vl.py:143-154)."""
    flat = grid.flatten(0, 1)
    if model == "llava_ov":
        return torch.cat((vidcom2_compression(flat, model, base_scale=retention), newline[None]))
    if model == "llava_vid":
        return vidcom2_compression(flat, model, base_scale=retention, img_feat=add_token_per_grid(grid, newline))
    return vidcom2_compression(flat, model, base_scale=retention, frame_token_len=grid.shape[1])


def our_sequence(model: str, kept: VideoTokens, newline: torch.Tensor) -> torch.Tensor:
    """What our adapters lay out for the LLM from the stage's tokens (llava_onevision.py, llava_video.py, qwen_vl.py)."""
    if model == "llava_ov":
        return torch.cat((kept.features, newline[None]))
    if model == "llava_vid":
        grid = kept.layout
        visual, _ = frame_end_layout(kept.features, kept.index, grid.tokens_per_frame, grid.frames, newline, kept.frame_newlines)
        return visual
    return kept.features


@pytest.mark.parametrize("case", CASES)
def test_the_llm_gets_the_released_sequence_in_float32(case):
    model, frames, rows, cols, dim, retention = CASES[case]
    grid = video(frames, rows * cols, dim, seed=len(case) + frames)
    newline = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    kept = VidCom2(retention=retention).select(stage_input(model, grid, rows, cols), {}, "")
    assert torch.equal(our_sequence(model, kept, newline), released_sequence(model, grid, retention, newline))
    assert kept.figures == {"vidcom2_tokens_in": frames * rows * cols, "vidcom2_kept": kept.index.numel()}
    if model == "llava_vid":
        assert kept.frame_newlines == rows  # all 13 of a frame's newlines, after its kept tokens
    else:
        assert kept.frame_newlines is None


@pytest.mark.parametrize("case", ["ov_capped", "ov_floor"])
def test_the_capped_and_floored_cases_reach_the_cap_and_the_floor(case):
    model, frames, rows, cols, dim, retention = CASES[case]
    selected = low_variance_channels(video(frames, rows * cols, dim, seed=len(case) + frames).flatten(0, 1), 0.5)
    counts = frame_counts(frame_budgets(centre_similarities(selected, rows * cols)[0], retention, 0.01), rows * cols)
    if case == "ov_capped":
        assert int(counts.max()) == rows * cols  # a whole frame: its budget capped at 1
    else:
        assert counts.tolist() == [1] * frames  # every frame's round(budget * N) is 0: the floor


@pytest.mark.parametrize("case", ["ov", "qwen"])
def test_the_kept_rows_are_the_released_indices_ascending(case):
    model, frames, rows, cols, dim, retention = CASES[case]
    grid = video(frames, rows * cols, dim, seed=3)
    kept = VidCom2(retention=retention).select(stage_input(model, grid, rows, cols), {}, "")
    grid_thw = torch.tensor([frames, rows * 2, cols * 2])  # the processor's grid in patches: 2x2 merged per token
    released = _compute_keep_indices(grid.flatten(0, 1), grid_thw, 2, retention)
    assert torch.equal(kept.index, released)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["ov", "video", "qwen"])
def test_in_half_precision_every_step_equals_the_release_bit_for_bit_and_ties_go_as_on_cuda(case, dtype):
    """The release computes in the model dtype. Scores, budgets and counts are the same bits; the kept tokens are the
    release's where a frame's boundary has no tie, and among tied scores CUDA topk's (lower index) choice, which the
    CPU topk of the release may not make: its kept scores are then the same values."""
    model, frames, rows, cols, dim, retention = CASES[case]
    tokens_per_frame = rows * cols
    flat = video(frames, tokens_per_frame, dim, seed=11, dtype=dtype).flatten(0, 1)
    selected = low_variance_channels(flat, 0.5)
    assert torch.equal(selected, select_low_var_channels(flat))
    to_video, to_frame = centre_similarities(selected, tokens_per_frame)
    released_video, released_frame = compute_gaussian_scores(selected, tokens_per_frame)
    assert to_video.dtype == dtype and torch.equal(to_video, released_video) and torch.equal(to_frame, released_frame)
    budgets = frame_budgets(to_video, retention, 0.01)
    assert torch.equal(budgets, compute_scales(-released_video.mean(dim=-1), retention))
    counts = frame_counts(budgets, tokens_per_frame)
    scores = released_video + released_frame
    released = select_outlier_indices(scores, budgets, tokens_per_frame)
    assert counts.tolist() == [len(idx) for idx in released]

    kept = vidcom2_kept(flat, tokens_per_frame, retention, 0.5, 0.01)
    per_frame = [kept[(kept // tokens_per_frame) == f] % tokens_per_frame for f in range(frames)]
    ties = 0
    for f, (ours, theirs) in enumerate(zip(per_frame, released, strict=True)):
        k = len(theirs)
        assert ours.tolist() == cuda_topk_smallest(scores[f], k)
        assert torch.equal(scores[f, ours].sort().values, scores[f, theirs].sort().values)
        ties += int(sorted(scores[f].tolist())[k - 1] == sorted(scores[f].tolist())[k])
    assert ties > 0  # half precision does tie at the boundary: the tie rule is exercised


# ---- the stage ----


def test_the_plan_is_the_nominal_r_of_the_grid_and_the_count_kept_moves_around_it():
    assert VidCom2(retention=0.25).planned_tokens(PlannedCounts.full(layout(32, 14, 14), layers=28)) == 1568
    assert VidCom2(retention=0.15).planned_tokens(PlannedCounts.full(layout(32, 14, 14), layers=28)) == pytest.approx(940.8)
    assert VidCom2(retention=0.25).planned_tokens(PlannedCounts.full(layout(64, 13, 13, "llava_video"), 28)) == 2704
    # One frame takes the whole softmax: it keeps round(196 * 0.25 * (2 - 1/32)) = 96, the others 47 (fp32) or 48 (bf16).
    one_hot = torch.zeros(32)
    one_hot[0] = 1.0
    for dtype, kept in [(torch.float32, 96 + 31 * 47), (torch.bfloat16, 96 + 31 * 48)]:
        budgets = (0.25 * (1 + one_hot.to(dtype) - one_hot.to(dtype).mean())).clamp(max=1.0)
        assert int(frame_counts(budgets, 196).sum()) == kept


def test_the_stage_needs_every_token_and_no_encoder_signal_and_keeps_consecutive_positions_on_llava():
    stage = VidCom2()
    assert stage.needs() == frozenset() and not stage.keeps_positions()
    tokens = tokens_of(video(4, 16, 8, seed=0), 4, 4)
    with pytest.raises(ConfigError, match="needs every video token; put it first"):
        stage.select(tokens.keep(torch.arange(10)), {}, "")


@pytest.mark.parametrize("family", ["llava_onevision", "llava_video", "qwen2_5_vl", "qwen3_vl"])
def test_every_family_is_accepted_with_no_encoder_signals(family):
    VidCom2().validate_for(ModelInfo(layers=28, signals=frozenset(), family=family, video_in_one_span=family != "qwen3_vl"))


def test_a_family_the_release_does_not_patch_is_refused_in_one_line_naming_it_and_an_alternative():
    with pytest.raises(ConfigError, match=r"vidcom2: no released VidCom2 code for the 'llava_next' model family .*random"):
        VidCom2().validate_for(ModelInfo(layers=28, signals=frozenset(), family="llava_next"))


def test_the_config_is_the_released_default():
    method = instantiate_method("vidcom2")
    assert method == VidCom2()
    assert method.describe() == {
        "name": "vidcom2",
        "retention": 0.25,
        "channel_share": 0.5,
        "temperature": 0.01,
        "mode": "official",
    }
    assert instantiate_method("vidcom2", {"method.retention": 0.15}).retention == 0.15
    assert instantiate_method("vidcom2", {"method.mode": "paper"}).describe()["mode"] == "paper"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"retention": 0.0}, "retention=0.0"),
        ({"retention": 1.5}, "retention=1.5"),
        ({"channel_share": 0.0}, "channel_share=0.0"),
        ({"channel_share": 1.2}, "channel_share=1.2"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"mode": "exact"}, r"^mode='exact'; use one of official, paper$"),  # one line
    ],
)
def test_bad_settings_fail_at_config_time_naming_the_value(settings, message):
    with pytest.raises(ConfigError, match=message):
        VidCom2(**settings)


# ---- through the wrapper on the tiny models ----

PROMPT = "What moves?"


def captured_prefill_embeds(lm: CompressedVideoLM, frames) -> tuple[torch.Tensor, SampleRecord]:
    """The inputs_embeds the language model receives in prefill, from one greedy step of `run_sample`."""
    captured: list[torch.Tensor] = []

    def capture(module, args, kwargs: dict[str, Any]):
        if not captured:
            captured.append(kwargs["inputs_embeds"].clone())

    handle = lm.adapter.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    record = SampleRecord("t", 0)
    try:
        lm.run_sample(frames, PROMPT, {"max_new_tokens": 1, "do_sample": False}, record, "t/0")
    finally:
        handle.remove()
    return captured[0][0], record


@pytest.mark.parametrize("adapter", [None, "llava_video"], ids=["llava_onevision", "llava_video"])
def test_on_the_tiny_llava_the_llm_reads_the_released_sequence(tiny_checkpoint, adapter, monkeypatch):
    frames = synthetic_frames("vidcom2")[:8]
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", adapter=adapter, method=VidCom2())
    encoded = lm.encode_video(frames, SampleRecord("t", 0))
    grid, tokens_per_frame = encoded.grid, encoded.layout.tokens_per_frame
    # The release's specs at the tiny grid (4 x 4 on OneVision, 3 x 3 on LLaVA-Video) instead of 196 and 13 x 13.
    monkeypatch.setitem(MODEL_SPECS, "llava_ov", {"tpf": tokens_per_frame, "mapper": "linear"})
    monkeypatch.setitem(MODEL_SPECS, "llava_vid", {"tpf": tokens_per_frame, "mapper": "grid_vid", "grid": encoded.layout.rows})
    model = "llava_vid" if adapter else "llava_ov"
    expected = released_sequence(model, grid, 0.25, encoded.newline)

    embeds, record = captured_prefill_embeds(lm, frames)
    prompt_ids = lm.tokenizer(lm.build_prompt(PROMPT), return_tensors="pt")["input_ids"][0]
    inputs = lm.adapter.generation_inputs(prompt_ids, expected, None, encoded.layout.full_tokens)
    start = inputs.visual_start
    assert embeds.shape[0] == inputs.input_ids.shape[1] and record.visual_tokens_in == expected.shape[0]
    assert torch.equal(embeds[start : start + expected.shape[0]], expected)
    kept = record.visual_tokens_by_stage["vidcom2"]
    newlines = 8 * encoded.layout.rows if adapter else 1
    assert kept == record.method_stats["vidcom2_kept"] and expected.shape[0] == kept + newlines


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def qwen_lm(request, tmp_path_factory):
    from dycoke_eval.offline.tiny_qwen import build_tiny_qwen_checkpoint

    checkpoint = build_tiny_qwen_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return CompressedVideoLM(pretrained=str(checkpoint), frames=16, device="cpu", method=VidCom2())


def test_on_the_tiny_qwen_models_the_released_tokens_keep_their_unpruned_positions(qwen_lm):
    """A frame is a temporal patch; the kept tokens are the qwen branch's (`_compute_keep_indices`), at the M-RoPE ids
    the full prompt gives them, with their DeepStack rows on Qwen3-VL."""
    adapter = qwen_lm.adapter
    frames = synthetic_frames("vidcom2-qwen")[:16]
    encoded = qwen_lm.encode_video(frames, SampleRecord("t", 0))
    layout = encoded.layout
    tokens = qwen_lm.compressor.select(encoded, "t/0").tokens
    grid_thw = adapter.video_grid_thw(adapter.config, layout, "cpu")[0]
    released = _compute_keep_indices(encoded.grid.flatten(0, 1), grid_thw, adapter.config.vision_config.spatial_merge_size, 0.25)
    assert layout.frames == 8 and torch.equal(tokens.index, released)
    assert torch.equal(tokens.features, encoded.grid.flatten(0, 1)[released])

    prompt_ids = adapter.tokenizer(qwen_lm.build_prompt(PROMPT), return_tensors="pt")["input_ids"][0]
    full = adapter.generation_inputs(prompt_ids, encoded.grid.flatten(0, 1), None, layout.full_tokens, encoded=encoded)
    visual, positions = adapter.assemble(encoded, tokens.features, tokens.index)
    pruned = adapter.generation_inputs(prompt_ids, visual, positions, layout.full_tokens, encoded=encoded)
    video_token = adapter.config.video_token_id
    full_pads = (full.input_ids[0] == video_token).nonzero().flatten()
    pruned_pads = (pruned.input_ids[0] == video_token).nonzero().flatten()
    full_ids, pruned_ids = full.kwargs["position_ids"][1:, 0], pruned.kwargs["position_ids"][1:, 0]
    assert torch.equal(pruned_ids[:, pruned_pads], full_ids[:, full_pads[released]])
    if adapter.family == "qwen3_vl":
        deepstack = pruned.kwargs["mm_encoder_outputs"]["video"].deepstack_features
        assert all(
            torch.equal(rows[0], layer.flatten(0, 1)[released]) for rows, layer in zip(deepstack, encoded.deepstack, strict=True)
        )

    _, record = captured_prefill_embeds(qwen_lm, frames)
    assert record.visual_tokens_in == released.numel() == record.method_stats["vidcom2_kept"]
