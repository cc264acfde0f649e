"""Small deterministic synthetic videos written with PyAV.

Each video is a coloured square moving over a gradient, with a seed per name, so frames differ
over time (temporal merging has something to find) and videos differ from each other. The
encoder follows the file's suffix (`CODECS_BY_SUFFIX`), so tests can write every container a
benchmark ships (mp4, mov, avi, mkv, webm).
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


# Encoders by file suffix, first available wins: each container gets a codec it is commonly found with.
CODECS_BY_SUFFIX = {
    ".mp4": ("mpeg4",),
    ".mov": ("mpeg4",),
    ".avi": ("mpeg4",),
    ".mkv": ("libx264", "mpeg4"),
    ".webm": ("libvpx-vp9", "libvpx"),
}


def write_video(
    path: str | Path, name: str | None = None, frame_count: int = FRAME_COUNT, *, gop_size: int | None = None
) -> Path:
    """Encode the synthetic video for `name` (default: the file's stem) at `path`, codec by suffix."""
    path = Path(path)
    return encode_video(path, synthetic_frames(name or path.stem, frame_count), gop_size=gop_size)


def encode_video(path: str | Path, frames: np.ndarray, *, gop_size: int | None = None) -> Path:
    """Encode [T, H, W, 3] uint8 RGB frames at `path` with `codec_for(path)`; `gop_size` is the keyframe interval."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec_for(path), rate=FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if gop_size is not None:
            stream.gop_size = gop_size
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def codec_for(path: str | Path) -> str:
    """The first encoder this PyAV build has for the file's suffix (MPEG-4 Part 2 for unknown suffixes)."""
    import av

    candidates = CODECS_BY_SUFFIX.get(Path(path).suffix.lower(), ("mpeg4",))
    for codec in candidates:
        try:
            av.Codec(codec, "w")
        except av.codec.codec.UnknownCodecError:
            continue
        return codec
    raise ValueError(f"{path}: this PyAV build has none of the encoders {candidates}")
