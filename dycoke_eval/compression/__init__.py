"""Staged compression: stage kinds (`stages.py`) and the dispatcher that composes them onto a model (`dispatcher.py`)."""

from dycoke_eval.compression.stages import (
    CompressionMethod,
    DecodeStage,
    ModelInfo,
    PlannedCounts,
    PrefillStage,
    PreLLMStage,
    Stage,
    VideoTokens,
)

__all__ = [
    "CompressionMethod",
    "DecodeStage",
    "ModelInfo",
    "PlannedCounts",
    "PreLLMStage",
    "PrefillStage",
    "Stage",
    "VideoTokens",
]
