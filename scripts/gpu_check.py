"""The checks only an accelerator can make, in one short run with torch, transformers and torchvision only.

    python scripts/gpu_check.py [--out DIR]                 # on a CUDA machine, about 2 minutes
    python scripts/gpu_check.py --device cpu --size tiny    # the smoke test anywhere

1. `preprocess_device=model` gives the CPU processor's pixels bit for bit on the device (HF's own `device=` path
   does not), at four frame sizes, and how long 32 frames of 1280 x 720 take each way.
2. `static_decoding=true`: a full-token generate of the random-weight model with transformers' static cache
   (compiled on CUDA) against the dynamic cache: the same greedy tokens, and ms per decoded token each way.
3. The field's newer methods before the LLM (VidCom2, ToMe, HoliTom, FlashVID) at LLaVA-OV-7B's size in bf16, on the
   device against the same inputs on the CPU, where the tests compare each bit for bit with its authors' code: the
   same kept grid positions and how far apart the kept features are (ties and sums can order differently on CUDA).

Prints one line per figure and, with `--out`, writes them to `gpu_check.json` there. Run `scripts/bench_gpu.py --gpu`
for the per-method timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaOnevisionVideoProcessor

from dycoke_eval.checkpoints import build_random_model
from dycoke_eval.compression.dispatcher import Compressor
from dycoke_eval.config import method_from_config
from dycoke_eval.models.base import EncodedVideo
from dycoke_eval.models.device_preprocess import DeviceVideoProcessor
from dycoke_eval.offline.real_size import random_encoded_video

FRAME_SIZES = [(240, 320), (480, 640), (360, 360), (383, 385)]
FIELD_METHODS = {"vidcom2": {}, "tome": {}, "holitom": {"in_llm": False}, "flashvid": {}}  # their pre-LLM stages


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def noise_frames(height: int, width: int, frames: int) -> np.ndarray:
    return np.random.default_rng(height * width).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def check_preprocessing(device: torch.device) -> dict:
    """Equality at each frame size, and the time of 32 frames of 1280 x 720 on the CPU and on the device."""
    processor = LlavaOnevisionVideoProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)  # the llava-hf checkpoints'
    on_device = DeviceVideoProcessor(processor, device)
    figures = {}
    for height, width in FRAME_SIZES:
        frames = noise_frames(height, width, 2)
        expected = processor(videos=[frames], return_tensors="pt")["pixel_values_videos"]
        pixels = on_device(torch.from_numpy(frames)).cpu()
        figures[f"{height}x{width}"] = {"equal": bool(torch.equal(pixels, expected)),
                                        "max_abs_diff": float((pixels - expected).abs().max())}  # fmt: skip
        print(f"preprocess {height}x{width} equal={figures[f'{height}x{width}']['equal']}", flush=True)
    frames = noise_frames(720, 1280, 32)
    cpu = _median_ms(lambda: processor(videos=[frames], return_tensors="pt"), torch.device("cpu"))
    pinned = torch.from_numpy(frames).pin_memory() if device.type == "cuda" else torch.from_numpy(frames)
    device_ms = _median_ms(lambda: on_device(pinned), device)
    print(f"preprocess 32x720p cpu_ms={cpu:.1f} device_ms={device_ms:.1f}", flush=True)
    return {"sizes": figures, "cpu_ms_32x720p": cpu, "device_ms_32x720p": device_ms}


def check_static_decoding(device: torch.device, size: str, new_tokens: int) -> dict:
    """Greedy full-token generation of a text prompt, dynamic cache against static (compiled on CUDA)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    adapter = build_random_model(size, dtype, str(device))
    prompt = adapter.tokenizer("Describe the video in detail. " * 40, return_tensors="pt")["input_ids"].to(device)
    figures = {}
    for cache in ("dynamic", "static"):
        settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
        if cache == "static":
            settings["cache_implementation"] = "static"
        with torch.inference_mode():
            adapter.model.generate(input_ids=prompt, **settings)  # compiles, for the static cache on CUDA
            synchronize(device)
            start = time.perf_counter()
            output = adapter.model.generate(input_ids=prompt, **settings)
            synchronize(device)
        figures[cache] = {"ms_per_token": (time.perf_counter() - start) * 1000 / new_tokens,
                          "tokens": output[0, prompt.shape[1]:].tolist()}  # fmt: skip
        print(f"decoding {size} {cache} ms_per_token={figures[cache]['ms_per_token']:.2f}", flush=True)
    figures["same_tokens"] = figures["static"]["tokens"] == figures["dynamic"]["tokens"]
    print(f"decoding {size} same_tokens={figures['same_tokens']}", flush=True)
    return figures


def check_field_methods(device: torch.device) -> dict:
    """Each method's pre-LLM selection on the device against the CPU's, on one LLaVA-OV-7B-sized bf16 video."""
    video = random_encoded_video("ov", torch.bfloat16, "cpu")
    moved = EncodedVideo(video.grid.to(device), video.layout, video.newline.to(device),
                         {name: signal.to(device) for name, signal in video.signals.items()})  # fmt: skip
    figures = {}
    for name, settings in FIELD_METHODS.items():
        method = method_from_config(name, settings)
        cpu, here = (Compressor(None, method).select(v, "gpu_check").tokens for v in (video, moved))
        same = cpu.index.shape == here.index.shape and bool(torch.equal(cpu.index, here.index.cpu()))
        gap = float((cpu.features.float() - here.features.cpu().float()).abs().max()) if same else None
        figures[name] = {"same_positions": same, "kept": int(here.index.numel()), "max_abs_diff": gap}
        print(f"field {name} same_positions={same} kept={here.index.numel()} max_abs_diff={gap}", flush=True)
    return figures


def _median_ms(call, device: torch.device, repeats: int = 5) -> float:
    call()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="0.5b", help="architecture of the decoding check (tiny, 0.5b, 7b)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "preprocess": check_preprocessing(device),
        "static_decoding": check_static_decoding(device, args.size, args.new_tokens),
        "field_methods": check_field_methods(device),
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
