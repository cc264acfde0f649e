"""What each method costs an accelerator: kernel launches and host syncs counted on any machine, and times on a GPU.

    python scripts/bench_gpu.py --cpu-counts [--layouts ov video] [--methods dycoke fastv]
    python scripts/bench_gpu.py --gpu [--size 7b|0.5b] [--repeats 3] [--new-tokens 32] [--out perf.json]

`--cpu-counts` counts aten ops (a kernel launch each on a GPU) and host syncs (points where the host waits for the
device: a value read, a data-dependent output size) with `plumbing.counting.count_ops`. First each method's
selection before the LLM (`Compressor.select`, as the evaluation wrapper calls it), once to warm up and once
counted, on random video tokens and encoder signals at LLaVA-OneVision-7B's size (32 x 196 x 3584, `ov`) and
LLaVA-Video-7B's (64 x 169 x 3584, `video`):

    counts <layout> <method> pre_llm ops=N syncs=M [syncing ops]

Then full tokens, each method that acts in the LLM and FastVID (for the pre-LLM-only ones) on one sample through
the random-weight `tiny` LLaVA-OneVision (32 frames of 4 x 4 tokens, 8 decoder layers), after a warm-up sample.
Ops grow with depth (a 7B has 28 layers); syncs do not. `generate` takes 4 new tokens:

    counts tiny <method> prefill ops=N syncs=M [syncing ops]        from `generate`'s call to the first token
    counts tiny <method> decode_step ops=N syncs=M [syncing ops]    the last step, a steady one
    counts tiny <method> reselection ops=N syncs=M bytes_to_host=B [syncing ops]

`reselection` (DyCoke) is a decode step that re-selects its kept tokens, forced by a threshold no cosine reaches;
`bytes_to_host` are the pruned cache entries it leaves on the CPU (the dispatcher's `kv_held_aside_bytes`, since
on a CPU a copy to the host is no op to count): none unless `offload_pruned`.

`--gpu` times each method on one sample through a random-weight LLaVA-OneVision (`--size 7b`, `0.5b`, or `tiny`
for a smoke test) built on the device in bf16 (`--dtype auto`; fp32 on a CPU), fed random pixels at the real
frame count (32 frames of 384 x 384, already on the device: no video decoding) and a paper-form question, the
steps the evaluation wrapper takes. One warm-up sample, then `--repeats` timed ones, the device synchronized
at each step's end; medians, and the peak memory (weights included) of the worst sample:

    timed <size> <method> encoder_ms=.. pre_llm_ms=.. prefill_ms=.. decode_ms_per_token=.. sample_ms=.. \
        visual_tokens=.. prompt_tokens=.. retained_ratio=.. peak_allocated_gb=.. peak_reserved_gb=.. (CPU: peak_rss_gb)

`prefill_ms` runs from `generate`'s call to the first token, `decode_ms_per_token` is the median of the later
steps (every sample decodes `--new-tokens`: no end-of-sequence stop), `sample_ms` runs from the pixels to the last
token, `visual_tokens` enter the LLM (`prompt_tokens` with the question, by the offline tokenizer), and
`retained_ratio` also counts what prefill and decode stages drop. With `--out` the figures go to JSON with the
device, versions, git commit, date and settings (as `results/baselines/perf.json`). Random weights make accuracy
meaningless, not times or memory.

Only torch, transformers and dycoke_eval's core are imported (not lmms-eval, Hydra, OmegaConf or PyAV): methods are
built from their `conf/method/<name>.yaml` by `method_from_config`, without Hydra.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList

from dycoke_eval.checkpoints import build_random_model, resolve_device, resolve_dtype
from dycoke_eval.compression.dispatcher import Compressor, GenerationFigures
from dycoke_eval.compression.stages import CompressionMethod
from dycoke_eval.config import ConfigError, method_from_config
from dycoke_eval.methods.dynamic_pruning import DynamicKVPruning
from dycoke_eval.models import ModelAdapter
from dycoke_eval.offline.real_size import SIZES, random_encoded_video, size_model_info
from dycoke_eval.plumbing.counting import OpCounts, count_ops
from dycoke_eval.provenance import git_state, hardware
from dycoke_eval.timing import peak_memory, reset_peak_memory

Methods = dict[str, tuple[str, dict[str, Any]]]  # label -> (config, settings over the config's)

PRE_LLM_METHODS: Methods = {  # every method with a stage before the LLM
    "dycoke K=0.7": ("dycoke", {"k": 0.7}),
    "dycoke_ttm K=0.9": ("dycoke_ttm", {"k": 0.9}),
    "prumerge": ("prumerge", {}),
    "prumerge_official": ("prumerge_official", {}),
    "fastvid R=25%": ("fastvid", {"retention": 0.25}),
    "visionzip after_pooling R=25%": ("visionzip", {"form": "after_pooling", "retention": 0.25}),
    "visionzip in_encoder R=25%": ("visionzip", {"form": "in_encoder", "retention": 0.25}),
    "prunevid": ("prunevid", {}),
    "random": ("random", {}),
    "pooling": ("pooling", {}),
    "vidcom2 R=25%": ("vidcom2", {"retention": 0.25}),
    "holitom R=25%": ("holitom", {"retention": 0.25, "in_llm": False}),
    "flashvid R=25%": ("flashvid", {"retention_ratio": 0.25}),
    "tome R=25%": ("tome", {"retention": 0.25}),
}
IN_LLM_METHODS: Methods = {  # the reference, every method acting in prefill or decode, and one acting before the LLM
    "full": ("full", {}),
    "dycoke K=0.7": ("dycoke", {"k": 0.7}),
    "dycoke K=0.7 official": ("dycoke", {"k": 0.7, "mode": "official"}),
    "dycoke K=0.7 offload_pruned": ("dycoke", {"k": 0.7, "offload_pruned": True}),
    "fastv K=5 R=35%": ("fastv", {}),
    "prunevid in_llm selected_layer=5": ("prunevid", {"in_llm": True, "selected_layer": 5}),  # tiny has 8 layers
    "fastvid R=25%": ("fastvid", {"retention": 0.25}),
    "holitom M merge_layer=5": ("holitom", {"retention": 0.25, "merge_layer": 5}),  # the release's 18 on 28 layers
    "flashvid pruning_layer=5": ("flashvid", {"retention_ratio": 0.25, "pruning_layer": 5}),  # the release's 20
    "framefusion cost=0.3": ("framefusion", {}),
}
TIMED_METHODS: Methods = {
    "full": ("full", {}),
    "dycoke K=0.7": ("dycoke", {"k": 0.7}),
    "dycoke K=0.7 official": ("dycoke", {"k": 0.7, "mode": "official"}),
    "fastv K=5 R=35%": ("fastv", {}),
    "fastvid R=25%": ("fastvid", {"retention": 0.25}),
    "visionzip R=25%": ("visionzip", {"retention": 0.25}),
    "prunevid": ("prunevid", {}),
    "prunevid in_llm": ("prunevid", {"in_llm": True}),
    "prumerge": ("prumerge", {}),
    "random": ("random", {}),
    "pooling": ("pooling", {}),
    "holitom R=25%": ("holitom", {"retention": 0.25}),
    "vidcom2 R=25%": ("vidcom2", {"retention": 0.25}),
    "flashvid R=25%": ("flashvid", {"retention_ratio": 0.25}),
    "framefusion cost=0.3": ("framefusion", {}),
    "tome R=25%": ("tome", {"retention": 0.25}),
}
COUNT_MODEL = "tiny"
COUNT_NEW_TOKENS = 4  # prefill's token, a first decode step (DyCoke's first selection), then steady steps
FORCED_RESELECTION = 1.1  # a threshold above any cosine: DyCoke re-selects at every decode step
ATTENTION = "sdpa"  # the kernel every method can route through (on a GPU, SDPA picks a flash kernel itself)
QUESTION = "What happens in the video? Answer in one sentence."
RANDOM_POOLING_HEAD = "random"  # any name: a random-weight model gets a random SigLIP pooling head (FastVID's signals)


def chosen(methods: Methods, configs: list[str] | None) -> Methods:
    """The methods whose config is among `configs` (None: all)."""
    return {label: spec for label, spec in methods.items() if not configs or spec[0] in configs}


def count_line(where: str, label: str, phase: str, counts: OpCounts, extra: str = "") -> str:
    which = " ".join(f"{op}:{count}" for op, count in sorted(counts.syncing.items()))
    return " ".join(part for part in (f"counts {where} {label.replace(' ', '_')} {phase}",
                                      f"ops={counts.ops} syncs={counts.syncs}", extra, which) if part)  # fmt: skip


def pre_llm_counts(size: str, method: CompressionMethod) -> OpCounts:
    """Ops and syncs of one video's selection before the LLM, after a warm-up call."""
    encoded = random_encoded_video(size)
    compressor = Compressor(None, method)
    with torch.inference_mode():
        compressor.select(encoded, "counts")
        with count_ops() as counted:
            compressor.select(encoded, "counts")
    return counted.counts


@dataclass
class BenchModel:
    """A random-weight model, one video's random pixels (on the device) and one question's prompt."""

    size: str
    adapter: ModelAdapter
    pixels: torch.Tensor  # [1, frames, 3, side, side], as the adapter's `preprocess` gives them
    prompt_ids: torch.Tensor

    @classmethod
    def build(cls, size: str, frames: int, dtype: torch.dtype, device: str) -> BenchModel:
        adapter = build_random_model(size, dtype, device, ATTENTION, siglip_head=RANDOM_POOLING_HEAD)
        side = adapter.config.vision_config.image_size
        pixels = torch.rand(1, frames, 3, side, side, device=device, generator=torch.Generator(device).manual_seed(0))
        prompt_ids = adapter.tokenizer(adapter.render_prompt("paper", QUESTION), return_tensors="pt")["input_ids"][0]
        return cls(size, adapter, pixels * 2 - 1, prompt_ids)

    def compressor(self, method: CompressionMethod) -> Compressor:
        """The method checked against this model (a ConfigError if it cannot run on it), its encoder signals ready,
        as the evaluation wrapper sets a method up."""
        method.validate_for(self.adapter.loaded_info())
        self.adapter.prepare(method.signals())
        return Compressor(self.adapter, method)


class _EachToken(LogitsProcessor):
    """Takes a reading as each new token's logits are ready: the first when prefill ends, then one per decode step."""

    def __init__(self, read: Callable[[], Any]) -> None:
        self.read, self.readings = read, []

    def __call__(self, input_ids, scores):
        self.readings.append(self.read())
        return scores


@dataclass
class SampleRun:
    """Readings (times, or op counts so far) along one sample, and what entered the LLM."""

    start: Any
    encoded: Any
    selected: Any
    generating: Any  # when `generate` is called
    tokens: list[Any]  # as each new token is ready
    visual_tokens: int
    full_visual_tokens: int
    prompt_tokens: int
    figures: GenerationFigures


def run_sample(model: BenchModel, compressor: Compressor, new_tokens: int, read: Callable[[], Any]) -> SampleRun:
    """One sample through the steps `CompressedVideoLM.generate_from_encoded` takes after the pixels: encode (with
    the method's signals), select before the LLM, assemble the prompt, generate inside the method's plumbing."""
    adapter, method = model.adapter, compressor.method
    each_token = _EachToken(read)
    with torch.inference_mode():
        start = read()
        encoded = adapter.encode(model.pixels, method.signals())
        encoded_at = read()
        selected = compressor.select(encoded, "bench")
        selected_at = read()
        tokens = selected.tokens
        visual, positions = adapter.assemble(encoded, tokens.features, tokens.index, tokens.frame_newlines)
        positions = positions if method.keeps_positions() else None
        inputs = adapter.generation_inputs(model.prompt_ids, visual, positions, encoded.layout.full_tokens)
        with compressor.generating(inputs, selected) as figures:
            generating = read()
            adapter.model.generate(
                **inputs.kwargs,
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,  # a random model's answer would end wherever; every sample decodes `new_tokens`
                pad_token_id=adapter.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([each_token]),
            )
    return SampleRun(
        start, encoded_at, selected_at, generating, each_token.readings,
        int(visual.shape[0]), encoded.layout.full_tokens, int(inputs.input_ids.shape[1]), figures,
    )  # fmt: skip


def _counted_so_far(counted: count_ops) -> OpCounts:
    counts = counted.counts
    return OpCounts(counts.ops, counts.syncs, Counter(counts.syncing))


def _between(earlier: OpCounts, later: OpCounts) -> OpCounts:
    return OpCounts(later.ops - earlier.ops, later.syncs - earlier.syncs, later.syncing - earlier.syncing)


def in_llm_counts(model: BenchModel, method: CompressionMethod) -> tuple[dict[str, OpCounts], GenerationFigures]:
    """Ops and syncs of one sample's prefill and last decode step (`COUNT_NEW_TOKENS`), after a warm-up sample,
    and the sample's figures."""
    compressor = model.compressor(method)
    run_sample(model, compressor, COUNT_NEW_TOKENS, lambda: None)
    with count_ops() as counted:
        run = run_sample(model, compressor, COUNT_NEW_TOKENS, lambda: _counted_so_far(counted))
    phases = {"prefill": _between(run.generating, run.tokens[0]), "decode_step": _between(run.tokens[-2], run.tokens[-1])}
    return phases, run.figures


def reselects(method: CompressionMethod) -> bool:
    return any(isinstance(stage, DynamicKVPruning) for stage in method.stages())


def print_pre_llm_counts(layouts: list[str], configs: list[str] | None) -> None:
    """A count line per method and size; a method the size's model cannot run gets a line saying why."""
    for layout in layouts:
        for label, (name, settings) in chosen(PRE_LLM_METHODS, configs).items():
            method = method_from_config(name, settings)
            try:
                method.validate_for(size_model_info(layout))
            except ConfigError as error:
                print(f"counts {layout} {label.replace(' ', '_')} refused: {error}", flush=True)
                continue
            print(count_line(layout, label, "pre_llm", pre_llm_counts(layout, method)), flush=True)


def print_in_llm_counts(model: BenchModel, configs: list[str] | None) -> None:
    for label, (name, settings) in chosen(IN_LLM_METHODS, configs).items():
        method = method_from_config(name, settings)
        phases, _ = in_llm_counts(model, method)
        for phase, counts in phases.items():
            print(count_line(model.size, label, phase, counts), flush=True)
        if reselects(method):
            forced = method_from_config(name, {**settings, "threshold": FORCED_RESELECTION})
            phases, figures = in_llm_counts(model, forced)
            extra = f"bytes_to_host={figures.figures['kv_held_aside_bytes']}"
            print(count_line(model.size, label, "reselection", phases["decode_step"], extra), flush=True)


def _device_clock(device: torch.device) -> Callable[[], float]:
    """Seconds, read once the device has finished what the host gave it so far."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def now() -> float:
        synchronize()
        return time.perf_counter()

    return now


def timed_figures(model: BenchModel, compressor: Compressor, repeats: int, new_tokens: int) -> dict[str, Any]:
    """Medians over `repeats` samples after a warm-up one: stage times in ms, tokens into the LLM, peak memory."""
    device = model.pixels.device
    now = _device_clock(device)
    runs, memory = [], []
    for attempt in range(repeats + 1):
        reset_peak_memory(device)
        run = run_sample(model, compressor, new_tokens, now)
        if attempt:
            runs.append(run)
            memory.append(peak_memory(device))

    def median_ms(spans: list[float]) -> float:
        return round(statistics.median(spans) * 1e3, 3)

    steps = [later - earlier for run in runs for earlier, later in zip(run.tokens, run.tokens[1:], strict=False)]
    last = runs[-1]
    return {
        "encoder_ms": median_ms([run.encoded - run.start for run in runs]),
        "pre_llm_ms": median_ms([run.selected - run.encoded for run in runs]),
        "prefill_ms": median_ms([run.tokens[0] - run.generating for run in runs]),
        "decode_ms_per_token": median_ms(steps),
        "sample_ms": median_ms([run.tokens[-1] - run.start for run in runs]),
        "visual_tokens": last.visual_tokens,
        "full_visual_tokens": last.full_visual_tokens,
        "prompt_tokens": last.prompt_tokens,
        "retained_ratio": round(last.figures.retained_ratio(last.full_visual_tokens, new_tokens - 1), 4),
        **{name: round(max(sample[name] for sample in memory), 3) for name in memory[0]},
    }


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or platform.machine()


def time_methods(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, time each chosen method, print a line each; the whole record for `--out`."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    started = time.perf_counter()
    model = BenchModel.build(args.size, args.frames, dtype, device)
    build_seconds = time.perf_counter() - started
    run_settings = {"size": args.size, "device": device, "dtype": str(dtype).removeprefix("torch."), "frames": args.frames,
                    "image_size": model.pixels.shape[-1], "new_tokens": args.new_tokens, "repeats": args.repeats,
                    "attn_implementation": ATTENTION, "prompt": "paper", "question": QUESTION}  # fmt: skip
    print(" ".join(f"{key}={value}" for key, value in run_settings.items() if key != "question"),
          f"model_build_s={build_seconds:.1f}", flush=True)  # fmt: skip
    methods: dict[str, Any] = {}
    for label, (name, settings) in chosen(TIMED_METHODS, args.methods).items():
        method = method_from_config(name, settings)
        try:
            compressor = model.compressor(method)
        except ConfigError as error:  # a setting beyond the model (a layer past a tiny model's depth)
            methods[label] = {"config": name, "skipped": str(error)}
            print(f"timed {args.size} {label.replace(' ', '_')} skipped: {error}", flush=True)
            continue
        figures = timed_figures(model, compressor, args.repeats, args.new_tokens)
        methods[label] = {"config": name, "settings": method.describe(), **figures}
        print(f"timed {args.size} {label.replace(' ', '_')}", *(f"{key}={value}" for key, value in figures.items()), flush=True)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device_name": device_name(device),
        "machine": hardware(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "git": git_state(),
        "settings": run_settings,
        "model_build_s": round(build_seconds, 1),
        "methods": methods,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--cpu-counts", action="store_true", help="count ops and syncs (any machine)")
    mode.add_argument("--gpu", action="store_true", help="time each method on a random-weight model (a CUDA device)")
    parser.add_argument("--methods", nargs="+", default=None, help="configs to count or time (default: all listed)")
    parser.add_argument("--layouts", nargs="+", choices=sorted(SIZES), default=sorted(SIZES), help="--cpu-counts' pre-LLM sizes")
    parser.add_argument("--size", choices=("7b", "0.5b", "tiny"), default="7b", help="--gpu's model (tiny: a smoke test)")
    parser.add_argument("--frames", type=int, default=SIZES["ov"][0], help="--gpu: frames of random pixels per sample")
    parser.add_argument("--repeats", type=int, default=3, help="timed samples per method, after a warm-up one")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens each sample decodes")
    parser.add_argument("--device", default="auto", help="--gpu: auto is cuda when there is one")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on a GPU, fp32 on a CPU")
    parser.add_argument("--out", type=Path, default=None, help="--gpu: write the figures and settings here (JSON)")
    args = parser.parse_args(argv)
    if args.cpu_counts:
        print_pre_llm_counts(args.layouts, args.methods)
        print_in_llm_counts(BenchModel.build(COUNT_MODEL, SIZES["ov"][0], torch.float32, "cpu"), args.methods)
        return
    if args.repeats < 1 or args.new_tokens < 2:
        parser.error("--gpu needs --repeats >= 1 and --new-tokens >= 2 (a decode step after prefill's token)")
    record = time_methods(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
