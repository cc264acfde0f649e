"""lmms-eval model wrapper: LLaVA-OneVision through HF transformers, with a pluggable compression method.

Registered with lmms-eval under `llava_onevision_compressed` (see `registration.py`), so it runs
from our Hydra app and from `python -m lmms_eval eval --model llava_onevision_compressed`.

Per sample it decodes exactly `frames` frames at the paper's indices (`video_frames.py`), encodes
them with the vision tower, lets the method pick the video tokens that enter the LLM, renders the
prompt in the configured form (`prompts.py`) with that many `<video>` placeholders and calls
`generate` with the precomputed features. Stage times, token counts and the sampled frame indices
are recorded in `sample_records`. A sample whose video fails is recorded as failed and is not
journaled, so the next run of the cell retries it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.model import lmms
from tqdm import tqdm
from transformers import LogitsProcessorList

from dycoke_eval.checkpoints import LoadedCheckpoint, load_checkpoint, resolve_device, resolve_dtype
from dycoke_eval.config import ConfigError
from dycoke_eval.encoder_cache import ENCODER_CACHE, EncodedVideo, EncoderCache
from dycoke_eval.methods.base import CompressionMethod, GenerationContext
from dycoke_eval.plumbing.attention import check_routable
from dycoke_eval.prompts import PROMPT_FORMS, TURN_END, read_answer, render_prompt
from dycoke_eval.store import SampleJournal, SampleRecord
from dycoke_eval.timing import StepClock, cache_bytes, peak_memory, reset_peak_memory
from dycoke_eval.video_frames import SampledVideo, VideoDecodeError, sample_video


class VideoUnavailable(Exception):
    """The sample's video is missing or cannot be decoded; the sample is recorded as failed."""


class LlavaOneVisionCompressed(lmms):
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
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if int(batch_size) != 1:
            raise ConfigError(f"batch_size={batch_size}: this wrapper runs one sample at a time; use batch_size=1")
        self.frames = int(frames)
        if self.frames < 1:
            raise ConfigError(f"frames={frames}: sample at least one frame per video")
        self.method = _resolve_method(method, kwargs)
        if prompt not in PROMPT_FORMS:
            raise ConfigError(
                f"prompt={prompt!r}; use one of {', '.join(PROMPT_FORMS)} (paper: the papers' qwen_1_5 conversation)"
            )
        self.prompt = prompt
        if self.method.routes_attention:
            check_routable(attn_implementation, self.method.name)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else None  # caps the task's own setting
        self.journal = SampleJournal(journal) if journal else None

        from accelerate import Accelerator

        self.accelerator = Accelerator()
        device = resolve_device(device)
        if self.accelerator.num_processes > 1:
            # lmms-eval shards the documents by rank; each process holds its own copy of the model.
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            if device.startswith("cuda"):
                device = f"cuda:{self.accelerator.local_process_index}"
        self.checkpoint: LoadedCheckpoint = load_checkpoint(
            pretrained, device, resolve_dtype(dtype, device), attn_implementation, device_map or None, random_weights_architecture
        )
        self.measure = bool(measure)  # the efficiency protocol: prefill and decode steps, memory, KV-cache bytes
        # With a device map the inputs go where the model's first layers are.
        self._device = self.checkpoint.model.device if device_map else torch.device(device)
        self.method.validate_for(self.checkpoint.model.config)
        self.pretrained = pretrained
        self.sample_records: list[SampleRecord] = []

    # lmms-eval reads these attributes.
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

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

    def generate_until(self, requests) -> list[str]:
        answers = []
        progress = tqdm(requests, disable=self.rank != 0, desc=f"Generating ({self.method.name})")
        for request in progress:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            key = SampleJournal.key(task, doc_id, context, gen_kwargs)
            if self.journal is not None and (done := self.journal.get(key)) is not None:
                answer, record = done
            else:
                record = SampleRecord(task=task, doc_id=int(doc_id), frames=self.frames)
                try:
                    answer = self._answer(context, dict(gen_kwargs), doc_to_visual, doc_id, task, split, record)
                except VideoUnavailable as error:  # not journaled: the next run of this cell retries it
                    record.status, record.error, answer = "failed", str(error), ""
                if self.journal is not None and record.status == "ok":
                    self.journal.add(key, answer, record)
            self.sample_records.append(record)
            answers.append(answer)
        return answers

    def _answer(self, context, gen_kwargs, doc_to_visual, doc_id, task, split, record: SampleRecord) -> str:
        if self.measure:
            reset_peak_memory(self.device)
            cpu_start = time.process_time()
        doc = self.task_dict[task][split][doc_id]
        record.video_path = video_path = _resolve_video_path(doc_to_visual, doc)
        cache_key = EncoderCache.key(self.pretrained, video_path, self.frames) if Path(video_path).is_file() else None
        cached = ENCODER_CACHE.get(cache_key) if cache_key and self.method.reuses_encoder_outputs else None
        if cached is not None:
            record.encoder_cache_hit, features = True, cached.features
            record.frames, record.video_frame_count, record.sampled_indices = cached.frames, cached.frame_count, cached.indices
        else:
            with self._stage(record, "video_decode"):
                sampled = _decode_video(video_path, self.frames)
            record.video_frame_count, record.sampled_indices = sampled.frame_count, list(sampled.indices)
            features = self.encode_video(sampled.frames, record)
            if cache_key and self.method.reuses_encoder_outputs:
                spent = sum(record.seconds[stage] for stage in ("video_decode", "preprocess", "vision_encoder"))
                ENCODER_CACHE.put(
                    cache_key, EncodedVideo(features, record.frames, spent, sampled.frame_count, record.sampled_indices)
                )
        prompt_ids = self.tokenizer(self.build_prompt(context), return_tensors="pt")["input_ids"][0]
        output, prompt_length = self.generate_from_features(
            features, prompt_ids, self._generation_kwargs(gen_kwargs), record, sample=f"{task}/{doc_id}"
        )
        new_tokens = output[0, prompt_length:]
        record.output_tokens = int(new_tokens.shape[0])
        if self.measure:
            record.memory = peak_memory(self.device)
            record.seconds["cpu_time"] = time.process_time() - cpu_start
        return read_answer(self.tokenizer.decode(new_tokens, skip_special_tokens=True), gen_kwargs.get("until"))

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

    def run_sample(self, video, context: str, generate_kwargs: dict[str, Any], record: SampleRecord):
        """Decoded frames [T, H, W, 3] and a question -> (`generate`'s output, prompt length in tokens)."""
        features = self.encode_video(video, record)
        prompt_ids = self.tokenizer(self.build_prompt(context), return_tensors="pt")["input_ids"][0]
        return self.generate_from_features(features, prompt_ids, generate_kwargs, record)

    def encode_video(self, video, record: SampleRecord) -> torch.Tensor:
        """Frames [T, H, W, 3] -> pooled, projected features [T*N + 1, D] (newline last)."""
        record.frames = int(video.shape[0])
        model = self.model
        with torch.inference_mode():
            with self._stage(record, "preprocess"):
                pixels = self.processor.video_processor(videos=[video], return_tensors="pt")["pixel_values_videos"]
            with self._stage(record, "vision_encoder"), self.method.during_vision_encoding(model):
                return model.get_video_features(
                    pixels.to(self.device, model.dtype),
                    vision_feature_layer=model.config.vision_feature_layer,
                    vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                ).pooler_output[0]

    def generate_from_features(
        self,
        features: torch.Tensor,
        prompt_ids: torch.Tensor,
        generate_kwargs: dict[str, Any],
        record: SampleRecord,
        sample: str = "",
    ):
        """Let the method pick the video tokens, then generate; returns (output, prompt length)."""
        with torch.inference_mode():
            frame_tokens, newline = features[:-1].view(record.frames, -1, features.shape[-1]), features[-1:]
            with self._stage(record, "compress"):
                kept = self.method.select_video_tokens(frame_tokens, sample)
            video_tokens = torch.cat([kept, newline], dim=0)
            record.visual_tokens_full = features.shape[0]
            record.visual_tokens_in = video_tokens.shape[0]
            clock = StepClock(self.device) if self.measure else None
            if clock is not None:
                generate_kwargs = {
                    **generate_kwargs,
                    "logits_processor": LogitsProcessorList([clock]),
                    "return_dict_in_generate": True,
                }
            with self._stage(record, "generate"):
                started = time.perf_counter()
                output, input_ids, stats = generate_with_video_tokens(
                    self.model, self.method, prompt_ids, video_tokens, generate_kwargs
                )
        if clock is not None:
            record.seconds["prefill"] = clock.stamps[0] - started  # time to the first token
            if steps := clock.decode_steps():
                record.seconds["decode_per_token"] = sum(steps) / len(steps)
                record.decode_step_seconds = steps
            record.kv_cache_bytes = cache_bytes(output.past_key_values)
            output = output.sequences
        record.method_stats = stats
        return output, input_ids.shape[1]

    def build_prompt(self, context: str) -> str:
        """The prompt in the configured form (`paper` or `checkpoint`), the video placed before the question."""
        return render_prompt(self.prompt, context, self.processor)

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
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        synchronize()
        start = time.perf_counter()
        yield
        synchronize()
        record.seconds[stage] = time.perf_counter() - start

    def records_as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(record) for record in self.sample_records]


def generate_with_video_tokens(
    model, method: CompressionMethod, prompt_ids: torch.Tensor, video_tokens: torch.Tensor, generate_kwargs: dict[str, Any]
):
    """`generate` with `video_tokens` [V, D] in place of the prompt's `<video>` run, inside the method's context.

    Returns (generate's output, the input ids used, the method's per-sample figures).
    """
    input_ids, visual_start = _with_video_placeholders(prompt_ids, model.config.video_token_id, video_tokens.shape[0])
    input_ids = input_ids[None].to(video_tokens.device)
    generation = GenerationContext(model, input_ids, visual_start, video_tokens.shape[0], generate_kwargs=dict(generate_kwargs))
    with torch.inference_mode(), method.during_generation(generation):
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            mm_encoder_outputs={"video": _as_encoder_output(video_tokens[None])},
            **generation.generate_kwargs,
        )
    return output, input_ids, generation.stats


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


def _resolve_video_path(doc_to_visual, doc) -> str:
    try:
        visuals = doc_to_visual(doc)
    except (Exception, SystemExit) as error:  # several lmms-eval tasks sys.exit() on a missing video
        raise VideoUnavailable(f"the task could not locate the video: {error}") from None
    paths = [v for v in visuals if isinstance(v, str)]
    if len(paths) != 1 or len(visuals) != 1:
        raise VideoUnavailable(f"expected exactly one video path from the task, got {visuals!r}")
    return paths[0]


def _decode_video(path: str, frames: int) -> SampledVideo:
    try:
        return sample_video(path, frames)
    except VideoDecodeError as error:
        raise VideoUnavailable(str(error)) from None


def _with_video_placeholders(input_ids: torch.Tensor, video_token_id: int, count: int) -> tuple[torch.Tensor, int]:
    """Replace the processor's run of `<video>` placeholders with `count` of them."""
    positions = (input_ids == video_token_id).nonzero().flatten()
    if positions.numel() == 0:
        raise ValueError("the prompt has no <video> placeholder; the chat template must place the video")
    start, end = int(positions[0]), int(positions[-1]) + 1
    if end - start != positions.numel():
        raise ValueError("the prompt holds more than one video; one video per sample is supported")
    placeholders = torch.full((count,), video_token_id, dtype=input_ids.dtype)
    return torch.cat([input_ids[:start], placeholders, input_ids[end:]]), start


def _as_encoder_output(video_tokens: torch.Tensor):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=video_tokens)
