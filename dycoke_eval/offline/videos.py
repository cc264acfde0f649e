"""Small deterministic synthetic videos written with PyAV.

Each video is a coloured square moving over a gradient, with a seed per name, so frames differ
over time (temporal merging has something to find) and videos differ from each other.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, FRAME_COUNT, FPS = 64, 48, 40, 8


def synthetic_frames(name: str, frame_count: int = FRAME_COUNT) -> np.ndarray:
    """[T, H, W, 3] uint8 frames, a pure function of `name`."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    colour = rng.integers(64, 256, size=3, dtype=np.uint8)
    background = np.linspace(0, 255, WIDTH, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, size=3)
    background = np.broadcast_to(background, (HEIGHT, WIDTH, 3)).astype(np.uint8)
    start, velocity = rng.integers(0, WIDTH // 2), rng.choice([-2, -1, 1, 2])
    frames = np.repeat(background[None], frame_count, axis=0).copy()
    side = 12
    for t in range(frame_count):
        x = int((start + velocity * t) % (WIDTH - side))
        y = (HEIGHT - side) // 2 + int(6 * np.sin(t / 4))
        frames[t, y : y + side, x : x + side] = colour
    return frames


def write_video(path: str | Path, name: str | None = None, frame_count: int = FRAME_COUNT) -> Path:
    """Encode the synthetic video for `name` (default: the file's stem) as MPEG-4 at `path`."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = synthetic_frames(name or path.stem, frame_count)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
