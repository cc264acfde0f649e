"""ToMe (Token Merging, Bolya et al., ICLR'23) per frame before the LLM, as the video papers' per-frame baseline.

Released code: facebookresearch/ToMe@af95e4b1, `tome/merge.py` (`bipartite_soft_matching` 18-97, `merge_wavg`
210-224, `merge_source` 227-239). ToMe merges inside a ViT, r tokens per block; no video paper releases the ToMe
baseline it ran (docs/field_methods.md, section 5), so the setup is this harness's choice, on every model family:

* per frame (on Qwen-VL per temporal patch), on its N pooled, projected tokens, rounds of the released bipartite
  soft matching until S = int(retention * N) tokens remain (at least one; VisionZip's and FastVID's per-frame
  count). Each round removes r = min(T - S, T // 2) of the T tokens present (the release caps r at half the
  tokens; there is no class token): on LLaVA-OV 196 -> 98 -> 49 at 25%, on to 29 at 15%, on to 25 -> 19 at 10%;
* `metric: features` (default) matches the tokens themselves as they stand after the previous round (no keys exist
  after the projector); `metric: keys` SigLIP's feature-layer keys, pooled like the tokens, head mean (ToMe's
  `k.mean(1)`, `tome/patch/timm.py:96`), LLaVA only. No encoder layer runs between rounds to recompute keys, so a
  merged token's keys are merged as its features are;
* merging is `merge_wavg`: size-weighted means, the sizes (input tokens in each) starting at 1 and carried across
  rounds.

The arithmetic is the release's, in the tokens' dtype, bit for bit (tests/test_tome.py runs a transcription of it
frame by frame against this batched one, float32 and bfloat16), quirks included:
* A/B split by alternation of the current order: A the even slots, B the odd ones. In the first round that is
  alternate columns on an even-width grid (14: LLaVA-OV), a checkerboard on an odd one (13: LLaVA-Video);
* a round's output is [unmerged A in descending order of their best similarity, then every B], and the next round
  alternates over that order, not the grid's;
* any number of A tokens may go into the same B; `scatter_reduce` sums them (on CUDA in no fixed order, as
  released: the last bits can differ from run to run);
* sizes and weighted means in the tokens' dtype (bfloat16 counts sizes exactly up to 256);
* the similarity ranking is the release's unstable `argsort`: tied best similarities (frequent in bfloat16)
  come in whatever order the backend's sort gives them;
* a token of zero norm makes NaN similarities (0/0), as released.
No step is random. `metric: keys` is refused on Qwen-VL (its ViT's keys are not captured).

Positions: the release's order is not spatial. Each input token's output slot is followed by a gather per round
(what `merge_source`'s one-hot matrix holds, as [F, N] rather than [F, S, N]); a merged token reports the smallest
grid index among its sources (raster-first, as pooling reports a window's top-left), and each frame's tokens go out
in that order, i.e. in grid order. That grid index places LLaVA-Video's row newlines, gives Qwen-VL's M-RoPE
position (and Qwen3-VL's DeepStack rows); LLaVA-OV reads the tokens in this order, consecutively numbered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from dycoke_eval.compression.stages import ModelInfo, PlannedCounts, PreLLMStage, VideoTokens
from dycoke_eval.config import ConfigError
from dycoke_eval.geometry import LLAVA_FAMILIES
from dycoke_eval.methods.visionzip import key_head_mean

METRICS = ("features", "keys")  # what the bipartite matching compares: the tokens, or SigLIP's keys (LLaVA)


class Matching(NamedTuple):
    """One round's bipartite matching in every frame, as [F, k, 1] slot indices (A = even slots, B = odd ones)."""

    unmerged: torch.Tensor  # A slots that stay, in descending order of their best similarity
    merged: torch.Tensor  # A slots merged away (the release's src)
    into: torch.Tensor  # for each, the B slot, among the B's, it merges into (dst)


class MergedFrames(NamedTuple):
    """Every frame after ToMe, in the release's order."""

    tokens: torch.Tensor  # [F, S, D]
    sizes: torch.Tensor  # [F, S, 1] input tokens in each, in the tokens' dtype
    sources: torch.Tensor  # [F, N] the output slot each input token ended in


def kept_per_frame(tokens: int, retention: float) -> int:
    """S = int(retention * N), VisionZip's and FastVID's per-frame count, but at least one: a Qwen-VL video's grid
    follows its resolution, and a small one must not stop the run."""
    return max(1, int(retention * tokens))


def round_sizes(tokens: int, kept: int) -> list[int]:
    """The tokens each round removes to take `tokens` down to `kept`: what is left to remove, at most half (released cap)."""
    removed = []
    while tokens > kept:
        removed.append(min(tokens - kept, tokens // 2))
        tokens -= removed[-1]
    return removed


def bipartite_matching(metric: torch.Tensor, r: int) -> Matching:
    """[F, T, C] -> each frame's r most similar A tokens and their best B match (merge.py:49-64, no class token)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    best, match = (a @ b.transpose(-1, -2)).max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)[..., None]
    merged = ranked[..., :r, :]
    return Matching(ranked[..., r:, :], merged, match[..., None].gather(dim=-2, index=merged))


def merge_sum(values: torch.Tensor, matching: Matching) -> torch.Tensor:
    """[F, T, C] -> [F, T - r, C]: [unmerged A..., each B plus the A tokens merged into it] (merge.py:70-80, "sum")."""
    a, b = values[..., ::2, :], values[..., 1::2, :]
    channels = values.shape[-1]
    unmerged = a.gather(-2, matching.unmerged.expand(-1, -1, channels))
    merged = a.gather(-2, matching.merged.expand(-1, -1, channels))
    b = b.scatter_reduce(-2, matching.into.expand(-1, -1, channels), merged, reduce="sum")
    return torch.cat([unmerged, b], dim=-2)


def merge_weighted(values: torch.Tensor, sizes: torch.Tensor, matching: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_wavg` (merge.py:210-224): each output the size-weighted mean of what merged into it, and the new sizes."""
    sizes_after = merge_sum(sizes, matching)
    return merge_sum(values * sizes, matching) / sizes_after, sizes_after


def output_slots(matching: Matching, tokens: int) -> torch.Tensor:
    """[F, T] the slot each of the round's T slots goes to: an unmerged A its rank, B j slot (unmerged A count) + j,
    a merged A its B's."""
    unmerged, merged, into = (index.squeeze(-1) for index in matching)
    frames, staying = unmerged.shape
    slots = torch.empty(frames, tokens, dtype=torch.long, device=unmerged.device)
    slots[:, 1::2] = torch.arange(staying, staying + tokens // 2, device=unmerged.device)
    slots.scatter_(1, 2 * unmerged, torch.arange(staying, device=unmerged.device).expand(frames, -1))
    return slots.scatter_(1, 2 * merged, staying + into)


def tome_frames(features: torch.Tensor, kept: int, metric: torch.Tensor | None = None) -> MergedFrames:
    """[F, N, D] tokens -> `kept` per frame by rounds of bipartite matching, on `metric` [F, N, C] (merged alongside,
    size-weighted) or, None, on the tokens themselves; every frame at once."""
    frames, tokens, _ = features.shape
    sizes = torch.ones_like(features[..., 0, None])
    sources = torch.arange(tokens, device=features.device).expand(frames, -1)
    for r in round_sizes(tokens, kept):
        matching = bipartite_matching(features if metric is None else metric, r)
        sources = output_slots(matching, features.shape[1]).gather(1, sources)
        if metric is not None:
            metric, _ = merge_weighted(metric, sizes, matching)
        features, sizes = merge_weighted(features, sizes, matching)
    return MergedFrames(features, sizes, sources)


def first_sources(sources: torch.Tensor, count: int) -> torch.Tensor:
    """[F, N] output slot of each input token -> [F, count] the smallest input index among each output's sources."""
    frames, tokens = sources.shape
    inputs = torch.arange(tokens, device=sources.device).expand(frames, -1)
    return inputs.new_full((frames, count), tokens).scatter_reduce(1, sources, inputs, reduce="amin")


def in_grid_order(merged: MergedFrames) -> tuple[torch.Tensor, torch.Tensor]:
    """-> [F, S, D] each frame's tokens ordered by their first source, and [F, S] that source's index in the frame."""
    first = first_sources(merged.sources, merged.tokens.shape[1])
    order = first.argsort(dim=-1)  # first sources are distinct: the source sets do not overlap
    tokens = merged.tokens.gather(1, order[..., None].expand(-1, -1, merged.tokens.shape[-1]))
    return tokens, first.gather(1, order)


@dataclass
class ToMe(PreLLMStage):
    retention: float = 0.25  # each frame keeps S = int(retention * N) tokens, N its pooled grid's tokens
    metric: str = "features"  # features: the tokens themselves | keys: SigLIP's keys, head mean (LLaVA only)
    key_heads: int = 16  # metric=keys: the tower's attention heads, for the head mean (SigLIP so400m: 16)
    name: str = "tome"

    def __post_init__(self) -> None:
        if not 0 < self.retention <= 1:
            raise ConfigError(f"retention={self.retention}: ToMe keeps a fraction of each frame's tokens in (0, 1]")
        if self.metric not in METRICS:
            raise ConfigError(f"metric={self.metric!r}; use one of {', '.join(METRICS)}")
        if self.key_heads < 1:
            raise ConfigError(f"key_heads={self.key_heads}: set the vision tower's attention heads (>= 1)")

    def check(self, model: ModelInfo) -> None:
        if self.metric == "keys" and model.family not in LLAVA_FAMILIES:
            raise ConfigError(
                f"{self.name}: metric=keys needs SigLIP's encoder keys, which the {model.family!r} model family does "
                "not give; use metric=features there"
            )
        super().check(model)

    def needs(self) -> frozenset[str]:
        return frozenset({"keys"} if self.metric == "keys" else ())

    def planned_tokens(self, counts: PlannedCounts) -> float:
        layout = counts.layout
        return float(layout.frames * kept_per_frame(layout.tokens_per_frame, self.retention))

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        grid = tokens.grid()
        frames, per_frame, dim = grid.shape
        kept = kept_per_frame(per_frame, self.retention)
        metric = key_head_mean(signals["keys"], self.key_heads) if self.metric == "keys" else None
        merged, where = in_grid_order(tome_frames(grid, kept, metric))
        index = where + torch.arange(frames, device=where.device)[:, None] * per_frame
        return tokens.replaced(
            merged.reshape(-1, dim),
            index.flatten(),
            tome_tokens_in=frames * per_frame,
            tome_rounds=len(round_sizes(per_frame, kept)),
        )
