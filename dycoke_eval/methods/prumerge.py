"""LLaVA-PruMerge / PruMerge+ (baseline) on SigLIP, which has no CLS token, in two modes.

`mode: adapted` (default), per frame: score each patch with the vision encoder's own attention at
the feature layer, keep as many top-scoring tokens as there are IQR outliers among the frame's
scores (the adaptive ratio), and let each kept token absorb its 32 nearest neighbours among the
pruned ones (cosine over that layer's keys), weighted by their scores. PruMerge+ first adds
spatially uniform samples. Output in spatial order.

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
  vision tower that keeps the head, which the llava-hf OneVision checkpoints drop.
Scores and keys are pooled from the patch grid to the token grid by the model's own
`apply_pooling`, exactly as the features are. The achieved ratio is reported per sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from dycoke_eval.config import ConfigError
from dycoke_eval.methods.base import CompressionMethod, GenerationContext
from dycoke_eval.plumbing.attention import attention_kernel, routed_attention, vision_tower
from dycoke_eval.plumbing.hooks import captured_output

VARIANTS = ("base", "plus")
SCORE_SOURCES = ("mean_received", "pooling_head")
MODES = ("adapted", "official")


def iqr_outliers(scores: torch.Tensor) -> int:
    """How many of all the scores lie above Q3 + 1.5 IQR; float32 quartiles, as numpy gives the released code."""
    flat = scores.float().flatten()
    q1, q3 = torch.quantile(flat, torch.tensor([0.25, 0.75], device=flat.device))
    return int((flat > q3 + 1.5 * (q3 - q1)).sum())


def iqr_outlier_count(scores: torch.Tensor) -> int:
    """The adapted keep count of one frame: its IQR outliers, at least one."""
    return max(1, iqr_outliers(scores))


def uniform_samples(tokens: int, kept: torch.Tensor) -> torch.Tensor:
    """PruMerge+'s extra tokens: a stride of int(int(1/ratio)/3) over the grid, minus those already kept."""
    stride = max(1, int(int(tokens / kept.numel()) / 3))
    grid = torch.arange(0, tokens - 1, stride, device=kept.device)
    return grid[~torch.isin(grid, kept)]


def merge_into_kept(
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
) -> torch.Tensor:
    """[N, D] features, [N] scores, [N, Dk] keys of one frame -> its kept, merged tokens in spatial order."""
    kept = scores.topk(iqr_outlier_count(scores)).indices
    if variant == "plus":
        kept = torch.cat([kept, uniform_samples(scores.numel(), kept)])
    return merge_into_kept(features, scores, keys, kept.sort().values, neighbours)


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
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    similarity = _rows(unit, selected) @ unit.transpose(1, 2)  # [F, S, N]
    similarity.scatter_(2, selected.unsqueeze(-1), float("-inf"))  # a token is not its own neighbour
    nearest = similarity.topk(min(neighbours, scores.shape[1] - 1), dim=-1).indices
    weights = torch.zeros_like(similarity).scatter_(2, nearest, scores.float().gather(1, nearest.flatten(1)).view_as(nearest))
    return _rows(features.float(), selected) + weights @ features.float()


def pruned_remainder(features: torch.Tensor, scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """[F, D]: the released extra token of each frame, the score-weighted sum of the tokens it did not select."""
    weights = scores.float().scatter(1, selected, 0.0)
    return (weights.unsqueeze(1) @ features.float()).squeeze(1)


def prumerge_official(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, variant: str, neighbours: int = 32
) -> torch.Tensor:
    """[F, N, D] features, [F, N] scores, [F, N, Dk] keys -> [V, D]: each frame's merged selection, then its extra token."""
    selected, new = official_selection(scores, variant)
    merged = official_merge(features, scores, keys, selected, neighbours)
    tokens = torch.cat([merged, pruned_remainder(features, scores, selected).unsqueeze(1)], dim=1)
    return tokens[torch.cat([new, new.new_ones(len(new), 1)], dim=1)].to(features.dtype)


def _rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[F, N, C] values, [F, S] index -> [F, S, C]."""
    return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


@dataclass
class PruMerge(CompressionMethod):
    variant: str = "base"  # base | plus
    mode: str = "adapted"  # adapted | official (the released per-image arithmetic, per frame)
    score_source: str = "mean_received"  # mean_received | pooling_head
    neighbours: int = 32
    planned_ratio: float = 0.55  # for plans before a run: the paper's reported ratio (the real one is adaptive)
    name: str = "prumerge"
    reuses_encoder_outputs: ClassVar[bool] = False  # its scores come from the encoder's attention, captured while it runs
    routes_attention: ClassVar[bool] = True  # the vision tower's attention, to capture keys and scores
    _captured: dict[str, torch.Tensor] = field(init=False, repr=False, default_factory=dict)
    _stats: dict[str, Any] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant={self.variant!r}; use one of {', '.join(VARIANTS)}")
        if self.score_source not in SCORE_SOURCES:
            raise ConfigError(f"score_source={self.score_source!r}; use one of {', '.join(SCORE_SOURCES)}")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; use one of {', '.join(MODES)}")

    def validate_for(self, model_config: Any) -> None:
        if self.score_source == "pooling_head" and not model_config.vision_config.vision_use_head:
            raise ConfigError(
                "score_source=pooling_head needs SigLIP's attention-pooling head, which this checkpoint's vision "
                "tower does not have (vision_use_head=false); use score_source=mean_received"
            )

    def planned_visual_tokens(self, frames: int, tokens_per_frame: int, layers: int) -> tuple[list[float], list[float]]:
        kept = float(frames * tokens_per_frame) * self.planned_ratio
        return [kept] * layers, [kept] * layers

    def planned_retained_ratio(self) -> float:
        return self.planned_ratio

    @contextlib.contextmanager
    def during_vision_encoding(self, model: Any) -> Iterator[None]:
        """Capture the feature layer's keys and the patch scores while the encoder runs."""
        tower = vision_tower(model)
        feature_layer = model.config.vision_feature_layer
        target = tower.encoder.layers[feature_layer if feature_layer < 0 else feature_layer - 1].self_attn
        captured: dict[str, torch.Tensor] = {}
        kernel = attention_kernel(tower)

        def attention(module, query, key, value, attention_mask, **kwargs):
            if module is target:
                captured["keys"] = key.transpose(1, 2).flatten(2)  # [frames, patches, heads*dim]
                if self.score_source == "mean_received":
                    captured["scores"] = torch.stack(
                        [_mean_received(q, k, kwargs["scaling"]) for q, k in zip(query, key, strict=True)]
                    )
            return kernel(module, query, key, value, attention_mask, **kwargs)

        probe_input = captured_output(tower.post_layernorm, captured, "hidden")
        with routed_attention(tower, "prumerge_capture", attention), probe_input:
            yield
        if self.score_source == "pooling_head":
            captured["scores"] = _probe_attention(tower.head, captured["hidden"])
        pool = model.model.apply_pooling  # the features' own 2x2 bilinear pooling
        self._captured = {"scores": pool(captured["scores"].unsqueeze(-1)).squeeze(-1), "keys": pool(captured["keys"])}

    def select_video_tokens(self, frame_features: torch.Tensor, sample: str = "") -> torch.Tensor:
        scores, keys = self._captured["scores"], self._captured["keys"]
        if self.mode == "official":
            kept = prumerge_official(frame_features, scores, keys, self.variant, self.neighbours)
        else:
            frames = zip(frame_features, scores, keys, strict=True)
            kept = torch.cat([prumerge_frame(f, s, k, self.variant, self.neighbours) for f, s, k in frames])
        self._stats = {"prumerge_tokens_in": frame_features.shape[0] * frame_features.shape[1], "prumerge_tokens_out": len(kept)}
        return kept

    @contextlib.contextmanager
    def during_generation(self, context: GenerationContext) -> Iterator[None]:
        yield
        context.stats.update(self._stats, retained_ratio=self._stats["prumerge_tokens_out"] / self._stats["prumerge_tokens_in"])


def _mean_received(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """[H, P, d] query and key of one frame -> [P] attention each patch receives, head and query mean."""
    return (query.float() @ key.float().transpose(-1, -2) * scaling).softmax(dim=-1).mean(dim=(0, 1))


def _probe_attention(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[frames, P, D] post-layernorm states -> [frames, P] attention of SigLIP's pooling-head probe."""
    probe = head.probe.expand(hidden.shape[0], -1, -1)
    return head.attention(probe, hidden, hidden, need_weights=True)[1][:, 0]
