"""The shapes every part of the harness agrees on, with no project imports: how a model lays a video out as LLM
tokens (`VideoLayout`), its language model's dimensions (`LanguageModelDims`), what a method may check about it
(`ModelInfo`), and the video tokens each layer sees in a plan (`PlannedCounts`). Models produce them, methods and
accounting read them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoLayout:
    """How a model lays a video out as LLM tokens: a grid per frame plus newline tokens, and whose layout it is.

    `newlines`: `video_end` (LLaVA-OneVision: one after the whole video), `row_end` (LLaVA-Video:
    one after every row of every frame) or `none`. `family`: the model family's adapter (`llava_onevision`,
    `llava_video`), which methods whose released arithmetic differs by model read, never the newlines.
    """

    frames: int
    rows: int
    cols: int
    newlines: str
    family: str

    @property
    def tokens_per_frame(self) -> int:
        return self.rows * self.cols

    @property
    def grid_tokens(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def newline_tokens(self) -> int:
        return {"none": 0, "video_end": 1, "row_end": self.frames * self.rows}[self.newlines]

    @property
    def full_tokens(self) -> int:
        """Visual tokens of the full-token model: the grid plus its newline tokens."""
        return self.grid_tokens + self.newline_tokens


@dataclass(frozen=True)
class FrameTiming:
    """When the sampled frames were shown: models that number frames in time (Qwen-VL) read it, the others ignore it."""

    fps: float | None  # the video's own frame rate (None: unknown)
    frame_count: int  # frames in the video
    indices: tuple[int, ...]  # the sampled frames

    @property
    def sampled_fps(self) -> float | None:
        """Sampled frames per second of video, as transformers' `VideoMetadata.sampled_fps` defines it."""
        return len(self.indices) / self.frame_count * self.fps if self.fps else None

    @property
    def seconds(self) -> list[float] | None:
        """Each sampled frame's time in the video (`VideoMetadata.timestamps`)."""
        return [index / self.fps for index in self.indices] if self.fps else None


@dataclass(frozen=True)
class LanguageModelDims:
    hidden: int  # d
    ffn: int  # m
    layers: int  # T
    heads: int | None = None  # query heads; None in the hand-typed dimensions of old cells, which allow no real count
    kv_heads: int | None = None
    head_dim: int | None = None

    @property
    def query_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


LLAVA_FAMILIES = ("llava_onevision", "llava_video")  # SigLIP towers: the encoder signals the LLaVA-era methods score with


@dataclass(frozen=True)
class ModelInfo:
    """What a method may check about the model before a run."""

    layers: int  # decoder layers
    signals: frozenset[str]  # encoder signals the checkpoint can give
    family: str  # the model family's adapter, as in `VideoLayout.family`
    video_in_one_span: bool = True  # the video's tokens form one run of the prompt (Qwen3-VL interleaves timestamps)


@dataclass
class PlannedCounts:
    """Video tokens each LLM layer sees in prefill and in decoding, before a run (FLOPs plans).

    Counted over the video grid without newline tokens, as the papers' FLOPs columns count them.
    """

    layout: VideoLayout
    prefill: list[float]
    decode: list[float]

    @classmethod
    def full(cls, layout: VideoLayout, layers: int) -> PlannedCounts:
        visual = float(layout.grid_tokens)
        return cls(layout, [visual] * layers, [visual] * layers)

    def with_layers(self, prefill: list[float], decode: list[float]) -> PlannedCounts:
        return PlannedCounts(self.layout, prefill, decode)

    def uniform(self, tokens: float) -> PlannedCounts:
        """Every layer sees `tokens` (what a pre-LLM stage leaves)."""
        return self.with_layers([tokens] * len(self.prefill), [tokens] * len(self.decode))
