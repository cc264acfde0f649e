"""Prefetch: the next samples' videos decode in background threads, bounded, in order, each failure its own sample's."""

import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import pytest

import dycoke_eval.wrapper as wrapper
from dycoke_eval.config import ConfigError
from dycoke_eval.offline.videos import write_video
from dycoke_eval.prefetch import Prefetcher
from dycoke_eval.wrapper import CompressedVideoLM


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("prefetch")]


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_items_come_back_in_order_whatever_order_their_loads_finish_in():
    def load(item: int) -> int:
        time.sleep((7 * item % 5) * 0.004)  # later items often finish first
        return item * item

    with Prefetcher(range(12), load, depth=4, workers=3) as ahead:
        taken = [(item, future.result()) for item, future in ahead]
    assert taken == [(item, item * item) for item in range(12)]


def test_never_more_than_depth_loads_beyond_the_item_taken_last():
    started, lock = [], threading.Lock()

    def load(item: int) -> int:
        with lock:
            started.append(item)
        return item

    items, depth = 9, 3
    with Prefetcher(range(items), load, depth=depth, workers=2) as ahead:
        wait_until(lambda: len(started) == depth)
        time.sleep(0.05)  # time to run further ahead, if it would
        assert sorted(started) == list(range(depth))
        for taken, (item, future) in enumerate(ahead, start=1):
            assert future.result() == item
            allowed = min(taken + depth, items)
            wait_until(lambda allowed=allowed: len(started) == allowed)
            time.sleep(0.02)
            assert sorted(started) == list(range(allowed))  # filled up to the bound, and not one item further


def test_a_failed_load_is_raised_for_its_own_item_only_and_later_items_still_load():
    def load(item: int) -> str:
        if item == 2:
            raise ValueError(f"item {item} is broken")
        return f"loaded {item}"

    outcomes = []
    with Prefetcher(range(6), load, depth=2, workers=2) as ahead:
        for _, future in ahead:
            try:
                outcomes.append(future.result())
            except ValueError as error:
                outcomes.append(f"failed: {error}")
    assert outcomes == ["loaded 0", "loaded 1", "failed: item 2 is broken", "loaded 3", "loaded 4", "loaded 5"]


@pytest.mark.parametrize("stop", ["break", "raise"])
def test_leaving_early_cancels_loads_not_started_and_joins_the_threads(stop):
    started, gate = [], threading.Event()

    def load(item: int) -> int:
        started.append(item)
        if item == 1:
            gate.wait(5)  # item 1 is still loading when the consumer leaves
        return item

    gate_opener = threading.Timer(0.5, gate.set)
    gate_opener.start()
    with pytest.raises(RuntimeError) if stop == "raise" else nullcontext():
        with Prefetcher(range(10), load, depth=3, workers=1) as ahead:
            next(ahead)
            wait_until(lambda: started == [0, 1] or len(started) > 2)
            if stop == "raise":
                raise RuntimeError("the consumer failed")
    assert prefetch_threads() == []  # joined on leaving, after item 1's load ended
    assert started == [0, 1]  # items 2 and 3 were queued, never started
    gate_opener.join()


def test_depth_and_workers_below_one_are_refused():
    with pytest.raises(ValueError, match="depth=0, workers=1"):
        Prefetcher([], str, depth=0)
    with pytest.raises(ValueError, match="depth=2, workers=0"):
        Prefetcher([], str, depth=2, workers=0)


# The wrapper: the tiny model over fixture videos.


@dataclass
class Request:
    args: tuple


def make_requests(lm, paths, task):
    lm.task_dict = {task: {"test": {i: {"path": p} for i, p in enumerate(paths)}}}
    gen_kwargs = {"max_new_tokens": 4, "temperature": 0}
    return [
        Request((f"What moves in video {i}?", dict(gen_kwargs), lambda doc: [doc["path"]], i, task, "test"))
        for i in range(len(paths))
    ]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Four videos, a missing one and a corrupt one, in that order: answers 0-1 and 4-5 come from real videos."""
    folder = tmp_path_factory.mktemp("prefetch-videos")
    corrupt = folder / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is no video")
    clips = [str(write_video(folder / f"clip{i}.mp4")) for i in range(4)]
    return [clips[0], clips[1], str(folder / "missing.mp4"), str(corrupt), clips[2], clips[3]]


@pytest.fixture
def decoding_threads(monkeypatch):
    """The name of the thread each decode ran in, recorded as the wrapper decodes."""
    names = []
    decode = wrapper.sample_video

    def recorded(path, frames):
        names.append(threading.current_thread().name)
        return decode(path, frames)

    monkeypatch.setattr(wrapper, "sample_video", recorded)
    return names


def run(tiny_checkpoint, paths, task, **settings):
    """A new wrapper's answers and records; its model is loaded for it, so its encoder cache starts empty."""
    lm = CompressedVideoLM(pretrained=str(tiny_checkpoint), frames=4, device="cpu", **settings)
    answers = lm.generate_until(make_requests(lm, paths, task))
    return answers, lm.sample_records


def test_prefetched_samples_answer_and_record_exactly_as_inline_ones_each_failure_its_own(
    tiny_checkpoint, videos, decoding_threads
):
    inline_answers, inline_records = run(tiny_checkpoint, videos, "prefetch", prefetch_depth=0)
    inline_threads = list(decoding_threads)
    decoding_threads.clear()
    answers, records = run(tiny_checkpoint, videos, "prefetch", prefetch_depth=2, prefetch_workers=2)

    assert answers == inline_answers
    assert [r.status for r in records] == ["ok", "ok", "failed", "failed", "ok", "ok"]
    assert "missing.mp4: no such video file" in records[2].error and "cannot open as a video container" in records[3].error
    assert [{**asdict(r), "seconds": None} for r in records] == [{**asdict(r), "seconds": None} for r in inline_records]
    assert inline_threads == ["MainThread"] * 6
    prefetched = [name.startswith("prefetch_") for name in decoding_threads]
    assert sorted(prefetched) == [False] + [True] * 5  # the missing file is not planned: it fails inline, at its turn
    for record in (r for r in records if r.status == "ok"):
        assert set(record.seconds) >= {"video_decode", "preprocess", "video_wait", "vision_encoder"}
    assert prefetch_threads() == []


def test_measured_runs_decode_inline_and_a_video_asked_twice_is_decoded_once(tiny_checkpoint, videos, decoding_threads):
    run(tiny_checkpoint, videos[:2], "measured", prefetch_depth=2, measure=True)
    assert decoding_threads == ["MainThread", "MainThread"]  # per-stage times of the efficiency protocol stay clean

    decoding_threads.clear()
    _, records = run(tiny_checkpoint, [videos[0], videos[1], videos[0]], "twice", prefetch_depth=2)
    assert len(decoding_threads) == 2 and all(name.startswith("prefetch") for name in decoding_threads)
    assert [r.encoder_cache_hit for r in records] == [False, False, True]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"prefetch_depth": -1}, "prefetch_depth=-1: use an integer >= 0"),
        ({"prefetch_depth": "two"}, "prefetch_depth='two'"),
        ({"prefetch_depth": 1.5}, "prefetch_depth=1.5"),
        ({"prefetch_workers": 0}, "prefetch_workers=0: use an integer >= 1"),
    ],
)
def test_bad_prefetch_settings_fail_at_construction_naming_the_value(tiny_checkpoint, settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        CompressedVideoLM(pretrained=str(tiny_checkpoint), device="cpu", **settings)


@pytest.mark.parametrize("device, cores, threads", [("cpu", 16, 1), ("cuda", 16, 4), ("cuda", 6, 3), ("cuda", 1, 1)])
def test_auto_prefetch_threads_feed_an_accelerator_and_leave_a_cpu_to_the_model(device, cores, threads):
    from dycoke_eval.wrapper import prefetch_threads

    assert prefetch_threads(device, cores) == threads


def test_prefetch_workers_default_to_auto(tiny_checkpoint):
    assert CompressedVideoLM(pretrained=str(tiny_checkpoint), device="cpu").prefetch_workers == 1
