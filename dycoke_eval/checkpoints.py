"""Loading a checkpoint, through its family's model adapter, once for the cells that run on it.

The loaded model lives in a `CheckpointLoader`, not on the lmms-eval wrapper: lmms-eval's evaluator
calls `lm.clean()` after each run, which deletes every `nn.Module` attribute of the wrapper, and a
process that runs several methods or cells on one model must not reload it each time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dycoke_eval.config import ConfigError
from dycoke_eval.encoder_cache import EncoderCache
from dycoke_eval.models.base import ModelAdapter


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
    pixel_bounds: tuple[int | None, int | None] = (None, None)  # min, max pixels frames are resized within (Qwen-VL)
    position_numbering: str | None = None  # how Qwen2.5-VL numbers the text after a video (None: its default)


@dataclass
class LoadedCheckpoint:
    key: CheckpointKey
    adapter: ModelAdapter  # the model family's adapter, holding the model and its processor
    encoder_cache: EncoderCache = field(default_factory=EncoderCache)  # this model's encoded videos, for the next cell

    @property
    def model(self) -> Any:
        return self.adapter.model

    @property
    def processor(self) -> Any:
        return self.adapter.processor


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


MODEL_CHOICE = "use model=NAME (python -m dycoke_eval --help lists them) or model.pretrained=/path/to/a/checkpoint/folder"


def locate_checkpoint(pretrained: str) -> None:
    """Refuse, in one line, a checkpoint that cannot be loaded, before anything slow: a local folder needs its
    config.json; a hub id must be in the HF cache or, with the hub online, exist there. Nothing is downloaded.

    Read at call time from the environment (HF_HUB_OFFLINE, HF_HUB_CACHE, HF_HOME), which the app sets per run,
    so a hub that is offline or unreachable costs no retries.
    """
    path = Path(pretrained).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.pretrained={pretrained!r} is a folder without config.json; {MODEL_CHOICE}")
        return
    if path.exists() or pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1:
        raise ConfigError(f"model.pretrained={pretrained!r}: no checkpoint folder there; {MODEL_CHOICE}")
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    if isinstance(try_to_load_from_cache(pretrained, "config.json", cache_dir=cache), str):
        return
    where = f"not a local folder and not in the Hugging Face cache ({cache})"
    fetch = f"fetch it where the hub is reachable with `hf download {pretrained}` into that cache (HF_HUB_CACHE={cache})"
    if hub_offline():
        raise ConfigError(f"model.pretrained={pretrained!r}: {where}, and the hub is offline; {fetch}, or {MODEL_CHOICE}")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(pretrained, timeout=10)
    except Exception as error:  # any failure (no network, no such repository, gated) is this one line
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
        raise ConfigError(f"model.pretrained={pretrained!r}: {where}, and the hub answered {reason}; {MODEL_CHOICE}") from None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but now: the app sets it per run."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):  # the second: huggingface_hub's older name
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


class CheckpointLoader:
    """The checkpoint kept loaded from one cell to the next; only one, so that switching models frees memory."""

    def __init__(self) -> None:
        self.loaded: LoadedCheckpoint | None = None
        self.loads = 0  # checkpoints loaded so far (each cell's status line says it; tests count them)

    def load(
        self,
        pretrained: str,
        device: str,
        dtype: torch.dtype,
        attn_implementation: str = "sdpa",
        device_map: str | None = None,
        random_architecture: str | None = None,
        adapter: str | None = None,
        siglip_head: str | None = None,
        pixel_bounds: tuple[int | None, int | None] = (None, None),
        position_numbering: str | None = None,
    ) -> LoadedCheckpoint:
        """Load the checkpoint, or reuse it if it is the one loaded.

        `device_map` (e.g. "auto") spreads a model too large for one GPU over all visible GPUs.
        `random_architecture` ("0.5b", "7b", "72b") builds that real architecture with random weights
        instead, without any download: for latency and memory only. `adapter` names the model adapter
        (`llava_video`) where the checkpoint's model_type alone does not tell; `siglip_head` is the SigLIP
        checkpoint whose pooling head gives the probe signals (read on first use); `pixel_bounds` the min and max
        pixels a family that resizes by pixel count (Qwen-VL) resizes frames within (None: its processor's);
        `position_numbering` how Qwen2.5-VL numbers the text after a video (None: its default).
        """
        from dycoke_eval.models import adapter_class, checkpoint_config

        key = CheckpointKey(
            str(pretrained), device, str(dtype), attn_implementation, device_map, random_architecture, adapter, siglip_head,
            tuple(pixel_bounds), position_numbering,
        )  # fmt: skip
        if self.loaded is not None and self.loaded.key == key:
            return self.loaded
        self.loaded = None  # the old model is freed before the new one loads
        if random_architecture:
            loaded = build_random_model(random_architecture, dtype, device, attn_implementation, adapter, siglip_head)
        else:
            locate_checkpoint(pretrained)
            loaded = adapter_class(checkpoint_config(None, pretrained), pretrained, adapter).load(
                pretrained,
                device=device,
                dtype=dtype,
                attn_implementation=attn_implementation,
                device_map=device_map,
                siglip_head=siglip_head,
            )
        loaded.use_settings(*pixel_bounds, position_numbering)
        self.loads += 1
        self.loaded = LoadedCheckpoint(key=key, adapter=loaded)
        return self.loaded


def build_random_model(
    size: str,
    dtype: torch.dtype,
    device: str,
    attn_implementation: str = "sdpa",
    adapter: str | None = None,
    siglip_head: str | None = None,
):
    """The adapter (`adapter` by name, else by model type) of architecture `size` with random weights, built on `device`.

    With `siglip_head` set, a random pooling head at the tower's dimensions stands in for that checkpoint's.
    """
    from dycoke_eval.models import adapter_class
    from dycoke_eval.offline.architectures import architecture_config, architecture_family

    if family := architecture_family(size):  # Qwen-VL: its real processor classes around the tiny tokenizer
        from dycoke_eval.offline.tiny_qwen import build_processor

        config, processor = architecture_config(size), build_processor(family, real_sizes=True)
    else:
        from dycoke_eval.offline.tiny_model import build_processor, build_tokenizer

        tokenizer = build_tokenizer()
        config = architecture_config(size, tokenizer)
        processor = build_processor(tokenizer, config.vision_config.image_size, config.vision_config.patch_size)
    return adapter_class(config, name=adapter).from_config(
        config, processor, device=device, dtype=dtype, attn_implementation=attn_implementation, siglip_head=siglip_head
    )
