"""What Qwen2.5-VL and Qwen3-VL share (`QwenVLAdapter`): frames in temporal patches of two, a layout per video
from its own grid (merged 2x2 patches, no newline tokens), frames resized within pixel bounds, the checkpoint's chat
template for both prompt forms, and M-RoPE ids that every kept token keeps from the unpruned prompt
(docs/qwen.md). Each family's module adds its pixels, its encoder outputs and how it lays the video into the prompt.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dycoke_eval.config import ConfigError
from dycoke_eval.geometry import VideoLayout
from dycoke_eval.models.base import EncodedVideo, ModelAdapter
from dycoke_eval.prompts import render_prompt

TEMPORAL_PATCH = 2  # frames per temporal patch (`temporal_patch_size` of the real and tiny checkpoints)
DEFAULT_FPS = 2.0  # sampling fps when none is given: what 4.51's processor assumed, as FastVID's runs (docs/qwen.md, c)
PLANNING_FRAME_SIZE = (360, 640)  # (height, width) plans assume: a 640x360 clip; real layouts follow each video
VIDEO = 2  # `mm_token_type_ids` value of a video token (text 0, image 1)


class QwenVLAdapter(ModelAdapter):
    """The Qwen-VL families' common ground; `name` is the family's name in messages."""

    name: ClassVar[str] = ""
    keeps_grid_positions: ClassVar[bool] = True
    sizes_by_pixel_bounds: ClassVar[bool] = True

    @classmethod
    def temporal_patches(cls, frames: int) -> int:
        """Frames -> temporal patches; an odd count is refused rather than padded with a repeated last frame."""
        if frames % TEMPORAL_PATCH:
            raise ConfigError(
                f"frames={frames}: {cls.name} encodes frames in pairs (temporal patches of {TEMPORAL_PATCH}); "
                f"sample an even number, e.g. frames={frames + 1}"
            )
        return frames // TEMPORAL_PATCH

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    def pixel_bounds_in_effect(self) -> dict[str, int]:
        """The settings, else the processor's `size` (its shortest_edge is min_pixels, its longest_edge max_pixels)."""
        size = self.processor.video_processor.size
        least, most = self.pixel_bounds
        return {"min_pixels": least or size["shortest_edge"], "max_pixels": most or size["longest_edge"]}

    def processor_size(self) -> dict[str, int]:
        """`pixel_bounds_in_effect` as the video processor's `size` argument."""
        bounds = self.pixel_bounds_in_effect()
        return {"shortest_edge": bounds["min_pixels"], "longest_edge": bounds["max_pixels"]}

    def device_preprocessor(self):
        raise ConfigError(
            f"preprocess_device=model: {self.name} has no device path for its video processor yet; use preprocess_device=cpu"
        )

    def layout_of(self, grid_thw: tuple[int, int, int]) -> VideoLayout:
        """The video's layout from the processor's grid (temporal patches, patch rows, patch cols)."""
        merge = self.config.vision_config.spatial_merge_size
        temporal, rows, cols = grid_thw
        return VideoLayout(temporal, rows // merge, cols // merge, "none", self.family)

    def assemble(
        self, encoded: EncodedVideo, tokens: torch.Tensor, index: torch.Tensor, frame_newlines: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens, index  # no newline tokens: the visual sequence is the kept grid tokens in order

    def render_prompt(self, form: str, question: str) -> str:
        """Both forms are the checkpoint's chat template: no other prompt exists for these families (FastVID's Qwen2.5-VL
        wrapper renders exactly that, with the template's default system turn; LunarShen/FastVID@ea8b57e)."""
        return render_prompt("checkpoint" if form == "paper" else form, question, self.processor)

    def kept_in_grid_order(
        self, prompt_ids: torch.Tensor, visual: torch.Tensor, positions: torch.Tensor | None, full_visual_length: int
    ) -> tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(the one video placeholder's index in `prompt_ids`, the kept tokens in grid order, their grid positions,
        the [full_visual_length] mask of kept grid tokens). The model fills the video pads in order, and M-RoPE has no
        "consecutive" numbering: every kept token needs its own grid position (positions=None: all kept)."""
        where = (prompt_ids == self.config.video_token_id).nonzero().flatten()
        if where.numel() != 1:
            raise ValueError(f"the prompt holds {where.numel()} <|video_pad|> placeholders; it needs exactly one video")
        device = visual.device
        if positions is not None:
            order = positions.argsort()
            visual, positions = visual[order.to(device)], positions[order].to(device)
        kept = torch.zeros(full_visual_length, dtype=torch.bool, device=device)
        kept[positions if positions is not None else slice(None)] = True
        if int(kept.sum()) != visual.shape[0]:
            raise ValueError(
                f"{visual.shape[0]} visual tokens at {int(kept.sum())} distinct grid positions of "
                f"{full_visual_length}; {self.name} needs every kept token's grid position (positions=None: all kept)"
            )
        return int(where[0]), visual, positions, kept

    @classmethod
    def video_grid_thw(cls, config: Any, layout: VideoLayout, device) -> torch.Tensor:
        """[1, 3] the processor's grid (in patches) of a video with this layout, for `get_rope_index`."""
        merge = config.vision_config.spatial_merge_size
        return torch.tensor([[layout.frames, layout.rows * merge, layout.cols * merge]], device=device)
