"""Full-token baseline: every visual token enters the LLM and every cache entry is attended (no stages)."""

from __future__ import annotations

from dataclasses import dataclass

from dycoke_eval.compression.stages import CompressionMethod


@dataclass
class Full(CompressionMethod):
    name: str = "full"
