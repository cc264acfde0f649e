"""The op and sync counter that GPU-minded tests and `scripts/bench_gpu.py --cpu-counts` use."""

import torch
from layouts import layout, tokens_of

from dycoke_eval.plumbing.counting import count_ops


def test_every_kind_of_host_sync_is_counted_and_views_are_not_launches():
    t = torch.arange(6.0)
    with count_ops() as counted:
        int(t[2])
        bool(t[1] > 0)
        t[t > 2]  # boolean-mask indexing: the output size is the mask's count
        torch.equal(t, t)
        (t > 1).nonzero()
        t.view(2, 3).transpose(0, 1)  # metadata only
        with torch.inference_mode():  # where value reads do not reach the dispatcher
            t.sum().item()
            (t > 0).tolist()
    assert counted.counts.syncs == 7
    assert dict(counted.counts.syncing) == {
        "__int__": 1, "__bool__": 1, "index": 1, "equal": 1, "nonzero": 1, "item": 1, "tolist": 1,
    }  # fmt: skip
    assert counted.counts.ops == 8  # four gt, index, equal, nonzero, sum; the views are not launches


def test_writes_through_a_mask_and_repeats_by_a_tensor_are_syncs_and_their_static_forms_are_not():
    t = torch.arange(6.0)
    with count_ops() as counted:
        t[t > 2] = 0  # index_put with a boolean index
        torch.repeat_interleave(t, torch.tensor([1, 2, 1, 1, 1, 1]))
        t[torch.tensor([0, 2])] = 1  # integer index: no sync
        t.repeat_interleave(2)
        torch.where(t > 1, t, -t)
    assert dict(counted.counts.syncing) == {"index_put_": 1, "repeat_interleave": 1}


def test_tensor_only_code_makes_no_sync():
    scores = torch.rand(32, 196)
    with count_ops() as counted:
        kept = scores.topk(49, dim=-1).indices.sort(dim=-1).values
        torch.gather(scores, 1, kept).sum(dim=-1)
    assert counted.counts.syncs == 0 and counted.counts.ops > 0


def test_a_stage_gets_the_whole_grid_without_a_sync_and_a_selected_one_is_refused():
    import pytest

    from dycoke_eval.config import ConfigError

    tokens = tokens_of(torch.randn(4, 9, 8), 3, 3)
    with count_ops() as counted:
        grid = tokens.grid()
    assert grid.shape == (4, 9, 8) and counted.counts.syncs == 0
    with pytest.raises(ConfigError, match="needs every video token"):
        tokens.keep(torch.arange(30)).grid()


def test_ttm_selects_with_no_more_than_its_two_known_syncs_at_real_size():
    """The batched reference: DyCoke's TTM over 32 x 196 tokens (as `scripts/bench_gpu.py --cpu-counts` counts it):
    one sync left, the count of kept tokens; the whole-grid check no longer compares the index on the device."""
    from dycoke_eval.compression.dispatcher import Compressor
    from dycoke_eval.config import instantiate_method
    from dycoke_eval.models.base import EncodedVideo

    video = torch.randn(32, 196, 64)
    encoded = EncodedVideo(grid=video, layout=layout(32, 14, 14), newline=torch.randn(64), signals={})
    compressor = Compressor(None, instantiate_method("dycoke_ttm", {"method.k": 0.9}))
    with torch.inference_mode(), count_ops() as counted:
        compressor.select(encoded, "count")
    assert counted.counts.syncs <= 1 and counted.counts.ops <= 22, counted.counts


def _generation_syncs(lm, video, new_tokens: int) -> int:
    from test_wrapper import make_requests

    requests = make_requests(lm, [video], {"max_new_tokens": new_tokens, "temperature": 0, "until": ["\n\n\n\n\n\n\n\n"]})
    with count_ops() as counted:
        lm.generate_until(requests)
    assert lm.sample_records[-1].output_tokens == new_tokens  # the tiny checkpoint answers to its cap
    return counted.counts.syncs


def test_a_dycoke_decode_step_makes_no_more_host_syncs_than_a_full_token_step(tiny_checkpoint, tmp_path):
    """Per decode step, measured as the syncs that 4 more answer tokens add. DyCoke's paper mode decides each step's
    kept set on the device (`torch.where` between the previous set and this step's candidate)."""
    from dycoke_eval.offline.videos import write_video
    from dycoke_eval.wrapper import CompressedVideoLM

    video = str(write_video(tmp_path / "clip.mp4"))
    per_step = {}
    for method in ("full", "dycoke"):
        lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", method=method)
        _generation_syncs(lm, video, 2)  # warm-up
        per_step[method] = (_generation_syncs(lm, video, 8) - _generation_syncs(lm, video, 4)) / 4
        stats = lm.sample_records[-1].method_stats
    assert per_step["dycoke"] == per_step["full"]
    assert stats["kv_held_aside_bytes"] == 0 and stats["reselections"] >= 1  # the whole cache stays where it is


def test_pruned_entries_go_to_the_cpu_only_with_offload_pruned(tiny_checkpoint, tmp_path):
    from test_wrapper import make_requests

    from dycoke_eval.offline.videos import write_video
    from dycoke_eval.wrapper import CompressedVideoLM

    video = str(write_video(tmp_path / "clip.mp4"))
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", method="dycoke",
                           **{"method.offload_pruned": "true"})  # fmt: skip
    lm.generate_until(make_requests(lm, [video], {"max_new_tokens": 4, "temperature": 0}))
    assert lm.sample_records[-1].method_stats["kv_held_aside_bytes"] > 0
