"""VidCom2 (EMNLP'25) before the LLM: each frame keeps its tokens least like the video and the frame, in a share of
the budget that grows with how unlike the video the frame is.

Released code: xuyang-liu16/VidCom2@944a17d1 `token_compressor/vidcom2/vidcom2.py` (the same file on the `qwen`
branch, @a85d485c), called by the model patches on the projected, pooled video tokens of one video:
* LLaVA-OneVision (`models/llava.py:152-168`): the [F*196, D] video; kept tokens in frame then raster order, then the
  video's one newline (the adapter's).
* LLaVA-Video (`models/llava.py:117-127`): scored on the 169 grid tokens of each frame (`flattened_image_feature`,
  taken before `add_token_per_grid`: the newline tokens take no part in any score), then `_map_grid_vid`
  (vidcom2.py:105-115) picks from the newline-laid video each frame's kept tokens in raster order followed by all 13
  of that frame's row newlines: rows lose their own newline, and 13 newlines per frame enter on top of the budget
  (`frame_newlines = rows`, consecutive positions).
* Qwen2.5-VL / Qwen3-VL (`qwen` branch, `models/qwen2_5_vl.py:20-33, 132-182`, `models/qwen3_vl.py` likewise, its
  DeepStack features sliced by the same rows): a "frame" is one temporal patch of h*w/4 merged tokens; the kept
  tokens keep their M-RoPE positions from the full prompt, as the Qwen adapters keep every token's grid position.

Arithmetic (vidcom2.py:26-78), in the features' dtype, as released (the model's: bf16 or fp16):
1. channels: each channel's variance over all F*N tokens (biased); only the int(D * channel_share) channels of
   lowest variance are scored (share 0.5).
2. tokens L2-normalised on those channels; the video centre is the mean of all of them, a frame's centre the mean
   of its own (neither normalised again).
3. a token's similarity to a centre is sum over a in (1/8, 1/4, 1/2, 1, 2) of exp(-|x - c|^2 / (2a)).
4. frame budgets: p = softmax((s - max s) / temperature) over the frames, s_f = -mean of the frame's video
   similarities (temperature 0.01); budget_f = R * (1 + p_f - mean p), capped at 1.
5. a frame keeps k_f = round(budget_f * N), at least 1, of its tokens: those of smallest video + frame similarity.

Quirks of the release, reproduced:
* Every step runs in the model dtype: in bf16, `1 + p` is rounded (budgets move in steps of R/128 near R) and
  `budget * N` is rounded to bf16 before `round` (half to even): 0.25 * (1 - 1/32) * 196 = 47.47 is 47.5 in bf16, 48
  (fp32: 47). At 32 frames x 196 with one frame taking all of p, R = 0.25 keeps 1,584 tokens in bf16, 1,553 in fp32.
* The budgets average R before rounding, the cap and the floor of one token: a frame's excess over 1 is dropped,
  not given to other frames. The plan is that nominal R * F * N; the count kept is the figure `vidcom2_kept`.
* The temperature of 0.01 on mean similarities makes p nearly one-hot: the most unlike frame keeps about 2R of its
  tokens (at most all), every other frame R * (1 - 1/F).

Ties: the release calls `topk(largest=False, sorted=False)` per frame, then sorts the indices. Here one stable sort
of every frame at once chooses, so among equal scores at a frame's boundary the lower index is kept: CUDA's topk
rule (the values below the k-th, then the equal ones in index order: PyTorch `aten/src/ATen/native/cuda/
TensorTopK.cu`, gatherTopK, "choose the first seen set"). The CPU's topk picks among ties by introselect, so on a CPU
the release keeps other tokens of the same score (on random videos 1-4% of the kept tokens in bf16, under 1% in
fp16; none in fp32). The channel choice calls topk as released. The release's specs fix N (196; 169 as 13 x 13);
here N, rows and columns are the layout's.

Host reads: one per video, the `nonzero` of the kept mask that sizes the output (released: the counts' `.tolist()`
and one topk per frame in a Python loop).

Modes. `mode="official"` (the default) is the released arithmetic above. `mode="paper"` follows the paper (arXiv
2505.14454, Eqs. 3-10 and Algorithm 1) where it differs from the release:
* all D channels are scored (the paper has no channel selection; `channel_share` is unused);
* the centres are means of the raw tokens: g_v over the video (Eq. 3), g_f,t over the frame (Eq. 7);
* a token's similarity to a centre is its cosine to it (Eqs. 4, 8), not the multi-scale Gaussian;
* sigma_t = exp(u~_t) / (sum_l exp(u~_l) + 1e-8), u~_t = (u_t - max u) / temperature (Eq. 5), and
  r_t = R * (1 + sigma_t - 1/T) with no cap (Eq. 6);
* a frame keeps k_t = ceil(r_t * M) tokens (Algorithm 1 line 32), at least 1 and at most its M (a frame cannot keep
  more tokens than it has; as min(ceil(x), M) = ceil(min(x, M)), this clamp keeps what the release's cap at 1 keeps,
  so the missing cap changes no count);
* computed in float32 whatever the model dtype (the paper states none); the kept tokens keep the model's values.
  Two float32 notes: the epsilon is below half an ulp of the denominator (>= 1, the largest term is exp(0)), so it
  changes nothing; where r_t * M is an integer in exact arithmetic, its float32 value may fall either side and ceil
  give one token more or fewer.
Everything else is the release's in both modes: u_t the mean (negated) video similarity of the frame's tokens, the
scores summed 1:1 (Eq. 9), each frame's smallest sums kept (the largest uniqueness, Eq. 10) with the same tie rule and
order, the families and layouts above, one host read. The plan is the nominal R * F * N in both modes (paper mode:
ceil keeps about F/2 tokens more, the clamp at M can keep fewer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dycoke_eval.compression.stages import ModelInfo, PlannedCounts, PreLLMStage, VideoTokens
from dycoke_eval.config import ConfigError

FAMILIES = ("llava_onevision", "llava_video", "qwen2_5_vl", "qwen3_vl")  # the families the release patches
BANDWIDTHS = tuple(2.0**k for k in range(-3, 2))  # the released alphas, 1/8 ... 2 (vidcom2.py:54)
MODES = ("official", "paper")
EPSILON = 1e-8  # in the denominator of the paper's softmax over frames (Eq. 5; released: none)


def low_variance_channels(features: torch.Tensor, share: float) -> torch.Tensor:
    """[M, D] -> [M, int(D * share)] the channels of lowest variance over all tokens (biased), in ascending variance."""
    count = int(features.shape[-1] * share)
    if count == 0:
        raise ConfigError(
            f"channel_share={share} scores int({share} * {features.shape[-1]}) = 0 channels; "
            f"choose channel_share >= {1 / features.shape[-1]:.4g}"
        )
    channels = features.var(dim=0, unbiased=False).topk(count, largest=False).indices
    return features[:, channels]


def multi_scale_gaussian(tokens: torch.Tensor, centre: torch.Tensor, bandwidths: tuple[float, ...]) -> torch.Tensor:
    """[F, N, C] tokens, a centre broadcast to them -> [F, N] sum over a of exp(-|x - c|^2 / (2a)), added in turn as
    released (in bf16 every partial sum is rounded)."""
    distance = ((tokens - centre) ** 2).sum(dim=-1)
    return sum(torch.exp(-distance / (2 * a)) for a in bandwidths)


def centres(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[F, N, C] -> ([1, 1, C] the mean of all tokens, [F, 1, C] each frame's mean)."""
    return frames.mean(dim=(0, 1), keepdim=True), frames.mean(dim=1, keepdim=True)


def centre_similarities(
    features: torch.Tensor, tokens_per_frame: int, bandwidths: tuple[float, ...] = BANDWIDTHS
) -> tuple[torch.Tensor, torch.Tensor]:
    """[F*N, C] -> ([F, N] similarity to the video centre, [F, N] to the token's frame centre), on normalised tokens."""
    frames = F.normalize(features.view(-1, tokens_per_frame, features.shape[-1]), dim=-1)
    video_centre, frame_centre = centres(frames)
    return multi_scale_gaussian(frames, video_centre, bandwidths), multi_scale_gaussian(frames, frame_centre, bandwidths)


def cosine_similarities(features: torch.Tensor, tokens_per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper: [F*N, D] -> ([F, N] cosine to the mean of the raw tokens (Eqs. 3, 4), [F, N] to the frame's (Eqs. 7, 8))."""
    frames = features.view(-1, tokens_per_frame, features.shape[-1])
    video_centre, frame_centre = centres(frames)
    return F.cosine_similarity(frames, video_centre, dim=-1), F.cosine_similarity(frames, frame_centre, dim=-1)


def frame_softmax(video_similarity: torch.Tensor, temperature: float, epsilon: float | None = None) -> torch.Tensor:
    """[F, N] similarity to the video centre -> [F] p, a softmax over frames of u_f / temperature, u_f the frame's mean
    dissimilarity, shifted by its max: torch's softmax (released) or, with `epsilon`, exp / (sum exp + epsilon) (Eq. 5)."""
    scores = -video_similarity.mean(dim=-1)
    shifted = (scores - scores.max()) / temperature
    if epsilon is None:
        return F.softmax(shifted, dim=0)
    exps = shifted.exp()
    return exps / (exps.sum() + epsilon)


def frame_budgets(video_similarity: torch.Tensor, retention: float, temperature: float) -> torch.Tensor:
    """[F, N] similarity to the video centre -> [F] share of each frame's tokens to keep: R * (1 + p_f - mean p), p the
    softmax over frames of their mean dissimilarity / temperature, capped at 1."""
    probs = frame_softmax(video_similarity, temperature)
    return (retention * (1 + probs - probs.mean())).clamp(max=1.0)


def paper_frame_budgets(video_similarity: torch.Tensor, retention: float, temperature: float) -> torch.Tensor:
    """Paper: [F, N] -> [F] r_t = R * (1 + sigma_t - 1/T) (Eq. 6), sigma with the epsilon of Eq. 5; no cap."""
    probs = frame_softmax(video_similarity, temperature, EPSILON)
    return retention * (1 + probs - 1 / probs.shape[0])


def frame_counts(budgets: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """[F] budgets -> [F] tokens each frame keeps: round(budget * N) (half to even, in the budgets' dtype), at least 1."""
    return (budgets * tokens_per_frame).round().long().clamp(min=1)


def paper_frame_counts(budgets: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Paper: [F] budgets -> [F] ceil(r_t * M) (Algorithm 1 line 32), at least 1, at most the frame's M tokens."""
    return (budgets * tokens_per_frame).ceil().long().clamp(min=1, max=tokens_per_frame)


def smallest_per_frame(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[F, N] scores, [F] counts -> [F, N] mask of each frame's `counts[f]` smallest scores; among equal scores at the
    boundary the lower index (CUDA topk's choice)."""
    order = scores.argsort(dim=-1, stable=True)
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, ranks)
    return rank < counts[:, None]


def vidcom2_kept(
    features: torch.Tensor,
    tokens_per_frame: int,
    retention: float,
    channel_share: float,
    temperature: float,
    mode: str = "official",
) -> torch.Tensor:
    """[F*N, D] one video's tokens, frame by frame -> [K] the kept rows, ascending (frame, then raster order): the
    released arithmetic in the features' dtype (official) or the paper's in float32 (paper)."""
    if mode == "paper":
        video, frame = cosine_similarities(features.float(), tokens_per_frame)
        counts = paper_frame_counts(paper_frame_budgets(video, retention, temperature), tokens_per_frame)
    else:
        video, frame = centre_similarities(low_variance_channels(features, channel_share), tokens_per_frame)
        counts = frame_counts(frame_budgets(video, retention, temperature), tokens_per_frame)
    return smallest_per_frame(video + frame, counts).flatten().nonzero().squeeze(1)  # the one host read


@dataclass
class VidCom2(PreLLMStage):
    retention: float = 0.25  # R (the release's R_RATIO, default 0.25): the frame budgets average R before rounding
    channel_share: float = 0.5  # scores use the int(D * share) channels of lowest variance (released: ratio=0.5)
    temperature: float = 0.01  # of the softmax over frames that shares out the budget (released: temp=0.01)
    mode: str = "official"  # official (the release's arithmetic) | paper (its Eqs. 3-10, ceil, float32)
    name: str = "vidcom2"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; use one of {', '.join(MODES)}")
        if not 0 < self.retention <= 1:
            raise ConfigError(f"retention={self.retention}: VidCom2 keeps a share of the video's tokens in (0, 1]")
        if not 0 < self.channel_share <= 1:
            raise ConfigError(f"channel_share={self.channel_share}: the share of channels scored is in (0, 1] (released 0.5)")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature}: the softmax over frames needs a temperature > 0 (released 0.01)")

    def check(self, model: ModelInfo) -> None:
        if model.family not in FAMILIES:
            raise ConfigError(
                f"{self.name}: no released VidCom2 code for the {model.family!r} model family (it patches "
                f"{', '.join(FAMILIES)}); choose a method of every family (random, pooling)"
            )
        super().check(model)

    def planned_tokens(self, counts: PlannedCounts) -> float:
        return self.retention * counts.layout.grid_tokens  # nominal in both modes: per-frame rounding, cap and floor move it

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        features = tokens.grid().flatten(0, 1)
        kept = vidcom2_kept(features, tokens.tokens_per_frame, self.retention, self.channel_share, self.temperature, self.mode)
        # LLaVA-Video (`_map_grid_vid`): each frame's kept tokens, then all its rows' newlines
        newlines = tokens.rows if tokens.layout.family == "llava_video" else None
        return tokens.replaced(
            features[kept],
            tokens.index[kept],
            frame_newlines=newlines,
            vidcom2_tokens_in=features.shape[0],
            vidcom2_kept=kept.shape[0],
        )
