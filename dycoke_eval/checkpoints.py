"""Loading a checkpoint, through its family's model adapter, once per process.

The loaded model lives here, not on the lmms-eval wrapper: lmms-eval's evaluator calls
`lm.clean()` after each run, which deletes every `nn.Module` attribute of the wrapper, and a
process that runs several methods or cells on one model must not reload it each time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dycoke_eval.config import ConfigError
from dycoke_eval.models.base import ModelAdapter

LOAD_COUNT = 0  # how many checkpoints this process has loaded (tests and sweeps count it)


@dataclass(frozen=True)
class CheckpointKey:
    pretrained: str
    device: str
    dtype: str
    attn_implementation: str
    device_map: str | None = None
    random_architecture: str | None = None
    adapter: str | None = None  # the adapter a model config names (`adapter`), else the one for its model_type
    siglip_head: str | None = None  # the SigLIP checkpoint giving the probe signals


@dataclass
class LoadedCheckpoint:
    key: CheckpointKey
    adapter: ModelAdapter  # the model family's adapter, holding the model and its processor

    @property
    def model(self) -> Any:
        return self.adapter.model

    @property
    def processor(self) -> Any:
        return self.adapter.processor


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
    adapter: str | None = None,
    siglip_head: str | None = None,
) -> LoadedCheckpoint:
    """Load (or reuse) a checkpoint; only one is kept so that switching models frees memory.

    `device_map` (e.g. "auto") spreads a model too large for one GPU over all visible GPUs.
    `random_architecture` ("0.5b", "7b", "72b") builds that real architecture with random weights
    instead, without any download: for latency and memory only. `adapter` names the model adapter
    (`llava_video`) where the checkpoint's model_type alone does not tell; `siglip_head` is the SigLIP
    checkpoint whose pooling head gives the probe signals (read on first use).
    """
    global _loaded, LOAD_COUNT
    from dycoke_eval.models import adapter_class, checkpoint_config

    key = CheckpointKey(
        str(pretrained), device, str(dtype), attn_implementation, device_map, random_architecture, adapter, siglip_head
    )
    if _loaded is not None and _loaded.key == key:
        return _loaded
    _loaded = None
    if random_architecture:
        from dycoke_eval.offline.architectures import build_random_model

        loaded = build_random_model(random_architecture, dtype, device, attn_implementation, adapter, siglip_head)
    else:
        loaded = adapter_class(checkpoint_config(None, pretrained), pretrained, adapter).load(
            pretrained,
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device_map=device_map,
            siglip_head=siglip_head,
        )
    LOAD_COUNT += 1
    _loaded = LoadedCheckpoint(key=key, adapter=loaded)
    return _loaded
