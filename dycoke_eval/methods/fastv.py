"""FastV (baseline): at layer K of prefill, keep the top `ratio` of the visual tokens for every later layer.

The score is the last prompt token's attention over the visual tokens at layer K-1 (head mean).
From layer K on, the pruned tokens are dropped from the hidden states (`prefill_position_pruning`),
so those layers compute on the shorter sequence and cache only the kept tokens; the kept set is
fixed for decoding, the version DyCoke compares with. DyCoke's tables use K=5 with 35% kept
(45% on 72B); FastV's own default is K=2 with 50%.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dycoke_eval.config import ConfigError
from dycoke_eval.methods.base import CompressionMethod, GenerationContext
from dycoke_eval.methods.kv_selection import attended_key_index, last_query_attention, top_visual_tokens
from dycoke_eval.plumbing.attention import attention_kernel, kernel_name, language_model, masked_attention, routed_attention
from dycoke_eval.plumbing.hooks import prefill_position_pruning


@dataclass
class FastV(CompressionMethod):
    layer: int = 5  # K: the first layer that sees only the kept tokens
    ratio: float = 0.35  # fraction of the visual tokens kept from layer K on
    reference_masking: bool = False  # mask instead of drop: the slow reference the fast path is tested against
    name: str = "fastv"
    routes_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio={self.ratio}: FastV keeps a fraction of the visual tokens in (0, 1]")
        if self.layer < 1:
            raise ConfigError(f"layer={self.layer}: FastV scores at layer K-1, so K must be >= 1")

    def validate_for(self, model_config: Any) -> None:
        layers = model_config.text_config.num_hidden_layers
        if self.layer >= layers:
            raise ConfigError(f"layer={self.layer}: the language model has {layers} layers; choose 1 <= layer < {layers}")

    def planned_visual_tokens(self, frames: int, tokens_per_frame: int, layers: int) -> tuple[list[float], list[float]]:
        visual = float(frames * tokens_per_frame)
        kept = visual * self.ratio
        return [visual] * self.layer + [kept] * (layers - self.layer), [kept] * layers

    def planned_retained_ratio(self) -> float:
        return self.ratio

    @contextlib.contextmanager
    def during_generation(self, context: GenerationContext) -> Iterator[None]:
        span = (context.visual_start, context.visual_start + context.visual_length)
        kept: list[torch.Tensor | None] = [None]  # prompt positions kept from layer K on
        prompt_length = context.input_ids.shape[1]
        decoder = language_model(context.model)
        kernel = attention_kernel(decoder)

        def attention(module, query, key, value, attention_mask, **kwargs):
            if query.shape[2] > 1 and module.layer_idx == self.layer - 1:
                probabilities = last_query_attention(query, key, kwargs["scaling"], attention_mask)
                visual = top_visual_tokens(probabilities[span[0] : span[1]], fastv_keep_count(span[1] - span[0], self.ratio))
                kept[0] = attended_key_index(prompt_length, span, visual)
            if self.reference_masking and module.layer_idx >= self.layer:
                generated = torch.arange(prompt_length, key.shape[2], device=key.device)
                return masked_attention(
                    kernel, module, query, key, value, attention_mask, torch.cat([kept[0], generated]), **kwargs
                )
            return kernel(module, query, key, value, attention_mask, **kwargs)

        pruning = contextlib.nullcontext() if self.reference_masking else prefill_position_pruning(
            context.model, self.layer, lambda: kept[0]
        )  # fmt: skip
        with routed_attention(decoder, "fastv_routed", attention), pruning:
            yield
        visual_kept = int(kept[0].numel() - (prompt_length - context.visual_length)) if kept[0] is not None else None
        context.stats.update(
            visual_tokens_after_layer=visual_kept, pruned_from_layer=self.layer, attention_kernel=kernel_name(decoder)
        )


def fastv_keep_count(visual_tokens: int, ratio: float) -> int:
    """`round(V * ratio)` visual tokens, as the released HF port keeps (32 frames at 35%: 2,196 of 6,273)."""
    return round(visual_tokens * ratio)
