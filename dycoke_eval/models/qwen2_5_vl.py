"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) through HF transformers 5.x.

Layout: the ViT patchifies 2 frames x 14 x 14 px and merges 2x2 patches, so F frames resized to H x W px give
T = F/2 temporal patches of (H/28) x (W/28) merged tokens, fed to the LLM in raster order (temporal patch, row,
column) between `<|vision_start|>` and `<|vision_end|>`, with no newline tokens. The layout follows each video's
resolution, so `encode` returns it per video; plans (config alone) assume `PLANNING_FRAME_SIZE`.

Positions: M-RoPE (t, h, w). `generation_inputs` always passes explicit `position_ids` [4, 1, L]: the model's own
`get_rope_index` on the unpruned prompt, kept tokens keeping their ids (docs/qwen.md, section a). The temporal ids
depend on the sampling fps (`second_per_grid_ts`), which `preprocess` takes and `encode` carries along.

Encoder signals, FastVID's, under the names LLaVA's probe signals have: `probe_attention` [T, N] float32, a probe
query's attention over each temporal patch's merged tokens (FastVID's mean query of the ViT's last block; raster
order, rows summing to 1), recomputed from that block's `qkv` by hooks held during `encode` (`qwen_salience.py`; the
tower returns no attention weights itself, docs/qwen.md, section d); `probe_features` [T, D] each temporal patch's
mean merged token (`pooler_output`, LLM width, in the model's dtype; not normalised: FastVID normalises it, as its
release does); `attention_received` [T, N] float32, the attention each merged token receives in that block (mean
over heads and queries of each temporal patch's softmax, averaged over its 4 patches; FlashVID's score).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from dycoke_eval.geometry import FrameTiming, VideoLayout
from dycoke_eval.models.base import EncodedVideo, GenerationInputs
from dycoke_eval.models.qwen_salience import RECEIVED, SCORES, captured_scores
from dycoke_eval.models.qwen_salience import SIGNAL as PROBE_ATTENTION
from dycoke_eval.models.qwen_vl import DEFAULT_FPS, PLANNING_FRAME_SIZE, TEMPORAL_PATCH, VIDEO, QwenVLAdapter

POSITION_NUMBERINGS = ("released", "installed")  # the text after a video: as transformers 4.x, or as installed


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


class Qwen2_5_VLAdapter(QwenVLAdapter):
    family: ClassVar[str] = "qwen2_5_vl"
    name: ClassVar[str] = "Qwen2.5-VL"
    model_class: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    signals: ClassVar[frozenset[str]] = frozenset({PROBE_ATTENTION, RECEIVED, "probe_features"})
    # released: the text after the video numbered as the model was trained and FastVID ran (transformers 4.x);
    # installed: as the installed transformers' `get_rope_index` numbers it (docs/qwen.md, b)
    position_numberings: ClassVar[tuple[str, ...]] = POSITION_NUMBERINGS
    position_numbering: str = "released"

    @classmethod
    def video_layout(cls, config: Any, frames: int) -> VideoLayout:
        """The layout of `frames` frames of `PLANNING_FRAME_SIZE`, resized as the processor does (for plans only)."""
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

        merged = config.vision_config.patch_size * config.vision_config.spatial_merge_size
        height, width = smart_resize(*PLANNING_FRAME_SIZE, factor=merged)
        return VideoLayout(cls.temporal_patches(frames), height // merged, width // merged, "none", cls.family)

    def preprocess(self, frames: Any, timing: FrameTiming | None = None) -> QwenVideoPixels:
        """Frames [F, H, W, 3] -> patches and grid; their sampling rate sets the temporal M-RoPE spacing (`DEFAULT_FPS`
        where the video's frame rate is unknown)."""
        self.temporal_patches(len(frames))
        processed = self.processor.video_processor(videos=[frames], size=self.processor_size(), return_tensors="pt")
        grid_thw = tuple(int(n) for n in processed["video_grid_thw"][0])
        fps = (timing.sampled_fps if timing is not None else None) or DEFAULT_FPS
        return QwenVideoPixels(processed["pixel_values_videos"], grid_thw, TEMPORAL_PATCH / fps)

    def encode(self, pixels: QwenVideoPixels, signals: frozenset[str] = frozenset()) -> QwenEncodedVideo:
        unknown = set(signals) - self.signals
        if unknown:
            raise ValueError(
                f"encoder signals {sorted(unknown)} are not available from Qwen2.5-VL (it gives {sorted(self.signals)})"
            )
        model = self.model.model
        grid_thw = torch.tensor([pixels.grid_thw], device=model.device)
        captured: dict[str, torch.Tensor] = {}
        scores = {signal: SCORES[signal] for signal in signals if signal in SCORES}
        with captured_scores(model.visual, captured, scores) if scores else nullcontext():
            features = model.get_video_features(pixels.pixel_values_videos.to(model.device, non_blocking=True), grid_thw)
        layout = self.layout_of(pixels.grid_thw)
        grid = features.pooler_output[0].view(layout.frames, layout.tokens_per_frame, -1)
        if "probe_features" in signals:
            captured["probe_features"] = grid.mean(1)  # [T, D], FastVID's frame feature before it normalises (MQ:1836)
        return QwenEncodedVideo(grid=grid, layout=layout, signals=captured, second_per_grid_ts=pixels.second_per_grid_ts)

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

        video_token_id, device = self.config.video_token_id, visual.device
        start, visual, positions, kept_video = self.kept_in_grid_order(prompt_ids, visual, positions, full_visual_length)
        before, after = prompt_ids[:start].to(device), prompt_ids[start + 1 :].to(device)
        pads = torch.full((full_visual_length,), video_token_id, dtype=prompt_ids.dtype, device=device)
        full_ids = torch.cat([before, pads, after])[None]
        keep = torch.cat([torch.ones_like(before, dtype=torch.bool), kept_video, torch.ones_like(after, dtype=torch.bool)])
        mrope = self._unpruned_mrope(full_ids, encoded)
        if self.position_numbering == "released":
            mrope = released_text_positions(mrope, full_ids[0] == video_token_id)
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
        mrope, _ = self.model.model.get_rope_index(
            full_ids,
            (full_ids == self.config.video_token_id).int() * VIDEO,
            video_grid_thw=self.video_grid_thw(self.config, encoded.layout, full_ids.device),
            second_per_grid_ts=torch.tensor([encoded.second_per_grid_ts], device=full_ids.device),
            attention_mask=torch.ones_like(full_ids),
        )
        return mrope


def released_text_positions(mrope: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """[3, B, L] M-RoPE ids from transformers 5.x's `get_rope_index` -> the same with the text after the video numbered
    as Qwen2.5-VL's release numbers it (transformers 4.x, qwen-vl-utils; docs/qwen.md, b): from the video's largest
    id + 1 on every axis, where 5.x starts it at the video's first id + max(rows, cols) (merged tokens).

    `video` [L] marks the one video's tokens. The vision ids and the text before agree in both; text ids are equal on
    the three axes and consecutive, so the text after moves by one shift.
    """
    after = video.cumsum(0).bool() & ~video  # tokens past the video (one video a prompt)
    beyond = torch.iinfo(mrope.dtype).max
    video_end = torch.where(video, mrope, -beyond).amax(-1, keepdim=True)  # [3, B, 1]
    text_start = torch.where(after, mrope, beyond).amin(-1, keepdim=True)
    shift = video_end.amax(0, keepdim=True) + 1 - text_start
    return torch.where(after, mrope + shift, mrope)
