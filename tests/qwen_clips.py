"""The clips the Qwen-VL tests feed both families: frames sampled from 8 s of a 30 fps video, and random pixels.

Sampled at 1 frame a second, not the 2.0 fps a processor assumes, so a dropped or misread rate shows in the temporal
ids (Qwen2.5-VL) and in the timestamps (Qwen3-VL).
"""

import numpy as np

from dycoke_eval.geometry import FrameTiming

VIDEO_FPS, VIDEO_FRAMES = 30.0, 240


def timing(count: int = 8) -> FrameTiming:
    """`count` frames at the papers' linspace indices over the 8 s video."""
    return FrameTiming(VIDEO_FPS, VIDEO_FRAMES, tuple(np.linspace(0, VIDEO_FRAMES - 1, count, dtype=int).tolist()))


def random_frames(count: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (count, height, width, 3), dtype=np.uint8)
