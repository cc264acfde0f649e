"""Frame-exact sampling in every container, checked against an independent full decode and painted frame ids."""

from pathlib import Path

import av
import numpy as np
import pytest
from lmms_eval.models.model_utils.load_video import read_video

from dycoke_eval.offline.videos import FPS, HEIGHT, WIDTH, codec_for, encode_video
from dycoke_eval.video_frames import VideoDecodeError, sample_indices, sample_video

SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
LENGTHS = (7, 20, 120)
SAMPLES = (16, 32)
BAND = 8  # pixels per painted index bit: wide black/white bands survive lossy codecs
INDEX_BITS = WIDTH // BAND


def identity_frames(count: int) -> np.ndarray:
    """Frames whose index is painted in binary as full-height black/white bands, readable after lossy coding."""
    frames = np.zeros((count, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for index in range(count):
        for bit in range(INDEX_BITS):
            if index >> bit & 1:
                frames[index, :, bit * BAND : (bit + 1) * BAND] = 255
    return frames


def painted_index(frame: np.ndarray) -> int:
    """The index `identity_frames` painted, read from the middle of each band (edges blur under compression)."""
    return sum(1 << bit for bit in range(INDEX_BITS) if frame[:, bit * BAND + 2 : (bit + 1) * BAND - 2].mean() > 128)


def decode_every_frame(path: Path) -> np.ndarray:
    """The reference: a plain sequential PyAV decode of the whole video stream."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("video_frames")


@pytest.fixture(scope="module")
def videos(video_dir) -> dict[tuple[str, int], Path]:
    return {
        (suffix, length): encode_video(video_dir / f"clip{length}{suffix}", identity_frames(length))
        for suffix in SUFFIXES
        for length in LENGTHS
    }


def test_sample_indices_are_the_papers_linspace_with_duplicates_for_short_videos():
    assert sample_indices(7, 16) == np.linspace(0, 6, 16, dtype=int).tolist()
    assert sample_indices(7, 16).count(0) == 3
    assert sample_indices(1, 4) == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        sample_indices(0, 4)
    with pytest.raises(ValueError):
        sample_indices(5, 0)


@pytest.mark.parametrize("frames", SAMPLES)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_samples_exactly_f_frames_at_the_linspace_indices(videos, suffix, length, frames):
    path = videos[suffix, length]
    expected = np.linspace(0, length - 1, frames, dtype=int)
    every_frame = decode_every_frame(path)
    assert len(every_frame) == length

    sampled = sample_video(path, frames)

    assert sampled.frame_count == length
    assert sampled.indices == tuple(expected.tolist())
    assert sampled.frames.shape == (frames, HEIGHT, WIDTH, 3) and sampled.frames.dtype == np.uint8
    np.testing.assert_array_equal(sampled.frames, every_frame[expected])
    assert [painted_index(frame) for frame in sampled.frames] == expected.tolist()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_the_videos_own_frame_rate_comes_with_the_frames_in_every_container(videos, suffix):
    assert sample_video(videos[suffix, 20], 4).fps == pytest.approx(FPS, rel=1e-6)


def test_a_long_mkv_with_short_gops_is_decoded_only_around_the_targets(video_dir):
    # Targets 40 frames apart, keyframes every 2: each seek skips more frames than any decoder keeps in flight.
    gop_size, frames = 2, 4
    path = encode_video(video_dir / "short_gops.mkv", identity_frames(120), gop_size=gop_size)
    sampled = sample_video(path, frames)
    assert sampled.decoded <= frames * gop_size < 120
    assert sampled.frame_count == 120
    assert [painted_index(frame) for frame in sampled.frames] == np.linspace(0, 119, frames, dtype=int).tolist()


def test_a_packet_that_decodes_to_no_frame_falls_back_to_counting_decodable_frames(video_dir):
    source = video_dir / "h264.mkv"
    if codec_for(source) != "libx264":
        pytest.skip("needs an H.264 mkv: this PyAV build has no libx264")
    encode_video(source, identity_frames(30))
    path = video_dir / "trailing_parameter_sets.mkv"
    with av.open(str(source)) as original, av.open(str(path), "w") as remuxed:
        video = original.streams.video[0]
        stream = remuxed.add_stream_from_template(video)
        packets = [packet for packet in original.demux(video) if packet.size]
        for packet in packets:
            packet.stream = stream
            remuxed.mux(packet)
        # In-band avcC parameter sets: the H.264 decoder takes them without producing a frame.
        parameter_sets = av.Packet(video.codec_context.extradata)
        parameter_sets.stream, parameter_sets.time_base = stream, packets[0].time_base
        parameter_sets.pts = parameter_sets.dts = max(packet.pts for packet in packets) + round(1 / (FPS * packets[0].time_base))
        remuxed.mux(parameter_sets)
    with av.open(str(path)) as container:
        assert sum(1 for packet in container.demux(video=0) if packet.size) == 31
    expected = np.linspace(0, 29, 16, dtype=int)

    sampled = sample_video(path, 16)

    assert sampled.frame_count == 30
    assert sampled.decoded > 30  # the seek path's frames, then the fallback's counting pass
    assert sampled.indices == tuple(expected.tolist())
    np.testing.assert_array_equal(sampled.frames, decode_every_frame(path)[expected])


def test_lmms_eval_read_video_returns_every_mkv_frame_where_we_return_f(videos):
    path = videos[".mkv", 120]
    assert len(read_video(str(path), num_frm=16)) == 120
    assert len(sample_video(path, 16).frames) == 16


def test_a_missing_file_names_the_path(video_dir):
    path = video_dir / "absent.mp4"
    with pytest.raises(VideoDecodeError, match="no such video file") as raised:
        sample_video(path, 8)
    assert str(path) in str(raised.value)


def test_random_bytes_named_mp4_name_the_path_and_leave_no_traceback_chain(video_dir):
    path = video_dir / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VideoDecodeError, match="cannot open") as raised:
        sample_video(path, 8)
    assert str(path) in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_an_audio_only_file_has_no_video_stream(video_dir):
    path = video_dir / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        samples.sample_rate = 8000
        for packet in [*stream.encode(samples), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match="no video stream") as raised:
        sample_video(path, 8)
    assert str(path) in str(raised.value)


def test_a_video_stream_without_frames_says_so(video_dir):
    path = video_dir / "empty.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoDecodeError, match="zero decodable frames") as raised:
        sample_video(path, 8)
    assert str(path) in str(raised.value)
