"""Pooling baseline: each frame's token grid average-pooled to about `ratio` of its tokens (pre-LLM).

The grid of R x C tokens becomes round(R*sqrt(ratio)) x round(C*sqrt(ratio)) (at least 1 x 1) by
adaptive average pooling: output cell (i, j) averages rows floor(i*R/r) .. ceil((i+1)*R/r) - 1 and the
same for columns. LLaVA-Video's own 2x2 pooling is this at ratio 1/4. Each pooled token carries the
grid position of its window's top-left token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dycoke_eval.compression.stages import PlannedCounts, PreLLMStage, VideoTokens
from dycoke_eval.config import ConfigError


def pooled_side(side: int, ratio: float) -> int:
    return max(1, round(side * math.sqrt(ratio)))


def pool_frames(grid: torch.Tensor, rows: int, cols: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[F, R*C, D] -> pooled tokens [F*r*c, D] and the grid index [F*r*c] of each window's top-left token."""
    frames, _, dim = grid.shape
    out_rows, out_cols = pooled_side(rows, ratio), pooled_side(cols, ratio)
    images = grid.view(frames, rows, cols, dim).permute(0, 3, 1, 2).float()
    pooled = torch.nn.functional.adaptive_avg_pool2d(images, (out_rows, out_cols)).permute(0, 2, 3, 1)
    top = torch.arange(out_rows, device=grid.device) * rows // out_rows
    left = torch.arange(out_cols, device=grid.device) * cols // out_cols
    corner = (top[:, None] * cols + left[None, :]).flatten()
    index = (torch.arange(frames, device=grid.device)[:, None] * rows * cols + corner[None, :]).flatten()
    return pooled.reshape(-1, dim).to(grid.dtype), index


@dataclass
class Pooling(PreLLMStage):
    ratio: float = 0.25  # target fraction of each frame's tokens
    name: str = "pooling"

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio={self.ratio}: pooling keeps a fraction of each frame's tokens in (0, 1]")

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        pooled, index = pool_frames(tokens.grid(), tokens.rows, tokens.cols, self.ratio)
        return tokens.replaced(pooled, index)

    def planned_tokens(self, counts: PlannedCounts) -> float:
        layout = counts.layout
        return float(layout.frames * pooled_side(layout.rows, self.ratio) * pooled_side(layout.cols, self.ratio))
