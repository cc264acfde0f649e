"""`scripts/bench_gpu.py`: its count lines say what a prefill, a decode step and a DyCoke re-selection cost, and its
timed part runs end to end with only torch, transformers and the core (a GPU machine may have nothing else)."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from test_layering import BLOCKING

from dycoke_eval.config import group_options, instantiate_method

SCRIPT = REPO_ROOT / "scripts" / "bench_gpu.py"


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench_gpu = _script()


def test_every_method_config_builds_without_hydra_as_hydra_builds_it():
    for name in group_options("method"):
        assert bench_gpu.method_from_config(name) == instantiate_method(name), name
    assert bench_gpu.method_from_config("prumerge_official", {"neighbours": 8}) == instantiate_method(
        "prumerge_official", {"method.neighbours": 8}
    )  # a file composed from another's defaults, with a setting over both


def _count_lines(output: str) -> dict[tuple[str, str], dict[str, int]]:
    """(method, phase) -> its figures, from `counts tiny <method> <phase> ops=N syncs=M [bytes_to_host=B] ...`."""
    lines = {}
    for method, phase, figures in re.findall(r"^counts tiny (\S+) (\S+) (.*)$", output, re.MULTILINE):
        lines[method, phase] = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", figures)}
    return lines


@pytest.fixture(scope="module")
def tiny_bench():
    return bench_gpu.BenchModel.build("tiny", 4, torch.float32, "cpu")


def test_a_dycoke_decode_step_and_its_reselection_make_no_more_syncs_than_a_full_token_step(tiny_bench, capsys):
    """Paper mode decides each step's kept set on the device; with the pruned entries kept on the accelerator
    (`offload_pruned: false`) a re-selection copies nothing to the host. Offloaded, it does, and waits for it."""
    bench_gpu.print_in_llm_counts(tiny_bench, ["full", "dycoke"])
    lines = _count_lines(capsys.readouterr().out)
    full, paper, offload = "full", "dycoke_K=0.7", "dycoke_K=0.7_offload_pruned"
    assert {phase for method, phase in lines if method == full} == {"prefill", "decode_step"}
    assert {phase for method, phase in lines if method == paper} == {"prefill", "decode_step", "reselection"}
    assert lines[paper, "decode_step"]["syncs"] <= lines[full, "decode_step"]["syncs"]
    assert lines[paper, "reselection"]["syncs"] <= lines[full, "decode_step"]["syncs"]
    assert lines[paper, "reselection"]["bytes_to_host"] == 0
    assert lines["dycoke_K=0.7_official", "reselection"]["bytes_to_host"] == 0
    assert lines[offload, "reselection"]["bytes_to_host"] > 0
    assert lines[offload, "reselection"]["syncs"] > lines[full, "decode_step"]["syncs"]


def test_the_reselection_line_counts_a_decode_step_that_reselects(tiny_bench):
    for mode in ("paper", "official"):
        forced = bench_gpu.method_from_config("dycoke", {"mode": mode, "threshold": bench_gpu.FORCED_RESELECTION})
        _, figures = bench_gpu.in_llm_counts(tiny_bench, forced)
        assert figures.figures["reselections"] == figures.figures["decode_steps"] == bench_gpu.COUNT_NEW_TOKENS - 1


TIMED_FIGURES = ("encoder_ms", "pre_llm_ms", "prefill_ms", "decode_ms_per_token", "sample_ms", "visual_tokens",
                 "prompt_tokens", "retained_ratio", "peak_rss_gb")  # fmt: skip
SMOKE = ["--gpu", "--device", "cpu", "--size", "tiny", "--frames", "4", "--repeats", "1", "--new-tokens", "2"]


def test_the_timed_part_prints_a_line_per_method_and_writes_the_figures_with_what_made_them(tmp_path, capsys):
    out = tmp_path / "perf.json"
    bench_gpu.main([*SMOKE, "--methods", "full", "fastv", "--out", str(out)])
    timed = dict(re.findall(r"^timed tiny (\S+) (.*)$", capsys.readouterr().out, re.MULTILINE))
    assert sorted(timed) == ["fastv_K=5_R=35%", "full"]
    for line in timed.values():
        assert [key for key, _ in re.findall(r"(\w+)=(\S+)", line) if key in TIMED_FIGURES] == list(TIMED_FIGURES)
    record = json.loads(out.read_text())
    assert {"date", "device_name", "machine", "versions", "git", "settings", "model_build_s", "methods"} <= set(record)
    assert {"torch", "transformers"} <= set(record["versions"]) and "commit" in record["git"]
    assert record["settings"] | {"size": "tiny", "frames": 4, "repeats": 1, "new_tokens": 2} == record["settings"]
    full, fastv = record["methods"]["full"], record["methods"]["fastv K=5 R=35%"]
    assert full["visual_tokens"] == full["full_visual_tokens"] == 4 * 16 + 1 and full["retained_ratio"] == 1
    assert fastv["visual_tokens"] == full["visual_tokens"] and fastv["retained_ratio"] < 1  # fastv drops in prefill
    assert all(full[figure] > 0 for figure in ("encoder_ms", "prefill_ms", "decode_ms_per_token", "sample_ms"))


def test_a_method_beyond_the_model_is_skipped_with_its_reason(capsys):
    bench_gpu.main([*SMOKE, "--methods", "prunevid"])
    output = capsys.readouterr().out
    assert re.search(r"^timed tiny prunevid encoder_ms=", output, re.MULTILINE)
    assert re.search(r"^timed tiny prunevid_in_llm skipped: selected_layer=10: .* 8 layers", output, re.MULTILINE)


BLOCKED_RUN = (
    BLOCKING
    + """
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
)


@pytest.mark.slow
def test_the_timed_part_runs_with_lmms_eval_hydra_omegaconf_and_pyav_blocked():
    """What a GPU machine with only torch and transformers runs (a fresh interpreter: lazy imports included)."""
    command = [sys.executable, "-c", BLOCKED_RUN, str(SCRIPT), *SMOKE, "--methods", "full"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^timed tiny full encoder_ms=", proc.stdout, re.MULTILINE)
