"""Video tokens and encoder signals at the real models' sizes, random, for benchmarks and counts (no download).

LLaVA-OneVision-7B's layout (32 frames of 14 x 14 pooled tokens and one newline, width 3584), LLaVA-Video-7B's
(64 frames of 13 x 13 and a newline per row), Qwen2.5-VL-7B's and Qwen3-VL-8B's (32 frames of a 640x360 clip:
16 temporal patches of 13 x 23 and 11 x 20 merged tokens, width 3584 and 4096). The encoder signals come at
SigLIP-so400m's shapes (1152 wide, 27 x 27 patches per frame). Random features make data-dependent counts
(PruneVid's clusters) arbitrary; the frames' global features (`probe_features`) form scenes of unequal lengths,
so FastVID's DySeg finds segments a real video could give.
"""

from __future__ import annotations

import torch

from dycoke_eval.geometry import ModelInfo, VideoLayout
from dycoke_eval.models.base import EncodedVideo
from dycoke_eval.offline.architectures import SIGLIP_SO400M, architecture_config

SCENE_SHARES = (3, 5, 2, 8, 4, 6, 1, 3)  # relative scene lengths: 8 scenes, as DySeg's c=8 looks for

SIZES = {  # name -> (frames, rows, cols, newlines, family, architecture); Qwen-VL: 32 frames of a 640x360 clip
    "ov": (32, 14, 14, "video_end", "llava_onevision", "7b"),
    "video": (64, 13, 13, "row_end", "llava_video", "video_7b"),
    "qwen2_5_vl": (16, 13, 23, "none", "qwen2_5_vl", "qwen2_5_vl_7b"),  # 16 temporal patches of 13 x 23 merged tokens
    "qwen3_vl": (16, 11, 20, "none", "qwen3_vl", "qwen3_vl_8b"),
}


def size_model_info(size: str) -> ModelInfo:
    """What a method may check about the model of a real size (LLaVA's with SigLIP's pooling head, as FastVID runs)."""
    from dycoke_eval.models import adapter_class

    *_, family, architecture = SIZES[size]
    config = architecture_config(architecture)
    return adapter_class(config, name=family).model_info(config, siglip_head=True)


def random_signals(frames: int, tokens: int, hidden: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Every encoder signal a method may ask for, at the real shapes (SigLIP so400m width, 27 x 27 patches)."""
    side = SIGLIP_SO400M["image_size"] // SIGLIP_SO400M["patch_size"]
    width = SIGLIP_SO400M["hidden_size"]

    def rand(*shape):
        return torch.rand(*shape, device=device, dtype=dtype)

    bounds = torch.tensor([0, *SCENE_SHARES], device=device).cumsum(0) * frames // sum(SCENE_SHARES)
    scene = torch.bucketize(torch.arange(frames, device=device), bounds[1:-1], right=True)

    return {
        "probe_attention": rand(frames, tokens).softmax(-1),
        "probe_features": (rand(len(SCENE_SHARES), width)[scene] + 0.02 * rand(frames, width)).to(dtype),
        "attention_received": rand(frames, tokens).softmax(-1),
        "keys": rand(frames, tokens, width),
        "patch_features": rand(frames, side * side, hidden),
        "patch_attention_received": rand(frames, side * side).softmax(-1),
        "patch_keys": rand(frames, side * side, width),
    }


def random_encoded_video(size: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> EncodedVideo:
    """One video's encoder output at a real size (`SIZES`), at its language model's width, with every signal."""
    frames, rows, cols, newlines, family, architecture = SIZES[size]
    hidden = architecture_config(architecture).text_config.hidden_size
    torch.manual_seed(seed)
    grid = torch.randn(frames, rows * cols, hidden, device=device, dtype=dtype)
    newline = torch.randn(hidden, device=device, dtype=dtype) if newlines != "none" else None
    signals = random_signals(frames, rows * cols, hidden, dtype, device)
    return EncodedVideo(grid=grid, layout=VideoLayout(frames, rows, cols, newlines, family), newline=newline, signals=signals)
