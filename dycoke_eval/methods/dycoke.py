"""DyCoke: token temporal merging before the LLM, then dynamic KV-cache pruning while decoding.

Stage 1 (`select_video_tokens`) keeps the TTM tokens (`ttm.py`), so the LLM's sequence is
shorter from the start. Stage 2 (`during_generation`) routes the language model's attention
through a function that, at each decode step, scores the newest token's attention over the
visual tokens, lets `DynamicSelector` choose, and makes layers >= l attend to the kept subset.
Prefill is never pruned. Pruned entries are not lost (the paper's "DP cache"): the layers above
the scoring layer hold them aside in a `PrunableLayer` cache, on the CPU with `offload_pruned`,
and a later re-selection brings them back; those layers then attend to their kept entries
directly. The scoring layer keeps every key (it must score them all) and attends through a
gather.

`mode="paper"` is the paper's algorithm; `mode="official"` reproduces the released code
(SPEC 2.1, 2.2). The Table 5 ablations are settings of this class: `ttm_selection: random` and
`one_shot: true` ("w/o DP").
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from statistics import mean
from typing import Any, ClassVar

import torch
from torch._dynamo.exc import BackendCompilerFailed
from transformers.cache_utils import Cache, DynamicLayer

from dycoke_eval.config import ConfigError
from dycoke_eval.methods.base import CompressionMethod, GenerationContext
from dycoke_eval.methods.kv_selection import DynamicSelector, attended_key_index, last_query_attention
from dycoke_eval.methods.ttm import MODES, random_keep_indices, ttm_keep_indices, ttm_plan
from dycoke_eval.plumbing.attention import (
    attention_kernel,
    kernel_name,
    language_model,
    masked_attention,
    routed_attention,
    subset_attention,
)
from dycoke_eval.plumbing.cache import PrunableLayer

TTM_SELECTIONS = ("similarity", "random")


@dataclass
class DyCoke(CompressionMethod):
    k: float = 0.7  # TTM pruning rate
    l: int = 3  # first layer whose decode-time attention is pruned  # noqa: E741
    p: float = 0.7  # decode-time pruning rate of the visual tokens
    threshold: float = 0.9  # re-select when the visual attention's cosine to the last step is below this
    mode: str = "paper"  # paper | official
    ttm_selection: str = "similarity"  # similarity | random (Table 5)
    one_shot: bool = False  # select once at the first decode step (Table 5 "w/o DP")
    seed: int = 0  # for ttm_selection=random
    compile_ttm: bool = False  # paper mode: TTM's similarity as one torch.compile'd kernel (the first sample compiles)
    offload_pruned: bool = True  # pruned cache entries of the layers above L wait on the CPU (frees accelerator memory)
    reference_masking: bool = False  # mask instead of gather: the slow reference the fast path is tested against
    name: str = "dycoke"
    routes_attention: ClassVar[bool] = True
    _selector: DynamicSelector = field(init=False, repr=False)
    _ttm_stats: dict[str, Any] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        for setting in ("k", "p"):
            if not 0 <= getattr(self, setting) < 1:
                raise ConfigError(f"{setting}={getattr(self, setting)}: DyCoke's pruning rates must be in [0, 1)")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; use one of {', '.join(MODES)}")
        if self.compile_ttm and self.mode != "paper":
            raise ConfigError(f"compile_ttm=true applies to mode=paper; mode={self.mode} keeps the released code's exact ops")
        if self.ttm_selection not in TTM_SELECTIONS:
            raise ConfigError(f"ttm_selection={self.ttm_selection!r}; use one of {', '.join(TTM_SELECTIONS)}")
        if self.l < 0:
            raise ConfigError(f"l={self.l}: the evaluation layer must be >= 0")
        self._selector = DynamicSelector(1 - self.p, self.threshold, self.mode, self.one_shot)

    def validate_for(self, model_config: Any) -> None:
        layers = model_config.text_config.num_hidden_layers
        if self.l >= layers:
            raise ConfigError(f"l={self.l}: the language model has {layers} layers (0..{layers - 1}); choose l < {layers}")

    def select_video_tokens(self, frame_features: torch.Tensor, sample: str = "") -> torch.Tensor:
        frames, tokens, dim = frame_features.shape
        if self.ttm_selection == "random":
            generator = torch.Generator().manual_seed(per_sample_seed(self.seed, sample))
            kept = random_keep_indices(frame_features, self.k, self.mode, generator)
        else:
            kept = self._ttm_keep_indices(frame_features)
        self._ttm_stats = {
            "ttm_tokens_in": frames * tokens,
            "ttm_tokens_out": int(kept.numel()),
            "ttm_notes": list(ttm_plan(frames, self.mode).notes),
        }
        return frame_features.reshape(-1, dim)[kept]

    def _ttm_keep_indices(self, frame_features: torch.Tensor) -> torch.Tensor:
        try:
            return ttm_keep_indices(frame_features, self.k, self.mode, compiled=self.compile_ttm)
        except BackendCompilerFailed as error:  # raised only with compile_ttm: a missing C++ compiler, say
            reason = str(error).strip().splitlines()[0]
            raise ConfigError(f"compile_ttm=true: torch.compile failed ({reason}); set method.compile_ttm=false") from None

    @contextlib.contextmanager
    def during_generation(self, context: GenerationContext) -> Iterator[None]:
        selector = self._selector
        selector.reset()
        span = pruning_span(context.visual_start, context.visual_length, self.mode)
        score_layer = self.l if self.mode == "paper" else max(self.l - 1, 0)  # official scores at layer L-1
        decoder = language_model(context.model)
        kernel = attention_kernel(decoder)
        attend = masked_attention if self.reference_masking else subset_attention
        # Layers above the scoring layer hold their pruned entries aside (the scoring layer needs every key).
        layers = context.model.config.text_config.num_hidden_layers
        aside = [] if self.reference_masking else [i for i in range(layers) if i > score_layer and i >= self.l]
        cache = Cache(
            layers=[
                PrunableLayer("cpu" if self.offload_pruned else None) if i in aside else DynamicLayer() for i in range(layers)
            ]
        )
        if aside:
            context.generate_kwargs["past_key_values"] = cache
        step: dict[str, Any] = {"index": None, "applied": None}  # applied: the kept set the held-aside layers hold

        def attention(module, query, key, value, attention_mask, **kwargs):
            layer, decoding = module.layer_idx, query.shape[2] == 1 and key.shape[2] > 1
            if decoding and layer == score_layer:
                probabilities = last_query_attention(query, key, kwargs["scaling"], attention_mask)
                kept = selector.step(probabilities[span[0] : span[1]])
                step["index"] = None if kept is None else attended_key_index(key.shape[2], span, kept)
                if aside and kept is not step["applied"]:  # re-partition only when the kept set changes
                    hot = step["index"] if kept is not None else torch.arange(key.shape[2], device=key.device)
                    for i in aside:
                        cache.layers[i].keep_hot(hot)
                    step["applied"] = kept
            if decoding and layer in aside:  # its cache returned only the kept entries and the new token
                if attention_mask is not None:
                    attention_mask = attention_mask.index_select(-1, cache.layers[layer].hot_positions)
                return kernel(module, query, key, value, attention_mask, **kwargs)
            if decoding and layer >= self.l and step["index"] is not None:
                return attend(kernel, module, query, key, value, attention_mask, step["index"], **kwargs)
            return kernel(module, query, key, value, attention_mask, **kwargs)

        with routed_attention(decoder, "dycoke_routed", attention):
            yield
        context.stats["attention_kernel"] = kernel_name(decoder)
        context.stats["kv_held_aside_bytes"] = sum(cache.layers[i].cold_bytes() for i in aside)
        context.stats.update(self._ttm_stats)
        outside_span = context.visual_length - (span[1] - span[0])
        attended = [count + outside_span for count in selector.attended_visual]
        attended_mean = mean(attended) if attended else context.visual_length  # no decode step: nothing pruned
        context.stats.update(
            decode_steps=selector.steps,
            reselections=selector.reselections,
            attended_visual_mean=attended_mean,
            # visual tokens the layers >= l saw, over the full-token count (newline included in both)
            retained_ratio=attended_mean / (self._ttm_stats["ttm_tokens_in"] + 1),
            paper_retained_ratio=self.paper_retained_ratio(),
        )

    def planned_visual_tokens(self, frames: int, tokens_per_frame: int, layers: int) -> tuple[list[float], list[float]]:
        """As the paper's Table 1 counts it: every layer sees the TTM output (decode-time pruning is not counted)."""
        kept = float(ttm_keep_indices(torch.zeros(frames, tokens_per_frame, 1), self.k, self.mode).numel())
        return [kept] * layers, [kept] * layers

    def planned_retained_ratio(self) -> float:
        return self.paper_retained_ratio()

    def paper_retained_ratio(self) -> float:
        """The paper's formula: (1/4 + 3/4 (1-K)) (1-P) of the visual tokens."""
        return (1 / 4 + 3 / 4 * (1 - self.k)) * (1 - self.p)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "paper_retained_ratio": self.paper_retained_ratio()}


def pruning_span(visual_start: int, visual_length: int, mode: str) -> tuple[int, int]:
    """The prompt positions decode-time pruning chooses among; `visual_length` counts the newline token.

    Paper: every visual token. Official: the released code sets the image length to the TTM count
    minus one before the newline is appended, so the span is [start, start + N_ttm - 1): the last
    TTM token is always kept and the newline lies outside.
    """
    if mode == "official":
        return visual_start, visual_start + (visual_length - 1) - 1
    return visual_start, visual_start + visual_length


def per_sample_seed(seed: int, sample: str) -> int:
    """A seed of its own for each sample, so Table 5's random choice differs from video to video."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample}".encode()).digest()[:8], "little")
