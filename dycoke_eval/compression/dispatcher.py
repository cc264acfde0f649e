"""The one place where compression touches a model: it composes a method's stages and owns all plumbing.

`Compressor(adapter, method)` runs a method's pre-LLM stages on the encoded video, and around
`generate` (`Compressor.generating`) installs what its prefill and decode stages need: one routed
attention function for the decoder (scoring, subset attention), forward pre-hooks that drop
positions from prefill hidden states, and a cache that holds pruned entries aside. Everything is
removed on exit, so one loaded model runs any number of methods in turn.

It also computes the standard counts for every method alike (README "Token counts"): visual
tokens entering the LLM, after each stage, seen by each layer in prefill and attended by each layer
per decode step, and one retained ratio.

`reference=True` computes the same selections by masking instead of dropping, gathering or holding
aside: the slow reference the fast path is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from statistics import mean
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from dycoke_eval.compression.stages import (
    CompressionMethod,
    DecodeStage,
    MidLayerStage,
    PrefillStage,
    PreLLMStage,
    Selector,
    VideoTokens,
)
from dycoke_eval.config import ConfigError
from dycoke_eval.methods.kv_selection import attended_key_index, last_query_attention, max_attention
from dycoke_eval.models.base import EncodedVideo, GenerationInputs, ModelAdapter
from dycoke_eval.plumbing.attention import attention_kernel, kernel_name, masked_attention, routed_attention, subset_attention
from dycoke_eval.plumbing.cache import GENERATE_CACHE_ARGUMENT, PrunableLayer, TrimmedLayer
from dycoke_eval.plumbing.hooks import prefill_position_pruning, prefill_state_merging
from dycoke_eval.plumbing.layer_merging import MidLayerShrinking


@dataclass
class SelectedTokens:
    """What the pre-LLM stages left: the tokens, their counts after each stage, and the stages' figures."""

    tokens: VideoTokens
    by_stage: dict[str, int]
    figures: dict[str, Any]


@dataclass
class GenerationFigures:
    """Per-sample counts from one generation, filled when `Compressor.generating` exits."""

    prefill_visual_by_layer: list[int] = field(default_factory=list)
    decode_visual_by_layer: list[float] = field(default_factory=list)
    by_stage: dict[str, float] = field(default_factory=dict)  # prefill: kept from its layer on; decode: attended, step mean
    figures: dict[str, Any] = field(default_factory=dict)  # the stages' own figures, and the kernel used

    def retained_ratio(self, full_visual_tokens: int, decode_steps: int) -> float:
        """Visual tokens attended, averaged over layers and forward passes (prefill, each decode step), over the full count."""
        per_layer = [
            (prefill + decode_steps * decode) / (1 + decode_steps)
            for prefill, decode in zip(self.prefill_visual_by_layer, self.decode_visual_by_layer, strict=True)
        ]
        return mean(per_layer) / full_visual_tokens


class Compressor:
    """One method on one model, for one run of samples. Holds no per-sample state except a released-code carry-over."""

    def __init__(self, adapter: ModelAdapter, method: CompressionMethod, reference: bool = False) -> None:
        stages = method.stages()
        self.adapter, self.method, self.reference = adapter, method, reference
        self.pre_llm = [s for s in stages if isinstance(s, PreLLMStage)]
        self.prefill = sorted((s for s in stages if isinstance(s, PrefillStage)), key=lambda s: s.layer)
        self.decode = [s for s in stages if isinstance(s, DecodeStage)]
        self.mid_layer = [s for s in stages if isinstance(s, MidLayerStage)]
        if self.mid_layer and len(stages) > 1:
            raise ConfigError(f"method {method.name!r}: a mid-layer stage works on every video token and runs alone")
        if len(self.decode) > 1:
            raise ConfigError(f"method {method.name!r} has {len(self.decode)} decode stages; one is supported")
        if self.prefill and self.decode:
            raise ConfigError(f"method {method.name!r} combines prefill and decode stages, which is not supported yet")
        if len(self.prefill) > 1 and any(s.trims_earlier_cache for s in self.prefill):
            raise ConfigError(
                f"method {method.name!r}: a prefill stage that trims the earlier layers' cache must be the only one"
            )
        # The released DyCoke code never resets its previous attention vector between samples: official mode keeps it.
        self._carried: dict[int, Selector] = {id(s): s.new_selector() for s in self.decode if s.carries_state}

    def check_static_decoding(self) -> None:
        """A static cache (`static_decoding=true`) holds every layer at the prompt's full length, written in place, and
        compiled decoding replays one graph per step: only methods that act before the LLM fit it."""
        stage = next(iter(self.prefill or self.mid_layer or self.decode), None)
        if stage is not None:
            acts = "prunes the KV cache while decoding" if self.decode else "drops prompt tokens in prefill"
            raise ConfigError(
                f"static_decoding=true: method {self.method.name!r} {acts} (stage {stage.name!r}), so its layers hold "
                "caches of different, changing lengths that a static cache cannot; set static_decoding=false"
            )

    def select(self, encoded: EncodedVideo, sample: str = "") -> SelectedTokens:
        """Run the pre-LLM stages in order on the video's tokens."""
        layout = encoded.layout
        tokens, by_stage, figures = VideoTokens.from_grid(encoded.grid, layout), {}, {}
        for stage in self.pre_llm:
            tokens = stage.select(tokens, encoded.signals, sample)
            by_stage[_unique(stage.name, by_stage)] = int(tokens.features.shape[0])
            figures.update(tokens.figures)
        return SelectedTokens(tokens, by_stage, figures)

    @contextmanager
    def generating(self, inputs: GenerationInputs, selected: SelectedTokens | None = None) -> Iterator[GenerationFigures]:
        """Around `generate`: install the prefill and decode stages' plumbing; the figures are complete on exit.

        `selected` is what `select` gave for this sample: prefill stages see its figures (PruneVid's groups).
        """
        decoder = self.adapter.language_model
        layers = decoder.config.num_hidden_layers
        result = GenerationFigures(
            prefill_visual_by_layer=[inputs.visual_length] * layers, decode_visual_by_layer=[float(inputs.visual_length)] * layers
        )
        if not (self.prefill or self.decode or self.mid_layer):
            yield result
            return
        kernel = attention_kernel(decoder)
        with ExitStack() as stack:
            if self.mid_layer:
                route = _MidLayerRoute(self, inputs, kernel, stack, selected)
            elif self.prefill:
                route = _PrefillRoute(self, inputs, kernel, stack, selected.figures if selected is not None else {})
            else:
                route = _DecodeRoute(self, inputs, kernel, layers)
            stack.enter_context(routed_attention(decoder, "compressed", route.attention))
            yield result
        route.finish(result)
        result.figures["attention_kernel"] = kernel_name(decoder)

    def selector_for(self, stage: DecodeStage) -> Selector:
        carried = self._carried.get(id(stage))
        if carried is None:
            return stage.new_selector()
        carried.reset()
        return carried


class _PrefillRoute:
    """Prefill stages on their layer schedule: score at `layer - 1`, keep from `layer` on (dropped, or masked).

    A stage that `trims_earlier_cache` (the only prefill stage then) also cuts the cache of the layers before
    its `layer` down to the kept tokens once it has scored, so decoding attends to them alone at every layer.
    A stage that `merges_states` replaces the kept tokens' states entering its `layer` by its merge of the kept and
    dropped ones, on both paths (the reference keeps the dropped rows, masked from then on).
    """

    def __init__(
        self, compressor: Compressor, inputs: GenerationInputs, kernel, stack: ExitStack, pre_llm: dict[str, Any]
    ) -> None:
        self.stages, self.reference, self.kernel, self.pre_llm = compressor.prefill, compressor.reference, kernel, pre_llm
        self.prompt_length = inputs.input_ids.shape[1]
        self.span = (inputs.visual_start, inputs.visual_start + inputs.visual_length)
        self.schedule: list[tuple[int, torch.Tensor]] = []  # (first layer, prompt positions present from it on)
        first = self.stages[0].layer
        self.trimmed = range(first) if self.stages[0].trims_earlier_cache else range(0)  # layers whose cache is cut
        self.merges: dict[int, tuple[PrefillStage, torch.Tensor, torch.Tensor]] = {}  # layer: stage, kept, dropped positions
        decoder = compressor.adapter.language_model
        merging = {stage.layer for stage in self.stages if stage.merges_states}
        if merging:  # installed first, so a merge sees every state the layer before left
            stack.enter_context(prefill_state_merging(decoder, merging, self.merged))
        if not self.reference:
            stack.enter_context(prefill_position_pruning(decoder, first, self.present_at))
            if self.trimmed:
                layers = decoder.config.num_hidden_layers
                self.cache = Cache(layers=[TrimmedLayer() if i in self.trimmed else DynamicLayer() for i in range(layers)])
                inputs.kwargs[GENERATE_CACHE_ARGUMENT] = self.cache

    def present_at(self, layer: int) -> torch.Tensor | None:
        """Prompt positions whose states reach `layer` (None: all of them)."""
        present = None
        for first, positions in self.schedule:
            if first <= layer:
                present = positions
        return present

    def cached_at(self, layer: int) -> torch.Tensor | None:
        """Prompt positions whose cache entries `layer` holds for decoding (None: all of them)."""
        if layer in self.trimmed and self.schedule:
            return self.schedule[0][1]
        return self.present_at(layer)

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        layer, prefill = module.layer_idx, query.shape[2] > 1
        present = self.present_at(layer)
        if prefill:
            for stage in self.stages:
                if layer == stage.score_layer:
                    self._score(stage, query, key, attention_mask, present, kwargs["scaling"])
        positions = present if prefill else self.cached_at(layer)
        if self.reference and positions is not None:
            generated = torch.arange(self.prompt_length, key.shape[2], device=key.device)
            index = torch.cat([positions, generated])
            return masked_attention(self.kernel, module, query, key, value, attention_mask, index, **kwargs)
        if not prefill and layer in self.trimmed and attention_mask is not None:  # a materialised mask spans every prompt key
            generated = torch.arange(self.prompt_length, attention_mask.shape[-1], device=attention_mask.device)
            attention_mask = attention_mask.index_select(-1, torch.cat([positions, generated]))
        return self.kernel(module, query, key, value, attention_mask, **kwargs)

    def _score(self, stage: PrefillStage, query, key, attention_mask, present, scaling) -> None:
        present = torch.arange(self.prompt_length, device=key.device) if present is None else present
        if self.reference and key.shape[2] != present.numel():  # the reference still holds every key: score the present ones
            key = key.index_select(2, present)
            attention_mask = None if attention_mask is None else attention_mask.index_select(-1, present)
        is_visual = self._visual(present)
        if stage.queries == "after_visual":
            after = (present >= self.span[1]).nonzero().flatten()  # among the present positions
            rows = after if query.shape[2] == present.numel() else present[after]  # the reference's query holds them all
            mask = None if attention_mask is None else attention_mask.index_select(-2, rows)
            probabilities = max_attention(query.index_select(2, rows), key, scaling, mask, present[after], present)
        else:
            probabilities = last_query_attention(query, key, scaling, attention_mask)
        visual = is_visual.nonzero().flatten()
        chosen = stage.keep(probabilities[visual], self.pre_llm)
        kept = present[visual[chosen]]
        if stage.merges_states:
            others = torch.ones_like(visual, dtype=torch.bool).scatter(0, chosen, False).nonzero().flatten()
            self.merges[stage.layer] = (stage, kept, present[visual[others]])
        self.schedule.append((stage.layer, torch.cat([present[~is_visual], kept]).sort().values))
        if self.trimmed and not self.reference:  # the layers so far have cached every prompt position
            for layer in self.trimmed:
                self.cache.layers[layer].trim(self.schedule[-1][1])

    def merged(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Prefill states [1, P, D] entering `layer` -> the same with the kept visual tokens' states merged. Their rows
        are the positions present before `layer` (the reference holds every prompt position)."""
        stage, kept, dropped = self.merges[layer]
        before = None if self.reference else self.present_at(layer - 1)
        if before is not None:
            kept, dropped = torch.searchsorted(before, kept), torch.searchsorted(before, dropped)
        states = hidden[0]
        merged = stage.merge_states(states.index_select(0, kept), states.index_select(0, dropped))
        return hidden.index_copy(1, kept, merged[None])

    def _visual(self, positions: torch.Tensor) -> torch.Tensor:
        """Which of these prompt positions are visual tokens."""
        return (positions >= self.span[0]) & (positions < self.span[1])

    def finish(self, result: GenerationFigures) -> None:
        """The visual tokens each layer saw and cached, and each stage kept: counted on the device, read in one sync."""
        counts: dict[tuple[str, Any], torch.Tensor] = {}
        for layer in range(len(result.prefill_visual_by_layer)):
            present, cached = self.present_at(layer), self.cached_at(layer)
            if present is not None:
                counts["prefill", layer] = self._visual(present).sum()
            if cached is not None:  # decoding attends to what the layer cached
                counts["decode", layer] = self._visual(cached).sum()
        seen: dict[str, int] = {}
        for stage, (_, positions) in zip(self.stages, self.schedule, strict=False):
            name = _unique(stage.name, seen)
            seen[name] = 0
            counts["stage", name] = self._visual(positions).sum()
        values = torch.stack(list(counts.values())).tolist() if counts else []
        for (kind, key), value in zip(counts, values, strict=True):
            if kind == "prefill":
                result.prefill_visual_by_layer[key] = int(value)
            elif kind == "decode":
                result.decode_visual_by_layer[key] = float(value)
            else:
                result.by_stage[key] = int(value)


class _DecodeRoute:
    """A decode stage: each step scores at `score_layer`; layers >= `first_layer` attend to the kept visual tokens.

    By default the whole cache stays on the accelerator, as the released code keeps it, and every pruned
    layer attends through a gather of the kept keys at each step: no host sync and no copy. With
    `offload_pruned` the layers above the scoring layer hold their pruned entries on the CPU in a
    `PrunableLayer` cache instead, re-partitioned when the kept set changes (for memory-bound runs; that
    check and the copies make the host wait).
    """

    def __init__(self, compressor: Compressor, inputs: GenerationInputs, kernel, layers: int) -> None:
        stage = self.stage = compressor.decode[0]
        self.kernel, self.reference = kernel, compressor.reference
        self.selector = compressor.selector_for(stage)
        self.span = stage.span(inputs.visual_start, inputs.visual_length)
        self.visual_length = inputs.visual_length
        self.outside = self.visual_length - (self.span[1] - self.span[0])  # visual tokens outside the span, always attended
        offload = getattr(stage, "offload_pruned", False) and not self.reference
        self.aside = [i for i in range(layers) if i > stage.score_layer and i >= stage.first_layer] if offload else []
        self.cache = Cache(layers=[PrunableLayer("cpu") if i in self.aside else DynamicLayer() for i in range(layers)])
        if self.aside:
            inputs.kwargs[GENERATE_CACHE_ARGUMENT] = self.cache
        self.index: torch.Tensor | None = None  # keys the pruned layers attend to at this step
        self.applied: torch.Tensor | None = None  # the kept set the held-aside layers hold
        self.attended: list[int] = []  # visual tokens the pruned layers attended, per decode step

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        layer, decoding = module.layer_idx, query.shape[2] == 1 and key.shape[2] > 1
        stage = self.stage
        if decoding and layer == stage.score_layer:
            probabilities = last_query_attention(query, key, kwargs["scaling"], attention_mask)
            kept = self.selector.step(probabilities[self.span[0] : self.span[1]])
            self.index = None if kept is None else attended_key_index(key.shape[2], self.span, kept)
            self.attended.append(self.visual_length if kept is None else int(kept.numel()) + self.outside)
            if self.aside and not _same_set(kept, self.applied):  # re-partition only when the kept set changes
                hot = self.index if kept is not None else torch.arange(key.shape[2], device=key.device)
                for i in self.aside:
                    self.cache.layers[i].keep_hot(hot)
                self.applied = kept
        if decoding and layer in self.aside:  # its cache returned only the kept entries and the new token
            if attention_mask is not None:
                attention_mask = attention_mask.index_select(-1, self.cache.layers[layer].hot_positions)
            return self.kernel(module, query, key, value, attention_mask, **kwargs)
        if decoding and layer >= stage.first_layer and self.index is not None:
            attend = masked_attention if self.reference else subset_attention
            return attend(self.kernel, module, query, key, value, attention_mask, self.index, **kwargs)
        return self.kernel(module, query, key, value, attention_mask, **kwargs)

    def finish(self, result: GenerationFigures) -> None:
        pruned = mean(self.attended) if self.attended else self.visual_length  # no decode step: nothing pruned
        for layer in range(self.stage.first_layer, len(result.decode_visual_by_layer)):
            result.decode_visual_by_layer[layer] = pruned
        result.by_stage[self.stage.name] = pruned
        result.figures.update(self.selector.figures(), attended_visual_mean=pruned)
        result.figures["kv_held_aside_bytes"] = sum(self.cache.layers[i].cold_bytes() for i in self.aside)


class _MidLayerRoute:
    """A mid-layer stage (FrameFusion): its fuser stepped inside every prefill layer by `MidLayerShrinking`, on the
    video `select` gave (every token). Each layer caches what its attention saw; decoding attends to all of it."""

    def __init__(
        self, compressor: Compressor, inputs: GenerationInputs, kernel, stack: ExitStack, selected: SelectedTokens | None
    ) -> None:
        if selected is None:
            raise ValueError("a mid-layer stage needs the video's layout: pass `select`'s tokens to `generating`")
        self.stage = compressor.mid_layer[0]
        decoder = compressor.adapter.language_model
        layers, prompt_length = decoder.config.num_hidden_layers, inputs.input_ids.shape[1]
        self.fuser = self.stage.new_fuser(selected.tokens.layout, inputs.visual_start, prompt_length, layers)
        self.span = (inputs.visual_start, inputs.visual_start + inputs.visual_length)
        self.shrinking = MidLayerShrinking(self.fuser, kernel, prompt_length, layers, compressor.reference)
        stack.enter_context(self.shrinking.installed(decoder))
        if not compressor.reference:
            inputs.kwargs[GENERATE_CACHE_ARGUMENT] = self.shrinking.cache()
        self.attention = self.shrinking.attention

    def finish(self, result: GenerationFigures) -> None:
        """The visual tokens each layer saw (and cached) and the stage left: counted on the device, read in one sync."""
        start, end = self.span
        seen = {layer: positions for layer, positions in enumerate(self.shrinking.seen) if positions is not None}
        left = self.shrinking.present  # None: nothing was merged or pruned
        values = [end - start]
        if left is not None:
            values = torch.stack([((p >= start) & (p < end)).sum() for p in [*seen.values(), left]]).tolist()
        for layer, value in zip(seen, values, strict=False):
            result.prefill_visual_by_layer[layer] = int(value)
            result.decode_visual_by_layer[layer] = float(value)
        result.by_stage[self.stage.name] = int(values[-1])
        result.figures.update(self.fuser.figures())


def _same_set(kept: torch.Tensor | None, applied: torch.Tensor | None) -> bool:
    """Whether the held-aside layers already hold this kept set (None: every token); reads the device."""
    if kept is None or applied is None:
        return kept is applied
    return kept is applied or (kept.shape == applied.shape and torch.equal(kept, applied))


def _unique(name: str, taken: dict[str, Any]) -> str:
    """`name`, or `name#2`, ... when a method has two stages of one kind."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}#{n}"
    return candidate
