"""The judge prompts and answer formats of lmms-eval's ActivityNet-QA and VideoDC tasks.

lmms-eval builds each prompt inline inside a function that also posts it with `requests`, so the
prompt cannot be imported as data. Instead the `messages = [...]` expression is read from the
installed lmms-eval source with `ast` and evaluated with the question, answer and prediction.
The text is therefore lmms-eval's own, never retyped, and it follows upstream changes. The
parsers accept what lmms-eval's parsers accept, but strictly: a reply that does not hold a valid
verdict raises `MalformedReply` instead of becoming a score of 0.
"""

from __future__ import annotations

import ast
import functools
from types import CodeType

from dycoke_eval.config import lmms_eval_tasks_dir

JUDGE_SOURCES = {  # kind -> (file under lmms_eval/tasks, function that builds the prompt)
    "qa": ("activitynetqa/utils.py", "get_eval"),
    "description": ("video_detail_description/utils.py", "get_eval_generic"),
}
SCORE_RANGE = range(0, 6)


class MalformedReply(ValueError):
    """The judge answered, but not with a verdict in the expected format."""


@functools.cache
def _messages_expression(kind: str) -> CodeType:
    relative, function = JUDGE_SOURCES[kind]
    source_path = lmms_eval_tasks_dir() / relative
    tree = ast.parse(source_path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            for statement in node.body:
                if isinstance(statement, ast.Assign) and [getattr(t, "id", None) for t in statement.targets] == ["messages"]:
                    return compile(ast.Expression(statement.value), str(source_path), "eval")
    raise RuntimeError(f"no `messages = [...]` in {function}() of {source_path}: this lmms-eval version changed its judge")


def build_messages(kind: str, question: str, answer: str, pred: str) -> list[dict[str, str]]:
    """The chat messages lmms-eval sends its judge for this sample."""
    if kind not in JUDGE_SOURCES:
        raise ValueError(f"judge kind {kind!r}; use one of {', '.join(JUDGE_SOURCES)}")
    return eval(_messages_expression(kind), {}, {"question": question, "answer": answer, "pred": pred})  # noqa: S307


def parse_reply(kind: str, text: str) -> dict[str, object]:
    """`{'pred': 'yes'|'no', 'score': 0..5}` for qa, `{'score': 0..5}` for description."""
    start, end = text.find("{"), text.find("}", text.find("{"))
    if start < 0 or end < 0:
        raise MalformedReply(f"no dictionary in the reply: {text[:200]!r}")
    try:
        reply = ast.literal_eval(text[start : end + 1])
    except (ValueError, SyntaxError) as error:
        raise MalformedReply(f"unparseable dictionary {text[start : end + 1][:200]!r}: {error}") from None
    if not isinstance(reply, dict) or "score" not in reply:
        raise MalformedReply(f"reply has no 'score': {reply!r}")
    try:
        score = int(reply["score"])  # lmms-eval truncates, e.g. 4.8 -> 4
    except (TypeError, ValueError):
        raise MalformedReply(f"score is not a number: {reply['score']!r}") from None
    if score not in SCORE_RANGE:
        raise MalformedReply(f"score {score} is outside 0-5")
    if kind == "description":
        return {"score": score}
    verdict = str(reply.get("pred", "")).lower()
    pred = "yes" if "yes" in verdict else "no" if "no" in verdict else None
    if pred is None:
        raise MalformedReply(f"'pred' is not yes/no: {reply.get('pred')!r}")
    return {"pred": pred, "score": score}
