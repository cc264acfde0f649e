"""The Qwen2.5-VL adapter on the tiny checkpoint: the adapter's path is HF's own, and pruned tokens keep their M-RoPE ids."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from dycoke_eval.config import ConfigError
from dycoke_eval.methods.fastvid import FastVID
from dycoke_eval.models.qwen2_5_vl import Qwen2_5_VLAdapter
from dycoke_eval.offline.tiny_qwen import build_tiny_qwen_checkpoint

QUESTION = "What happens?"
FPS = 1.0  # not the 2.0 default, so a dropped fps would show in the temporal ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen2_5_vl"), "qwen2_5_vl")


@pytest.fixture(scope="module")
def adapter(checkpoint):
    path = checkpoint
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, local_files_only=True).eval()
    return Qwen2_5_VLAdapter(model, AutoProcessor.from_pretrained(path, local_files_only=True))


def frames(count=8, height=56, width=84):
    return np.random.default_rng(0).integers(0, 255, (count, height, width, 3), dtype=np.uint8)


def encoded_of(adapter, video):
    with torch.no_grad():
        return adapter.encode(adapter.preprocess(video, fps=FPS))


def adapter_inputs(adapter, video, keep=None):
    """The wrapper's path: preprocess -> encode -> keep grid tokens `keep` (None: all) -> assemble -> generation_inputs."""
    prompt_ids = adapter.tokenizer(adapter.render_prompt("checkpoint", QUESTION), return_tensors="pt")["input_ids"][0]
    encoded = encoded_of(adapter, video)
    flat = encoded.grid.flatten(0, 1)
    index = torch.arange(flat.shape[0]) if keep is None else keep
    visual, positions = adapter.assemble(encoded, flat[index], index)
    return adapter.generation_inputs(
        prompt_ids, visual, None if keep is None else positions, encoded.layout.full_tokens, encoded=encoded
    )


def hf_inputs(adapter, video):
    """HF's own path: the processor on the templated text and the frames, told their sampling fps."""
    text = adapter.render_prompt("checkpoint", QUESTION)
    metadata = {"fps": FPS, "total_num_frames": len(video), "frames_indices": list(range(len(video)))}
    return adapter.processor(text=[text], videos=[video], video_metadata=[metadata], return_tensors="pt")


def hf_mrope(adapter, inputs):
    positions, _ = adapter.model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"], attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    return positions


def test_unpruned_path_is_hfs_own(adapter):
    video = frames()
    ours, theirs = adapter_inputs(adapter, video), hf_inputs(adapter, video)
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    mrope = hf_mrope(adapter, theirs)
    assert torch.equal(ours.kwargs["position_ids"][1:], mrope)
    video_token, start = adapter.config.video_token_id, ours.visual_start
    assert mrope[0, 0, start : start + 24 : 6].diff().tolist() == [4, 4, 4]  # 2 s per temporal patch at 1 fps, 2 ids/s
    assert ours.visual_length == int((theirs["input_ids"] == video_token).sum()) == 4 * 2 * 3
    assert int(ours.input_ids[0, start]) == video_token != int(ours.input_ids[0, start - 1])
    with torch.no_grad():
        expected = adapter.model(**theirs).logits
        adapter.model.model.rope_deltas = None
        got = adapter.model(**ours.kwargs).logits
    assert torch.equal(got, expected)


def test_kept_tokens_keep_their_unpruned_positions(adapter):
    video = frames()
    full = adapter_inputs(adapter, video)
    adapter.model.model.rope_deltas = torch.tensor([[5]])  # a previous sample's state
    keep = torch.randperm(24, generator=torch.Generator().manual_seed(0))[:12].sort().values
    pruned = adapter_inputs(adapter, video, keep)
    start, full_ids = full.visual_start, full.kwargs["position_ids"][1:, 0]
    ids = pruned.kwargs["position_ids"]
    assert adapter.model.model.rope_deltas is None
    assert ids.shape == (4, 1, full_ids.shape[1] - 12)
    assert torch.equal(ids[0, 0], torch.arange(ids.shape[2]))
    assert torch.equal(ids[1:, 0, :start], full_ids[:, :start])
    assert torch.equal(ids[1:, 0, start : start + 12], full_ids[:, start + keep])
    assert torch.equal(ids[1:, 0, start + 12 :], full_ids[:, start + 24 :])
    assert int((pruned.input_ids == adapter.config.video_token_id).sum()) == 12
    shuffled = adapter_inputs(adapter, video, keep.flip(0)).kwargs  # a stage may hand kept tokens over in any order
    assert torch.equal(shuffled["position_ids"], ids) and torch.equal(shuffled["input_ids"], pruned.input_ids)
    in_grid_order = pruned.kwargs["mm_encoder_outputs"]["video"].pooler_output[0]
    assert torch.equal(shuffled["mm_encoder_outputs"]["video"].pooler_output[0], in_grid_order)
    output = adapter.model.generate(**pruned.kwargs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] > pruned.input_ids.shape[1]
    prompt_ids = adapter.tokenizer(adapter.render_prompt("checkpoint", QUESTION), return_tensors="pt")["input_ids"][0]
    with pytest.raises(ValueError, match="needs every kept token's grid position"):
        adapter.generation_inputs(prompt_ids, torch.zeros(12, 64), None, 24, encoded=encoded_of(adapter, video))
    with pytest.raises(ValueError, match="pass encoded="):
        adapter.generation_inputs(prompt_ids, torch.zeros(24, 64), None, 24)


def test_odd_frame_count_names_the_fix(adapter):
    with pytest.raises(ConfigError, match=r"frames=7: .*e\.g\. frames=8$") as error:
        adapter.preprocess(frames(7))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="frames=9"):
        Qwen2_5_VLAdapter.video_layout(adapter.config, 9)


def test_model_info_and_fastvid_refuses_the_family(adapter):
    info = adapter.model_info(adapter.config)
    assert info.family == "qwen2_5_vl" and info.signals == frozenset()
    assert info.layers == adapter.config.text_config.num_hidden_layers
    layout = Qwen2_5_VLAdapter.video_layout(adapter.config, 8)
    assert (layout.frames, layout.newlines, layout.full_tokens) == (4, "none", layout.grid_tokens)
    with pytest.raises(ConfigError, match="'qwen2_5_vl' model family"):
        FastVID().validate_for(info)


def test_paper_form_is_the_chat_template(adapter):
    assert adapter.render_prompt("paper", QUESTION) == adapter.render_prompt("checkpoint", QUESTION)
    assert "<|vision_start|><|video_pad|><|vision_end|>What happens?" in adapter.render_prompt("paper", QUESTION)


@pytest.mark.parametrize(
    ("name", "settings"), [("full", {}), ("random", {}), ("pooling", {}), ("dycoke", {}), ("fastv", {"layer": 2})]
)
def test_methods_run_through_the_wrapper_and_enter_the_llm_with_their_planned_tokens(checkpoint, tmp_path, name, settings):
    """The adapter is registered for the checkpoint's model_type; every kept token keeps its M-RoPE ids."""
    from test_wrapper import GREEDY, make_requests

    from dycoke_eval.config import method_from_config
    from dycoke_eval.geometry import PlannedCounts
    from dycoke_eval.offline.videos import write_video
    from dycoke_eval.video_frames import sample_video
    from dycoke_eval.wrapper import CompressedVideoLM

    method = method_from_config(name, settings)
    lm = CompressedVideoLM(pretrained=str(checkpoint), frames=8, device="cpu", method=method)
    video = str(write_video(tmp_path / "clip.mp4"))
    lm.generate_until(make_requests(lm, [video], GREEDY))
    (record,) = lm.sample_records
    layout = lm.adapter.encode(lm.adapter.preprocess(sample_video(video, 8).frames)).layout  # this video's grid
    assert record.frames == 8 and record.visual_tokens_full == layout.full_tokens
    planned = method.plan(PlannedCounts.full(layout, lm.adapter.dims().layers))
    assert record.prefill_visual_by_layer == pytest.approx(planned.prefill, abs=1)  # FastV's plan is nominal


def test_the_app_runs_dycoke_on_the_tiny_qwen2_5_vl_and_refuses_fastvid_before_loading(offline_dir, tmp_path):
    """`model=tiny_qwen2_5_vl`: built offline like the LLaVA one; a method without released Qwen arithmetic is one line."""
    from conftest import run_app

    env = {"DYCOKE_OFFLINE_DIR": str(offline_dir)}
    proc = run_app("model=tiny_qwen2_5_vl", "method=dycoke", "limit=1", "frames=8", f"results_dir={tmp_path}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = tmp_path.rglob("results.json")
    for task in json.loads(results_file.read_text())["dycoke_eval"].values():
        assert task["visual_tokens_in_mean"] < task["visual_tokens_full_mean"] and 0 < task["retained_ratio_mean"] < 1
    refused = run_app("model=tiny_qwen2_5_vl", "method=fastvid", f"results_dir={tmp_path}", env=env)
    (line,) = refused.stderr.splitlines()
    assert refused.returncode == 2 and "'qwen2_5_vl' model family" in line
