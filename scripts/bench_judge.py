"""Judge throughput against a local chat-completions server that takes DELAY seconds per reply.

    python scripts/bench_judge.py [--samples 200] [--delay 0.2] [--concurrency 16]

Prints the time to judge every sample with a cold cache, then again from the cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dycoke_eval.judge.client import Judge, JudgeRequest, JudgeSettings
from dycoke_eval.offline.judge_server import running_judge_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    requests = [JudgeRequest("qa", f"question {i}", "a red square", f"answer {i}") for i in range(args.samples)]
    with tempfile.TemporaryDirectory() as cache_dir, running_judge_server(delay=args.delay) as (url, state):
        settings = JudgeSettings(base_url=url, concurrency=args.concurrency, cache_path=str(Path(cache_dir) / "cache.sqlite"))
        for label in ("cold cache", "warm cache"):
            start = time.perf_counter()
            outcomes = Judge(settings).judge_all(requests, description=label)
            elapsed = time.perf_counter() - start
            judged = sum(o.status == "judged" for o in outcomes)
            print(f"{label}: {judged}/{len(requests)} judged in {elapsed:.2f} s ({state.requests} requests to the server so far)")


if __name__ == "__main__":
    main()
