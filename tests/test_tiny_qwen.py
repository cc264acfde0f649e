"""The tiny Qwen2.5-VL and Qwen3-VL checkpoints stand in for the hub ones: real HF classes, real token geometry."""

import hashlib
import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dycoke_eval.offline.tiny_qwen import (
    FAMILIES,
    MARKER,
    QWEN3_VL_CHAT_TEMPLATE,
    QWEN3_VL_CHAT_TEMPLATE_SHA256,
    SPECIAL_TOKENS,
    build_tiny_qwen_checkpoint,
    ensure_tiny_qwen_checkpoint,
    video_token_count,
)

CLASSES = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}
VIDEO_MESSAGE = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-qwen")
    return {family: build_tiny_qwen_checkpoint(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """(processor, model) of each family, loaded from its folder with the Auto classes and no hub access."""
    return {
        family: (
            AutoProcessor.from_pretrained(path, local_files_only=True),
            AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval(),
        )
        for family, path in checkpoints.items()
    }


def video_inputs(family, processor, frames, height, width, fps=2.0):
    """The processor's inputs for the chat-templated video message; the frames were sampled at `fps`."""
    text = processor.apply_chat_template(VIDEO_MESSAGE, add_generation_prompt=True, tokenize=False)
    video = np.random.default_rng(0).integers(0, 255, (frames, height, width, 3), dtype=np.uint8)
    metadata = {"fps": fps, "total_num_frames": frames, "frames_indices": list(range(frames))}
    sampling = {"do_sample_frames": False} if family == "qwen3_vl" else {}  # the frames are already sampled
    return processor(text=[text], videos=[video], video_metadata=[metadata], return_tensors="pt", **sampling)


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_offline_with_the_auto_classes(checkpoints, loaded, family):
    model_class, processor_class, video_processor_class = CLASSES[family]
    processor, model = loaded[family]
    assert AutoConfig.from_pretrained(checkpoints[family], local_files_only=True).model_type == family
    assert type(model).__name__ == model_class
    assert type(processor).__name__ == processor_class
    assert type(processor.video_processor).__name__ == video_processor_class
    tokenizer = processor.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and all(i is not None and i < model.config.text_config.vocab_size for i in ids)
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert json.loads((checkpoints[family] / MARKER).read_text())["family"] == family
    assert sum(p.stat().st_size for p in checkpoints[family].iterdir()) < 5 * 2**20


@pytest.mark.parametrize(
    ("family", "shape", "resized"),
    [
        ("qwen2_5_vl", (8, 56, 56), (56, 56)),
        ("qwen2_5_vl", (8, 64, 64), (56, 56)),  # resized to multiples of 28
        ("qwen2_5_vl", (6, 84, 56), (84, 56)),
        ("qwen3_vl", (8, 64, 64), (64, 64)),
        ("qwen3_vl", (8, 56, 56), (64, 64)),  # resized to multiples of 32
        ("qwen3_vl", (4, 64, 32), (64, 32)),
    ],
)
def test_video_tokens_are_the_merged_grid(loaded, family, shape, resized):
    processor, model = loaded[family]
    frames, patch = shape[0], model.config.vision_config.patch_size
    inputs = video_inputs(family, processor, *shape)
    expected = video_token_count(family, frames, *resized)
    assert expected == frames // 2 * (resized[0] // (2 * patch)) * (resized[1] // (2 * patch))
    assert inputs["video_grid_thw"].tolist() == [[frames // 2, resized[0] // patch, resized[1] // patch]]
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == expected
    with torch.no_grad():
        features = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert features.pooler_output[0].shape == (expected, model.config.text_config.hidden_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chat_template_wraps_a_video_in_vision_tokens(loaded, family):
    processor, _ = loaded[family]
    text = processor.apply_chat_template(VIDEO_MESSAGE, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # Qwen2.5-VL's template adds the default system prompt; Qwen3-VL's adds none.
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") == (family == "qwen2_5_vl")


def test_qwen3_template_is_the_checkpoints_byte_for_byte(checkpoints):
    as_saved = json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}, indent=4).encode()
    assert hashlib.sha256(as_saved).hexdigest() == QWEN3_VL_CHAT_TEMPLATE_SHA256
    processor = AutoProcessor.from_pretrained(checkpoints["qwen3_vl"], local_files_only=True)
    assert processor.chat_template == QWEN3_VL_CHAT_TEMPLATE


def test_qwen3_puts_a_timestamp_before_each_temporal_patch(loaded):
    processor, _ = loaded["qwen3_vl"]
    text = processor.tokenizer.decode(video_inputs("qwen3_vl", processor, 8, 64, 64)["input_ids"][0])
    # frames 0..7 at 2 fps: temporal patches centred at 0.25, 1.25, 2.25, 3.25 s (printed with one decimal)
    for seconds in ("0.2", "1.2", "2.2", "3.2"):
        assert f"<{seconds} seconds><|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_runs(loaded, family):
    processor, model = loaded[family]
    inputs = video_inputs(family, processor, 8, 56, 56)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt = inputs["input_ids"].shape[1]
    assert prompt < out.shape[1] <= prompt + 4
    assert torch.equal(out[:, :prompt], inputs["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_video_tokens_keep_their_positions_through_generate(loaded, family):
    """A pruned prompt passed with its original M-RoPE ids decodes at the positions of the unpruned one."""
    processor, model = loaded[family]
    inputs = video_inputs(family, processor, 8, 56, 56)
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        full = [positions[:, 0, -1].tolist() for positions in seen[1:]]  # (t, h, w) of each decoded token
        seen.clear()

        ids = inputs["input_ids"][0]
        video = (ids == model.config.video_token_id).nonzero()[:, 0]
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[video[1::2]] = False  # drop every other video token
        mrope, _ = model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
            second_per_grid_ts=inputs.get("second_per_grid_ts"), attention_mask=inputs["attention_mask"],
        )  # fmt: skip
        position_ids = torch.cat([torch.arange(int(keep.sum()))[None, None], mrope[:, :, keep]])  # [4, 1, L']
        with torch.no_grad():
            encoded = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        kept = torch.ones(len(video), dtype=torch.bool)
        kept[1::2] = False
        pooled = (encoded.pooler_output[0][kept],)
        if family == "qwen3_vl":  # DeepStack features (per layer, split per video) go with their tokens
            encoded.pooler_output = pooled
            encoded.deepstack_features = [(per_video[0][kept],) for per_video in encoded.deepstack_features]
        else:
            encoded = BaseModelOutputWithPooling(pooler_output=pooled)
        model.generate(
            input_ids=inputs["input_ids"][:, keep], attention_mask=inputs["attention_mask"][:, keep],
            position_ids=position_ids, mm_encoder_outputs={"video": encoded}, max_new_tokens=3, do_sample=False,
        )  # fmt: skip
    finally:
        hook.remove()
    prefill = seen[0]
    assert torch.equal(prefill, mrope[:, :, keep])
    assert [positions[:, 0, -1].tolist() for positions in seen[1:]] == full


def test_ensure_builds_once_per_family(tmp_path):
    path = ensure_tiny_qwen_checkpoint(tmp_path / "tiny", "qwen2_5_vl")
    weights = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_qwen_checkpoint(path, "qwen2_5_vl") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == weights
    ensure_tiny_qwen_checkpoint(path, "qwen3_vl")
    assert AutoConfig.from_pretrained(path, local_files_only=True).model_type == "qwen3_vl"
    with pytest.raises(ValueError, match="known families"):
        build_tiny_qwen_checkpoint(tmp_path / "other", "qwen2_vl")


def test_building_twice_gives_the_same_weights(checkpoints, tmp_path):
    again = build_tiny_qwen_checkpoint(tmp_path / "again", "qwen3_vl")
    assert (again / "model.safetensors").read_bytes() == (checkpoints["qwen3_vl"] / "model.safetensors").read_bytes()
