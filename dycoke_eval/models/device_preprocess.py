"""HF's video processor, resize and normalisation, on the model's device, giving the CPU's pixels bit for bit.

`preprocess_device=model` moves this work off the decoding threads: they hand uint8 frames over, and the
model's device resizes and normalises them. Calling the processor with `device=` would do that, but
not to the same pixels: on the CPU torchvision resizes uint8 frames with torch's native uint8 kernel
(PIL's antialiased bicubic in fixed point: int16 weights, each of the two passes rounded and clamped to
uint8), while on an accelerator it converts to float32, interpolates both axes at once and rounds once.
That moves about a fifth of the pixels by one level or more (up to 25 levels on noise upscaled from
240 x 320), beyond what bf16 hides. So the resize here is that CPU kernel's integer arithmetic, which
is exact in int32 on any device, and the normalisation is the processor's own (`rescale_and_normalize`,
IEEE float32 subtract and divide): a cell is the same cell wherever its frames were preprocessed.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from dycoke_eval.config import ConfigError


class DeviceVideoProcessor:
    """A LLaVA-OneVision video processor's work on uint8 frames, computed on `device`.

    Reproduces what these models' processors do: a resize to a fixed height x width with antialiased
    bicubic (PIL's filter), then rescale and normalise. Any other processor setting is refused at
    construction, since the pixels would no longer be the processor's.
    """

    def __init__(self, processor: Any, device: torch.device | str) -> None:
        refuse_unsupported(processor)
        self.processor = processor
        self.device = torch.device(device)
        self.size = (processor.size.height, processor.size.width) if processor.do_resize else None

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames [T, H, W, 3] (in pinned memory: copied asynchronously) -> `pixel_values_videos` [1, T, 3, h, w]."""
        frames = frames.to(self.device, non_blocking=True)
        if self.size is not None:
            frames = resize_bicubic_uint8(frames, *self.size)
        processor = self.processor
        pixels = processor.rescale_and_normalize(
            frames.permute(0, 3, 1, 2).contiguous(),  # the processor's layout, so the encoder sees the same strides too
            processor.do_rescale,
            processor.rescale_factor,
            processor.do_normalize,
            processor.image_mean,
            processor.image_std,
        )
        return pixels[None]


def refuse_unsupported(processor: Any) -> None:
    """A ConfigError naming the processor setting that the device path would not reproduce."""
    from torchvision.transforms.v2.functional import InterpolationMode
    from transformers.image_utils import pil_torch_interpolation_mapping
    from transformers.video_processing_utils import BaseVideoProcessor

    resample = getattr(processor, "resample", None)
    interpolation = pil_torch_interpolation_mapping.get(resample, resample)  # PIL's code, or torchvision's mode itself
    if not isinstance(processor, BaseVideoProcessor):
        problem = "is not a torchvision video processor"
    elif processor.do_center_crop:
        problem = "crops"
    elif processor.do_resize and not (processor.size.height and processor.size.width):
        problem = f"resizes to {processor.size}, not to a fixed height and width"
    elif processor.do_resize and interpolation != InterpolationMode.BICUBIC:
        problem = f"resamples with {resample!r}, not bicubic"
    else:
        return
    raise ConfigError(
        f"preprocess_device=model: the model's video processor {type(processor).__name__} {problem}, which the device "
        "path does not reproduce; use preprocess_device=cpu (HF's processor in the decoding threads)"
    )


def resize_bicubic_uint8(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, C] -> [T, height, width, C], as torch's CPU kernel resizes uint8 (antialiased bicubic).

    Width first, then height, each pass rounded and clamped to uint8 (`separable_upsample_generic_Nd_kernel_impl`
    in aten/src/ATen/native/cpu/UpSampleKernel.cpp; its AVX2 twin computes the same).
    """
    return _resample_axis(_resample_axis(frames, 2, width), 1, height)


def _resample_axis(frames: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """One pass along `dim`: each output is its taps' int16 weights times the inputs, plus half, shifted down, clamped."""
    if frames.shape[dim] == size:
        return frames  # the CPU kernel skips an axis already at size
    index, weights, precision = _device_taps(frames.shape[dim], size, frames.device)
    shape, broadcast = list(frames.shape), [1] * frames.dim()
    shape[dim] = broadcast[dim] = size
    total = torch.full(shape, 1 << (precision - 1), dtype=torch.int32, device=frames.device)  # the rounding half
    for tap in range(index.shape[1]):
        total.addcmul_(frames.index_select(dim, index[:, tap]).to(torch.int32), weights[:, tap].view(broadcast))
    return (total >> precision).clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=64)
def _device_taps(length: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`axis_taps` as tensors on `device`, once per frame size: index [size, taps], int32 weights [size, taps], precision."""
    starts, weights, precision = axis_taps(length, size)
    index = (torch.tensor(starts)[:, None] + torch.arange(len(weights[0]))).clamp_(max=length - 1)  # padding taps weigh 0
    return index.to(device), torch.tensor(weights, dtype=torch.int32, device=device), precision


@functools.lru_cache(maxsize=64)
def axis_taps(length: int, size: int) -> tuple[list[int], list[list[int]], int]:
    """The CPU kernel's weights for resizing one axis from `length` to `size`: per output, its first input and its
    taps' int16 weights (zero-padded to a common count), and their precision in bits.

    `_compute_indices_min_size_weights_aa` with the Keys cubic at a = -0.5 (PIL's), then
    `_compute_index_ranges_int16_weights`, in their double-precision operations and order.
    """
    scale = length / size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # bicubic's support of 2, stretched when downscaling
    taps = math.ceil(support) * 2 + 1
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    starts, rows, largest = [], [], 0.0
    for output in range(size):
        center = scale * (output + 0.5)
        first = max(int(center - support + 0.5), 0)
        count = min(max(min(int(center + support + 0.5), length) - first, 0), taps)
        row = [_keys_cubic((tap + first - center + 0.5) * inverse) for tap in range(count)]
        total = 0.0
        for weight in row:  # left to right, as C adds (Python 3.12's sum() compensates, which can move a last bit)
            total += weight
        if total != 0.0:
            row = [weight / total for weight in row]
            largest = max(largest, *row)
        starts.append(first)
        rows.append(row + [0.0] * (taps - count))
    precision = 0  # the most bits under which the largest weight, doubled, still fits in int16
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < 1 << 15:
        precision += 1
    return starts, [[_round_away(weight * (1 << precision)) for weight in row] for row in rows], precision


def _keys_cubic(x: float) -> float:
    """Keys' cubic convolution kernel at a = -0.5, PIL's, in torch's operation order (`cubic_convolution1/2`)."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _round_away(value: float) -> int:
    """C's `(int)(v < 0 ? v - 0.5 : v + 0.5)`: half away from zero."""
    return int(value - 0.5) if value < 0 else int(value + 0.5)
