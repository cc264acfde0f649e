"""The HF configs of the checkpoints the harness knows, built without any download.

One source for the real dimensions (docs/flops.md#model-dimensions, supplementary Table 8): the FLOPs plans of
`dycoke_eval.accounting` read them before any model is loaded, and `random_weights: true` builds
the real architecture from them with random weights (latency and memory only; **accuracy is
meaningless with these weights**). The vision tower is SigLIP-so400m as LLaVA-OV uses it (384 px,
patch 14, 26 layers, no pooling head); the language model is Qwen2 at 0.5B / 7B / 72B. `video_7b`
is LLaVA-Video-7B-Qwen2 (`llava-hf/LLaVA-Video-7B-Qwen2-hf`), the same HF config as `7b`: its token
layout comes from its adapter (model setting `adapter: llava_video`). `tiny` is the offline test
model. The tokenizer is the tiny offline one, enough to build prompts. `SIGLIP_SO400M_HEAD` is the
vision config of the original SigLIP checkpoint whose pooling head FastVID re-attaches.
"""

from __future__ import annotations

from dataclasses import dataclass

SIGLIP_SO400M = {"image_size": 384, "patch_size": 14, "hidden_size": 1152, "intermediate_size": 4304,
                 "num_hidden_layers": 26, "num_attention_heads": 16, "vision_use_head": False}  # fmt: skip
SIGLIP_SO400M_HEAD = {**SIGLIP_SO400M, "num_hidden_layers": 27, "vision_use_head": True}  # google/siglip-so400m-patch14-384


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
    "video_7b": LanguageModelShape(3584, 18944, 28, 28, 4, 152064, False),  # LLaVA-Video-7B-Qwen2: OV-7B's Qwen2-7B
}
TINY_QWEN = {"tiny_qwen2_5_vl": "qwen2_5_vl", "tiny_qwen3_vl": "qwen3_vl"}  # the tiny random Qwen-VL checkpoints, by family
# The real Qwen-VL checkpoints' dimensions (their hub config.json; docs/qwen.md), by family, over the tiny configs.
QWEN_VL = {
    "qwen2_5_vl_7b": (  # Qwen/Qwen2.5-VL-7B-Instruct
        "qwen2_5_vl",
        {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
         "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000, "tie_word_embeddings": False,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
        {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
         "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
    ),
    "qwen3_vl_8b": (  # Qwen/Qwen3-VL-8B-Instruct
        "qwen3_vl",
        {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 262144,
         "tie_word_embeddings": False,
         "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True}},
        {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
         "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]},
    ),
}  # fmt: skip
ARCHITECTURES = ("tiny", *QWEN2, *TINY_QWEN, *QWEN_VL)


def architecture_family(name: str) -> str | None:
    """The Qwen-VL family an architecture belongs to (None: LLaVA-OneVision's), which picks its offline processor."""
    return TINY_QWEN.get(name) or QWEN_VL.get(name, (None,))[0]


def architecture_config(name: str, tokenizer=None):
    """The HF config of a known architecture: LLaVA-OneVision's (`tiny`, `0.5b`, `7b`, `72b`) or a tiny Qwen-VL's."""
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config  # direct imports: plans load no model code
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    from dycoke_eval.config import ConfigError
    from dycoke_eval.offline.tiny_model import build_tokenizer, llava_onevision_config, tiny_config

    if name not in ARCHITECTURES:
        raise ConfigError(f"model.architecture={name!r}; known architectures: {', '.join(ARCHITECTURES)}")
    if architecture_family(name):
        from dycoke_eval.offline.tiny_qwen import tiny_config as tiny_qwen_config

        if name in TINY_QWEN:
            return tiny_qwen_config(TINY_QWEN[name])
        family, text_dims, vision_dims = QWEN_VL[name]
        return tiny_qwen_config(family, text_dims=text_dims, vision_dims=vision_dims)
    tokenizer = tokenizer or build_tokenizer()
    if name == "tiny":
        return tiny_config(tokenizer)
    shape = QWEN2[name]
    return llava_onevision_config(
        tokenizer,
        vision_config=SiglipVisionConfig(**SIGLIP_SO400M),
        text_config=Qwen2Config(**vars(shape), max_position_embeddings=32768),
        tie_word_embeddings=shape.tie_word_embeddings,
    )
