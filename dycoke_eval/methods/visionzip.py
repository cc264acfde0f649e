"""VisionZip (baseline of FastVID's Table 1) on SigLIP video tokens, in the table's two forms.

The released method (dvlab-research/VisionZip, `visionzip/clip_encoder.py`; CLIP LLaVA only), per image:
* **dominant** tokens: the top tokens by the encoder's attention at the feature layer, in ascending index order;
* **contextual** tokens: the remaining tokens (ascending) give targets at 0, step, 2*step, ... (the first n_ctx,
  `step = max(1, n_rest // n_ctx)`); every other remaining token goes to the target whose key is most
  similar (cosine of the feature layer's keys, head mean), and `contextual = target + mean(assigned)`.
  Quirk: that is a *sum* of the target and its assigned tokens' mean, not an average of all of them
  (a target with nothing assigned stays as it is). `merge: mean` offers the average `(target + sum) / (1 + n)`.
* output `[dominant..., contextual...]`, not re-sorted: the LLM reads the tokens in that order, with
  consecutive positions (VisionZip emits a new token list).

`form` picks where it acts, as the two VisionZip rows of FastVID's Table 1 do:
* `after_pooling` (FastVID's own baseline, unreleased; the only public port is HoliTom's
  `visionzip/llava_arch.py`): per frame on the pooled grid (196 tokens on LLaVA-OV, 169 on LLaVA-Video), with
  the pooled signals `attention_received` (attention each token receives, head and query mean) and `keys`.
  HoliTom pairs its ascending dominant tokens with grid positions in score order, which puts them in the
  wrong rows of LLaVA-Video's grid layout; here each token carries its own position.
* `in_encoder` (the original VisionZip, before pooling): per frame on the unpooled patches (729 real) with
  `patch_attention_received` and `patch_keys`; the tokens are the projected, unpooled `patch_features` (no
  pooling is applied to them). SigLIP has no CLS token: the dominance score is the attention each patch
  receives, and no CLS is kept, so every dominant slot is a patch (the released CLIP code spends one on CLS).

Both forms keep S = int(R * N) tokens per frame, N being the pooled grid's tokens per frame, so the LLM
sees as many tokens as the other rows at the same R (`frame_tokens` sets S itself: HoliTom runs 50/40/30/20
of 196): `dominant = int(S * dominant_share)` (54/64, the released 54+10 split and HoliTom's default) and
`contextual = S - dominant`.

Each kept token reports a grid index (for newline placement and figures): a pooled token its own; a patch
(r, c) of the side x side patch grid the pooled cell (r * rows // side, c * cols // side), which is always
inside the grid (r < side gives r * rows // side < rows), so no clipping is needed. Several patches can
share a cell.

Differences from the released arithmetic: cosines in float32 (released: the model dtype), features summed
in float32 and cast back; topk order among tied scores is device-dependent in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dycoke_eval.compression.stages import ModelInfo, PlannedCounts, PreLLMStage, VideoTokens
from dycoke_eval.config import ConfigError
from dycoke_eval.geometry import LLAVA_FAMILIES

FORMS = ("after_pooling", "in_encoder")
SCORES = ("attention_received", "probe_attention")  # encoder signals that rank the dominant tokens
MERGES = ("official", "mean")
PATCH = "patch_"  # the unpooled signals' prefix (in_encoder)


def kept_per_frame(tokens_per_frame: int, retention: float, frame_tokens: int | None = None) -> int:
    """S: `frame_tokens` if set, else int(R * N) (FastVID's per-frame count), between 1 and N."""
    if frame_tokens is not None:
        if not 1 <= frame_tokens <= tokens_per_frame:
            raise ConfigError(
                f"frame_tokens={frame_tokens}: a frame has {tokens_per_frame} tokens; choose 1 to {tokens_per_frame}"
            )
        return frame_tokens
    kept = int(retention * tokens_per_frame)
    if kept == 0:
        raise ConfigError(
            f"retention={retention} keeps int({retention} * {tokens_per_frame}) = 0 tokens per frame; "
            f"choose retention >= {1 / tokens_per_frame:.4g}"
        )
    return kept


def frame_split(kept: int, dominant_share: float) -> tuple[int, int]:
    """(dominant, contextual) of S tokens per frame: int(S * share) and the rest."""
    dominant = int(kept * dominant_share)
    return dominant, kept - dominant


def dominant_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[F, N] scores -> [F, count] the top tokens of each frame, in ascending index order as released."""
    return scores.topk(count, dim=-1).indices.sort(dim=-1).values


def remaining_indices(tokens: int, dominant: torch.Tensor) -> torch.Tensor:
    """[F, k] dominant indices -> [F, N - k] every other token of the frame, ascending."""
    rest = torch.ones(dominant.shape[0], tokens, dtype=torch.bool, device=dominant.device).scatter_(1, dominant, False)
    return torch.arange(tokens, device=dominant.device).expand_as(rest)[rest].view(dominant.shape[0], -1)


def contextual_targets(remaining: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[count] positions among the remaining tokens that become contextual tokens: 0, step, 2*step, ... (none for 0).

    FastVID's uniform-merging ablation places its anchors by the same rule."""
    if not count:
        return torch.arange(0, device=device)
    step = max(1, remaining // count)
    return torch.arange(0, remaining, step, device=device)[:count]


def key_head_mean(keys: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., H*d] keys (heads concatenated, as captured) -> [..., d] their head mean, the released metric.

    Linear, so on pooled keys it equals pooling the head mean, as HoliTom does.
    """
    if keys.shape[-1] % heads:
        raise ConfigError(f"key_heads={heads} does not divide the keys' width {keys.shape[-1]}; set the tower's head count")
    return keys.unflatten(-1, (heads, -1)).mean(dim=-2)


def contextual_merge(features: torch.Tensor, metric: torch.Tensor, targets: torch.Tensor, merge: str) -> torch.Tensor:
    """[F, R, D] remaining tokens, [F, R, C] their metric, [n] target positions -> [F, n, D] contextual tokens.

    Every non-target token goes to the target of highest metric cosine (first on ties); `official`: target +
    mean(assigned), the released sum; `mean`: the average of the target and its assigned tokens.
    """
    others = ~torch.isin(torch.arange(features.shape[1], device=features.device), targets)
    unit = torch.nn.functional.normalize(metric.float(), dim=-1)
    similarity = unit[:, others] @ unit[:, targets].transpose(1, 2)  # [F, R - n, n]
    assign = torch.nn.functional.one_hot(similarity.argmax(dim=-1), targets.numel()).float()
    summed = assign.transpose(1, 2) @ features[:, others].float()  # [F, n, D]
    assigned = assign.sum(dim=1).unsqueeze(-1)  # [F, n, 1]
    target = features[:, targets].float()
    merged = target + summed / assigned.clamp(min=1) if merge == "official" else (target + summed) / (1 + assigned)
    return merged.to(features.dtype)


def visionzip_frames(
    features: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int, merge: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """[F, N, D] features, [F, N] scores, [F, N, C] metric -> [F, S, D] tokens `[dominant..., contextual...]` per
    frame and [F, S] the index within the frame of each (a contextual token: its target's)."""
    top = dominant_indices(scores, dominant)
    rest = remaining_indices(scores.shape[1], top)
    kept = [_rows(features, top)]
    index = [top]
    if contextual:
        targets = contextual_targets(rest.shape[1], contextual, device=rest.device)
        kept.append(contextual_merge(_rows(features, rest), _rows(metric, rest), targets, merge))
        index.append(rest[:, targets])
    return torch.cat(kept, dim=1), torch.cat(index, dim=1)


def patch_cells(patches: int, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[P] the pooled-grid cell (r * rows // side, c * cols // side), flat, of each patch (r, c) of a square grid."""
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patches per frame do not form a square grid")
    r, c = torch.arange(patches, device=device).div(side, rounding_mode="floor"), torch.arange(patches, device=device) % side
    return r * rows // side * cols + c * cols // side


def _rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[F, N, C] values, [F, S] index -> [F, S, C]."""
    return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


@dataclass
class VisionZip(PreLLMStage):
    form: str = "after_pooling"  # after_pooling (FastVID's baseline) | in_encoder (the original, before pooling)
    retention: float = 0.25  # R: each frame keeps int(R * N) tokens, N = the pooled grid's tokens per frame
    frame_tokens: int | None = None  # S itself, overriding int(R * N) (HoliTom runs S = 50/40/30/20)
    dominant_share: float = 54 / 64  # of those, int(S * share) dominant, the rest contextual
    score: str = "attention_received"  # attention_received | probe_attention (after_pooling only)
    key_heads: int = 16  # the tower's attention heads: the metric is the key head mean (SigLIP so400m: 16)
    merge: str = "official"  # official: target + mean(assigned) | mean: average of target and assigned
    name: str = "visionzip"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ConfigError(f"form={self.form!r}; use one of {', '.join(FORMS)}")
        if not 0 < self.retention <= 1:
            raise ConfigError(f"retention={self.retention}: VisionZip keeps a fraction of each frame's tokens in (0, 1]")
        if self.frame_tokens is not None and self.frame_tokens < 1:
            raise ConfigError(f"frame_tokens={self.frame_tokens}: keep at least one token per frame, or null for int(R * N)")
        if not 0 <= self.dominant_share <= 1:
            raise ConfigError(f"dominant_share={self.dominant_share}: the dominant share of the kept tokens is in [0, 1]")
        if self.score not in SCORES:
            raise ConfigError(f"score={self.score!r}; use one of {', '.join(SCORES)}")
        if self.form == "in_encoder" and self.score != "attention_received":
            raise ConfigError(
                f"score={self.score!r} exists only pooled to the token grid; form=in_encoder uses score=attention_received"
            )
        if self.key_heads < 1:
            raise ConfigError(f"key_heads={self.key_heads}: set the vision tower's attention heads (>= 1)")
        if self.merge not in MERGES:
            raise ConfigError(f"merge={self.merge!r}; use one of {', '.join(MERGES)}")

    @property
    def _prefix(self) -> str:
        return PATCH if self.form == "in_encoder" else ""

    def check(self, model: ModelInfo) -> None:
        if model.family not in LLAVA_FAMILIES:
            raise ConfigError(
                f"{self.name}: no released VisionZip arithmetic for {model.family!r} videos (the authors' Qwen2.5-VL code, "
                "dvlab-research/VisionZip Qwen2_5_VL/, compresses images only) and this harness captures no per-token "
                "attention from Qwen-VL's ViT; run it on a LLaVA model, or choose a method of every family "
                "(dycoke_ttm, random, pooling)"
            )
        super().check(model)

    def needs(self) -> frozenset[str]:
        needed = {self._prefix + self.score, self._prefix + "keys"}
        return frozenset(needed | ({PATCH + "features"} if self.form == "in_encoder" else set()))

    def kept_per_frame(self, tokens_per_frame: int) -> int:
        return kept_per_frame(tokens_per_frame, self.retention, self.frame_tokens)

    def planned_tokens(self, counts: PlannedCounts) -> float:
        return float(counts.layout.frames * self.kept_per_frame(counts.layout.tokens_per_frame))

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        grid = tokens.grid()  # in_encoder replaces the pooled video with the encoder's patches: it must come first too
        features = signals[PATCH + "features"] if self.form == "in_encoder" else grid
        frames, per_frame = features.shape[:2]
        dominant, contextual = frame_split(self.kept_per_frame(tokens.tokens_per_frame), self.dominant_share)
        metric = key_head_mean(signals[self._prefix + "keys"], self.key_heads)
        kept, where = visionzip_frames(features, signals[self._prefix + self.score], metric, dominant, contextual, self.merge)
        if self.form == "in_encoder":
            where = patch_cells(per_frame, tokens.rows, tokens.cols, device=where.device)[where]
        index = where + torch.arange(frames, device=where.device)[:, None] * tokens.tokens_per_frame
        return tokens.replaced(
            kept.reshape(-1, kept.shape[-1]),
            index.flatten(),
            visionzip_tokens_in=frames * per_frame,
            visionzip_dominant=frames * dominant,
            visionzip_contextual=frames * contextual,
        )
