"""A judge researchers can trust: the openai SDK, bounded concurrency, a persistent cache, no silent zeros.

Transport failures (429 honouring Retry-After, 5xx, timeouts, connection errors) are retried
by the SDK itself (`max_retries`, exponential backoff). A reply that arrives but does not parse
is asked again up to `reply_retries` times. A sample that still has no verdict is recorded as
failed with the reason; it is never scored 0 and never stops the run. Parsed replies are cached
in SQLite, keyed by the endpoint (its base URL), the judge model, messages and parameters, with
the model name the endpoint reported, so a re-run costs nothing and gives the same numbers, and
a verdict from one judge is never served as another's. The API key is read from the environment
variable named in the config and is never written anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

from dycoke_eval.judge.prompts import MalformedReply, build_messages, parse_reply

DEFAULT_ENDPOINT = "https://api.openai.com/v1"  # the openai SDK's own default


@dataclass
class JudgeSettings:
    model: str = "gpt-4o-mini"
    base_url: str | None = None  # any OpenAI-compatible server; None is api.openai.com
    api_key_env: str = "OPENAI_API_KEY"  # the variable holding the key (the key itself is never configured)
    concurrency: int = 16
    timeout: float = 60.0  # seconds per request
    max_retries: int = 5  # transport retries, done by the SDK
    reply_retries: int = 2  # extra asks when a reply does not parse
    temperature: float = 0.0
    max_tokens: int = 64
    price_per_million_input: float = 0.15  # USD, gpt-4o-mini
    price_per_million_output: float = 0.60
    cache_path: str = "~/.cache/dycoke-eval/judge_cache.sqlite"

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None

    def enabled(self) -> bool:
        """A judge is configured when a key is present, or a base URL points at a server that may need none."""
        return self.api_key() is not None or bool(self.base_url)

    def request_url(self) -> str:
        """The base URL requests go to, as the SDK would pick it: judge.base_url, else $OPENAI_BASE_URL, else OpenAI's."""
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_ENDPOINT

    def endpoint(self) -> str:
        """`request_url()` as recorded with verdicts and as the cache is keyed: any credentials in it left out."""
        url = urlsplit(self.request_url().rstrip("/"))
        host = url.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (f":{url.port}" if url.port else "")
        return urlunsplit(url._replace(netloc=netloc))

    def describe(self) -> dict[str, Any]:
        """Settings as recorded with results, with the endpoint actually used: the variable's name, never the key.

        The base URL is recorded without any credentials written into it.
        """
        return {**vars(self), "base_url": self.base_url and self.endpoint(), "endpoint": self.endpoint()}


@dataclass
class JudgeRequest:
    kind: str  # qa | description
    question: str
    answer: str
    pred: str


@dataclass
class JudgeResult:
    status: str  # judged | failed
    verdict: dict[str, Any] | None = None
    error: str | None = None
    cached: bool = False
    usage: dict[str, int] = field(default_factory=dict)
    reported_model: str | None = None  # the `model` the endpoint named in its reply


class ReplyCache:
    """Parsed-and-valid judge replies in SQLite, keyed by a hash of the endpoint and everything that shapes the reply.

    Each row also holds the endpoint, the requested model and the model the endpoint reported.
    Files written before the endpoint was part of the key hold their rows in the `replies` table,
    which is never read: those replies do not say which judge gave them.
    """

    TABLE = "replies_by_endpoint"

    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        # WAL without a sync per commit: each reply is committed (safe if the process dies) at no fsync cost.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS {self.TABLE} "
            "(key TEXT PRIMARY KEY, endpoint TEXT, model TEXT, reported_model TEXT, reply TEXT, usage TEXT)"
        )

    @staticmethod
    def key(endpoint: str, payload: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps({"endpoint": endpoint, "request": payload}, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> tuple[str, dict[str, int], str | None] | None:
        """(reply, usage, reported model) or None."""
        row = self._db.execute(f"SELECT reply, usage, reported_model FROM {self.TABLE} WHERE key = ?", (key,)).fetchone()
        return (row[0], json.loads(row[1]), row[2]) if row else None

    def put(self, key: str, endpoint: str, model: str, reported_model: str | None, reply: str, usage: dict[str, int]) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO {self.TABLE} VALUES (?, ?, ?, ?, ?, ?)",
            (key, endpoint, model, reported_model, reply, json.dumps(usage)),
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()


class Judge:
    def __init__(self, settings: JudgeSettings) -> None:
        self.settings = settings

    def identity(self) -> dict[str, str]:
        """Which judge this is: the endpoint's base URL and the model asked for (the reply names the model that answered)."""
        return {"endpoint": self.settings.endpoint(), "model": self.settings.model}

    def judge_all(self, requests: list[JudgeRequest], description: str = "Judging") -> list[JudgeResult]:
        """Judge every request (cached ones for free), with a progress bar; one result per request, in order."""
        return asyncio.run(self._judge_all(requests, description))

    async def _judge_all(self, requests: list[JudgeRequest], description: str) -> list[JudgeResult]:
        from openai import AsyncOpenAI

        settings = self.settings
        client = AsyncOpenAI(
            api_key=settings.api_key() or "not-needed",
            base_url=settings.request_url(),
            timeout=settings.timeout,
            max_retries=settings.max_retries,
        )
        cache = ReplyCache(settings.cache_path)
        limit = asyncio.Semaphore(settings.concurrency)
        progress = tqdm(total=len(requests), desc=description, unit="sample", disable=False)  # shown even when other bars are off

        async def one(request: JudgeRequest) -> JudgeResult:
            async with limit:
                result = await self._judge_one(client, cache, request)
            progress.update()
            return result

        try:
            return await asyncio.gather(*(one(request) for request in requests))
        finally:
            progress.close()
            cache.close()
            await client.close()

    async def _judge_one(self, client, cache: ReplyCache, request: JudgeRequest) -> JudgeResult:
        import openai

        settings = self.settings
        payload = {
            "model": settings.model,
            "messages": build_messages(request.kind, request.question, request.answer, request.pred),
            "temperature": settings.temperature,
            "max_tokens": settings.max_tokens,
        }
        endpoint = settings.endpoint()
        key = ReplyCache.key(endpoint, payload)
        if (hit := cache.get(key)) is not None:
            reply, usage, reported = hit
            return JudgeResult("judged", parse_reply(request.kind, reply), cached=True, usage=usage, reported_model=reported)
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        error = "no attempt"
        for _ in range(1 + settings.reply_retries):
            try:
                response = await client.chat.completions.create(**payload)
            except openai.APIError as failure:  # the SDK has already retried what is retryable
                return JudgeResult("failed", error=f"{type(failure).__name__}: {failure}", usage=usage)
            except ValueError as failure:  # a 200 whose body is not JSON: ask again like an unparseable reply
                error = f"malformed response body: {failure}"
                continue
            if response.usage is not None:
                usage["prompt_tokens"] += response.usage.prompt_tokens
                usage["completion_tokens"] += response.usage.completion_tokens
            text = (response.choices[0].message.content or "") if response.choices else ""
            try:
                verdict = parse_reply(request.kind, text)
            except MalformedReply as failure:
                error = f"MalformedReply: {failure}"
                continue
            reported = getattr(response, "model", None) or None
            cache.put(key, endpoint, settings.model, reported, text, usage)
            return JudgeResult("judged", verdict, usage=usage, reported_model=reported)
        return JudgeResult("failed", error=error, usage=usage)
