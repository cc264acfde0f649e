"""Timing and memory figures for the efficiency protocol (Table 3, Table 4)."""

from __future__ import annotations

import resource
import time

import torch
from transformers import LogitsProcessor

# The model's own stages: a sample's pipeline less its video's decode and preprocessing, wherever that ran.
PIPELINE_STAGES = ("video_decode", "preprocess", "vision_encoder", "compress", "generate")  # one sample's wall time
MODEL_STAGES = tuple(stage for stage in PIPELINE_STAGES if stage not in ("video_decode", "preprocess"))


class StepClock(LogitsProcessor):
    """Stamps the time at each generation step: prefill ends at the first stamp, each decode step between two."""

    def __init__(self, device: torch.device | str) -> None:
        self.sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.sync()
        self.stamps.append(time.perf_counter())
        return scores

    def decode_steps(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.stamps, self.stamps[1:], strict=False)]


def cache_bytes(cache) -> int:
    """Bytes held by a transformers Cache's keys and values over all layers, entries held aside included."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, name, None) for name in ("keys", "values", "cold_keys", "cold_values")):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """GB: peak allocated and reserved on the accelerator since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}  # fmt: skip
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux reports KiB


def model_latency(seconds: dict[str, float]) -> float:
    """A sample's seconds in the model (vision encoder, compression, generate): what a faster model shortens, beside
    the end-to-end latency (`PIPELINE_STAGES`), which adds the input pipeline."""
    return sum(seconds.get(stage, 0.0) for stage in MODEL_STAGES)
