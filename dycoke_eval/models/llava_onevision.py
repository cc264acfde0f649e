"""LLaVA-OneVision (llava-hf checkpoints) through HF transformers: the first model adapter.

Layout: SigLIP patches (27x27 at 384 px), projected, then 2x2 bilinear pooling per frame to
ceil(27/2)^2 = 14x14 = 196 tokens, and one `image_newline` token after the whole video
(`F*N + 1` visual tokens). Prompts: the papers' LLaVA-NeXT `qwen_1_5` conversation, or the
checkpoint's chat template. Positions: Qwen2's 1-D RoPE, so kept tokens either take consecutive
positions (the shortened sequence, as DyCoke's code does) or keep their original ones (explicit
`position_ids`; decoding continues at the original length).

Encoder signals it can capture in the same pass. Pooled like the features ([F, N] or [F, N, C]):
`keys` (the feature layer's attention keys, heads concatenated), `attention_received` (the
attention each patch receives at that layer, head and query mean), `probe_attention` (the head-mean
attention of SigLIP's pooling-head probe over the last kept layer's states). Per frame:
`probe_features` [F, C] (that head's output G). Unpooled, per patch ([F, P] or [F, P, C]):
`patch_features` (the projected features before the grid pooling), `patch_keys`,
`patch_attention_received`. The probe signals need a pooling head: the original SigLIP
checkpoint's (model setting `siglip_head`, read lazily, only its head tensors; see
`siglip_head.py`), else the tower's own when it kept one (`vision_use_head`); the llava-hf
towers drop it.

How the next families fit this interface:
* **LLaVA-Video** (`llava_video.py`): the same SigLIP and Qwen2, but 2x2 *average* pooling to
  13x13 = 169 tokens per frame and a newline token after every row (`newlines="row_end"`); it
  overrides the pooling, the layout and `assemble`. Stages are unchanged: they see the [F, 169, D] grid.
* **Qwen2.5-VL**: the vision tower merges 2x2 patches and 2 frames into one token, so `layout` has
  frames = T/2; positions are M-RoPE (temporal, height, width) triples from `get_rope_index`. Its
  `generation_inputs` returns `position_ids` of shape [3, 1, L] for the kept tokens (their original
  (t, h, w)), which is why stages report kept tokens as grid indices rather than as positions:
  the adapter alone turns indices into its model's positions.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, ClassVar

import torch

from dycoke_eval.geometry import FrameTiming, VideoLayout
from dycoke_eval.models.base import EncodedVideo, GenerationInputs, ModelAdapter, built_on
from dycoke_eval.models.device_preprocess import DeviceVideoProcessor
from dycoke_eval.plumbing.hooks import captured_output
from dycoke_eval.prompts import render_prompt

HEAD_SIGNALS = frozenset({"probe_attention", "probe_features"})  # need a SigLIP pooling head
UNPOOLED = "patch_"  # `patch_<signal>`: the signal per patch, before the grid pooling


class LlavaOneVisionAdapter(ModelAdapter):
    family: ClassVar[str] = "llava_onevision"
    model_class: ClassVar[str] = "LlavaOnevisionForConditionalGeneration"
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    signals: ClassVar[frozenset[str]] = frozenset(
        {"keys", "attention_received", "patch_features", "patch_keys", "patch_attention_received", *HEAD_SIGNALS}
    )

    def __init__(self, model: Any, processor: Any, siglip_head: str | None = None) -> None:
        super().__init__(model, processor, siglip_head)
        self._head = None  # the pooling head, loaded on first use

    @classmethod
    def from_config(
        cls,
        config: Any,
        processor: Any,
        *,
        device: str,
        dtype: torch.dtype,
        attn_implementation: str,
        siglip_head: str | None = None,
    ):
        """The base's random model; with `siglip_head` set, the pooling head is random too, at the tower's dimensions
        (nothing is read)."""
        from dycoke_eval.models.siglip_head import SiglipPoolingHead

        adapter = super().from_config(
            config, processor, device=device, dtype=dtype, attn_implementation=attn_implementation, siglip_head=siglip_head
        )
        if siglip_head:
            with built_on(device, dtype):
                adapter._head = SiglipPoolingHead.build(config.vision_config).eval()
        return adapter

    @classmethod
    def video_layout(cls, config: Any, frames: int) -> VideoLayout:
        side = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)  # 2x2 pooling, rounded up
        return VideoLayout(frames=frames, rows=side, cols=side, newlines="video_end", family=cls.family)

    @classmethod
    def available_signals(cls, config: Any, siglip_head: bool = False) -> frozenset[str]:
        return cls.signals if siglip_head or config.vision_config.vision_use_head else cls.signals - HEAD_SIGNALS

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    def preprocess(self, frames: Any, timing: FrameTiming | None = None) -> torch.Tensor:
        """Time plays no part: LLaVA's video tokens carry no timestamps."""
        return self.processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]

    def device_preprocessor(self) -> DeviceVideoProcessor:
        return DeviceVideoProcessor(self.processor.video_processor, self.model.device)

    def prepare(self, signals: frozenset[str]) -> None:
        if signals & HEAD_SIGNALS:
            self.pooling_head()

    def pooling_head(self):
        """The configured SigLIP checkpoint's pooling head (read once), else the tower's own; None without either."""
        from dycoke_eval.models.siglip_head import SiglipPoolingHead, load_siglip_head

        if self._head is None and self.siglip_head:
            tower = self.vision_tower
            hidden = self.config.vision_config.hidden_size
            self._head = load_siglip_head(self.siglip_head, hidden, tower.device, tower.dtype)
        if self._head is None and self.config.vision_config.vision_use_head:
            self._head = SiglipPoolingHead(self.vision_tower.post_layernorm, self.vision_tower.head)
        return self._head

    def encode(self, pixels: torch.Tensor, signals: frozenset[str] = frozenset()) -> EncodedVideo:
        unknown = set(signals) - self.capturable_signals()
        if unknown:
            hint = "; probe_attention and probe_features need SigLIP's pooling head: set model.siglip_head"
            raise ValueError(
                f"encoder signals {sorted(unknown)} are not available from this checkpoint"
                + (f"{hint} (e.g. google/siglip-so400m-patch14-384)" if unknown & HEAD_SIGNALS else "")
            )
        per_patch: dict[str, torch.Tensor] = {}  # each signal before the grid pooling
        per_frame: dict[str, torch.Tensor] = {}  # one vector per frame: nothing to pool
        with self._capturing({name.removeprefix(UNPOOLED) for name in signals}, per_patch):
            per_patch["features"], last_hidden = self._project(pixels)
        if signals & HEAD_SIGNALS:
            per_patch["probe_attention"], per_frame["probe_features"] = self.pooling_head()(last_hidden)
        grid = self.pool(per_patch["features"])
        captured = {}
        for name in signals:
            if name in per_frame:
                captured[name] = per_frame[name]
            elif name.startswith(UNPOOLED):
                captured[name] = per_patch[name.removeprefix(UNPOOLED)]
            else:
                captured[name] = self.pool(per_patch[name])
        newline = self.model.model.image_newline.to(grid.device, grid.dtype)
        return EncodedVideo(grid=grid, layout=self.layout(int(pixels.shape[1])), newline=newline, signals=captured)

    def _project(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[1, F, 3, H, W] -> projected features per patch [F, P, D] and the tower's last kept layer [F, P, C].

        What `get_video_features` computes before its pooling; the last layer's states are
        `hidden_states[-1]`, before the tower's post-layernorm. Only the layers used are kept (captured from
        their modules), not all of `output_hidden_states` (27 states of 32 x 729 x 1152 at 32 frames).
        """
        model, tower = self.model, self.vision_tower
        layer = model.config.vision_feature_layer
        wanted = [layer] if isinstance(layer, int) else list(layer)
        states = len(tower.encoder.layers) + 1  # hidden_states[0] is the embeddings' output, [i] layer i-1's
        kept: dict[int, torch.Tensor] = {}
        with ExitStack() as stack:
            for index in {index % states for index in (*wanted, -1)}:
                module = tower.embeddings if index == 0 else tower.encoder.layers[index - 1]
                stack.enter_context(captured_output(module, kept, index))
            tower(pixels.flatten(0, 1).to(model.device, non_blocking=True).to(model.dtype))  # pinned pixels: an async copy
        selected = torch.cat([kept[index % states] for index in wanted], dim=-1)
        if model.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        return model.model.multi_modal_projector(selected), kept[states - 1]

    def pool(self, values: torch.Tensor) -> torch.Tensor:
        """Per-patch values [F, P] or [F, P, C] -> per-token values [F, N] or [F, N, C], as the features are pooled."""
        if values.dim() == 2:
            return self.pool(values.unsqueeze(-1)).squeeze(-1)
        return self.model.model.apply_pooling(values)  # HF's 2x2 bilinear pooling

    def _capturing(self, signals: set[str], into: dict[str, torch.Tensor]):
        """Route the tower's attention to record the feature layer's keys and scores while it encodes."""
        from dycoke_eval.plumbing.attention import attention_kernel, routed_attention  # imported here: plans need no kernels

        stack = ExitStack()
        if not signals & {"keys", "attention_received"}:
            return stack
        tower = self.vision_tower
        feature_layer = self.config.vision_feature_layer
        target = tower.encoder.layers[feature_layer if feature_layer < 0 else feature_layer - 1].self_attn
        kernel = attention_kernel(tower)

        def attention(module, query, key, value, attention_mask, **kwargs):
            if module is target:
                if "keys" in signals:
                    into["keys"] = key.transpose(1, 2).flatten(2)  # [frames, patches, heads*dim]
                if "attention_received" in signals:
                    into["attention_received"] = torch.stack(
                        [_mean_received(q, k, kwargs["scaling"]) for q, k in zip(query, key, strict=True)]
                    )
            return kernel(module, query, key, value, attention_mask, **kwargs)

        stack.enter_context(routed_attention(tower, "encoder_capture", attention))
        return stack

    def assemble(
        self, encoded: EncodedVideo, tokens: torch.Tensor, index: torch.Tensor, frame_newlines: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        newline_position = torch.tensor([encoded.layout.grid_tokens], device=index.device, dtype=index.dtype)
        return torch.cat([tokens, encoded.newline[None].to(tokens.dtype)]), torch.cat([index, newline_position])

    def render_prompt(self, form: str, question: str) -> str:
        return render_prompt(form, question, self.processor)

    def generation_inputs(
        self,
        prompt_ids: torch.Tensor,
        visual: torch.Tensor,
        positions: torch.Tensor | None,
        full_visual_length: int,
        *,
        encoded: EncodedVideo | None = None,
    ) -> GenerationInputs:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        video_token_id = self.config.video_token_id
        where = (prompt_ids == video_token_id).nonzero().flatten()
        if where.numel() == 0:
            raise ValueError("the prompt has no <video> placeholder; the chat template must place the video")
        start, end = int(where[0]), int(where[-1]) + 1
        if end - start != where.numel():
            raise ValueError("the prompt holds more than one video; one video per sample is supported")
        placeholders = torch.full((visual.shape[0],), video_token_id, dtype=prompt_ids.dtype)
        input_ids = torch.cat([prompt_ids[:start], placeholders, prompt_ids[end:]])[None].to(visual.device)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=visual[None])},
        }
        if positions is not None:  # original positions: text after the video continues at the full-token length
            device = visual.device
            after = torch.arange(prompt_ids.shape[0] - end, device=device) + start + full_visual_length
            kwargs["position_ids"] = torch.cat([torch.arange(start, device=device), positions.to(device) + start, after])[None]
        return GenerationInputs(kwargs=kwargs, visual_start=start, visual_length=visual.shape[0])


def _mean_received(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """[H, P, d] query and key of one frame -> [P] attention each patch receives, head and query mean."""
    return (query.float() @ key.float().transpose(-1, -2) * scaling).softmax(dim=-1).mean(dim=(0, 1))
