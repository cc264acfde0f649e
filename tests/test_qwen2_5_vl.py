"""The Qwen2.5-VL adapter on the tiny checkpoint: the adapter's path is HF's own, and pruned tokens keep their M-RoPE ids."""

import json

import pytest
import torch
from qwen_clips import random_frames, run_from_a_video_file, timing
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from dycoke_eval.config import ConfigError
from dycoke_eval.methods.fastvid import FastVID
from dycoke_eval.models.qwen2_5_vl import Qwen2_5_VLAdapter, released_text_positions
from dycoke_eval.offline.tiny_qwen import build_tiny_qwen_checkpoint

QUESTION = "What happens?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen2_5_vl"), "qwen2_5_vl")


@pytest.fixture(scope="module")
def adapter(checkpoint):
    path = checkpoint
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, local_files_only=True).eval()
    return Qwen2_5_VLAdapter(model, AutoProcessor.from_pretrained(path, local_files_only=True))


def frames(count=8):
    return random_frames(count, 56, 84)


def encoded_of(adapter, video):
    with torch.no_grad():
        return adapter.encode(adapter.preprocess(video, timing(len(video))))


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
    """HF's own path: the processor on the templated text and the frames, told when they were sampled."""
    text = adapter.render_prompt("checkpoint", QUESTION)
    shown = timing(len(video))
    metadata = {"fps": shown.fps, "total_num_frames": shown.frame_count, "frames_indices": list(shown.indices)}
    return adapter.processor(text=[text], videos=[video], video_metadata=[metadata], return_tensors="pt")


def hf_mrope(adapter, inputs):
    positions, _ = adapter.model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"], attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    return positions


@pytest.fixture
def installed_numbering(adapter):
    """The adapter numbering positions as the installed transformers does, for this test."""
    adapter.use_settings(position_numbering="installed")
    yield adapter
    adapter.use_settings(position_numbering="released")


def test_unpruned_path_is_hfs_own(installed_numbering):
    adapter, video = installed_numbering, frames()
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


def test_released_numbering_starts_the_text_after_the_video_past_its_largest_id_as_transformers_4_did(adapter):
    """docs/qwen.md, b: 6 text tokens, <|vision_start|>, a video of 3 temporal patches of 2x2 merged tokens, 1 s
    apart (2 ids a second), <|vision_end|>, 2 text tokens. transformers 4.51's get_rope_index numbers <|vision_end|>
    12 (the video's largest id, t = 11, + 1); 5.x numbers it 9 (7 + max(rows, cols))."""
    vision = [[7 + 2 * t for t in range(3) for _ in range(4)], [7 + i for _ in range(3) for i in (0, 0, 1, 1)],
              [7 + j for _ in range(3) for j in (0, 1, 0, 1)]]  # fmt: skip
    released = torch.tensor([[*range(7), *axis, 12, 13, 14] for axis in vision])[:, None]
    video_id, start_id, end_id = (adapter.config.video_token_id, adapter.config.vision_start_token_id,
                                  adapter.config.vision_end_token_id)  # fmt: skip
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, start_id, *[video_id] * 12, end_id, 7, 8]])
    installed, _ = adapter.model.model.get_rope_index(
        ids, (ids == video_id).int() * 2, video_grid_thw=torch.tensor([[3, 4, 4]]),
        second_per_grid_ts=torch.tensor([1.0]), attention_mask=torch.ones_like(ids),
    )  # fmt: skip
    assert installed[:, 0, -3:].tolist() == [[9, 10, 11]] * 3  # 5.x, as docs/qwen.md reports it
    assert torch.equal(released_text_positions(installed, ids[0] == video_id), released)


def test_released_numbering_moves_only_the_text_after_the_video(adapter):
    """The default numbering: HF's ids for the vision and the text before it, the text after shifted as one block."""
    video = frames()
    ours, theirs = adapter_inputs(adapter, video), hf_inputs(adapter, video)
    mrope, start = hf_mrope(adapter, theirs), ours.visual_start
    got = ours.kwargs["position_ids"][1:]
    assert torch.equal(got[:, :, : start + 24], mrope[:, :, : start + 24])
    shift = got[:, :, start + 24 :] - mrope[:, :, start + 24 :]
    assert shift.unique().tolist() == [int(mrope[:, :, start : start + 24].max()) + 1 - int(mrope[0, 0, start + 24])]


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


def test_model_info_and_fastvid_takes_the_family(adapter):
    info = adapter.model_info(adapter.config)
    assert info.family == "qwen2_5_vl" and info.signals == frozenset({"probe_attention", "attention_received", "probe_features"})
    assert info.layers == adapter.config.text_config.num_hidden_layers
    layout = Qwen2_5_VLAdapter.video_layout(adapter.config, 8)
    assert (layout.frames, layout.newlines, layout.full_tokens) == (4, "none", layout.grid_tokens)
    FastVID().validate_for(info)  # its released Qwen2.5-VL arithmetic (fastvid_qwen.py)
    with pytest.raises(ConfigError, match="mode='paper': FastVID on Qwen2.5-VL exists only as its released code"):
        FastVID(mode="paper").validate_for(info)


def test_paper_form_is_the_chat_template(adapter):
    assert adapter.render_prompt("paper", QUESTION) == adapter.render_prompt("checkpoint", QUESTION)
    assert "<|vision_start|><|video_pad|><|vision_end|>What happens?" in adapter.render_prompt("paper", QUESTION)


@pytest.mark.parametrize(
    ("name", "settings"), [("full", {}), ("random", {}), ("pooling", {}), ("dycoke", {}), ("fastv", {"layer": 2})]
)
def test_methods_run_through_the_wrapper_and_enter_the_llm_with_their_planned_tokens(checkpoint, tmp_path, name, settings):
    """The adapter is registered for the checkpoint's model_type; every kept token keeps its M-RoPE ids."""
    run_from_a_video_file(checkpoint, tmp_path, name, settings)


def test_the_app_runs_dycoke_on_the_tiny_qwen2_5_vl_and_refuses_fastvid_before_loading(offline_dir, tmp_path):
    """`model=tiny_qwen2_5_vl`: built offline like the LLaVA one; FastVID's paper form, which has no Qwen code, is one
    line before loading."""
    from conftest import run_app

    env = {"DYCOKE_OFFLINE_DIR": str(offline_dir)}
    proc = run_app("model=tiny_qwen2_5_vl", "method=dycoke", "limit=1", "frames=8", f"results_dir={tmp_path}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = tmp_path.rglob("results.json")
    for task in json.loads(results_file.read_text())["dycoke_eval"].values():
        assert task["visual_tokens_in_mean"] < task["visual_tokens_full_mean"] and 0 < task["retained_ratio_mean"] < 1
    refused = run_app("model=tiny_qwen2_5_vl", "method=fastvid", "method.mode=paper", f"results_dir={tmp_path}", env=env)
    (line,) = refused.stderr.splitlines()
    assert refused.returncode == 2 and "FastVID on Qwen2.5-VL exists only as its released code" in line


def test_pixel_bounds_set_the_grid_and_each_sample_records_its_grid_rate_and_bounds(checkpoint, tmp_path):
    """`model.min_pixels`/`max_pixels` bound each frame's resize; the record says what the sample got."""
    from test_wrapper import GREEDY, make_requests
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    from dycoke_eval.offline.videos import FPS, HEIGHT, WIDTH, write_video
    from dycoke_eval.wrapper import CompressedVideoLM

    video = str(write_video(tmp_path / "clip.mp4"))
    grids = {}
    for bounds in [(None, None), (112 * 112, 112 * 112)]:
        lm = CompressedVideoLM(pretrained=str(checkpoint), frames=8, device="cpu", method="full",
                               min_pixels=bounds[0], max_pixels=bounds[1])  # fmt: skip
        lm.generate_until(make_requests(lm, [video], GREEDY))
        (record,) = lm.sample_records
        assert record.video_fps == pytest.approx(FPS) and record.token_grid[0] == 4  # 8 frames, 4 temporal patches
        assert record.visual_tokens_full == record.token_grid[0] * record.token_grid[1] * record.token_grid[2]
        grids[bounds] = record.token_grid
    size = lm.processor.video_processor.size
    assert record.pixel_bounds == {"min_pixels": 112 * 112, "max_pixels": 112 * 112} != {
        "min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]}  # fmt: skip
    height, width = smart_resize(HEIGHT, WIDTH, factor=28, min_pixels=112 * 112, max_pixels=112 * 112)  # HF's (Qwen's) rule
    assert grids[112 * 112, 112 * 112] == [4, height // 28, width // 28] != grids[None, None]  # merged tokens of 28x28 px


def test_pixel_bounds_and_numbering_are_refused_for_a_fixed_size_family_and_when_wrong(adapter, tiny_checkpoint):
    from dycoke_eval.wrapper import CompressedVideoLM

    with pytest.raises(ConfigError, match=r"min_pixels=100 > model.max_pixels=50"):
        adapter.check_settings(100, 50)
    with pytest.raises(ConfigError, match=r"position_numbering='4.51': use released .* or installed"):
        adapter.check_settings(position_numbering="4.51")
    with pytest.raises(ConfigError, match="llava_onevision family numbers positions one way"):
        CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", method="full", position_numbering="released")
    with pytest.raises(ConfigError, match="llava_onevision family resizes every frame"):
        CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", method="full", max_pixels=1000)
