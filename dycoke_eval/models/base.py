"""What the harness needs from a video LLM family, in one interface (`ModelAdapter`).

The wrapper, the compression dispatcher and the accounting never look inside a model: they ask its
adapter. An adapter owns loading, frames -> encoder outputs (with an optional capture of encoder
signals that pre-LLM stages need), the layout of the video tokens (frames x rows x cols and where
newline tokens go), prompt rendering, assembling `generate`'s inputs (placeholders, and explicit
position ids for methods that keep original positions), the decoder stack, and the dimensions
used for FLOPs accounting, read from the HF config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from dycoke_eval.config import ConfigError
from dycoke_eval.geometry import FrameTiming, LanguageModelDims, ModelInfo, VideoLayout


@contextmanager
def built_on(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside are initialised on `device` in `dtype`: a 7B is 16 GB in bf16, not 32 GB in float32 first."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


@dataclass
class EncodedVideo:
    """A video after the vision tower, projector and pooling: what every compression method starts from."""

    grid: torch.Tensor  # [F, N, D] video tokens, frame-major, rows then cols within a frame
    layout: VideoLayout
    newline: torch.Tensor | None = None  # [D] the model's newline embedding, if its layout has newlines
    signals: dict[str, torch.Tensor] = field(default_factory=dict)  # captured encoder signals, pooled like `grid`
    frame_count: int = 0  # frames in the video file
    fps: float | None = None  # the video file's frame rate
    indices: list[int] = field(default_factory=list)  # the frame indices that were encoded

    def nbytes(self) -> int:
        tensors = [self.grid, *self.signals.values(), *([self.newline] if self.newline is not None else [])]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class GenerationInputs:
    """`generate`'s keyword arguments for one prompt, and where the visual tokens sit in it."""

    kwargs: dict[str, Any]  # input_ids, attention_mask, encoder outputs, position_ids when positions are kept
    visual_start: int  # index of the first visual token in input_ids
    visual_length: int  # visual tokens in the prompt (newline tokens included)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.kwargs["input_ids"]


class ModelAdapter(ABC):
    """One model family. Subclasses register their HF `model_type`s in `dycoke_eval.models.ADAPTERS`."""

    model_class: ClassVar[str] = ""  # transformers' class of the family's checkpoints
    keeps_grid_positions: ClassVar[bool] = False  # every kept token at its grid position (M-RoPE has no other order)
    family: ClassVar[str] = ""  # the family's name (`VideoLayout.family`, `ModelInfo.family`): its key in NAMED_ADAPTERS
    model_types: ClassVar[tuple[str, ...]] = ()
    loads: ClassVar[tuple[str, ...]] = ()  # further model types it runs when a model config names it (`adapter`)
    signals: ClassVar[frozenset[str]] = frozenset()  # encoder signals `encode` can capture
    video_in_one_span: ClassVar[bool] = True  # the video's tokens are one run of the prompt (in-LLM stages need it)
    sizes_by_pixel_bounds: ClassVar[bool] = False  # frames resized within min/max pixels (Qwen-VL), not to a fixed size
    position_numberings: ClassVar[tuple[str, ...]] = ()  # ways of numbering the text after a video, default first

    def __init__(self, model: Any, processor: Any, siglip_head: str | None = None) -> None:
        self.model = model
        self.processor = processor
        self.siglip_head = siglip_head  # the SigLIP checkpoint whose pooling head gives the probe signals (hub id or folder)
        self.pixel_bounds: tuple[int | None, int | None] = (None, None)  # min, max pixels (None: the processor's)

    @classmethod
    def check_settings(
        cls, min_pixels: int | None = None, max_pixels: int | None = None, position_numbering: str | None = None
    ) -> None:
        """The model settings this family reads, checked from the config alone (before anything loads): the pixel
        bounds frames are resized within (Qwen-VL) and how positions after a video are numbered (Qwen2.5-VL)."""
        if (min_pixels, max_pixels) != (None, None) and not cls.sizes_by_pixel_bounds:
            raise ConfigError(
                f"model.min_pixels={min_pixels}, model.max_pixels={max_pixels}: the {cls.family} family resizes every "
                "frame to its encoder's fixed size; these settings apply to Qwen-VL models: remove them"
            )
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"model.{name}={value!r}: give a positive number of pixels, or null for the processor's")
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ConfigError(f"model.min_pixels={min_pixels} > model.max_pixels={max_pixels}: the bounds are reversed")
        if position_numbering is not None and not cls.position_numberings:
            raise ConfigError(
                f"model.position_numbering={position_numbering!r}: the {cls.family} family numbers positions one way; "
                "the setting applies to Qwen2.5-VL: remove it"
            )
        if position_numbering is not None and position_numbering not in cls.position_numberings:
            raise ConfigError(
                f"model.position_numbering={position_numbering!r}: use released (as Qwen2.5-VL was trained and FastVID "
                "ran, transformers 4.x) or installed (the installed transformers' get_rope_index)"
            )

    def use_settings(
        self, min_pixels: int | None = None, max_pixels: int | None = None, position_numbering: str | None = None
    ) -> None:
        """Apply the model settings (`check_settings`; None keeps the family's default). Set once, as the checkpoint
        loads: a loaded checkpoint's key includes them, so its encoder cache holds one size."""
        self.check_settings(min_pixels, max_pixels, position_numbering)
        self.pixel_bounds = (min_pixels, max_pixels)
        if position_numbering is not None:
            self.position_numbering = position_numbering

    def pixel_bounds_in_effect(self) -> dict[str, int] | None:
        """The pixel bounds frames are resized within (None: a fixed size), recorded with every sample."""
        return None

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @classmethod
    def load(
        cls,
        pretrained: str,
        *,
        device: str,
        dtype: torch.dtype,
        attn_implementation: str,
        device_map: str | None,
        siglip_head: str | None = None,
    ):
        """The checkpoint's model (eval mode, on `device` unless a device map spreads it) and processor."""
        import transformers

        model = getattr(transformers, cls.model_class).from_pretrained(
            pretrained, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map
        )
        if device_map is None:
            model.to(device)
        return cls(model.eval(), transformers.AutoProcessor.from_pretrained(pretrained), siglip_head)

    @classmethod
    def from_config(
        cls,
        config: Any,
        processor: Any,
        *,
        device: str,
        dtype: torch.dtype,
        attn_implementation: str,
        siglip_head: str | None = None,
    ):
        """Random weights at the config's dimensions, built on `device` without a download (latency and memory only)."""
        import transformers

        config._attn_implementation = attn_implementation
        torch.manual_seed(0)
        with built_on(device, dtype):
            model = getattr(transformers, cls.model_class)(config).eval()
        return cls(model, processor, siglip_head)

    @classmethod
    def dimensions(cls, config: Any) -> LanguageModelDims:
        """The language model's widths, head counts and layer count (eq. 8 and the real count), from the HF config."""
        text = config.text_config
        heads = text.num_attention_heads
        return LanguageModelDims(
            hidden=text.hidden_size,
            ffn=text.intermediate_size,
            layers=text.num_hidden_layers,
            heads=heads,
            kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        )

    @classmethod
    @abstractmethod
    def video_layout(cls, config: Any, frames: int) -> VideoLayout:
        """The token layout of a `frames`-frame video, from the HF config alone (plans need no weights)."""

    @classmethod
    def available_signals(cls, config: Any, siglip_head: bool = False) -> frozenset[str]:
        """The encoder signals this checkpoint can give (a checkpoint may lack a head, say).

        `siglip_head`: a SigLIP pooling head is configured (model setting `siglip_head`).
        """
        return cls.signals

    def capturable_signals(self) -> frozenset[str]:
        """The encoder signals this loaded model, with its configured pooling head, can give."""
        return self.available_signals(self.config, bool(self.siglip_head))

    @classmethod
    def model_info(cls, config: Any, siglip_head: bool = False) -> ModelInfo:
        """What a method may check before a run, from the HF config alone (no weights)."""
        signals = cls.available_signals(config, siglip_head)
        return ModelInfo(cls.dimensions(config).layers, signals, cls.family, cls.video_in_one_span)

    def loaded_info(self) -> ModelInfo:
        """`model_info` of this loaded model, with its configured pooling head."""
        return self.model_info(self.config, bool(self.siglip_head))

    def prepare(self, signals: frozenset[str]) -> None:  # noqa: B027  optional: most adapters have nothing to load
        """Load now whatever capturing `signals` needs (a pooling head), so a missing file fails before any sample."""

    @property
    def config(self) -> Any:
        return self.model.config

    def layout(self, frames: int) -> VideoLayout:
        return self.video_layout(self.config, frames)

    def dims(self) -> LanguageModelDims:
        return self.dimensions(self.config)

    @property
    @abstractmethod
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (a PreTrainedModel with `.layers`), where prefill and decode stages act."""

    @property
    @abstractmethod
    def vision_tower(self) -> torch.nn.Module:
        """The vision encoder (a PreTrainedModel)."""

    @abstractmethod
    def preprocess(self, frames: Any, timing: FrameTiming | None = None) -> Any:
        """Decoded frames [T, H, W, 3] -> the vision tower's inputs, on the CPU (timed apart from the encoder).

        `timing` says when the frames were shown (None: frames given without a file); families that number frames in
        time read it."""

    @abstractmethod
    def device_preprocessor(self) -> Callable[[torch.Tensor], Any]:
        """`preprocess` on the model's device (`preprocess_device=model`): uint8 frames [T, H, W, 3] -> the same inputs.

        Raises ConfigError where the device path would not give `preprocess`'s pixels exactly.
        """

    @abstractmethod
    def encode(self, pixels: Any, signals: frozenset[str] = frozenset()) -> EncodedVideo:
        """`preprocess`'s output -> pooled, projected video tokens, plus the requested encoder signals."""

    @abstractmethod
    def assemble(
        self, encoded: EncodedVideo, tokens: torch.Tensor, index: torch.Tensor, frame_newlines: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept tokens [M, D] at grid positions `index` [M] -> the LLM's visual sequence [V, D] with newline tokens
        placed as the layout puts them, and each token's position within the full-token visual sequence [V].

        `frame_newlines` (a stage's, `VideoTokens.frame_newlines`) replaces per-row newlines by n after each frame;
        layouts without per-row newlines ignore it."""

    @abstractmethod
    def render_prompt(self, form: str, question: str) -> str:
        """The prompt text (`paper` or `checkpoint` form) with one video placeholder before the question."""

    @abstractmethod
    def generation_inputs(
        self,
        prompt_ids: torch.Tensor,
        visual: torch.Tensor,
        positions: torch.Tensor | None,
        full_visual_length: int,
        *,
        encoded: EncodedVideo | None = None,
    ) -> GenerationInputs:
        """`generate`'s inputs with `visual` [V, D] in place of the prompt's video placeholder.

        `encoded` is the video the tokens came from, for families whose positions need more than its length
        (Qwen-VL's M-RoPE: its grid and timing).

        `positions` (a [V] index into the full-token visual sequence of `full_visual_length`) keeps each token's
        original position; None numbers the shortened sequence consecutively.
        """
