"""The two LLaVA layouts for tests that build video tokens by hand."""

import torch

from dycoke_eval.compression.stages import VideoTokens
from dycoke_eval.geometry import VideoLayout

NEWLINES = {"llava_onevision": "video_end", "llava_video": "row_end"}  # each family's newline placement


def layout(frames: int, rows: int, cols: int, family: str = "llava_onevision") -> VideoLayout:
    return VideoLayout(frames, rows, cols, NEWLINES[family], family)


def tokens_of(grid: torch.Tensor, rows: int, cols: int, family: str = "llava_onevision") -> VideoTokens:
    """A [F, rows * cols, D] grid as the encoder hands it to the first stage."""
    return VideoTokens.from_grid(grid, layout(grid.shape[0], rows, cols, family))
