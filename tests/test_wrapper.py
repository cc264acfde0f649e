"""The lmms-eval wrapper: prompt, frame sampling, token counts, fidelity to HF generate, failures."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from dycoke_eval.checkpoints import CheckpointLoader
from dycoke_eval.config import ConfigError, group_options
from dycoke_eval.methods.dycoke import DyCoke
from dycoke_eval.methods.fastv import FastV
from dycoke_eval.methods.full import Full
from dycoke_eval.methods.random_tokens import RandomTokens
from dycoke_eval.offline.videos import FRAME_COUNT, write_video
from dycoke_eval.prompts import read_answer
from dycoke_eval.video_frames import sample_video
from dycoke_eval.wrapper import CompressedVideoLM, SampleRecord

GREEDY = {"max_new_tokens": 6, "temperature": 0, "until": ["\n\n\n\n\n\n\n\n"]}


@dataclass
class Request:
    """The shape of an lmms-eval generate_until Instance: only `.args` is read."""

    args: tuple


def make_requests(lm, paths, gen_kwargs=GREEDY, task="t"):
    lm.task_dict = {task: {"test": {i: {"path": p} for i, p in enumerate(paths)}}}
    return [Request(("What moves?", dict(gen_kwargs), lambda doc: [doc["path"]], i, task, "test")) for i in range(len(paths))]


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(write_video(tmp_path_factory.mktemp("videos") / "clip.mp4"))


def test_the_paper_prompt_is_llava_nexts_qwen_1_5_conversation_and_checkpoint_is_the_llava_hf_template(lm, tiny_checkpoint):
    assert lm.build_prompt("What moves?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<video>\nWhat moves?<|im_end|>\n<|im_start|>assistant\n"
    )
    own = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", prompt="checkpoint")
    assert own.build_prompt("What moves?") == "<|im_start|>user <video>\nWhat moves?<|im_end|><|im_start|>assistant\n"


def tokenizer_image_token(prompt: str, tokenizer, placeholder_id: int, placeholder: str = "<image>") -> list[int]:
    """LLaVA-NeXT's way to tokenize a prompt: each chunk between placeholders on its own, the placeholder id between."""
    chunks = [tokenizer(chunk, add_special_tokens=False)["input_ids"] for chunk in prompt.split(placeholder)]
    ids = chunks[0]
    for chunk in chunks[1:]:
        ids = ids + [placeholder_id] + chunk
    return ids


def test_paper_prompt_token_ids_equal_a_literal_qwen_1_5_rendering(lm, video):
    """What enters the model equals LLaVA-NeXT's conv_qwen_1_5 prompt, tokenized as its code does, the video expanded."""
    literal = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat moves?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    video_id = lm.model.config.video_token_id
    expected = tokenizer_image_token(literal, lm.tokenizer, video_id)
    start = expected.index(video_id)
    expected = expected[:start] + [video_id] * (8 * 16 + 1) + expected[start + 1 :]
    frames = sample_video(video, 8).frames
    output, prompt_length = lm.run_sample(frames, "What moves?", {"max_new_tokens": 1}, SampleRecord("t", 0))
    assert output[0, :prompt_length].tolist() == expected


@pytest.mark.parametrize("frames", [1, 8, 32])
def test_samples_the_requested_frames_and_counts_frames_times_16_plus_one_tokens(tiny_checkpoint, video, frames):
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=frames, device="cpu")
    lm.generate_until(make_requests(lm, [video]))
    (record,) = lm.sample_records
    assert record.status == "ok" and record.frames == frames
    assert record.video_frame_count == FRAME_COUNT
    assert record.sampled_indices == [int(i) for i in np.linspace(0, FRAME_COUNT - 1, frames, dtype=int)]
    assert record.visual_tokens_in == record.visual_tokens_full == frames * 16 + 1
    assert set(record.seconds) == {"video_decode", "preprocess", "video_wait", "vision_encoder", "compress", "generate"}
    assert all(seconds > 0 for seconds in record.seconds.values())


def test_checkpoint_prompt_answers_exactly_as_hf_generate_does_with_the_processors_template(tiny_checkpoint, video):
    """The checkpoint form and precomputed features through generate change nothing the processor would do."""
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", prompt="checkpoint")
    (answer,) = lm.generate_until(make_requests(lm, [video], {"max_new_tokens": 6, "temperature": 0}))
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    text = lm.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = lm.processor(text=text, videos=[sample_video(video, 8).frames], return_tensors="pt")
    with torch.inference_mode():
        reference = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = lm.tokenizer.decode(reference[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.text == expected.strip() and answer.token_counts.output_tokens > 0
    assert lm.sample_records[-1].output_tokens == reference.shape[1] - inputs["input_ids"].shape[1]


def test_a_missing_or_unreadable_video_fails_that_sample_only(lm, video, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")

    def exits_like_lmms_eval_tasks(doc):
        raise SystemExit(f"video path:{doc['path']} does not exist, please check")

    requests = make_requests(lm, [str(tmp_path / "missing.mp4"), str(broken), video])
    requests[0].args = requests[0].args[:2] + (exits_like_lmms_eval_tasks,) + requests[0].args[3:]
    lm.sample_records.clear()
    answers = lm.generate_until(requests)
    assert answers[:2] == ["", ""] and len(answers) == 3
    missing, unreadable, fine = lm.sample_records
    assert missing.status == unreadable.status == "failed" and fine.status == "ok"
    assert "missing.mp4" in missing.error
    assert unreadable.video_path == str(broken) and "cannot open as a video container" in unreadable.error


def test_a_failed_sample_is_not_journaled_so_a_rerun_retries_it(tiny_checkpoint, video, tmp_path):
    journal = tmp_path / "journal.jsonl"
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", journal=str(journal))
    lm.generate_until(make_requests(lm, [str(tmp_path / "not-yet.mp4"), video]))
    assert [r.status for r in lm.sample_records] == ["failed", "ok"]
    assert len(journal.read_text().splitlines()) == 1
    write_video(tmp_path / "not-yet.mp4", "late")  # the video arrives
    again = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", journal=str(journal))
    again.generate_until(make_requests(again, [str(tmp_path / "not-yet.mp4"), video]))
    assert [(r.status, r.from_journal) for r in again.sample_records] == [("ok", False), ("ok", True)]


def test_the_model_is_loaded_once_for_the_cells_on_it_and_survives_lmms_eval_clean(tiny_checkpoint):
    checkpoints = CheckpointLoader()  # a process's, kept from one cell to the next
    first = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", checkpoints=checkpoints)
    first.clean()  # lmms-eval deletes the wrapper's nn.Module attributes after a run
    other = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, method=Full(), device="cpu", checkpoints=checkpoints)
    assert checkpoints.loads == 1
    assert other.model is first.model and other.encoder_cache is first.encoder_cache
    eager = CompressedVideoLM(pretrained=str(tiny_checkpoint), device="cpu", attn_implementation="eager", checkpoints=checkpoints)
    assert checkpoints.loads == 2 and checkpoints.loaded.adapter is eager.adapter is not first.adapter  # one model at a time


def test_method_is_chosen_by_name_from_the_lmms_eval_cli(tiny_checkpoint):
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), method="full", device="cpu")
    assert isinstance(lm.method, Full)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "dycokee"}, "valid method options: " + ", ".join(group_options("method"))),
        ({"frames": 0}, "frames=0"),
        ({"batch_size": 4}, "batch_size=4"),
        ({"colour": "red"}, "unknown model_args ['colour']"),
        ({"dtype": "float77"}, "dtype='float77'"),
        ({"preprocess_device": "gpu"}, "preprocess_device='gpu': use cpu (HF's processor, in the decoding threads) or model"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_value(tiny_checkpoint, kwargs, message):
    with pytest.raises(ConfigError) as error:
        CompressedVideoLM(pretrained=str(tiny_checkpoint), device="cpu", **kwargs)
    assert message in str(error.value)


def test_output_is_read_as_the_papers_class_does_then_cut_at_the_tasks_stop_strings():
    assert read_answer("  B. cat <|im_end|> junk", None) == "B. cat"  # the turn ends, then strip
    assert read_answer("B. cat\nASSISTANT: more", ["ASSISTANT:"]) == "B. cat\n"
    assert read_answer("no stop here", None) == "no stop here"
    assert read_answer("a||b", "||") == "a"


def test_an_unknown_prompt_form_fails_at_construction(tiny_checkpoint):
    with pytest.raises(ConfigError, match="prompt='chat'; use one of paper, checkpoint"):
        CompressedVideoLM(pretrained=str(tiny_checkpoint), device="cpu", prompt="chat")


def test_an_encoded_video_is_reused_only_with_the_encoder_signals_it_was_made_with(tiny_checkpoint, video):
    from dycoke_eval.config import instantiate_method

    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu")
    hits = []
    for name in ("full", "fastv", "prumerge", "prumerge_official"):  # the last two capture keys and scores
        lm.method = instantiate_method(name)
        lm.sample_records.clear()
        lm.generate_until(make_requests(lm, [video], task=f"cache-{name}"))
        hits.append(lm.sample_records[-1].encoder_cache_hit)
    assert hits == [False, True, False, True]
    assert (lm.encoder_passes.done, lm.encoder_passes.answers, lm.encoder_passes.cache_hits) == (2, 4, 2)  # the wrapper's own
    assert lm.encoder_passes.cache_seconds > 0


@dataclass
class PaddedRequest(Request):
    """A request as lmms-eval makes it, with its metadata (a padding copy carries `__padding_only__`)."""

    metadata: dict


def test_lmms_eval_padding_requests_get_an_empty_answer_with_no_compute_record_or_journal(tiny_checkpoint, video, tmp_path):
    journal = tmp_path / "journal.jsonl"
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", journal=str(journal))
    (real,) = make_requests(lm, [video])
    padding = PaddedRequest(real.args, {"task": "t", "doc_id": 0, "repeats": 1, "__padding_only__": True})
    computed = []
    lm._answer = lambda *args: computed.append(args[0]) or type(lm)._answer(lm, *args)
    answers = lm.generate_until([PaddedRequest(real.args, {"task": "t"}), padding, padding])
    assert answers[0] and answers[1:] == ["", ""]
    assert len(computed) == 1 and len(lm.sample_records) == 1  # the real request alone was computed and recorded
    assert len(journal.read_text().splitlines()) == 1


SAMPLED = {"max_new_tokens": 12, "temperature": 1.0, "until": ["\n\n\n\n\n\n\n\n"]}


def test_sampled_decoding_draws_per_sample_so_an_answer_does_not_depend_on_what_ran_before(tiny_checkpoint, tmp_path):
    paths = [str(write_video(tmp_path / f"v{i}.mp4", f"clip {i}")) for i in range(3)]
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", seed=0)
    together = lm.generate_until(make_requests(lm, paths, SAMPLED))
    torch.manual_seed(1234)  # the process's generator is elsewhere, as on another rank
    alone = lm.generate_until(make_requests(lm, paths, SAMPLED)[2:])
    assert alone == together[2:]
    reseeded = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", seed=1)
    assert reseeded.generate_until(make_requests(reseeded, paths, SAMPLED)) != together  # it does sample
    state = torch.random.get_rng_state()
    lm.generate_until(make_requests(lm, paths[:1], SAMPLED))
    assert torch.equal(torch.random.get_rng_state(), state)  # and leaves the process's generator as it found it


def test_each_process_appends_to_its_own_journal_and_every_process_reads_them_all(tiny_checkpoint, tmp_path):
    from dycoke_eval.store import journal_path

    paths = [str(write_video(tmp_path / f"v{i}.mp4", f"clip {i}")) for i in range(3)]
    rank0 = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", journal=str(journal_path(tmp_path, 0)))
    first, third = rank0.generate_until(make_requests(rank0, paths)[0::2])  # a two-process shard: documents 0 and 2
    rank1 = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", journal=str(journal_path(tmp_path, 1)))
    (second,) = rank1.generate_until(make_requests(rank1, paths)[1::2])
    assert sorted(path.name for path in tmp_path.glob("journal*")) == ["journal.jsonl", "journal.rank1.jsonl"]
    alone = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", journal=str(journal_path(tmp_path, 0)))
    assert alone.generate_until(make_requests(alone, paths)) == [first, second, third]  # one process resumes what two did
    assert [record.from_journal for record in alone.sample_records] == [True, True, True]


def test_generation_passes_no_argument_transformers_deprecates(tiny_checkpoint, video):
    """DyCoke hands generate a cache of its own: under the argument name transformers 6 keeps."""
    import warnings

    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", method="dycoke")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (answer,) = lm.generate_until(make_requests(lm, [video]))
    assert lm.sample_records[-1].status == "ok"
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning | DeprecationWarning)]


@pytest.mark.parametrize("measure, waits", [(False, 0), (True, 2)])
def test_only_the_efficiency_protocol_waits_for_the_device_around_a_stage(monkeypatch, measure, waits):
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append(1))
    on_a_gpu = SimpleNamespace(device=torch.device("cuda"), measure=measure)
    record = SampleRecord("t", 0)
    with CompressedVideoLM._stage(on_a_gpu, record, "generate"):
        pass
    assert len(calls) == waits and "generate" in record.seconds


def test_preprocess_device_model_hands_uint8_frames_over_and_the_model_makes_the_same_pixels(tiny_checkpoint, lm, video):
    on_model = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", preprocess_device="model")
    handed = on_model._prepare_video(video)  # what a decoding thread does
    assert handed.pixels.dtype == torch.uint8 and handed.pixels.shape[::3] == (8, 3)  # [T, H, W, 3], not resized
    assert set(handed.seconds) == {"video_decode"}  # resizing and normalising are the model's work now
    record = SampleRecord("t", 0)
    assert torch.equal(on_model.preprocess_on_device(handed.pixels, record), lm._prepare_video(video).pixels)
    assert record.seconds["preprocess"] > 0
    frames = sample_video(video, 8).frames  # the warm-up's path: frames in hand, no thread
    assert torch.equal(*(model.encode_video(frames, SampleRecord("t", 0)).grid for model in (lm, on_model)))
    on_model.generate_until(make_requests(on_model, [video]))
    (answered,) = on_model.sample_records
    assert answered.status == "ok" and not answered.encoder_cache_hit
    assert set(answered.seconds) == {"video_decode", "video_wait", "preprocess", "vision_encoder", "compress", "generate"}


def recording(model, calls):
    """`model.generate` that records its keyword arguments in `calls`."""

    def generate(**kwargs):
        calls.append(kwargs)
        return type(model).generate(model, **kwargs)

    return generate


@pytest.mark.parametrize("method", [Full(), RandomTokens(ratio=0.5)], ids=["full", "random"])
def test_static_decoding_answers_as_the_dynamic_cache_does_through_a_static_cache(tiny_checkpoint, video, method, monkeypatch):
    """Full tokens and methods acting before the LLM decode with transformers' static cache (compiled on CUDA)."""
    answers, kwargs = {}, []
    for static in (False, True):
        lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", method=method, static_decoding=static)
        monkeypatch.setattr(lm.model, "generate", recording(lm.model, kwargs))
        (answers[static],) = lm.generate_until(make_requests(lm, [video]))
    assert answers[True].text == answers[False].text and answers[True].text
    assert "cache_implementation" not in kwargs[0] and kwargs[1]["cache_implementation"] == "static"


@pytest.mark.parametrize(("method", "acts"), [(DyCoke(), "prunes the KV cache while decoding"), (FastV(), "drops prompt tokens")])
def test_static_decoding_refuses_methods_whose_caches_change_length(tiny_checkpoint, method, acts):
    with pytest.raises(ConfigError, match=rf"static_decoding=true: method '\w+' {acts}.*set static_decoding=false"):
        CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=8, device="cpu", method=method, static_decoding=True)
