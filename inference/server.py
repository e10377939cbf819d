"""An OpenAI-compatible HTTP endpoint over the transformers backend (``taqrir model serve``).

For development without a GPU: the SGLang client is exercised over real HTTP against the tiny
model. Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (image parts as
base64 data URLs only, ``response_format`` of type ``json_schema`` or ``json_object``). Errors
answer in OpenAI's shape (``{"error": {...}}``) with 400 for bad requests. Concurrent requests are
gathered for up to ``max_wait_s`` into one batch (continuous batching in miniature), so the
backend's batched generation serves parallel clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .images import decode_image, from_data_url
from .prompt_format import parse_openai_messages
from .sections import sections_schema
from .transformers_backend import TransformersBackend
from .types import GenerationRequest, GenerationResult, SamplingParams

log = logging.getLogger(__name__)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}}, status)


def to_generation_request(body: dict[str, Any], default_max_tokens: int) -> GenerationRequest:
    """An OpenAI chat-completions body as a :class:`GenerationRequest`; ValueError if unsupported."""
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ValueError("messages must be a non-empty list")
    messages, urls = parse_openai_messages(raw_messages)
    images = [from_data_url(u) for u in urls]
    for image in images:
        decode_image(image)
    stop = body.get("stop") or ["<|eot_id|>"]
    sampling = SamplingParams(
        temperature=float(body.get("temperature", 0.1)),
        top_p=float(body.get("top_p", 1.0)),
        max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or default_max_tokens),
        stop=tuple([stop] if isinstance(stop, str) else stop),
        seed=body.get("seed"),
    )
    schema: dict[str, Any] | None = None
    response_format = body.get("response_format") or {}
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be an object")
    elif kind == "json_object":
        schema = sections_schema()
    elif kind not in (None, "text"):
        raise ValueError(f"unsupported response_format type {kind!r}")
    return GenerationRequest(images=images, messages=messages, sampling=sampling, json_schema=schema)


_Pending = tuple[GenerationRequest, "asyncio.Future[GenerationResult]"]


class Batcher:
    """Collects concurrent requests into batches for one backend, one batch at a time."""

    def __init__(self, backend: TransformersBackend, *, max_batch: int, max_wait_s: float) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()

    async def submit(self, request: GenerationRequest) -> GenerationResult:
        future: asyncio.Future[GenerationResult] = asyncio.get_running_loop().create_future()
        await self.queue.put((request, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            try:
                results = await asyncio.to_thread(self.backend.generate, [r for r, _ in batch])
            except Exception as err:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


def create_app(
    backend: TransformersBackend,
    *,
    served_name: str,
    default_max_tokens: int = 1024,
    max_batch: int = 8,
    max_wait_s: float = 0.01,
) -> FastAPI:
    """The FastAPI app answering for ``backend`` under the model id ``served_name``."""
    batcher: Batcher | None = None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nonlocal batcher
        batcher = Batcher(backend, max_batch=max_batch, max_wait_s=max_wait_s)
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="taqrir model serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    revision = backend.revision

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": served_name, "object": "model", "owned_by": "taqrir", "root": str(backend.model_path),
            "revision": f"tiny:{revision}" if backend.tiny else revision, "created": 0,
        }]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse | dict[str, Any]:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            generation = to_generation_request(body, default_max_tokens)
        except ValueError as err:
            return _error(400, str(err))
        assert batcher is not None, "the app's lifespan starts the batcher"
        try:
            result = await batcher.submit(generation)
        except ValueError as err:
            return _error(400, str(err))
        log.info("completion: prompt_tokens=%d completion_tokens=%d", result.prompt_tokens, result.completion_tokens)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        }

    return app
