"""Frame-exact uniform sampling of F frames from a video file, for any container.

The paper's model (LLaVA-NeXT's lmms-eval model, decoding with decord) samples exactly F frame
indices `np.linspace(0, n - 1, F, dtype=int)` over the video's n frames, duplicates included when
n < F. lmms-eval 0.7.3's PyAV reader does not (every frame for webm/mkv, min(n, F) elsewhere), and
container headers cannot be trusted for n (mkv/webm carry none, avi/mp4 can be wrong). So n is
counted by demuxing the video stream's packets (no decoding), and only the frames needed for the
targets are decoded: seek to the keyframe at or before a target when that skips more frames than a
restart of the decoder throws away, otherwise decode forward, naming each decoded frame by its
timestamp. Whenever that cannot be verified (missing or repeated timestamps, a packet that decodes
to no frame, a seek that lands past its keyframe), a sequential decode that counts the decodable
frames first takes over.

The video's frame rate comes along: the stream's average rate, as decord's `get_avg_fps` gives it, or,
where the container declares none, the mean rate over the packets' timestamps. Models that number frames
in time (Qwen-VL's M-RoPE and timestamps) need it.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np


class VideoDecodeError(ValueError):
    """A video file that cannot be sampled; the message names the file and the problem."""


@dataclass(frozen=True)
class SampledVideo:
    frames: np.ndarray  # [F, H, W, 3] uint8 RGB
    frame_count: int  # n, the video's frame count
    indices: tuple[int, ...]  # the sampled indices (length F)
    decoded: int  # how many frames were actually decoded (for tests/diagnostics)
    fps: float | None = None  # the video's own frame rate (None: neither the container nor the timestamps tell)


def sample_indices(frame_count: int, frames: int) -> list[int]:
    """The paper's uniform indices: `np.linspace(0, n - 1, F, dtype=int)`, duplicates kept when n < F."""
    if frames < 1:
        raise ValueError(f"frames={frames}: sample at least one frame")
    if frame_count < 1:
        raise ValueError(f"frame_count={frame_count}: a video needs at least one frame to sample")
    return [int(index) for index in np.linspace(0, frame_count - 1, frames, dtype=int)]


def sample_video(path: str | os.PathLike[str], frames: int) -> SampledVideo:
    """Exactly `frames` RGB frames at the uniform indices over the video's decodable frames."""
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError(f"{path}: no such video file")
    decoded = 0
    with _open_video(path) as container:
        stream = container.streams.video[0]
        timeline = _packet_timeline(container, stream)
        if timeline is not None:
            indices = sample_indices(len(timeline.timestamps), frames)
            found, decoded = _decode_by_seeking(container, stream, timeline, set(indices))
            if found is not None:
                sampled = _sampled(path, found, len(timeline.timestamps), indices, decoded)
                return replace(sampled, fps=_frame_rate(stream, timeline))
        fps = _frame_rate(stream, timeline)
    fallback = _sample_sequentially(path, frames)
    return replace(fallback, decoded=decoded + fallback.decoded, fps=fps)


def _frame_rate(stream: av.VideoStream, timeline: _Timeline | None) -> float | None:
    """Frames per second: the stream's declared average, else the mean over the timestamps of the packets."""
    if stream.average_rate:
        return float(stream.average_rate)
    if timeline is not None and len(timeline.timestamps) > 1 and stream.time_base:
        span = (timeline.timestamps[-1] - timeline.timestamps[0]) * stream.time_base
        return float((len(timeline.timestamps) - 1) / span) if span > 0 else None
    return None


@dataclass(frozen=True)
class _Timeline:
    """The video stream's packets in presentation order, as demuxed without decoding."""

    field: str  # "pts", or "dts" when the container gives no presentation timestamps
    timestamps: list[int]  # ascending, one per frame
    keyframes: list[int]  # ascending presentation indices of keyframe packets


def _packet_timeline(container: av.container.InputContainer, stream: av.VideoStream) -> _Timeline | None:
    """The frame timeline from packets, or None when timestamps cannot name frames uniquely."""
    packets = [
        (packet.pts, packet.dts, packet.is_keyframe)
        for packet in _guarded(container.demux(stream), container)
        if packet.size > 0 and not packet.is_discard
    ]
    for field, position in (("pts", 0), ("dts", 1)):
        stamps = [packet[position] for packet in packets]
        if stamps and None not in stamps and len(set(stamps)) == len(stamps):
            ordered = sorted(stamps)
            index_of = {stamp: index for index, stamp in enumerate(ordered)}
            keyframes = sorted(index_of[packet[position]] for packet in packets if packet[2])
            return _Timeline(field, ordered, keyframes)
    return None


def _decode_by_seeking(
    container: av.container.InputContainer, stream: av.VideoStream, timeline: _Timeline, wanted: set[int]
) -> tuple[dict[int, av.VideoFrame] | None, int]:
    """Decode only around the wanted indices; (frames by index, or None if unverifiable, frames decoded)."""
    index_of = {stamp: index for index, stamp in enumerate(timeline.timestamps)}
    found: dict[int, av.VideoFrame] = {}
    decoded = 0
    decoder: Iterator[av.VideoFrame] | None = None
    next_index = 0  # the presentation index the decoder must output next (once past the seek point)
    just_seeked = False
    try:
        for target in sorted(wanted):
            if target in found:
                continue
            position = bisect.bisect_right(timeline.keyframes, target) - 1
            keyframe = timeline.keyframes[position] if position >= 0 else 0
            if decoder is None or keyframe - next_index > _restart_cost(stream):
                container.seek(timeline.timestamps[keyframe], stream=stream, backward=True, any_frame=False)
                decoder, next_index, just_seeked = container.decode(stream), keyframe, True
            for frame in decoder:
                decoded += 1
                index = index_of.get(getattr(frame, timeline.field))
                if index is None:
                    return None, decoded
                if just_seeked and index < next_index:
                    continue  # the seek landed on an earlier keyframe: decode up to ours
                if index != next_index:
                    return None, decoded  # a skipped frame or a seek past the keyframe: n is not what packets said
                just_seeked, next_index = False, index + 1
                if index in wanted:
                    found[index] = frame
                if index == target:
                    break
            else:
                return None, decoded  # the stream ended before the target
    except av.error.FFmpegError:
        return None, decoded
    return found, decoded


def _restart_cost(stream: av.VideoStream) -> int:
    """Frames a seek throws away: those in flight in the decoder's frame threads, plus one held for reordering."""
    context = stream.codec_context
    return max(context.thread_count, 1) + int(bool(context.has_b_frames))


def _sample_sequentially(path: Path, frames: int) -> SampledVideo:
    """Count the decodable frames, then decode again keeping only the targets; never holds the whole video."""
    with _open_video(path) as container:
        frame_count = sum(1 for _ in _guarded(container.decode(container.streams.video[0]), container))
    if frame_count == 0:
        raise VideoDecodeError(f"{path}: the video stream has zero decodable frames")
    indices = sample_indices(frame_count, frames)
    wanted, last = set(indices), max(indices)
    found: dict[int, av.VideoFrame] = {}
    with _open_video(path) as container:
        for index, frame in enumerate(_guarded(container.decode(container.streams.video[0]), container)):
            if index in wanted:
                found[index] = frame
            if index == last:
                break
    return _sampled(path, found, frame_count, indices, frame_count + last + 1)


def _sampled(path: Path, found: dict[int, av.VideoFrame], frame_count: int, indices: list[int], decoded: int) -> SampledVideo:
    """Stack the frames as RGB24 at the first frame's size, so a mid-stream resolution change still stacks."""
    if len(found) < len(set(indices)):
        raise VideoDecodeError(f"{path}: frames {sorted(set(indices) - found.keys())} could not be decoded")
    first = found[indices[0]]
    rgb = {index: frame.to_ndarray(format="rgb24", width=first.width, height=first.height) for index, frame in found.items()}
    return SampledVideo(np.stack([rgb[index] for index in indices]), frame_count, tuple(indices), decoded)


def _open_video(path: Path) -> av.container.InputContainer:
    """Open with a video stream and frame threading, or raise a one-line VideoDecodeError."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise VideoDecodeError(f"{path}: cannot open as a video container ({_reason(error)})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: the container has no video stream")
    container.streams.video[0].thread_type = "AUTO"
    return container


def _guarded(items: Iterator, container: av.container.InputContainer) -> Iterator:
    """Re-raise FFmpeg errors met while iterating as a one-line VideoDecodeError naming the file."""
    try:
        yield from items
    except av.error.FFmpegError as error:
        raise VideoDecodeError(f"{container.name}: cannot decode the video stream ({_reason(error)})") from None


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)
