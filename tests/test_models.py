"""Model adapters: geometry and dimensions from the HF config, encoder signals, generate's inputs."""

from types import SimpleNamespace

import pytest
import torch

from dycoke_eval.config import ConfigError
from dycoke_eval.models import adapter_class
from dycoke_eval.models.llava_onevision import LlavaOneVisionAdapter
from dycoke_eval.offline.architectures import architecture_config
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.wrapper import CompressedVideoLM


@pytest.mark.parametrize(
    "architecture, dims",  # SPEC section 1: Qwen2 hidden size, FFN width and layers of each LLaVA-OV size
    [("0.5b", (896, 4864, 24)), ("7b", (3584, 18944, 28)), ("72b", (8192, 29568, 80)), ("tiny", (64, 128, 8))],
)
def test_dimensions_and_layout_come_from_the_hf_config(architecture, dims):
    config = architecture_config(architecture)
    adapter = adapter_class(config)
    assert adapter is LlavaOneVisionAdapter
    found = adapter.dimensions(config)
    assert (found.hidden, found.ffn, found.layers) == dims
    layout = adapter.video_layout(config, 32)
    side = 4 if architecture == "tiny" else 14  # 27x27 SigLIP patches (7x7 tiny) pooled 2x2, rounded up
    assert (layout.rows, layout.cols, layout.newlines) == (side, side, "video_end")
    assert layout.full_tokens == 32 * side * side + 1


def test_an_unsupported_model_family_names_the_supported_ones():
    with pytest.raises(ConfigError, match="'qwen2_5_vl' checkpoint; supported model families: llava_onevision"):
        adapter_class(SimpleNamespace(model_type="qwen2_5_vl"), "Qwen/Qwen2.5-VL-7B-Instruct")


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint):
    return CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu").adapter


def test_encoding_captures_only_the_requested_signals_pooled_like_the_features(adapter):
    pixels = adapter.preprocess(synthetic_frames("adapter")[:4])
    with torch.inference_mode():
        plain = adapter.encode(pixels)
        captured = adapter.encode(pixels, frozenset({"keys", "attention_received"}))
    assert plain.signals == {} and plain.grid.shape == (4, 16, 64) and plain.newline.shape == (64,)
    torch.testing.assert_close(captured.grid, plain.grid)  # capturing changes nothing the model computes
    assert captured.signals["attention_received"].shape == (4, 16)
    assert captured.signals["keys"].shape == (4, 16, 32)  # heads x head dim of the tiny SigLIP
    with pytest.raises(ValueError, match="probe_attention"):
        adapter.encode(pixels, frozenset({"probe_attention"}))  # the llava-hf towers drop the pooling head


def test_generation_inputs_expand_the_one_video_placeholder(adapter):
    video_id = adapter.config.video_token_id
    prompt = torch.tensor([5, 6, video_id, 7])
    visual = torch.randn(3, 64)
    inputs = adapter.generation_inputs(prompt, visual, None, 10)
    assert inputs.input_ids[0].tolist() == [5, 6, video_id, video_id, video_id, 7]
    assert (inputs.visual_start, inputs.visual_length) == (2, 3) and "position_ids" not in inputs.kwargs
    kept = adapter.generation_inputs(prompt, visual, torch.tensor([1, 4, 9]), 10)
    assert kept.kwargs["position_ids"][0].tolist() == [0, 1, 3, 6, 11, 12]  # the text after the video starts at 2 + 10
    for bad, message in (([5, 6, 7], "no <video> placeholder"), ([video_id, 5, video_id], "more than one video")):
        with pytest.raises(ValueError, match=message):
            adapter.generation_inputs(torch.tensor(bad), visual, None, 10)
