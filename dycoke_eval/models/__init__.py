"""Model adapters, one per model family, chosen from the checkpoint's HF config (`model_type`) or by name.

A new family is one module here with a `ModelAdapter` subclass, one line in `ADAPTERS` (or in
`NAMED_ADAPTERS` when its checkpoints share another family's `model_type`, as LLaVA-Video's share
LLaVA-OneVision's: the model config then names it, `adapter: llava_video`), and a
`conf/model/*.yaml` per checkpoint.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from dycoke_eval.config import ConfigError
from dycoke_eval.geometry import LanguageModelDims, VideoLayout
from dycoke_eval.models.base import EncodedVideo, GenerationInputs, ModelAdapter
from dycoke_eval.models.llava_onevision import LlavaOneVisionAdapter
from dycoke_eval.models.llava_video import LlavaVideoAdapter
from dycoke_eval.models.qwen2_5_vl import Qwen2_5_VLAdapter
from dycoke_eval.models.qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    model_type: adapter
    for adapter in (LlavaOneVisionAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter)
    for model_type in adapter.model_types
}
NAMED_ADAPTERS: dict[str, type[ModelAdapter]] = {
    adapter.family: adapter for adapter in (LlavaOneVisionAdapter, LlavaVideoAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter)
}

__all__ = [
    "ADAPTERS",
    "NAMED_ADAPTERS",
    "EncodedVideo",
    "GenerationInputs",
    "ModelAdapter",
    "VideoLayout",
    "adapter_class",
    "planning_geometry",
]


def adapter_class(config: Any, pretrained: str = "", name: str | None = None) -> type[ModelAdapter]:
    """The adapter named `name` (model setting `adapter`) or else the one for the config's `model_type`.

    A ConfigError names the supported families, or the adapters and what each can load.
    """
    if name:
        adapter = NAMED_ADAPTERS.get(name)
        if adapter is None or config.model_type not in adapter.model_types + adapter.loads:
            known = "; ".join(f"{key} ({', '.join(a.model_types + a.loads)})" for key, a in NAMED_ADAPTERS.items())
            raise ConfigError(
                f"model.adapter={name!r} with pretrained={pretrained!r}, a {config.model_type!r} checkpoint; "
                f"adapters (and the checkpoints they load): {known}"
            )
        return adapter
    adapter = ADAPTERS.get(config.model_type)
    if adapter is None:
        raise ConfigError(
            f"pretrained={pretrained!r} is a {config.model_type!r} checkpoint; supported model families: "
            f"{', '.join(sorted(ADAPTERS))} (e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf)"
        )
    return adapter


def planning_geometry(model_cfg: Any, frames: int) -> tuple[LanguageModelDims, VideoLayout]:
    """A model config's (`conf/model/*`) language-model dimensions and video layout, without loading weights.

    Read from the HF config of its `architecture` (known without a download), else the checkpoint's
    config. Cells written before model adapters recorded hand-typed `accounting` dimensions instead.
    """
    if "accounting" in model_cfg:
        side = math.isqrt(model_cfg.tokens_per_frame)
        return LanguageModelDims(**model_cfg.accounting), VideoLayout(frames, side, side, "video_end", "llava_onevision")
    config = checkpoint_config(model_cfg.get("architecture"), model_cfg.pretrained)
    adapter = adapter_class(config, model_cfg.pretrained, model_cfg.get("adapter"))
    return adapter.dimensions(config), adapter.video_layout(config, frames)


@functools.cache
def checkpoint_config(architecture: str | None, pretrained: str) -> Any:
    """The HF config of a known architecture (`tiny`, `0.5b`, ...), else the checkpoint's own (hub or local files)."""
    if architecture:
        from dycoke_eval.offline.architectures import architecture_config

        return architecture_config(architecture)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(pretrained)
    except OSError as error:
        raise ConfigError(
            f"pretrained={pretrained!r}: its config could not be read ({str(error).splitlines()[0]}); "
            "set model.architecture to a known one or make the checkpoint available"
        ) from None
