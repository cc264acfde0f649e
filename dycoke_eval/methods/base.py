"""The contract between the model wrapper and a compression method.

The wrapper owns the model plumbing (video decode, vision encoder, prompt, `generate`); a method
only sees the two places where DyCoke-style methods act:

* `select_video_tokens` before the LLM: per-frame pooled features in, the tokens to keep out
  (the trailing `image_newline` token is the wrapper's and is always kept);
* `during_vision_encoding` around the vision encoder, for methods that score tokens with the
  encoder's own attention (PruMerge);
* `during_generation` around `generate`: a context manager that may install hooks, attention
  functions or a cache, and must remove them on exit so one loaded model can run several methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

IMPLEMENTATION_FLAGS = {
    "reference_masking",
    "offload_pruned",
}  # how a method computes, not what it does: not recorded as a setting


@dataclass
class GenerationContext:
    """What a method may need to know about the prompt it is generating for."""

    model: Any
    input_ids: torch.Tensor
    visual_start: int  # index of the first visual token in `input_ids`
    visual_length: int  # number of visual tokens entering the LLM (newline included)
    stats: dict[str, Any] = field(default_factory=dict)  # per-sample figures the method reports
    generate_kwargs: dict[str, Any] = field(default_factory=dict)  # what `generate` is called with; a method may add a cache


class CompressionMethod:
    """Base class: the identity method. Subclasses are dataclasses configured from `conf/method/`."""

    name: str = "base"
    reuses_encoder_outputs: ClassVar[bool] = True  # False for methods that need the encoder's internals (PruMerge)
    routes_attention: ClassVar[bool] = False  # True for methods that compute attention through their own function

    def validate_for(self, model_config: Any) -> None:
        """Raise ValueError naming the bad setting if the method cannot run on this model."""

    @contextlib.contextmanager
    def during_vision_encoding(self, model: Any) -> Iterator[None]:
        yield

    def select_video_tokens(self, frame_features: torch.Tensor, sample: str = "") -> torch.Tensor:
        """[F, N, D] pooled, projected frame features -> [V, D] tokens that enter the LLM.

        `sample` names the sample (task and document), for methods whose choice is random per video.
        """
        return frame_features.reshape(-1, frame_features.shape[-1])

    @contextlib.contextmanager
    def during_generation(self, context: GenerationContext) -> Iterator[None]:
        yield

    def planned_visual_tokens(self, frames: int, tokens_per_frame: int, layers: int) -> tuple[list[float], list[float]]:
        """Visual tokens each LLM layer sees in prefill and in decoding, for FLOPs accounting before a run."""
        visual = float(frames * tokens_per_frame)
        return [visual] * layers, [visual] * layers

    def planned_retained_ratio(self) -> float:
        """The fraction of visual tokens the method keeps, as the paper reports it."""
        return 1.0

    def describe(self) -> dict[str, Any]:
        """The method's settings, recorded with every result."""
        settings = {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in IMPLEMENTATION_FLAGS}
        return {"name": self.name, **settings}
