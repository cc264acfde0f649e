"""Speed of the compression methods at LLaVA-OV-0.5B language-model dimensions, random weights.

Prints the TTM time for F x 196 x 896 features, the cost of DyCoke's per-step selection against a
full decode step, and, per method, prefill time and per-token decode time as ratios to `full`,
beside the FLOPs ratio of eq. 8 (docs/flops.md). Nothing is downloaded: the language model is
built from its dimensions with random weights, and the video features are random, so only the
timings mean anything. Every method runs through the same model adapter and dispatcher
(`Compressor`) as the evaluation wrapper.

PruMerge's token count is adaptive and comes from the vision encoder's attention, which random
features do not have. It is timed here at the paper's reported 55% of the visual tokens (its
LLM cost depends only on that count).

    python scripts/bench_methods.py                 # 32 frames (use a GPU: CPU prefill is slow)
    python scripts/bench_methods.py --frames 8      # CPU-sized
    python scripts/bench_methods.py --ttm-only      # TTM alone, eager and torch.compile'd
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.utils.benchmark as benchmark
from transformers import LogitsProcessorList, SiglipVisionConfig

from dycoke_eval.accounting import planned_flops
from dycoke_eval.checkpoints import resolve_device, resolve_dtype
from dycoke_eval.compression.dispatcher import Compressor
from dycoke_eval.compression.stages import CompressionMethod, PlannedCounts, PreLLMStage, VideoTokens
from dycoke_eval.methods.dycoke import DyCoke
from dycoke_eval.methods.fastv import FastV
from dycoke_eval.methods.full import Full
from dycoke_eval.methods.kv_selection import DynamicSelector, last_query_attention
from dycoke_eval.methods.ttm import ttm_keep_indices
from dycoke_eval.models import EncodedVideo
from dycoke_eval.models.llava_onevision import LlavaOneVisionAdapter
from dycoke_eval.offline.architectures import architecture_config
from dycoke_eval.timing import StepClock

PROMPT_TEXT_TOKENS = 40
PRUMERGE_PAPER_RATIO = 0.55


@dataclass
class EvenlySpread(PreLLMStage):
    """Stands in for PruMerge's token choice: an evenly spread `fraction` of the visual tokens."""

    fraction: float = PRUMERGE_PAPER_RATIO
    name: str = "prumerge@55%"

    def select(self, tokens: VideoTokens, signals, sample: str) -> VideoTokens:
        count = tokens.features.shape[0]
        return tokens.keep(torch.linspace(0, count - 1, int(count * self.fraction)).long())

    def planned_tokens(self, counts: PlannedCounts) -> float:
        return counts.layout.grid_tokens * self.fraction


def build_adapter(device: str, dtype: torch.dtype) -> LlavaOneVisionAdapter:
    """LLaVA-OV-0.5B's language model with random weights and a token vision tower (features are fed directly)."""
    config = architecture_config("0.5b")
    config.vision_config = SiglipVisionConfig(
        image_size=384, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    return LlavaOneVisionAdapter.from_config(config, None, device=device, dtype=dtype, attn_implementation="sdpa")


def time_generation(run, repeats: int, device: str) -> tuple[float, float]:
    """Median prefill seconds and median seconds per decode step over `repeats` runs after a warm-up."""
    prefills, steps = [], []
    for attempt in range(repeats + 1):
        clock = StepClock(device)
        clock.sync()
        start = time.perf_counter()
        run(clock)
        if attempt:  # the first run warms up
            prefills.append(clock.stamps[0] - start)
            steps += clock.decode_steps()
    return statistics.median(prefills), statistics.median(steps)


def median_seconds(statement: str, **names) -> float:
    """Median time of `statement` with torch's usual thread count (torch's Timer defaults to one thread)."""
    timer = benchmark.Timer(statement, globals=names, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=1).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens decoded to time a decode step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--ttm-only", action="store_true", help="print the TTM figures and stop")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    adapter = build_adapter(device, dtype)
    dims, layout = adapter.dims(), adapter.layout(args.frames)
    torch.manual_seed(0)

    print(f"device={device} dtype={dtype} torch_threads={torch.get_num_threads()} frames={args.frames}")
    ttm_input = torch.randn(32, layout.tokens_per_frame, dims.hidden, device=device)
    for compiled in (False, True):
        start = time.perf_counter()
        ttm_keep_indices(ttm_input, 0.7, compiled=compiled)
        first = time.perf_counter() - start
        ttm = median_seconds("ttm(x, 0.7, compiled=compiled)", ttm=ttm_keep_indices, x=ttm_input, compiled=compiled)
        print(f"TTM (paper mode, K=0.7, compiled={compiled}) on 32x196x896 fp32: median {ttm * 1e3:.3f} ms "
              f"(first call {first:.2f} s)")  # fmt: skip
    if args.ttm_only:
        return

    grid = torch.randn(args.frames, layout.tokens_per_frame, dims.hidden, device=device, dtype=dtype)
    encoded = EncodedVideo(grid=grid, layout=layout, newline=torch.randn(dims.hidden, device=device, dtype=dtype))
    model = adapter.model
    text = torch.randint(0, model.config.text_config.vocab_size - 2, (PROMPT_TEXT_TOKENS,))
    prompt = torch.cat([text[:10], torch.tensor([model.config.video_token_id]), text[10:]])
    decode = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}

    methods: list[tuple[str, CompressionMethod]] = [("full", Full())]
    methods += [(f"dycoke K={k}", DyCoke(k=k, l=3, p=0.7)) for k in (0.3, 0.5, 0.7)]
    methods += [("fastv K=5 R=35%", FastV(layer=5, ratio=0.35)), ("prumerge@55%", EvenlySpread())]

    rows = []
    for label, method in methods:
        compressor = Compressor(adapter, method)
        kept = compressor.select(encoded).tokens
        visual, _ = adapter.assemble(encoded, kept.features, kept.index, kept.frame_newlines)
        flops = planned_flops(method, dims, layout)[0]

        def run(clock, compressor=compressor, visual=visual):
            inputs = adapter.generation_inputs(prompt, visual, None, layout.full_tokens)
            settings = {**decode, "max_new_tokens": 1 + args.decode_tokens, "logits_processor": LogitsProcessorList([clock])}
            with torch.inference_mode(), compressor.generating(inputs):
                return model.generate(**inputs.kwargs, **settings)

        prefill, step = time_generation(run, args.repeats, device)
        rows.append((label, visual.shape[0], prefill, step, flops))
        print(f"  measured {label}: {visual.shape[0]} visual tokens, prefill {prefill:.3f} s", flush=True)

    full_prefill, full_step, full_flops = rows[0][2], rows[0][3], rows[0][4]
    row = "{:18s} {:>7} {:>10} {:>6} {:>14} {:>6} {:>11}"
    print("\n" + row.format("method", "visual", "prefill s", "ratio", "decode ms/tok", "ratio", "FLOPs ratio"))
    for label, tokens, prefill, step, flops in rows:
        ratios = (prefill / full_prefill, step / full_step, flops / full_flops)
        print(
            row.format(
                label, tokens, f"{prefill:.3f}", f"{ratios[0]:.2f}", f"{step * 1e3:.2f}", f"{ratios[1]:.2f}", f"{ratios[2]:.2f}"
            )
        )

    kept = len(ttm_keep_indices(grid[:, :, :1].float(), 0.7)) + 1 + PROMPT_TEXT_TOKENS
    query = torch.randn(1, 14, 1, 64, device=device, dtype=dtype)
    key = torch.randn(1, 2, kept, 64, device=device, dtype=dtype)
    selector = DynamicSelector(keep_ratio=0.3, threshold=1.1)  # threshold > 1: re-select every step (worst case)
    span = slice(11, 11 + kept - 1 - PROMPT_TEXT_TOKENS)
    selection = median_seconds(
        "s.step(attn(q, k, 0.125, None)[span])", s=selector, attn=last_query_attention, q=query, k=key, span=span
    )
    print(f"\nDyCoke per-step selection (K=0.7, {kept} cached tokens, re-selecting every step): {selection * 1e3:.3f} ms "
          f"= {selection / full_step:.1%} of a full decode step ({full_step * 1e3:.2f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
