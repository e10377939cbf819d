"""Client backend for SGLang (or any OpenAI-compatible multimodal server) over HTTP.

Speaks ``POST /v1/chat/completions``: BiMediX2's system prompt sent explicitly, each user turn's
image parts (base64 data URLs) before its text part, ``response_format: json_schema`` when a schema
is requested (a script restriction travels as the schema's ``pattern``, written for xgrammar, the
engine SGLang compiles schemas with: see :mod:`inference.scripts`), ``stop: ["<|eot_id|>"]``. One pooled :class:`httpx.Client`; at most ``max_concurrency``
requests in flight; connect errors, timeouts, 429 and 5xx are retried with exponential backoff,
then raise :class:`BackendUnavailable`. Other 4xx answers are permanent errors.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from ground.errors import PermanentError

from .errors import BackendUnavailable
from .images import to_data_url
from .prompt_format import openai_messages
from .scripts import script_pattern
from .types import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class _Retryable(Exception):
    """A transient failure of one attempt (kept internal; surfaces as BackendUnavailable)."""


def _is_retryable(err: BaseException) -> bool:
    return isinstance(err, _Retryable)


def request_body(request: GenerationRequest, model: str) -> dict[str, Any]:
    """The OpenAI chat-completions body for ``request`` (pure; tested against the format)."""
    urls = [to_data_url(b) for b in request.images]
    body: dict[str, Any] = {
        "model": model,
        "messages": openai_messages(request.messages, urls),
        "temperature": request.sampling.temperature,
        "top_p": request.sampling.top_p,
        "max_tokens": request.sampling.max_new_tokens,
        "stop": list(request.sampling.stop),
    }
    if request.sampling.seed is not None:
        body["seed"] = request.sampling.seed
    if request.sampling.ignore_eos:
        body["ignore_eos"] = True  # SGLang's extension of the OpenAI body (benchmarks only)
    if request.json_schema is not None:
        schema = copy.deepcopy(request.json_schema)
        if request.allowed_script:
            for prop in schema.get("properties", {}).values():
                if isinstance(prop, dict) and prop.get("type") == "string" and "pattern" not in prop:
                    # xgrammar ignores minLength beside a pattern; the script pattern is non-empty itself
                    prop.pop("minLength", None)
                    prop["pattern"] = script_pattern(request.allowed_script)
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": str(schema.get("title", "output")), "schema": schema, "strict": True},
        }
    return body


class SGLangBackend:
    """Generates through an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    name = "sglang"

    def __init__(
        self,
        base_url: str,
        *,
        model_name: str,
        api_key: str | None = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 300.0,
        max_retries: int = 3,
        retry_backoff: float = 0.5,
        retry_backoff_max: float = 8.0,
        max_concurrency: int = 8,
        max_connections: int = 16,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.max_concurrency = max_concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(request_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="sglang")
        self._revision: str | None = None

    # -- protocol ---------------------------------------------------------------------------
    def ready(self) -> None:
        """Raise :class:`BackendUnavailable` unless ``/health`` answers and the model is served."""
        try:
            health = self._client.get("/health")
            if health.status_code >= 400:
                raise BackendUnavailable(f"{self.base_url}/health answered {health.status_code}")
            models = self._client.get("/v1/models")
            models.raise_for_status()
            ids = [m.get("id") for m in models.json().get("data", [])]
        except httpx.HTTPError as err:
            raise BackendUnavailable(f"model server {self.base_url} is not reachable: {type(err).__name__}") from err
        if self.model_name not in ids and len(ids) != 1:
            raise BackendUnavailable(f"model server serves {ids}, not {self.model_name!r}")

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model_name": self.model_name, "server_url": self.base_url,
                "model_revision": self.revision(), "tiny": self.revision().startswith("tiny:")}

    def revision(self) -> str:
        """The served model's revision, from ``/v1/models`` (``root`` or a hash if given), else its name."""
        if self._revision is None:
            try:
                data = self._client.get("/v1/models").json().get("data", [])
            except (httpx.HTTPError, ValueError):
                return f"served:{self.model_name}"
            entry = next((m for m in data if m.get("id") == self.model_name), data[0] if data else {})
            self._revision = str(entry.get("revision") or entry.get("root") or f"served:{self.model_name}")
        return self._revision

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return list(self._pool.map(self._generate_one, requests))

    # -- internals --------------------------------------------------------------------------
    def _attempt(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._client.post("/v1/chat/completions", json=body)
        except (httpx.TransportError, httpx.TimeoutException) as err:
            raise _Retryable(f"{type(err).__name__}") from err
        if response.status_code in _RETRY_STATUS:
            raise _Retryable(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise PermanentError(
                # only the status: an error body may echo the request (study context), and this
                # message travels into failure reasons, logs and the audit trail
                f"model server refused the request: HTTP {response.status_code}"
            )
        try:
            data: dict[str, Any] = response.json()
        except ValueError as err:
            raise _Retryable("response is not JSON") from err
        return data

    def _generate_one(self, request: GenerationRequest) -> GenerationResult:
        body = request_body(request, self.model_name)
        started = time.perf_counter()
        retrying = Retrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_exponential(multiplier=self.retry_backoff, max=self.retry_backoff_max),
            reraise=False,
        )
        try:
            data = retrying(self._attempt, body)
        except RetryError as err:
            cause = err.last_attempt.exception()
            log.warning("model server %s failed %d times: %s", self.base_url, self.max_retries + 1, cause)
            raise BackendUnavailable(
                f"model server {self.base_url} unavailable after {self.max_retries + 1} attempts: {cause}"
            ) from cause
        latency = time.perf_counter() - started
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as err:
            raise PermanentError("model server answered without choices[0].message.content") from err
        usage = data.get("usage") or {}
        return GenerationResult(
            text=str(text).strip(),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            latency_s=latency,
            model_id=str(data.get("model", self.model_name)),
            model_revision=self.revision(),
            finish_reason=str(choice.get("finish_reason") or "stop"),
        )
