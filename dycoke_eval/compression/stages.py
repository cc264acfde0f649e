"""Compression as stages: small dataclasses that only score and select, composed into methods.

Four kinds, by where they act:
* `PreLLMStage`: video tokens (plus captured encoder signals) in, kept or merged tokens and their
  grid positions out, before the language model (TTM, PruMerge, random, pooling).
* `PrefillStage`: at layer `layer - 1` of prefill, scored by the last prompt token's attention over
  the visual tokens (or, `queries = "after_visual"`, by every later token's, max over heads and
  queries); from layer `layer` on only the kept ones remain (FastV), and with `trims_earlier_cache`
  the earlier layers' cache keeps only them too (PruneVid's in-LLM stage); with `merges_states` the kept
  ones enter `layer` with states merged from the dropped ones (HoliTom's merge M).
* `DecodeStage`: at each decode step, scored by the newest token's attention at `score_layer`;
  layers >= `first_layer` attend to the kept visual tokens (DyCoke's dynamic KV pruning).
* `MidLayerStage`: inside every prefill layer, after the attention's residual add and before the MLP
  (and at layer 0's entry), states merged in place and rows dropped from there on (FrameFusion).

A stage is also a method of one stage. A composed method (`CompressionMethod` subclass) holds the
settings people override and returns its stages (DyCoke = TTM + dynamic KV pruning). Stages never
touch the model: `dycoke_eval.compression.dispatcher` owns all plumbing. They keep no per-sample
state: whatever a sample needs (a decode selector) is made fresh by `new_selector` and held by the
dispatcher, and per-sample figures come back as values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch

from dycoke_eval.config import IMPLEMENTATION_FLAGS, ConfigError
from dycoke_eval.geometry import ModelInfo, PlannedCounts, VideoLayout


@dataclass
class VideoTokens:
    """Video tokens on their way to the LLM: features [M, D] and their flat grid positions [M] (into F*rows*cols).

    A merged token carries the position of the token it was merged into; -1 marks a token at no
    grid position (PruMerge's per-frame remainder). `figures` are the last stage's per-sample
    figures (counts, notes), returned as values. `layout` is the model's (its grid, newlines and family), for
    stages whose released arithmetic differs by model.
    """

    features: torch.Tensor
    index: torch.Tensor
    layout: VideoLayout
    figures: dict[str, Any] = field(default_factory=dict)
    whole: bool = False  # every grid token, in grid order: as the encoder gave them, before any stage
    # None: the model's own newline tokens. n: on a model with a newline after every grid row (LLaVA-Video), the video
    # is laid out frame by frame instead, each frame's tokens in grid order then n newline tokens, as released code
    # that rebuilds the layout does (FlashVID's `mm_newline_position=frame`: 1; VidCom2's grid mapping: all 13 rows').
    frame_newlines: int | None = None

    @classmethod
    def from_grid(cls, grid: torch.Tensor, layout: VideoLayout) -> VideoTokens:
        frames, tokens, dim = grid.shape
        if (frames, tokens) != (layout.frames, layout.tokens_per_frame):
            raise ValueError(f"a grid of {frames} x {tokens} tokens is not the layout's {layout}")
        return cls(grid.reshape(-1, dim), torch.arange(frames * tokens, device=grid.device), layout, whole=True)

    @property
    def frames(self) -> int:
        return self.layout.frames

    @property
    def rows(self) -> int:
        return self.layout.rows

    @property
    def cols(self) -> int:
        return self.layout.cols

    @property
    def tokens_per_frame(self) -> int:
        return self.layout.tokens_per_frame

    def grid(self) -> torch.Tensor:
        """[F, N, D], for stages that need whole frames; an error if an earlier stage already selected or merged tokens
        (known on the host: comparing the index with the grid's would make the host wait for the device)."""
        if not self.whole:
            raise ConfigError("this stage needs every video token; put it first in the method's stages")
        return self.features.view(self.frames, self.tokens_per_frame, -1)

    def replaced(
        self, features: torch.Tensor, index: torch.Tensor, frame_newlines: int | None = None, **figures: Any
    ) -> VideoTokens:
        """New tokens at grid positions `index`, with this stage's figures (and its newline layout, see `frame_newlines`)."""
        return VideoTokens(features, index, self.layout, figures, frame_newlines=frame_newlines)

    def keep(self, kept: torch.Tensor, **figures: Any) -> VideoTokens:
        """The tokens at rows `kept` (in that order)."""
        return self.replaced(self.features[kept], self.index[kept], **figures)


class CompressionMethod:
    """A method: settings plus the stages they make. The base is the identity (full tokens)."""

    name: str = "base"

    def keeps_positions(self) -> bool:
        """Whether kept tokens keep their original positions (explicit position ids) rather than consecutive ones."""
        return any(getattr(stage, "keep_positions", False) for stage in self.stages())

    def stages(self) -> list[Stage]:
        return []

    def validate_for(self, model: ModelInfo) -> None:
        """Raise ConfigError naming the bad setting if the method cannot run on this model."""
        for stage in self.stages():
            if isinstance(stage, PrefillStage | DecodeStage) and not model.video_in_one_span:
                raise ConfigError(
                    f"{self.name}: its {type(stage).__name__} acts inside the LLM on the video's one run of tokens, but "
                    f"the {model.family!r} model family puts a timestamp and start/end tokens between temporal patches; "
                    "in-LLM stages cannot yet tell those apart: choose a method acting before the LLM (dycoke_ttm, random, "
                    "pooling)"
                )
            stage.check(model)

    def plan(self, counts: PlannedCounts) -> PlannedCounts:
        for stage in self.stages():
            counts = stage.plan(counts)
        return counts

    def planned_retained_ratio(self, counts: PlannedCounts) -> float:
        """The share of visual tokens kept, as the method's paper reports it; by default the plan's mean."""
        planned = self.plan(counts)
        passes = planned.prefill + planned.decode
        return sum(passes) / len(passes) / counts.layout.grid_tokens

    def signals(self) -> frozenset[str]:
        """Encoder signals the method's pre-LLM stages need, captured in the encoder pass."""
        needed = [stage.needs() for stage in self.stages() if isinstance(stage, PreLLMStage)]
        return frozenset().union(*needed)

    def describe(self, family: str | None = None) -> dict[str, Any]:
        """The method's settings, recorded with every result; on the model `family`, as they resolve there (a setting
        left to the family's released value, say)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self)} if hasattr(self, "__dataclass_fields__") else {}
        settings = {k: v for k, v in settings.items() if not k.startswith("_") and k not in IMPLEMENTATION_FLAGS}
        return {"name": self.name, **{k: v for k, v in settings.items() if k != "name"}}


class Stage(CompressionMethod):
    """One step of compression; on its own, a method of one stage."""

    def stages(self) -> list[Stage]:
        return [self]

    def check(self, model: ModelInfo) -> None:
        """Raise ConfigError if this stage cannot run on the model (a layer beyond its depth, say)."""

    def plan(self, counts: PlannedCounts) -> PlannedCounts:
        return counts


class PreLLMStage(Stage):
    def needs(self) -> frozenset[str]:
        """Encoder signals (`keys`, `attention_received`, `probe_attention`) this stage scores with."""
        return frozenset()

    def check(self, model: ModelInfo) -> None:
        missing = self.needs() - model.signals
        if missing:
            raise ConfigError(
                f"{self.name} needs the encoder signal(s) {sorted(missing)}, which this checkpoint cannot give "
                f"(it gives {sorted(model.signals)})"
            )

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        """The tokens that go on; `sample` names the sample (task/doc) for stages whose choice is random per video."""
        raise NotImplementedError

    def planned_tokens(self, counts: PlannedCounts) -> float:
        """Video tokens this stage leaves, for plans."""
        raise NotImplementedError

    def plan(self, counts: PlannedCounts) -> PlannedCounts:
        return counts.uniform(self.planned_tokens(counts))


def per_sample_seed(seed: int, sample: str) -> int:
    """A seed of its own for each sample (task/doc), so a random choice differs from video to video and reruns agree."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample}".encode()).digest()[:8], "little")


class PrefillStage(Stage):
    layer: int  # the first layer that sees only the kept tokens; scored at layer - 1
    queries = "last"  # who scores: "last" (the last prompt token, head mean) | "after_visual" (max over heads, then queries)
    trims_earlier_cache = False  # True: once scored, the layers before `layer` drop the pruned entries from their cache too
    layer_setting = "layer"  # the method setting users give `layer` as, named in errors (HoliTom's `merge_layer`)
    merges_states = False  # True: the kept tokens enter `layer` with the states `merge_states` gives (HoliTom's merge M)

    @property
    def score_layer(self) -> int:
        return self.layer - 1

    def check(self, model: ModelInfo) -> None:
        if not 1 <= self.layer < model.layers:
            name = self.layer_setting
            raise ConfigError(
                f"{name}={self.layer}: the language model has {model.layers} layers; choose 1 <= {name} < {model.layers}"
            )

    def keep(self, visual_attention: torch.Tensor, pre_llm: dict[str, Any]) -> torch.Tensor:
        """[V] attention over the visual tokens present (see `queries`), and the pre-LLM stages' figures for this
        sample -> kept positions among them (ascending, or in the order `merge_states` wants them)."""
        raise NotImplementedError

    def merge_states(self, kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """With `merges_states`: the hidden states entering `layer` of the kept visual tokens [n, D] (in `keep`'s
        order) and of the dropped ones [m, D] (ascending) -> the kept tokens' new states [n, D]."""
        raise NotImplementedError


class Selector(Protocol):
    """A decode stage's per-sample state: fed each step's visual attention, it returns the kept positions or None."""

    def step(self, visual_attention: torch.Tensor) -> torch.Tensor | None: ...

    def figures(self) -> dict[str, Any]: ...


class DecodeStage(Stage):
    first_layer: int  # layers >= this attend only to the kept visual tokens while decoding
    carries_state: bool = False  # True: one selector serves every sample of a run (a released-code quirk)

    @property
    def score_layer(self) -> int:
        return self.first_layer

    def check(self, model: ModelInfo) -> None:
        if self.first_layer >= model.layers:
            raise ConfigError(
                f"l={self.first_layer}: the language model has {model.layers} layers (0..{model.layers - 1}); "
                f"choose l < {model.layers}"
            )

    def span(self, visual_start: int, visual_length: int) -> tuple[int, int]:
        """The prompt positions the selection chooses among (by default every visual token)."""
        return visual_start, visual_start + visual_length

    def new_selector(self) -> Selector:
        raise NotImplementedError


class Fuser(Protocol):
    """A mid-layer stage's per-sample state: stepped on each prefill layer's states, it says which rows go on."""

    wants_attention: bool  # whether the coming attention must hand over its scores (`score`) to the next step

    def score(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor: ...

    def step(self, hidden: torch.Tensor, attention: torch.Tensor | None = None) -> torch.Tensor | None: ...

    def figures(self) -> dict[str, Any]: ...


class MidLayerStage(Stage):
    """Inside the prefill layers: at layer 0's entry and between every layer's attention (its residual added) and its
    MLP, it may merge states in place and drop rows, from there on (FrameFusion). Its per-sample state comes fresh
    from `new_fuser`; the dispatcher steps it and keeps positions, cache and masks in line."""

    def new_fuser(self, layout: VideoLayout, visual_start: int, prompt_length: int, layers: int) -> Fuser:
        raise NotImplementedError


# Captured through the tower's attention function (pooled, and unpooled for VisionZip's in-encoder form).
ENCODER_ROUTED_SIGNALS = frozenset({"keys", "attention_received", "patch_keys", "patch_attention_received"})


def routes_attention(method: CompressionMethod) -> bool:
    """Whether the method computes attention through our own function (so the kernel must be sdpa or eager)."""
    stages = method.stages()
    in_llm = (PrefillStage, DecodeStage, MidLayerStage)
    return any(isinstance(s, in_llm) for s in stages) or bool(method.signals() & ENCODER_ROUTED_SIGNALS)
