"""Loading LLaVA-OneVision checkpoints once per process.

The loaded model lives here, not on the lmms-eval wrapper: lmms-eval's evaluator calls
`lm.clean()` after each run, which deletes every `nn.Module` attribute of the wrapper, and a
process that runs several methods or cells on one model must not reload it each time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dycoke_eval.config import ConfigError

LOAD_COUNT = 0  # how many checkpoints this process has loaded (tests and sweeps count it)


@dataclass(frozen=True)
class CheckpointKey:
    pretrained: str
    device: str
    dtype: str
    attn_implementation: str
    device_map: str | None = None
    random_architecture: str | None = None


@dataclass
class LoadedCheckpoint:
    key: CheckpointKey
    model: Any  # LlavaOnevisionForConditionalGeneration
    processor: Any  # LlavaOnevisionProcessor

    @property
    def text_config(self) -> Any:
        return self.model.config.text_config


_loaded: LoadedCheckpoint | None = None


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """`auto` is bf16 on an accelerator and fp32 on CPU, where bf16 matmuls are ~3x slower."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(f"dtype={dtype!r} is not a torch dtype; use auto, float32, bfloat16 or float16")
    return resolved


def load_checkpoint(
    pretrained: str,
    device: str,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
    random_architecture: str | None = None,
) -> LoadedCheckpoint:
    """Load (or reuse) a checkpoint; only one is kept so that switching models frees memory.

    `device_map` (e.g. "auto") spreads a model too large for one GPU over all visible GPUs.
    `random_architecture` ("0.5b", "7b", "72b") builds that real architecture with random weights
    instead, without any download: for latency and memory only.
    """
    global _loaded, LOAD_COUNT
    from transformers import AutoConfig, AutoProcessor, LlavaOnevisionForConditionalGeneration

    key = CheckpointKey(str(pretrained), device, str(dtype), attn_implementation, device_map, random_architecture)
    if _loaded is not None and _loaded.key == key:
        return _loaded
    _loaded = None
    if random_architecture:
        from dycoke_eval.offline.architectures import build_random_llava_onevision

        model, processor = build_random_llava_onevision(random_architecture, dtype, device, attn_implementation)
        LOAD_COUNT += 1
        _loaded = LoadedCheckpoint(key=key, model=model, processor=processor)
        return _loaded
    config = AutoConfig.from_pretrained(pretrained)
    if config.model_type != "llava_onevision":
        raise ConfigError(
            f"pretrained={pretrained!r} is a {config.model_type!r} checkpoint; this wrapper loads "
            "LLaVA-OneVision checkpoints such as llava-hf/llava-onevision-qwen2-7b-ov-hf"
        )
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        pretrained, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map
    )
    if device_map is None:
        model.to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(pretrained)
    LOAD_COUNT += 1
    _loaded = LoadedCheckpoint(key=key, model=model, processor=processor)
    return _loaded
