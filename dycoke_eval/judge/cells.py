"""Judging a saved run cell: read its logged predictions, judge them, write the verdicts and metrics back.

Generation never waits for a judge: GPT-judged tasks log each prediction with a `judge_kind`
and show "not judged". This step fills in the metrics, over the samples that hold a verdict, and
records how many were judged and how many failed, with the reasons, and which judge (endpoint,
requested and reported model) gave each verdict. Running it again re-reads the predictions: a
new verdict replaces the earlier one of its sample, and a sample the new run fails to judge keeps
its earlier verdict (for the same prediction) and that verdict's judge, so a failed re-judge
never destroys verdicts.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from statistics import mean
from typing import Any

from dycoke_eval.judge.client import Judge, JudgeRequest, JudgeResult, is_openai_api, judge_label
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
    priced = is_openai_api(settings.endpoint())  # OpenAI's prices say nothing of what another endpoint costs
    return {"prompt_tokens": prompt, "completion_tokens": completion, "estimated_cost_usd": round(cost, 6) if priced else None,
            "from_cache": sum(o.cached for o in outcomes)}  # fmt: skip


def request_digest(request: JudgeRequest) -> str:
    """What a verdict is a verdict on (kind, question, answer, prediction): an earlier verdict is kept only for the same."""
    text = json.dumps([request.kind, request.question, request.answer, request.pred])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def judge_cell(cell: Cell | Path, judge: Judge) -> dict[str, dict[str, Any]]:
    """Judge every GPT-judged task of one cell (or cell folder) and update its results.json; returns a summary per task.

    Per sample, a new verdict replaces the earlier one; a sample that fails now keeps its earlier
    verdict. The metrics are computed over the verdicts held. Raises CellError when an earlier
    judgements file cannot be read (nothing is written then).
    """
    cell = cell if isinstance(cell, Cell) else read_cell(cell)
    results = cell.results
    identity = judge.identity()
    summaries, held_by_task = {}, {}
    for task in cell.sample_tasks():
        pending = pending_requests(cell.samples(task))
        if not pending:
            continue
        earlier = _held_verdicts(cell.judgements(task))
        outcomes = judge.judge_all([request for _, request in pending], description=f"Judging {task}")
        kind = pending[0][1].kind
        rows = [
            _verdict_row(doc_id, request, outcome, identity, earlier)
            for (doc_id, request), outcome in zip(pending, outcomes, strict=True)
        ]
        cell.write_judgements(task, rows)
        held = held_by_task[task] = [row for row in rows if row["status"] == "judged"]
        metrics = aggregate(kind, [row["verdict"] for row in held]) if held else {}
        failures = [
            {"doc_id": row["doc_id"], "error": o.error, "kept_earlier_verdict": row["status"] == "judged"}
            for row, o in zip(rows, outcomes, strict=True)
            if o.status == "failed"
        ]
        task_metrics = results["results"].setdefault(task, {})
        for metric in ("gpt_eval_score", "gpt_eval_accuracy") if kind == "qa" else ("gpt_eval_score",):
            task_metrics[f"{metric},none"] = metrics.get(metric, NOT_JUDGED)
        task_metrics.update(judged=len(held), judge_failed=len(rows) - len(held))
        summaries[task] = {
            "judge_model": identity["model"],  # this run's judge; `judges` says who gave the verdicts held
            "endpoint": identity["endpoint"],
            "openai_api": is_openai_api(identity["endpoint"]),
            "metrics": metrics,
            "judged": len(held),  # verdicts held: the metrics are computed over these
            "failed": len(rows) - len(held),  # samples without a verdict
            "judged_now": len(outcomes) - len(failures),
            "failed_now": len(failures),
            "kept": sum(failure["kept_earlier_verdict"] for failure in failures),
            "judges": _judges(held),
            "failures": failures[:MAX_LISTED_FAILURES],
            **_cost(judge, outcomes),
        }
        results.setdefault("dycoke_eval", {}).setdefault(task, {})["judge"] = summaries[task]
    if summaries:
        held = [row for rows in held_by_task.values() for row in rows]
        results["dycoke_eval_judge"] = {**judge.settings.describe(), "judges": _judges(held)}
        cell.write_results(results)
    return summaries


def _held_verdicts(rows: list[dict[str, Any]]) -> dict[tuple[Any, str], dict[str, Any]]:
    """Earlier verdicts that say which judge gave them and on which prediction, by (doc_id, request digest).

    Rows written before judgements recorded these are not kept: nothing says which judge, or which
    prediction, they belong to.
    """
    return {
        (row["doc_id"], row["request"]): row
        for row in rows
        if row.get("status") == "judged" and row.get("verdict") and row.get("judge") and row.get("request")
    }


def _verdict_row(
    doc_id: Any, request: JudgeRequest, outcome: JudgeResult, identity: dict[str, str], earlier: dict[tuple[Any, str], dict]
) -> dict[str, Any]:
    """One line of judgements_<task>.jsonl: the verdict held and the judge that gave it, or why there is none."""
    digest = request_digest(request)
    if outcome.status == "failed" and (kept := earlier.get((doc_id, digest))) is not None:
        return {**kept, "kept": True, "last_attempt": {"error": outcome.error, "judge": identity}}
    return {
        "doc_id": doc_id,
        "request": digest,
        "status": outcome.status,
        "verdict": outcome.verdict,
        "error": outcome.error,
        "cached": outcome.cached,
        "usage": outcome.usage,
        "judge": {**identity, "reported_model": outcome.reported_model},
    }


def _judges(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Who gave the verdicts held: endpoint, requested and reported model, and how many verdicts each."""
    counts = Counter(json.dumps(row["judge"], sort_keys=True) for row in rows)
    judges = [{**json.loads(judge), "verdicts": count} for judge, count in counts.most_common()]
    return [{**judge, "openai_api": is_openai_api(judge["endpoint"])} for judge in judges]


def format_judge_summary(summaries: dict[str, dict[str, Any]]) -> str:
    """Per task: the metric values and the verdicts they are computed over, this run's counts and cost, who judged."""
    lines = []
    for task, s in summaries.items():
        scores = ", ".join(f"{name}={value:.4g}" for name, value in s["metrics"].items()) or NOT_JUDGED
        lines.append(f"  {task}: {scores} ({s['judged']} verdicts held, {s['failed']} samples without a verdict)")
        cost = f"~${s['estimated_cost_usd']:.4f}" if s.get("estimated_cost_usd") is not None else "not priced"
        lines.append(
            f"    this run: judged {s['judged_now']}, failed {s['failed_now']} ({s['from_cache']} from cache), "
            f"{s['prompt_tokens']}+{s['completion_tokens']} tokens, {cost}, by {judge_label(s['endpoint'], s['judge_model'])}"
        )
        for j in s["judges"]:
            lines.append(f"    {j['verdicts']} verdicts from {judge_label(j['endpoint'], j['model'], j['reported_model'])}")
        lines += [f"    failed doc {f['doc_id']}: {f['error']}" for f in s["failures"][:3]]
        if s["kept"]:
            lines.append(f"    {s['kept']} samples that failed now keep their earlier verdict")
        if s["failed_now"] and not s["judged_now"]:
            lines.append("    no sample could be judged: check judge.base_url and the key, then run python -m dycoke_eval.judge")
    return "\n".join(lines)
