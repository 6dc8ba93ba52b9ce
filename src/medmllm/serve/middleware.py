"""Pure ASGI middlewares of the server: access log, request body cap, API keys.

Order (outermost first): :class:`AccessLog` -> CORS (only when configured) -> :class:`BodyLimit`
-> :class:`ApiKeyAuth` -> the FastAPI app. Each answers its own errors in the JSON error shape
(:mod:`medmllm.serve.errors`).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from datetime import datetime, timezone
from typing import Iterable

from medmllm.serve.errors import ServeError

access_log = logging.getLogger("medmllm.serve.access")

PUBLIC_PATHS = frozenset({"/", "/health", "/favicon.ico"})
API_PATHS = frozenset({"/v1/chat/completions", "/v1/models", "/v1/preview"})  # logged even when refused early
PUBLIC_PREFIXES = ("/static/",)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def send_error(send, err: ServeError, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Send ``err`` as a complete JSON response on a raw ASGI ``send``."""
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def log_slot(scope) -> dict:
    """The dict a handler fills with loggable facts (token counts, error code; never content)."""
    return scope.setdefault("medmllm.log", {})


class AccessLog:
    """One JSON line per HTTP request on the ``medmllm.serve.access`` logger: ``time`` (UTC ISO 8601),
    ``method``, ``route`` (the matched route's path template, ``<unmatched>`` otherwise: raw paths are
    not logged), ``status``, ``latency_ms`` (until the last body byte is sent, streams included) and
    what the handler put in :func:`log_slot` (``prompt_tokens``, ``completion_tokens``,
    ``finish_reason``, ``error_code``, ``request_id``). No message text, file or key is ever logged.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        slot = log_slot(scope)
        state = {"status": None}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        except BaseException:
            state["status"] = state["status"] or 500
            raise
        finally:
            route = scope.get("route")
            line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "method": scope.get("method"),
                    "route": getattr(route, "path", None) or (scope["path"] if scope.get("path") in
                                                              PUBLIC_PATHS | API_PATHS else "<unmatched>"),
                    "status": state["status"], "latency_ms": round(1000 * (time.perf_counter() - t0), 2)}
            line.update({k: v for k, v in slot.items() if v is not None})
            access_log.info(json.dumps(line))


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before the app parses anything.

    A declared ``Content-Length`` over the cap is refused at once; otherwise the body is read with a
    running count (chunked uploads too) and handed to the app only when complete and under the cap.
    An oversized body is drained (up to ``drain_factor`` x the cap) before the answer so that a
    client still sending reads the 413 rather than a reset connection.
    """

    def __init__(self, app, max_bytes: int, drain_factor: int = 4):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.drain_limit = int(max_bytes) * drain_factor

    def _too_large(self) -> ServeError:
        return ServeError(413, f"the request body is larger than the limit of {self.max_bytes} bytes",
                          "body_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._drain(receive, 0)
            return await send_error(send, self._too_large(), [(b"connection", b"close")])
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, size)
                return await send_error(send, self._too_large(), [(b"connection", b"close")])
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: http.disconnect when the client goes

        return await self.app(scope, replay, send)

    async def _drain(self, receive, already_read: int) -> None:
        seen = already_read
        while seen <= self.drain_limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class ApiKeyAuth:
    """``Authorization: Bearer <key>`` required on every path but :data:`PUBLIC_PATHS` and
    ``/static/`` (the web page, which holds no data and sends the key with its API calls).
    Keys are compared in constant time; CORS preflight (OPTIONS) passes to the CORS layer."""

    def __init__(self, app, keys: Iterable[str]):
        self.app = app
        self.keys = [k.encode() for k in keys if k]

    def _public(self, scope) -> bool:
        path = scope.get("path", "")
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES) or scope.get("method") == "OPTIONS"

    def _ok(self, scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                token = token.strip()
                if scheme.lower() != b"bearer" or not token:
                    return False
                return any(hmac.compare_digest(token, k) for k in self.keys)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or self._public(scope) or self._ok(scope):
            return await self.app(scope, receive, send)
        log_slot(scope)["error_code"] = "invalid_api_key"
        err = ServeError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        await send_error(send, err, [(b"www-authenticate", b"Bearer")])


__all__ = ["AccessLog", "ApiKeyAuth", "BodyLimit", "PUBLIC_PATHS", "access_log", "log_slot", "send_error"]
