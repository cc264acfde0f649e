"""The clips the Qwen-VL tests feed both families: frames sampled from 8 s of a 30 fps video, and random pixels.

Sampled at 1 frame a second, not the 2.0 fps a processor assumes, so a dropped or misread rate shows in the temporal
ids (Qwen2.5-VL) and in the timestamps (Qwen3-VL).
"""

import numpy as np
import pytest

from dycoke_eval.geometry import FrameTiming

VIDEO_FPS, VIDEO_FRAMES = 30.0, 240


def timing(count: int = 8) -> FrameTiming:
    """`count` frames at the papers' linspace indices over the 8 s video."""
    return FrameTiming(VIDEO_FPS, VIDEO_FRAMES, tuple(np.linspace(0, VIDEO_FRAMES - 1, count, dtype=int).tolist()))


def random_frames(count: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (count, height, width, 3), dtype=np.uint8)


def run_from_a_video_file(checkpoint, tmp_path, name: str, settings: dict):
    """One sample of a written mp4 through the wrapper with method `name`: (the wrapper, its record, the video's own
    layout). Asserts what every family must give: the frames sampled and the full token count of this video's grid,
    and the tokens each layer saw equal to the method's plan (within 1: FastV's plan is nominal)."""
    from test_wrapper import GREEDY, make_requests

    from dycoke_eval.config import method_from_config
    from dycoke_eval.geometry import PlannedCounts
    from dycoke_eval.offline.videos import write_video
    from dycoke_eval.video_frames import sample_video
    from dycoke_eval.wrapper import CompressedVideoLM

    method = method_from_config(name, settings)
    lm = CompressedVideoLM(pretrained=str(checkpoint), frames=8, device="cpu", method=method)
    video = str(write_video(tmp_path / "clip.mp4"))
    lm.generate_until(make_requests(lm, [video], GREEDY))
    (record,) = lm.sample_records
    layout = lm.adapter.encode(lm.adapter.preprocess(sample_video(video, 8).frames)).layout  # this video's grid
    assert record.frames == 8 and record.visual_tokens_full == layout.full_tokens
    planned = method.plan(PlannedCounts.full(layout, lm.adapter.dims().layers))
    assert record.prefill_visual_by_layer == pytest.approx(planned.prefill, abs=1)
    return lm
