"""The HTTP face of `lorakit serve`: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus
/v1/adapters to load and unload adapters at run time. Every refusal is a 4xx with OpenAI's error body, and
a bad request never disturbs the others."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import schema
from .adapters import AdapterRegistry
from .engine import SHUTTING_DOWN, Engine, RequestHandle
from .protocol import (ApiError, Limits, ParsedRequest, TextAssembler, check_json, check_lengths, chunk,
                       full_response, new_id, parse_chat, parse_completion, usage)
from .server import serve_in_background  # noqa: F401  (its former home: scripts import it from here)

T = TypeVar("T")


@dataclass
class _Server:
    """What the request handlers share."""

    engine: Engine
    registry: AdapterRegistry
    limits: Limits
    tokenizing: ThreadPoolExecutor  # one thread: tokenizing and chat templates stay off the event loop

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)


def create_app(engine: Engine, registry: AdapterRegistry, limits: Limits, base_name: str,
               api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI application; the engine thread is started and stopped with it. With an API key, every
    route but /health asks for it, the OpenAPI schema included (and the /docs pages, which cannot send it,
    are off)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        engine.stop()

    docs = api_key is None
    app = FastAPI(title="lorakit serve", lifespan=lifespan, openapi_url="/openapi.json" if docs else None,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    server = _Server(engine, registry, limits, ThreadPoolExecutor(1, thread_name_prefix="lorakit-tokenize"))
    app.state.engine, app.state.registry, app.state.limits = engine, registry, limits
    _add_error_handlers(app)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'", None,
                           "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)], responses=schema.errors())

    @v1.get("/models")
    async def models() -> dict:
        return registry.listing(base_name)

    @v1.post("/completions", openapi_extra=schema.body(schema.COMPLETION, "OpenAI's completion request"))
    async def completions(request: Request):
        parsed = parse_completion(await read_json(request, limits), limits)
        return await _generate(server, request, parsed, chat=False)

    @v1.post("/chat/completions", openapi_extra=schema.body(schema.CHAT, "OpenAI's chat completion request"))
    async def chat_completions(request: Request):
        parsed, messages = parse_chat(await read_json(request, limits), limits)
        parsed.prompt_text = await server.off_loop(render_chat, engine.tokenizer, messages)
        return await _generate(server, request, parsed, chat=True)

    @v1.post("/adapters", openapi_extra=schema.body(schema.LOAD_ADAPTER, "an adapter folder to load, and its name"))
    async def load_adapter(request: Request) -> dict:
        body = await read_json(request, limits)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object {name, path}")
        return await registry.load(body.get("name"), body.get("path"))

    @v1.delete("/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        return await registry.unload(name)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "in_flight": engine.load()}

    if not docs:
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
        async def openapi() -> dict:
            return app.openapi()

    app.include_router(v1)
    return app


class _ErrorResponse(JSONResponse):
    """OpenAI's error body, as ASCII JSON: a message that quotes the client's text stays valid whatever it holds."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _ErrorResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return _ErrorResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return _ErrorResponse(ApiError(400, problems or "invalid request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception) -> JSONResponse:
        # The exception's text may name files on the server: it goes to the server's log (uvicorn logs it), not here.
        err = ApiError(500, f"internal error ({type(exc).__name__}); the server's log has the details",
                       type_="server_error")
        return _ErrorResponse(err.body(), status_code=500)


async def read_json(request: Request, limits: Limits) -> Any:
    """The body as JSON, refused (413) past the size limit before it is all read, 400 if not JSON (or nested
    too deep, or holding lone surrogates: see `check_json`)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limits.max_body_bytes}",
                       code="request_too_large")
    parts, size = [], 0
    try:
        async for part in request.stream():
            size += len(part)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"request body is over the limit of {limits.max_body_bytes} bytes",
                               code="request_too_large")
            parts.append(part)
    except ClientDisconnect:
        raise ApiError(400, "the client left before sending the whole request body") from None
    try:
        body = json.loads(b"".join(parts))
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply", code="invalid_json") from None
    except ValueError as e:  # not JSON, not UTF-8, an integer of thousands of digits ...
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    check_json(body)
    return body


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text for a chat: the tokenizer's chat template (lorakit's plain format without one)."""
    from ..data import format_prompt

    try:
        return format_prompt(messages, tokenizer)
    except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
        raise ApiError(400, f"the chat template cannot render these messages: {e}", "messages") from None


def _prompt_ids(engine: Engine, parsed: ParsedRequest, chat: bool) -> list[int]:
    if parsed.prompt_ids is not None:
        vocab = engine.vocab_size
        if any(t >= vocab for t in parsed.prompt_ids):
            raise ApiError(400, f"prompt token ids must be below the vocabulary size {vocab}", "prompt")
        return parsed.prompt_ids
    # A chat template writes its own special tokens; a raw completion prompt gets the tokenizer's usual ones.
    return engine.tokenizer(parsed.prompt_text, add_special_tokens=not chat)["input_ids"]


async def _generate(server: _Server, request: Request, parsed: ParsedRequest, chat: bool):
    engine, limits = server.engine, server.limits
    adapter = server.registry.resolve(parsed.model)
    ids = await server.off_loop(_prompt_ids, engine, parsed, chat)
    check_lengths(len(ids), parsed.params, limits)
    if engine.load() >= limits.max_concurrent:
        raise ApiError(429, f"the server is at its limit of {limits.max_concurrent} concurrent requests; retry "
                       "shortly", code="rate_limit_exceeded", type_="rate_limit_error")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    handle = engine.submit(ids, adapter, parsed.params,
                           lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))
    rid = new_id(chat)
    text = TextAssembler(engine.tokenizer, parsed.stop)
    if parsed.stream:  # (StreamingResponse stops the stream, and so the generation, when the client leaves)
        return StreamingResponse(_stream(chat, rid, parsed, len(ids), events, handle, text),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        done = await _unless_client_leaves(request, _collect(events, handle, text))
    finally:
        handle.cancel()  # no-op when finished; stops the work if the client went away
    if done is None:
        return Response(status_code=499)  # nobody is there to read it (nginx's "client closed request")
    completion, finish = done
    return full_response(chat, rid, parsed.model, completion, finish, usage(len(ids), len(text.ids)))


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> Optional[T]:
    """`work`'s result, or None (and `work` cancelled) if the client disconnects first."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    job, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not job.done():
            job.cancel()
    return job.result() if job.done() and not job.cancelled() else None


async def _collect(events: asyncio.Queue, handle: RequestHandle, text: TextAssembler) -> tuple[str, str]:
    """(the whole completion, its finish reason)."""
    pieces, finish = [], "length"
    async for piece, finish in _pieces(events, handle, text):
        pieces.append(piece)
    return "".join(pieces), finish


async def _pieces(events: asyncio.Queue, handle: RequestHandle, text: TextAssembler) -> AsyncIterator[tuple[str, str]]:
    """(new text, finish reason so far) as tokens arrive; raises ApiError if generation failed."""
    while True:
        kind, value = await events.get()
        if kind == "token":
            piece = text.add(value)
            if text.stopped:
                handle.cancel()
                yield piece, "stop"
                return
            if piece:
                yield piece, "length"
        elif kind == "done":
            yield text.finish(), value
            return
        elif value == SHUTTING_DOWN:
            raise ApiError(503, value, code="server_shutting_down", type_="server_error")
        else:
            raise ApiError(500, str(value), code="generation_failed", type_="server_error")


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(chat: bool, rid: str, parsed: ParsedRequest, prompt_len: int, events: asyncio.Queue,
                  handle: RequestHandle, text: TextAssembler) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    try:
        if chat:
            yield _sse(chunk(True, rid, parsed.model, "", None, first=True))
        finish = "length"
        try:
            async for piece, finish in _pieces(events, handle, text):
                if piece:
                    yield _sse(chunk(chat, rid, parsed.model, piece, None))
        except ApiError as e:
            yield _sse(e.body())
            yield "data: [DONE]\n\n"
            return
        yield _sse(chunk(chat, rid, parsed.model, None, finish))
        if parsed.include_usage:
            final = chunk(chat, rid, parsed.model, None, None)
            final.update(choices=[], usage=usage(prompt_len, len(text.ids)))
            yield _sse(final)
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


def build_app(model: str, adapters: dict[str, str], adapters_dir: Optional[str] = None, limits: Optional[Limits] = None,
              api_key: Optional[str] = None, device: str = "auto", dtype: str = "auto", max_batch: int = 16,
              ignore_base_mismatch: bool = False) -> FastAPI:
    """Load the base model and the named adapters, and wire engine, registry and HTTP app together."""
    from ..models import load_model

    loaded = load_model(model, task="causal-lm", device=device, dtype=dtype)
    limits = limits or Limits()
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context and limits.context_length is None:
        limits.context_length = int(context)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch)
    registry = AdapterRegistry(engine, {model, loaded.name}, adapters_dir, ignore_base_mismatch)
    for name, path in adapters.items():
        registry.load_blocking(name, path)
    return create_app(engine, registry, limits, loaded.name, api_key)
