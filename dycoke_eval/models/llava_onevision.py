"""LLaVA-OneVision (llava-hf checkpoints) through HF transformers: the first model adapter.

Layout: SigLIP patches (27x27 at 384 px), projected, then 2x2 bilinear pooling per frame to
ceil(27/2)^2 = 14x14 = 196 tokens, and one `image_newline` token after the whole video
(`F*N + 1` visual tokens). Prompts: the papers' LLaVA-NeXT `qwen_1_5` conversation, or the
checkpoint's chat template. Positions: Qwen2's 1-D RoPE, so kept tokens either take consecutive
positions (the shortened sequence, as DyCoke's code does) or keep their original ones (explicit
`position_ids`; decoding continues at the original length).

Encoder signals it can capture in the same pass (each pooled like the features, [F, N] or [F, N, C]):
`keys` (the feature layer's attention keys, heads concatenated), `attention_received` (the
attention each patch receives at that layer, head and query mean), `probe_attention` (the
attention of SigLIP's pooling-head probe over the last layer's normalised states; only for a
tower that keeps the head, which the llava-hf checkpoints drop).

How the next families fit this interface:
* **LLaVA-Video** (`lmms-lab/LLaVA-Video-7B-Qwen2`): the same SigLIP and Qwen2, but 2x2 *average*
  pooling to 13x13 = 169 tokens per frame and a newline token after every row (`newlines="row_end"`,
  182 tokens per frame). Its adapter subclasses this one and overrides `encode` (pool the
  unpooled tower output itself, since the HF OneVision video path pools bilinearly to 14x14)
  and `assemble` (re-insert a row's newline only where the row keeps a token, as FastVID's code does).
  Stages are unchanged: they see the [F, 169, D] grid.
* **Qwen2.5-VL**: the vision tower merges 2x2 patches and 2 frames into one token, so `layout` has
  frames = T/2; positions are M-RoPE (temporal, height, width) triples from `get_rope_index`. Its
  `generation_inputs` returns `position_ids` of shape [3, 1, L] for the kept tokens (their original
  (t, h, w)), which is why stages report kept tokens as grid indices rather than as positions:
  the adapter alone turns indices into its model's positions.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from dycoke_eval.accounting import LanguageModelDims
from dycoke_eval.models.base import EncodedVideo, GenerationInputs, ModelAdapter, VideoLayout
from dycoke_eval.prompts import render_prompt


class LlavaOneVisionAdapter(ModelAdapter):
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)
    signals: ClassVar[frozenset[str]] = frozenset({"keys", "attention_received", "probe_attention"})

    @classmethod
    def load(cls, pretrained: str, *, device: str, dtype: torch.dtype, attn_implementation: str, device_map: str | None):
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            pretrained, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map
        )
        if device_map is None:
            model.to(device)
        return cls(model.eval(), AutoProcessor.from_pretrained(pretrained))

    @classmethod
    def from_config(cls, config: Any, processor: Any, *, device: str, dtype: torch.dtype, attn_implementation: str):
        """Random weights at the config's dimensions, initialised directly on `device` (latency and memory only)."""
        from transformers import LlavaOnevisionForConditionalGeneration

        config._attn_implementation = attn_implementation
        torch.manual_seed(0)
        with torch.device(device):
            model = LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()
        return cls(model, processor)

    @classmethod
    def dimensions(cls, config: Any) -> LanguageModelDims:
        text = config.text_config
        return LanguageModelDims(hidden=text.hidden_size, ffn=text.intermediate_size, layers=text.num_hidden_layers)

    @classmethod
    def video_layout(cls, config: Any, frames: int) -> VideoLayout:
        side = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)  # 2x2 pooling, rounded up
        return VideoLayout(frames=frames, rows=side, cols=side, newlines="video_end")

    @classmethod
    def available_signals(cls, config: Any) -> frozenset[str]:
        return cls.signals if config.vision_config.vision_use_head else cls.signals - {"probe_attention"}

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    def preprocess(self, frames: Any) -> torch.Tensor:
        return self.processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]

    def encode(self, pixels: torch.Tensor, signals: frozenset[str] = frozenset()) -> EncodedVideo:
        model = self.model
        captured: dict[str, torch.Tensor] = {}
        with self._capturing(signals, captured):
            features = model.get_video_features(
                pixels.to(model.device, model.dtype),
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            ).pooler_output[0]
        layout = self.layout(int(pixels.shape[1]))
        pool = model.model.apply_pooling  # the features' own 2x2 bilinear pooling
        pooled = {
            name: pool(value.unsqueeze(-1)).squeeze(-1) if value.dim() == 2 else pool(value) for name, value in captured.items()
        }
        grid = features[:-1].view(layout.frames, layout.tokens_per_frame, features.shape[-1])
        return EncodedVideo(grid=grid, layout=layout, newline=features[-1], signals=pooled)

    def _capturing(self, signals: frozenset[str], into: dict[str, torch.Tensor]):
        """Route the tower's attention to record the feature layer's keys and scores while it encodes."""
        from contextlib import ExitStack

        from dycoke_eval.plumbing.attention import attention_kernel, routed_attention  # imported here: plans need no kernels
        from dycoke_eval.plumbing.hooks import captured_output

        unknown = set(signals) - self.available_signals(self.config)
        if unknown:
            raise ValueError(f"encoder signals {sorted(unknown)} are not available from this checkpoint")
        stack = ExitStack()
        if not signals:
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

        if signals & {"keys", "attention_received"}:
            stack.enter_context(routed_attention(tower, "encoder_capture", attention))
        if "probe_attention" in signals:
            hidden: dict[str, torch.Tensor] = {}
            stack.enter_context(captured_output(tower.post_layernorm, hidden, "hidden"))
            stack.callback(lambda: into.__setitem__("probe_attention", _probe_attention(tower.head, hidden["hidden"])))
        return stack

    def assemble(self, encoded: EncodedVideo, tokens: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        newline_position = torch.tensor([encoded.layout.grid_tokens], device=index.device, dtype=index.dtype)
        return torch.cat([tokens, encoded.newline[None].to(tokens.dtype)]), torch.cat([index, newline_position])

    def render_prompt(self, form: str, question: str) -> str:
        return render_prompt(form, question, self.processor)

    def generation_inputs(
        self, prompt_ids: torch.Tensor, visual: torch.Tensor, positions: torch.Tensor | None, full_visual_length: int
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


def _probe_attention(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[frames, P, D] post-layernorm states -> [frames, P] attention of SigLIP's pooling-head probe."""
    probe = head.probe.expand(hidden.shape[0], -1, -1)
    return head.attention(probe, hidden, hidden, need_weights=True)[1][:, 0]
