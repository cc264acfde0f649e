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
TINY_QWEN = {"tiny_qwen2_5_vl": "qwen2_5_vl"}  # the tiny random Qwen-VL checkpoints (`offline/tiny_qwen.py`), by family
ARCHITECTURES = ("tiny", *QWEN2, *TINY_QWEN)


def architecture_config(name: str, tokenizer=None):
    """The HF config of a known architecture: LLaVA-OneVision's (`tiny`, `0.5b`, `7b`, `72b`) or a tiny Qwen-VL's."""
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config  # direct imports: plans load no model code
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    from dycoke_eval.config import ConfigError
    from dycoke_eval.offline.tiny_model import build_tokenizer, llava_onevision_config, tiny_config

    if name not in ARCHITECTURES:
        raise ConfigError(f"model.architecture={name!r}; known architectures: {', '.join(ARCHITECTURES)}")
    if name in TINY_QWEN:
        from dycoke_eval.offline.tiny_qwen import tiny_config as tiny_qwen_config

        return tiny_qwen_config(TINY_QWEN[name])
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
