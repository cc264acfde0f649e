"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) through HF transformers 5.x.

Layout: the ViT patchifies 2 frames x 14 x 14 px and merges 2x2 patches, so F frames resized to H x W px give
T = F/2 temporal patches of (H/28) x (W/28) merged tokens, fed to the LLM in raster order (temporal patch, row,
column) between `<|vision_start|>` and `<|vision_end|>`, with no newline tokens. The layout follows each video's
resolution, so `encode` returns it per video; plans (config alone) assume `PLANNING_FRAME_SIZE`.

Positions: M-RoPE (t, h, w). `generation_inputs` always passes explicit `position_ids` [4, 1, L]: the model's own
`get_rope_index` on the unpruned prompt, kept tokens keeping their ids (docs/qwen.md, section a). The temporal ids
depend on the sampling fps (`second_per_grid_ts`), which `preprocess` takes and `encode` carries along.

No encoder signals yet: the tower returns no attention weights (docs/qwen.md, section d), so methods needing them
are refused by their `check`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from dycoke_eval.config import ConfigError
from dycoke_eval.geometry import VideoLayout
from dycoke_eval.models.base import EncodedVideo, GenerationInputs, ModelAdapter
from dycoke_eval.prompts import render_prompt

TEMPORAL_PATCH = 2  # frames per temporal patch (`temporal_patch_size` of the real and tiny checkpoints)
DEFAULT_FPS = 2.0  # sampling fps when none is given: what 4.51's processor assumed, as FastVID's runs (docs/qwen.md, c)
PLANNING_FRAME_SIZE = (360, 640)  # (height, width) plans assume: a 640x360 clip; real layouts follow each video
VIDEO = 2  # `mm_token_type_ids` value of a video token (text 0, image 1)


@dataclass
class QwenVideoPixels:
    """`preprocess`'s output: what the ViT takes, and what M-RoPE needs to number the video's tokens."""

    pixel_values_videos: torch.Tensor  # [T * G_h * G_w, 3 * 2 * 14 * 14] patches
    grid_thw: tuple[int, int, int]  # temporal patches, patch rows, patch cols
    second_per_grid_ts: float  # seconds per temporal patch: temporal patch size / sampling fps

    def pin_memory(self) -> QwenVideoPixels:
        """Page-locked pixels, as the wrapper pins a tensor for an asynchronous copy to the device."""
        return replace(self, pixel_values_videos=self.pixel_values_videos.pin_memory())


@dataclass
class QwenEncodedVideo(EncodedVideo):
    """An encoded video plus the timing its M-RoPE ids need (survives `dataclasses.replace`, unlike a signal)."""

    second_per_grid_ts: float = TEMPORAL_PATCH / DEFAULT_FPS


class Qwen2_5_VLAdapter(ModelAdapter):
    family: ClassVar[str] = "qwen2_5_vl"
    model_class: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    keeps_grid_positions: ClassVar[bool] = True
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)

    @classmethod
    def video_layout(cls, config: Any, frames: int) -> VideoLayout:
        """The layout of `frames` frames of `PLANNING_FRAME_SIZE`, resized as the processor does (for plans only)."""
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

        merged = config.vision_config.patch_size * config.vision_config.spatial_merge_size
        height, width = smart_resize(*PLANNING_FRAME_SIZE, factor=merged)
        return VideoLayout(_temporal_patches(frames), height // merged, width // merged, "none", cls.family)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    def preprocess(self, frames: Any, fps: float = DEFAULT_FPS) -> QwenVideoPixels:
        """Frames [F, H, W, 3] sampled at `fps` -> patches and grid; the fps sets the temporal M-RoPE spacing."""
        _temporal_patches(len(frames))
        processed = self.processor.video_processor(videos=[frames], return_tensors="pt")
        grid_thw = tuple(int(n) for n in processed["video_grid_thw"][0])
        return QwenVideoPixels(processed["pixel_values_videos"], grid_thw, TEMPORAL_PATCH / fps)

    def device_preprocessor(self):
        raise ConfigError(
            "preprocess_device=model: Qwen2.5-VL has no device path for its video processor yet; use preprocess_device=cpu"
        )

    def encode(self, pixels: QwenVideoPixels, signals: frozenset[str] = frozenset()) -> QwenEncodedVideo:
        if signals:
            raise ValueError(f"encoder signals {sorted(signals)} are not available from Qwen2.5-VL (it gives none yet)")
        model = self.model.model
        grid_thw = torch.tensor([pixels.grid_thw], device=model.device)
        features = model.get_video_features(pixels.pixel_values_videos.to(model.device, non_blocking=True), grid_thw)
        layout = self._layout(pixels.grid_thw)
        grid = features.pooler_output[0].view(layout.frames, layout.tokens_per_frame, -1)
        return QwenEncodedVideo(grid=grid, layout=layout, second_per_grid_ts=pixels.second_per_grid_ts)

    def _layout(self, grid_thw: tuple[int, int, int]) -> VideoLayout:
        merge = self.config.vision_config.spatial_merge_size
        temporal, rows, cols = grid_thw
        return VideoLayout(temporal, rows // merge, cols // merge, "none", self.family)

    def assemble(self, encoded: EncodedVideo, tokens: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens, index  # no newline tokens: the visual sequence is the kept grid tokens in order

    def render_prompt(self, form: str, question: str) -> str:
        """Both forms are the chat template (system turn, video, question): FastVID's Qwen2.5-VL wrapper renders exactly
        that, with the template's default system prompt (LunarShen/FastVID@ea8b57e, lmms_eval/models/qwen2_5_vl.py)."""
        return render_prompt("checkpoint" if form == "paper" else form, question, self.processor)

    def generation_inputs(
        self,
        prompt_ids: torch.Tensor,
        visual: torch.Tensor,
        positions: torch.Tensor | None,
        full_visual_length: int,
        *,
        encoded: EncodedVideo | None = None,
    ) -> GenerationInputs:
        """As the base, plus `encoded`, the video the tokens came from: its grid and timing set the M-RoPE ids.

        Position ids are always explicit: those of the unpruned prompt (the model's `get_rope_index`) at the kept
        tokens, so text after the video keeps its unpruned ids and decoding continues from the last prompt token's.
        """
        if not isinstance(encoded, QwenEncodedVideo):
            raise ValueError("Qwen2.5-VL numbers its video tokens from the encoded video: pass encoded=<its QwenEncodedVideo>")
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        video_token_id = self.config.video_token_id
        where = (prompt_ids == video_token_id).nonzero().flatten()
        if where.numel() != 1:
            raise ValueError(f"the prompt holds {where.numel()} <|video_pad|> placeholders; it needs exactly one video")
        start, device = int(where[0]), visual.device
        before, after = prompt_ids[:start].to(device), prompt_ids[start + 1 :].to(device)
        pads = torch.full((full_visual_length,), video_token_id, dtype=prompt_ids.dtype, device=device)
        full_ids = torch.cat([before, pads, after])[None]
        if positions is not None:  # the model fills the video pads in order: kept tokens go in grid order
            order = positions.argsort()
            visual, positions = visual[order.to(device)], positions[order]
        kept_video = torch.zeros(full_visual_length, dtype=torch.bool, device=device)
        kept_video[positions.to(device) if positions is not None else slice(None)] = True
        if int(kept_video.sum()) != visual.shape[0]:  # M-RoPE has no "consecutive" numbering: kept tokens need their ids
            raise ValueError(
                f"{visual.shape[0]} visual tokens at {int(kept_video.sum())} distinct grid positions of "
                f"{full_visual_length}; Qwen2.5-VL needs every kept token's grid position (positions=None: all kept)"
            )
        keep = torch.cat([torch.ones_like(before, dtype=torch.bool), kept_video, torch.ones_like(after, dtype=torch.bool)])
        mrope = self._unpruned_mrope(full_ids, encoded)
        input_ids = full_ids[:, keep]
        self.model.model.rope_deltas = None  # per-sample state: a stale delta from the last sample must not leak in
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=(visual,))},
            # row 0: plain 1-D positions of the shortened sequence, for the causal mask (docs/qwen.md, a); rows 1-3: t, h, w
            "position_ids": torch.cat([torch.arange(input_ids.shape[1], device=device)[None, None], mrope[:, :, keep]]),
        }
        return GenerationInputs(kwargs=kwargs, visual_start=start, visual_length=visual.shape[0])

    def _unpruned_mrope(self, full_ids: torch.Tensor, encoded: QwenEncodedVideo) -> torch.Tensor:
        """[3, 1, L] M-RoPE ids of the unpruned prompt `full_ids` [1, L], from the model's own `get_rope_index`."""
        layout, merge = encoded.layout, self.config.vision_config.spatial_merge_size
        video_grid_thw = torch.tensor([[layout.frames, layout.rows * merge, layout.cols * merge]], device=full_ids.device)
        mrope, _ = self.model.model.get_rope_index(
            full_ids,
            (full_ids == self.config.video_token_id).int() * VIDEO,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=torch.tensor([encoded.second_per_grid_ts], device=full_ids.device),
            attention_mask=torch.ones_like(full_ids),
        )
        return mrope


def _temporal_patches(frames: int) -> int:
    """Frames -> temporal patches; an odd count is refused rather than padded with a repeated last frame."""
    if frames % TEMPORAL_PATCH:
        raise ConfigError(
            f"frames={frames}: Qwen2.5-VL encodes frames in pairs (temporal patches of {TEMPORAL_PATCH}); "
            f"sample an even number, e.g. frames={frames + 1}"
        )
    return frames // TEMPORAL_PATCH
