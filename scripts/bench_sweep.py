"""Sweep throughput at real model dimensions, random weights (nothing is downloaded; only the timings mean anything).

`group`: N methods over M synthetic videos, run cell-major (each method's cell decodes and encodes every video
itself, as a sweep without groups does) and sample-major (one decode and encoder pass per video serves every
method, as a sweep's group does: `dycoke_eval/groups.py`). Both run the evaluation wrapper's own per-sample
path (`CompressedVideoLM.generate_until`, journals included) with the encoder cache off, as it is in effect
for a real cell, whose videos evict it long before the next cell starts. Prints each mode's wall time and
encoder passes, the ratio, the mean seconds per stage, and whether both modes gave every method the same answers.

    python scripts/bench_sweep.py group                          # 5 methods, 2 videos, 4 frames, LLaVA-OV-0.5B
    python scripts/bench_sweep.py group --videos 4 --frames 8    # fastvid's c is capped at the frame count

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
import json
import platform
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import numpy as np
import torch

from dycoke_eval.checkpoints import CheckpointLoader
from dycoke_eval.config import instantiate_method
from dycoke_eval.offline.videos import write_video
from dycoke_eval.wrapper import Companion, CompressedVideoLM

PRETRAINED = {
    "0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "tiny": "tiny",
}  # tiny: a quick check of the script
SIGLIP_HEAD = "google/siglip-so400m-patch14-384"  # with random weights the head is random too: nothing is read
QUESTION = "Which action does the person perform?\nA. open\nB. close\nC. push\nD. pull\nAnswer with the option's letter."
GROUP_METHODS = ("full", "dycoke:k=0.5", "fastv", "prumerge", "fastvid:retention=0.25")


@dataclass
class Request:
    """What the wrapper reads of an lmms-eval generate_until request: `.args`."""

    args: tuple


def method_from(spec: str, frames: int):
    """`name:key=value,...` -> the method from its config with those settings (fastvid's `c` at most `frames`)."""
    name, _, settings = spec.partition(":")
    overrides = {f"method.{key}": value for key, value in (item.split("=", 1) for item in settings.split(",") if item)}
    if name == "fastvid":
        overrides.setdefault("method.c", min(8, frames))  # DySeg makes at least c segments
    return instantiate_method(name, overrides)


def requests_for(lm: CompressedVideoLM, videos: list[Path], max_new_tokens: int) -> list[Request]:
    """One question per video, as an lmms-eval task's requests (greedy, `max_new_tokens` new tokens)."""
    lm.task_dict = {"bench": {"test": {i: {"video": str(path)} for i, path in enumerate(videos)}}}
    settings = {"max_new_tokens": max_new_tokens, "temperature": 0, "until": ["\n\n\n\n"]}
    return [Request((QUESTION, dict(settings), lambda doc: [doc["video"]], i, "bench", "test")) for i in range(len(videos))]


def build_lm(args, checkpoints: CheckpointLoader, method, journal: Path, companions=()) -> CompressedVideoLM:
    """The wrapper on the random-weight model (built once by `checkpoints`, then reused) with `method` and its journal.

    The encoder cache is off, as it is in effect for a real cell, whose videos evict it long before the next cell starts.
    """
    lm = CompressedVideoLM(
        pretrained=PRETRAINED[args.architecture],
        frames=args.frames,
        method=method,
        device=args.device,
        random_weights_architecture=args.architecture,
        siglip_head=SIGLIP_HEAD,
        max_new_tokens=args.max_new_tokens,
        journal=str(journal),
        companions=companions,
        checkpoints=checkpoints,
    )
    lm.encoder_cache.capacity_bytes = 0
    return lm


def run_mode(label: str, run, journals: Path) -> tuple[float, float, int]:
    """Wall and CPU seconds and encoder passes of `run()` (which returns its wrappers); prints them with the mean seconds
    per stage of its answers.

    CPU seconds (this process's) are what a machine shared with other work changes least.
    """
    cpu, start = time.process_time(), time.perf_counter()
    wrappers = run()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    passes = sum(lm.encoder_passes.done for lm in wrappers)
    records = [
        entry["record"] for path in sorted(journals.glob("*.jsonl")) for entry in map(json.loads, path.read_text().splitlines())
    ]
    print(f"  {label}: {seconds:.1f} s wall, {cpu:.1f} s CPU, {passes} encoder passes for {len(records)} answers; "
          f"per answer: {stage_means(records)}", flush=True)  # fmt: skip
    return seconds, cpu, passes


def stage_means(records: list[dict]) -> str:
    """Mean seconds per pipeline stage over the answers (a stage an answer did not run counts as 0)."""
    stages = ("video_decode", "preprocess", "vision_encoder", "compress", "generate")
    return ", ".join(f"{stage} {mean(r['seconds'].get(stage, 0.0) for r in records):.2f} s" for stage in stages)


def journal_answers(folder: Path) -> dict[str, list[str]]:
    """Per journal (one per method): its answers in request order."""
    return {
        path.stem: [json.loads(line)["answer"] for line in path.read_text().splitlines()]
        for path in sorted(folder.glob("*.jsonl"))
    }


def bench_group(args) -> None:
    specs = list(args.methods)
    methods = [method_from(spec, args.frames) for spec in specs]
    checkpoints = CheckpointLoader()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        videos = [write_video(root / "videos" / f"video{i}.mp4") for i in range(args.videos)]
        lm = build_lm(args, checkpoints, methods[0], root / "warm-up.jsonl")
        print(f"device={lm.device} dtype={lm.model.dtype} torch_threads={torch.get_num_threads()} "
              f"architecture={args.architecture} (random weights) frames={args.frames} "
              f"videos={args.videos} max_new_tokens={args.max_new_tokens}\nmethods: {', '.join(specs)}", flush=True)  # fmt: skip
        lm.generate_until(requests_for(lm, videos[:1], args.max_new_tokens))  # warm-up, untimed

        def cell_major():
            cells = []
            for index, method in enumerate(methods):
                cells.append(cell := build_lm(args, checkpoints, method, root / "cell" / f"{index}.jsonl"))
                cell.generate_until(requests_for(cell, videos, args.max_new_tokens))
            return cells

        def sample_major():
            journals = [root / "sample" / f"{index}.jsonl" for index in range(len(methods))]
            companions = [Companion(method, str(journal)) for method, journal in zip(methods[1:], journals[1:], strict=True)]
            leader = build_lm(args, checkpoints, methods[0], journals[0], companions)
            leader.generate_until(requests_for(leader, videos, args.max_new_tokens))
            return [leader]

        cell = run_mode("cell-major  ", cell_major, root / "cell")
        sample = run_mode("sample-major", sample_major, root / "sample")
        same = journal_answers(root / "cell") == journal_answers(root / "sample")
    print(f"sample-major takes {sample[0] / cell[0]:.0%} of the cell-major wall time ({sample[1] / cell[1]:.0%} of its CPU "
          f"time), {sample[2]} encoder passes against {cell[2]}; answers identical in both modes: {same}")  # fmt: skip


WIDTH, HEIGHT, FPS = 1280, 720, 30
PREFETCH_QUESTION = "What happens in the video? Answer with the option's letter. A. nothing B. a square moves"


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


def video_requests(lm, paths: list[str], max_new_tokens: int, task: str) -> list[Request]:
    """One question per video, the videos registered as the task's documents on `lm`."""
    lm.task_dict = {task: {"test": {index: {"path": path} for index, path in enumerate(paths)}}}
    gen_kwargs = {"max_new_tokens": max_new_tokens, "temperature": 0}
    return [Request((PREFETCH_QUESTION, dict(gen_kwargs), lambda doc: [doc["path"]], i, task, "test")) for i in range(len(paths))]


def run_prefetch(args: argparse.Namespace) -> None:
    from dycoke_eval.checkpoints import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    paths = decode_heavy_videos(Path(args.video_dir).expanduser(), args.videos, args.video_seconds)
    settings = [(0, 1)] + [(depth, workers) for depth in args.depths if depth for workers in args.workers]
    checkpoints = CheckpointLoader()

    def wrapper(depth: int, workers: int):
        lm = CompressedVideoLM(
            pretrained=f"random-{args.size}",
            random_weights_architecture=args.size,
            frames=args.frames,
            device=device,
            dtype=dtype,
            max_new_tokens=args.max_new_tokens,
            prefetch_depth=depth,
            prefetch_workers=workers,
            checkpoints=checkpoints,
        )
        lm.encoder_cache.capacity_bytes = 0  # every sample decodes and encodes its video
        return lm

    warm = wrapper(0, 1)  # loads the model once (kept by `checkpoints`) and pays the first pass's start-up costs
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
    group = commands.add_parser("group", help="a sample-major group against its cells run one by one")
    group.add_argument(
        "--methods", nargs="+", default=list(GROUP_METHODS), help="name or name:key=value,... (default: %(default)s)"
    )
    group.add_argument("--videos", type=int, default=2)
    group.add_argument("--frames", type=int, default=4)
    group.add_argument("--max-new-tokens", type=int, default=8, help="random weights never stop early: every answer is this long")
    group.add_argument("--architecture", choices=sorted(PRETRAINED), default="0.5b")
    group.add_argument("--device", default="auto")
    group.set_defaults(run=bench_group)
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
