"""Every method, through the wrapper and `generate`, on the tiny model (a matrix over conf/method)."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AttentionInterface

from dycoke_eval import checkpoints
from dycoke_eval.config import ConfigError, group_options, instantiate_method
from dycoke_eval.methods.dycoke import DyCoke
from dycoke_eval.methods.fastv import FastV, fastv_keep_count
from dycoke_eval.methods.prumerge import PruMerge, iqr_outlier_count
from dycoke_eval.methods.ttm import ttm_keep_indices
from dycoke_eval.offline.videos import synthetic_frames
from dycoke_eval.wrapper import LlavaOneVisionCompressed, SampleRecord, _with_video_placeholders

FRAMES = 16
BUILTIN_ATTENTION = set(AttentionInterface._global_mapping)
GREEDY_WITH_LOGITS = {
    "max_new_tokens": 10,
    "do_sample": False,
    "eos_token_id": None,
    "output_logits": True,
    "return_dict_in_generate": True,
}


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    return LlavaOneVisionCompressed(pretrained=str(tiny_checkpoint), frames=FRAMES, device="cpu")


@pytest.fixture(scope="module")
def video():
    return synthetic_frames("method-matrix")[:FRAMES]


def assert_fast_path_matches_masked_reference(lm, video, method_class, **settings):
    """Same kept sets, same logits at every step (fp32, 1e-4); returns the fast path's record."""
    fast, fast_record = run(lm, method_class(**settings), video)
    reference, reference_record = run(lm, method_class(reference_masking=True, **settings), video)

    def selection(stats):  # what was kept; only the fast path holds pruned entries aside
        return {k: v for k, v in stats.items() if k != "kv_held_aside_bytes"}

    assert selection(fast_record.method_stats) == selection(reference_record.method_stats)
    for fast_step, reference_step in zip(fast.logits, reference.logits, strict=True):
        torch.testing.assert_close(fast_step, reference_step, atol=1e-4, rtol=0)
    return fast_record


def run(lm, method, video):
    lm.method = method
    record = SampleRecord("t", 0)
    output, _ = lm.run_sample(video, "What moves?", dict(GREEDY_WITH_LOGITS), record)
    return output, record


@pytest.mark.parametrize("name", group_options("method"))
def test_every_method_generates_and_leaves_the_model_as_it_found_it(lm, video, name):
    output, record = run(lm, instantiate_method(name), video)
    assert output.sequences.shape[1] > 0 and len(output.logits) == 10
    assert record.visual_tokens_in <= record.visual_tokens_full == FRAMES * 16 + 1
    assert lm.model.config.text_config._attn_implementation == "sdpa"
    assert lm.model.config.vision_config._attn_implementation == "sdpa"
    assert set(AttentionInterface._global_mapping) == BUILTIN_ATTENTION
    assert not any(layer._forward_pre_hooks for layer in lm.model.model.language_model.layers)


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("settings", [{"l": 1}, {"l": 2, "one_shot": True}, {"l": 0, "threshold": 1.1}])
def test_dycoke_pruned_fast_path_gives_the_masked_references_logits(lm, video, mode, settings):
    assert_fast_path_matches_masked_reference(lm, video, DyCoke, k=0.5, p=0.7, mode=mode, **settings)


def test_dycoke_feeds_the_ttm_tokens_to_the_llm_and_prunes_decode_attention(lm, video):
    _, record = run(lm, DyCoke(k=0.7, l=1, p=0.7, threshold=1.1), video)  # threshold > 1: re-select every step
    ttm_count = len(ttm_keep_indices(torch.zeros(FRAMES, 16, 1), 0.7))
    assert record.visual_tokens_in == ttm_count + 1
    stats = record.method_stats
    assert stats["ttm_tokens_out"] == ttm_count and stats["decode_steps"] == 9 == stats["reselections"]
    assert stats["attended_visual_mean"] == int((ttm_count + 1) * 0.3)
    assert stats["retained_ratio"] == stats["attended_visual_mean"] / (FRAMES * 16 + 1)
    assert stats["kv_held_aside_bytes"] > 0  # layers above L hold the pruned entries aside, off the attention path
    assert stats["paper_retained_ratio"] == pytest.approx(0.1425)


def test_dycoke_without_pruning_says_what_full_says(lm, video):
    full, _ = run(lm, instantiate_method("full"), video)
    unpruned, _ = run(lm, DyCoke(k=0.0, l=1, p=0.0), video)
    assert torch.equal(full.sequences, unpruned.sequences)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"k": 1.0}, "k=1.0"),
        ({"p": -0.1}, "p=-0.1"),
        ({"mode": "exact"}, "paper, official"),
        ({"l": -1}, "l=-1"),
        ({"mode": "official", "compile_ttm": True}, "compile_ttm=true applies to mode=paper"),
    ],
)
def test_bad_dycoke_settings_fail_at_config_time(settings, message):
    with pytest.raises(ConfigError, match=message):
        DyCoke(**settings)


def test_compiled_ttm_without_a_cxx_compiler_says_how_to_run_without_it(tmp_path):
    script = (
        "import torch; from dycoke_eval.methods.dycoke import DyCoke; "
        "DyCoke(compile_ttm=True).select_video_tokens(torch.randn(8, 16, 8))"
    )
    environment = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ConfigError: compile_ttm=true: torch.compile failed" in result.stderr
    assert "set method.compile_ttm=false" in result.stderr


def test_an_evaluation_layer_beyond_the_model_fails_when_the_model_is_known(tiny_checkpoint):
    with pytest.raises(ConfigError, match="l=8: the language model has 8 layers"):
        LlavaOneVisionCompressed(pretrained=str(tiny_checkpoint), method=DyCoke(l=8), device="cpu")


@pytest.mark.parametrize(
    "settings, kept",  # kept: round(257 * ratio), written out: 89.95 -> 90, 128.5 -> 128 (half to even), 25.7 -> 26
    [({"layer": 5, "ratio": 0.35}, 90), ({"layer": 1, "ratio": 0.5}, 128), ({"layer": 7, "ratio": 0.1}, 26)],
)
def test_fastv_dropping_hidden_states_gives_the_masked_references_logits(lm, video, settings, kept):
    record = assert_fast_path_matches_masked_reference(lm, video, FastV, **settings)
    assert record.method_stats["visual_tokens_after_layer"] == kept


def test_fastv_keeps_the_released_ports_rounded_count_at_real_size():
    assert fastv_keep_count(32 * 196 + 1, 0.35) == 2196  # int() would keep 2,195
    assert fastv_keep_count(16 * 196 + 1, 0.35) == 1098  # 3,137 x 0.35 = 1,097.95


@pytest.mark.parametrize(
    "settings, message", [({"ratio": 0.0}, "ratio=0.0"), ({"ratio": 1.5}, "ratio=1.5"), ({"layer": 0}, "K must be >= 1")]
)
def test_bad_fastv_settings_fail_at_config_time(settings, message):
    with pytest.raises(ConfigError, match=message):
        FastV(**settings)


def test_a_fastv_layer_beyond_the_model_fails_when_the_model_is_known(tiny_checkpoint):
    with pytest.raises(ConfigError, match="layer=8: the language model has 8 layers"):
        LlavaOneVisionCompressed(pretrained=str(tiny_checkpoint), method=FastV(layer=8), device="cpu")


def kept_positions(method, frame_features):
    """Flat positions (into F*N) of the tokens a pre-LLM method keeps, from its own pure functions, ascending."""
    if isinstance(method, DyCoke):
        return ttm_keep_indices(frame_features, method.k, method.mode).sort().values
    tokens = frame_features.shape[1]
    scores = method._captured["scores"]  # what the encoder's attention gave this video
    return torch.cat([s.topk(iqr_outlier_count(s)).indices.sort().values + f * tokens for f, s in enumerate(scores)])


@pytest.mark.parametrize("method", [DyCoke(k=0.7, mode="paper"), PruMerge(variant="base")], ids=["ttm", "prumerge"])
def test_shortening_before_the_llm_gives_the_masked_full_sequences_logits(lm, video, method):
    """Dropping tokens before the LLM equals keeping them all but masking the dropped ones out at every layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from dycoke_eval.plumbing.attention import language_model, masked_attention, routed_attention

    lm.method = method
    features = lm.encode_video(video, SampleRecord("t", 0))
    frame_features, newline = features[:-1].view(FRAMES, -1, features.shape[-1]), features[-1:]
    kept_tokens = method.select_video_tokens(frame_features)  # in spatial order for both methods
    positions = kept_positions(method, frame_features)
    prompt = lm.tokenizer(lm.build_prompt("What moves?"), return_tensors="pt")["input_ids"][0]

    def last_logits(video_tokens, **kwargs):
        ids, _ = _with_video_placeholders(prompt, lm.model.config.video_token_id, video_tokens.shape[0])
        encoded = {"video": BaseModelOutputWithPooling(pooler_output=video_tokens[None])}
        with torch.inference_mode():
            return lm.model(input_ids=ids[None], mm_encoder_outputs=encoded, **kwargs).logits[0, -1]

    fast = last_logits(torch.cat([kept_tokens, newline]))

    full_tokens = features.clone()  # every visual token present, the kept ones holding the method's features
    full_tokens[positions] = kept_tokens
    ids, start = _with_video_placeholders(prompt, lm.model.config.video_token_id, full_tokens.shape[0])
    alive = torch.ones(ids.shape[0], dtype=torch.bool)
    alive[start : start + FRAMES * 16] = False
    alive[start + positions] = True
    index = alive.nonzero().flatten()
    position_ids = (alive.cumsum(0) - 1)[None]  # the kept tokens get the positions the shortened sequence gives them

    def attention(module, query, key, value, attention_mask, **kwargs):
        return masked_attention(sdpa_attention_forward, module, query, key, value, attention_mask, index, **kwargs)

    with routed_attention(language_model(lm.model), "reference_mask", attention):
        reference = last_logits(full_tokens, position_ids=position_ids)
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=0)
    assert not torch.allclose(fast, last_logits(full_tokens), atol=1e-4)  # without the mask the dropped tokens would count


def test_dycoke_official_prunes_among_the_ttm_tokens_but_the_last_and_never_the_newline(lm, video, monkeypatch):
    """The released code sets the image length to the TTM count minus one before appending the newline."""
    import dycoke_eval.methods.dycoke as dycoke_module

    seen, attended_key_index = [], dycoke_module.attended_key_index

    def recording(kv_length, span, kept_visual):
        seen.append((span, kept_visual.clone()))
        return attended_key_index(kv_length, span, kept_visual)

    monkeypatch.setattr(dycoke_module, "attended_key_index", recording)
    output, record = run(lm, DyCoke(k=0.7, l=1, p=0.7, threshold=1.1, mode="official"), video)
    n_ttm = record.method_stats["ttm_tokens_out"]
    start = int((output.sequences[0] == lm.model.config.video_token_id).nonzero()[0])
    image_length = n_ttm - 1  # released: len(TTM tokens) - 1, the newline appended afterwards
    assert seen and all(span == (start, start + image_length) for span, _ in seen)
    assert all(len(kept) == int(image_length * (1 - 0.7)) and int(kept.max()) < image_length for _, kept in seen)


def test_dycoke_random_draws_a_fresh_choice_per_video_seeded_by_seed_and_sample():
    features = torch.randn(FRAMES, 16, 8)

    def kept(sample, seed=0):
        return DyCoke(k=0.7, ttm_selection="random", seed=seed).select_video_tokens(features, sample)

    first, again, other, reseeded = kept("videomme/0"), kept("videomme/0"), kept("videomme/1"), kept("videomme/0", seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.equal(first, reseeded)
    assert len(first) == len(other) == len(ttm_keep_indices(features, 0.7))


@pytest.fixture
def eager_lm(tiny_checkpoint):
    """The tiny model loaded with the eager kernel (it replaces the process's loaded checkpoint while in use)."""
    yield LlavaOneVisionCompressed(pretrained=str(tiny_checkpoint), frames=FRAMES, device="cpu", attn_implementation="eager")


@pytest.mark.parametrize("method_class, settings", [(DyCoke, {"k": 0.5, "l": 1, "threshold": 1.1}), (FastV, {"layer": 2})])
def test_a_model_loaded_eager_computes_every_routed_attention_with_the_eager_kernel(
    eager_lm, video, monkeypatch, method_class, settings
):
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
    record = assert_fast_path_matches_masked_reference(eager_lm, video, method_class, **settings)
    assert calls["eager"] > 0 and record.method_stats["attention_kernel"] == "eager"


@pytest.mark.parametrize("method", ["dycoke", "fastv", "prumerge"])
def test_a_kernel_a_routed_method_cannot_use_is_refused_before_loading(method):
    before = checkpoints.LOAD_COUNT
    with pytest.raises(ConfigError, match="attn_implementation='flash_attention_2'.*set model.attn_implementation=sdpa"):
        LlavaOneVisionCompressed(pretrained="no/such-checkpoint", method=method, attn_implementation="flash_attention_2")
    assert checkpoints.LOAD_COUNT == before
