"""One folder per run cell: lmms-eval's results and samples, our per-sample records, and run.json.

Layout of `${results_dir}/cells/<cell>/` (cells are shared by every sweep that lists them):
  results.json            lmms-eval's results (metrics, configs, versions) plus a `dycoke_eval` summary
  samples_<task>.jsonl    lmms-eval's logged samples
  sample_records.jsonl    per sample: visual tokens entering the LLM, stage seconds, failures
  run.json                resolved config, method settings, versions, git commit, hardware, timings
  journal.jsonl           finished samples, written as they finish, so a killed cell resumes
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dycoke_eval.provenance import git_state, hardware, package_versions

PIPELINE_STAGES = ("video_decode", "preprocess", "vision_encoder", "compress", "generate")  # one sample's wall time
CELL_KEYS = ("model", "method", "frames", "prompt", "tasks", "limit", "seed", "max_new_tokens")  # what makes two cells the same


NOT_SETTINGS = {"name", "paper_retained_ratio", "planned_ratio", "compile_ttm"}  # derived, plan-only or how it computes


def method_settings(described: dict[str, Any]) -> dict[str, Any]:
    """What a method computes, from its recorded `describe()`: two cells collide only if every setting agrees."""
    return {key: value for key, value in described.items() if key not in NOT_SETTINGS}


def method_label(described: dict[str, Any]) -> str:
    """`fastv(layer=5,ratio=0.35)`: the method's name and every setting, for keys people read."""
    settings = method_settings(described)
    return f"{described['name']}({','.join(f'{key}={settings[key]}' for key in sorted(settings))})"


def cell_config(cfg: DictConfig) -> dict[str, Any]:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {key: resolved.get(key) for key in CELL_KEYS}


def cell_directory(cfg: DictConfig) -> Path:
    """`<model>__<method>__f<frames>__<tasks>__<hash>`, the hash over the resolved cell config."""
    config = cell_config(cfg)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    method = cfg.method.get("name") or str(cfg.method._target_).rsplit(".", 1)[-1].lower()
    name = f"{cfg.model.name}__{method}__f{cfg.frames}__{cfg.tasks.name}__{digest}"
    return Path(cfg.results_dir) / "cells" / name


def is_complete(cell_dir: Path, cfg: DictConfig) -> bool:
    """A finished cell made from this very config (not merely a folder of the same name)."""
    run_file = cell_dir / "run.json"
    if not run_file.exists():
        return False
    run = json.loads(run_file.read_text())
    return bool(run.get("complete")) and run.get("cell") == json.loads(json.dumps(cell_config(cfg), default=str))


def summarise_records(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: sample and failure counts, failures with path and reason, token and stage means."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    summary = {}
    for task, rows in sorted(by_task.items()):
        ok = [r for r in rows if r["status"] == "ok"]
        stages = sorted({stage for r in ok for stage in r["seconds"]})
        summary[task] = {
            "samples": len(rows),
            "failed": len(rows) - len(ok),
            "failures": [
                {"doc_id": r["doc_id"], "video_path": r["video_path"], "error": r["error"]} for r in rows if r["status"] != "ok"
            ],
            "visual_tokens_in_mean": mean(r["visual_tokens_in"] for r in ok) if ok else None,
            "visual_tokens_full_mean": mean(r["visual_tokens_full"] for r in ok) if ok else None,
            "seconds_mean": {stage: mean(r["seconds"][stage] for r in ok if stage in r["seconds"]) for stage in stages},
            "method_stats_mean": _numeric_means([r["method_stats"] for r in ok]),
            "resumed_from_journal": sum(r.get("from_journal", False) for r in rows),
            **_efficiency(ok),
            "encoder_cache_hits": sum(r.get("encoder_cache_hit", False) for r in rows),
        }
    return summary


def _efficiency(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency per example (the pipeline stages summed), peak memory and KV-cache bytes, for measured samples."""
    measured = [r for r in rows if r.get("memory")]
    if not measured:
        return {}
    latencies = [sum(r["seconds"].get(stage, 0.0) for stage in PIPELINE_STAGES) for r in measured]
    keys = sorted({k for r in measured for k in r["memory"]})
    steps = [step for r in measured for step in r.get("decode_step_seconds", [])]
    return {
        "latency_mean_s": mean(latencies),
        "latency_total_s": sum(latencies),
        "prefill_mean_s": mean(r["seconds"].get("prefill", 0.0) for r in measured),
        "decode_step_mean_s": mean(steps) if steps else None,
        "memory_peak_gb": {k: max(r["memory"].get(k, 0.0) for r in measured) for k in keys},
        "kv_cache_bytes_mean": mean(r.get("kv_cache_bytes", 0) for r in measured),
    }


def _numeric_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of every numeric per-sample method figure (None where a sample had no value)."""
    keys = sorted({k for row in rows for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {k: mean(row[k] for row in rows if isinstance(row.get(k), (int, float))) for k in keys}


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)  # never leave a half-written file behind


def _write_jsonl(path: Path, rows: list[Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
    tmp.replace(path)


def write_cell(
    cell_dir: Path, cfg: DictConfig, output: dict[str, Any], records: list[dict[str, Any]], method, runtime: dict[str, Any]
) -> None:
    """`runtime`: what the loaded model actually ran with (device, dtype, attention implementation).

    A cell with a failed sample is written but not complete: the next run of the same command
    retries exactly the failed samples (the others come back from the journal).
    """
    cell_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise_records(records)
    failed = sum(task["failed"] for task in summary.values())
    for task, samples in (output.get("samples") or {}).items():
        _write_jsonl(cell_dir / f"samples_{task}.jsonl", samples)
    _write_jsonl(cell_dir / "sample_records.jsonl", records)
    results = {key: value for key, value in output.items() if key != "samples"}
    results["dycoke_eval"] = summary
    _write_json(cell_dir / "results.json", results)
    _write_json(
        cell_dir / "run.json",
        {
            "cell": cell_config(cfg),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "method": method.describe(),
            "versions": package_versions(),
            "git": git_state(),
            "hardware": hardware(),
            "runtime": runtime,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tasks": summary,
            "failed_samples": failed,
            "complete": failed == 0,  # a cell not complete is redone; its journal keeps the finished samples
        },
    )
    print(format_summary(cell_dir, output.get("results", {}), summary))


def format_summary(cell_dir: Path, metrics: dict[str, dict[str, Any]], summary: dict[str, dict[str, Any]]) -> str:
    lines = [f"results: {cell_dir}"]
    for task, values in metrics.items():
        shown = ", ".join(
            f"{k.split(',')[0]}={v:.4g}" if isinstance(v, float) else f"{k.split(',')[0]}={v}"
            for k, v in values.items()
            if k != "alias" and "_stderr" not in k
        )
        counts = summary.get(task, {})
        failed = (
            f"  [{counts['failed']} of {counts['samples']} samples FAILED: scored as empty answers here; "
            "the cell is not complete, and rerunning the same command retries them]"
            if counts.get("failed")
            else ""
        )
        lines.append(f"  {task}: {shown}{failed}")
    return "\n".join(lines)


def format_efficiency(cell: str, records: list[dict[str, Any]]) -> str:
    """One line of what the efficiency protocol measured for a cell."""
    figures = _efficiency([r for r in records if r["status"] == "ok"])
    if not figures:
        return f"cell {cell}: no measured sample"
    ok = [r for r in records if r["status"] == "ok" and r.get("memory")]
    prefill = mean(r["seconds"].get("prefill", 0.0) for r in ok)
    steps = [r["seconds"]["decode_per_token"] for r in ok if "decode_per_token" in r["seconds"]]
    decode = f", decode {mean(steps) * 1e3:.1f} ms/token" if steps else ""
    memory = ", ".join(f"{k} {v:.2f}" for k, v in figures["memory_peak_gb"].items())
    return (
        f"cell {cell}: {figures['latency_mean_s']:.3f} s per example ({figures['latency_total_s']:.1f} s in all), "
        f"prefill {prefill:.3f} s{decode}; {memory}; KV cache {figures['kv_cache_bytes_mean'] / 2**20:.1f} MiB"
    )
