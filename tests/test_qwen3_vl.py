"""The Qwen3-VL adapter on the tiny checkpoint: the adapter's path is HF's own (timestamps, DeepStack), and pruned
tokens keep their M-RoPE ids and their DeepStack rows."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from qwen_clips import random_frames, run_from_a_video_file, timing
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

from dycoke_eval.config import CONF_DIR, ConfigError
from dycoke_eval.methods.fastvid import FastVID
from dycoke_eval.models import adapter_class, planning_geometry
from dycoke_eval.models.qwen3_vl import Qwen3VLAdapter
from dycoke_eval.offline.tiny_qwen import build_tiny_qwen_checkpoint

QUESTION = "What happens?"
PATCHES, PER_PATCH = 4, 4  # 8 frames of 64x64 px: 4 temporal patches of 2x2 merged tokens
TOKENS = PATCHES * PER_PATCH


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_qwen_checkpoint(tmp_path_factory.mktemp("tiny-qwen3_vl"), "qwen3_vl")


@pytest.fixture(scope="module")
def adapter(checkpoint):
    model = Qwen3VLForConditionalGeneration.from_pretrained(checkpoint, local_files_only=True).eval()
    return Qwen3VLAdapter(model, AutoProcessor.from_pretrained(checkpoint, local_files_only=True))


def frames(count=8, height=64, width=64):
    return random_frames(count, height, width)


def encoded_of(adapter, video):
    with torch.no_grad():
        return adapter.encode(adapter.preprocess(video, timing(len(video))))


def prompt_ids_of(adapter):
    return adapter.tokenizer(adapter.render_prompt("checkpoint", QUESTION), return_tensors="pt")["input_ids"][0]


def adapter_inputs(adapter, video, keep=None):
    """The wrapper's path: preprocess -> encode -> keep grid tokens `keep` (None: all) -> assemble -> generation_inputs."""
    encoded = encoded_of(adapter, video)
    flat = encoded.grid.flatten(0, 1)
    index = torch.arange(flat.shape[0]) if keep is None else keep
    visual, positions = adapter.assemble(encoded, flat[index], index)
    return adapter.generation_inputs(
        prompt_ids_of(adapter), visual, None if keep is None else positions, encoded.layout.full_tokens, encoded=encoded
    )


def hf_inputs(adapter, video):
    """HF's own path: the processor on the templated text and the frames, told when they were sampled."""
    shown = timing(len(video))
    metadata = {"fps": shown.fps, "total_num_frames": shown.frame_count, "frames_indices": list(shown.indices)}
    text = adapter.render_prompt("checkpoint", QUESTION)
    return adapter.processor(text=[text], videos=[video], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt")


def hf_mrope(adapter, inputs):
    positions, _ = adapter.model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    return positions


def test_unpruned_path_is_hfs_own(adapter):
    video = frames()
    ours, theirs = adapter_inputs(adapter, video), hf_inputs(adapter, video)
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    text = adapter.tokenizer.decode(ours.input_ids[0])
    # frames 0, 34, 68, ... 239 of a 30 fps video: patches at (0 + 34/30)/2 = 0.57 s, (68 + 102)/60 = 2.83 s, ...
    for seconds in ("0.6", "2.8", "5.1", "7.4"):
        assert f"<{seconds} seconds><|vision_start|>" + "<|video_pad|>" * PER_PATCH + "<|vision_end|>" in text
    assert text.count("<|vision_start|>") == PATCHES + 1  # 5.x keeps the template's own around the block
    mrope = hf_mrope(adapter, theirs)
    assert torch.equal(ours.kwargs["position_ids"][1:], mrope)
    assert torch.equal(ours.kwargs["position_ids"][0, 0], torch.arange(ours.input_ids.shape[1]))
    video_token, start = adapter.config.video_token_id, ours.visual_start
    assert ours.visual_length == int((theirs["input_ids"] == video_token).sum()) == TOKENS
    assert int(ours.input_ids[0, start]) == video_token != int(ours.input_ids[0, start - 1])
    with torch.no_grad():
        expected = adapter.model(**theirs).logits
        adapter.model.model.rope_deltas = None
        got = adapter.model(**ours.kwargs).logits
    assert torch.equal(got, expected)


def test_kept_tokens_keep_their_unpruned_positions_and_deepstack_rows(adapter):
    """Every other token kept, and temporal patch 1 dropped whole: its timestamp and delimiters stay."""
    video = frames()
    full = adapter_inputs(adapter, video)
    keep = torch.tensor([0, 2, 8, 10, 12, 14])
    adapter.model.model.rope_deltas = torch.tensor([[5]])  # a previous sample's state
    pruned = adapter_inputs(adapter, video, keep)
    assert adapter.model.model.rope_deltas is None
    full_ids, video_token = full.input_ids[0], adapter.config.video_token_id
    kept_video = torch.zeros(TOKENS, dtype=torch.bool)
    kept_video[keep] = True
    kept = full_ids != video_token
    kept[full_ids == video_token] = kept_video
    assert torch.equal(pruned.input_ids[0], full_ids[kept])
    assert int((pruned.input_ids == video_token).sum()) == len(keep) == pruned.visual_length
    assert adapter.tokenizer.decode(pruned.input_ids[0]).count("<2.8 seconds><|vision_start|><|vision_end|>") == 1
    ids = pruned.kwargs["position_ids"]
    assert torch.equal(ids[0, 0], torch.arange(ids.shape[2]))
    assert torch.equal(ids[1:, 0], full.kwargs["position_ids"][1:, 0][:, kept])

    shuffled = adapter_inputs(adapter, video, keep.flip(0)).kwargs  # a stage may hand kept tokens over in any order
    assert torch.equal(shuffled["position_ids"], ids) and torch.equal(shuffled["input_ids"], pruned.input_ids)

    # The decoder gets, at the kept pads, HF's own DeepStack rows of the kept tokens (from the processor's pixels).
    theirs = hf_inputs(adapter, video)
    with torch.no_grad():
        reference = adapter.model.model.get_video_features(theirs["pixel_values_videos"], theirs["video_grid_thw"])
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs)

    hook = adapter.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.model(**shuffled)
    finally:
        hook.remove()
    assert torch.equal(seen["visual_pos_masks"], pruned.input_ids == video_token)
    assert len(seen["deepstack_visual_embeds"]) == len(adapter.config.vision_config.deepstack_visual_indexes)
    for passed, (layer,) in zip(seen["deepstack_visual_embeds"], reference.deepstack_features, strict=True):
        assert torch.equal(passed, layer[keep])
    output = adapter.model.generate(**pruned.kwargs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] > pruned.input_ids.shape[1]

    encoded = encoded_of(adapter, video)
    with pytest.raises(ValueError, match="needs every kept token's grid position"):
        adapter.generation_inputs(prompt_ids_of(adapter), torch.zeros(6, 64), None, TOKENS, encoded=encoded)
    with pytest.raises(ValueError, match="pass encoded="):
        adapter.generation_inputs(prompt_ids_of(adapter), torch.zeros(TOKENS, 64), None, TOKENS)


def test_odd_frame_count_names_the_fix(adapter):
    with pytest.raises(ConfigError, match=r"frames=7: Qwen3-VL .*e\.g\. frames=8$") as error:
        adapter.preprocess(frames(7))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="frames=9"):
        Qwen3VLAdapter.video_layout(adapter.config, 9)


def test_pixel_bounds_are_over_the_whole_video_and_unknown_timing_is_2_fps(adapter):
    bounded = Qwen3VLAdapter(adapter.model, adapter.processor)
    bounded.use_settings(None, 8 * 32 * 32)  # 8 frames of 32x32 px: one merged token per temporal patch
    pixels = bounded.preprocess(frames())
    assert pixels.grid_thw == (PATCHES, 2, 2)
    assert pixels.timestamps == (0.25, 1.25, 2.25, 3.25)  # frames 0..7 at 2 fps
    assert adapter.preprocess(frames()).grid_thw == (PATCHES, 4, 4)


def test_model_info_plans_and_fastvid_refuses_the_family(adapter):
    info = adapter.model_info(adapter.config)
    assert info.family == "qwen3_vl" and info.signals == frozenset()
    assert info.layers == adapter.config.text_config.num_hidden_layers
    assert adapter_class(adapter.config) is Qwen3VLAdapter
    layout = Qwen3VLAdapter.video_layout(adapter.config, 32)  # 640x360 px, well within the checkpoints' budget
    assert (layout.frames, layout.rows, layout.cols, layout.newlines) == (16, 11, 20, "none")
    model_cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_qwen3_vl.yaml")
    model_cfg.pretrained = "tiny-qwen3_vl"  # not read: its architecture gives the config
    dims, planned = planning_geometry(model_cfg, 8)
    assert planned.family == "qwen3_vl" and dims.layers == info.layers
    with pytest.raises(ConfigError, match="'qwen3_vl' model family"):
        FastVID().validate_for(info)


def test_paper_form_is_the_chat_template_without_a_system_turn(adapter):
    prompt = adapter.render_prompt("paper", QUESTION)
    assert prompt == adapter.render_prompt("checkpoint", QUESTION)
    assert prompt.startswith("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>")


@pytest.mark.parametrize(
    ("name", "settings"), [("dycoke", {}), ("dycoke_no_dp", {}), ("fastv", {"layer": 3}), ("prunevid", {"in_llm": True})]
)
def test_methods_acting_inside_the_llm_are_refused_naming_the_interleaved_timestamps(adapter, name, settings):
    from dycoke_eval.config import method_from_config

    with pytest.raises(ConfigError, match=r"'qwen3_vl' model family puts a timestamp .* choose a method acting before"):
        method_from_config(name, settings).validate_for(adapter.model_info(adapter.config))


@pytest.mark.parametrize(("name", "settings"), [("full", {}), ("random", {}), ("pooling", {}), ("dycoke_ttm", {})])
def test_methods_run_through_the_wrapper_and_enter_the_llm_with_their_planned_tokens(checkpoint, tmp_path, name, settings):
    """The adapter is registered for the checkpoint's model_type; every kept token keeps its M-RoPE ids."""
    lm = run_from_a_video_file(checkpoint, tmp_path, name, settings)
    assert isinstance(lm.adapter, Qwen3VLAdapter)


def test_the_app_runs_dycoke_on_the_tiny_qwen3_vl(offline_dir, tmp_path):
    """`model=tiny_qwen3_vl`: built offline in its own folder, like the tiny Qwen2.5-VL; DyCoke's TTM alone."""
    from conftest import run_app

    env = {"DYCOKE_OFFLINE_DIR": str(offline_dir)}
    proc = run_app("model=tiny_qwen3_vl", "method=dycoke_ttm", "limit=1", "frames=8", f"results_dir={tmp_path}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (offline_dir / "tiny-qwen3_vl" / "model.safetensors").exists()
    (results_file,) = tmp_path.rglob("results.json")
    for task in json.loads(results_file.read_text())["dycoke_eval"].values():
        assert task["visual_tokens_in_mean"] < task["visual_tokens_full_mean"] and 0 < task["retained_ratio_mean"] < 1


def test_the_app_refuses_in_one_line_before_loading_what_the_model_cannot_do(tmp_path):
    """Checked from the model's config alone, dry runs included: no plan is written for a cell that would be refused."""
    from conftest import run_app

    for overrides, said in [
        (["model=qwen3_vl_8b", "method=fastv"], "'qwen3_vl' model family puts a timestamp"),
        (["model=qwen3_vl_8b", "method=dycoke_ttm", "+model.position_numbering=released"], "qwen3_vl family numbers"),
        (["model=llava_ov_7b", "method=full", "+model.max_pixels=1000"], "llava_onevision family resizes every frame"),
    ]:
        proc = run_app(*overrides, "frames=32", "dry_run=true", f"results_dir={tmp_path}")
        (line,) = proc.stderr.splitlines()
        assert proc.returncode == 2 and said in line, line
    assert not list(tmp_path.rglob("plan.csv"))
