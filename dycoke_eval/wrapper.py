"""lmms-eval model wrapper: a video LLM through HF transformers and its model adapter, with a compression method.

Registered with lmms-eval under `llava_onevision_compressed` (see `registration.py`), so it runs
from our Hydra app and from `python -m lmms_eval eval --model llava_onevision_compressed`.

Per sample it decodes exactly `frames` frames at the paper's indices (`video_frames.py`), has the
model's adapter encode them (capturing the encoder signals the method needs), lets the method's
pre-LLM stages pick the video tokens, has the adapter assemble the prompt (configured form,
`prompts.py`) and `generate`'s inputs, and generates inside the dispatcher (`compression/dispatcher.py`),
which installs the prefill and decode stages. Stage times, the standard token counts and the
sampled frame indices are recorded in `sample_records`. A sample whose video fails is recorded as
failed and is not journaled, so the next run of the cell retries it. Unless measuring, the videos of
the next samples to compute are decoded and preprocessed in background threads (`prefetch.py`)
while the model computes the current one. With `preprocess_device="model"` those threads only decode,
and the model's device resizes and normalises the uint8 frames (the same pixels, `models/device_preprocess.py`).

With `companions` (the other cells of a sample-major group, `groups.py`) each sample that this cell or a
companion lacks in its journal is decoded and encoded once, with the encoder signals all of them need, and
every cell lacking it answers from that pass with its own method, into its own journal. The encoder passes it
ran and the hits of the model's encoder cache are counted on the instance (`encoder_passes`), for the caller to read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm
from transformers import LogitsProcessorList

from dycoke_eval.accounting import real_prefill_flops
from dycoke_eval.checkpoints import CheckpointLoader, LoadedCheckpoint, resolve_device, resolve_dtype
from dycoke_eval.compression.dispatcher import Compressor
from dycoke_eval.compression.stages import CompressionMethod, per_sample_seed, routes_attention
from dycoke_eval.config import ConfigError, check_routable
from dycoke_eval.encoder_cache import CachedEncoding, EncoderCache, EncoderPasses
from dycoke_eval.geometry import FrameTiming
from dycoke_eval.models.base import EncodedVideo, ModelAdapter
from dycoke_eval.offline.tiny_model import checkpoint_generation_cap
from dycoke_eval.plumbing.cache import generated_cache
from dycoke_eval.prefetch import Prefetcher
from dycoke_eval.prompts import PROMPT_FORMS, TURN_END, read_answer
from dycoke_eval.store import SampleJournal, SampleRecord
from dycoke_eval.timing import StepClock, cache_bytes, model_latency, peak_memory, reset_peak_memory
from dycoke_eval.video_frames import VideoDecodeError, sample_video

PREPROCESS_DEVICES = ("cpu", "model")  # where frames are resized and normalised (`preprocess_device`)


class VideoUnavailable(Exception):
    """The sample's video is missing or cannot be decoded; the sample is recorded as failed."""


@dataclass(frozen=True)
class Companion:
    """Another cell of a sample-major group: its method, and its journal, which the group's first cell fills."""

    method: CompressionMethod
    journal: str


@dataclass(frozen=True)
class _Member:
    """A cell answering from one encoder pass: its method's compressor and its journal (None: not journaled)."""

    compressor: Compressor
    journal: SampleJournal | None


class CompressedVideoLM(lmms):
    def __init__(
        self,
        pretrained: str = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        frames: int = 32,
        method: CompressionMethod | str | None = None,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        attn_implementation: str = "sdpa",
        prompt: str = "paper",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int | None = None,
        journal: str | None = None,
        device_map: str | None = None,
        measure: bool = False,
        random_weights_architecture: str | None = None,
        adapter: str | None = None,  # a model adapter by name (`llava_video`); None: the one for the checkpoint's model_type
        siglip_head: str | None = None,  # SigLIP checkpoint (hub id or folder) whose pooling head gives the probe signals
        min_pixels: int | None = None,  # Qwen-VL: frames resized within these pixel counts (None: the processor's)
        max_pixels: int | None = None,
        position_numbering: str | None = None,  # Qwen2.5-VL: released (transformers 4.x) or installed (None: released)
        companions: Sequence[Companion] = (),  # the other cells of its sample-major group, answered in the same passes
        prefetch_depth: int = 2,  # samples whose video is decoded ahead in the background (0: decode inline)
        prefetch_workers: int | str = "auto",  # background threads decoding them (`prefetch_threads` for auto)
        preprocess_device: str = "cpu",  # where frames are resized and normalised: cpu (those threads) or model
        static_decoding: bool = False,  # a static KV cache (compiled decoding on CUDA); methods acting before the LLM only
        seed: int = 0,  # with sampled decoding (temperature > 0), each sample's draws are seeded by this and the sample
        checkpoints: CheckpointLoader | None = None,  # keeps the model loaded for the next cell; None: loaded for this one
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if int(batch_size) != 1:
            raise ConfigError(f"batch_size={batch_size}: this wrapper runs one sample at a time; use batch_size=1")
        self.prefetch_depth = _count_setting("prefetch_depth", prefetch_depth, 0, "0 decodes inline")
        if prefetch_workers == "auto":
            prefetch_workers = prefetch_threads(resolve_device(device), os.cpu_count() or 1)
        self.prefetch_workers = _count_setting("prefetch_workers", prefetch_workers, 1, "background decoding threads, or auto")
        if preprocess_device not in PREPROCESS_DEVICES:
            raise ConfigError(
                f"preprocess_device={preprocess_device!r}: use cpu (HF's processor, in the decoding threads) or model "
                "(resize and normalise on the model's device, the same pixels)"
            )
        self.frames = int(frames)
        if self.frames < 1:
            raise ConfigError(f"frames={frames}: sample at least one frame per video")
        method = _resolve_method(method, kwargs)
        if prompt not in PROMPT_FORMS:
            raise ConfigError(
                f"prompt={prompt!r}; use one of {', '.join(PROMPT_FORMS)} (paper: the papers' qwen_1_5 conversation)"
            )
        self.prompt = prompt
        self.seed = int(seed)
        if routes_attention(method):
            check_routable(attn_implementation, method.name)
        # Caps the task's own setting; a tiny random checkpoint carries its own cap (lmms-eval's CLI path included).
        caps = [int(cap) for cap in (max_new_tokens, checkpoint_generation_cap(pretrained)) if cap]
        self.max_new_tokens = min(caps) if caps else None
        self.journal = SampleJournal(journal) if journal else None

        from accelerate import Accelerator

        from dycoke_eval.distributed import process_state, uses_cpu

        process_state()  # distributed on CPU-only machines too (over gloo), as every rank must agree
        self.accelerator = Accelerator(cpu=uses_cpu())
        device = resolve_device(device)
        if self.accelerator.num_processes > 1:
            # lmms-eval shards the documents by rank; each process holds its own copy of the model.
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            if device.startswith("cuda"):
                device = f"cuda:{self.accelerator.local_process_index}"
        self.checkpoint: LoadedCheckpoint = (checkpoints or CheckpointLoader()).load(
            pretrained,
            device,
            resolve_dtype(dtype, device),
            attn_implementation,
            device_map or None,
            random_weights_architecture,
            adapter or None,
            siglip_head or None,
            (_optional_count(min_pixels), _optional_count(max_pixels)),
            position_numbering or None,
        )
        self.measure = bool(measure)  # the efficiency protocol: prefill and decode steps, memory, KV-cache bytes
        self.static_decoding = bool(static_decoding)
        # With a device map the inputs go where the model's first layers are.
        self._device = self.checkpoint.model.device if device_map else torch.device(device)
        self.method = method
        # preprocess_device=model: uint8 frames -> the tower's pixels on the model's device; None: HF's processor on the CPU
        self.device_preprocess = self.adapter.device_preprocessor() if preprocess_device == "model" else None
        if companions and self.measure:
            raise ConfigError("measure=true runs cell by cell: a measured cell pays for its own decode and encoder")
        self.companions = [_Member(self._compressor(c.method), SampleJournal(c.journal)) for c in companions]
        self.sample_records: list[SampleRecord] = []
        self.encoder_passes = EncoderPasses()  # this wrapper's, read by whoever runs the cell

    @property
    def method(self) -> CompressionMethod:
        return self.compressor.method

    @method.setter
    def method(self, method: CompressionMethod) -> None:
        self.compressor = self._compressor(method)

    def _compressor(self, method: CompressionMethod) -> Compressor:
        """A method checked against this model, with a fresh dispatcher for its run of samples."""
        adapter = self.adapter
        method.validate_for(adapter.loaded_info())
        adapter.prepare(method.signals())
        compressor = Compressor(adapter, method)
        if self.static_decoding:
            compressor.check_static_decoding()
        return compressor

    # lmms-eval reads these attributes.
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

    @property
    def adapter(self) -> ModelAdapter:
        return self.checkpoint.adapter

    @property
    def encoder_cache(self) -> EncoderCache:
        return self.checkpoint.encoder_cache

    @property
    def model(self):
        return self.checkpoint.model

    @property
    def processor(self):
        return self.checkpoint.processor

    @property
    def tokenizer(self):
        return self.checkpoint.processor.tokenizer

    def loglikelihood(self, requests):
        raise NotImplementedError("llava_onevision_compressed only supports generate_until tasks")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("llava_onevision_compressed only supports single-round generate_until tasks")

    def generate_until(self, requests) -> list[GenerationResult | str]:
        """Answers in request order, each with its token counts (lmms-eval's efficiency summary reads them); a failed
        sample's empty answer has none. lmms-eval's padding requests (copies that even out the ranks' shards) get an
        empty answer with no compute: they are never scored, recorded or journaled."""
        real = [request for request in requests if not is_padding(request)]
        answers = iter(self._generate(real))
        return ["" if is_padding(request) else next(answers) for request in requests]

    def _generate(self, requests) -> list[GenerationResult | str]:
        keys = [SampleJournal.key(task, doc_id, context, kwargs) for context, kwargs, _, doc_id, task, _ in _args(requests)]
        saved = {key: done for key in keys if self.journal is not None and (done := self.journal.get(key)) is not None}
        group = f" and {len(self.companions)} more of its group" if self.companions else ""
        progress = tqdm(
            total=len(keys), initial=len(saved), disable=self.rank != 0, desc=f"Generating ({self.method.name}{group})"
        )
        if saved:
            progress.set_postfix_str(f"{len(saved)} resumed from the journal")
        answers = []
        ahead = self._decode_ahead(requests, keys, saved)  # an empty plan starts no thread
        with Prefetcher(ahead.values(), self._prepare_video, self.prefetch_depth or 1, self.prefetch_workers) as prefetched:
            for index, (key, request) in enumerate(zip(keys, _args(requests), strict=True)):
                members = self._lacking(key, saved)
                prepared = next(prefetched)[1] if index in ahead else None
                computed = self._answer(key, request, members, prepared) if members else []
                answer, record = saved[key] if key in saved else computed[0]
                if key not in saved:
                    progress.update()
                self.sample_records.append(record)
                answers.append(with_token_counts(answer, record))
        progress.close()
        return answers

    def _lacking(self, key: str, saved: dict) -> list[_Member]:
        """The cells that still need this sample: this one unless resumed from its journal, and companions lacking it."""
        members = [] if key in saved else [_Member(self.compressor, self.journal)]
        return members + [member for member in self.companions if member.journal.get(key) is None]

    def _decode_ahead(self, requests, keys: list[str], saved: dict) -> dict[int, str]:
        """Request index -> video path, in order, for the samples whose video this run will decode.

        Those that this cell or a companion still lacks, whose video is a file not in the encoder cache and
        not decoded for an earlier sample of this run. Empty when measuring (per-stage times stay clean) or
        with `prefetch_depth=0`. Samples left out decode inline, as do ones the plan got wrong.
        """
        if self.measure or not self.prefetch_depth:
            return {}
        signals = self._signals([_Member(self.compressor, self.journal), *self.companions])
        ahead, planned = {}, set()
        for index, (key, (_, _, doc_to_visual, doc_id, task, split)) in enumerate(zip(keys, _args(requests), strict=True)):
            if not self._lacking(key, saved):
                continue
            try:
                path = _resolve_video_path(doc_to_visual, self.task_dict[task][split][doc_id])
            except VideoUnavailable:
                continue  # fails again when its turn comes
            cache_key = self._cache_key(path, signals)
            if cache_key is not None and cache_key not in planned and cache_key not in self.encoder_cache:
                ahead[index] = path
                planned.add(cache_key)
        return ahead

    def _prepare_video(self, path: str) -> PreparedVideo:
        preprocess = self.adapter.preprocess if self.device_preprocess is None else None  # None: hand uint8 frames over
        return prepare_video(path, self.frames, preprocess, pin=self.device.type == "cuda")

    def _cache_key(self, video_path: str, signals: frozenset[str]) -> tuple | None:
        """The video's key in this model's encoder cache, at this frame count with these signals; None if it is no file."""
        if not Path(video_path).is_file():
            return None
        return EncoderCache.key(video_path, self.frames, signals)

    @staticmethod
    def _signals(members: Sequence[_Member]) -> frozenset[str]:
        """Every encoder signal the members' methods need, captured in one pass."""
        return frozenset().union(*(member.compressor.method.signals() for member in members))

    def _answer(
        self, key: str, request: tuple, members: list[_Member], prepared: Future | None = None
    ) -> list[tuple[str, SampleRecord]]:
        """One sample for every member lacking it: one decode and encoder pass, then each member's method, journaled.

        `prepared` is its video decoded and preprocessed in the background, if it was. A sample whose video fails
        is failed for every member and journaled for none, so each cell retries it.
        """
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request
        records = [SampleRecord(task=task, doc_id=int(doc_id), frames=self.frames) for _ in members]
        if self.measure:
            reset_peak_memory(self.device)
            cpu_start = time.process_time()
        try:
            encoded = self._encode_sample(self.task_dict[task][split][doc_id], doc_to_visual, members, records, prepared)
        except VideoUnavailable as error:  # not journaled: the next run of each cell retries it
            for record in records:
                record.status, record.error = "failed", str(error)
            return [("", record) for record in records]
        answered = []
        for member, record in zip(members, records, strict=True):
            own = replace(encoded, signals={name: encoded.signals[name] for name in member.compressor.method.signals()})
            output, prompt_length = self.generate_from_encoded(
                own, context, self._generation_kwargs(dict(gen_kwargs)), record, f"{task}/{doc_id}", member.compressor
            )
            new_tokens = output[0, prompt_length:]
            record.input_tokens, record.output_tokens = int(prompt_length), int(new_tokens.shape[0])
            if self.measure:
                record.memory = peak_memory(self.device)
                record.seconds["cpu_time"] = time.process_time() - cpu_start
                record.seconds["model_latency"] = model_latency(record.seconds)
            answer = read_answer(self.tokenizer.decode(new_tokens, skip_special_tokens=True), gen_kwargs.get("until"))
            if member.journal is not None:
                member.journal.add(key, answer, record)
            self.encoder_passes.answers += 1
            answered.append((answer, record))
        return answered

    def _encode_sample(
        self, doc, doc_to_visual, members: list[_Member], records: list[SampleRecord], prepared: Future | None
    ) -> EncodedVideo:
        """The sample's video decoded and encoded once, with every encoder signal the members' methods need.

        The first record carries the pass's stage times; the others are marked `encoder_shared`. An encoder-cache
        hit (same checkpoint, file, frames and signals) skips both, for every member.
        """
        video_path = _resolve_video_path(doc_to_visual, doc)
        for record in records:
            record.video_path = video_path  # a failure names the video too
        signals = self._signals(members)
        cache_key = self._cache_key(video_path, signals)
        cached = self.encoder_cache.get(cache_key) if cache_key else None
        first = records[0]
        if cached is not None:
            encoded = cached.encoded
            self.encoder_passes.cache_hits += 1
            self.encoder_passes.cache_seconds += cached.seconds
        else:
            with self._stage(first, "video_wait"):  # the model idles: for the background work, or decoding here
                video = prepared.result() if prepared is not None else self._prepare_video(video_path)
            first.seconds.update(video.seconds)
            pixels = video.pixels if self.device_preprocess is None else self.preprocess_on_device(video.pixels, first)
            encoded = self.encode_pixels(pixels, first, signals)
            self.encoder_passes.done += 1
            encoded.frame_count, encoded.indices = video.timing.frame_count, list(video.timing.indices)
            encoded.fps = video.timing.fps
            if cache_key:
                spent = sum(first.seconds[stage] for stage in ("video_decode", "preprocess", "vision_encoder"))
                self.encoder_cache.put(cache_key, CachedEncoding(encoded, spent))
        for record in records:
            record.encoder_cache_hit = cached is not None
            record.encoder_shared = cached is None and record is not first
            # the frames sampled, not the layout's: a model may pack two frames into one temporal patch (Qwen-VL)
            record.frames, record.video_frame_count = len(encoded.indices), encoded.frame_count
            record.sampled_indices, record.video_fps = list(encoded.indices), encoded.fps
        return encoded

    def warm_up(self, passes: int) -> None:
        """Untimed passes over a synthetic video, so the first measured sample pays no start-up costs."""
        from dycoke_eval.offline.videos import synthetic_frames

        for _ in range(passes):
            self.run_sample(
                synthetic_frames("warm-up")[: self.frames],
                "Warm up.",
                self._generation_kwargs({"max_new_tokens": 4}),
                SampleRecord("warm-up", -1),
            )

    def run_sample(self, video, context: str, generate_kwargs: dict[str, Any], record: SampleRecord, sample: str = ""):
        """Decoded frames [T, H, W, 3] and a question -> (`generate`'s output, prompt length in tokens)."""
        encoded = self.encode_video(video, record)
        return self.generate_from_encoded(encoded, context, generate_kwargs, record, sample)

    def encode_video(self, video, record: SampleRecord, signals: frozenset[str] | None = None) -> EncodedVideo:
        """Frames [T, H, W, 3] -> the adapter's encoded video, with `signals` (default: those the method needs)."""
        record.frames = int(video.shape[0])
        if self.device_preprocess is not None:
            pixels = self.preprocess_on_device(torch.as_tensor(video), record)
        else:
            with self._stage(record, "preprocess"):
                pixels = self.adapter.preprocess(video)
        return self.encode_pixels(pixels, record, signals)

    def preprocess_on_device(self, frames: torch.Tensor, record: SampleRecord):
        """uint8 frames [T, H, W, 3] -> the tower's pixels, resized and normalised on the model's device (`preprocess`)."""
        with torch.inference_mode(), self._stage(record, "preprocess"):
            return self.device_preprocess(frames)

    def encode_pixels(self, pixels, record: SampleRecord, signals: frozenset[str] | None = None) -> EncodedVideo:
        """The adapter's preprocessed frames -> its encoded video, with `signals` (default: those the method needs)."""
        with torch.inference_mode(), self._stage(record, "vision_encoder"):
            return self.adapter.encode(pixels, self.method.signals() if signals is None else signals)

    def generate_from_encoded(
        self,
        encoded: EncodedVideo,
        context: str,
        generate_kwargs: dict[str, Any],
        record: SampleRecord,
        sample: str = "",
        compressor: Compressor | None = None,
    ):
        """Let the method's stages (`compressor`'s, default this cell's) pick and prune the video tokens while generating;
        returns (output, prompt length)."""
        adapter, compressor = self.adapter, compressor or self.compressor
        method = compressor.method
        prompt_ids = self.tokenizer(self.build_prompt(context), return_tensors="pt")["input_ids"][0]
        with torch.inference_mode():
            with self._stage(record, "compress"):
                selected = compressor.select(encoded, sample)
            tokens = selected.tokens
            visual, positions = adapter.assemble(encoded, tokens.features, tokens.index, tokens.frame_newlines)
            keeps = method.keeps_positions() or adapter.keeps_grid_positions
            positions = positions if keeps else None  # None: consecutive positions
            if positions is not None and bool((positions < 0).any()):
                raise ValueError(f"method {method.name!r} keeps positions, but a stage made tokens at no grid position")
            inputs = adapter.generation_inputs(prompt_ids, visual, positions, encoded.layout.full_tokens, encoded=encoded)
            clock = StepClock(self.device) if self.measure else None
            if clock is not None:
                generate_kwargs = {
                    **generate_kwargs,
                    "logits_processor": LogitsProcessorList([clock]),
                    "return_dict_in_generate": True,
                }
            with self._stage(record, "generate"):
                started = time.perf_counter()
                with compressor.generating(inputs, selected) as figures, self._sampling_seeded(generate_kwargs, sample):
                    output = self.model.generate(**inputs.kwargs, **generate_kwargs)
        sequences = output.sequences if hasattr(output, "sequences") else output
        if clock is not None:
            record.seconds["prefill"] = clock.stamps[0] - started  # time to the first token
            if steps := clock.decode_steps():
                record.seconds["decode_per_token"] = sum(steps) / len(steps)
                record.decode_step_seconds = steps
            record.kv_cache_bytes = cache_bytes(generated_cache(output))
            output = sequences
        prompt_length = inputs.input_ids.shape[1]
        decode_steps = max(int(sequences.shape[1]) - prompt_length - 1, 0)  # the first new token comes from prefill
        layout = encoded.layout
        record.token_grid = [layout.frames, layout.rows, layout.cols]  # Qwen-VL's follows each video's resolution
        record.pixel_bounds = adapter.pixel_bounds_in_effect()
        record.visual_tokens_full = layout.full_tokens
        record.visual_tokens_in = int(visual.shape[0])
        record.visual_tokens_by_stage = {**selected.by_stage, **figures.by_stage}
        record.prefill_visual_by_layer = figures.prefill_visual_by_layer
        record.decode_visual_by_layer = figures.decode_visual_by_layer
        text = prompt_length - record.visual_tokens_in  # the prompt's text and special tokens
        dims = adapter.dims()
        record.prefill_tflops_real = sum(real_prefill_flops(v, text, dims) for v in figures.prefill_visual_by_layer) / 1e12
        record.retained_ratio = figures.retained_ratio(encoded.layout.full_tokens, decode_steps)
        record.method_stats = {**selected.figures, **figures.figures}
        return output, prompt_length

    @contextmanager
    def _sampling_seeded(self, generate_kwargs: dict[str, Any], sample: str) -> Iterator[None]:
        """Sampled decoding draws from a generator seeded by the run's seed and the sample alone, so an answer does not
        depend on which samples ran before it: in this process, in a sample-major group, or on another rank."""
        if not generate_kwargs.get("do_sample"):
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the process's own generators are left as they were
            torch.manual_seed(per_sample_seed(self.seed, sample))
            yield

    def build_prompt(self, context: str) -> str:
        """The prompt in the configured form (`paper` or `checkpoint`), the video placed before the question."""
        return self.adapter.render_prompt(self.prompt, context)

    def _generation_kwargs(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        temperature = float(gen_kwargs.get("temperature") or 0)
        sampling = temperature > 0
        max_new_tokens = int(gen_kwargs.get("max_new_tokens", 1024))
        kwargs = {
            "max_new_tokens": min(max_new_tokens, self.max_new_tokens) if self.max_new_tokens else max_new_tokens,
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": sampling,
            "eos_token_id": self._stop_token_ids(),
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if self.static_decoding:  # transformers compiles the decoding step with a static cache on CUDA
            kwargs["cache_implementation"] = "static"
        if sampling:
            kwargs["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                kwargs["top_p"] = float(gen_kwargs["top_p"])
        return kwargs

    def _stop_token_ids(self) -> list[int]:
        """The tokenizer's end of sequence and the end of a turn, where the paper's class stops."""
        turn_end = self.tokenizer.convert_tokens_to_ids(TURN_END)
        ids = [self.tokenizer.eos_token_id, turn_end if turn_end != self.tokenizer.unk_token_id else None]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @contextmanager
    def _stage(self, record: SampleRecord, stage: str) -> Iterator[None]:
        """The stage's seconds. Only `measure=true` waits for the device around it (the efficiency protocol's clean
        per-stage times); otherwise the host goes on while the device computes, and the seconds are host time."""
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" and self.measure else (lambda: None)
        synchronize()
        start = time.perf_counter()
        yield
        synchronize()
        record.seconds[stage] = time.perf_counter() - start

    def records_as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(record) for record in self.sample_records]


def is_padding(request) -> bool:
    """A copy of a request that lmms-eval adds to a rank with fewer documents, so every rank runs as many requests."""
    return bool((getattr(request, "metadata", None) or {}).get("__padding_only__"))


def _args(requests) -> list[tuple]:
    """Each lmms-eval request's arguments: (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
    return [request.args for request in requests]


def _resolve_method(method: CompressionMethod | str | None, kwargs: dict[str, Any]) -> CompressionMethod:
    """A method object (from our Hydra app) or a name plus `method.<key>=value` args (from lmms-eval's CLI)."""
    overrides = {key: kwargs.pop(key) for key in list(kwargs) if key.startswith("method.")}
    if kwargs:
        raise ConfigError(f"llava_onevision_compressed got unknown model_args {sorted(kwargs)}")
    if isinstance(method, CompressionMethod):
        if overrides:
            raise ConfigError(f"method overrides {sorted(overrides)} need a method name, not an object")
        return method
    from dycoke_eval.config import instantiate_method

    return instantiate_method(method or "full", overrides)


def prefetch_threads(device: str, cores: int) -> int:
    """`prefetch_workers=auto`: one thread on a CPU, whose cores the model already keeps busy; on an accelerator,
    half the cores (FFmpeg threads within each decode take the rest), at most 4, which keeps a 0.5B model fed."""
    return 1 if device == "cpu" else max(1, min(4, cores // 2))


def with_token_counts(answer: str, record: SampleRecord) -> GenerationResult | str:
    """An answer as lmms-eval takes it with its counts: the prompt's tokens (visual ones included) and the new ones.
    A failed sample, and one journaled before input counts were recorded, gives what it has."""
    if record.status != "ok":
        return answer
    return GenerationResult(answer, TokenCounts(input_tokens=record.input_tokens or None, output_tokens=record.output_tokens))


def _resolve_video_path(doc_to_visual, doc) -> str:
    try:
        visuals = doc_to_visual(doc)
    except (Exception, SystemExit) as error:  # several lmms-eval tasks sys.exit() on a missing video
        raise VideoUnavailable(f"the task could not locate the video: {error}") from None
    paths = [v for v in visuals if isinstance(v, str)]
    if len(paths) != 1 or len(visuals) != 1:
        raise VideoUnavailable(f"expected exactly one video path from the task, got {visuals!r}")
    return paths[0]


@dataclass(frozen=True)
class PreparedVideo:
    """A sample's video, decoded and, unless the model's device does it, preprocessed for the vision tower (on CPU),
    with the seconds each step took."""

    pixels: Any  # the tower's pixels, or uint8 frames [T, H, W, 3] for the model's device to preprocess
    timing: FrameTiming  # the video's frame rate and count, and the sampled indices
    seconds: dict[str, float]  # video_decode, preprocess (when done here): wall time in the thread that did them


def prepare_video(
    path: str, frames: int, preprocess: Callable[[Any, FrameTiming], Any] | None, pin: bool = False
) -> PreparedVideo:
    """Decode `frames` frames of the video and preprocess them; a video that fails raises VideoUnavailable.

    Runs in a prefetch thread or inline; CPU work only, so plain wall times are the steps' times. `preprocess=None`
    (`preprocess_device=model`) hands the uint8 frames over as a tensor, timed as part of the decode. `pin` (beside a
    CUDA device) puts the pixels in page-locked memory, here, off the model's thread, so that their copy to the
    device does not block the host (the encoder, or the device's preprocessing, copies with `non_blocking`).
    """
    start = time.perf_counter()
    try:
        sampled = sample_video(path, frames)
    except VideoDecodeError as error:
        raise VideoUnavailable(str(error)) from None
    decoded = time.perf_counter()
    timing = FrameTiming(sampled.fps, sampled.frame_count, sampled.indices)
    pixels = torch.from_numpy(sampled.frames) if preprocess is None else preprocess(sampled.frames, timing)
    if pin:
        pixels = pixels.pin_memory()
    ready = time.perf_counter()
    if preprocess is None:
        seconds = {"video_decode": ready - start}
    else:
        seconds = {"video_decode": decoded - start, "preprocess": ready - decoded}
    return PreparedVideo(pixels, timing, seconds)


def _optional_count(value: Any) -> Any:
    """An optional count as lmms-eval's `--model_args` strings give it ("" and "None": unset); checked by the adapter."""
    if value in (None, "", "None", "null"):
        return None
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def _count_setting(name: str, value: Any, least: int, meaning: str) -> int:
    """An integer setting of at least `least`, or a ConfigError naming the value."""
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().isdigit() or int(value) < least:
        raise ConfigError(f"{name}={value!r}: use an integer >= {least} ({meaning})")
    return int(value)
