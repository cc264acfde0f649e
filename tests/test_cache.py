"""The prunable cache layer: pruned entries wait aside, attention sees only the kept ones, nothing is lost."""

import torch

from dycoke_eval.plumbing.cache import PrunableLayer


def filled_layer(tokens=6, cold_device=None):
    layer = PrunableLayer(cold_device)
    keys = torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1)
    layer.update(keys, -keys)
    return layer


def test_it_reports_the_full_length_while_attention_sees_only_the_kept_entries():
    layer = filled_layer()
    layer.keep_hot(torch.tensor([0, 2, 5]))
    assert layer.get_seq_length() == 6  # masks and positions still see every token
    keys, values = layer.update(torch.tensor([[[[6.0]]]]), torch.tensor([[[[-6.0]]]]))
    assert keys.flatten().tolist() == [0, 2, 5, 6] and values.flatten().tolist() == [0, -2, -5, -6]
    assert layer.get_seq_length() == 7 and layer.hot_positions.tolist() == [0, 2, 5, 6]


def test_entries_held_aside_come_back_at_a_later_selection():
    layer = filled_layer()
    layer.keep_hot(torch.tensor([0, 1]))
    assert layer.cold_bytes() == 2 * 4 * 4  # four keys and four values of one float each
    layer.keep_hot(torch.tensor([1, 3, 4]))
    assert sorted(layer.keys.flatten().tolist()) == [1, 3, 4] and layer.keys.shape[-2] + layer.cold_keys.shape[-2] == 6
    layer.keep_hot(torch.arange(6))
    assert sorted(layer.keys.flatten().tolist()) == [0, 1, 2, 3, 4, 5] and layer.cold_keys is None


def test_held_aside_entries_can_live_on_another_device():
    layer = filled_layer(cold_device="cpu")
    layer.keep_hot(torch.tensor([5]))
    assert layer.cold_keys.device.type == "cpu" and layer.cold_keys.shape[-2] == 5
