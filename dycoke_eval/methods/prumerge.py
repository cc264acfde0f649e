"""LLaVA-PruMerge / PruMerge+ (baseline), adapted to SigLIP, which has no CLS token.

Per frame: score each patch with the vision encoder's own attention at the feature layer, keep
as many top-scoring tokens as there are IQR outliers among the scores (the adaptive ratio), and
let each kept token absorb its 32 nearest neighbours among the pruned ones (cosine over that
layer's keys), weighted by their scores. PruMerge+ first adds spatially uniform samples.

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
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dycoke_eval.config import ConfigError
from dycoke_eval.methods.base import CompressionMethod, GenerationContext
from dycoke_eval.plumbing.attention import routed_attention, vision_tower
from dycoke_eval.plumbing.hooks import captured_output

VARIANTS = ("base", "plus")
SCORE_SOURCES = ("mean_received", "pooling_head")


def iqr_outlier_count(scores: torch.Tensor) -> int:
    """How many scores lie above Q3 + 1.5 IQR (at least one): PruMerge's adaptive token count."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return max(1, int((scores > q3 + 1.5 * (q3 - q1)).sum()))


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


@dataclass
class PruMerge(CompressionMethod):
    variant: str = "base"  # base | plus
    score_source: str = "mean_received"  # mean_received | pooling_head
    neighbours: int = 32
    planned_ratio: float = 0.55  # for plans before a run: the paper's reported ratio (the real one is adaptive)
    name: str = "prumerge"
    reuses_encoder_outputs: ClassVar[bool] = False  # its scores come from the encoder's attention, captured while it runs
    _captured: dict[str, torch.Tensor] = field(init=False, repr=False, default_factory=dict)
    _stats: dict[str, Any] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant={self.variant!r}; use one of {', '.join(VARIANTS)}")
        if self.score_source not in SCORE_SOURCES:
            raise ConfigError(f"score_source={self.score_source!r}; use one of {', '.join(SCORE_SOURCES)}")

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

        def attention(module, query, key, value, attention_mask, **kwargs):
            if module is target:
                captured["keys"] = key.transpose(1, 2).flatten(2)  # [frames, patches, heads*dim]
                if self.score_source == "mean_received":
                    captured["scores"] = torch.stack(
                        [_mean_received(q, k, kwargs["scaling"]) for q, k in zip(query, key, strict=True)]
                    )
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        probe_input = captured_output(tower.post_layernorm, captured, "hidden")
        with routed_attention(tower, "prumerge_capture", attention), probe_input:
            yield
        if self.score_source == "pooling_head":
            captured["scores"] = _probe_attention(tower.head, captured["hidden"])
        pool = model.model.apply_pooling  # the features' own 2x2 bilinear pooling
        self._captured = {"scores": pool(captured["scores"].unsqueeze(-1)).squeeze(-1), "keys": pool(captured["keys"])}

    def select_video_tokens(self, frame_features: torch.Tensor) -> torch.Tensor:
        scores, keys = self._captured["scores"], self._captured["keys"]
        kept = [
            prumerge_frame(f, s, k, self.variant, self.neighbours) for f, s, k in zip(frame_features, scores, keys, strict=True)
        ]
        self._stats = {
            "prumerge_tokens_in": frame_features.shape[0] * frame_features.shape[1],
            "prumerge_tokens_out": sum(len(k) for k in kept),
        }
        return torch.cat(kept)

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
