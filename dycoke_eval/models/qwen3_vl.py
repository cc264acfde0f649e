"""Qwen3-VL (`Qwen3VLForConditionalGeneration`) through HF transformers 5.x.

Layout: the ViT patchifies 2 frames x 16 x 16 px and merges 2x2 patches, so F frames resized to H x W px give
T = F/2 temporal patches of (H/32) x (W/32) merged tokens, with no newline tokens. In the text every temporal patch
is its own group, `<{t:.1f} seconds><|vision_start|>` + its tokens + `<|vision_end|>`, t the mean time of its two
frames; in 5.x the chat template's own `<|vision_start|>`/`<|vision_end|>` stay around the whole block
(docs/qwen.md, section a). A group keeps its timestamp and delimiters when a method drops all of its tokens.

Positions: M-RoPE (t, h, w), interleaved. `generation_inputs` always passes explicit `position_ids` [4, 1, L]: the
model's own `get_rope_index` on the unpruned prompt, kept tokens keeping their ids. Every temporal patch is its own
run there, so time enters through the timestamp text only.

DeepStack: three ViT blocks' features are added to the first decoder layers at the visual positions. `encode` keeps
them row for row with the grid, and `generation_inputs` hands the kept rows over with the kept tokens, through
`mm_encoder_outputs` (an `inputs_embeds` path would silently skip DeepStack). A merged token takes its anchor's rows.

Visual span: `GenerationInputs` describes the visual tokens as one contiguous span, but here the timestamp and
delimiter tokens between temporal patches interrupt them. The span given starts at the first temporal patch's
first token and counts the kept visual tokens: exact for the video's counts. Stages acting inside the LLM (FastV,
DyCoke's KV pruning, PruneVid's prefill selection) would choose among the separators, so they are refused for this
family (`video_in_one_span`).

No encoder signals yet: methods needing them are refused by their `check`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from dycoke_eval.geometry import FrameTiming, VideoLayout
from dycoke_eval.models.base import EncodedVideo, GenerationInputs
from dycoke_eval.models.qwen_vl import DEFAULT_FPS, PLANNING_FRAME_SIZE, TEMPORAL_PATCH, VIDEO, QwenVLAdapter

# The Qwen3-VL checkpoints' video pixel budget over t*h*w (their video_preprocessor_config.json `size`, as public
# copies record it; not checked against the hub file): plans resize `PLANNING_FRAME_SIZE` frames within it.
CHECKPOINT_VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}


@dataclass
class Qwen3VideoPixels:
    """`preprocess`'s output: what the ViT takes, and the time of each temporal patch that the prompt prints."""

    pixel_values_videos: torch.Tensor  # [T * G_h * G_w, 3 * 2 * 16 * 16] patches
    grid_thw: tuple[int, int, int]  # temporal patches, patch rows, patch cols
    timestamps: tuple[float, ...]  # [T] seconds

    def pin_memory(self) -> Qwen3VideoPixels:
        """Page-locked pixels, as the wrapper pins a tensor for an asynchronous copy to the device."""
        return replace(self, pixel_values_videos=self.pixel_values_videos.pin_memory())


@dataclass
class Qwen3EncodedVideo(EncodedVideo):
    """An encoded video plus its DeepStack features and timestamps (fields survive `dataclasses.replace`)."""

    deepstack: tuple[torch.Tensor, ...] = ()  # per DeepStack layer [T, N, D], rows as `grid`'s
    timestamps: tuple[float, ...] = ()  # [T] seconds of each temporal patch

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in self.deepstack)


class Qwen3VLAdapter(QwenVLAdapter):
    family: ClassVar[str] = "qwen3_vl"
    name: ClassVar[str] = "Qwen3-VL"
    model_class: ClassVar[str] = "Qwen3VLForConditionalGeneration"
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    video_in_one_span: ClassVar[bool] = False  # a timestamp and start/end tokens between temporal patches

    @classmethod
    def video_layout(cls, config: Any, frames: int) -> VideoLayout:
        """The layout of `frames` frames of `PLANNING_FRAME_SIZE` in the checkpoints' budget (for plans only)."""
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

        temporal = cls.temporal_patches(frames)
        merged = config.vision_config.patch_size * config.vision_config.spatial_merge_size
        height, width = smart_resize(
            frames,
            *PLANNING_FRAME_SIZE,
            temporal_factor=TEMPORAL_PATCH,
            factor=merged,
            min_pixels=CHECKPOINT_VIDEO_SIZE["shortest_edge"],
            max_pixels=CHECKPOINT_VIDEO_SIZE["longest_edge"],
        )
        return VideoLayout(temporal, height // merged, width // merged, "none", cls.family)

    def preprocess(self, frames: Any, timing: FrameTiming | None = None) -> Qwen3VideoPixels:
        """Frames [F, H, W, 3] -> patches, grid and each temporal patch's time (`DEFAULT_FPS` from 0 s where the
        video's frame rate is unknown).

        `do_sample_frames=False`: the processor would otherwise re-sample the frames it is given at its own fps.
        """
        self.temporal_patches(len(frames))
        processed = self.processor.video_processor(
            videos=[frames], size=self.processor_size(), do_sample_frames=False, return_tensors="pt"
        )
        grid_thw = tuple(int(n) for n in processed["video_grid_thw"][0])
        return Qwen3VideoPixels(processed["pixel_values_videos"], grid_thw, _patch_timestamps(timing, len(frames)))

    def pixel_bounds_in_effect(self) -> dict[str, int]:
        """Qwen3-VL's processor bounds the pixels of the whole video (frames x height x width), not of each frame as
        Qwen2.5-VL's does."""
        return super().pixel_bounds_in_effect()

    def encode(self, pixels: Qwen3VideoPixels, signals: frozenset[str] = frozenset()) -> Qwen3EncodedVideo:
        if signals:
            raise ValueError(f"encoder signals {sorted(signals)} are not available from Qwen3-VL (it gives none yet)")
        model = self.model.model
        grid_thw = torch.tensor([pixels.grid_thw], device=model.device)
        features = model.get_video_features(pixels.pixel_values_videos.to(model.device, non_blocking=True), grid_thw)
        layout = self.layout_of(pixels.grid_thw)
        shape = (layout.frames, layout.tokens_per_frame, -1)
        return Qwen3EncodedVideo(
            grid=features.pooler_output[0].view(shape),
            layout=layout,
            deepstack=tuple(per_video[0].view(shape) for per_video in features.deepstack_features),
            timestamps=pixels.timestamps,
        )

    def generation_inputs(
        self,
        prompt_ids: torch.Tensor,
        visual: torch.Tensor,
        positions: torch.Tensor | None,
        full_visual_length: int,
        *,
        encoded: EncodedVideo | None = None,
    ) -> GenerationInputs:
        """As the base, plus `encoded`, the video the tokens came from: its grid and timestamps make the unpruned
        prompt, and its DeepStack rows go with the kept tokens.

        Position ids are always explicit: those of the unpruned prompt (the model's `get_rope_index`) at the kept
        tokens, so text after the video keeps its unpruned ids and decoding continues from the last prompt token's.
        """
        if not isinstance(encoded, Qwen3EncodedVideo):
            raise ValueError("Qwen3-VL numbers its video tokens from the encoded video: pass encoded=<its Qwen3EncodedVideo>")
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        video_token_id, device = self.config.video_token_id, visual.device
        placeholder, visual, positions, kept_video = self.kept_in_grid_order(prompt_ids, visual, positions, full_visual_length)
        before, after = prompt_ids[:placeholder].to(device), prompt_ids[placeholder + 1 :].to(device)
        block, pad_index = self._video_block(encoded)
        full_ids = torch.cat([before, block.to(device), after])[None]
        keep = full_ids[0] != video_token_id  # timestamps and delimiters stay, even around a patch with no tokens left
        keep[pad_index.to(device) + before.shape[0]] = kept_video
        mrope = self._unpruned_mrope(full_ids, encoded.layout)
        input_ids = full_ids[:, keep]
        rows = slice(None) if positions is None else positions
        deepstack = [(layer.flatten(0, 1)[rows],) for layer in encoded.deepstack]
        self.model.model.rope_deltas = None  # per-sample state: a stale delta from the last sample must not leak in
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_encoder_outputs": {
                "video": BaseModelOutputWithDeepstackFeatures(pooler_output=(visual,), deepstack_features=deepstack)
            },
            # row 0: plain 1-D positions of the shortened sequence, for the causal mask (docs/qwen.md, a); rows 1-3: t, h, w
            "position_ids": torch.cat([torch.arange(input_ids.shape[1], device=device)[None, None], mrope[:, :, keep]]),
        }
        first_visual = before.shape[0] + int(pad_index[0])  # no text before the first patch's tokens is ever dropped
        return GenerationInputs(kwargs=kwargs, visual_start=first_visual, visual_length=visual.shape[0])

    def _video_block(self, encoded: Qwen3EncodedVideo) -> tuple[torch.Tensor, torch.Tensor]:
        """The unpruned video's ids, as the processor expands the placeholder: per temporal patch its timestamp,
        `<|vision_start|>`, its pads and `<|vision_end|>`; and where in them each grid token's pad lies [T * N]."""
        config, per_patch = self.config, encoded.layout.tokens_per_frame
        stamps = self.tokenizer([f"<{t:.1f} seconds>" for t in encoded.timestamps], add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        first_pads = []
        for stamp in stamps:
            ids += [*stamp, config.vision_start_token_id]
            first_pads.append(len(ids))
            ids += [config.video_token_id] * per_patch + [config.vision_end_token_id]
        pad_index = (torch.tensor(first_pads)[:, None] + torch.arange(per_patch)).flatten()
        return torch.tensor(ids, dtype=torch.long), pad_index

    def _unpruned_mrope(self, full_ids: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
        """[3, 1, L] M-RoPE ids of the unpruned prompt `full_ids` [1, L], from the model's own `get_rope_index`."""
        mrope, _ = self.model.model.get_rope_index(
            full_ids,
            (full_ids == self.config.video_token_id).int() * VIDEO,
            video_grid_thw=self.video_grid_thw(self.config, layout, full_ids.device),
            attention_mask=torch.ones_like(full_ids),
        )
        return mrope


def _patch_timestamps(timing: FrameTiming | None, frames: int) -> tuple[float, ...]:
    """Each temporal patch's time: the mean of its first and last frame's, in the processor's own arithmetic
    (`_calculate_timestamps`), so that the printed one-decimal rounding agrees with it."""
    seconds = timing.seconds if timing is not None else None
    if seconds is None:
        seconds = [index / DEFAULT_FPS for index in range(frames)]
    return tuple((seconds[i] + seconds[i + TEMPORAL_PATCH - 1]) / 2 for i in range(0, frames, TEMPORAL_PATCH))
