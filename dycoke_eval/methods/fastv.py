"""FastV (baseline) as a prefill stage: at layer K of prefill, keep the top `ratio` of the visual tokens.

The score is the last prompt token's attention over the visual tokens at layer K-1 (head mean).
From layer K on the pruned tokens are dropped from the hidden states, so those layers compute on
the shorter sequence and cache only the kept tokens; the kept set is fixed for decoding, the
version DyCoke compares with. DyCoke's tables use K=5 with 35% kept (45% on 72B); FastV's own
default is K=2 with 50%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dycoke_eval.compression.stages import PlannedCounts, PrefillStage
from dycoke_eval.config import ConfigError
from dycoke_eval.methods.kv_selection import top_visual_tokens


@dataclass
class FastV(PrefillStage):
    layer: int = 5  # K: the first layer that sees only the kept tokens
    ratio: float = 0.35  # fraction of the visual tokens kept from layer K on
    name: str = "fastv"

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio={self.ratio}: FastV keeps a fraction of the visual tokens in (0, 1]")
        if self.layer < 1:
            raise ConfigError(f"layer={self.layer}: FastV scores at layer K-1, so K must be >= 1")

    def keep(self, visual_attention: torch.Tensor, pre_llm: dict[str, Any]) -> torch.Tensor:
        return top_visual_tokens(visual_attention, fastv_keep_count(visual_attention.numel(), self.ratio))

    def plan(self, counts: PlannedCounts) -> PlannedCounts:
        """Layers before K see every token in prefill; layers from K on, and decoding, see `ratio` of them."""
        kept = [n * self.ratio for n in counts.prefill]
        return counts.with_layers(counts.prefill[: self.layer] + kept[self.layer :], kept)

    def planned_retained_ratio(self, counts: PlannedCounts) -> float:
        return self.ratio


def fastv_keep_count(visual_tokens: int, ratio: float) -> int:
    """`round(V * ratio)` visual tokens, as the released HF port keeps (32 frames at 35%: 2,196 of 6,273)."""
    return round(visual_tokens * ratio)
