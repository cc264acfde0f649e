"""Model adapters: geometry and dimensions from the HF config, encoder signals, SigLIP's pooling head,
LLaVA-Video's layout, generate's inputs."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT, run_app
from layouts import layout
from omegaconf import OmegaConf

from dycoke_eval.config import CONF_DIR, ConfigError
from dycoke_eval.models import adapter_class, planning_geometry
from dycoke_eval.models.base import EncodedVideo
from dycoke_eval.models.llava_onevision import LlavaOneVisionAdapter
from dycoke_eval.models.llava_video import LlavaVideoAdapter, average_pool
from dycoke_eval.models.siglip_head import SiglipPoolingHead, load_siglip_head
from dycoke_eval.offline.architectures import SIGLIP_SO400M_HEAD, architecture_config
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.wrapper import CompressedVideoLM

HEAD_KEYS = {f"vision_model.post_layernorm.{p}" for p in ("weight", "bias")} | {
    f"vision_model.head.{name}"
    for name in (
        "probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight", "attention.out_proj.bias",
        "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    )
}  # fmt: skip


@pytest.mark.parametrize(
    "architecture, dims",  # docs/flops.md#model-dimensions: Qwen2 hidden size, FFN width and layers of each LLaVA-OV size
    [("0.5b", (896, 4864, 24)), ("7b", (3584, 18944, 28)), ("72b", (8192, 29568, 80)), ("tiny", (64, 128, 8))],
)
def test_dimensions_and_layout_come_from_the_hf_config(architecture, dims):
    config = architecture_config(architecture)
    adapter = adapter_class(config)
    assert adapter is LlavaOneVisionAdapter
    found = adapter.dimensions(config)
    assert (found.hidden, found.ffn, found.layers) == dims
    layout = adapter.video_layout(config, 32)
    side = 4 if architecture == "tiny" else 14  # 27x27 SigLIP patches (7x7 tiny) pooled 2x2, rounded up
    assert (layout.rows, layout.cols, layout.newlines) == (side, side, "video_end")
    assert layout.full_tokens == 32 * side * side + 1


def test_an_unsupported_model_family_names_the_supported_ones():
    families = "llava_onevision, qwen2_5_vl, qwen3_vl"
    with pytest.raises(ConfigError, match=f"'qwen2_vl' checkpoint; supported model families: {families}"):
        adapter_class(SimpleNamespace(model_type="qwen2_vl"), "Qwen/Qwen2-VL-7B-Instruct")


def test_llava_video_7b_from_its_model_config_169_tokens_and_13_newlines_a_frame():
    model_cfg = OmegaConf.load(CONF_DIR / "model" / "llava_video_7b.yaml")
    config = architecture_config(model_cfg.architecture)
    adapter = adapter_class(config, model_cfg.pretrained, model_cfg.adapter)
    assert adapter is LlavaVideoAdapter and adapter_class(config) is LlavaOneVisionAdapter  # the same model_type
    dims, layout = planning_geometry(model_cfg, 64)
    assert (dims.hidden, dims.ffn, dims.layers) == (3584, 18944, 28)  # Qwen2-7B
    assert (layout.rows, layout.cols, layout.newlines) == (13, 13, "row_end")  # avg_pool2d(2): 27 -> 13
    assert layout.tokens_per_frame == 169 and layout.full_tokens // 64 == 182
    assert (layout.grid_tokens, layout.full_tokens) == (10816, 11648)  # FastVID Table 1: 10816 video tokens


@pytest.mark.parametrize(
    "name, model_type, message",
    [("llava_vid", "llava_onevision", "model.adapter='llava_vid'"), ("llava_video", "qwen2_5_vl", "a 'qwen2_5_vl' checkpoint")],
)
def test_a_named_adapter_must_exist_and_load_the_checkpoint(name, model_type, message):
    with pytest.raises(ConfigError, match=message) as error:
        adapter_class(SimpleNamespace(model_type=model_type), "some/checkpoint", name)
    assert "llava_video (llava_onevision)" in str(error.value)


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint):
    return CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu").adapter


@pytest.fixture(scope="module")
def pixels(adapter):
    return adapter.preprocess(synthetic_frames("adapter")[:4])


def test_encoding_captures_only_the_requested_signals_pooled_like_the_features(adapter, pixels):
    with torch.inference_mode():
        plain = adapter.encode(pixels)
        captured = adapter.encode(pixels, frozenset({"keys", "attention_received"}))
        reference = adapter.model.get_video_features(pixels, vision_feature_layer=-1, vision_feature_select_strategy="full")
    assert plain.signals == {} and plain.grid.shape == (4, 16, 64) and plain.newline.shape == (64,)
    features = reference.pooler_output[0]  # HF's own video path: pooled tokens, then the one newline
    assert torch.equal(plain.grid.flatten(0, 1), features[:-1]) and torch.equal(plain.newline, features[-1])
    torch.testing.assert_close(captured.grid, plain.grid)  # capturing changes nothing the model computes
    assert captured.signals["attention_received"].shape == (4, 16)
    assert captured.signals["keys"].shape == (4, 16, 32)  # heads x head dim of the tiny SigLIP
    with pytest.raises(ValueError, match="probe_attention.*set model.siglip_head"):
        adapter.encode(pixels, frozenset({"probe_attention"}))  # the llava-hf towers drop the pooling head


def test_unpooled_signals_are_per_patch_and_pool_to_the_pooled_ones(adapter, pixels):
    names = {"keys", "attention_received", "patch_features", "patch_keys", "patch_attention_received"}
    with torch.inference_mode():
        encoded = adapter.encode(pixels, frozenset(names))
        hidden = adapter.vision_tower(pixels[0], output_hidden_states=True).hidden_states[-1]
        projected = adapter.model.model.multi_modal_projector(hidden)
    signals = encoded.signals
    assert set(signals) == names
    assert signals["patch_features"].shape == (4, 49, 64) and torch.equal(signals["patch_features"], projected)
    assert signals["patch_keys"].shape == (4, 49, 32) and signals["patch_attention_received"].shape == (4, 49)
    torch.testing.assert_close(signals["patch_attention_received"].sum(-1), torch.ones(4))  # a softmax's mean over queries
    torch.testing.assert_close(adapter.pool(signals["patch_features"]), encoded.grid)
    torch.testing.assert_close(adapter.pool(signals["patch_keys"]), signals["keys"])
    torch.testing.assert_close(adapter.pool(signals["patch_attention_received"]), signals["attention_received"])


def test_the_siglip_so400m_head_has_the_papers_15_2m_parameters():
    from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

    with torch.device("meta"):  # shapes only: no weights, no download
        head = SiglipPoolingHead.build(SiglipVisionConfig(**SIGLIP_SO400M_HEAD))
    assert sum(p.numel() for p in head.head.parameters()) == 15_238_352  # FastVID's "15.2M"
    assert sum(p.numel() for p in head.post_layernorm.parameters()) == 2 * 1152  # read with it


def test_the_head_is_read_alone_from_a_whole_siglip_checkpoint(tiny_siglip_head, monkeypatch):
    import safetensors

    opened, read = safetensors.safe_open, []

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = opened(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    with opened(str(tiny_siglip_head / "model.safetensors"), framework="pt") as weights:
        stored = {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118
    assert any(k.startswith("text_model.") for k in stored) and any(k.startswith("vision_model.encoder.") for k in stored)
    monkeypatch.setattr(safetensors, "safe_open", Recording)
    head = load_siglip_head(str(tiny_siglip_head), 32, "cpu", torch.float32)
    assert sorted(read) == sorted(HEAD_KEYS)
    for key, value in head.state_dict().items():
        assert torch.equal(value, stored[f"vision_model.{key}"]), key


def probe_by_formula(hidden: torch.Tensor, weights: dict[str, torch.Tensor], heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FastVID's vision abstract written out: LN_post, the probe's multi-head attention (head mean), G = o + MLP(LN(o))."""
    w = {key.removeprefix("vision_model."): value for key, value in weights.items()}
    channels = hidden.shape[-1]
    x = torch.nn.functional.layer_norm(hidden, (channels,), w["post_layernorm.weight"], w["post_layernorm.bias"], eps=1e-6)
    wq, wk, wv = w["head.attention.in_proj_weight"].chunk(3)
    bq, bk, bv = w["head.attention.in_proj_bias"].chunk(3)
    q = (w["head.probe"][0] @ wq.T + bq).view(1, heads, -1).transpose(0, 1)  # [heads, 1, d]
    k = (x @ wk.T + bk).view(*x.shape[:2], heads, -1).transpose(1, 2)  # [F, heads, P, d]
    v = (x @ wv.T + bv).view(*x.shape[:2], heads, -1).transpose(1, 2)
    attention = (q @ k.transpose(-1, -2) / math.sqrt(channels // heads)).softmax(-1)  # [F, heads, 1, P]
    o = (attention @ v).transpose(1, 2).flatten(2) @ w["head.attention.out_proj.weight"].T + w["head.attention.out_proj.bias"]
    normed = torch.nn.functional.layer_norm(o, (channels,), w["head.layernorm.weight"], w["head.layernorm.bias"], eps=1e-6)
    hidden_mlp = torch.nn.functional.gelu(normed @ w["head.mlp.fc1.weight"].T + w["head.mlp.fc1.bias"], approximate="tanh")
    g = o + hidden_mlp @ w["head.mlp.fc2.weight"].T + w["head.mlp.fc2.bias"]
    return attention.mean(1)[:, 0], g[:, 0]


@pytest.mark.parametrize("adapter_name", [None, "llava_video"])
def test_probe_signals_equal_the_formula_on_the_last_kept_layer(tiny_checkpoint, tiny_siglip_head, adapter_name):
    lm = CompressedVideoLM(
        pretrained=str(tiny_checkpoint), frames=4, device="cpu", adapter=adapter_name, siglip_head=str(tiny_siglip_head)
    )
    adapter = lm.adapter
    pixels = adapter.preprocess(synthetic_frames("probe")[:4])
    with torch.inference_mode():
        encoded = adapter.encode(pixels, frozenset({"probe_attention", "probe_features"}))
        hidden = adapter.vision_tower(pixels[0], output_hidden_states=True).hidden_states[-1]  # before any post-layernorm
    from safetensors.torch import load_file

    weights = load_file(tiny_siglip_head / "model.safetensors")
    assert not torch.equal(weights["vision_model.post_layernorm.weight"], adapter.vision_tower.post_layernorm.weight)
    attention, features = probe_by_formula(hidden, weights, heads=2)
    torch.testing.assert_close(encoded.signals["probe_features"], features)  # G [F, C], one per frame
    if adapter_name is None:  # pooled as OneVision pools its features: bilinear 7x7 -> 4x4
        pooled = torch.nn.functional.interpolate(attention.view(4, 1, 7, 7), size=(4, 4), mode="bilinear").reshape(4, -1)
    else:  # as LLaVA-Video does: 2x2 block means, the last row and column dropped
        pooled = block_means(attention.view(4, 7, 7, 1))[..., 0]
    torch.testing.assert_close(encoded.signals["probe_attention"], pooled)


def test_probe_signals_are_reported_only_with_a_head(adapter, tiny_siglip_head):
    config = adapter.config
    assert not {"probe_attention", "probe_features"} & adapter.available_signals(config)
    assert {"probe_attention", "probe_features"} <= adapter.available_signals(config, siglip_head=True)
    assert {"probe_attention", "probe_features"} <= LlavaVideoAdapter.available_signals(config, siglip_head=True)


def test_an_unreadable_head_names_the_setting_and_the_fix(tiny_checkpoint, tiny_siglip_head, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cases = [
        (str(tmp_path / "missing"), "no such folder"),
        (str(tmp_path), "without config.json and \\*.safetensors"),
        (str(tiny_checkpoint), "has no pooling head"),  # a LLaVA checkpoint: its tower dropped the head
        ("google/siglip-so400m-patch14-384", "could not be read.*hf download google/siglip-so400m-patch14-384"),
    ]
    for source, message in cases:
        with pytest.raises(ConfigError, match=f"model.siglip_head=.*{message}"):
            load_siglip_head(source, 32, "cpu", torch.float32)
    with pytest.raises(ConfigError, match="hidden size 32, the model's vision tower 1152"):
        load_siglip_head(str(tiny_siglip_head), 1152, "cpu", torch.float32)
    from dycoke_eval.methods.prumerge import PruMerge

    with pytest.raises(ConfigError, match="could not be read"):  # before the first sample, when the method needs it
        CompressedVideoLM(
            pretrained=str(tiny_checkpoint), device="cpu", siglip_head="google/siglip-so400m-patch14-384",
            method=PruMerge(score_source="pooling_head"),
        )  # fmt: skip


@pytest.fixture(scope="module")
def video_adapter(tiny_checkpoint):
    return CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=2, device="cpu", adapter="llava_video").adapter


def block_means(grid: torch.Tensor) -> torch.Tensor:
    """[F, 7, 7, C] -> [F, 9, C]: means of the 2x2 blocks at rows and columns (0, 1), (2, 3), (4, 5); row, column 6 unused."""
    return torch.stack([grid[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean((1, 2)) for r in range(3) for c in range(3)], 1)


def test_llava_video_average_pooling_is_the_mean_of_2x2_blocks_without_the_last_row_and_column(video_adapter):
    values = torch.randn(2, 49, 5)
    torch.testing.assert_close(average_pool(values, 7), block_means(values.view(2, 7, 7, 5)))
    torch.testing.assert_close(video_adapter.pool(values[..., 0]), block_means(values.view(2, 7, 7, 5))[..., 0])  # [F, P] too


def test_the_tiny_llava_video_grid_is_3x3_with_a_newline_after_every_row(video_adapter):
    with torch.inference_mode():
        encoded = video_adapter.encode(video_adapter.preprocess(synthetic_frames("video")[:2]), frozenset({"patch_features"}))
    assert encoded.layout == layout(2, 3, 3, "llava_video") and encoded.layout.full_tokens == 2 * (9 + 3)
    torch.testing.assert_close(encoded.grid, average_pool(encoded.signals["patch_features"], 7))
    assert torch.equal(encoded.newline, video_adapter.model.model.image_newline)


def newline_layout(frames: int = 2) -> EncodedVideo:
    """Two frames of 3x3 tokens with features 1..18 (a token's feature is its grid index + 1), newline feature -1."""
    grid = torch.arange(1.0, frames * 9 + 1).view(frames, 9, 1)
    return EncodedVideo(grid=grid, layout=layout(frames, 3, 3, "llava_video"), newline=torch.tensor([-1.0]))


def test_llava_video_assembles_every_token_with_a_newline_after_each_row(video_adapter):
    encoded = newline_layout()
    visual, positions = video_adapter.assemble(encoded, encoded.grid.flatten(0, 1), torch.arange(18))
    n = -1.0
    expected = [1, 2, 3, n, 4, 5, 6, n, 7, 8, 9, n, 10, 11, 12, n, 13, 14, 15, n, 16, 17, 18, n]  # no newline beyond a last row's
    assert visual[:, 0].tolist() == expected
    assert positions.tolist() == list(range(24))


def test_llava_video_gives_kept_rows_their_newline_back_and_drops_empty_rows_newlines(video_adapter):
    encoded = newline_layout()
    kept = torch.tensor([7, 0, 2, 12, 14])  # rows 0, 2 and 4 keep tokens; rows 1, 3 and 5 keep none
    visual, positions = video_adapter.assemble(encoded, encoded.grid.flatten(0, 1)[kept], kept)
    n = -1.0
    assert visual[:, 0].tolist() == [1, 3, n, 8, n, 13, 15, n]  # grid order, a newline after each kept row
    # full sequence: row r starts at 4r (3 tokens + its newline); newlines at 4r + 3
    assert positions.tolist() == [0, 2, 3, 9, 11, 16, 18, 19]
    with pytest.raises(ValueError, match="no grid position"):
        video_adapter.assemble(encoded, encoded.grid[0], torch.tensor([0, 1, -1, 3, 4, 5, 6, 7, 8]))


@pytest.mark.parametrize("count", [1, 3])
def test_llava_video_lays_a_frame_end_layout_out_frame_by_frame_with_its_newlines_after_each_frame(video_adapter, count):
    """FlashVID's `mm_newline_position=frame` (1) and VidCom2's grid mapping (all rows' newlines after the frame's tokens),
    written out by hand: a frame that keeps nothing still gets its newlines, and the positions are numbered anew."""
    encoded = newline_layout(3)
    kept = torch.tensor([7, 0, 2, 20])  # frame 0 keeps 1, 3, 8; frame 1 nothing; frame 2 keeps 21
    visual, positions = video_adapter.assemble(encoded, encoded.grid.flatten(0, 1)[kept], kept, frame_newlines=count)
    n = [-1.0] * count
    assert visual[:, 0].tolist() == [1, 3, 8, *n, *n, 21, *n]
    assert positions.tolist() == list(range(4 + 3 * count))


def test_llava_video_64_frames_lay_out_11648_tokens():
    config = architecture_config("video_7b")
    layout = LlavaVideoAdapter.video_layout(config, 64)
    encoded = EncodedVideo(grid=torch.zeros(64, 169, 1), layout=layout, newline=torch.ones(1))
    visual, positions = LlavaVideoAdapter(None, None).assemble(encoded, encoded.grid.flatten(0, 1), torch.arange(64 * 169))
    assert visual.shape[0] == 11648 and positions.tolist() == list(range(11648))
    assert (visual[:, 0] == 1).nonzero().flatten().tolist() == [14 * row + 13 for row in range(64 * 13)]


def test_the_offline_default_runs_end_to_end_on_the_llava_video_layout(offline_dir, tmp_path):
    proc = run_app(
        "model=tiny_video", "method=prumerge", "method.score_source=pooling_head", "tasks.names=[fixture_videomme]",
        "limit=2", "frames=4", f"results_dir={tmp_path}", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)}, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cell,) = (tmp_path / "cells").iterdir()
    assert cell.name.startswith("tiny_video__prumerge__f4__custom__")
    records = [json.loads(line) for line in (cell / "sample_records.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    for record in records:
        assert record["visual_tokens_full"] == 4 * 12  # 3x3 tokens and 3 newlines a frame
        kept = record["method_stats"]["prumerge_tokens_out"]
        assert kept < record["visual_tokens_in"] <= kept + 4 * 3  # plus the newlines of rows that kept a token


def test_generation_inputs_expand_the_one_video_placeholder(adapter):
    video_id = adapter.config.video_token_id
    prompt = torch.tensor([5, 6, video_id, 7])
    visual = torch.randn(3, 64)
    inputs = adapter.generation_inputs(prompt, visual, None, 10)
    assert inputs.input_ids[0].tolist() == [5, 6, video_id, video_id, video_id, 7]
    assert (inputs.visual_start, inputs.visual_length) == (2, 3) and "position_ids" not in inputs.kwargs
    kept = adapter.generation_inputs(prompt, visual, torch.tensor([1, 4, 9]), 10)
    assert kept.kwargs["position_ids"][0].tolist() == [0, 1, 3, 6, 11, 12]  # the text after the video starts at 2 + 10
    for bad, message in (([5, 6, 7], "no <video> placeholder"), ([video_id, 5, video_id], "more than one video")):
        with pytest.raises(ValueError, match=message):
            adapter.generation_inputs(torch.tensor(bad), visual, None, 10)


@pytest.mark.parametrize("feature_layer", [-1, -2, 0])
def test_the_projected_features_are_hfs_hidden_states_of_the_feature_layer_keeping_only_those(adapter, pixels, feature_layer,
                                                                                                monkeypatch):  # fmt: skip
    """The layers the features come from, captured from their modules, equal HF's `output_hidden_states` selection."""
    model, tower = adapter.model, adapter.vision_tower
    monkeypatch.setattr(model.config, "vision_feature_layer", feature_layer)
    with torch.inference_mode():
        features, last = adapter._project(pixels)
        hidden = tower(pixels.flatten(0, 1), output_hidden_states=True).hidden_states
        wanted = [feature_layer] if isinstance(feature_layer, int) else feature_layer
        selected = torch.cat([hidden[i] for i in wanted], dim=-1)
        if model.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        assert torch.equal(features, model.model.multi_modal_projector(selected)) and torch.equal(last, hidden[-1])


def test_the_benchmarks_real_sizes_are_the_layouts_their_models_plan():
    """`offline/real_size.SIZES` (bench_prellm, bench_gpu): each size is its architecture's own planned layout."""
    from dycoke_eval.offline.real_size import SIZES

    for size, (frames, rows, cols, newlines, family, architecture) in SIZES.items():
        config = architecture_config(architecture)
        sampled = frames * 2 if family.startswith("qwen") else frames  # Qwen-VL: two frames a temporal patch
        layout = adapter_class(config, name=family).video_layout(config, sampled)
        assert (layout.frames, layout.rows, layout.cols, layout.newlines, layout.family) == (
            frames, rows, cols, newlines, family), size  # fmt: skip
