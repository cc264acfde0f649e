"""Every method and stage, through the dispatcher and `generate` on the tiny model: one matrix over conf/method.

A new method adds its config (picked up by `METHODS`), a new stage one entry in `STAGES`, and, if it
keeps tokens in video order before the LLM, one line in `SHORTENING_METHODS`.
"""

import os
import subprocess
import sys
from dataclasses import dataclass, replace
from statistics import mean

import pytest
import torch
from layouts import tokens_of
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dycoke_eval.checkpoints import CheckpointLoader
from dycoke_eval.compression.dispatcher import Compressor
from dycoke_eval.compression.stages import CompressionMethod, DecodeStage, MidLayerStage, PrefillStage, PreLLMStage
from dycoke_eval.config import ConfigError, group_options, instantiate_method
from dycoke_eval.geometry import PlannedCounts
from dycoke_eval.methods.dycoke import DyCoke
from dycoke_eval.methods.dynamic_pruning import DynamicKVPruning
from dycoke_eval.methods.fastv import FastV, fastv_keep_count
from dycoke_eval.methods.fastvid import FastVID
from dycoke_eval.methods.flashvid import FlashVIDCompression
from dycoke_eval.methods.framefusion import FrameFusion
from dycoke_eval.methods.holitom import HoliTomInLLMMerge
from dycoke_eval.methods.pooling import Pooling
from dycoke_eval.methods.prumerge import PruMerge
from dycoke_eval.methods.prunevid import PruneVid
from dycoke_eval.methods.random_tokens import RandomTokens
from dycoke_eval.methods.tome import ToMe
from dycoke_eval.methods.ttm import TokenTemporalMerging, ttm_keep_indices
from dycoke_eval.methods.vidcom2 import VidCom2
from dycoke_eval.methods.visionzip import VisionZip
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.plumbing.attention import masked_attention, routed_attention
from dycoke_eval.wrapper import CompressedVideoLM, SampleRecord

FRAMES = 16
METHODS = group_options("method")
TINY_SETTINGS = {  # the released in-LLM layer of methods whose default is deeper than the tiny models' 8 layers
    "holitom": {"method.merge_layer": 3},
    "flashvid": {"method.pruning_layer": 3},
}


def tiny_method(name: str):
    """Method `name` from its config, with the settings that fit the tiny models (`TINY_SETTINGS`)."""
    return instantiate_method(name, TINY_SETTINGS.get(name))


IN_LLM_METHODS = [  # methods with a stage inside the LLM: only these take another path as the masked reference
    name for name in METHODS if any(isinstance(s, PrefillStage | DecodeStage | MidLayerStage) for s in tiny_method(name).stages())
]
NOMINAL_PLANS = {  # methods whose kept count depends on the video or rounds otherwise: their plan is the nominal count
    "prumerge": "each frame keeps its outliers' count, plus PruMerge+'s samples",
    "prumerge_official": "the outliers of all frames together set the count",
    "prunevid": "static tokens and cluster sizes depend on the video",
    "vidcom2": "each frame keeps round(budget * N) tokens (paper mode: ceil), capped and at least one: R * F * N before rounding",
    "holitom": "static windows depend on the video; the budget is re-scaled per video and rounded per window and frame",
    "flashvid": "each frame rounds its share of the spatial clusters up (one-frame segments too): F * budget or a few more",
}
LAYOUTS = {"llava_onevision": None, "llava_video": "llava_video"}  # the tiny checkpoint under each adapter: each layout
SHORTENING_METHODS = {  # pre-LLM methods whose kept tokens stay in video order: shortening == masking the rest
    "dycoke": DyCoke(k=0.7, mode="paper"),
    "prumerge": instantiate_method("prumerge"),
    "random": instantiate_method("random"),
    "pooling": instantiate_method("pooling"),
    "vidcom2": instantiate_method("vidcom2"),
}
BUILTIN_ATTENTION = set(AttentionInterface._global_mapping)
GREEDY_WITH_LOGITS = {
    "max_new_tokens": 10,
    "do_sample": False,
    "eos_token_id": None,
    "output_logits": True,
    "return_dict_in_generate": True,
}


@pytest.fixture(scope="module")
def lm(tiny_checkpoint, tiny_siglip_head):
    """The tiny model with SigLIP's pooling head attached, as `model=tiny` runs it (FastVID's signals)."""
    return CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=FRAMES, device="cpu", siglip_head=str(tiny_siglip_head))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def any_lm(request, tiny_checkpoint, tiny_siglip_head):
    """The tiny model under every adapter: LLaVA-OneVision's layout (one newline after the video) and LLaVA-Video's
    (a newline after every row)."""
    return CompressedVideoLM(
        pretrained=str(tiny_checkpoint),
        frames=FRAMES,
        device="cpu",
        adapter=LAYOUTS[request.param],
        siglip_head=str(tiny_siglip_head),
    )


def hooks(model) -> dict[str, set[int]]:
    """Every module's forward hooks and pre-hooks (transformers installs output-capturing hooks of its own)."""
    return {name: set(m._forward_pre_hooks) | set(m._forward_hooks) for name, m in model.named_modules()}


@pytest.fixture(scope="module")
def own_hooks(lm, video):
    """The hooks the model carries after a full-token run: what every method must leave behind."""
    run(lm, instantiate_method("full"), video)
    return hooks(lm.model)


@pytest.fixture(scope="module")
def video():
    return synthetic_frames("method-matrix")[:FRAMES]


def run(lm, method, video, reference=False, sample=""):
    lm.method = method
    if reference:
        lm.compressor = Compressor(lm.adapter, method, reference=True)
    record = SampleRecord("t", 0)
    output, _ = lm.run_sample(video, "What moves?", dict(GREEDY_WITH_LOGITS), record, sample)
    return output, record


def assert_fast_path_matches_masked_reference(lm, video, method):
    """Same kept sets, same logits at every step (fp32, 1e-4); returns the fast path's record."""
    fast, fast_record = run(lm, method, video)
    reference, reference_record = run(lm, method, video, reference=True)

    def selection(stats):  # what was kept; only the fast path holds pruned entries aside
        return {k: v for k, v in stats.items() if k != "kv_held_aside_bytes"}

    assert selection(fast_record.method_stats) == selection(reference_record.method_stats)
    assert fast_record.decode_visual_by_layer == reference_record.decode_visual_by_layer
    for fast_step, reference_step in zip(fast.logits, reference.logits, strict=True):
        torch.testing.assert_close(fast_step, reference_step, atol=1e-4, rtol=0)
    return fast_record


def assert_model_restored(lm, own_hooks):
    assert lm.model.config.text_config._attn_implementation == "sdpa"
    assert lm.model.config.vision_config._attn_implementation == "sdpa"
    assert set(AttentionInterface._global_mapping) == BUILTIN_ATTENTION
    assert hooks(lm.model) == own_hooks


@pytest.mark.parametrize("name", METHODS)
def test_every_method_generates_counts_its_tokens_and_leaves_the_model_as_it_found_it(lm, video, own_hooks, name):
    method = tiny_method(name)
    output, record = run(lm, method, video, sample="t/0")
    assert output.sequences.shape[1] > 0 and len(output.logits) == 10
    assert record.visual_tokens_in <= record.visual_tokens_full == lm.adapter.layout(FRAMES).full_tokens
    assert list(record.visual_tokens_by_stage) == [stage.name for stage in method.stages()]
    assert len(record.prefill_visual_by_layer) == len(record.decode_visual_by_layer) == 8
    assert 0 < record.retained_ratio <= 1
    assert_model_restored(lm, own_hooks)


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(NOMINAL_PLANS)))
def test_every_method_enters_the_llm_with_the_tokens_it_planned_on_every_layout(any_lm, video, name):
    """The plan (FLOPs columns, retained ratios) counts the grid tokens a method leaves; the run measures them."""
    method = tiny_method(name)
    _, record = run(any_lm, method, video, sample="t/0")
    layout = any_lm.adapter.layout(FRAMES)
    pre_llm = [stage.name for stage in method.stages() if isinstance(stage, PreLLMStage)]
    measured = record.visual_tokens_by_stage[pre_llm[-1]] if pre_llm else layout.grid_tokens
    assert method.plan(PlannedCounts.full(layout, 8)).prefill[0] == measured


def test_the_methods_with_a_nominal_plan_are_methods():
    assert set(NOMINAL_PLANS) <= set(METHODS)


def test_a_method_a_model_family_cannot_take_is_refused_before_it_runs_naming_both_and_the_alternative(tiny_checkpoint):
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=FRAMES, device="cpu", adapter="llava_video")
    with pytest.raises(ConfigError, match=r"prumerge_official: .* the llava_video model family .* use method=prumerge"):
        lm.method = instantiate_method("prumerge_official")


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def qwen_lm(request, tmp_path_factory):
    """A tiny Qwen-VL of each family (transformers' own classes), with no method yet."""
    from dycoke_eval.offline.tiny_qwen import build_tiny_qwen_checkpoint

    checkpoint = build_tiny_qwen_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return CompressedVideoLM(pretrained=str(checkpoint), frames=FRAMES, device="cpu", method="full")


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_on_every_tiny_qwen_model_with_the_tokens_it_planned_or_is_refused_naming_the_family(
    qwen_lm, video, name
):
    """Refused at configuration time in one line naming the family, or run: the tokens entering the LLM are the
    plan's on the sample's own grid (a Qwen-VL layout follows each video's resolution; the record says which)."""
    method = tiny_method(name)
    try:
        method.validate_for(qwen_lm.adapter.loaded_info())
    except ConfigError as error:
        assert repr(qwen_lm.adapter.family) in str(error) or f"{qwen_lm.adapter.family} " in str(error), str(error)
        assert "\n" not in str(error)
        return
    _, record = run(qwen_lm, method, video, sample="t/0")
    frames, rows, cols = record.token_grid
    layout = replace(qwen_lm.adapter.layout(FRAMES), frames=frames, rows=rows, cols=cols)
    assert record.visual_tokens_full == layout.grid_tokens and 0 < record.retained_ratio <= 1
    pre_llm = [stage.name for stage in method.stages() if isinstance(stage, PreLLMStage)]
    measured = record.visual_tokens_by_stage[pre_llm[-1]] if pre_llm else layout.grid_tokens
    planned = method.plan(PlannedCounts.full(layout, qwen_lm.adapter.dims().layers)).prefill[0]
    assert planned == measured or name in NOMINAL_PLANS


@pytest.mark.parametrize("name", METHODS)
def test_every_methods_name_is_its_configs_key(name):
    """One name per method: it names the cell folder, the records and the report row."""
    from hydra import compose, initialize_config_dir

    from dycoke_eval.config import CONF_DIR
    from dycoke_eval.store import cell_directory

    assert instantiate_method(name).name == name
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={name}"])
    assert cell_directory(cfg).name.split("__")[1] == name


@pytest.mark.parametrize("name", IN_LLM_METHODS)
def test_every_method_computes_the_same_selection_fast_and_as_the_masked_reference(lm, video, own_hooks, name):
    assert_fast_path_matches_masked_reference(lm, video, tiny_method(name))
    assert_model_restored(lm, own_hooks)


STAGES = [  # every stage on its own, as a method of one stage (PruneVid's in-LLM stage with the merge it selects within)
    TokenTemporalMerging(k=0.5),
    DynamicKVPruning(l=1, threshold=1.1),
    FastV(layer=2),
    PruMerge(variant="plus"),
    RandomTokens(ratio=0.3),
    Pooling(ratio=0.25),
    PruneVid(in_llm=True, selected_layer=2),
    VisionZip(form="in_encoder"),
    FastVID(mode="paper"),
    ToMe(metric="keys", key_heads=2),
    VidCom2(),
    HoliTomInLLMMerge(layer=2),
    FrameFusion(similarity_lower_bound=0.95),
    FlashVIDCompression(),
]


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_every_stage_alone_matches_its_masked_reference_and_leaves_the_model_as_it_found_it(lm, video, own_hooks, stage):
    record = assert_fast_path_matches_masked_reference(lm, video, stage)
    assert list(record.visual_tokens_by_stage) == [s.name for s in stage.stages()]
    assert_model_restored(lm, own_hooks)


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("settings", [{"l": 1}, {"l": 2, "one_shot": True}, {"l": 0, "threshold": 1.1}])
def test_dycoke_pruned_fast_path_gives_the_masked_references_logits(lm, video, mode, settings):
    assert_fast_path_matches_masked_reference(lm, video, DyCoke(k=0.5, p=0.7, mode=mode, **settings))


def test_dycoke_feeds_the_ttm_tokens_to_the_llm_and_prunes_decode_attention(lm, video):
    method = DyCoke(k=0.7, l=1, p=0.7, threshold=1.1)  # threshold > 1: re-select every step
    _, record = run(lm, method, video)
    ttm_count = len(ttm_keep_indices(torch.zeros(FRAMES, 16, 1), 0.7))
    assert record.visual_tokens_in == ttm_count + 1
    stats = record.method_stats
    assert stats["ttm_tokens_out"] == ttm_count and stats["decode_steps"] == 9 == stats["reselections"]
    pruned = int((ttm_count + 1) * 0.3)  # paper mode: the span is every visual token, the newline included
    assert stats["attended_visual_mean"] == pruned
    assert record.visual_tokens_by_stage == {"ttm": ttm_count, "dp": pruned}
    assert record.prefill_visual_by_layer == [ttm_count + 1] * 8
    assert record.decode_visual_by_layer == [ttm_count + 1] + [pruned] * 7
    by_layer = [(ttm_count + 1 + 9 * (ttm_count + 1)) / 10] + [(ttm_count + 1 + 9 * pruned) / 10] * 7
    assert record.retained_ratio == pytest.approx(mean(by_layer) / lm.adapter.layout(FRAMES).full_tokens)
    assert stats["kv_held_aside_bytes"] == 0  # the whole cache stays where it is; the pruned layers gather the kept keys
    assert method.describe()["paper_retained_ratio"] == pytest.approx(0.1425)


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_dycoke_offloading_pruned_entries_gives_the_masked_references_logits(lm, video, mode):
    record = assert_fast_path_matches_masked_reference(lm, video, DyCoke(k=0.5, p=0.7, l=1, mode=mode, offload_pruned=True))
    if mode == "paper":  # (official mode's last step here is a similar one, which brings every entry back)
        assert record.method_stats["kv_held_aside_bytes"] > 0  # layers above L hold the pruned entries on the CPU


def test_kv_cache_bytes_count_the_entries_held_aside(lm, video):
    lm.measure = True
    try:
        _, pruned = run(lm, DyCoke(k=0.0, l=1, p=0.7, threshold=1.1, offload_pruned=True), video)
        _, full = run(lm, instantiate_method("full"), video)
    finally:
        lm.measure = False
    assert pruned.method_stats["kv_held_aside_bytes"] > 0
    assert pruned.kv_cache_bytes == full.kv_cache_bytes  # K=0 keeps every token: the same entries, wherever they wait


def test_dycoke_without_pruning_says_what_full_says(lm, video):
    full, _ = run(lm, instantiate_method("full"), video)
    unpruned, _ = run(lm, DyCoke(k=0.0, l=1, p=0.0), video)
    assert torch.equal(full.sequences, unpruned.sequences)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"k": 1.5}, "k=1.5"),
        ({"p": -0.1}, "p=-0.1"),
        ({"mode": "exact"}, "paper, official"),
        ({"l": -1}, "l=-1"),
        ({"mode": "official", "compile_ttm": True}, "compile_ttm=true applies to mode=paper"),
    ],
)
def test_bad_dycoke_settings_fail_at_config_time(settings, message):
    with pytest.raises(ConfigError, match=message):
        DyCoke(**settings)


@pytest.mark.slow  # a fresh interpreter importing torch and trying to compile, 8 s: in `make test-slow`
def test_compiled_ttm_without_a_cxx_compiler_says_how_to_run_without_it(tmp_path):
    script = (
        "import torch; from dycoke_eval.methods.ttm import TokenTemporalMerging; "
        "from dycoke_eval.compression.stages import VideoTokens; from dycoke_eval.geometry import VideoLayout; "
        "layout = VideoLayout(8, 4, 4, 'video_end', 'llava_onevision'); "
        "TokenTemporalMerging(compile_ttm=True).select(VideoTokens.from_grid(torch.randn(8, 16, 8), layout), {}, '')"
    )
    environment = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ConfigError: compile_ttm=true: torch.compile failed" in result.stderr
    assert "set method.compile_ttm=false" in result.stderr


@pytest.mark.parametrize(
    "method, message",
    [
        (DyCoke(l=8), "l=8: the language model has 8 layers"),
        (FastV(layer=8), "layer=8: the language model has 8 layers"),
    ],
)
def test_a_layer_beyond_the_model_fails_when_the_model_is_known(tiny_checkpoint, method, message):
    with pytest.raises(ConfigError, match=message):
        CompressedVideoLM(pretrained=str(tiny_checkpoint), method=method, device="cpu")


@pytest.mark.parametrize(
    "settings, kept",  # kept: round(257 * ratio), written out: 89.95 -> 90, 128.5 -> 128 (half to even), 25.7 -> 26
    [({"layer": 5, "ratio": 0.35}, 90), ({"layer": 1, "ratio": 0.5}, 128), ({"layer": 7, "ratio": 0.1}, 26)],
)
def test_fastv_dropping_hidden_states_gives_the_masked_references_logits(lm, video, settings, kept):
    layout = lm.adapter.layout(FRAMES)
    record = assert_fast_path_matches_masked_reference(lm, video, FastV(**settings))
    assert record.visual_tokens_by_stage == {"fastv": kept}
    layer = settings["layer"]
    assert record.prefill_visual_by_layer == [layout.full_tokens] * layer + [kept] * (8 - layer)


def test_fastv_keeps_the_released_ports_rounded_count_at_real_size():
    assert fastv_keep_count(32 * 196 + 1, 0.35) == 2196  # int() would keep 2,195
    assert fastv_keep_count(16 * 196 + 1, 0.35) == 1098  # 3,137 x 0.35 = 1,097.95


@pytest.mark.parametrize(
    "settings, message", [({"ratio": 0.0}, "ratio=0.0"), ({"ratio": 1.5}, "ratio=1.5"), ({"layer": 0}, "K must be >= 1")]
)
def test_bad_fastv_settings_fail_at_config_time(settings, message):
    with pytest.raises(ConfigError, match=message):
        FastV(**settings)


@dataclass
class TwoDrops(CompressionMethod):
    """Two FastV-style drops on one layer schedule (PyramidDrop-style)."""

    name: str = "two_drops"

    def stages(self):
        return [FastV(layer=2, ratio=0.5), FastV(layer=5, ratio=0.5, name="fastv_again")]


def test_two_prefill_stages_drop_in_turn_and_match_the_masked_reference(lm, video):
    layout = lm.adapter.layout(FRAMES)
    record = assert_fast_path_matches_masked_reference(lm, video, TwoDrops())
    first = fastv_keep_count(layout.full_tokens, 0.5)
    assert record.visual_tokens_by_stage == {"fastv": first, "fastv_again": fastv_keep_count(first, 0.5)}
    assert record.prefill_visual_by_layer == [layout.full_tokens] * 2 + [first] * 3 + [fastv_keep_count(first, 0.5)] * 3


@pytest.mark.parametrize("name", SHORTENING_METHODS)
def test_shortening_before_the_llm_gives_the_masked_full_sequences_logits(lm, video, name):
    """Dropping tokens before the LLM equals keeping them all but masking the dropped ones out at every layer."""
    layout = lm.adapter.layout(FRAMES)
    method = SHORTENING_METHODS[name]
    lm.method = method
    encoded = lm.encode_video(video, SampleRecord("t", 0))
    tokens = lm.compressor.select(encoded, "t/0").tokens
    positions = tokens.index
    assert torch.equal(positions, positions.sort().values) and positions.min() >= 0, "kept tokens must stay in video order"
    prompt = lm.tokenizer(lm.build_prompt("What moves?"), return_tensors="pt")["input_ids"][0]

    def last_logits(features, **kwargs):
        visual, _ = lm.adapter.assemble(encoded, features, torch.arange(features.shape[0]))
        inputs = lm.adapter.generation_inputs(prompt, visual, None, encoded.layout.full_tokens)
        with torch.inference_mode():
            return lm.model(**inputs.kwargs, **kwargs).logits[0, -1], inputs

    fast, _ = last_logits(tokens.features)
    full_tokens = encoded.grid.reshape(
        layout.grid_tokens, -1
    ).clone()  # every position present, the kept ones holding the stage's output
    full_tokens[positions] = tokens.features
    _, inputs = last_logits(full_tokens)
    alive = torch.ones(inputs.input_ids.shape[1], dtype=torch.bool)
    alive[inputs.visual_start : inputs.visual_start + layout.grid_tokens] = False
    alive[inputs.visual_start + positions] = True
    index = alive.nonzero().flatten()
    position_ids = (alive.cumsum(0) - 1)[None]  # the kept tokens get the positions the shortened sequence gives them

    def attention(module, query, key, value, attention_mask, **kwargs):
        return masked_attention(sdpa_attention_forward, module, query, key, value, attention_mask, index, **kwargs)

    with routed_attention(lm.adapter.language_model, "reference_mask", attention):
        reference, _ = last_logits(full_tokens, position_ids=position_ids)
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=0)
    assert not torch.allclose(fast, last_logits(full_tokens)[0], atol=1e-4)  # without the mask the dropped tokens would count


class RandomKeepingPositions(RandomTokens):
    keep_positions = True


def test_kept_tokens_can_keep_their_original_positions_and_decoding_continues_at_the_full_length(lm, video):
    layout = lm.adapter.layout(FRAMES)
    method = RandomKeepingPositions(ratio=0.25)
    lm.method = method
    encoded = lm.encode_video(video, SampleRecord("t", 0))
    tokens = lm.compressor.select(encoded, "").tokens
    prompt = lm.tokenizer(lm.build_prompt("What moves?"), return_tensors="pt")["input_ids"][0]
    visual, positions = lm.adapter.assemble(encoded, tokens.features, tokens.index)
    inputs = lm.adapter.generation_inputs(prompt, visual, positions, encoded.layout.full_tokens)
    start, full_length = inputs.visual_start, prompt.shape[0] - 1 + layout.full_tokens
    expected = list(range(start)) + [start + int(i) for i in tokens.index] + [start + layout.grid_tokens]
    expected += list(range(start + layout.full_tokens, full_length))
    assert inputs.kwargs["position_ids"][0].tolist() == expected

    # The same logits as the full sequence with the dropped tokens masked out and every position as it was.
    full_inputs = lm.adapter.generation_inputs(
        prompt, torch.cat([encoded.grid.reshape(layout.grid_tokens, -1), encoded.newline[None]]), None, 0
    )
    alive = torch.ones(full_length, dtype=torch.bool)
    alive[start : start + layout.grid_tokens] = False
    alive[start + tokens.index] = True

    def attention(module, query, key, value, attention_mask, **kwargs):
        index = alive.nonzero().flatten()
        return masked_attention(sdpa_attention_forward, module, query, key, value, attention_mask, index, **kwargs)

    with torch.inference_mode():
        fast = lm.model(**inputs.kwargs).logits[0, -1]
        with routed_attention(lm.adapter.language_model, "reference_mask", attention):
            reference = lm.model(**full_inputs.kwargs).logits[0, -1]
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=0)
    output, record = run(lm, method, video)  # and generate carries on from the last original position
    assert record.visual_tokens_in == len(tokens.index) + 1 and output.sequences.shape[1] > 0


def test_dycoke_official_prunes_among_the_ttm_tokens_but_the_last_and_never_the_newline(lm, video, monkeypatch):
    """The released code sets the image length to the TTM count minus one before appending the newline."""
    import dycoke_eval.compression.dispatcher as dispatcher

    seen, attended_key_index = [], dispatcher.attended_key_index

    def recording(kv_length, span, kept_visual):
        seen.append((span, kept_visual.clone()))
        return attended_key_index(kv_length, span, kept_visual)

    monkeypatch.setattr(dispatcher, "attended_key_index", recording)
    output, record = run(lm, DyCoke(k=0.7, l=1, p=0.7, threshold=1.1, mode="official"), video)
    n_ttm = record.method_stats["ttm_tokens_out"]
    start = int((output.sequences[0] == lm.model.config.video_token_id).nonzero()[0])
    image_length = n_ttm - 1  # released: len(TTM tokens) - 1, the newline appended afterwards
    assert seen and all(span == (start, start + image_length) for span, _ in seen)
    assert all(len(kept) == int(image_length * (1 - 0.7)) and int(kept.max()) < image_length for _, kept in seen)


def test_random_ttm_draws_a_fresh_choice_per_video_seeded_by_seed_and_sample():
    features = torch.randn(FRAMES, 16, 8)

    def kept(sample, seed=0):
        stage = TokenTemporalMerging(k=0.7, selection="random", seed=seed)
        return stage.select(tokens_of(features, 4, 4), {}, sample).index

    first, again, other, reseeded = kept("videomme/0"), kept("videomme/0"), kept("videomme/1"), kept("videomme/0", seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.equal(first, reseeded)
    assert len(first) == len(other) == len(ttm_keep_indices(features, 0.7))


def test_a_method_object_carries_nothing_from_one_sample_to_the_next(lm, video):
    method = DyCoke(k=0.5, l=1, p=0.7)
    before = dict(vars(method))
    run(lm, method, video)
    run(lm, method, video)
    assert vars(method) == before


@pytest.fixture
def eager_lm(tiny_checkpoint):
    """The tiny model loaded with the eager kernel (it replaces the process's loaded checkpoint while in use)."""
    yield CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=FRAMES, device="cpu", attn_implementation="eager")


@pytest.mark.parametrize(
    "method",
    [
        DyCoke(k=0.5, l=1, threshold=1.1),
        FastV(layer=2),
        PruneVid(in_llm=True, selected_layer=2),
        FrameFusion(similarity_lower_bound=0.95),
    ],
    ids=["dycoke", "fastv", "prunevid", "framefusion"],
)
def test_a_model_loaded_eager_computes_every_routed_attention_with_the_eager_kernel(eager_lm, video, monkeypatch, method):
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    import dycoke_eval.plumbing.attention as plumbing

    calls = {"eager": 0}
    eager = qwen2.eager_attention_forward

    def counting_eager(*args, **kwargs):
        calls["eager"] += 1
        return eager(*args, **kwargs)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("a routed method fell through to SDPA on a model loaded eager")

    monkeypatch.setattr(qwen2, "eager_attention_forward", counting_eager)
    monkeypatch.setattr(plumbing, "sdpa_attention_forward", no_sdpa)
    record = assert_fast_path_matches_masked_reference(eager_lm, video, method)
    assert calls["eager"] > 0 and record.method_stats["attention_kernel"] == "eager"


@pytest.mark.parametrize("method", ["dycoke", "fastv", "prumerge"])
def test_a_kernel_a_routed_method_cannot_use_is_refused_before_loading(method):
    checkpoints = CheckpointLoader()
    with pytest.raises(ConfigError, match="attn_implementation='flash_attention_2'.*set model.attn_implementation=sdpa"):
        CompressedVideoLM(
            pretrained="no/such-checkpoint", method=method, attn_implementation="flash_attention_2", checkpoints=checkpoints
        )
    assert checkpoints.loads == 0


def test_a_sample_records_the_real_prefill_flops_of_the_tokens_each_layer_processed(lm, video):
    """Per layer: the Q/K/V/O projections, causal attention and SwiGLU over that layer's visual tokens plus the prompt's
    text, written out here from the tiny model's config (FastV: layers from K on see fewer tokens)."""
    lm.method, record = FastV(layer=2, ratio=0.5), SampleRecord("t", 0)
    _, prompt_length = lm.run_sample(video, "What moves?", dict(GREEDY_WITH_LOGITS), record, "t/0")
    config = lm.adapter.config.text_config
    d, ffn, head_dim = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    queries, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    text = prompt_length - record.visual_tokens_in
    expected = 0
    for visual in record.prefill_visual_by_layer:
        s = visual + text
        expected += s * d * (2 * queries + 2 * kv) + queries * s * (s + 1) + 3 * s * d * ffn
    assert record.prefill_visual_by_layer[2] < record.prefill_visual_by_layer[1]
    assert record.prefill_tflops_real == pytest.approx(expected / 1e12, rel=1e-12)
