"""The judge against a real local chat-completions server on 127.0.0.1, faults included."""

import hashlib
import importlib.util
import json
import os
import socket
import sqlite3
import time
from dataclasses import replace
from pathlib import Path

import lmms_eval.tasks
import pytest
from conftest import run_app

from dycoke_eval.judge import client
from dycoke_eval.judge.__main__ import main as judge_main
from dycoke_eval.judge.cells import aggregate, format_judge_summary, judge_cell
from dycoke_eval.judge.client import DEFAULT_ENDPOINT, Judge, JudgeRequest, JudgeSettings, JudgeUnavailable, judge_label
from dycoke_eval.judge.prompts import MalformedReply, build_messages, parse_reply
from dycoke_eval.offline.judge_server import running_judge_server

SECRET = "sk-test-never-written-anywhere"


@pytest.fixture
def server():
    with running_judge_server(slow_seconds=2.5) as running:
        yield running


@pytest.fixture
def settings(server, tmp_path):
    url, _ = server
    return JudgeSettings(base_url=url, timeout=1.0, max_retries=3, concurrency=8, cache_path=str(tmp_path / "cache.sqlite"))


def load_lmms_eval_task_utils(relative: str, api_url: str):
    """A fresh copy of an lmms-eval task's utils module, pointed at our server (it reads the URL at import)."""
    os.environ["OPENAI_API_URL"] = api_url
    path = Path(lmms_eval.tasks.__file__).parent / relative
    spec = importlib.util.spec_from_file_location(f"lmms_utils_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind, relative, function", [
    ("qa", "activitynetqa/utils.py", "get_eval"),
    ("description", "video_detail_description/utils.py", "get_eval_generic"),
])  # fmt: skip
def test_prompts_are_exactly_what_lmms_eval_itself_sends(offline_dir, server, kind, relative, function):
    url, state = server
    utils = load_lmms_eval_task_utils(relative, f"{url}/chat/completions")
    review, _ = getattr(utils, function)("what is moving", "a red square", "a square", 64)
    (sent,) = [json.loads(body) for body in state.attempts]
    assert sent["messages"] == build_messages(kind, "what is moving", "a red square", "a square")
    assert parse_reply(kind, review)  # and our parser reads the reply lmms-eval got


@pytest.mark.parametrize("text, expected", [
    ("{'pred': 'yes', 'score': 4.8}", {"pred": "yes", "score": 4}),
    ("Here: {'pred': 'No', 'score': 0} done", {"pred": "no", "score": 0}),
])  # fmt: skip
def test_qa_replies_parse_as_lmms_eval_parses_them(text, expected):
    assert parse_reply("qa", text) == expected


@pytest.mark.parametrize("kind, text", [
    ("qa", "The answer is right."), ("qa", "{'pred': 'maybe', 'score': 3}"), ("qa", "{'pred': 'yes', 'score': 9}"),
    ("description", "{'score': 'high'}"), ("description", "{'grade': 3}"), ("description", "{'score': 3"),
])  # fmt: skip
def test_a_reply_without_a_valid_verdict_is_malformed_not_zero(kind, text):
    with pytest.raises(MalformedReply):
        parse_reply(kind, text)


FAULTS = ["[429]", "[500]", "[slow]", "[flaky-reply]", "[malformed-body]", "[not-dict]", "[bad-score]"]
RECOVERABLE = {"[429]", "[500]", "[slow]", "[flaky-reply]"}


def test_every_sample_ends_judged_or_failed_with_a_reason_under_injected_faults(settings):
    requests = [JudgeRequest("qa", "q", "a cat", "a cat"), JudgeRequest("qa", "q", "a cat", "a dog")]
    requests += [JudgeRequest("qa", "q", "a cat", f"x {fault}") for fault in FAULTS]
    outcomes = Judge(settings).judge_all(requests)
    assert len(outcomes) == len(requests)
    assert [o.verdict for o in outcomes[:2]] == [{"pred": "yes", "score": 5}, {"pred": "no", "score": 1}]
    for fault, outcome in zip(FAULTS, outcomes[2:], strict=True):
        if fault in RECOVERABLE:
            assert outcome.status == "judged" and outcome.verdict == {"pred": "no", "score": 1}, fault
        else:
            assert outcome.status == "failed" and outcome.verdict is None and outcome.error, fault


def test_retry_after_is_honoured(settings):
    start = time.perf_counter()
    (outcome,) = Judge(settings).judge_all([JudgeRequest("description", "q", "a", "x [429]")])
    assert outcome.status == "judged" and time.perf_counter() - start >= 1.0


@pytest.fixture
def no_refusals(monkeypatch):
    """A fresh process's memory of judges that refused (`client.REFUSED`)."""
    monkeypatch.setattr(client, "REFUSED", {})


def test_an_unreachable_judge_stops_at_the_first_refused_connection_in_one_line(tmp_path, no_refusals):
    url = closed_port_url()
    settings = JudgeSettings(base_url=url, max_retries=5, cache_path=str(tmp_path / "c.sqlite"))  # no SDK retries reached
    with pytest.raises(JudgeUnavailable, match=rf"cannot connect to the judge at {url} \(Connection refused\); start"):
        Judge(settings).judge_all([JudgeRequest("qa", "q", "a", "b")] * 3)
    with pytest.raises(JudgeUnavailable, match="as earlier in this process"):  # a sweep's next cell does not try again
        Judge(settings).judge_all([JudgeRequest("qa", "q", "a", "c")])


def test_a_cached_re_judge_needs_no_server(tmp_path, no_refusals):
    requests = [JudgeRequest("qa", "q", "a", "a")]
    with running_judge_server() as (url, _):
        settings = JudgeSettings(base_url=url, cache_path=str(tmp_path / "c.sqlite"))
        Judge(settings).judge_all(requests)
    assert Judge(settings).judge_all(requests)[0].cached  # the server is gone: every reply comes from the cache


def test_a_rejected_key_stops_judging_every_cell_after_the_first_refusal(tmp_path, monkeypatch, capsys, no_refusals):
    for name in ("cell_a", "cell_b"):
        make_cell(tmp_path / name, ["a cat", "a dog", "a cat"])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    monkeypatch.setenv("HOME", str(tmp_path))
    with running_judge_server(api_key="sk-right") as (url, state):
        assert judge_main([str(tmp_path), f"judge.base_url={url}", "judge.concurrency=1"]) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dycoke_eval.judge:")]
    assert f"the judge at {url} refused: AuthenticationError" in line and "check $OPENAI_API_KEY" in line
    assert state.requests == 1  # one refusal, not one per sample or per cell
    assert not list(tmp_path.rglob("judgements_*.jsonl"))  # nothing recorded as judged or failed


def test_verdicts_from_a_stand_in_endpoint_are_labelled_as_such_and_not_priced(tmp_path, settings, capsys):
    cell = make_cell(tmp_path / "cell", ["a cat", "a dog", "a cat"])
    summary = judge_cell(cell, Judge(settings))
    text = format_judge_summary(summary)
    assert f"3 verdicts from a stand-in at {settings.base_url}, not OpenAI's API (asked for gpt-4o-mini)" in text
    assert "not priced" in text and "$" not in text
    recorded = read_results(cell)
    assert recorded["dycoke_eval_judge"]["openai_api"] is False and summary["anet"]["estimated_cost_usd"] is None
    official = judge_label(DEFAULT_ENDPOINT, "gpt-4o-mini", "gpt-4o-mini-2024-07-18")
    assert official == "gpt-4o-mini, reported gpt-4o-mini-2024-07-18"


def test_a_second_run_is_served_from_the_cache_with_the_same_verdicts(server, settings):
    _, state = server
    requests = [JudgeRequest("qa", "q", "a cat", pred) for pred in ("a cat", "a dog", "x [500]")]
    first = Judge(settings).judge_all(requests)
    sent = state.requests
    second = Judge(settings).judge_all(requests)
    assert state.requests == sent
    assert [o.verdict for o in first] == [o.verdict for o in second] and all(o.cached for o in second)


def test_a_different_judge_model_is_not_served_another_models_cached_replies(server, settings):
    _, state = server
    Judge(settings).judge_all([JudgeRequest("qa", "q", "a", "a")])
    settings.model = "gpt-4o-2024-11-20"
    sent = state.requests
    Judge(settings).judge_all([JudgeRequest("qa", "q", "a", "a")])
    assert state.requests == sent + 1


def test_a_verdict_cached_from_one_endpoint_is_never_served_for_another(server, settings):
    _, first_server = server
    requests = [JudgeRequest("qa", "q", "a", "a")]
    Judge(settings).judge_all(requests)
    with running_judge_server(reported_model="another-judge") as (other_url, other_server):
        (outcome,) = Judge(replace(settings, base_url=other_url)).judge_all(requests)  # same model, same request
    assert other_server.requests == 1 and not outcome.cached and outcome.reported_model == "another-judge"
    (again,) = Judge(settings).judge_all(requests)  # each endpoint keeps its own verdict, with the model it reported
    assert again.cached and again.reported_model == "gpt-4o-mini" and first_server.requests == 1


def test_a_cache_file_written_before_endpoints_were_keyed_is_not_served(server, settings):
    _, state = server
    request = JudgeRequest("qa", "q", "a", "a")
    old_payload = {"model": settings.model, "messages": build_messages("qa", "q", "a", "a"), "temperature": 0.0, "max_tokens": 64}
    old_key = hashlib.sha256(json.dumps(old_payload, sort_keys=True).encode()).hexdigest()  # the old schema's key
    with sqlite3.connect(settings.cache_path) as old:
        old.execute("CREATE TABLE replies (key TEXT PRIMARY KEY, reply TEXT, usage TEXT)")
        old.execute("INSERT INTO replies VALUES (?, ?, ?)", (old_key, "{'pred': 'no', 'score': 0}", "{}"))
    (outcome,) = Judge(settings).judge_all([request])
    assert state.requests == 1 and not outcome.cached and outcome.verdict == {"pred": "yes", "score": 5}


def test_metrics_match_lmms_eval_aggregations_over_the_same_verdicts(offline_dir, server):
    url, _ = server
    verdicts = [{"pred": "yes", "score": 5}, {"pred": "no", "score": 1}, {"pred": "yes", "score": 4}]
    items = [{"Correctness": v["pred"], "score": v["score"]} for v in verdicts]
    anet = load_lmms_eval_task_utils("activitynetqa/utils.py", url)
    vdc = load_lmms_eval_task_utils("video_detail_description/utils.py", url)
    assert aggregate("qa", verdicts) == {
        "gpt_eval_score": anet.activitynetqa_aggregate_score(items, None),
        "gpt_eval_accuracy": anet.activitynetqa_aggregate_accuracy(items, None),
    }
    assert aggregate("description", verdicts)["gpt_eval_score"] == vdc.video_detail_description_aggregate_score(items, None)


JUDGED_TASKS = "tasks.names=[fixture_activitynetqa,fixture_video_dc499]"


def test_the_offline_default_reports_judged_metrics_from_a_local_judge_and_never_writes_the_key(offline_dir, server, tmp_path):
    url, _ = server
    env = {"DYCOKE_OFFLINE_DIR": str(offline_dir), "OPENAI_API_KEY": SECRET, "HOME": str(tmp_path)}
    proc = run_app(JUDGED_TASKS, "frames=4", f"results_dir={tmp_path / 'results'}", f"judge.base_url={url}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "results").rglob("results.json")
    results = json.loads(results_file.read_text())
    anet, vdc = results["results"]["fixture_activitynetqa"], results["results"]["fixture_video_dc499"]
    assert all(isinstance(value, (int, float)) for value in (anet["gpt_eval_accuracy,none"], vdc["gpt_eval_score,none"]))
    assert anet["judged"] == vdc["judged"] == 3 and anet["judge_failed"] == 0
    assert results["dycoke_eval"]["fixture_activitynetqa"]["judge"]["prompt_tokens"] > 0
    assert "judged 3, failed 0" in proc.stdout
    for path in (tmp_path / "results").rglob("*"):
        assert not path.is_file() or SECRET not in path.read_text(errors="ignore"), path
    assert SECRET not in proc.stdout + proc.stderr


def test_saved_results_are_judged_later_without_a_model(offline_dir, server, tmp_path, monkeypatch, capsys):
    url, state = server
    results_dir = tmp_path / "results"
    env = {"DYCOKE_OFFLINE_DIR": str(offline_dir), "OPENAI_API_KEY": "", "HOME": str(tmp_path)}
    generated = run_app(JUDGED_TASKS, "frames=4", "limit=2", f"results_dir={results_dir}", env=env)
    assert generated.returncode == 0 and "judge later with: python -m dycoke_eval.judge" in generated.stdout
    (results_file,) = results_dir.rglob("results.json")
    assert json.loads(results_file.read_text())["results"]["fixture_video_dc499"]["gpt_eval_score,none"] == "not judged"
    assert state.requests == 0

    monkeypatch.setenv("OPENAI_API_KEY", "")  # the judge runs in this process: reading files needs no model
    monkeypatch.setenv("HOME", str(tmp_path))
    assert judge_main([str(results_dir)]) == 2 and "no judge configured" in capsys.readouterr().err
    assert judge_main([str(results_dir), f"judge.base_url={url}"]) == 0
    metrics = json.loads(results_file.read_text())["results"]["fixture_video_dc499"]
    assert isinstance(metrics["gpt_eval_score,none"], (int, float)) and metrics["judged"] == 2


def make_cell(folder: Path, preds: list[str]) -> Path:
    """A saved cell with one ActivityNet-QA-like task, `anet`, whose correct answer is always 'a cat'."""
    folder.mkdir()
    item = {"question": "q", "answer": "a cat", "judge_kind": "qa", "judged": False}
    samples = [{"doc_id": i, "gpt_eval_score": {**item, "pred": p}} for i, p in enumerate(preds)]
    (folder / "samples_anet.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (folder / "results.json").write_text(json.dumps({"results": {"anet": {}}}))
    return folder


def read_judgements(cell: Path) -> list[dict]:
    return [json.loads(line) for line in (cell / "judgements_anet.jsonl").read_text().splitlines()]


def read_results(cell: Path) -> dict:
    return json.loads((cell / "results.json").read_text())


def closed_port_url() -> str:
    """The base URL of a port nothing listens on: every request is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_judge_failures_are_counted_per_task_and_excluded_from_the_metric(tmp_path, settings):
    cell = make_cell(tmp_path / "cell", ["a cat", "a dog", "x [bad-score]"])
    summary = judge_cell(cell, Judge(settings))["anet"]
    assert (summary["judged"], summary["failed"]) == (2, 1) and summary["failures"][0]["doc_id"] == 2
    metrics = json.loads((cell / "results.json").read_text())["results"]["anet"]
    assert metrics["gpt_eval_accuracy,none"] == 50.0 and metrics["gpt_eval_score,none"] == 3
    assert (metrics["judged"], metrics["judge_failed"]) == (2, 1)
    assert [v["status"] for v in read_judgements(cell)] == ["judged", "judged", "failed"]


def test_the_judge_identity_is_recorded_with_each_verdict_and_the_key_nowhere(tmp_path, monkeypatch):
    cell = make_cell(tmp_path / "cell", ["a cat", "a dog", "a cat"])
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with running_judge_server(reported_model="local-stub-judge") as (url, _):
        with_credentials = url.replace("http://", f"http://judge:{SECRET}@")  # a key written into the URL is left out too
        judge_cell(cell, Judge(JudgeSettings(base_url=with_credentials, cache_path=str(tmp_path / "c.sqlite"))))
    identity = {"endpoint": url, "model": "gpt-4o-mini", "reported_model": "local-stub-judge"}
    results = read_results(cell)
    assert results["dycoke_eval_judge"]["endpoint"] == url and results["dycoke_eval_judge"]["model"] == "gpt-4o-mini"
    judges = [{**identity, "verdicts": 3, "openai_api": False}]
    assert results["dycoke_eval_judge"]["judges"] == results["dycoke_eval"]["anet"]["judge"]["judges"] == judges
    assert [row["judge"] for row in read_judgements(cell)] == [identity] * 3
    for path in cell.rglob("*"):
        assert SECRET not in path.read_text(), path


def test_a_failed_re_judge_keeps_the_earlier_verdicts_and_metrics_and_exits_non_zero(server, tmp_path, monkeypatch, capsys):
    url, _ = server
    cell = make_cell(tmp_path / "cell", ["a cat", "a dog", "x [flaky-reply]"])  # flaky: judged only when asked again
    monkeypatch.setenv("OPENAI_API_KEY", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert judge_main([str(cell), f"judge.base_url={url}"]) == 0
    assert "gpt_eval_score=2.333, gpt_eval_accuracy=33.33 (3 verdicts held" in capsys.readouterr().out
    judged = read_results(cell)["results"]["anet"]
    verdicts = [row["verdict"] for row in read_judgements(cell)]

    closed = closed_port_url()  # unreachable: judging stops at once, and the cell keeps what it had
    before = read_judgements(cell)
    assert judge_main([str(cell), f"judge.base_url={closed}"]) == 1
    assert f"cannot connect to the judge at {closed}" in capsys.readouterr().err
    assert read_results(cell)["results"]["anet"] == judged and read_judgements(cell) == before

    with running_judge_server(reported_model="judge-b") as (url_b, _):  # a new judge that fails only the flaky sample
        assert judge_main([str(cell), f"judge.base_url={url_b}", "judge.reply_retries=0"]) == 0
    rows = read_judgements(cell)
    assert [row["judge"]["reported_model"] for row in rows] == ["judge-b", "judge-b", "gpt-4o-mini"]
    assert [row["verdict"] for row in rows] == verdicts and read_results(cell)["results"]["anet"] == judged
    summary = read_results(cell)["dycoke_eval"]["anet"]["judge"]
    assert (summary["judged_now"], summary["failed_now"], summary["kept"]) == (2, 1, 1)
    assert [(j["endpoint"], j["verdicts"]) for j in summary["judges"]] == [(url_b, 2), (url, 1)]


def test_the_local_judge_runs_as_a_command_until_interrupted():
    import signal
    import subprocess
    import sys
    import urllib.request

    server = subprocess.Popen(
        [sys.executable, "-m", "dycoke_eval.offline.judge_server", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        url = server.stdout.readline().split()[3].rstrip(":")
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Question: q\\nCorrect Answer: a\\nPredicted Answer: a"}],
        }
        request = urllib.request.Request(
            f"{url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=10).read())
        assert reply["model"] == "gpt-4o-mini" and reply["choices"][0]["message"]["content"]
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=10)
    assert server.returncode == 0 and "stopped after 1 requests" in out


def test_judging_re_renders_a_rendered_report_and_otherwise_names_the_command(tmp_path, monkeypatch, capsys):
    from dycoke_eval.judge import __main__ as judge_command

    rendered, fresh = tmp_path / "rendered", tmp_path / "fresh"
    for root in (rendered, fresh):
        (root / "cells").mkdir(parents=True)
    (rendered / "report").mkdir()
    calls = []
    monkeypatch.setattr("dycoke_eval.report.render_report", lambda root: calls.append(root))
    judge_command.rerender_reports([rendered / "cells" / "a", rendered / "cells" / "b", fresh / "cells" / "c"])
    assert calls == [rendered]  # once per results folder
    assert f"tables with the judged columns: python -m dycoke_eval.report {fresh}" in capsys.readouterr().out


def test_a_judge_that_refused_earlier_still_serves_a_cell_whose_replies_are_all_cached(server, settings, monkeypatch):
    requests = [JudgeRequest("qa", "q", "a", "a")]
    Judge(settings).judge_all(requests)
    monkeypatch.setattr(client, "REFUSED", {settings.refusal_key(): "refused earlier"})
    assert Judge(settings).judge_all(requests)[0].cached
    with pytest.raises(JudgeUnavailable, match="refused earlier"):  # anything it must ask is refused at once
        Judge(settings).judge_all([JudgeRequest("qa", "q", "a", "b")])
