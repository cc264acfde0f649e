"""`preprocess_device=model`: the HF video processor's resize and normalisation on the model's device, pixel for pixel."""

import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionVideoProcessor
from transformers.image_utils import PILImageResampling

from dycoke_eval.config import ConfigError
from dycoke_eval.models.device_preprocess import DeviceVideoProcessor
from dycoke_eval.wrapper import CompressedVideoLM

SIZES = [(240, 320), (480, 640), (360, 360), (383, 385)]  # up- and downscaled, square, odd and just off 384


def noise(height: int, width: int, frames: int = 2) -> np.ndarray:
    """uint8 frames [T, H, W, 3] of noise: the hardest case for rounding (every tap matters, overshoots clamp)."""
    return np.random.default_rng(height * width).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def processor():
    """The llava-hf checkpoints' video processor: 384 x 384, bicubic, rescaled by 1/255, normalised by 0.5 and 0.5."""
    return LlavaOnevisionVideoProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.mark.parametrize("height, width", SIZES)
def test_the_device_path_gives_the_processors_cpu_pixels_bit_for_bit(processor, height, width):
    frames = noise(height, width)
    expected = processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
    pixels = DeviceVideoProcessor(processor, "cpu")(torch.from_numpy(frames))
    assert pixels.dtype == torch.float32 and pixels.is_contiguous()
    assert torch.equal(pixels, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_device_path_gives_the_cpu_pixels_and_the_processors_own_device_option_does_not(processor):
    frames = noise(240, 320)
    expected = processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
    pixels = DeviceVideoProcessor(processor, "cuda")(torch.from_numpy(frames).pin_memory())
    assert pixels.device.type == "cuda" and torch.equal(pixels.cpu(), expected)
    on_cuda = processor(videos=[frames], return_tensors="pt", device="cuda")["pixel_values_videos"]
    assert not torch.equal(on_cuda.cpu(), expected)  # why the resize is not the processor's: float32, rounded once


@pytest.mark.parametrize("adapter_name", [None, "llava_video"])
def test_each_adapters_device_preprocessor_gives_its_preprocess_pixels(tiny_checkpoint, adapter_name):
    adapter = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=2, device="cpu", adapter=adapter_name).adapter
    frames = noise(48, 64)
    assert torch.equal(adapter.device_preprocessor()(torch.from_numpy(frames)), adapter.preprocess(frames))


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"resample": PILImageResampling.BILINEAR}, "resamples with <Resampling.BILINEAR: 2>, not bicubic"),
        ({"size": {"shortest_edge": 384}}, "not to a fixed height and width"),
        ({"do_center_crop": True, "crop_size": {"height": 336, "width": 336}}, "crops"),
    ],
)
def test_a_processor_the_device_path_would_not_reproduce_is_refused_naming_the_setting_and_the_fix(settings, problem):
    with pytest.raises(ConfigError) as error:
        DeviceVideoProcessor(LlavaOnevisionVideoProcessor(**settings), "cpu")
    message = str(error.value)
    assert message.startswith("preprocess_device=model: the model's video processor LlavaOnevisionVideoProcessor")
    assert problem in message and message.endswith("use preprocess_device=cpu (HF's processor in the decoding threads)")
    assert "\n" not in message
