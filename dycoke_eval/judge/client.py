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


def is_openai_api(endpoint: str) -> bool:
    """Verdicts (and prices) are GPT's only from OpenAI's API; any other endpoint is a stand-in, whatever it reports."""
    return endpoint.rstrip("/") == DEFAULT_ENDPOINT


def judge_label(endpoint: str, model: str, reported_model: str | None = None) -> str:
    """Who gave verdicts, in words: the model for OpenAI's API; for any other endpoint, that it is a stand-in, and where."""
    reported = f", reported {reported_model}" if reported_model and reported_model != model else ""
    if is_openai_api(endpoint):
        return f"{model}{reported}"
    return f"a stand-in at {endpoint}, not OpenAI's API (asked for {model}{reported})"


class JudgeUnavailable(Exception):
    """The judge cannot answer any request (no connection, key refused): judging stops at the first such failure.

    Verdicts already given are in the reply cache, and a cell's earlier verdicts stay as they were.
    """


REFUSED: dict[str, str] = {}  # judge (endpoint and key digest) -> why it failed, so later cells of a process skip it at once


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
        endpoint = self.endpoint()
        return {**vars(self), "base_url": self.base_url and endpoint, "endpoint": endpoint, "openai_api": is_openai_api(endpoint)}

    def refusal_key(self) -> str:
        """This judge as `REFUSED` knows it: the endpoint and a digest of the key (another key may be accepted)."""
        return f"{self.endpoint()} {hashlib.sha256((self.api_key() or '').encode()).hexdigest()[:12]}"

    def check_reachable(self) -> None:
        """One TCP connection to the endpoint, before any request: a refused one is one line now, not retries.

        Skipped where a proxy carries the requests (the SDK honours $HTTPS_PROXY; the endpoint itself may be
        unreachable from here while the proxy reaches it).
        """
        import socket
        import urllib.request

        url = urlsplit(self.request_url())
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        if url.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
            return
        try:
            socket.create_connection((host, port), timeout=min(self.timeout, 10)).close()
        except OSError as error:
            fix = "check the network" if is_openai_api(self.endpoint()) else "start that server"
            raise JudgeUnavailable(
                f"cannot connect to the judge at {self.endpoint()} ({error.strerror or error}); {fix} or set "
                "judge.base_url= (or $OPENAI_BASE_URL)"
            ) from None


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
        """Judge every request (cached ones for free), with a progress bar; one result per request, in order.

        Raises JudgeUnavailable at the first request the judge cannot answer at all (and for the rest of the process).
        """
        settings = self.settings
        try:
            return asyncio.run(self._judge_all(requests, description))
        except JudgeUnavailable as error:
            REFUSED[settings.refusal_key()] = str(error)
            raise

    def payload(self, request: JudgeRequest) -> dict[str, Any]:
        """The chat request for one judgement, as sent and as the cache is keyed."""
        settings = self.settings
        return {
            "model": settings.model,
            "messages": build_messages(request.kind, request.question, request.answer, request.pred),
            "temperature": settings.temperature,
            "max_tokens": settings.max_tokens,
        }

    async def _judge_all(self, requests: list[JudgeRequest], description: str) -> list[JudgeResult]:
        from openai import AsyncOpenAI

        settings = self.settings
        cache = ReplyCache(settings.cache_path)
        endpoint = settings.endpoint()
        if any(cache.get(ReplyCache.key(endpoint, self.payload(request))) is None for request in requests):
            try:  # only when something must be asked: a cached re-run needs no server
                if (reason := REFUSED.get(settings.refusal_key())) is not None:
                    raise JudgeUnavailable(f"{reason} (as earlier in this process)")
                settings.check_reachable()
            except JudgeUnavailable:
                cache.close()
                raise
        client = AsyncOpenAI(
            api_key=settings.api_key() or "not-needed",
            base_url=settings.request_url(),
            timeout=settings.timeout,
            max_retries=settings.max_retries,
        )
        limit = asyncio.Semaphore(settings.concurrency)
        progress = tqdm(total=len(requests), desc=description, unit="sample", disable=False)  # shown even when other bars are off

        async def one(request: JudgeRequest) -> JudgeResult:
            async with limit:
                result = await self._judge_one(client, cache, request)
            progress.update()
            return result

        try:
            async with asyncio.TaskGroup() as group:  # the first JudgeUnavailable cancels the requests still waiting
                tasks = [group.create_task(one(request)) for request in requests]
            return [task.result() for task in tasks]
        except* JudgeUnavailable as failures:
            raise failures.exceptions[0] from None
        finally:
            progress.close()
            cache.close()
            await client.close()

    async def _judge_one(self, client, cache: ReplyCache, request: JudgeRequest) -> JudgeResult:
        import openai

        settings = self.settings
        payload = self.payload(request)
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
            except (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError) as failure:
                if isinstance(failure, openai.APITimeoutError):  # one slow reply: that sample fails, the others go on
                    return JudgeResult("failed", error=f"{type(failure).__name__}: {failure}", usage=usage)
                raise JudgeUnavailable(
                    f"the judge at {endpoint} refused: {type(failure).__name__}: {str(failure).splitlines()[0]}; "
                    f"check ${settings.api_key_env} and judge.base_url"
                ) from None
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
