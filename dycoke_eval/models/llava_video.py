"""LLaVA-Video (LLaVA-Video-7B-Qwen2) through the HF LLaVA-OneVision classes, with LLaVA-Video's own token layout.

**Checkpoint.** The original `lmms-lab/LLaVA-Video-7B-Qwen2` is a LLaVA-NeXT checkpoint
(`LlavaQwenForCausalLM`, config `model_type: llava`: FastVID's own run log says "You are using a
model of type llava to instantiate a model of type llava_qwen", `fastvid_llavavideo/scripts/llava_vid.log`),
so HF's classes cannot load it. Its conversion to the LLaVA-OneVision format,
`llava-hf/LLaVA-Video-7B-Qwen2-hf` (`model_type: llava_onevision`; the same SigLIP-so400m tower of 26
layers, projector and Qwen2-7B, "same architecture with llava-onevision", vllm-project/vllm#13190),
loads with `LlavaOnevisionForConditionalGeneration`. Since both families share that `model_type`,
the model config names this adapter (`adapter: llava_video`).

**Layout** (`llava_arch.py`: `get_2dPool`, `add_token_per_grid`; FastVID runs `mm_spatial_pool_mode=average`,
`mm_newline_position=grid`): the 27x27 projected patches of a frame are average-pooled 2x2 with
stride 2 (`avg_pool2d(2)`, the last patch row and column dropped) to 13x13 = 169 tokens, and the
newline embedding follows every row of every frame: 182 tokens per frame, 11,648 for 64 frames,
nothing after the last row. HF's OneVision video path pools bilinearly to 14x14 and adds one
newline per video, so this adapter pools the projected patches itself. Kept tokens are laid out
in grid order; a row that keeps at least one token gets its newline right after its last kept
token, a row left empty loses its newline (FastVID's LLaVA-Video code, `modeling_qwen2.py:1066-1078`).
Encoder signals are pooled the same way (FastVID pools the probe attention with `avg_pool2d(2)` too).

**Prompt** (lmms-eval `llava_vid`, as FastVID's `scripts/eval.sh` runs it: `conv_template=qwen_1_5,
max_frames_num=64, force_sample=True, mm_spatial_pool_mode=average`): `add_time_instruction` is
lmms-eval's argument, default False and not set, so no time instruction is added (the checkpoint
config's `add_time_instruction: true` is not read by that path); the question follows `<image>\\n` in
the `qwen_1_5` conversation. That is the `paper` prompt form LLaVA-OneVision uses, so it is inherited.
Frames: `force_sample=True` samples `np.linspace(0, n-1, 64)` as integers, what the harness does for
any frame count; 64 is set by the sweeps (`frames=64`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from dycoke_eval.geometry import VideoLayout
from dycoke_eval.models.base import EncodedVideo
from dycoke_eval.models.llava_onevision import LlavaOneVisionAdapter


class LlavaVideoAdapter(LlavaOneVisionAdapter):
    family: ClassVar[str] = "llava_video"
    model_types: ClassVar[tuple[str, ...]] = ()  # chosen by name (model setting `adapter: llava_video`), not by model_type
    loads: ClassVar[tuple[str, ...]] = ("llava_onevision",)  # the HF config types whose checkpoints it can run

    @classmethod
    def video_layout(cls, config: Any, frames: int) -> VideoLayout:
        side = config.vision_config.image_size // config.vision_config.patch_size // 2  # avg_pool2d(2) drops an odd last row
        return VideoLayout(frames=frames, rows=side, cols=side, newlines="row_end", family=cls.family)

    def pool(self, values: torch.Tensor) -> torch.Tensor:
        if values.dim() == 2:
            return self.pool(values.unsqueeze(-1)).squeeze(-1)
        return average_pool(values, self.config.vision_config.image_size // self.config.vision_config.patch_size)

    def assemble(
        self, encoded: EncodedVideo, tokens: torch.Tensor, index: torch.Tensor, frame_newlines: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if frame_newlines is not None:
            return frame_end_layout(
                tokens, index, encoded.layout.tokens_per_frame, encoded.layout.frames, encoded.newline, frame_newlines
            )
        if bool((index < 0).any()):
            raise ValueError(
                "LLaVA-Video puts a newline after each grid row; a token at no grid position (index -1) belongs to no "
                "row: use a method that keeps every token at a grid position with this model"
            )
        order = index.argsort(stable=True)
        slots, positions, newline_slots, newline_positions = row_end_layout(index[order], encoded.layout.cols)
        visual = tokens.new_empty(slots.numel() + newline_slots.numel(), tokens.shape[-1])
        visual[slots] = tokens[order]
        visual[newline_slots] = encoded.newline.to(tokens.dtype)
        where = torch.empty(visual.shape[0], dtype=index.dtype, device=index.device)
        where[slots], where[newline_slots] = positions, newline_positions
        return visual, where


def frame_end_layout(
    tokens: torch.Tensor, index: torch.Tensor, tokens_per_frame: int, frames: int, newline: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept tokens [M, D] at grid positions [M] -> every frame's tokens in grid order, each frame followed by `count`
    newline tokens (frames with no token too), and positions 0..V-1: this layout is a new sequence, numbered anew."""
    if count < 0:
        raise ValueError(f"frame_newlines={count}: a frame is followed by zero or more newline tokens")
    order = index.argsort(stable=True)
    frame = index[order].div(tokens_per_frame, rounding_mode="floor")
    slots = torch.arange(index.numel(), device=index.device) + frame * count  # the newlines of the frames before
    ends = torch.arange(frames, device=index.device).repeat_interleave(count)  # frame of each newline
    before = torch.bincount(frame, minlength=frames).cumsum(0)  # tokens of this frame and the ones before
    newline_slots = before[ends] + ends * count + torch.arange(count, device=index.device).repeat(frames)
    visual = tokens.new_empty(index.numel() + frames * count, tokens.shape[-1])
    visual[slots] = tokens[order]
    visual[newline_slots] = newline.to(tokens.dtype)
    return visual, torch.arange(visual.shape[0], device=index.device)


def average_pool(values: torch.Tensor, side: int) -> torch.Tensor:
    """[F, side*side, C] per-patch values -> [F, (side//2)^2, C]: means of 2x2 blocks, an odd last row and column dropped."""
    frames, _, channels = values.shape
    grid = values.view(frames, side, side, channels).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(frames, -1, channels)


def row_end_layout(index: torch.Tensor, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ascending grid indices [M] -> where each token and each kept row's newline go.

    Returns the tokens' slots in the visual sequence and their positions in the full sequence (each
    row of `cols` tokens plus its newline), then the same for one newline right after the last kept
    token of every row that keeps one.
    """
    row = index // cols  # rows counted over the whole video
    last = torch.ones_like(index, dtype=torch.bool)
    last[:-1] = row[1:] != row[:-1]
    slots = torch.arange(index.numel(), device=index.device) + last.cumsum(0) - last.long()  # newlines before each token
    return slots, row * (cols + 1) + index % cols, slots[last] + 1, row[last] * (cols + 1) + cols
