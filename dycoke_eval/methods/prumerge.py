"""LLaVA-PruMerge / PruMerge+ (baseline) on SigLIP, which has no CLS token, in two modes.

`mode: adapted` (default), per frame: score each patch with the vision encoder's own attention at
the feature layer, keep as many top-scoring tokens as there are IQR outliers among the frame's
scores (the adaptive ratio), and let each kept token absorb its 32 nearest neighbours among the
pruned ones (cosine over that layer's keys), weighted by their scores. PruMerge+ first adds
spatially uniform samples. Output in spatial order. All frames are computed at once, their kept
tokens padded to the widest frame's count, so a video costs one read of that count and one compaction.

`mode: official`: the released per-image arithmetic (42Shawn/LLaVA-PruMerge, clip_encoder.py,
`token_prune_merge_advanced[_plus]`) with each frame as one image, on the same scores and keys:
one outlier ratio over all frames together, `int(N * ratio)` top tokens per frame in descending
score order, then PruMerge+'s grid (stride `int(int(1/ratio)/3)` over `[0, N-1)`); neighbours are
searched among all other tokens, kept ones included; one extra token per frame, the score-weighted
sum of the unselected tokens, closes each frame.

No official SigLIP adaptation exists (open questions in DyCoke's and PruMerge's trackers).
`score_source` names the choice made here:
* `mean_received` (default): the attention each patch receives, averaged over heads and queries;
* `pooling_head`: the attention of SigLIP's pooling-head probe (FastVID's recipe). It needs a
  vision tower that keeps the head, which the llava-hf OneVision checkpoints drop, or the head read from
  SigLIP's own checkpoint (model setting `siglip_head`).
Scores and keys are encoder signals the model adapter captures in the encoder pass and pools from
the patch grid to the token grid exactly as the features are. The achieved ratio is reported per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dycoke_eval.compression.stages import ModelInfo, PlannedCounts, PreLLMStage, VideoTokens
from dycoke_eval.config import ConfigError
from dycoke_eval.geometry import LLAVA_FAMILIES
from dycoke_eval.methods.padded import below

VARIANTS = ("base", "plus")
SCORE_SOURCES = {"mean_received": "attention_received", "pooling_head": "probe_attention"}  # setting -> encoder signal
MODES = ("adapted", "official")


def iqr_outlier_counts(scores: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [...]: how many scores of each row lie above Q3 + 1.5 IQR; float32 quartiles, as numpy gives the
    released code."""
    values = scores.float()
    q1, q3 = torch.quantile(values, values.new_tensor([0.25, 0.75]), dim=-1, keepdim=True)
    return (values > q3 + 1.5 * (q3 - q1)).sum(dim=-1)


def iqr_outliers(scores: torch.Tensor) -> int:
    """How many of all the scores, pooled, are IQR outliers (the released ratio's numerator)."""
    return int(iqr_outlier_counts(scores.flatten()))


def keep_counts(scores: torch.Tensor) -> torch.Tensor:
    """[F, N] -> [F]: the adapted keep count of each frame, its IQR outliers, at least one."""
    return iqr_outlier_counts(scores).clamp(min=1)


def top_scoring(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[F, N] scores, [F] counts -> [F, N] mask of each frame's `count` highest scores.

    Equal scores at the boundary go to the lower index, as CUDA's topk kernel picks them by its source (not yet run on a GPU;
    CPU's topk leaves them unspecified), so one stable rank order serves every frame's count.
    """
    order = scores.sort(dim=-1, descending=True, stable=True).indices  # rank -> token
    ranked_in = below(scores.shape[-1], counts, scores.device)
    return torch.zeros_like(ranked_in).scatter(-1, order, ranked_in)


def uniform_grid(tokens: int, counts: torch.Tensor) -> torch.Tensor:
    """[F] counts -> [F, N] mask of PruMerge+'s samples: a stride of int(int(1/ratio)/3) over [0, N - 1)."""
    stride = (tokens // counts // 3).clamp(min=1)
    position = torch.arange(tokens, device=counts.device)
    return (position % stride.unsqueeze(-1) == 0) & (position < tokens - 1)


def adapted_selection(scores: torch.Tensor, variant: str) -> torch.Tensor:
    """[F, N] scores -> [F, N] mask of the tokens each frame keeps."""
    counts = keep_counts(scores)
    kept = top_scoring(scores, counts)
    return kept | uniform_grid(scores.shape[-1], counts) if variant == "plus" else kept


def padded_positions(kept: torch.Tensor) -> torch.Tensor:
    """[F, N] mask -> [F, S]: each frame's kept positions in ascending order, then pruned ones as padding, S being
    the widest frame's count (read to the host: the one wait before the end)."""
    widest = int(kept.sum(dim=-1).amax())
    return kept.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices[:, :widest]


def key_cosines(keys: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[F, N, Dk] keys, [F, S] centres -> [F, S, N]: each centre's key cosine with every token of its frame."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    return _rows(unit, centres) @ unit.transpose(1, 2)


def absorb_neighbours(
    features: torch.Tensor, weights: torch.Tensor, centres: torch.Tensor, similarity: torch.Tensor, neighbours: int
) -> torch.Tensor:
    """[F, S] centres -> [F, S, D] float: each centre plus its `neighbours` most similar tokens weighted by [F, N]
    `weights`, summed as one product over all the frame's tokens (the others weigh zero)."""
    nearest = similarity.topk(neighbours, dim=-1).indices
    spread = torch.zeros_like(similarity).scatter_(2, nearest, weights.gather(1, nearest.flatten(1)).view_as(nearest))
    values = features.float()
    return _rows(values, centres) + spread @ values


def merge_into_kept(
    features: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    kept: torch.Tensor,
    slots: torch.Tensor,
    neighbours: int = 32,
) -> torch.Tensor:
    """[F, S] slots (`padded_positions`) -> [F, S, D]: each kept token plus the score-weighted sum of its nearest
    pruned tokens (cosine over keys), every frame in one product.

    Kept tokens are no candidates: where a frame has fewer pruned tokens than `neighbours`, the kept ones the search
    then reaches weigh nothing, so the frame merges all its pruned tokens, as alone. The sums have the terms of each
    frame's own product over its pruned tokens, but BLAS rounds a product by its shape (MKL by its row count too), so
    their last bits can differ from a frame merged alone.
    """
    similarity = key_cosines(keys, slots).masked_fill_(kept.unsqueeze(1), float("-inf"))
    pruned_scores = scores.float().masked_fill(kept, 0.0)
    return absorb_neighbours(features, pruned_scores, slots, similarity, min(neighbours, scores.shape[1])).to(features.dtype)


def prumerge_adapted(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, variant: str, neighbours: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """[F, N, D] features, [F, N] scores, [F, N, Dk] keys -> [V, D]: each frame's kept, merged tokens in spatial
    order, frame after frame, and their flat grid index [V]."""
    frames, tokens = scores.shape
    kept = adapted_selection(scores, variant)
    slots = padded_positions(kept)
    merged = merge_into_kept(features, scores, keys, kept, slots, neighbours)
    index = slots + torch.arange(frames, device=slots.device).unsqueeze(1) * tokens
    real = kept.gather(1, slots).flatten().nonzero().squeeze(1)  # the padding slots hold pruned tokens
    return merged.flatten(0, 1)[real], index.flatten()[real]


def official_keep_count(ratio: float, tokens: int) -> int:
    """The released top-k size, `int(N * ratio)` after the ratio is formed: float error can floor a token away."""
    return int(tokens * ratio)


def official_grid(ratio: float, tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """PruMerge+'s released samples: stride int(int(1/ratio)/3) over [0, N - 1), N - 1 being CLIP's hard-coded 575.

    With no outlier at all the released code divides by zero; here the stride's limit applies (token 0 alone).
    """
    stride = int(int(1 / ratio) / 3) if ratio else tokens
    return torch.arange(0, tokens - 1, stride, device=device)


def official_selection(scores: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[F, N] scores -> [F, S] token indices and which of them are new: the released choice per frame.

    The top `int(N * ratio)` by descending score, the ratio being the outlier fraction of all frames together
    (the released code pools its batch); PruMerge+ appends its grid, whose points a frame already keeps are
    marked not new (the released code filters them out).
    """
    frames, tokens = scores.shape
    ratio = iqr_outliers(scores) / scores.numel()
    top = scores.topk(official_keep_count(ratio, tokens), dim=-1).indices
    new = torch.ones_like(top, dtype=torch.bool)
    if variant == "base":
        return top, new
    grid = official_grid(ratio, tokens, scores.device).expand(frames, -1)
    fresh = (grid.unsqueeze(-1) != top.unsqueeze(-2)).all(dim=-1)
    return torch.cat([top, grid], dim=1), torch.cat([new, fresh], dim=1)


def official_merge(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, selected: torch.Tensor, neighbours: int = 32
) -> torch.Tensor:
    """[F, S] selected tokens -> [F, S, D]: each plus the score-weighted sum of its nearest tokens by key cosine.

    As released, the neighbours come from all the frame's other tokens, selected ones included, and carry their
    original features, so one batched product gives what the released loop builds token by token.
    """
    similarity = key_cosines(keys, selected)
    similarity.scatter_(2, selected.unsqueeze(-1), float("-inf"))  # a token is not its own neighbour
    return absorb_neighbours(features, scores.float(), selected, similarity, min(neighbours, scores.shape[1] - 1))


def pruned_remainder(features: torch.Tensor, scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """[F, D]: the released extra token of each frame, the score-weighted sum of the tokens it did not select."""
    weights = scores.float().scatter(1, selected, 0.0)
    return (weights.unsqueeze(1) @ features.float()).squeeze(1)


def prumerge_official(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, variant: str, neighbours: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """[F, N, D] features, [F, N] scores, [F, N, Dk] keys -> [V, D]: each frame's merged selection, then its extra token.

    Also returns each token's flat grid index [V] (-1 for the extra tokens, which sit at no grid position).
    """
    frames, tokens = scores.shape
    selected, new = official_selection(scores, variant)
    merged = official_merge(features, scores, keys, selected, neighbours)
    out = torch.cat([merged, pruned_remainder(features, scores, selected).unsqueeze(1)], dim=1)
    offsets = torch.arange(frames, device=selected.device)[:, None] * tokens
    index = torch.cat([selected + offsets, -selected.new_ones(frames, 1)], dim=1)
    chosen = torch.cat([new, new.new_ones(frames, 1)], dim=1)
    return out[chosen].to(features.dtype), index[chosen]


def _rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[F, N, C] values, [F, S] index -> [F, S, C]."""
    return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


@dataclass
class PruMerge(PreLLMStage):
    variant: str = "base"  # base | plus
    mode: str = "adapted"  # adapted | official (the released per-image arithmetic, per frame)
    score_source: str = "mean_received"  # mean_received | pooling_head
    neighbours: int = 32
    planned_ratio: float = 0.55  # for plans before a run: the paper's reported ratio (the real one is adaptive)
    name: str = "prumerge"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant={self.variant!r}; use one of {', '.join(VARIANTS)}")
        if self.score_source not in SCORE_SOURCES:
            raise ConfigError(f"score_source={self.score_source!r}; use one of {', '.join(SCORE_SOURCES)}")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; use one of {', '.join(MODES)}")

    @property
    def score_signal(self) -> str:
        return SCORE_SOURCES[self.score_source]

    def needs(self) -> frozenset[str]:
        return frozenset({"keys", self.score_signal})

    def check(self, model: ModelInfo) -> None:
        if model.family not in LLAVA_FAMILIES:
            raise ConfigError(
                f"{self.name}: LLaVA-PruMerge scores with CLIP/SigLIP attention and keys, and has no released code for "
                f"the {model.family!r} model family, whose ViT this harness takes no such signals from; run it on a LLaVA "
                "model, or choose a method of every family (dycoke_ttm, random, pooling)"
            )
        if self.mode == "official" and model.family == "llava_video":
            raise ConfigError(
                f"{self.name}: the released arithmetic adds a token at no grid position, which the llava_video model "
                "family (a newline after every row) cannot place; use method=prumerge (the adapted arithmetic)"
            )
        if self.score_source == "pooling_head" and "probe_attention" not in model.signals:
            raise ConfigError(
                "score_source=pooling_head needs SigLIP's attention-pooling head, which this checkpoint's vision "
                "tower does not have (vision_use_head=false): set model.siglip_head (e.g. google/siglip-so400m-patch14-384) "
                "or use score_source=mean_received"
            )
        super().check(model)

    def planned_tokens(self, counts: PlannedCounts) -> float:
        return counts.layout.grid_tokens * self.planned_ratio

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        grid = tokens.grid()
        scores, keys = signals[self.score_signal], signals["keys"]
        if self.mode == "official":
            kept, index = prumerge_official(grid, scores, keys, self.variant, self.neighbours)
        else:
            kept, index = prumerge_adapted(grid, scores, keys, self.variant, self.neighbours)
        return tokens.replaced(kept, index, prumerge_tokens_in=grid.shape[0] * grid.shape[1], prumerge_tokens_out=len(kept))
