"""Frame sampling against a full decode, on the two videos the README quotes.

    python scripts/bench_decode.py [--repeats 3]

Writes a 1280x720, 120-frame mkv (H.264, a keyframe every 2 frames) and a 640x360, 1,800-frame mp4
(MPEG-4, a keyframe every 60) of moving noise into a temporary folder, then prints, for each, the median
time of `sample_video` (what the harness does: count the packets, decode only around the sampled frames)
and of decoding every frame with PyAV, and how many frames each decoded.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from dycoke_eval.offline.videos import encode_video
from dycoke_eval.video_frames import sample_video

VIDEOS = (  # file name, width, height, frames, keyframe interval, frames sampled
    ("wide.mkv", 1280, 720, 120, 2, 4),
    ("long.mp4", 640, 360, 1800, 60, 32),
)


def moving_noise(width: int, height: int, frames: int) -> np.ndarray:
    """[T, H, W, 3] uint8: one noise image shifted a little each frame, so every frame differs and compresses alike."""
    base = np.random.default_rng(0).integers(0, 256, size=(height, width + frames, 3), dtype=np.uint8)
    return np.stack([base[:, t : t + width] for t in range(frames)])


def full_decode(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for name, width, height, frames, gop, sampled in VIDEOS:
            path = encode_video(Path(folder) / name, moving_noise(width, height, frames), gop_size=gop)
            sampling = median_seconds(lambda path=path, sampled=sampled: sample_video(path, sampled), args.repeats)
            full = median_seconds(lambda path=path: full_decode(path), args.repeats)
            print(
                f"{name} {width}x{height}, {frames} frames, keyframe every {gop}: {sampled} frames sampled in "
                f"{sampling * 1e3:.0f} ms, every frame decoded in {full * 1e3:.0f} ms (median of {args.repeats})"
            )


if __name__ == "__main__":
    main()
