"""The lmms-eval wrapper: prompt, frame sampling, token counts, fidelity to HF generate, failures."""

from dataclasses import dataclass

import pytest
import torch

from dycoke_eval import checkpoints
from dycoke_eval.config import ConfigError
from dycoke_eval.methods.full import Full
from dycoke_eval.offline.videos import write_video
from dycoke_eval.wrapper import LlavaOneVisionCompressed, _truncate_at_stop_strings

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
    return LlavaOneVisionCompressed(pretrained=str(tiny_checkpoint), frames=8, device="cpu")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(write_video(tmp_path_factory.mktemp("videos") / "clip.mp4"))


def test_prompt_is_the_checkpoints_chat_template_with_the_video_before_the_question(lm):
    assert lm.build_prompt("What moves?") == "<|im_start|>user\n<video>\nWhat moves?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("frames", [1, 8, 32])
def test_samples_the_requested_frames_and_counts_frames_times_16_plus_one_tokens(tiny_checkpoint, video, frames):
    lm = LlavaOneVisionCompressed(pretrained=str(tiny_checkpoint), frames=frames, device="cpu")
    lm.generate_until(make_requests(lm, [video]))
    (record,) = lm.sample_records
    assert record.status == "ok" and record.frames == frames
    assert record.visual_tokens_in == record.visual_tokens_full == frames * 16 + 1
    assert set(record.seconds) == {"video_decode", "preprocess", "vision_encoder", "compress", "generate"}
    assert all(seconds > 0 for seconds in record.seconds.values())


def test_answers_exactly_as_hf_generate_does_on_the_raw_video(lm, video):
    """Passing precomputed features through generate must not change what the model says."""
    from lmms_eval.models.model_utils.load_video import read_video

    (answer,) = lm.generate_until(make_requests(lm, [video], {"max_new_tokens": 6, "temperature": 0}))
    inputs = lm.processor(text=lm.build_prompt("What moves?"), videos=[read_video(video, num_frm=8)], return_tensors="pt")
    with torch.inference_mode():
        reference = lm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = lm.tokenizer.decode(reference[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == expected
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
    assert unreadable.video_path == str(broken) and "cannot decode" in unreadable.error


def test_the_model_is_loaded_once_per_process_and_survives_lmms_eval_clean(tiny_checkpoint, lm):
    before = checkpoints.LOAD_COUNT
    other = LlavaOneVisionCompressed(pretrained=str(tiny_checkpoint), frames=4, method=Full(), device="cpu")
    other.clean()  # lmms-eval deletes the wrapper's nn.Module attributes after a run
    assert checkpoints.LOAD_COUNT == before
    assert other.model is lm.model


def test_method_is_chosen_by_name_from_the_lmms_eval_cli(tiny_checkpoint):
    lm = LlavaOneVisionCompressed(pretrained=str(tiny_checkpoint), method="full", device="cpu")
    assert isinstance(lm.method, Full)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "dycokee"}, "valid method options: dycoke, dycoke_no_dp, dycoke_random, fastv, full, prumerge"),
        ({"frames": 0}, "frames=0"),
        ({"batch_size": 4}, "batch_size=4"),
        ({"colour": "red"}, "unknown model_args ['colour']"),
        ({"dtype": "float77"}, "dtype='float77'"),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_value(tiny_checkpoint, kwargs, message):
    with pytest.raises(ConfigError) as error:
        LlavaOneVisionCompressed(pretrained=str(tiny_checkpoint), device="cpu", **kwargs)
    assert message in str(error.value)


def test_output_is_cut_at_the_tasks_stop_strings():
    assert _truncate_at_stop_strings("B. cat\nASSISTANT: more", ["ASSISTANT:"]) == "B. cat\n"
    assert _truncate_at_stop_strings("no stop here", None) == "no stop here"
    assert _truncate_at_stop_strings("a||b", "||") == "a"
