"""A real local HTTP server speaking the OpenAI chat-completions protocol, standing in for GPT-4o-mini.

It judges deterministically: a QA prediction equal to the correct answer (case and spaces aside)
gets {'pred': 'yes', 'score': 5}, anything else {'pred': 'no', 'score': 1}; a description gets
{'score': 3} when non-empty, else {'score': 0}. Markers in the predicted answer inject faults:

  [429]            first attempt: 429 with Retry-After: 1
  [500]            first attempt: 500
  [slow]           first attempt: replies after `slow_seconds` (past a short client timeout)
  [flaky-reply]    first attempt: content that is not a verdict, then a valid one
  [malformed-body] always: a 200 whose body is not JSON
  [not-dict]       always: content with no dictionary
  [bad-score]      always: a score of 9

Its replies name the requested model, or `reported_model` when one is given (as a real server
names the model that answered). With `api_key` set it refuses (401) any request without that key.
It listens on 127.0.0.1 only and stops when the `running_judge_server` block ends.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class ServerState:
    delay: float = 0.0  # seconds before every reply
    slow_seconds: float = 3.0
    reported_model: str | None = None  # the `model` named in replies; None: the requested one
    api_key: str | None = None  # the only key accepted; None: any
    attempts: Counter = field(default_factory=Counter)  # per request body
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _field(content: str, label: str) -> str:
    match = re.search(rf"{label}: (.*)", content)
    return match.group(1).strip() if match else ""


def verdict_for(content: str) -> str:
    """The deterministic reply to one judge prompt (the user message's text)."""
    pred, answer = _field(content, "Predicted Answer"), _field(content, "Correct Answer")
    if "'pred'" in content:  # the QA prompt asks for pred and score
        same = pred.lower().split() == answer.lower().split()
        return "{'pred': 'yes', 'score': 5}" if same else "{'pred': 'no', 'score': 1}"
    return "{'score': 3}" if pred else "{'score': 0}"


def _handler(state: ServerState):
    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True  # headers and body go out in separate writes; don't wait on delayed ACKs

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with state.lock:
                state.requests += 1
                state.attempts[raw] += 1
                attempt = state.attempts[raw]
            if state.api_key is not None and self.headers.get("Authorization") != f"Bearer {state.api_key}":
                return self._send(401, b'{"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}')
            if not self.path.endswith("/chat/completions"):
                return self._send(404, b'{"error": {"message": "not found"}}')
            request = json.loads(raw)
            content = request["messages"][-1]["content"]
            pred = _field(content, "Predicted Answer")
            time.sleep(state.delay)
            if "[429]" in pred and attempt == 1:
                return self._send(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": "1"})
            if "[500]" in pred and attempt == 1:
                return self._send(500, b'{"error": {"message": "server error"}}')
            if "[slow]" in pred and attempt == 1:
                time.sleep(state.slow_seconds)
            if "[malformed-body]" in pred:
                return self._send(200, b"this is not json {")
            reply = verdict_for(content)
            if "[not-dict]" in pred or ("[flaky-reply]" in pred and attempt == 1):
                reply = "The prediction looks fine to me."
            if "[bad-score]" in pred:
                reply = "{'pred': 'yes', 'score': 9}"
            prompt_tokens = len(content.split())
            body = {
                "id": f"chatcmpl-{state.requests}",
                "object": "chat.completion",
                "created": 0,
                "model": state.reported_model or request.get("model", "local"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 10, "total_tokens": prompt_tokens + 10},
            }
            return self._send(200, json.dumps(body).encode())

    return Handler


@contextmanager
def running_judge_server(
    delay: float = 0.0,
    slow_seconds: float = 3.0,
    reported_model: str | None = None,
    port: int = 0,
    api_key: str | None = None,
) -> Iterator[tuple[str, ServerState]]:
    """Serve on 127.0.0.1 (`port`, or a free one) for the duration of the block; yields (base_url, state)."""
    state = ServerState(delay=delay, slow_seconds=slow_seconds, reported_model=reported_model, api_key=api_key)
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    """`python -m dycoke_eval.offline.judge_server [--port N]`: serve until Ctrl-C, printing the base URL to use."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m dycoke_eval.offline.judge_server", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--reported-model", default=None, help="the model name its replies give (default: the requested one)")
    args = parser.parse_args(argv)
    # Ctrl-C (SIGINT) stops it even when started in the background by a shell, which starts it with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with running_judge_server(reported_model=args.reported_model, port=args.port) as (url, state):
        print(f"local judge at {url}: judge with  python -m dycoke_eval.judge RESULTS_DIR judge.base_url={url}", flush=True)
        print("its verdicts are deterministic stand-ins, not GPT's; Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(f"stopped after {state.requests} requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
