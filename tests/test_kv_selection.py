"""Decode-time selection (DyCoke stage 2) as pure functions and a small state machine."""

import pytest
import torch

from dycoke_eval.methods.kv_selection import DynamicSelector, attended_key_index, last_query_attention, top_visual_tokens


def test_last_query_attention_is_the_head_mean_softmax_of_the_last_row_with_grouped_heads():
    torch.manual_seed(0)
    query, key = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
    expanded = key.repeat_interleave(2, dim=1)  # each KV head serves two query heads
    expected = (query[:, :, -1:] @ expanded.transpose(-1, -2) * 0.5).softmax(-1).mean(dim=(0, 1, 2))
    assert torch.allclose(last_query_attention(query, key, 0.5, None), expected, atol=1e-6)


@pytest.mark.parametrize("as_bool", [True, False])
def test_last_query_attention_respects_the_mask(as_bool):
    query, key = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 6, 4)
    allowed = torch.tensor([True, True, False, True, True, True]).view(1, 1, 1, 6)
    mask = allowed if as_bool else torch.where(allowed, 0.0, float("-inf"))
    probabilities = last_query_attention(query, key, 1.0, mask)
    assert probabilities[2] == 0 and probabilities.sum().item() == pytest.approx(1.0)


def test_top_visual_tokens_keeps_the_most_attended_in_ascending_position():
    attention = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    assert top_visual_tokens(attention, count=2).tolist() == [1, 3]
    assert top_visual_tokens(attention, count=0).tolist() == []


def test_attended_keys_are_all_non_visual_keys_plus_the_kept_visual_ones():
    index = attended_key_index(10, span=(2, 7), kept_visual=torch.tensor([0, 3]))
    assert index.tolist() == [0, 1, 2, 5, 7, 8, 9]


def vector(*values):
    return torch.tensor(values, dtype=torch.float)


def test_paper_mode_reselects_when_attention_moves_and_reuses_the_set_when_it_does_not():
    selector = DynamicSelector(keep_ratio=0.5, threshold=0.9, mode="paper")
    first = selector.step(vector(0.4, 0.3, 0.2, 0.1))
    assert first.tolist() == [0, 1]
    assert selector.step(vector(0.41, 0.3, 0.19, 0.1)).tolist() == [0, 1]  # similar: reuse
    assert selector.step(vector(0.0, 0.1, 0.4, 0.5)).tolist() == [2, 3]  # moved: re-select
    assert (selector.steps, selector.reselections, selector.attended_visual) == (3, 2, [2, 2, 2])


def test_official_mode_prunes_nothing_on_a_step_similar_to_the_last():
    selector = DynamicSelector(keep_ratio=0.5, threshold=0.9, mode="official")
    assert selector.step(vector(0.4, 0.3, 0.2, 0.1)).tolist() == [0, 1]
    assert selector.step(vector(0.41, 0.3, 0.19, 0.1)) is None
    assert selector.attended_visual == [2, 4]


def test_official_mode_carries_the_previous_vector_into_the_next_sample_as_the_released_code_does():
    official, paper = DynamicSelector(0.5, mode="official"), DynamicSelector(0.5, mode="paper")
    for selector in (official, paper):
        selector.step(vector(0.4, 0.3, 0.2, 0.1))
        selector.reset()
    assert official.step(vector(0.4, 0.3, 0.2, 0.1)) is None
    assert paper.step(vector(0.4, 0.3, 0.2, 0.1)).tolist() == [0, 1]


def test_one_shot_selects_at_the_first_step_and_keeps_that_set():
    selector = DynamicSelector(keep_ratio=0.5, one_shot=True)
    assert selector.step(vector(0.4, 0.3, 0.2, 0.1)).tolist() == [0, 1]
    assert selector.step(vector(0.0, 0.1, 0.4, 0.5)).tolist() == [0, 1]
    assert selector.reselections == 1


def test_the_released_pruning_span_is_refused_on_a_family_without_one_newline_after_the_video():
    from dycoke_eval.config import ConfigError
    from dycoke_eval.geometry import ModelInfo
    from dycoke_eval.methods.dynamic_pruning import DynamicKVPruning

    video = ModelInfo(layers=28, signals=frozenset(), family="llava_video")
    with pytest.raises(ConfigError, match=r"dp: mode=official .* 'llava_video' model family .* use mode=paper"):
        DynamicKVPruning(mode="official").check(video)
    DynamicKVPruning(mode="paper").check(video)
