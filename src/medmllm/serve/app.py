"""The OpenAI-compatible HTTP server: ``create_app(engine, ...) -> FastAPI``.

Routes:

* ``POST /v1/chat/completions`` — non-streaming (``chat.completion``) or, with ``"stream": true``,
  server-sent events: ``data: {chat.completion.chunk}`` lines (first the role, then content deltas,
  then the ``finish_reason``; a usage chunk when ``stream_options.include_usage``) and
  ``data: [DONE]``. Request format: :mod:`medmllm.serve.schema`, media: :mod:`medmllm.serve.inputs`.
  ``temperature`` defaults to 0 (greedy, reproducible); ``max_tokens`` to what fits the context, at
  most the engine's ``default_max_tokens``.
* ``GET /v1/models``, ``GET /health`` (no key; 503 when the engine's worker is not running).
* ``POST /v1/preview`` — a PNG of an uploaded file for the web page (:mod:`medmllm.serve.preview`).
* ``GET /`` and ``/static/app.js``, ``/static/style.css`` — the web page (no key: it holds no data).

Every error is ``{"error": {"message", "type", "param", "code"}}``: 400 body not JSON, 401 API key,
404 route or model, 405 method, 413 body or file too large (checked before parsing), 415 body not
JSON-typed, 422 validation (schema, media, context length with the numbers), 429 queue full,
500 with a generic message (the detail is logged, never returned).
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medmllm.serve.engine import Delta, Done, Engine, Failed, SamplingParams
from medmllm.serve.errors import ServeError, error_body, invalid
from medmllm.serve.inputs import InputLimits, to_record_messages
from medmllm.serve.middleware import AccessLog, ApiKeyAuth, BodyLimit, log_slot
from medmllm.serve.schema import ChatRequest

log = logging.getLogger("medmllm.serve")

STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class ServeLimits:
    """Request limits: ``max_body_bytes`` (413 before parsing) and the per-request media ``inputs``."""

    max_body_bytes: int = 48 << 20
    inputs: InputLimits = field(default_factory=InputLimits)


def create_app(engine: Engine, api_keys: Iterable[str] = (), cors_origins: Iterable[str] = (),
               limits: ServeLimits | None = None, *, close_engine_on_shutdown: bool = False):
    """The FastAPI app serving ``engine`` (started with the app; see module doc for the routes).

    ``api_keys``: accepted Bearer keys (none: no key needed). ``cors_origins``: origins allowed by
    CORS (none: no CORS headers at all). ``close_engine_on_shutdown``: stop the engine's worker
    when the server stops (the CLI does; tests sharing an engine do not).
    """
    limits = limits or ServeLimits()
    keys = [k for k in api_keys if k]

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        if close_engine_on_shutdown:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="medmllm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.limits = limits
    _add_error_handlers(app)
    _add_api_routes(app, engine, limits)
    _add_page_routes(app)
    # add_middleware wraps: the last added is the outermost
    app.add_middleware(ApiKeyAuth, keys=keys)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    origins = [o for o in cors_origins if o]
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Filename"],
                           expose_headers=["X-Medmllm-Kind", "X-Medmllm-Slices", "X-Medmllm-Slice"])
    app.add_middleware(AccessLog)
    return app


# ============================================================================= errors

def _json_error(err: ServeError, request=None):
    if request is not None:
        log_slot(request.scope)["error_code"] = err.code
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _add_error_handlers(app) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(request, exc: ServeError):
        return _json_error(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return _json_error(_from_pydantic(exc.errors()), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: f"no such route: {request.method} {request.url.path[:200]}",
                   405: f"method {request.method} is not allowed on {request.url.path[:200]}"}
        status = exc.status_code if 400 <= exc.status_code < 600 else 500
        return _json_error(ServeError(status, message.get(status, "request refused"),
                                      codes.get(status, f"http_{status}")), request)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.error("unhandled error on %s", request.url.path[:200], exc_info=exc)
        return _json_error(ServeError(500, "internal server error; the error was logged", "internal_error"), request)


def _from_pydantic(errors) -> ServeError:
    """The most specific pydantic error as a 422 naming the field (its message, never the input value).

    Union branches put type labels in the location (``constrained-str``, ``list[...]``) and a
    discriminated union repeats the tag (``image_url.image_url``): both are removed from ``param``.
    """
    def path(err) -> list[str]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        loc = [x for x in loc if "[" not in x and "-" not in x and x not in ("str", "int", "float", "bool")]
        return [x for i, x in enumerate(loc) if i == 0 or x != loc[i - 1]]

    errors = list(errors or [])
    if not errors:
        return invalid("invalid request", "invalid_value")
    first = max(reversed(errors), key=lambda e: len(path(e)))
    param = ".".join(path(first)) or None
    msg = str(first.get("msg", "invalid value"))
    code = "missing_field" if first.get("type") == "missing" else "invalid_value"
    return invalid(f"{param}: {msg}" if param else msg, code, param)


# ============================================================================= API

def _parse_request(body: bytes, content_type: str | None) -> ChatRequest:
    from pydantic import ValidationError

    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ServeError(415, f"expected Content-Type application/json, got {ctype[:60] or 'none'}",
                         "unsupported_content_type")
    try:
        obj = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise ServeError(400, "the request body is not valid JSON (UTF-8, no NaN/Infinity)", "invalid_json") from None
    if not isinstance(obj, dict):
        raise invalid(f"expected a JSON object at the top level, got {type(obj).__name__}", "invalid_value")
    try:
        return ChatRequest.model_validate(obj)
    except ValidationError as exc:
        raise _from_pydantic(exc.errors(include_url=False, include_input=False)) from None
    except RecursionError:
        raise invalid("the request is nested too deeply", "invalid_value") from None


def _refuse_constant(name: str):
    raise ValueError(name)


def _sampling(req: ChatRequest) -> SamplingParams:
    return SamplingParams(max_tokens=req.limit_tokens,
                          temperature=0.0 if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=tuple(req.stop_list))


def _add_api_routes(app, engine: Engine, limits: ServeLimits) -> None:
    def prepare(req: ChatRequest):
        with tempfile.TemporaryDirectory(prefix="medmllm-serve-") as folder:
            messages, params = to_record_messages(req.messages, Path(folder), limits.inputs)
            return engine.prepare(messages, _sampling(req), params)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse_request(await request.body(), request.headers.get("content-type"))
        if req.model is not None and req.model != engine.model_id:
            raise ServeError(404, f"model {req.model[:80]!r} is not served here; GET /v1/models lists "
                                  f"{engine.model_id!r}", "model_not_found", "model")
        try:
            prepared = await run_in_threadpool(prepare, req)
        except ServeError:
            raise
        except Exception:  # noqa: BLE001 - a bug or a reader failing on client bytes: logged, generic answer
            log.warning("request preparation failed", exc_info=True)
            raise invalid("the request's files could not be processed", "unprocessable_input") from None
        slot = log_slot(request.scope)
        slot.update(request_id=prepared.id, prompt_tokens=prepared.prompt_tokens)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (server stopping)
                pass

        handle = engine.submit(prepared, sink, stream=req.stream)   # QueueFull -> 429
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(events, handle, cid, created, engine.model_id, include_usage, slot),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                event = await events.get()
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Done):
                    break
        finally:
            handle.cancel()  # no-op once done; stops the row if the client went away
        slot.update(completion_tokens=event.completion_tokens, finish_reason=event.finish_reason)
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": engine.model_id,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text},
                                          "logprobs": None, "finish_reason": event.finish_reason}],
                             "usage": event.usage, "system_fingerprint": None})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0,
                                            "owned_by": "medmllm", "max_model_len": engine.max_context,
                                            "modalities": engine.modalities}]}

    @app.get("/health")
    async def health():
        alive = engine.alive
        body = {"status": "ok" if alive else "unavailable", "model": engine.model_id, "waiting": engine.waiting,
                "queue_size": engine.queue_size, "stats": dict(engine.stats)}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.post("/v1/preview")
    async def preview_route(request: Request, kind: str = "image", window: str = "auto",
                            slice_index: str | None = Query(None, alias="slice"), filename: str | None = None):
        from medmllm.serve.preview import parse_slice, preview

        body = await request.body()
        if not body:
            raise invalid("the request body is empty: send the file's bytes", "empty_file", "file")
        if len(kind) > 20 or len(window) > 32 or (filename and len(filename) > 255):
            raise invalid("query parameters are too long", "invalid_value")
        index = parse_slice(slice_index)
        try:
            out, headers = await run_in_threadpool(preview, body, kind, window, index, filename, limits.inputs)
        except ServeError:
            raise
        except Exception:  # noqa: BLE001 - logged; the client gets a generic 422
            log.warning("preview failed", exc_info=True)
            raise invalid("the file could not be rendered", "unprocessable_input", "file") from None
        if isinstance(out, dict):
            return JSONResponse(out)
        return Response(out, media_type="image/png", headers={**headers, "Cache-Control": "no-store"})


async def _sse(events: asyncio.Queue, handle, cid: str, created: int, model_id: str, include_usage: bool,
               slot: dict):
    """The SSE body: role chunk, content chunks, finish chunk, [usage chunk], [DONE]."""

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield chunk({"content": event.text})
            elif isinstance(event, Done):
                slot.update(completion_tokens=event.completion_tokens, finish_reason=event.finish_reason)
                yield chunk({}, event.finish_reason)
                if include_usage:
                    usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                             "choices": [], "usage": event.usage}
                    yield f"data: {json.dumps(usage)}\n\n"
                break
            elif isinstance(event, Failed):
                slot["error_code"] = event.error.code
                yield f"data: {json.dumps(event.error.body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


# ============================================================================= web page

def _static(name: str) -> bytes:
    return resources.files("medmllm.serve").joinpath("static", name).read_bytes()


def _add_page_routes(app) -> None:
    @app.get("/")
    async def index():
        return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC_FILES:
            raise ServeError(404, "no such file", "not_found")
        return Response(_static(name), media_type=STATIC_FILES[name], headers=_PAGE_HEADERS)


__all__ = ["STATIC_FILES", "ServeLimits", "create_app", "error_body"]
