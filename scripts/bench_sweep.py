"""Sweep throughput at real dimensions with random weights (SigLIP-so400m, Qwen2 0.5B): figures for the README.

`prefetch`: samples per second of the evaluation wrapper (`CompressedVideoLM.generate_until`, the
path every cell runs) over decode-heavy videos (synthetic 1280x720, 60 s, 30 fps H.264 mp4s, x264's
`veryfast` preset with its default keyframe placement, written once into `--video-dir`), with the videos decoded inline
(`prefetch_depth=0`) and decoded and preprocessed in background threads while the model computes.
The encoder cache is off, so every sample decodes and encodes its video. Each sample's mean stage
times are printed beside: `video_decode` and `preprocess` as their worker took them, `video_wait`
as the model waited for them. Random weights: the answers are meaningless, the times are not.

    python scripts/bench_sweep.py prefetch                      # 6 videos, 4 frames, CPU: a few minutes
    python scripts/bench_sweep.py prefetch --videos 8 --frames 8 --depths 0 1 2 --workers 1 2
"""

from __future__ import annotations

import argparse
import platform
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import numpy as np
import torch

WIDTH, HEIGHT, FPS = 1280, 720, 30
QUESTION = "What happens in the video? Answer with the option's letter. A. nothing B. a square moves"


def write_decode_heavy_video(path: Path, seconds: int, seed: int) -> Path:
    """A 1280x720 H.264 mp4 at 30 fps: a textured background panning under a moving square (high bitrate, so decoding costs).

    Frames are made one at a time; the whole video is never in memory. x264 places keyframes (up to 250 frames apart).
    """
    import av

    rng = np.random.default_rng(zlib.crc32(f"{path.stem}-{seed}".encode()))
    texture = rng.integers(0, 256, size=(HEIGHT, WIDTH * 2, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.mp4")
    with av.open(str(partial), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for t in range(seconds * FPS):
            frame = np.ascontiguousarray(texture[:, (4 * t) % WIDTH : (4 * t) % WIDTH + WIDTH])
            x, y = (7 * t) % (WIDTH - 120), HEIGHT // 2 + int(200 * np.sin(t / 20)) - 60
            frame[y : y + 120, x : x + 120] = (255, 64, 32)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return partial.replace(path)


def decode_heavy_videos(folder: Path, count: int, seconds: int) -> list[str]:
    """`count` videos in `folder`, written once (about 30 s each on two cores) and reused by later runs."""
    paths = []
    for index in range(count):
        path = folder / f"pan-{WIDTH}x{HEIGHT}-{seconds}s-{index}.mp4"
        if not path.exists():
            print(f"writing {path} ...", flush=True)
            write_decode_heavy_video(path, seconds, index)
        paths.append(str(path))
    return paths


@dataclass
class Request:
    """An lmms-eval generate_until Instance as the wrapper reads it: only `.args`."""

    args: tuple


def video_requests(lm, paths: list[str], max_new_tokens: int, task: str) -> list[Request]:
    """One question per video, the videos registered as the task's documents on `lm`."""
    lm.task_dict = {task: {"test": {index: {"path": path} for index, path in enumerate(paths)}}}
    gen_kwargs = {"max_new_tokens": max_new_tokens, "temperature": 0}
    return [Request((QUESTION, dict(gen_kwargs), lambda doc: [doc["path"]], i, task, "test")) for i in range(len(paths))]


def run_prefetch(args: argparse.Namespace) -> None:
    from dycoke_eval.checkpoints import resolve_device, resolve_dtype
    from dycoke_eval.encoder_cache import ENCODER_CACHE
    from dycoke_eval.wrapper import CompressedVideoLM

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    paths = decode_heavy_videos(Path(args.video_dir).expanduser(), args.videos, args.video_seconds)
    ENCODER_CACHE.capacity_bytes = 0  # every sample decodes and encodes its video
    settings = [(0, 1)] + [(depth, workers) for depth in args.depths if depth for workers in args.workers]

    def wrapper(depth: int, workers: int):
        return CompressedVideoLM(
            pretrained=f"random-{args.size}",
            random_weights_architecture=args.size,
            frames=args.frames,
            device=device,
            dtype=dtype,
            max_new_tokens=args.max_new_tokens,
            prefetch_depth=depth,
            prefetch_workers=workers,
        )

    warm = wrapper(0, 1)  # loads the model once (kept by the process) and pays the first pass's start-up costs
    warm.generate_until(video_requests(warm, paths[:1], args.max_new_tokens, "warm-up"))
    print(
        f"device={device} dtype={dtype} torch={torch.__version__} transformers={_version('transformers')} "
        f"av={_version('av')} python={platform.python_version()} cpu_cores={_cores()} torch_threads={torch.get_num_threads()}"
    )
    print(
        f"model: SigLIP-so400m + Qwen2 {args.size}, RANDOM weights; {args.videos} videos of {WIDTH}x{HEIGHT}, "
        f"{args.video_seconds} s at {FPS} fps; {args.frames} frames per video; {args.max_new_tokens} new tokens per answer"
    )
    overlap_check(warm, paths[0])
    row = "{:>6} {:>8} {:>9} {:>9} {:>9} {:>11} {:>10} {:>10} {:>9} {:>8}"
    print(
        row.format(
            "depth", "workers", "wall s", "samples/s", "decode s", "preprocess s", "wait s", "encoder s", "generate s", "gain"
        )
    )
    baseline = None
    for _ in range(args.repeats):
        for depth, workers in settings:
            lm = wrapper(depth, workers)
            requests = video_requests(lm, paths, args.max_new_tokens, f"bench-{depth}-{workers}")
            started = time.perf_counter()
            lm.generate_until(requests)
            wall = time.perf_counter() - started
            records = lm.sample_records
            assert all(record.status == "ok" for record in records), [record.error for record in records]
            rate = len(records) / wall
            baseline = rate if depth == 0 else baseline
            stage = {name: mean(record.seconds[name] for record in records) for name in records[0].seconds}
            figures = [f"{wall:.1f}", f"{rate:.3f}", *(f"{stage[name]:.2f}" for name in STAGES), f"{rate / baseline:.2f}x"]
            print(row.format(depth, workers if depth else "-", *figures), flush=True)


STAGES = ("video_decode", "preprocess", "video_wait", "vision_encoder", "generate")


def overlap_check(lm, path: str) -> None:
    """Whether a prefetch thread's decode and preprocess run beside the caller's torch compute, not in turns under the GIL.

    The caller runs matrix products on one torch thread, for about as long as the video takes to prepare alone,
    so a core is left for the prefetch thread: overlapped, both together take about the longer of the two; in
    turns, their sum.
    """
    from dycoke_eval.prefetch import Prefetcher
    from dycoke_eval.wrapper import prepare_video

    def prepare(video: str):
        return prepare_video(video, lm.frames, lm.adapter.preprocess)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        prepare(path)
        alone = time.perf_counter() - started
        left, right = torch.randn(1024, 1024), torch.randn(1024, 1024)
        started = time.perf_counter()
        left @ right
        products = max(1, round(alone / (time.perf_counter() - started)))
        started = time.perf_counter()
        for _ in range(products):
            left @ right
        compute = time.perf_counter() - started
        started = time.perf_counter()
        with Prefetcher([path], prepare, depth=1) as ahead:
            ((_, future),) = ahead
            for _ in range(products):
                left @ right
            future.result()
        together = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    print(
        f"overlap check: decode+preprocess {alone:.2f} s alone, torch compute (1 thread) {compute:.2f} s alone; "
        f"together {together:.2f} s (in turns: {alone + compute:.2f} s, overlapped: {max(alone, compute):.2f} s)"
    )


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prefetch = commands.add_parser("prefetch", help="samples per second with and without prefetch on decode-heavy videos")
    prefetch.add_argument("--videos", type=int, default=6, help="videos (one sample each)")
    prefetch.add_argument("--video-seconds", type=int, default=60)
    prefetch.add_argument("--video-dir", default="~/.cache/dycoke-eval/bench-videos", help="where the videos are written once")
    prefetch.add_argument("--frames", type=int, default=4)
    prefetch.add_argument("--max-new-tokens", type=int, default=4)
    prefetch.add_argument("--depths", type=int, nargs="+", default=[2], help="prefetch depths to time beside 0 (inline)")
    prefetch.add_argument("--workers", type=int, nargs="+", default=[1], help="prefetch worker counts to time")
    prefetch.add_argument("--repeats", type=int, default=1, help="passes over all settings (alternating, against drift)")
    prefetch.add_argument("--size", default="0.5b", choices=["0.5b", "7b"])
    prefetch.add_argument("--device", default="auto")
    prefetch.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    prefetch.set_defaults(run=run_prefetch)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
