"""The efficiency protocol on the tiny model, and the real architectures with random weights."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_app

from dycoke_eval.checkpoints import build_random_model
from dycoke_eval.report import render_report

MEASURED = ["tasks.names=[fixture_mvbench_action_antonym,fixture_mvbench_object_shuffle]", "frames=8", "limit=2",
            "measure=true", "max_new_tokens=3", "run_name=table3"]  # fmt: skip


@pytest.fixture(scope="module")
def measured(offline_dir, tmp_path_factory):
    """Full tokens and DyCoke measured as one multirun (one process); each cell's own efficiency line, by method."""
    results = tmp_path_factory.mktemp("measured")
    outputs = {}
    for method in ("full", "dycoke"):
        proc = run_app(*MEASURED, f"method={method}", f"results_dir={results}", env={"DYCOKE_OFFLINE_DIR": str(offline_dir)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[method] = proc.stdout
    return results, outputs


def records(results, method):
    (path,) = results.glob(f"cells/tiny__{method}__*/sample_records.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", ["full", "dycoke"])
def test_every_stage_is_timed_and_memory_and_cache_are_reported(measured, method):
    results, outputs = measured
    for record in records(results, method):
        stages = (
            "video_decode",
            "preprocess",
            "vision_encoder",
            "compress",
            "generate",
            "prefill",
            "decode_per_token",
            "cpu_time",
        )
        assert all(record["seconds"][stage] > 0 for stage in stages), record["seconds"]
        assert record["seconds"]["prefill"] < record["seconds"]["generate"]
        model_stages = record["seconds"]["vision_encoder"] + record["seconds"]["compress"] + record["seconds"]["generate"]
        assert record["seconds"]["model_latency"] == pytest.approx(model_stages)  # decode and preprocess left out
        assert record["memory"]["peak_rss_gb"] > 0 and record["kv_cache_bytes"] > 0
        assert not record["encoder_cache_hit"]  # a measured cell pays for its own encoder
    assert "s per example" in outputs[method] and "ms/token" in outputs[method] and "KV cache" in outputs[method]


def test_dycoke_holds_a_smaller_kv_cache_than_full(measured):
    results, _ = measured
    full, dycoke = (np.mean([r["kv_cache_bytes"] for r in records(results, m)]) for m in ("full", "dycoke"))
    assert dycoke < full  # TTM shortened the sequence the cache holds


def test_table3_speedup_is_against_full_tokens_in_the_same_run(measured):
    results, _ = measured
    table = render_report(results, tables=[3])[3]
    tiny = table[table[("", "model")] == "tiny"].set_index(("", "method"))
    full, dycoke = tiny.loc["Full Tokens"], tiny.loc["DyCoke ($K = 0.7$)"]
    assert full[("speedup", "ours")] == pytest.approx(1.0)
    expected = full[("latency_per_example_s", "ours")] / dycoke[("latency_per_example_s", "ours")]
    assert dycoke[("speedup", "ours")] == pytest.approx(expected)
    assert dycoke[("gpu_memory_gb", "ours")] > 0 and dycoke[("total_latency_s", "ours")] > 0


@pytest.mark.parametrize("size, parameters", [("0.5b", 894e6), ("7b", 8.03e9), ("72b", 73.2e9)])
def test_random_weights_build_the_real_architecture_without_a_download(size, parameters):
    adapter = build_random_model(size, torch.bfloat16, "meta")  # shapes only: no memory, no time
    model, processor = adapter.model, adapter.processor
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.01)
    video = np.zeros((2, 64, 80, 3), dtype=np.uint8)
    inputs = processor(text="<video>\nhi", videos=[video], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 2 * 196 + 1


def test_the_efficiency_summary_gives_speed_memory_and_cache_ratios_against_full(measured):
    results, _ = measured
    render_report(results, tables=[3])
    summary = pd.read_csv(results / "report" / "efficiency.csv").set_index("method")
    assert summary.loc["full", ["speedup", "memory_ratio", "kv_cache_ratio"]].tolist() == [1.0, 1.0, 1.0]
    dycoke = summary.loc["dycoke"]
    assert dycoke.speedup == pytest.approx(summary.loc["full"].latency_per_example_s / dycoke.latency_per_example_s)
    full_model = summary.loc["full"].model_latency_per_example_s
    assert dycoke.model_speedup == pytest.approx(full_model / dycoke.model_latency_per_example_s)
    assert 0 < dycoke.model_latency_per_example_s < dycoke.latency_per_example_s  # the input pipeline left out
    assert list(summary.columns).index("model_speedup") == list(summary.columns).index("speedup") + 1
    assert dycoke.kv_cache_ratio < 1 and dycoke.decode_ms_per_token > 0 and dycoke.samples == 4
    for record in records(results, "dycoke"):
        assert len(record["decode_step_seconds"]) == 2  # max_new_tokens=3: the first token comes from prefill
    # the prefill's speed-up against what the real prefill FLOPs allow (the plan's bound, below eq. 8's)
    assert dycoke.of_real_bound == pytest.approx(dycoke.prefill_speedup / dycoke.prefill_bound_real)
    assert 1 < dycoke.prefill_bound_real < dycoke.prefill_bound_eq8 and summary.loc["full"].of_real_bound == 1.0
