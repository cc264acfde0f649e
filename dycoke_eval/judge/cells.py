"""Judging a saved run cell: read its logged predictions, judge them, write the verdicts and metrics back.

Generation never waits for a judge: GPT-judged tasks log each prediction with a `judge_kind`
and show "not judged". This step fills in the metrics, over the samples that were judged, and
records how many were judged and how many failed, with the reasons. Running it again re-reads
the predictions, so a later judge (or judge model) replaces the earlier verdicts.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean
from typing import Any

from dycoke_eval.judge.client import Judge, JudgeRequest, JudgeResult
from dycoke_eval.judging import NOT_JUDGED
from dycoke_eval.store import Cell, read_cell

MAX_LISTED_FAILURES = 20


def pending_requests(samples: list[dict[str, Any]]) -> list[tuple[int, JudgeRequest]]:
    """(doc_id, request) for every logged prediction of a GPT-judged task (lmms-eval's logged samples)."""
    pending = []
    for sample in samples:
        item = sample.get("gpt_eval_score")
        if isinstance(item, dict) and "judge_kind" in item:
            request = JudgeRequest(item["judge_kind"], str(item["question"]), str(item["answer"]), str(item["pred"]))
            pending.append((sample["doc_id"], request))
    return pending


def aggregate(kind: str, verdicts: list[dict[str, Any]]) -> dict[str, float]:
    """The metrics lmms-eval's aggregations compute, over the judged samples only."""
    score = mean(verdict["score"] for verdict in verdicts)
    if kind == "description":
        return {"gpt_eval_score": score}
    answered = [verdict for verdict in verdicts if verdict["pred"] in ("yes", "no")]
    accuracy = sum(verdict["pred"] == "yes" for verdict in answered) / len(answered) * 100  # lmms-eval's order
    return {"gpt_eval_score": score, "gpt_eval_accuracy": accuracy}


def _cost(judge: Judge, outcomes: list[JudgeResult]) -> dict[str, Any]:
    fresh = [o.usage for o in outcomes if not o.cached]
    prompt, completion = sum(u.get("prompt_tokens", 0) for u in fresh), sum(u.get("completion_tokens", 0) for u in fresh)
    settings = judge.settings
    cost = (prompt * settings.price_per_million_input + completion * settings.price_per_million_output) / 1e6
    return {"prompt_tokens": prompt, "completion_tokens": completion, "estimated_cost_usd": round(cost, 6),
            "from_cache": sum(o.cached for o in outcomes)}  # fmt: skip


def judge_cell(cell: Cell | Path, judge: Judge) -> dict[str, dict[str, Any]]:
    """Judge every GPT-judged task of one cell (or cell folder) and update its results.json; returns a summary per task."""
    cell = cell if isinstance(cell, Cell) else read_cell(cell)
    results = cell.results
    summaries = {}
    for task in cell.sample_tasks():
        pending = pending_requests(cell.samples(task))
        if not pending:
            continue
        outcomes = judge.judge_all([request for _, request in pending], description=f"Judging {task}")
        kind = pending[0][1].kind
        cell.write_judgements(task, _verdict_rows(pending, outcomes))
        verdicts = [outcome.verdict for outcome in outcomes if outcome.status == "judged"]
        metrics = aggregate(kind, verdicts) if verdicts else {}
        failures = [
            {"doc_id": doc_id, "error": o.error} for (doc_id, _), o in zip(pending, outcomes, strict=True) if o.status == "failed"
        ]
        task_metrics = results["results"].setdefault(task, {})
        for metric in ("gpt_eval_score", "gpt_eval_accuracy") if kind == "qa" else ("gpt_eval_score",):
            task_metrics[f"{metric},none"] = metrics.get(metric, NOT_JUDGED)
        task_metrics.update(judged=len(verdicts), judge_failed=len(failures))
        summaries[task] = {
            "judge_model": judge.settings.model,
            "judged": len(verdicts),
            "failed": len(failures),
            "failures": failures[:MAX_LISTED_FAILURES],
            **_cost(judge, outcomes),
        }
        results.setdefault("dycoke_eval", {}).setdefault(task, {})["judge"] = summaries[task]
    results.setdefault("dycoke_eval_judge", {}).update(judge.settings.describe())
    cell.write_results(results)
    return summaries


def _verdict_rows(pending: list[tuple[int, JudgeRequest]], outcomes: list[JudgeResult]) -> list[dict[str, Any]]:
    """One line of judgements_<task>.jsonl per sample: the verdict, or why there is none."""
    return [
        {"doc_id": doc_id, "status": o.status, "verdict": o.verdict, "error": o.error, "cached": o.cached, "usage": o.usage}
        for (doc_id, _), o in zip(pending, outcomes, strict=True)
    ]


def format_judge_summary(summaries: dict[str, dict[str, Any]]) -> str:
    lines = []
    for task, s in summaries.items():
        lines.append(
            f"  {task}: judged {s['judged']}, failed {s['failed']} ({s['from_cache']} from cache), "
            f"{s['prompt_tokens']}+{s['completion_tokens']} tokens, ~${s['estimated_cost_usd']:.4f} with {s['judge_model']}"
        )
        lines += [f"    failed doc {f['doc_id']}: {f['error']}" for f in s["failures"][:3]]
        if s["failed"] and not s["judged"]:
            lines.append("    no sample could be judged: check judge.base_url and the key, then run python -m dycoke_eval.judge")
    return "\n".join(lines)
