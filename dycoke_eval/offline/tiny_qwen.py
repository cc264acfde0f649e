"""Tiny, randomly initialised Qwen2.5-VL and Qwen3-VL checkpoints built from the real HF classes, offline.

They stand in for `Qwen/Qwen2.5-VL-7B-Instruct` and `Qwen/Qwen3-VL-8B-Instruct` where no hub is reachable,
as `tiny_model.py`'s LLaVA-OneVision does for the llava-hf checkpoints: `Qwen2_5_VLForConditionalGeneration` /
`Qwen3VLForConditionalGeneration` with few, narrow layers but the real structure, the real processor classes
around an offline byte-level BPE tokenizer that has every special token the processors and templates use, and
the checkpoints' own chat templates. Saved with `save_pretrained`, they load with `AutoModelForImageTextToText`
and `AutoProcessor` exactly like the hub checkpoints.

Token geometry, as in the real models:

- Qwen2.5-VL: ViT patch 14, temporal patch 2, 2x2 spatial merge, so a video of `t` frames resized to `h x w`
  (multiples of 28) becomes `t/2 * h/28 * w/28` tokens, laid out temporal patch by temporal patch, rows then
  columns, with no newline tokens. Its ViT keeps window attention with a full-attention last block
  (`fullatt_block_indexes`), and `tokens_per_second` spaces the temporal M-RoPE ids.
- Qwen3-VL: ViT patch 16, so `t/2 * h/32 * w/32` tokens; each temporal patch is its own
  `<t seconds><|vision_start|>...<|vision_end|>` group in the text, and DeepStack adds features of
  `deepstack_visual_indexes` ViT blocks to the first decoder layers.

The text models' M-RoPE sections split the rotary half-dimension as the real ones do: Qwen2.5-VL's
[16, 24, 24] of 64 becomes [2, 3, 3] of 8; Qwen3-VL's interleaved [24, 20, 20] of 64 becomes [4, 2, 2] of 8.
The image and video processors' pixel budgets are small, so that an 8-frame 56x56 or 64x64 clip makes
16 video tokens and a whole `generate` takes well under a second on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from dycoke_eval.offline.tiny_model import byte_level_bpe, qwen_tokenizer, transformers_errors_only

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
BUILD_VERSION = 2  # bump when the recipe changes so cached copies are rebuilt
GENERATION_CAP = 16  # new tokens per answer, as for the tiny LLaVA-OneVision
MARKER = "dycoke_tiny.json"  # the build's version, family and generation cap, beside the weights

# The Qwen special tokens in the order of their ids in the real vocabularies (151643 ... 151656); the tiny BPE
# gives them ids 0..13. Then tokens the real tokenizers add as whole, non-special tokens (tool calls, thinking).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Qwen/Qwen2.5-VL-7B-Instruct's `chat_template` (its chat_template.json; Qwen2-VL-7B-Instruct has the same one).
# Text as transformers' own processor test writes it: tests/models/qwen2_5_vl/test_processor_qwen2_5_vl.py,
# `prepare_processor_dict`, huggingface/transformers@06b001ceb9c73adbcf8c9ca8ee7eee12d52c44d3. Data, kept verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"  # noqa: E501  # fmt: skip

# Qwen/Qwen3-VL-8B-Instruct's `chat_template`, verbatim (data). Transcribed from public copies of the template
# (e.g. a "qwen3-vl-instruct" entry of a chat-template registry, found by code search) and checked
# byte for byte: `json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}, indent=4)` has the sha256
# 5c72a170d2a4a1a3bc5adad2e689ae28138a9700e5b8c96c0266331e86c0acce that a public script records for
# Qwen3-VL-8B-Instruct/chat_template.json (docs/qwen.md, "Chat templates").
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {%- if messages[0].content is string %}\n            {{- messages[0].content }}\n        {%- else %}\n"
    "            {%- for content in messages[0].content %}\n                {%- if 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '\\n\\n' }}\n    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with'
    ' function signatures within <tools></tools> XML tags:\\n<tools>" }}\n    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within'
    ' <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\":'
    " <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' }}\n        {%- if messages[0].content is string %}\n"
    "            {{- messages[0].content }}\n        {%- else %}\n            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n                    {{- content.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set image_count = namespace(value=0) %}\n{%- set video_count = namespace(value=0) %}\n"
    '{%- for message in messages %}\n    {%- if message.role == "user" %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content_item in message.content %}\n"
    "                {%- if 'text' in content_item %}\n                    {{- content_item.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and message.content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n                {%- endif %}\n                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    '                {{- \'<tool_call>\\n{"name": "\' }}\n                {{- tool_call.name }}\n'
    '                {{- \'", "arguments": \' }}\n                {%- if tool_call.arguments is string %}\n'
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {%- if message.content is string %}\n            {{- message.content }}\n        {%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
QWEN3_VL_CHAT_TEMPLATE_SHA256 = "5c72a170d2a4a1a3bc5adad2e689ae28138a9700e5b8c96c0266331e86c0acce"

CHAT_TEMPLATES = {"qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE, "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE}
PATCH_SIZES = {"qwen2_5_vl": 14, "qwen3_vl": 16}  # the real ViTs' patch sizes
TEMPORAL_PATCH_SIZE = 2
SPATIAL_MERGE_SIZE = 2

_CORPUS = [
    "You are a helpful assistant.",
    "The person in the video picks up a cup and walks to the table.",
    "Answer the question using a single word or phrase.",
    "Select the best answer to the following multiple-choice question based on the video.",
    "Respond with only the letter (A, B, C, or D) of the correct option.",
    "Describe the video in detail. What is happening? Who is there? Where is it?",
    "<0.5 seconds> <1.5 seconds> <2.5 seconds> <3.5 seconds> user assistant system",
    "yes no red blue green one two three left right up down before after because",
]


def build_tokenizer():
    """An offline byte-level BPE tokenizer with every Qwen-VL special token (as `tiny_model.build_tokenizer` does)."""
    from tokenizers import AddedToken

    backend = byte_level_bpe(_CORPUS, SPECIAL_TOKENS, 420)
    # Real Qwen tokenizers have these as added, non-special tokens: whole in the text, kept when decoding.
    backend.add_tokens([AddedToken(token, normalized=False, special=False) for token in ADDED_TOKENS])
    return qwen_tokenizer(backend, "<|image_pad|>", "<|video_pad|>")


# What qwen-vl-utils resizes video frames within (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS per frame; Qwen3-VL: its video
# processor's budget over a whole video), for random-weight runs of the real architectures.
REAL_VIDEO_SIZES = {
    "qwen2_5_vl": {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28},
    "qwen3_vl": {"shortest_edge": 4096, "longest_edge": 768 * 32 * 32 * 32},
}


def build_processor(family: str, tokenizer=None, real_sizes: bool = False):
    """The family's real processor class, with small pixel budgets (`real_sizes`: the real video budgets), around
    `tokenizer` (the tiny one by default)."""
    _check(family)
    from transformers import Qwen2VLImageProcessor

    tokenizer = tokenizer or build_tokenizer()
    template = CHAT_TEMPLATES[family]
    tokenizer.chat_template = template
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        # Per frame: at least 56x56 (the real min_pixels), at most 112x112, i.e. <= 4x4 merged tokens.
        size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
        return Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(size=size),
            video_processor=Qwen2VLVideoProcessor(
                size=REAL_VIDEO_SIZES[family] if real_sizes else size, cap_pixels_per_frame=True
            ),
            tokenizer=tokenizer,
            chat_template=template,
        )
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    # Qwen3-VL's processors: patch 16, mean/std 0.5. The video budget is over t*h*w: 8 frames of 64x64 at most.
    half = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": PATCH_SIZES[family]}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, **half),
        video_processor=Qwen3VLVideoProcessor(
            size=REAL_VIDEO_SIZES[family] if real_sizes else {"shortest_edge": 32 * 32 * 2, "longest_edge": 64 * 64 * 8},
            cap_pixels_per_frame=False,
            **half,
        ),
        tokenizer=tokenizer,
        chat_template=template,
    )


def tiny_config(family: str, tokenizer=None, text_dims: dict | None = None, vision_dims: dict | None = None):
    """The tiny model's config: 2-4 ViT blocks of width 32, an 8-layer text model of width 64 (head dim 16), as deep as the
    tiny LLaVA-OneVision's, so every method's default layers exist in both.

    `text_dims` and `vision_dims` replace the tiny values (a real checkpoint's dimensions: `offline/architectures.py`),
    around the same tokenizer's special token ids.
    """
    _check(family)
    tokenizer = tokenizer or build_tokenizer()
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": PATCH_SIZES[family],
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "spatial_merge_size": SPATIAL_MERGE_SIZE,
        "out_hidden_size": text["hidden_size"],
    }
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            # Block 0 attends within 56 px windows (2x2 merged tokens), block 1 over the whole frame, as the
            # real 32-block ViT alternates windows with full attention at blocks 7, 15, 23, 31.
            vision_config={
                **vision,
                "depth": 2,
                "window_size": 56,
                "fullatt_block_indexes": [1],
                "tokens_per_second": 2,  # as the real checkpoints: temporal ids 2 apart per second of video
                **(vision_dims or {}),
            },
            text_config={
                **text,
                "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                **(text_dims or {}),
            },
            tie_word_embeddings=(text_dims or {}).get("tie_word_embeddings", True),
            **ids,
        )
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLConfig

    return Qwen3VLConfig(
        # DeepStack: blocks 0-2 of 4 feed decoder layers 0-2, as the real 27-block ViT's 8, 16, 24 feed 0-2.
        vision_config={
            **vision,
            "depth": 4,
            "hidden_act": "gelu_pytorch_tanh",
            "num_position_embeddings": 64,  # an 8x8 learned grid, interpolated to each frame's patch grid
            "deepstack_visual_indexes": [0, 1, 2],
            **(vision_dims or {}),
        },
        text_config={
            **text,
            "head_dim": 16,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            **(text_dims or {}),
        },
        tie_word_embeddings=(text_dims or {}).get("tie_word_embeddings", True),
        **ids,
    )


def build_tiny_qwen_checkpoint(path: str | Path, family: str) -> Path:
    """Build and save the tiny checkpoint of `family` ("qwen2_5_vl" or "qwen3_vl") at `path`, deterministically."""
    _check(family)
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    path = Path(path)
    tokenizer = build_tokenizer()
    processor = build_processor(family, tokenizer)
    config = tiny_config(family, tokenizer)
    model_class = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    with transformers_errors_only():
        model.save_pretrained(path)
        processor.save_pretrained(path)
    marker = {"build_version": BUILD_VERSION, "family": family, "generation_cap": GENERATION_CAP}
    (path / MARKER).write_text(json.dumps(marker))
    return path


def ensure_tiny_qwen_checkpoint(path: str | Path, family: str) -> Path:
    """Return `path` holding the tiny checkpoint of `family`, building it only when absent, stale or of another family."""
    path = Path(path)
    marker = path / MARKER
    if marker.exists():
        found = json.loads(marker.read_text())
        if found.get("build_version") == BUILD_VERSION and found.get("family") == family:
            return path
    return build_tiny_qwen_checkpoint(path, family)


def video_token_count(family: str, frames: int, height: int, width: int) -> int:
    """Placeholder tokens of a video whose frames the processor resized to `height x width` (multiples of the
    merged patch): `frames/2 * height/28 * width/28` for Qwen2.5-VL, `.../32` for Qwen3-VL."""
    _check(family)
    merged = PATCH_SIZES[family] * SPATIAL_MERGE_SIZE
    temporal_patches = -(-frames // TEMPORAL_PATCH_SIZE)  # the processor repeats the last frame to fill a patch
    return temporal_patches * (height // merged) * (width // merged)


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; known families: {', '.join(FAMILIES)}")
