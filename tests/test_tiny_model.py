"""The tiny checkpoint stands in for a hub checkpoint: real HF classes, faithful token geometry."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoProcessor, LlavaOnevisionForConditionalGeneration

from dycoke_eval.offline.tiny_model import TOKENS_PER_FRAME, build_tiny_checkpoint


def test_loads_with_the_auto_classes_like_a_hub_checkpoint(tiny_checkpoint):
    assert AutoConfig.from_pretrained(tiny_checkpoint).model_type == "llava_onevision"
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert type(processor).__name__ == "LlavaOnevisionProcessor"
    assert processor.tokenizer.eos_token == "<|im_end|>"
    assert processor.tokenizer.convert_tokens_to_ids("<video>") != processor.tokenizer.unk_token_id


def test_is_a_few_megabytes_at_most(tiny_checkpoint):
    size = sum(p.stat().st_size for p in tiny_checkpoint.iterdir())
    assert size < 5 * 2**20


@pytest.mark.parametrize("frames", [1, 4, 7])
def test_a_video_is_frames_times_16_tokens_plus_one_newline(tiny_checkpoint, frames):
    assert TOKENS_PER_FRAME == 16
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint)
    video = np.random.default_rng(0).integers(0, 255, (frames, 48, 64, 3), dtype=np.uint8)
    inputs = processor(text="<video>\nhi", videos=[video], return_tensors="pt")
    placeholders = int((inputs["input_ids"] == model.config.video_token_id).sum())
    features = model.get_video_features(
        inputs["pixel_values_videos"], vision_feature_layer=-1, vision_feature_select_strategy="full"
    ).pooler_output
    assert placeholders == features.shape[1] == frames * 16 + 1


def test_building_twice_gives_the_same_weights(tmp_path):
    first = LlavaOnevisionForConditionalGeneration.from_pretrained(build_tiny_checkpoint(tmp_path / "a")).state_dict()
    second = LlavaOnevisionForConditionalGeneration.from_pretrained(build_tiny_checkpoint(tmp_path / "b")).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
