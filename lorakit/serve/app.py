"""The HTTP face of `lorakit serve`: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus
/v1/adapters to load and unload adapters at run time. Every refusal is a 4xx with OpenAI's error body, and
a bad request never disturbs the others."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from typing import Any, AsyncIterator, Iterator, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters import AdapterRegistry
from .engine import Engine, RequestHandle
from .protocol import (ApiError, Limits, ParsedRequest, TextAssembler, check_lengths, chunk, full_response, new_id,
                       parse_chat, parse_completion, usage)


def create_app(engine: Engine, registry: AdapterRegistry, limits: Limits, base_name: str,
               api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI application; the engine thread is started and stopped with it."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.state.engine, app.state.registry, app.state.limits = engine, registry, limits
    _add_error_handlers(app)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'", None,
                           "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models() -> dict:
        return registry.listing(base_name)

    @v1.post("/completions")
    async def completions(request: Request):
        parsed = parse_completion(await read_json(request, limits), limits)
        return await _generate(engine, registry, limits, parsed, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        parsed, messages = parse_chat(await read_json(request, limits), limits)
        parsed.prompt_text = render_chat(engine.tokenizer, messages)
        return await _generate(engine, registry, limits, parsed, chat=True)

    @v1.post("/adapters")
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

    app.include_router(v1)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, str(exc.errors())).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception) -> JSONResponse:
        err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")
        return JSONResponse(err.body(), status_code=500)


async def read_json(request: Request, limits: Limits) -> Any:
    """The body as JSON, refused (413) past the size limit before it is all read, 400 if not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limits.max_body_bytes}",
                       code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limits.max_body_bytes:
            raise ApiError(413, f"request body is over the limit of {limits.max_body_bytes} bytes",
                           code="request_too_large")
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


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


async def _generate(engine: Engine, registry: AdapterRegistry, limits: Limits, parsed: ParsedRequest, chat: bool):
    adapter = registry.resolve(parsed.model)
    ids = _prompt_ids(engine, parsed, chat)
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
    if parsed.stream:
        return StreamingResponse(_stream(chat, rid, parsed, len(ids), events, handle, text),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        pieces, finish = [], "length"
        async for piece, finish in _pieces(events, handle, text):
            pieces.append(piece)
    finally:
        handle.cancel()  # no-op when finished; stops the work if the client went away
    return full_response(chat, rid, parsed.model, "".join(pieces), finish, usage(len(ids), len(text.ids)))


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


@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` under uvicorn on a thread (port 0 = any free port); yields its base URL, stops on exit."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="lorakit-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
