"""Random baseline: a uniformly random `ratio` of the video tokens enters the LLM (pre-LLM, no scoring).

The floor any scoring method must beat. The draw is seeded by `seed` and the sample's name, so
each video gets its own choice and a rerun draws the same tokens; kept tokens stay in video order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dycoke_eval.compression.stages import PlannedCounts, PreLLMStage, VideoTokens, per_sample_seed
from dycoke_eval.config import ConfigError


def random_keep_count(tokens: int, ratio: float) -> int:
    """`round(tokens * ratio)`, at least one."""
    return max(1, round(tokens * ratio))


def random_token_indices(tokens: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Ascending indices of `random_keep_count(tokens, ratio)` tokens drawn uniformly without replacement."""
    return torch.randperm(tokens, generator=generator)[: random_keep_count(tokens, ratio)].sort().values


@dataclass
class RandomTokens(PreLLMStage):
    ratio: float = 0.25  # fraction of the video tokens kept
    seed: int = 0
    name: str = "random"

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio={self.ratio}: the random baseline keeps a fraction of the video tokens in (0, 1]")

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        generator = torch.Generator().manual_seed(per_sample_seed(self.seed, sample))
        kept = random_token_indices(tokens.features.shape[0], self.ratio, generator).to(tokens.features.device)
        return tokens.keep(kept)

    def planned_tokens(self, counts: PlannedCounts) -> float:
        return float(random_keep_count(counts.layout.grid_tokens, self.ratio))
