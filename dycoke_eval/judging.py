"""Judged metrics before a judge has run: predictions are kept, scores are "not judged", never 0."""

from __future__ import annotations

NOT_JUDGED = "not judged"


def _unjudged_item(doc: dict, results: list[str], kind: str) -> dict:
    """What a judge needs later: the document's scalar fields, the prediction and the judge's prompt kind."""
    fields = {k: v for k, v in doc.items() if isinstance(v, (str, int, float))}
    return {**fields, "pred": results[0], "judged": False, "judge_kind": kind}


def record_unjudged_qa(doc: dict, results: list[str]) -> dict:
    """`process_results` for ActivityNet-QA (judge gives accuracy and a 0-5 score)."""
    item = _unjudged_item(doc, results, "qa")
    return {"gpt_eval_score": item, "gpt_eval_accuracy": item}


def record_unjudged_description(doc: dict, results: list[str]) -> dict:
    """`process_results` for VideoDC (judge gives a 0-5 score)."""
    return {"gpt_eval_score": _unjudged_item(doc, results, "description")}


def not_judged(results: list[dict], args=None) -> str:
    return NOT_JUDGED
