"""Sweep throughput at real model dimensions, random weights (nothing is downloaded; only the timings mean anything).

`group`: N methods over M synthetic videos, run cell-major (each method's cell decodes and encodes every video
itself, as a sweep without groups does) and sample-major (one decode and encoder pass per video serves every
method, as a sweep's group does: `dycoke_eval/groups.py`). Both run the evaluation wrapper's own per-sample
path (`CompressedVideoLM.generate_until`, journals included) with the encoder cache off, as it is in effect
for a real cell, whose videos evict it long before the next cell starts. Prints each mode's wall time and
encoder passes, the ratio, the mean seconds per stage, and whether both modes gave every method the same answers.

    python scripts/bench_sweep.py group                          # 5 methods, 2 videos, 4 frames, LLaVA-OV-0.5B
    python scripts/bench_sweep.py group --videos 4 --frames 8    # fastvid's c is capped at the frame count
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch

from dycoke_eval.config import instantiate_method
from dycoke_eval.encoder_cache import ENCODER_CACHE
from dycoke_eval.groups import ENCODER_PASSES, Companion
from dycoke_eval.offline.videos import write_video
from dycoke_eval.wrapper import CompressedVideoLM

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


def build_lm(args, method, journal: Path, companions=()) -> CompressedVideoLM:
    """The wrapper on the random-weight model (built once per process, then reused) with `method` and its journal."""
    return CompressedVideoLM(
        pretrained=PRETRAINED[args.architecture],
        frames=args.frames,
        method=method,
        device=args.device,
        random_weights_architecture=args.architecture,
        siglip_head=SIGLIP_HEAD,
        max_new_tokens=args.max_new_tokens,
        journal=str(journal),
        companions=companions,
    )


def run_mode(label: str, run, journals: Path) -> tuple[float, float, int]:
    """Wall and CPU seconds and encoder passes of `run()`; prints them with the mean seconds per stage of its answers.

    CPU seconds (this process's) are what a machine shared with other work changes least.
    """
    passes, cpu, start = ENCODER_PASSES.done, time.process_time(), time.perf_counter()
    run()
    seconds, cpu, passes = time.perf_counter() - start, time.process_time() - cpu, ENCODER_PASSES.done - passes
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
    ENCODER_CACHE.capacity_bytes = 0  # a real cell's videos evict the cache long before the next cell starts
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        videos = [write_video(root / "videos" / f"video{i}.mp4") for i in range(args.videos)]
        lm = build_lm(args, methods[0], root / "warm-up.jsonl")
        print(f"device={lm.device} dtype={lm.model.dtype} torch_threads={torch.get_num_threads()} "
              f"architecture={args.architecture} (random weights) frames={args.frames} "
              f"videos={args.videos} max_new_tokens={args.max_new_tokens}\nmethods: {', '.join(specs)}", flush=True)  # fmt: skip
        lm.generate_until(requests_for(lm, videos[:1], args.max_new_tokens))  # warm-up, untimed

        def cell_major():
            for index, method in enumerate(methods):
                cell = build_lm(args, method, root / "cell" / f"{index}.jsonl")
                cell.generate_until(requests_for(cell, videos, args.max_new_tokens))

        def sample_major():
            journals = [root / "sample" / f"{index}.jsonl" for index in range(len(methods))]
            companions = [Companion(method, str(journal)) for method, journal in zip(methods[1:], journals[1:], strict=True)]
            leader = build_lm(args, methods[0], journals[0], companions)
            leader.generate_until(requests_for(leader, videos, args.max_new_tokens))

        cell = run_mode("cell-major  ", cell_major, root / "cell")
        sample = run_mode("sample-major", sample_major, root / "sample")
        same = journal_answers(root / "cell") == journal_answers(root / "sample")
    print(f"sample-major takes {sample[0] / cell[0]:.0%} of the cell-major wall time ({sample[1] / cell[1]:.0%} of its CPU "
          f"time), {sample[2]} encoder passes against {cell[2]}; answers identical in both modes: {same}")  # fmt: skip


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
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
