"""LLaVA-OneVision at its real dimensions with random weights, built without any download.

For measuring latency and memory where neither checkpoints nor data can be had: the vision
tower is SigLIP-so400m as LLaVA-OV uses it (384 px, patch 14, 26 layers, no pooling head) and the
language model is Qwen2 at 0.5B / 7B / 72B (SPEC section 1, supplementary Table 8). The tokenizer
is the tiny offline one, enough to build prompts. **Accuracy is meaningless with these weights.**
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIGLIP_SO400M = {"image_size": 384, "patch_size": 14, "hidden_size": 1152, "intermediate_size": 4304,
                 "num_hidden_layers": 26, "num_attention_heads": 16, "vision_use_head": False}  # fmt: skip


@dataclass(frozen=True)
class LanguageModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool


QWEN2 = {
    "0.5b": LanguageModelShape(896, 4864, 24, 14, 2, 151936, True),
    "7b": LanguageModelShape(3584, 18944, 28, 28, 4, 152064, False),
    "72b": LanguageModelShape(8192, 29568, 80, 64, 8, 152064, False),
}


def build_random_llava_onevision(size: str, dtype: torch.dtype, device: str, attn_implementation: str = "sdpa"):
    """(model, processor) for LLaVA-OV-`size` with random weights, initialised directly on `device`."""
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    from dycoke_eval.offline.tiny_model import build_processor, build_tokenizer, llava_onevision_config

    if size not in QWEN2:
        raise ValueError(f"random_weights architecture {size!r}; use one of {', '.join(QWEN2)}")
    tokenizer = build_tokenizer()
    shape = QWEN2[size]
    config = llava_onevision_config(
        tokenizer,
        vision_config=SiglipVisionConfig(**SIGLIP_SO400M),
        text_config=Qwen2Config(**vars(shape), max_position_embeddings=32768),
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()
    processor = build_processor(tokenizer, SIGLIP_SO400M["image_size"], SIGLIP_SO400M["patch_size"])
    return model, processor
